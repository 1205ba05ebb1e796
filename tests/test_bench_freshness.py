"""recsys bench freshness's pure parts: which row gives a user's state as of each instant, and
the paired ratio interval. The command itself trains and scores (README, "Benchmarks")."""
from __future__ import annotations

import numpy as np
import pytest

from lab.bench.freshness import DAY_MS, HOUR_MS, compare, stale_rows
from recsys import evaluation


def test_each_variant_is_the_users_first_row_at_or_after_its_instant():
    day = 100 * DAY_MS
    # rows in time order: user 0 at 23:00 the day before, 08:00, 10:30, 11:00; user 1 at 09:00, 11:00
    ts = np.array([day - HOUR_MS, day + 8 * HOUR_MS, day + 9 * HOUR_MS, day + 10 * HOUR_MS + HOUR_MS // 2,
                   day + 11 * HOUR_MS, day + 11 * HOUR_MS])
    users = np.array([0, 0, 1, 0, 0, 1])
    rows = stale_rows(users, ts, np.array([4, 5]))  # the targets: user 0 at 11:00, user 1 at 11:00
    assert rows["a"].tolist() == [4, 5]
    assert rows["b"].tolist() == [1, 2]  # the day's first row: 23:00 the day before is in the state
    assert rows["c"].tolist() == [3, 5]  # from 10:00: user 0's 10:30; user 1 has nothing between 10:00 and 11:00


def test_the_ratio_and_its_interval_are_paired_and_a_zero_denominator_has_none():
    rng = np.random.default_rng(0)
    b = (rng.random(2000) < 0.2).astype(float)
    a = np.maximum(b, (rng.random(2000) < 0.1).astype(float))  # a hits wherever b does, and more
    r = evaluation.paired_ratio_bootstrap(a, b)
    assert r["ratio"] == pytest.approx(a.mean() / b.mean(), abs=1e-4) and 1 < r["low"] < r["ratio"] < r["high"]
    assert evaluation.paired_ratio_bootstrap(b, b) == {**r, "ratio": 1.0, "low": 1.0, "high": 1.0}
    assert evaluation.paired_ratio_bootstrap(a, np.zeros(2000))["ratio"] is None
    with pytest.raises(ValueError):
        evaluation.paired_ratio_bootstrap(a, b[:10])


def test_compare_reports_each_variant_and_both_ratios():
    ranks = {"a": np.array([0, 1, 50, 3]), "b": np.array([20, 1, 50, 30]), "c": np.array([0, 1, 50, 30])}
    out = compare(ranks)
    assert out["metrics"]["a"]["hr@10"] == 0.75 and out["metrics"]["b"]["hr@10"] == 0.25
    assert out["a/b"]["hr@10"]["ratio"] == 3.0 and out["a/c"]["hr@10"]["ratio"] == 1.5
    assert out["a/b"]["ndcg@10"]["ratio"] > 1
