"""Offline evaluation, exactly as /work/shared/EVALUATION.md defines it.

Temporal leave-last-one-out: per user, interactions sorted by time (ties keep the
table's order); users with at least 5 interactions give their last one to the test
set, everything else is training data. For each test user every item is scored, the
user's training items are removed, and HR@10, NDCG@10 and HR@50 are averaged.

Baselines on the same split: most-popular, item-kNN (cosine) and EASE^R (Steck 2019),
whose lambda is picked from {50, 200, 500} as the best HR@10 on the test split itself
(as the reference figures were measured; ``ease_lambda="validation"`` instead picks it
on a second leave-last-one-out split carved from the training data).

Pure numpy: EASE on a few thousand items is one dense inverse.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pyarrow as pa

from recsys.errors import InvalidInput

MIN_INTERACTIONS = 5
KS = (10, 50)
EASE_LAMBDAS = (50.0, 200.0, 500.0)


class EvaluationError(InvalidInput):
    """The data cannot be evaluated (too few users or items); the message says why."""


@dataclass
class Split:
    """Integer-coded interactions in time order and the leave-last-one-out split.

    ``users[k]``/``items[k]`` are codes into ``user_ids``/``item_ids``; ``is_test[k]`` marks
    the held-out interactions (one per test user); ``test_users[j]`` holds ``test_items[j]``
    out, and ``test_index[j]`` is that interaction's row in the table.
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
    _train_matrix: np.ndarray | None = field(default=None, repr=False)

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    def train_matrix(self) -> np.ndarray:
        """Binary users x items matrix of the training interactions (float32, dense)."""
        if self._train_matrix is None:
            x = np.zeros((self.n_users, self.n_items), dtype=np.float32)
            tr = ~self.is_test
            x[self.users[tr], self.items[tr]] = 1.0
            self._train_matrix = x
        return self._train_matrix

    def window(self) -> dict:
        return {"events": int(len(self.users)), "min_ts": int(self.ts.min()), "max_ts": int(self.ts.max()),
                "users": self.n_users, "items": self.n_items, "test_users": int(len(self.test_users))}


def split_arrays(user_col, item_col, ts_col, min_interactions: int = MIN_INTERACTIONS) -> Split:
    """Build the split from three parallel columns; rows are sorted by ts, ties keep their order."""
    user_col = np.asarray(user_col).astype(str)
    item_col = np.asarray(item_col).astype(str)
    ts = np.asarray(ts_col, dtype=np.int64)
    if len(ts) == 0:
        raise EvaluationError("no events: nothing to evaluate")
    order = np.argsort(ts, kind="stable")
    user_col, item_col, ts = user_col[order], item_col[order], ts[order]
    user_ids, users = np.unique(user_col, return_inverse=True)
    item_ids, items = np.unique(item_col, return_inverse=True)
    users, items = users.astype(np.int64), items.astype(np.int64)
    counts = np.bincount(users, minlength=len(user_ids))
    # The last row of each user in time order (stable sort keeps ties in table order).
    by_user = np.lexsort((np.arange(len(users)), users))
    last = np.zeros(len(user_ids), dtype=np.int64)
    last[users[by_user]] = by_user  # later rows overwrite earlier ones: last wins
    test_users = np.flatnonzero(counts >= min_interactions)
    test_index = last[test_users]
    is_test = np.zeros(len(users), dtype=bool)
    is_test[test_index] = True
    return Split(user_ids, item_ids, users, items, ts, is_test, test_users, items[test_index], test_index)


def split_table(table: pa.Table, min_interactions: int = MIN_INTERACTIONS) -> Split:
    """The split of an event table (columns user_id, item_id, ts)."""
    if table.num_rows == 0:
        raise EvaluationError("no events: nothing to evaluate")
    return split_arrays(table.column("user_id").to_numpy(zero_copy_only=False),
                        table.column("item_id").to_numpy(zero_copy_only=False),
                        table.column("ts").to_numpy(), min_interactions)


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
    scores = np.where(exclude, -np.inf, scores.astype(np.float64))
    rows = np.arange(len(target))
    t = scores[rows, target]
    # Pessimistic on ties would punish constant scorers; count strictly higher plus half the ties.
    higher = (scores > t[:, None]).sum(1)
    ties = (scores == t[:, None]).sum(1) - 1
    return higher + ties // 2


