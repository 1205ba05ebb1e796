"""Unit tests of pure logic: the event contract, the feature operations, the sources."""
import json
import math
import time

import pytest

from recsys.events import BadEvent, Event, EventTimeBounds, EventType, parse_event
from recsys.features import Keys, MemoryFeatures, event_ops, log_weight
from recsys.sources import SourceError, open_source


def ev(i, user="u1", item="a", ts=1000, type_="click"):
    return Event(event_id=f"e{i}", user_id=user, item_id=item, type=type_, ts=ts)


def test_parse_event_round_trip():
    e = Event(event_id="x", user_id="u", item_id="i", type="rating", value=4.0, ts=1_700_000_000_000)
    assert parse_event(e.to_bytes()) == e


def test_event_time_is_bounded_and_values_are_finite_on_the_wire():
    bounds = EventTimeBounds(oldest_ms=1_000_000, max_skew_s=300)
    now = time.time()
    bounds.check(1_000_000, now)
    bounds.check(int((now + 299) * 1000), now)
    for ts in (999_999, int((now + 301) * 1000), 10**15):
        with pytest.raises(ValueError, match="outside"):
            bounds.check(ts, now)
    wire = {"event_id": "1", "user_id": "u", "item_id": "i", "type": "rating", "ts": 1_700_000_000_000}
    for bad, field in (({"ts": 10**15}, "ts"), ({"ts": 1}, "ts"), ({"value": float("nan")}, "value"),
                       ({"value": float("inf")}, "value")):
        with pytest.raises(BadEvent) as info:
            parse_event(json.dumps({**wire, **bad}).encode())
        assert info.value.reason.startswith(field), info.value.reason
    assert parse_event(json.dumps(wire).encode()).ts == wire["ts"]
    # Code that builds events states its own times (a test's ts=1000, MovieLens's 1997).
    assert Event(**{**wire, "ts": 1000}).ts == 1000


@pytest.mark.parametrize("raw, fragment", [
    (b"not json", "not JSON"),
    (b"[1, 2]", "not a JSON object"),
    (json.dumps({"event_id": "1", "user_id": "u", "type": "view", "ts": 1}).encode(), "item_id"),
    (json.dumps({"event_id": "1", "user_id": "u", "item_id": "i", "type": "view", "ts": "soon"}).encode(), "ts"),
    (json.dumps({"event_id": "1", "user_id": "u", "item_id": 7, "type": "view", "ts": 1}).encode(), "item_id"),
    (json.dumps({"event_id": "1", "user_id": "u", "item_id": "i", "type": "teleport", "ts": 1}).encode(), "type"),
    (None, "empty"),
])
def test_bad_records_say_why(raw, fragment):
    with pytest.raises(BadEvent) as info:
        parse_event(raw)
    assert fragment in info.value.reason


def test_memory_features_recent_seen_counts_and_dedup():
    keys, mem = Keys("t"), MemoryFeatures()
    events = [ev(i, item=f"i{i % 7}", ts=1000 + i, type_="view" if i % 3 else "purchase") for i in range(60)]
    for e in events:
        assert mem.apply(e.event_id, event_ops(e, keys, 50, 3600))
    assert not mem.apply(events[5].event_id, event_ops(events[5], keys, 50, 3600))  # replay: no change
    user = mem.user(keys, "u1")
    assert user.recent == [e.item_id for e in reversed(events)][:50]
    assert user.seen == {f"i{k}" for k in range(7)}
    assert user.counts == {"view": 40, "purchase": 20}
    assert sum(mem.hashes[keys.item("i0")].values()) == len([e for e in events if e.item_id == "i0"])


def test_the_seen_set_keeps_the_latest_items_by_event_time_in_any_order():
    """Issue 35 finding 9: the seen set grew with every distinct item. It keeps each item's
    latest event time and only the ``seen_items`` latest items, the same whatever the order of
    the events (a replay, a rebuild, a late event): an item dropped comes back only with a
    later event."""
    import random
    keys = Keys("t")
    events = [ev(i, item=f"i{i % 9}", ts=1000 + 7 * i) for i in range(40)] + [ev(40, item="old", ts=5)]
    latest = {}
    for e in events:
        latest[e.item_id] = max(latest.get(e.item_id, 0), e.ts)
    want = set(sorted(latest, key=latest.get)[-4:])
    for seed in range(5):
        shuffled = random.Random(seed).sample(events, len(events))
        mem = MemoryFeatures()
        for e in shuffled:
            mem.apply(e.event_id, event_ops(e, keys, 50, 3600, seen_items=4))
        assert mem.user(keys, "u1").seen == want
        assert len(mem.zsets[keys.user("u1", "seen_at")]) == 4


