"""The sessions generator's structure, session-kNN (V-SKNN) and the oracle ceiling.

Pure logic: no services.
"""
from __future__ import annotations

import hashlib
import time
from collections import defaultdict

import numpy as np
import pytest

from recsys import evaluation
from recsys.evaluation import SESSION_GAP_MS
from recsys.sessions import SessionSource
from recsys.sources import SourceError, SyntheticSource, open_source
from recsys.training_data import events_table

END = 1_750_000_000_000
SPEC = f"synthetic:generator=sessions,events=20000,users=600,items=500,clusters=10,seed=4,end={END}"


def _states(spec: str = SPEC, **changes) -> tuple[SessionSource, list]:
    spec += "".join(f",{k}={v}" for k, v in changes.items())
    src = open_source(spec)
    return src, list(src.states())


def _session_starts(states: list) -> list:
    """The first event of each visit (its first item visit's view)."""
    return [s for s in states if s.prev < 0 and s.type == 0]


def test_todays_generator_is_the_default_and_unchanged_byte_for_byte():
    """The hash was taken from the generator before the sessions generator existed (commit 3af7dab)."""
    spec = "events=5000,users=200,items=300,clusters=6,seed=3,shift_at=0.5,new_items_at=0.25,categories=1"
    for s in (f"synthetic:{spec}", f"synthetic:generator=clusters,{spec}"):
        src = open_source(s)
        assert type(src) is SyntheticSource
        h = hashlib.sha256()
        for e in src.events_iter():
            h.update(e.model_dump_json().encode() + b"\n")
        assert h.hexdigest() == "199afc0dba12a3b1ee4ccca7deb90f279320466d32a036b6711b1131e03c69db"


def test_spec_errors_say_what_to_fix():
    with pytest.raises(SourceError, match="unknown generator"):
        open_source("synthetic:generator=markov")
    with pytest.raises(SourceError, match="unknown parameter 'days'"):
        open_source("synthetic:days=3")  # a sessions parameter on today's generator
    with pytest.raises(SourceError, match="end='yesterday'"):
        open_source("synthetic:generator=sessions,end=yesterday")


def test_deterministic_by_seed_for_a_given_end_and_ending_there():
    a = [e.model_dump() for e in open_source(SPEC).events_iter()]
    b = [e.model_dump() for e in open_source(SPEC).events_iter()]
    assert a == b and len(a) == 20_000
    assert [e["ts"] for e in a] == sorted(e["ts"] for e in a)
    assert a[-1]["ts"] == END and a[0]["ts"] < END - 20 * 86_400_000  # 28 days by default
    other = [e.model_dump() for e in open_source(SPEC.replace("seed=4", "seed=5")).events_iter()]
    assert other != a
    now = open_source(SPEC.replace(f"end={END}", "end=now").replace("events=20000", "events=300"))
    last = list(now.events_iter())[-1].ts
    assert time.time() * 1000 - 60_000 < last <= time.time() * 1000


def test_a_30_minute_gap_recovers_the_visits_exactly():
    _, states = _states()
    by_user = defaultdict(list)
    for s in states:
        by_user[s.user_id].append(s)
    for events in by_user.values():
        for a, b in zip(events, events[1:]):
            same = a.session == b.session
            assert (b.ts - a.ts <= SESSION_GAP_MS) == same, (a, b)
    sessions = {s.session for s in states}
    lengths = np.bincount([s.session for s in states])[sorted(sessions)]
    print(f"{len(sessions)} visits, events per visit: median {np.median(lengths):.0f}, mean {lengths.mean():.2f}")
    assert 3 <= np.median(lengths) <= 5  # OTTO: median 4 events per session


def test_the_funnel_goes_view_click_cart_purchase_at_its_rates():
    src, states = _states()
    last = {}
    for s in states:
        if s.type > 0:
            before = last[s.user_id]
            assert (before.item, before.type, before.session) == (s.item, s.type - 1, s.session)
        last[s.user_id] = s
    counts = np.bincount([s.type for s in states], minlength=4)
    print("views, clicks, carts, purchases:", counts.tolist())
    assert counts[1] / counts[0] == pytest.approx(src.click, abs=0.02)
    assert counts[2] / counts[1] == pytest.approx(src.cart, abs=0.03)
    assert counts[3] / counts[2] == pytest.approx(src.purchase, abs=0.06)


def test_intents_switch_to_untouched_clusters_at_about_the_configured_rate():
    src, states = _states(clusters=40, explore=0.15, switch=0.2, drift=0)
    touched = defaultdict(set)
    starts = explored = 0
    changes = visits = 0
    prev_intent = {}
    for s in states:
        if s.type != 0:
            continue
        if s.prev < 0 and not s.anonymous:
            starts += 1
            if s.explored:
                explored += 1
                k = int(s.user_id[1:])
                assert s.intent not in touched[s.user_id] and s.intent not in src.mixture[k]
        elif s.prev >= 0:
            visits += 1
            changes += s.intent != prev_intent[s.session]
        prev_intent[s.session] = s.intent
        touched[s.user_id].add(int(src.item_cluster[s.item]))
    print(f"explored {explored / starts:.3f} of {starts} visits; intent changed at {changes / visits:.3f} of {visits} items")
    assert explored / starts == pytest.approx(0.15, abs=0.03)
    assert 0.3 * 0.2 < changes / visits < 0.2  # a switch may draw the same cluster again