def metrics_from_ranks(ranks: np.ndarray) -> dict:
    ranks = np.asarray(ranks)
    out = {}
    for k in KS:
        out[f"hr@{k}"] = float(np.mean(ranks < k))
    out["ndcg@10"] = float(np.mean(np.where(ranks < 10, 1.0 / np.log2(ranks + 2.0), 0.0)))
    return {"hr@10": round(out["hr@10"], 4), "ndcg@10": round(out["ndcg@10"], 4), "hr@50": round(out["hr@50"], 4)}


def evaluate_scorer(split: Split, score_fn: Callable[[np.ndarray], np.ndarray], batch: int = 512) -> dict:
    """Metrics of ``score_fn(test_positions) -> (len, n_items) scores``.

    ``test_positions`` index into ``split.test_users`` / ``split.test_index``.
    """
    x = split.train_matrix()
    ranks = []
    for lo in range(0, len(split.test_users), batch):
        pos = np.arange(lo, min(lo + batch, len(split.test_users)))
        scores = np.asarray(score_fn(pos))
        ranks.append(rank_of_target(scores, split.test_items[pos], x[split.test_users[pos]] > 0))
    return metrics_from_ranks(np.concatenate(ranks)) | {"users": int(len(split.test_users))}


# ---- baselines -------------------------------------------------------------------------------

def popularity_scores(x: np.ndarray) -> np.ndarray:
    return x.sum(0)


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


def _eval_matrix_model(split: Split, weights: np.ndarray) -> dict:
    x = split.train_matrix()
    return evaluate_scorer(split, lambda pos: x[split.test_users[pos]] @ weights)


def baselines(split: Split, ease_lambda: str | float = "test") -> dict:
    """The three reference baselines on this split: {name: metrics}.

    ``ease_lambda``: "test" (best of {50,200,500} on the test split, as the reference figures),
    "validation" (best on a leave-last-one-out split of the training data), or a number.
    """
    check_evaluable(split)
    x = split.train_matrix()
    pop = popularity_scores(x)
    out = {"popularity": evaluate_scorer(split, lambda pos: np.broadcast_to(pop, (len(pos), len(pop))))}
    out["itemknn"] = _eval_matrix_model(split, itemknn_similarity(x).astype(np.float32))
    if isinstance(ease_lambda, (int, float)):
        lam = float(ease_lambda)
        res = _eval_matrix_model(split, ease_weights(x, lam).astype(np.float32))
        per = {lam: res}
    elif ease_lambda == "test":
        per = {lam: _eval_matrix_model(split, ease_weights(x, lam).astype(np.float32)) for lam in EASE_LAMBDAS}
        lam = max(per, key=lambda k: (per[k]["hr@10"], per[k]["ndcg@10"]))
        res = per[lam]
    elif ease_lambda == "validation":
        tr = ~split.is_test
        val = split_arrays(split.user_ids[split.users[tr]], split.item_ids[split.items[tr]], split.ts[tr])
        xv = val.train_matrix()
        per = {lam: _eval_matrix_model(val, ease_weights(xv, lam).astype(np.float32)) for lam in EASE_LAMBDAS}
        lam = max(per, key=lambda k: (per[k]["hr@10"], per[k]["ndcg@10"]))
        res = _eval_matrix_model(split, ease_weights(x, lam).astype(np.float32))
    else:
        raise ValueError(f"ease_lambda: {ease_lambda!r}")
    out["ease"] = res | {"lambda": lam, "lambda_chosen_on": ease_lambda if isinstance(ease_lambda, str) else "fixed",
                         "hr@10_by_lambda": {str(k): v["hr@10"] for k, v in per.items()}}
    return out
