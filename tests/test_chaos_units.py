"""The pure parts of the fault scenarios (lab/chaos): how their figures are judged. The scenarios
themselves are documented commands (docs/operations/faults.md), not pytest tests."""
from __future__ import annotations

from collections import Counter

from lab.chaos import abuse
from lab.chaos.rebuild import figures
from lab.chaos.scenarios import compare_features

USERS = [{"recent": ["a", "b"], "counts": {"view": 2}}]
TRENDING = {"a": 1.0, "b": 0.5}


def test_features_equal_to_the_replay_pass():
    want = (Counter({"a": 2, "b": 1}), USERS, TRENDING)
    got = (Counter({"a": 2, "b": 1}), [dict(u) for u in USERS], {"a": 1.0 + 1e-12, "b": 0.5})  # order of the sums
    assert compare_features(want, got) == {"lost": 0, "duplicated": 0, "users_exact": True,
                                           "trending_exact": True, "exact": True}


def test_a_lost_and_a_doubled_event_on_different_items_do_not_cancel_out():
    want = (Counter({"a": 2, "b": 1}), USERS, TRENDING)
    got = (Counter({"a": 1, "b": 2}), USERS, TRENDING)
    assert compare_features(want, got) == {"lost": 1, "duplicated": 1, "users_exact": True,
                                           "trending_exact": True, "exact": False}


def test_a_user_or_a_trending_score_that_differs_is_not_exact():
    items = Counter({"a": 2, "b": 1})
    other_user = [{"recent": ["b", "a"], "counts": {"view": 2}}]
    assert compare_features((items, USERS, TRENDING), (items, other_user, TRENDING))["exact"] is False
    assert compare_features((items, USERS, TRENDING), (items, USERS, {"a": 1.0, "b": 0.51}))["exact"] is False
    assert compare_features((items, USERS, TRENDING), (items, USERS, {"a": 1.0}))["trending_exact"] is False


def test_rebuild_figures_count_the_archives_losses_and_copies_with_the_features():
    want = (Counter({"a": 2, "b": 1}), USERS, TRENDING)
    got = (Counter({"a": 2}), USERS, TRENDING)  # b's one event lost in Redis
    out = figures(want, got, ["e1", "e2", "e3"], Counter({"e1": 2, "e2": 1}))  # e3 not archived, e1 twice
    assert {k: out[k] for k in ("lost", "duplicated", "lost_in_features", "lost_in_archive",
                                "duplicated_in_features", "archived_twice", "passed")} == {
        "lost": 2, "duplicated": 1, "lost_in_features": 1, "lost_in_archive": 1, "duplicated_in_features": 0,
        "archived_twice": 1, "passed": False}
    assert figures(want, want, ["e1", "e2", "e3"], Counter({"e1": 1, "e2": 1, "e3": 1}))["passed"] is True


def test_abuse_figures_split_the_windows_and_count_any_failure_as_an_error():
    windows = [(10.0, 20.0)]
    normal = [(1.0, 10.0, 200), (5.0, 12.0, 202), (12.0, 18.0, 200), (15.0, 20.0, 503),
              (16.0, 25.0, "ServerDisconnectedError"), (25.0, 9.0, 200)]
    out = abuse.figures(normal, windows)
    assert out["requests"] == 6 and out["errors"] == 2
    assert out["error_statuses"] == {"503": 1, "ServerDisconnectedError": 1}
    assert out["p99_calm_ms"] <= 12.0 and 18.0 <= out["p99_abuse_ms"] <= 25.0
