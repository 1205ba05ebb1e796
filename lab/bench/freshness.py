"""``recsys bench freshness``: what fresh events are worth to one trained model, offline.

One model per data set, trained as ``recsys train`` trains it (protocol B's split). Its test
targets are then scored three times, the user tower fed the user's features as of:

- (a) the target's instant: what the live Redis holds when the request comes;
- (b) the start of the target's day (00:00 UTC): a nightly batch of features;
- (c) one hour before the target.

The state "as of instant t" is the user's features just before their first event at or after
t (``recsys.training_data.iter_point_in_time``), so it holds every event before t and none
after. Only the tower's input changes: the targets, the candidates (every item minus those the
user touched before the target, EVALUATION.md) and the model are the same, so the comparison
is paired, target by target. Ratios a/b and a/c of HR@10 and NDCG@10 come with paired
bootstrap 95% intervals.
"""
from __future__ import annotations

import numpy as np

from recsys import evaluation
from recsys.registry import Registry
from recsys.settings import Settings
from recsys.training_data import iter_point_in_time, sort_table

DAY_MS = 24 * 3600 * 1000
HOUR_MS = 3600 * 1000
SYNTHETIC = "synthetic:generator=sessions,events=100000,users=2000,items=1000,seed=1"
VARIANTS = {"a": "at the target's instant (live Redis)", "b": "at the start of the target's day (a nightly batch)",
            "c": "one hour before the target"}


def stale_rows(users: np.ndarray, ts: np.ndarray, targets: np.ndarray) -> dict[str, np.ndarray]:
    """For each target row (rows in time order), the row whose point-in-time features are the
    target user's state as of each variant's instant: the user's first row at or after it."""
    order = np.argsort(users, kind="stable")  # each user's rows together, in time order
    starts = np.searchsorted(users[order], np.arange(users.max() + 2))
    out = {"a": np.asarray(targets), "b": np.empty(len(targets), dtype=np.int64),
           "c": np.empty(len(targets), dtype=np.int64)}
    for j, row in enumerate(targets):
        block = order[starts[users[row]]:starts[users[row] + 1]]
        when = ts[row]
        for variant, instant in (("b", when - when % DAY_MS), ("c", when - HOUR_MS)):
            out[variant][j] = block[np.searchsorted(ts[block], instant, side="left")]
    return out


def compare(ranks: dict[str, np.ndarray]) -> dict:
    """Each variant's metrics, and a/b, a/c of HR@10 and NDCG@10 with their paired intervals."""
    hits = {v: (r < 10).astype(float) for v, r in ranks.items()}
    gains = {v: evaluation.ndcg_gains(r) for v, r in ranks.items()}
    return {"metrics": {v: evaluation.metrics_from_ranks(r) for v, r in ranks.items()},
            **{f"a/{v}": {"hr@10": evaluation.paired_ratio_bootstrap(hits["a"], hits[v]),
                          "ndcg@10": evaluation.paired_ratio_bootstrap(gains["a"], gains[v])} for v in ("b", "c")}}


def freshness(version_dir, table, settings: Settings) -> dict:
    """The three variants' ranks of one published model on ``table``'s test targets (the table
    in time order, as ``training.data.load_table`` gives it)."""
    from training.job import feature_ranks
    split = evaluation.split_table(table)
    evaluation.check_evaluable(split)
    rows = stale_rows(split.users, split.ts, split.test_index)
    needed = set(np.concatenate(list(rows.values())).tolist())
    feats = {r: f for r, (_, f) in enumerate(iter_point_in_time(table, settings.features.recent_items)) if r in needed}
    ranks = {v: feature_ranks(version_dir, split, [feats[r] for r in rows[v]]) for v in VARIANTS}
    stale = {v: round(float(np.mean(rows[v] != rows["a"])), 4) for v in ("b", "c")}
    return {"targets": int(len(split.test_index)), "stale_share": stale, **compare(ranks)}


def default_sources() -> list[str]:
    """The sessions generator, then MovieLens-100K (``RECSYS_ML100K``)."""
    from lab.bench.train import default_ml100k
    return [SYNTHETIC, f"movielens:{default_ml100k()}"]


def bench_freshness(settings: Settings, sources: list[str], workers: int = 2, epochs: int | None = None,
                    min_ratio: float = 1.3, progress=print) -> dict:
    """Train on each source (``recsys train``'s job, not published), then ``freshness``. Passes
    when the first source's a/b of HR@10 is at least ``min_ratio`` (issue 34's target on the
    synthetic sessions)."""
    from training.data import load_table
    from training.job import train
    out = {}
    for spec in sources:
        progress(f"bench freshness: training on {spec}")
        card = train(spec, settings=settings, workers=workers, epochs=epochs, promote=False)
        table = sort_table(load_table(spec, settings)[0])
        progress(f"bench freshness: {card['version']}'s test targets, three ways")
        out[spec] = {"version": card["version"], **freshness(Registry(settings.registry_dir).path(card["version"]),
                                                             table, settings)}
    first = out[sources[0]]["a/b"]["hr@10"]["ratio"]
    return {"variants": VARIANTS, "sources": out, "min_ratio": min_ratio,
            "passed": first is not None and first >= min_ratio}
