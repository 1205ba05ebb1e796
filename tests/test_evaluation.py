"""Evaluation protocol, baselines against the reference figures, point-in-time features, ANN.

Pure logic: no services. The MovieLens test reads the shared ml-100k folder.
"""
from __future__ import annotations

import tracemalloc

import numpy as np
import pyarrow as pa
import pytest

from recsys import evaluation
from recsys.events import Event, EventType
from recsys.archive import SCHEMA
from recsys.features import Keys, MemoryFeatures, event_ops
from recsys.sources import MovieLensSource, SyntheticSource
from recsys.training_data import (events_table, iter_point_in_time, point_in_time_features,
                                  user_features_at, with_relabeled_items)


def _table(rows):
    """rows: (user, item, ts_seconds[, type])"""
    return pa.table({"event_id": [f"e{i}" for i in range(len(rows))], "user_id": [r[0] for r in rows],
                     "item_id": [r[1] for r in rows], "type": [r[3] if len(r) > 3 else "click" for r in rows],
                     "value": [None] * len(rows), "ts": [r[2] * 1000 for r in rows]}, schema=SCHEMA)


# ---- the split and the metrics ------------------------------------------------------------------

def test_split_holds_out_the_last_two_interactions_of_users_with_five_or_more():
    rows = [("a", f"i{k}", 10 + k) for k in range(5)] + [("b", f"i{k}", 20 + k) for k in range(4)]
    rows.append(("a", "late-but-listed-first", 100))
    rows.insert(0, ("a", "tie-first", 100))  # same ts as the row above: the later table row is the last
    s = evaluation.split_table(_table(rows), protocol="A")
    assert list(s.user_ids[s.test_users]) == ["a"] == list(s.user_ids[s.val_users])  # b has 4: all training
    assert s.item_ids[s.test_items[0]] == "late-but-listed-first"
    assert s.item_ids[s.val_items[0]] == "tie-first"  # the second-to-last: validation
    assert s.is_test.sum() == 1 and s.is_val.sum() == 1
    x, xv = s.input_matrix("test"), s.input_matrix("validation")
    a = list(s.user_ids).index("a")
    assert x.sum() == 6 + 4  # the test stage sees everything before the test target
    assert x[a, list(s.item_ids).index("tie-first")] == 1
    assert xv.sum() == 5 + 4 and xv[a, list(s.item_ids).index("tie-first")] == 0  # validation: training only


def test_recency_weights_halve_every_h_interactions_newest_first():
    rows = [("a", f"i{k}", k) for k in range(6)] + [("b", "i0", 1), ("b", "i1", 2)]
    s = evaluation.split_table(_table(rows), protocol="A")
    a, items = list(s.user_ids).index("a"), list(s.item_ids)
    w = s.recency_matrix("test", half_life=1.0)[a]  # a's input: i0..i4 (i5 is the test target)
    assert [w[items.index(f"i{k}")] for k in range(5)] == [1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0]
    w3 = s.recency_matrix("validation", half_life=3.0)[a]  # i0..i3; i4 is the validation target
    assert w3[items.index("i3")] == 1.0 and w3[items.index("i0")] == pytest.approx(0.5)
    assert w3[items.index("i4")] == 0.0