def test_trending_is_a_decayed_count_in_log_space():
    keys, mem = Keys("t"), MemoryFeatures()
    half_life = 10.0
    # item a: two events one half-life ago; item b: one event now. Equal decayed weight.
    for i, (item, ts) in enumerate([("a", 0), ("a", 0), ("b", 10_000)]):
        mem.apply(f"e{i}", event_ops(ev(i, item=item, ts=ts), keys, 50, half_life))
    z = {**mem.zsets[keys.trending[keys.shard("a")]], **mem.zsets[keys.trending[keys.shard("b")]]}
    assert math.isclose(z["a"], z["b"], rel_tol=1e-12)
    assert math.isclose(z["b"], log_weight(10_000, half_life))
    assert math.isfinite(log_weight(4_000_000_000_000, 60.0))  # far-future times stay finite


def test_synthetic_is_deterministic_ordered_and_clustered():
    a = list(open_source("synthetic:events=3000,users=200,items=300,seed=3").events_iter())
    b = list(open_source("synthetic:events=3000,users=200,items=300,seed=3").events_iter())
    assert a == b and len(a) == 3000
    assert all(x.ts <= y.ts for x, y in zip(a, a[1:]))
    assert len({e.event_id for e in a}) == 3000
    src = open_source("synthetic:events=3000,users=200,items=300,seed=3")
    in_cluster = sum(src.item_cluster[int(e.item_id[1:])] == src.user_cluster[int(e.user_id[1:])] for e in a)
    assert in_cluster / len(a) > 0.6  # users stay mostly within their taste cluster
    counts = {}
    for e in a:
        counts[e.item_id] = counts.get(e.item_id, 0) + 1
    top = sorted(counts.values(), reverse=True)
    assert sum(top[:30]) > 0.25 * len(a)  # popularity skew: 10% of items take over a quarter


def test_synthetic_shift_moves_users_to_other_clusters():
    src = open_source("synthetic:events=4000,users=100,items=400,seed=5,shift_at=0.5")
    events = list(src.events_iter())
    late = events[2000:]
    home = sum(src.item_cluster[int(e.item_id[1:])] == src.user_cluster[int(e.user_id[1:])] for e in late)
    assert home / len(late) < 0.2


def test_synthetic_new_season_replaces_the_catalogue_at_the_given_fraction():
    events = list(open_source("synthetic:events=4000,users=100,items=400,seed=5,new_items_at=0.25").events_iter())
    assert all(e.item_id.startswith("i") for e in events[:1000])
    assert all(e.item_id.startswith("n") for e in events[1000:])
    same_shape = list(open_source("synthetic:events=4000,users=100,items=400,seed=5").events_iter())
    assert [e.item_id[1:] for e in events] == [e.item_id[1:] for e in same_shape]  # same draws, new ids


def test_csv_source_detects_seconds_and_orders(tmp_path):
    path = tmp_path / "e.csv"
    path.write_text("who,what,when,extra\nu1,b,20,x\nu2,a,10,y\nu1,c,20,z\n")
    events = list(open_source(f"csv:{path}", "who", "what", "when").events_iter())
    assert [(e.user_id, e.item_id, e.ts) for e in events] == [("u2", "a", 10_000), ("u1", "b", 20_000), ("u1", "c", 20_000)]


@pytest.mark.parametrize("spec, fragment", [
    ("nope:x", "unknown source"),
    ("synthetic:colours=3", "unknown parameter"),
    ("synthetic:events=many", "not a number"),
    ("movielens:/nonexistent", "not found"),
    ("csv:", "give a path"),
])
def test_bad_source_specs(spec, fragment):
    with pytest.raises(SourceError, match=fragment):
        open_source(spec)


def test_csv_unknown_columns(tmp_path):
    path = tmp_path / "e.csv"
    path.write_text("a,b,c\n1,2,3\n")
    with pytest.raises(SourceError, match="no column user_id"):
        open_source(f"csv:{path}")


def test_the_feature_patterns_match_every_feature_key_and_no_other_key_under_the_prefix():
    """Issue 35: what a rebuild deletes (``Keys.feature_patterns``) is every key of the feature
    layout, and none of the online A/B state's or the scheduler's lock under the same prefix."""
    from fnmatch import fnmatchcase

    from recsys.attribution import OnlineKeys
    keys, online = Keys("p", trending_shards=3), OnlineKeys("p")
    features = [keys.user("u", part) for part in ("recent", "seen", "counts")] + [
        keys.dedup("u", "e"), keys.user_refused("u"), keys.item("i"), *keys.trending, keys.shard_applied(2),
        keys.shard_refused(2)]
    others = [online.shown("u"), online.attributed("u"), online.arm("v1|current"), online.arms, online.guardrail,
              "p:lock:retrain", "p-auth:apikey:{x}", "p-catalogue:{c}"]

    def cleared(key):
        return any(fnmatchcase(key, pattern) for pattern in keys.feature_patterns())
    assert [k for k in features if not cleared(k)] == []
    assert [k for k in others if cleared(k)] == []


