"""Offline evaluation, exactly as /work/shared/EVALUATION.md defines it.

**Protocol A** (ratings): temporal leave-last-one-out. Per user, interactions sorted by time
(ties keep the table's order); users with at least 5 interactions give their last one to the
test set and their second-to-last to the validation set; everything else is training data.

**Protocol B** (event streams, where a user views, clicks, carts and buys one item): next new
item. Each (user, item) pair's earliest event is a *first interaction*; users with at least 5
give their last first interaction to test and the second-to-last to validation. A user's input
at a target is every event of that user (repeats too) strictly before the target's timestamp;
nothing at or after it is training data for that user.

For each target user every item is scored, the items the user touched before the target are
removed, and HR@10, NDCG@10 and HR@50 are averaged. ``protocol_for`` picks B for tables of
view/click/add_to_cart/purchase events and A for ratings.

Two stages, each with its own input: at the **validation** stage a model sees the training
interactions only; at the **test** stage it also sees the validation interaction (everything
before the test target). Every hyperparameter (EASE's lambda, the recency half-life) is
chosen on the validation stage; the test stage is scored once, with the choice.

Baselines on the same split: most-popular, item-kNN (cosine), EASE^R (Steck 2019),
recency-weighted EASE (EASE's weights; the user's row weights each interaction 0.5^(r/h),
r its recency rank, 0 = newest) and session-kNN (V-SKNN, Ludewig & Jannach 2018: the user's
latest session against the other sessions of the input rows). Pure numpy: EASE on a few
thousand items is one dense inverse. On the sessions generator, the oracle (``oracle``) ranks by
the generator's true next-item probability: the ceiling.

Scoring never needs a users x items matrix: each user's input items are kept as sorted index
arrays (``Split.input_items``), so a batch of users costs (batch, items) memory, whatever the
catalogue. Popularity is a bincount of those arrays. Item-kNN, EASE and recency-weighted EASE
are items x items models: above ``DENSE_BASELINE_MAX_ITEMS`` items they are reported as
``{"skipped": reason}`` instead of figures (``figure`` formats either).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import pyarrow as pa

from recsys.errors import InvalidInput
from recsys.events import EventType
from recsys.features import ALL_TYPES, SEEN_POLICIES, FilterTypes

MIN_INTERACTIONS = 5
KS = (10, 50)
EASE_LAMBDAS = (50.0, 200.0, 500.0, 1000.0)
HALF_LIVES = (1.0, 3.0, 10.0)  # recency-weighted EASE's half-life h, in interactions
SESSION_GAP_MS = 30 * 60 * 1000  # a longer pause starts a new session
SKNN_NEIGHBOURS = (100, 500)  # V-SKNN's k (Ludewig & Jannach 2018 tune k and the sample on validation)
SKNN_SAMPLES = (1000, 5000)  # V-SKNN's sample: the most recent sessions sharing an item
STAGES = ("validation", "test")
PROTOCOLS = {
    "A": "temporal leave-last-one-out, full ranking, input items removed",
    "B": "next new item: first interactions, inputs strictly before the target's time, full ranking, touched items removed",
    "R": "next item, returns allowed: each event whose item differs from the user's event before, inputs strictly "
         "before the target's time, full ranking, the seen policy's items removed",
}
STREAM_TYPES = {t.value for t in EventType if t is not EventType.rating}  # protocol B
DENSE_BASELINES = ("itemknn", "ease", "recency_ease")
DENSE_BASELINE_MAX_ITEMS = 10_000  # items x items float64 matrices (Gram, inverse, per lambda): 0.8 GB each at 10,000
BATCH_SCORES = 1 << 25  # scores per batch at most by default: 512 users up to 65,536 items, fewer above


class EvaluationError(InvalidInput):
    """The data cannot be evaluated (too few users or items); the message says why."""


class _Coded:
    """Users and items as codes into the sorted ``user_ids`` and ``item_ids``."""

    user_ids: np.ndarray
    item_ids: np.ndarray

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)


@dataclass
class Split(_Coded):
    """Integer-coded interactions in time order and the leave-last-one-out split.

    ``users[k]``/``items[k]`` are codes into ``user_ids``/``item_ids``; ``is_test[k]`` marks
    the held-out test interactions (one per test user), ``is_val[k]`` the validation ones
    (the second-to-last of the same users); ``test_users[j]`` holds ``test_items[j]`` out,
    and ``test_index[j]`` is that interaction's row in the table (``val_*`` likewise).
    """

    user_ids: np.ndarray
    item_ids: np.ndarray
    users: np.ndarray
    items: np.ndarray
    ts: np.ndarray
    is_test: np.ndarray
    test_users: np.ndarray
    test_items: np.ndarray
    test_index: np.ndarray
    is_val: np.ndarray
    val_users: np.ndarray
    val_items: np.ndarray
    val_index: np.ndarray
    protocol: str = "A"
    is_positive: Optional[np.ndarray] = None  # rows that can be targets: all (A), first interactions (B), item changes (R)
    types: Optional[np.ndarray] = None  # each row's event type (its value), where the table has them
    _rows: dict = field(default_factory=dict, repr=False)
    _inputs: dict = field(default_factory=dict, repr=False)
    _sparse: dict = field(default_factory=dict, repr=False)

    def input_rows(self, stage: str = "test") -> np.ndarray:
        """The rows a model may learn from at this stage: every row of a target user before the
        stage's target (A: before it in time order; B: strictly before its timestamp), and every
        row of the other users."""
        _check_stage(stage)
        if stage not in self._rows:
            target = self.targets(stage)[2]
            if self.protocol == "A":  # the targets are each user's last rows: drop them (and the test ones)
                rows = ~self.is_test & (~self.is_val if stage == "validation" else True)
            else:
                cutoff = np.full(self.n_users, np.iinfo(np.int64).max, dtype=np.int64)
                cutoff[self.users[target]] = self.ts[target]
                rows = self.ts < cutoff[self.users]
            self._rows[stage] = np.asarray(rows, dtype=bool)
        return self._rows[stage]

    def targets(self, stage: str = "test") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(users, held-out items, their rows) of the stage."""
        _check_stage(stage)
        return ((self.val_users, self.val_items, self.val_index) if stage == "validation"
                else (self.test_users, self.test_items, self.test_index))

    def input_items(self, stage: str = "test", filter_types: FilterTypes = ALL_TYPES) -> tuple[np.ndarray, np.ndarray]:
        """Each user's distinct input items at the stage, CSR style: user ``u``'s are
        ``items[indptr[u]:indptr[u + 1]]`` (sorted). Returns (indptr, items); memory O(events).
        ``filter_types``: only the items of input events of those types (a seen policy's,
        ``recsys.features.SEEN_POLICIES``); a table without types holds ratings."""
        key = (stage, filter_types)
        if key not in self._sparse:
            rows = self.input_rows(stage)
            if filter_types != ALL_TYPES:
                types = self.types if self.types is not None else np.full(len(rows), EventType.rating.value)
                rows = rows & np.isin(types, [t.value for t in filter_types])
            pair = np.unique(self.users[rows] * self.n_items + self.items[rows])
            indptr = np.zeros(self.n_users + 1, dtype=np.int64)
            np.cumsum(np.bincount(pair // self.n_items, minlength=self.n_users), out=indptr[1:])
            self._sparse[key] = (indptr, pair % self.n_items)
        return self._sparse[key]

    def popularity(self, stage: str = "test") -> np.ndarray:
        """Each item's number of distinct input users at the stage (float32, the dense column sums)."""
        return np.bincount(self.input_items(stage)[1], minlength=self.n_items).astype(np.float32)

    def input_matrix(self, stage: str = "test") -> np.ndarray:
        """Binary users x items matrix of the stage's input rows (float32, dense): for the items x
        items baselines on small catalogues only; scoring uses ``input_items``."""
        if stage not in self._inputs:
            x = np.zeros((self.n_users, self.n_items), dtype=np.float32)
            rows = self.input_rows(stage)
            x[self.users[rows], self.items[rows]] = 1.0
            self._inputs[stage] = x
        return self._inputs[stage]

    def recency_matrix(self, stage: str, half_life: float) -> np.ndarray:
        """Each input item weighted 0.5^(r/h), r its recency rank among the user's input items
        (0 = newest; an item met several times counts at its newest event)."""
        rows = np.flatnonzero(self.input_rows(stage))  # time order
        pair = self.users[rows] * self.n_items + self.items[rows]
        _, last = np.unique(pair[::-1], return_index=True)  # each pair's newest row
        rows = np.sort(rows[len(rows) - 1 - last])
        users = self.users[rows]
        by_user = np.lexsort((-np.arange(len(rows)), users))  # per user, newest first
        starts = np.searchsorted(users[by_user], users[by_user], side="left")
        rank = np.empty(len(rows), dtype=np.float64)
        rank[by_user] = np.arange(len(rows)) - starts
        x = np.zeros((self.n_users, self.n_items), dtype=np.float32)
        x[users, self.items[rows]] = (0.5 ** (rank / half_life)).astype(np.float32)
        return x

    def window(self) -> dict:
        return {"protocol": self.protocol, "events": int(len(self.users)), "min_ts": int(self.ts.min()), "max_ts": int(self.ts.max()),
                "users": self.n_users, "items": self.n_items, "test_users": int(len(self.test_users)),
                "validation_users": int(len(self.val_users))}


@dataclass
class StageTargets:
    """One stage of a ``HeldOut``: the targets (codes into its ids), each target user's distinct
    input items (CSR over all users, empty for the others) and each item's input users."""

    users: np.ndarray
    items: np.ndarray
    indptr: np.ndarray
    seen: np.ndarray
    popularity: np.ndarray


@dataclass
class HeldOut(_Coded):
    """What scoring needs of a split, without its rows: O(users + items + the target users' input
    items). Built by an engine that never holds the whole log (``training.ray_data``); ``Split``'s
    targets, input items of target users and popularity, equal to it row for row."""

    user_ids: np.ndarray
    item_ids: np.ndarray
    protocol: str
    stages: dict[str, StageTargets]
    events: int
    min_ts: int
    max_ts: int

    @property
    def test_users(self) -> np.ndarray:
        return self.stages["test"].users

    def targets(self, stage: str = "test") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(users, held-out items, their positions): a HeldOut has no rows to point at."""
        _check_stage(stage)
        t = self.stages[stage]
        return t.users, t.items, np.arange(len(t.users))

    def input_items(self, stage: str = "test", filter_types: FilterTypes = ALL_TYPES) -> tuple[np.ndarray, np.ndarray]:
        if filter_types != ALL_TYPES:
            raise ValueError("held-out targets keep every input item: no seen policy but 'all'")
        return self.stages[stage].indptr, self.stages[stage].seen

    def popularity(self, stage: str = "test") -> np.ndarray:
        return self.stages[stage].popularity

    def window(self) -> dict:
        return {"protocol": self.protocol, "events": self.events, "min_ts": self.min_ts, "max_ts": self.max_ts,
                "users": self.n_users, "items": self.n_items, "test_users": int(len(self.test_users)),
                "validation_users": int(len(self.stages["validation"].users))}


def _check_stage(stage: str) -> None:
    if stage not in STAGES:
        raise ValueError(f"stage {stage!r}: one of {STAGES}")


def protocol_for(types) -> str:
    """B for event streams (any view, click, add_to_cart or purchase), A for ratings."""
    return "B" if types is not None and STREAM_TYPES & set(np.unique(np.asarray(types, dtype=str)).tolist()) else "A"


def split_arrays(user_col, item_col, ts_col, min_interactions: int = MIN_INTERACTIONS, protocol: str = "A",
                 type_col=None) -> Split:
    """Build the split from three parallel columns (and the events' types, for the seen policies);
    rows are sorted by ts, ties keep their order."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol {protocol!r}: one of {', '.join(PROTOCOLS)}")
    user_col = np.asarray(user_col).astype(str)
    item_col = np.asarray(item_col).astype(str)
    ts = np.asarray(ts_col, dtype=np.int64)
    if len(ts) == 0:
        raise EvaluationError("no events: nothing to evaluate")
    order = np.argsort(ts, kind="stable")
    user_col, item_col, ts = user_col[order], item_col[order], ts[order]
    types = None if type_col is None else np.asarray(type_col).astype(str)[order]
    user_ids, users = np.unique(user_col, return_inverse=True)
    item_ids, items = np.unique(item_col, return_inverse=True)
    users, items = users.astype(np.int64), items.astype(np.int64)
    # The candidate targets: every row (A), each (user, item) pair's first row (B), or each row
    # whose item is not the one of the user's row before (R: a view, click, cart and purchase of
    # one item are one step; a return to an item touched earlier is a target).
    positives = np.arange(len(users))
    if protocol == "B":
        positives = np.sort(np.unique(users * len(item_ids) + items, return_index=True)[1])
    elif protocol == "R":
        by = np.argsort(users, kind="stable")
        step = np.ones(len(by), dtype=bool)
        step[1:] = (users[by][1:] != users[by][:-1]) | (items[by][1:] != items[by][:-1])
        positives = np.sort(by[step])
    is_positive = np.zeros(len(users), dtype=bool)
    is_positive[positives] = True
    counts = np.bincount(users[positives], minlength=len(user_ids))
    # Each user's positives in time order (stable sort keeps ties in table order): the last one
    # is the test target, the one before it the validation target.
    by_user = positives[np.lexsort((positives, users[positives]))]
    ends = np.cumsum(counts)
    test_users = np.flatnonzero(counts >= min_interactions)
    test_index = by_user[ends[test_users] - 1]
    val_index = by_user[ends[test_users] - 2]
    is_test = np.zeros(len(users), dtype=bool)
    is_test[test_index] = True
    is_val = np.zeros(len(users), dtype=bool)
    is_val[val_index] = True
    return Split(user_ids, item_ids, users, items, ts, is_test, test_users, items[test_index], test_index,
                 is_val, test_users.copy(), items[val_index], val_index, protocol, is_positive, types)


def split_table(table: pa.Table, min_interactions: int = MIN_INTERACTIONS, protocol: Optional[str] = None) -> Split:
    """The split of an event table (columns user_id, item_id, ts; type picks the protocol
    unless ``protocol`` is given)."""
    if table.num_rows == 0:
        raise EvaluationError("no events: nothing to evaluate")
    if protocol is None:
        protocol = protocol_for(table.column("type").to_numpy(zero_copy_only=False)
                                if "type" in table.column_names else None)
    return split_arrays(table.column("user_id").to_numpy(zero_copy_only=False),
                        table.column("item_id").to_numpy(zero_copy_only=False),
                        table.column("ts").to_numpy(), min_interactions, protocol,
                        table.column("type").to_numpy(zero_copy_only=False) if "type" in table.column_names else None)


def check_evaluable(split: Split) -> None:
    if len(split.test_users) < 2:
        raise EvaluationError(f"only {len(split.test_users)} user(s) with >= {MIN_INTERACTIONS} interactions: "
                              "need at least 2 test users to evaluate")
    if split.n_items < 11:
        raise EvaluationError(f"only {split.n_items} items: need more than 10 to rank a top 10")


def rank_of_target(scores: np.ndarray, target: np.ndarray, exclude: np.ndarray) -> np.ndarray:
    """0-based rank of each row's target among the non-excluded items (ties count against it).

    ``scores`` is (n, items); ``exclude`` a boolean mask of the same shape (training items).
    """
    rows, cols = np.nonzero(np.broadcast_to(np.asarray(exclude, dtype=bool), np.shape(scores)))
    return _ranks(scores, np.asarray(target), rows, cols)


def _ranks(scores, target: np.ndarray, excl_rows: np.ndarray, excl_items: np.ndarray) -> np.ndarray:
    """``rank_of_target`` with the excluded items as distinct (row, item) pairs.

    The same figures as setting the excluded scores to -inf and counting, in float64, the items
    scored above the target plus half the ties (pessimistic on ties would punish constant
    scorers), without a modified copy of ``scores``: the items are counted over the whole row
    and the excluded ones subtracted. Memory: one (n, items) boolean buffer.
    """
    scores = np.asarray(scores)
    if scores.dtype not in (np.float32, np.float64):  # compared in float64, as ever
        scores = scores.astype(np.float64)
    n = len(target)
    t = scores[np.arange(n), target].astype(np.float64)
    t[excl_rows[excl_items == target[excl_rows]]] = -np.inf  # an excluded target scores -inf
    col = t[:, None]
    buf = np.empty(scores.shape, dtype=bool)
    higher = np.count_nonzero(np.greater(scores, col, out=buf), axis=1)
    ties = np.count_nonzero(np.equal(scores, col, out=buf), axis=1)
    del buf
    ex, te = scores[excl_rows, excl_items], t[excl_rows]  # excluded items score -inf: never higher,
    higher -= np.bincount(excl_rows[ex > te], minlength=n)  # tied only with a -inf target
    ties -= np.bincount(excl_rows[ex == te], minlength=n)
    ties += np.where(np.isneginf(t), np.bincount(excl_rows, minlength=n), 0) - 1
    return higher + ties // 2


def metrics_from_ranks(ranks: np.ndarray) -> dict:
    ranks = np.asarray(ranks)
    out = {}
    for k in KS:
        out[f"hr@{k}"] = float(np.mean(ranks < k))
    out["ndcg@10"] = float(np.mean(ndcg_gains(ranks)))
    return {"hr@10": round(out["hr@10"], 4), "ndcg@10": round(out["ndcg@10"], 4), "hr@50": round(out["hr@50"], 4)}


def default_batch(n_items: int) -> int:
    """Users scored at once by default: 512, fewer when a batch would exceed ``BATCH_SCORES``."""
    return max(1, min(512, BATCH_SCORES // max(1, n_items)))


def target_ranks(split: Split | HeldOut, score_fn: Callable[[np.ndarray], np.ndarray], batch: Optional[int] = None,
                 stage: str = "test", filter_types: FilterTypes = ALL_TYPES) -> np.ndarray:
    """0-based rank of each of the stage's targets under ``score_fn(positions) -> (len, n_items)``.

    ``positions`` index into the stage's targets (``split.targets(stage)``), at most ``batch`` at
    a time (default: ``default_batch``); each user's input items at the stage (of the events of
    ``filter_types``) are removed from the candidates. Memory: one batch of scores and a boolean
    buffer of its shape.
    """
    users, items, _ = split.targets(stage)
    indptr, seen = split.input_items(stage, filter_types)
    batch = batch or default_batch(split.n_items)
    ranks = []
    for lo in range(0, len(users), batch):
        pos = np.arange(lo, min(lo + batch, len(users)))
        start, stop = indptr[users[pos]], indptr[users[pos] + 1]
        lens = stop - start
        rows = np.repeat(np.arange(len(pos)), lens)  # the batch's (row, input item) pairs
        at = np.arange(len(rows)) + np.repeat(start - (np.cumsum(lens) - lens), lens)
        scores = np.asarray(score_fn(pos))
        if scores.shape != (len(pos), split.n_items):
            raise ValueError(f"score_fn gave scores of shape {scores.shape}, not {(len(pos), split.n_items)}")
        ranks.append(_ranks(scores, items[pos], rows, seen[at]))
        del scores  # before the next batch's are made
    return np.concatenate(ranks) if ranks else np.zeros(0, dtype=np.int64)


def evaluate_scorer(split: Split | HeldOut, score_fn: Callable[[np.ndarray], np.ndarray], batch: Optional[int] = None,
                    stage: str = "test", filter_types: FilterTypes = ALL_TYPES) -> dict:
    """Metrics of ``score_fn`` (see ``target_ranks``) on the stage's targets."""
    ranks = target_ranks(split, score_fn, batch, stage, filter_types)
    return metrics_from_ranks(ranks) | {"users": int(len(ranks))}


def choose_seen_policy(split: Split, scorer: Callable[[str], Callable[[np.ndarray], np.ndarray]]) -> dict:
    """Each seen policy (``recsys.features.SEEN_POLICIES``) on the validation targets of a protocol-R
    split (``scorer(stage)``: the model's score function for the stage's targets, by a model that
    never learnt from them); the best (HR@10, then NDCG@10; ties: the first, today's "all") scored
    once on the test targets, beside "all" (today's behaviour) on the same targets."""
    if split.protocol != "R":
        raise ValueError(f"seen policies are chosen on protocol R's targets, not {split.protocol}'s")
    score = scorer("validation")
    on_val = {name: evaluate_scorer(split, score, stage="validation", filter_types=types)
              for name, types in SEEN_POLICIES.items()}
    best = max(on_val, key=lambda k: (on_val[k]["hr@10"], on_val[k]["ndcg@10"]))
    score = scorer("test")
    test = {name: evaluate_scorer(split, score, stage="test", filter_types=SEEN_POLICIES[name])
            for name in dict.fromkeys((best, "all"))}
    return {"chosen": best, "filter_types": sorted(t.value for t in SEEN_POLICIES[best]),
            "protocol": f"R: {PROTOCOLS['R']}; chosen on the validation targets, test scored once",
            "validation": on_val, "test": test}


def _resampled(n: int, resamples: int, seed: int):
    """Index arrays of ``resamples`` bootstrap draws of n targets (with replacement), 100 at a
    time: one (draws, n) array per chunk, from a fixed seed."""
    rng = np.random.default_rng(seed)
    for k in range(0, resamples, 100):
        yield rng.integers(0, n, size=(min(100, resamples - k), n))


def paired_bootstrap(hits_a: np.ndarray, hits_b: np.ndarray, resamples: int = 1000, seed: int = 0,
                     level: float = 0.95) -> dict:
    """Mean of hits_a - hits_b over the same targets and its percentile bootstrap interval
    (users resampled with replacement, ``resamples`` times, a fixed seed)."""
    d = np.asarray(hits_a, dtype=np.float64) - np.asarray(hits_b, dtype=np.float64)
    if d.ndim != 1 or len(d) == 0:
        raise ValueError("paired_bootstrap needs two equal-length, non-empty hit vectors")
    means = np.concatenate([d[pick].mean(1) for pick in _resampled(len(d), resamples, seed)])
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return {"diff": round(float(d.mean()), 4), "low": round(float(low), 4), "high": round(float(high), 4),
            "level": level, "users": int(len(d)), "resamples": int(resamples), "seed": seed}


def paired_ratio_bootstrap(a: np.ndarray, b: np.ndarray, resamples: int = 1000, seed: int = 0,
                           level: float = 0.95) -> dict:
    """mean(a) / mean(b) over the same targets (per-target values, e.g. hits or NDCG gains) and
    its percentile bootstrap interval, the targets resampled together (paired)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 1 or a.shape != b.shape or len(a) == 0:
        raise ValueError("paired_ratio_bootstrap needs two equal-length, non-empty vectors")
    if b.mean() == 0:
        return {"ratio": None, "low": None, "high": None, "level": level, "users": int(len(a))}
    ratios = np.concatenate([a[pick].mean(1) / np.maximum(b[pick].mean(1), 1e-12)
                             for pick in _resampled(len(a), resamples, seed)])
    low, high = np.quantile(ratios, [(1 - level) / 2, (1 + level) / 2])
    return {"ratio": round(float(a.mean() / b.mean()), 4), "low": round(float(low), 4), "high": round(float(high), 4),
            "level": level, "users": int(len(a)), "resamples": int(resamples), "seed": seed}


def ndcg_gains(ranks: np.ndarray, k: int = 10) -> np.ndarray:
    """Each target's NDCG@k gain (one relevant item): 1 / log2(rank + 2) within the top k, else 0."""
    ranks = np.asarray(ranks)
    return np.where(ranks < k, 1.0 / np.log2(ranks + 2.0), 0.0)


# ---- baselines -------------------------------------------------------------------------------

def popularity_scores(x: np.ndarray) -> np.ndarray:
    """Column sums of a dense input matrix (the evaluation uses ``popularity_counts``)."""
    return x.sum(0)


def popularity_counts(split: Split | HeldOut, stage: str = "test") -> np.ndarray:
    """Each item's number of distinct input users at the stage (float32, the dense column sums)."""
    return split.popularity(stage)


def itemknn_similarity(x: np.ndarray) -> np.ndarray:
    """Cosine similarity between item columns, zero diagonal."""
    co = x.T.astype(np.float64) @ x.astype(np.float64)
    norms = np.sqrt(np.diag(co))
    norms[norms == 0] = 1.0
    sim = co / norms[:, None] / norms[None, :]
    np.fill_diagonal(sim, 0.0)
    return sim


def ease_weights(x: np.ndarray, lam: float) -> np.ndarray:
    """EASE^R closed form: B = I - P diagMat(1/diag(P)), P = (X'X + lam I)^-1, diag(B) = 0."""
    g = x.T.astype(np.float64) @ x.astype(np.float64)
    g[np.diag_indices_from(g)] += lam
    p = np.linalg.inv(g)
    b = -p / np.diag(p)[None, :]
    np.fill_diagonal(b, 0.0)
    return b


def _rows_times(split: Split, stage: str, rows: np.ndarray, weights: np.ndarray) -> Callable:
    """The scorer (the target users' input rows) x weights."""
    users = split.targets(stage)[0]
    return lambda pos: rows[users[pos]] @ weights


def _eval_rows(split: Split, stage: str, rows: np.ndarray, weights: np.ndarray) -> dict:
    """Metrics of scores = (the users' input rows) x weights."""
    return evaluate_scorer(split, _rows_times(split, stage, rows, weights), stage=stage)


def _tuned(split: Split, grid: dict, scorer: Callable) -> dict:
    """Every setting of ``grid`` scored on the validation stage; the best (HR@10, then NDCG@10)
    scored once on the test stage. ``scorer(stage, setting)`` gives the score function."""
    on_val = {name: evaluate_scorer(split, scorer("validation", setting), stage="validation")
              for name, setting in grid.items()}
    best = max(on_val, key=lambda k: (on_val[k]["hr@10"], on_val[k]["ndcg@10"]))
    test = evaluate_scorer(split, scorer("test", grid[best]), stage="test")
    return test | {"chosen": grid[best], "validation": on_val[best],
                   "validation_hr@10_by_setting": {k: v["hr@10"] for k, v in on_val.items()}}


@dataclass
class Sessions:
    """A stage's input rows cut into sessions (a pause over ``SESSION_GAP_MS`` starts one),
    numbered in order of their start. Session ``s``'s distinct items are
    ``items[indptr[s]:indptr[s + 1]]``; the sessions holding item ``i`` are
    ``by_item[item_ptr[i]:item_ptr[i + 1]]`` (ascending, so the most recent last);
    ``last[u]`` is user ``u``'s latest session (-1: none) and ``recent[u]`` its items, oldest
    first by their last event (CSR: ``recent_ptr``)."""

    indptr: np.ndarray
    items: np.ndarray
    item_ptr: np.ndarray
    by_item: np.ndarray
    last: np.ndarray
    recent_ptr: np.ndarray
    recent: np.ndarray

    @classmethod
    def of(cls, split: Split, stage: str) -> "Sessions":
        rows = np.flatnonzero(split.input_rows(stage))
        rows = rows[np.argsort(split.users[rows], kind="stable")]  # per user, in time order
        users, ts = split.users[rows], split.ts[rows]
        new = np.ones(len(rows), dtype=bool)
        new[1:] = (users[1:] != users[:-1]) | (ts[1:] - ts[:-1] > SESSION_GAP_MS)
        sid = np.cumsum(new) - 1
        order = np.argsort(ts[new], kind="stable")  # renumber by start time
        renumber = np.empty_like(order)
        renumber[order] = np.arange(len(order))
        sid = renumber[sid]
        n = len(order)
        last = np.full(split.n_users, -1, dtype=np.int64)
        np.maximum.at(last, users, sid)
        pair = np.unique(sid * split.n_items + split.items[rows])
        indptr = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(np.bincount(pair // split.n_items, minlength=n), out=indptr[1:])
        items = pair % split.n_items
        by = np.lexsort((pair // split.n_items, items))
        item_ptr = np.zeros(split.n_items + 1, dtype=np.int64)
        np.cumsum(np.bincount(items, minlength=split.n_items), out=item_ptr[1:])
        # Each user's latest session: its distinct items ordered by their last event.
        cur = np.flatnonzero(sid == last[users])
        key = users[cur] * split.n_items + split.items[rows[cur]]
        _, newest = np.unique(key[::-1], return_index=True)
        cur = np.sort(cur[len(cur) - 1 - newest])
        recent_ptr = np.zeros(split.n_users + 1, dtype=np.int64)
        np.cumsum(np.bincount(users[cur], minlength=split.n_users), out=recent_ptr[1:])
        return cls(indptr, items, item_ptr, (pair // split.n_items)[by], last, recent_ptr, split.items[rows[cur]])


def _gather(indptr: np.ndarray, which: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions of the CSR rows ``which``, concatenated, and the index into ``which`` of each."""
    lens = indptr[which + 1] - indptr[which]
    owner = np.repeat(np.arange(len(which)), lens)
    return np.arange(len(owner)) + np.repeat(indptr[which] - (np.cumsum(lens) - lens), lens), owner


def session_knn_scores(sessions: Sessions, user: int, k: int, sample: int, n_items: int) -> np.ndarray:
    """V-SKNN (Ludewig & Jannach 2018) for one user: the items of the user's latest session weigh
    p/n by position (1 = oldest of n, n = newest: linear decay); a past session's similarity is the
    sum of the weights of the items it shares; of the ``sample`` most recent sessions sharing an
    item, the ``k`` most similar vote for their items with their similarity."""
    items = sessions.recent[sessions.recent_ptr[user]:sessions.recent_ptr[user + 1]]
    if len(items) == 0:
        return np.zeros(n_items)
    weight = np.arange(1, len(items) + 1) / len(items)
    at, owner = _gather(sessions.item_ptr, items)
    sim = np.bincount(sessions.by_item[at], weights=weight[owner], minlength=len(sessions.indptr) - 1)
    sim[sessions.last[user]] = 0.0  # not a neighbour of itself
    near = np.flatnonzero(sim)[-sample:]
    if len(near) > k:
        near = near[np.argpartition(-sim[near], k - 1)[:k]]
    at, owner = _gather(sessions.indptr, near)
    return np.bincount(sessions.items[at], weights=sim[near][owner], minlength=n_items)


def session_knn(split: Split) -> dict:
    """V-SKNN's test metrics, k and the sample chosen on validation. Items no neighbour votes for
    (and ties) rank by popularity."""
    cache: dict = {}

    def scorer(stage: str, setting: dict) -> Callable:
        if stage not in cache:
            pop = popularity_counts(split, stage).astype(np.float64)
            cache[stage] = Sessions.of(split, stage), 1e-6 * pop / max(1.0, pop.max())
        sessions, tie = cache[stage]
        users = split.targets(stage)[0]
        return lambda pos: np.stack([session_knn_scores(sessions, u, setting["k"], setting["sample"], split.n_items)
                                     for u in users[pos]]) + tie
    grid = {f"k={k},sample={m}": {"k": k, "sample": m} for k in SKNN_NEIGHBOURS for m in SKNN_SAMPLES}
    return _tuned(split, grid, scorer)


def oracle(split: Split, source) -> dict:
    """The ceiling on the sessions generator: each target ranked by the generator's true
    next-item probability at its event (``source``: a ``recsys.sessions.SessionSource`` whose
    events are the split's), test metrics with the validation ones."""
    out = {}
    for stage in ("validation", "test"):
        ranks = oracle_ranks(split, source, stage)
        out[stage] = metrics_from_ranks(ranks) | {"users": int(len(ranks))}
    return out["test"] | {"validation": out["validation"]}


def oracle_ranks(split: Split, source, stage: str = "test") -> np.ndarray:
    """0-based rank of each target of the stage under the oracle (see ``oracle``)."""
    users, items, rows = split.targets(stage)
    keys = [(str(split.user_ids[u]), str(split.item_ids[i]), int(split.ts[r])) for u, i, r in zip(users, items, rows)]
    states = source.states_at(set(keys))
    missing = [k for k in keys if k not in states]
    if missing:
        raise EvaluationError(f"{len(missing)} targets are not events of this source (e.g. {missing[0]})")
    season, index = source.item_indices(split.item_ids)

    def score(pos: np.ndarray) -> np.ndarray:
        out = np.empty((len(pos), split.n_items))
        for row, p in enumerate(pos):
            s = states[keys[p]]
            out[row] = source.next_item_probabilities(s.intent, s.prev)[index] * (season == s.season)
        return out
    return target_ranks(split, score, stage=stage)


def popularity_ranks(split: Split | HeldOut, stage: str = "test") -> np.ndarray:
    pop = popularity_counts(split, stage)
    return target_ranks(split, lambda pos: np.broadcast_to(pop, (len(pos), len(pop))), stage=stage)


def figure(entry: dict, key: str = "hr@10", fmt: str = ".4f") -> str:
    """One figure of a metrics entry, formatted, or "skipped" for a baseline not computed here."""
    return format(entry[key], fmt) if key in entry else "skipped"


def baselines(split: Split | HeldOut) -> dict:
    """The reference baselines on this split, {name: test metrics, with the validation figures and,
    for the tuned ones, the setting chosen on validation}. Above ``DENSE_BASELINE_MAX_ITEMS``
    items, item-kNN, EASE and recency-weighted EASE are {"skipped": why} instead (session-kNN
    too, on held-out targets without their rows)."""
    check_evaluable(split)
    out = {}
    for stage in ("test", "validation"):
        ranks = popularity_ranks(split, stage)
        res = metrics_from_ranks(ranks) | {"users": int(len(ranks))}
        out.setdefault("popularity", {}).update(res if stage == "test" else {"validation": res})
    if isinstance(split, HeldOut):
        why = "held-out targets only (the Ray Data engine): item-kNN and EASE need the whole users x items matrix"
        return out | {name: {"skipped": why} for name in DENSE_BASELINES} | {
            "session_knn": {"skipped": "held-out targets only (the Ray Data engine): session-kNN needs every session"}}
    out["session_knn"] = session_knn(split)
    if split.n_items > DENSE_BASELINE_MAX_ITEMS:
        why = (f"{split.n_items} items > {DENSE_BASELINE_MAX_ITEMS}: an items x items model "
               "(item-kNN, EASE) does not fit in memory")
        return out | {name: {"skipped": why} for name in DENSE_BASELINES}
    knn = {stage: itemknn_similarity(split.input_matrix(stage)).astype(np.float32) for stage in STAGES}
    out["itemknn"] = _eval_rows(split, "test", split.input_matrix("test"), knn["test"]) | {
        "validation": _eval_rows(split, "validation", split.input_matrix("validation"), knn["validation"])}
    weights: dict = {}

    def ease(stage: str, setting: dict) -> np.ndarray:
        key = (stage, setting["lambda"])
        if key not in weights:
            weights[key] = ease_weights(split.input_matrix(stage), setting["lambda"]).astype(np.float32)
        return weights[key]

    out["ease"] = _tuned(split, {f"lambda={lam:g}": {"lambda": lam} for lam in EASE_LAMBDAS},
                         lambda stage, setting: _rows_times(split, stage, split.input_matrix(stage), ease(stage, setting)))
    grid = {f"lambda={lam:g},h={h:g}": {"lambda": lam, "half_life": h} for lam in EASE_LAMBDAS for h in HALF_LIVES}
    out["recency_ease"] = _tuned(split, grid, lambda stage, setting: _rows_times(
        split, stage, split.recency_matrix(stage, setting["half_life"]), ease(stage, setting)))
    return out