def test_protocol_b_targets_the_next_new_item_with_inputs_strictly_before_its_time():
    """A user views, clicks and buys the same items: the targets are the last two *first*
    interactions; the input at a target is every event (repeats too) strictly before its time."""
    rows = [("a", "i0", 1, "view"), ("a", "i0", 2, "click"), ("a", "i1", 3, "view"), ("a", "i2", 4, "view"),
            ("a", "i1", 5, "purchase"), ("a", "i3", 6, "view"),          # i3: validation (4th new item)
            ("a", "i3", 7, "click"), ("a", "i2", 8, "click"),
            ("a", "i4", 9, "view"),                                        # i4: test (5th new item)
            ("a", "i5", 9, "view"),                                        # same time, later row: test target
            ("a", "i4", 10, "purchase"), ("a", "i0", 11, "view"),          # after the test target
            ("b", "i0", 1, "view"), ("b", "i1", 2, "view"), ("b", "i1", 3, "click")]
    s = evaluation.split_table(_table(rows))
    assert s.protocol == "B" and evaluation.protocol_for(["rating"]) == "A"
    items = list(s.item_ids)
    a = list(s.user_ids).index("a")
    assert list(s.user_ids[s.test_users]) == ["a"]  # b touched 2 items: training only
    assert items[s.test_items[0]] == "i5" and items[s.val_items[0]] == "i4"
    test_in, val_in = s.input_rows("test"), s.input_rows("validation")
    ts = s.ts // 1000
    assert sorted(ts[test_in & (s.users == a)]) == [1, 2, 3, 4, 5, 6, 7, 8]  # not i4 at 9 (the same instant)
    assert sorted(ts[val_in & (s.users == a)]) == [1, 2, 3, 4, 5, 6, 7, 8]
    assert (s.users[test_in] != a).sum() == 3  # b's events: all training
    x = s.input_matrix("test")[a]
    assert [items[k] for k in np.flatnonzero(x)] == ["i0", "i1", "i2", "i3"]  # removed from the candidates
    # Recency ranks count distinct items, each at its newest event: i2 (t=8), i3 (7), i1 (5), i0 (2).
    w = s.recency_matrix("test", half_life=1.0)[a]
    assert [w[items.index(i)] for i in ("i2", "i3", "i1", "i0")] == [1.0, 0.5, 0.25, 0.125]