def test_the_seen_filter_is_a_policy_by_event_type():
    """Issue 34: ``seen_at`` holds every type's items; carts, purchases and ratings also have a
    seen set of their own, so a policy that lets views and clicks come back reads only those."""
    from recsys.features import ALL_TYPES, SEEN_POLICIES, USER_PARTS, policy_types, seen_parts
    keys, mem = Keys("p"), MemoryFeatures()
    for i, (item, type_) in enumerate([("v", "view"), ("c", "click"), ("k", "add_to_cart"), ("b", "view"),
                                       ("b", "purchase"), ("r", "rating")]):
        e = ev(i, item=item, ts=1000 + i, type_=type_)
        mem.apply(e.event_id, event_ops(e, keys, 50, 3600, seen_items=10))
    assert mem.user(keys, "u1").seen == {"v", "c", "k", "b", "r"} == mem.user(keys, "u1", SEEN_POLICIES["all"]).seen
    assert mem.user(keys, "u1", SEEN_POLICIES["purchase+rating"]).seen == {"b", "r"}
    assert mem.user(keys, "u1", SEEN_POLICIES["cart+purchase+rating"]).seen == {"k", "b", "r"}
    assert {k for k in mem.zsets if ":user:" in k} <= {keys.user("u1", p) for p in USER_PARTS}  # erasure deletes them
    assert seen_parts(ALL_TYPES) == ("seen_at",)
    with pytest.raises(ValueError, match="every type, or some of"):
        seen_parts(frozenset({EventType.view, EventType.purchase}))  # a view has no seen set of its own
    assert policy_types(None) == ALL_TYPES  # a card from before the policy
    assert policy_types(["rating", "purchase"]) == SEEN_POLICIES["purchase+rating"]


def test_a_type_seen_set_is_bounded_like_seen_at():
    keys, mem = Keys("p"), MemoryFeatures()
    for i in range(6):
        e = ev(i, item=f"i{i}", ts=1000 + i, type_="purchase")
        mem.apply(e.event_id, event_ops(e, keys, 50, 3600, seen_items=4))
    assert set(mem.zsets[keys.user("u1", "seen_at:purchase")]) == {"i2", "i3", "i4", "i5"}


def test_the_store_reads_the_seen_sets_of_the_policy_in_its_one_round_trip():
    """``seen`` holds the union of the policy's seen sets, each read at most ``seen_items`` deep,
    in the one pipelined exchange of the user's reads."""
    from recsys.feature_store import FeatureStore
    from recsys.features import SEEN_POLICIES
    from recsys.settings import Settings

    class Pipe:  # a Redis pipeline's part that the store uses: the commands sent, the replies back
        def __init__(self, replies):
            self.replies, self.sent = replies, []

        def execute_command(self, *command):
            self.sent.append(command)

        def execute(self):
            return [self.replies.get(c[1], []) for c in self.sent]

    store = FeatureStore(Settings(), client=object())
    key = lambda part: store.keys.user("u", part)  # noqa: E731
    pipe = Pipe({key("recent"): ["a"], key("seen_at"): ["a", "b", "c"], key("seen_at:purchase"): ["b"],
                 key("seen_at:rating"): ["c", "b"], key("counts"): {"view": "2", "@t:0": "9"}})
    store.redis = type("Client", (), {"pipeline": lambda self, transaction: pipe})()
    user = store.user("u", SEEN_POLICIES["purchase+rating"])
    assert (user.recent, user.seen, user.counts) == (["a"], {"b", "c"}, {"view": 2})
    n = store.settings.features.seen_items
    assert pipe.sent == [("LRANGE", key("recent"), 0, -1), ("ZREVRANGE", key("seen_at:purchase"), 0, n - 1),
                         ("ZREVRANGE", key("seen_at:rating"), 0, n - 1), ("HGETALL", key("counts"))]
    pipe.sent = []
    assert store.users(["u"])[0].seen == {"a", "b", "c"}  # every type: seen_at alone
    assert [c[1] for c in pipe.sent] == [key("recent"), key("seen_at"), key("counts")]


def test_the_settings_name_the_seen_policies():
    from typing import get_args

    from recsys.features import SEEN_POLICIES
    from recsys.settings import TrainingSettings
    assert set(get_args(TrainingSettings.model_fields["seen_policy"].annotation)) == {"choose", *SEEN_POLICIES}