def test_the_next_item_follows_the_sparse_graph_from_the_previous_one():
    def on_graph(**changes):
        src, states = _states(**changes)
        seen = defaultdict(set)
        hits = moves = 0
        for s in states:
            if s.type == 0 and s.prev >= 0 and s.item not in seen[s.session]:
                moves += 1
                hits += s.item in src.neighbours[s.prev]
            seen[s.session].add(s.item)
        return hits / moves
    follow, free = on_graph(follow=0.5), on_graph(follow=0.0)
    print(f"new items that are a graph neighbour of the previous one: {follow:.3f} (follow 0.5), {free:.3f} (follow 0)")
    assert follow > 0.5 and follow - free > 0.3


def test_anonymous_visitors_are_new_ids_at_the_configured_share():
    _, states = _states(anonymous=0.3)
    starts = _session_starts(states)
    anon = [s for s in starts if s.anonymous]
    print(f"anonymous: {len(anon) / len(starts):.3f} of {len(starts)} visits")
    assert len(anon) / len(starts) == pytest.approx(0.3, abs=0.03)
    assert all(s.user_id.startswith("a") for s in anon) and not any(s.user_id.startswith("a") for s in starts
                                                                    if not s.anonymous)
    sessions_of = defaultdict(set)
    for s in states:
        sessions_of[s.user_id].add(s.session)
    assert all(len(sessions_of[s.user_id]) == 1 for s in anon)  # seen in no earlier (or later) visit


def test_tastes_drift_over_weeks_and_shift_at_moves_every_user():
    def outside_mixture(src, starts):
        return np.mean([s.intent not in src.mixture[int(s.user_id[1:])] for s in starts])

    src, states = _states(drift=0, explore=0, switch=0, anonymous=0)
    starts = _session_starts(states)
    assert outside_mixture(src, starts) == 0
    src, states = _states(drift=2, explore=0, switch=0, anonymous=0)
    starts = _session_starts(states)
    early, late = outside_mixture(src, starts[:len(starts) // 4]), outside_mixture(src, starts[-len(starts) // 4:])
    print(f"intents outside the first mixture: {early:.3f} in the first quarter, {late:.3f} in the last")
    assert late > early + 0.2
    src, states = _states(drift=0, explore=0, switch=0, anonymous=0, shift_at=0.5)
    starts = _session_starts(states)
    half = [i for i, s in enumerate(starts) if states.index(s) >= 10_000][0] + 20  # safely after the shift
    moved = [(c + 1 + src.clusters // 2) % src.clusters for c in range(src.clusters)]
    assert all(s.intent in src.mixture[int(s.user_id[1:])] for s in starts[:half - 40])
    assert all(s.intent in [moved[c] for c in src.mixture[int(s.user_id[1:])]] for s in starts[half:])


# ---- session-kNN ---------------------------------------------------------------------------------

def _hand_split():
    """u's latest session before its validation target is [a, c] (weights 1/2, 1); the others' sessions:
    p1 [a, b, c] (sim 1.5), p2 [b, d, a] (0.5), p3 [c, e] (1.0, the most recent), p4 [x1, f] (0)."""
    minute, day = 60_000, 86_400_000
    rows = [("u", "x1", 0), ("u", "x2", minute), ("u", "x3", 2 * minute),
            ("u", "a", day), ("u", "c", day + minute), ("u", "v", day + 2 * minute), ("u", "t", day + 3 * minute)]
    for user, items, start in (("p1", "abc", 3 * day), ("p2", "bda", 4 * day), ("p3", "ce", 6 * day), ("p4", ["x1", "f"], 5 * day)):
        rows += [(user, item, start + k * minute) for k, item in enumerate(items)]
    users, items, ts = zip(*rows)
    return evaluation.split_arrays(users, items, ts, protocol="B")


@pytest.mark.parametrize("k,sample,votes", [
    (2, 100, {"a": 1.5, "b": 1.5, "c": 2.5, "e": 1.0}),
    (3, 100, {"a": 2.0, "b": 2.0, "c": 2.5, "d": 0.5, "e": 1.0}),
    (3, 1, {"c": 1.0, "e": 1.0}),  # the sample: only the most recent session sharing an item
])
def test_session_knn_votes_computed_by_hand(k, sample, votes):
    s = _hand_split()
    assert s.item_ids[s.val_items].tolist() == ["v"]
    sessions = evaluation.Sessions.of(s, "validation")
    u = int(np.flatnonzero(s.user_ids == "u")[0])
    scores = evaluation.session_knn_scores(sessions, u, k, sample, s.n_items)
    assert dict(zip(s.item_ids.tolist(), scores.tolist())) == {i: votes.get(i, 0.0) for i in s.item_ids.tolist()}


def test_oracle_beats_every_baseline_and_session_knn_beats_most_popular():
    src = open_source(f"synthetic:generator=sessions,events=30000,users=1000,items=600,clusters=12,end={END}")
    s = evaluation.split_table(events_table(src.events_iter()))
    b = evaluation.baselines(s)
    ceiling = evaluation.oracle(s, src)
    print({name: m["hr@10"] for name, m in b.items()} | {"oracle": ceiling["hr@10"]}, "test users", len(s.test_users))
    assert b["session_knn"]["chosen"]["k"] in evaluation.SKNN_NEIGHBOURS
    assert b["session_knn"]["validation"]["hr@10"] == max(b["session_knn"]["validation_hr@10_by_setting"].values())
    assert b["session_knn"]["hr@10"] > 1.5 * b["popularity"]["hr@10"]
    assert all(ceiling["hr@10"] > m["hr@10"] + 0.05 for m in b.values())