def test_protocol_r_targets_the_next_item_returns_included_and_filters_by_the_seen_policy():
    """Issue 34: a view, click and purchase of one item are one step; a return to an item seen
    before is a target. Each seen policy removes the items of its types' events before the target."""
    from recsys.features import SEEN_POLICIES
    rows = [("a", "i0", 1, "view"), ("a", "i0", 2, "click"), ("a", "i1", 3, "view"), ("a", "i1", 4, "purchase"),
            ("a", "i2", 5, "view"), ("a", "i3", 6, "add_to_cart"), ("a", "i0", 7, "view"),  # i0: a return (validation)
            ("a", "i0", 8, "click"), ("a", "i2", 9, "view"),                                  # i2: a return (test)
            ("b", "i0", 1, "view"), ("b", "i1", 2, "view")] + [("c", f"j{k:02}", k, "view") for k in range(4)]
    rows += [("d", f"j{k:02}", k, "view") for k in range(20)]  # a catalogue larger than a top 10
    s = evaluation.split_table(_table(rows), protocol="R")
    items, a = list(s.item_ids), list(s.user_ids).index("a")
    assert items[s.val_items[0]] == "i0" and items[s.test_items[0]] == "i2"
    assert s.is_positive.sum() == 6 + 2 + 4 + 20  # a: i0, i1, i2, i3, i0, i2 (a repeat of the step before: none)
    assert sorted(s.ts[s.input_rows("validation") & (s.users == a)] // 1000) == [1, 2, 3, 4, 5, 6]

    def filtered(stage, policy):
        indptr, seen = s.input_items(stage, SEEN_POLICIES[policy])
        return [items[k] for k in seen[indptr[a]:indptr[a + 1]]]
    assert filtered("validation", "all") == ["i0", "i1", "i2", "i3"]
    assert filtered("validation", "purchase+rating") == ["i1"]
    assert filtered("validation", "cart+purchase+rating") == ["i1", "i3"]

    # A scorer that ranks the target first: missed under "all" (a return is filtered), hit otherwise.
    def scorer(stage):
        target = s.targets(stage)[1]
        return lambda pos: np.eye(s.n_items)[target[pos]]
    chosen = evaluation.choose_seen_policy(s, scorer)
    assert chosen["validation"]["all"]["hr@10"] < chosen["validation"]["cart+purchase+rating"]["hr@10"] == 1.0
    assert chosen["chosen"] == "cart+purchase+rating"  # ties with purchase+rating: the first one
    assert chosen["filter_types"] == ["add_to_cart", "purchase", "rating"]
    assert set(chosen["test"]) == {"cart+purchase+rating", "all"}
    # A scorer that ranks the returns last: every policy scores alike, and today's "all" wins the tie.
    flat = evaluation.choose_seen_policy(s, lambda stage: lambda pos: np.ones((len(pos), s.n_items)))
    assert flat["chosen"] == "all" and set(flat["test"]) == {"all"}
    with pytest.raises(ValueError, match="protocol R"):
        evaluation.choose_seen_policy(evaluation.split_table(_table(rows)), scorer)


def test_protocol_b_ignores_repeat_events_as_targets_on_the_synthetic_stream():
    """On the project's synthetic events most held-out *events* repeat a touched item; protocol B's
    targets never do, so no model is scored on an item the seen filter must remove."""
    table = events_table(SyntheticSource(events=20_000, users=300, items=200, clusters=5).events_iter())
    b, a = evaluation.split_table(table), evaluation.split_table(table, protocol="A")
    assert b.protocol == "B"
    for split, stage in ((b, "test"), (b, "validation")):
        users, items, _ = split.targets(stage)
        assert split.input_matrix(stage)[users, items].sum() == 0
    touched = a.input_matrix("test")[a.test_users, a.test_items]
    print(f"protocol A targets already touched: {touched.mean():.2f}")
    assert touched.mean() > 0.5  # why protocol B exists


def test_paired_bootstrap_interval_covers_the_difference_and_is_fixed_by_its_seed():
    rng = np.random.default_rng(1)
    a = rng.random(2000) < 0.40
    b = np.where(rng.random(2000) < 0.8, a, rng.random(2000) < 0.30)  # mostly the same users hit
    ci = evaluation.paired_bootstrap(a, b)
    assert ci["low"] < ci["diff"] < ci["high"] and ci["diff"] == pytest.approx(a.mean() - b.mean(), abs=1e-4)
    assert ci == evaluation.paired_bootstrap(a, b)  # a fixed seed: the same interval
    assert 0 < ci["low"]  # a real gap of ~0.02 over 2000 paired users is seen
    same = evaluation.paired_bootstrap(a, a)
    assert same["low"] == same["high"] == 0.0
    with pytest.raises(ValueError):
        evaluation.paired_bootstrap(a, b[:10])


def test_metrics_ranks_and_training_items_removed():
    # 3 items; the target is item 2; item 0 scores highest but is a training item: removed.
    scores = np.array([[9.0, 1.0, 5.0]])
    exclude = np.array([[True, False, False]])
    assert evaluation.rank_of_target(scores, np.array([2]), exclude).tolist() == [0]
    assert evaluation.rank_of_target(scores, np.array([1]), exclude).tolist() == [1]
    m = evaluation.metrics_from_ranks(np.array([0, 1, 9, 10, 60]))
    assert m["hr@10"] == pytest.approx(3 / 5)
    assert m["hr@50"] == pytest.approx(4 / 5)
    assert m["ndcg@10"] == pytest.approx((1 + 1 / np.log2(3) + 1 / np.log2(11)) / 5, abs=1e-4)


def _dense_ranks(split, scores_by_user, stage):
    """The reference: a dense users x items input mask, excluded scores set to -inf, float64."""
    users, items, _ = split.targets(stage)
    rows = split.input_rows(stage)
    seen = np.zeros((split.n_users, split.n_items), dtype=bool)
    seen[split.users[rows], split.items[rows]] = True
    scores = np.where(seen[users], -np.inf, scores_by_user[users].astype(np.float64))
    t = scores[np.arange(len(users)), items]
    return (scores > t[:, None]).sum(1) + ((scores == t[:, None]).sum(1) - 1) // 2


@pytest.mark.parametrize("protocol", ["A", "B"])
def test_target_ranks_from_sparse_inputs_equal_the_dense_reference(protocol):
    rng = np.random.default_rng(5)
    n = 4000  # 60 users, 150 items, repeats: protocol A's targets are often touched items (ranked as -inf)
    users, items, ts = rng.integers(0, 60, n), rng.integers(0, 150, n), rng.integers(0, 500, n)
    s = evaluation.split_arrays(users, items, ts, protocol=protocol)
    # Few distinct values: many ties; some -inf scores (a model's unknown items), float32 like a model's.
    scores = rng.integers(0, 6, (s.n_users, s.n_items)).astype(np.float32)
    scores[rng.random(scores.shape) < 0.05] = -np.inf
    for stage in evaluation.STAGES:
        u = s.targets(stage)[0]
        got = evaluation.target_ranks(s, lambda pos: scores[u[pos]], batch=7, stage=stage)
        assert np.array_equal(got, _dense_ranks(s, scores, stage))
        assert np.array_equal(evaluation.popularity_counts(s, stage), s.input_matrix(stage).sum(0))
        assert np.array_equal(evaluation.popularity_ranks(s, stage), _dense_ranks(
            s, np.broadcast_to(s.input_matrix(stage).sum(0), scores.shape), stage))
    if protocol == "A":
        touched = s.input_matrix("test")[s.test_users, s.test_items] > 0
        assert 0 < touched.sum() < len(touched)
    # The dense-mask entry point agrees too.
    exclude = rng.random((50, 150)) < 0.3
    target = rng.integers(0, 150, 50)
    assert np.array_equal(evaluation.rank_of_target(scores[:50], target, exclude),
                          _dense_ranks_of(scores[:50], target, exclude))


def _dense_ranks_of(scores, target, exclude):
    scores = np.where(exclude, -np.inf, scores.astype(np.float64))
    t = scores[np.arange(len(target)), target]
    return (scores > t[:, None]).sum(1) + ((scores == t[:, None]).sum(1) - 1) // 2


def test_a_large_catalogue_is_scored_one_batch_at_a_time_and_the_dense_baselines_are_skipped(monkeypatch):
    """300,000 items, 500 users: a users x items float32 matrix would be 600 MB; scoring holds one
    batch of scores (and a boolean buffer of its shape), and the items x items baselines say why
    they are not computed."""
    rng = np.random.default_rng(0)
    n_items, n_users = 300_000, 500
    items = np.concatenate([rng.permutation(n_items), rng.integers(0, n_items, 10_000)])
    users = rng.integers(0, n_users, len(items))
    s = evaluation.split_arrays(users, items, np.arange(len(items)))
    assert (s.n_users, s.n_items) == (n_users, n_items)

    def dense(*_args, **_kwargs):
        raise AssertionError("a users x items matrix on the scoring path")
    monkeypatch.setattr(evaluation.Split, "input_matrix", dense)
    monkeypatch.setattr(evaluation.Split, "recency_matrix", dense)
    batch = 50
    one_batch = batch * n_items * 8

    def score(pos):
        return rng.random((len(pos), n_items))  # float64

    tracemalloc.start()
    try:
        res = {stage: evaluation.evaluate_scorer(s, score, batch=batch, stage=stage) for stage in evaluation.STAGES}
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        b = evaluation.baselines(s)
        peak_baselines = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    print(f"peak {peak / 1e6:.0f} MB scoring (one batch of float64 scores {one_batch / 1e6:.0f} MB), "
          f"{peak_baselines / 1e6:.0f} MB baselines; users x items float32 {n_users * n_items * 4 / 1e6:.0f} MB")
    assert peak < 3 * one_batch < n_users * n_items * 4
    assert peak_baselines < 3 * evaluation.default_batch(n_items) * n_items * 8
    assert res["test"]["users"] == len(s.test_users) == 500 and 0 <= res["test"]["hr@50"] < 0.01  # random
    pop = b["popularity"]
    assert pop["users"] == 500 and pop["validation"]["users"] == 500 and 0 <= pop["hr@10"] <= 1
    for name in evaluation.DENSE_BASELINES:
        assert set(b[name]) == {"skipped"} and "300000 items > 10000" in b[name]["skipped"]
        assert evaluation.figure(b[name]) == "skipped"
    assert evaluation.figure(pop) == f"{pop['hr@10']:.4f}"


def test_too_little_data_is_a_clear_error():
    with pytest.raises(evaluation.EvaluationError, match="no events"):
        evaluation.split_table(_table([]))
    s = evaluation.split_table(_table([("a", f"i{k}", k) for k in range(12)]))
    with pytest.raises(evaluation.EvaluationError, match="test users"):
        evaluation.baselines(s)


def test_baselines_on_movielens_tuned_on_validation_and_the_reference_figures(ml100k):
    table = events_table(MovieLensSource(ml100k).events_iter())
    s = evaluation.split_table(table)
    assert (s.n_users, s.n_items, len(s.test_users), len(s.val_users)) == (943, 1682, 943, 943)
    b = evaluation.baselines(s)
    assert b["popularity"]["hr@10"] == pytest.approx(0.086, abs=0.003)
    assert b["itemknn"]["hr@10"] == pytest.approx(0.109, abs=0.003)
    # Settings chosen on the validation targets only, then the test scored once.
    assert b["ease"]["chosen"]["lambda"] in evaluation.EASE_LAMBDAS
    assert b["ease"]["hr@10"] == pytest.approx(0.145, abs=0.01)
    rw = b["recency_ease"]
    assert rw["chosen"]["half_life"] in evaluation.HALF_LIVES and rw["chosen"]["lambda"] in evaluation.EASE_LAMBDAS
    best = max(rw["validation_hr@10_by_setting"].values())
    assert rw["validation"]["hr@10"] == best  # the choice is the validation's best, never the test's
    assert rw["hr@10"] > b["ease"]["hr@10"] > b["itemknn"]["hr@10"] > b["popularity"]["hr@10"]
    # The reference figures (EVALUATION.md; settings chosen on the test targets, the older rule)
    # are reproduced exactly by the same code at their settings.
    x = s.input_matrix("test")
    weights = evaluation.ease_weights(x, 500.0).astype(np.float32)
    ease = evaluation.evaluate_scorer(s, lambda pos: x[s.test_users[pos]] @ weights)
    assert (ease["hr@10"], ease["ndcg@10"]) == pytest.approx((0.145, 0.074), abs=0.002)
    xr = s.recency_matrix("test", half_life=1.0)
    recency = evaluation.evaluate_scorer(s, lambda pos: xr[s.test_users[pos]] @ weights)
    assert (recency["hr@10"], recency["ndcg@10"]) == pytest.approx((0.210, 0.110), abs=0.002)


# ---- point-in-time features ---------------------------------------------------------------------

def test_point_in_time_features_use_only_strictly_earlier_events():
    rows = [("u", "a", 1, "view"), ("v", "x", 2), ("u", "b", 3, "click"), ("u", "c", 4, "purchase"),
            ("u", "a", 5, "view")]
    feats = point_in_time_features(_table(rows), recent_items=2)
    assert feats[0].recent == [] and feats[0].counts == {}
    assert feats[2].recent == ["a"] and feats[2].counts == {"view": 1}
    assert feats[3].recent == ["b", "a"] and feats[3].seen == {"a", "b"}
    assert feats[4].recent == ["c", "b"]  # capped at recent_items, newest first
    assert feats[4].counts == {"view": 1, "click": 1, "purchase": 1}
    at = user_features_at(_table(rows), "u", 4000, recent_items=2)  # ts 4 s: the purchase is not before it
    assert at.recent == ["b", "a"] and at.counts == {"view": 1, "click": 1}


def test_point_in_time_equals_replaying_the_online_ops():
    src = SyntheticSource(events=3000, users=50, items=80, clusters=4, seed=3)
    events = list(src.events_iter())
    table = events_table(events)
    keys, mem = Keys("x"), MemoryFeatures()
    for (ev, feats), raw in zip(iter_point_in_time(table, recent_items=10), events):
        assert ev.event_id == raw.event_id
        expected = mem.user(keys, raw.user_id)
        assert (feats.recent, feats.seen, feats.counts) == (expected.recent, expected.seen, expected.counts)
        mem.apply(raw.event_id, event_ops(raw, keys, 10, 86400.0))


def test_events_table_is_time_ordered_archive_layout():
    evs = [Event(event_id="2", user_id="u", item_id="i", type=EventType.click, ts=20),
           Event(event_id="1", user_id="u", item_id="j", type=EventType.rating, value=4.0, ts=10)]
    t = events_table(evs)
    assert t.schema == SCHEMA
    assert t.column("event_id").to_pylist() == ["1", "2"]
    assert t.column("value").to_pylist() == [4.0, None]


def test_relabeled_items_are_one_consistent_renaming_of_events_and_features():
    src = SyntheticSource(events=2000, users=50, items=40, clusters=4, categories=1)
    table, features = events_table(src.events_iter()), src.item_features()
    relabeled, renamed = with_relabeled_items(table, features, seed=3)
    rename = dict(zip(table["item_id"].to_pylist(), relabeled["item_id"].to_pylist()))
    assert len(set(rename.values())) == len(rename) and any(a != b for a, b in rename.items())
    assert all(renamed[rename[i]] == features[i] for i in rename), "an item's features go with its behaviour"
    assert sorted(renamed) == sorted(features)
    assert relabeled.drop(["item_id"]).equals(table.drop(["item_id"]))
    again, _ = with_relabeled_items(table, features, seed=3)
    assert again.equals(relabeled)
