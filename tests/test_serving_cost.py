"""Issue 33: the request path's cost levers, their pure parts (the trending cache, the API key
verdict cache and its revocation messages, the user-tower batcher, the settings that switch
each lever), and the serve bench's standing budget. The levers on the real stack:
tests/test_impressions.py, tests/test_online.py, tests/test_security.py,
tests/test_serving_integration.py."""
from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
import redis

from lab.bench.serve import LEVERS, judge, lever_settings, lever_variants
from recsys.auth import (Authorizer, Forbidden, KeyRecord, KeyVerdicts, RateLimited, Scope, Unauthorized, digest,
                         follow_revocations)
from recsys.feature_store import TrendingCache
from recsys.settings import Settings


class Clock:
    def __init__(self, now: float = 100.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


TOP = [(f"i{n}", 10.0 - n) for n in range(8)]


# ---- the trending cache ---------------------------------------------------------------------

def test_the_cached_top_is_served_while_at_most_max_age_old():
    clock, reads = Clock(), []

    def read(n):
        reads.append(n)
        return TOP[:n]
    cache = TrendingCache(read, n=6, max_age_s=1.0, clock=clock)
    assert cache.top(3) is None  # nothing read yet: the request reads the shards itself
    cache.refresh()
    assert reads == [6] and cache.top(3) == TOP[:3] and cache.top(6) == TOP[:6]
    assert cache.top(7) is None  # more than it holds
    clock.now += 1.0
    assert cache.top(3) == TOP[:3]  # exactly max_age old: still within the bound
    clock.now += 0.001
    assert cache.top(3) is None  # older: the request reads the shards
    cache.refresh()
    assert cache.top(2) == TOP[:2]


def test_a_cached_tops_age_counts_from_when_its_read_began():
    clock = Clock()

    def slow_read(n):
        clock.now += 0.4  # Redis took 0.4 s to answer
        return TOP[:n]
    cache = TrendingCache(slow_read, n=4, max_age_s=1.0, clock=clock)
    cache.refresh()
    clock.now += 0.6
    assert cache.top(4) == TOP[:4]
    clock.now += 0.01  # 1.01 s after the read began, though only 0.61 s after it ended
    assert cache.top(4) is None


def test_the_background_refresh_survives_redis_errors_and_stops():
    stopping, calls, refreshed = threading.Event(), [], threading.Event()

    def read(n):
        calls.append(n)
        if len(calls) == 1:
            raise redis.ConnectionError("Redis away")
        if len(calls) >= 3:
            refreshed.set()
        return TOP[:n]
    cache = TrendingCache(read, n=5, max_age_s=0.05)
    thread = threading.Thread(target=cache.run, args=(stopping,), daemon=True)
    thread.start()
    assert refreshed.wait(5), calls  # refreshed every max_age / 2, the failure left behind
    assert cache.top(5) == TOP[:5]
    stopping.set()
    thread.join(5)
    assert not thread.is_alive()


# ---- API key verdicts ----------------------------------------------------------------------------

READER = KeyRecord(frozenset({"recs:read"}), 50.0, 100.0)


def test_a_verdict_lasts_its_ttl_and_a_revocation_drops_it():
    clock = Clock()
    verdicts = KeyVerdicts(ttl_s=1.0, max_keys=10, clock=clock)
    verdicts.put("a", READER)
    clock.now += 0.99
    assert verdicts.get("a") == READER
    clock.now += 0.01
    assert verdicts.get("a") is None and len(verdicts) == 0
    verdicts.put("a", READER)
    verdicts.put("b", READER)
    verdicts.drop("a")
    assert verdicts.get("a") is None and verdicts.get("b") == READER
    verdicts.clear()
    assert verdicts.get("b") is None


def test_the_oldest_verdicts_go_first_when_full():
    verdicts = KeyVerdicts(ttl_s=60, max_keys=3, clock=Clock())
    for sha in "abcd":
        verdicts.put(sha, READER)
    assert [verdicts.get(s) is not None for s in "abcd"] == [False, True, True, True]
    verdicts.put("b", READER)  # put again: now the newest
    verdicts.put("e", READER)
    assert [verdicts.get(s) is not None for s in "bcde"] == [True, False, True, True]


def _authorizer(verdicts):
    return Authorizer(Settings(), client=None, verdicts=verdicts)


def test_a_known_key_runs_only_its_bucket_and_an_unknown_one_is_never_remembered():
    clock = Clock()
    authorizer = _authorizer(KeyVerdicts(1.0, clock=clock))
    key, scope = "rsk_" + "k" * 43, Scope.recs_read
    full = authorizer.command(key, scope)
    assert full[1] == Authorizer._SHA and full[3].endswith(f"{{{digest(key)}}}") and full[5] == "recs:read"
    with pytest.raises(Unauthorized):
        authorizer.judge([1, 0], scope, key)  # unknown: raises, and the next request asks Redis again
    assert authorizer.command(key, scope)[1] == Authorizer._SHA
    authorizer.judge([0, 0, "recs:read events:write", "50", "100"], scope, key)  # known: remembered
    spend = authorizer.command(key, scope)
    assert spend[1] == Authorizer._SPEND_SHA and spend[2:] == (1, spend[3], 50.0, 100.0)
    assert spend[3].endswith(f"{{{digest(key)}}}") and ":ratelimit:" in spend[3]
    with pytest.raises(Forbidden):  # without its scope: refused here, no Redis
        authorizer.command(key, Scope.catalogue_write)
    clock.now += 1.0
    assert authorizer.command(key, scope)[1] == Authorizer._SHA  # the TTL is up: asked again


def test_a_rate_limited_known_key_is_remembered_and_still_limited():
    authorizer = _authorizer(KeyVerdicts(1.0, clock=Clock()))
    key = "rsk_" + "r" * 43
    with pytest.raises(RateLimited):
        authorizer.judge([3, 250, "admin", "5", "10"], Scope.events_write, key)
    assert authorizer.command(key, Scope.events_write)[1] == Authorizer._SPEND_SHA  # admin has every scope
    with pytest.raises(RateLimited):
        authorizer.judge([3, 100], Scope.events_write, key)  # the bucket's own reply: still exact


def test_without_the_cache_every_request_looks_the_key_up():
    authorizer = _authorizer(None)
    key = "rsk_" + "n" * 43
    authorizer.judge([0, 0, "recs:read", "5", "10"], Scope.recs_read, key)
    assert authorizer.command(key, Scope.recs_read)[1] == Authorizer._SHA


class FakePubSub:
    """Messages as redis-py's PubSub gives them; ``stop`` is set once they are all taken."""

    def __init__(self, messages, stopping, fail_first=False):
        self.messages, self.stopping, self.fail_first, self.channels = list(messages), stopping, fail_first, []

    def subscribe(self, channel):
        if self.fail_first:
            self.fail_first = False
            raise redis.ConnectionError("Redis away")
        self.channels.append(channel)

    def get_message(self, timeout):
        if not self.messages:
            self.stopping.set()
            return None
        return self.messages.pop(0)

    def close(self):
        pass


class FakeClient:
    def __init__(self, pubsubs):
        self.pubsubs = list(pubsubs)

    def pubsub(self, ignore_subscribe_messages):
        return self.pubsubs.pop(0)


def test_a_revocation_message_drops_the_key_and_a_reconnect_forgets_every_key():
    verdicts, stopping = KeyVerdicts(60, clock=Clock()), threading.Event()
    for sha in ("revoked", "kept", "other"):
        verdicts.put(sha, READER)

    class Remembering(FakePubSub):
        def get_message(self, timeout):  # a key remembered after the subscription
            if not verdicts.get("kept"):
                verdicts.put("kept", READER)
            return super().get_message(timeout)
    pubsub = Remembering([{"type": "message", "data": "revoked"}, {"type": "pong", "data": "other"}], stopping)
    follow_revocations(FakeClient([pubsub]), "p-auth", verdicts, stopping)
    assert pubsub.channels == ["p-auth:revoked"]
    # The subscription forgot what was remembered before it (messages may have been missed); the
    # message dropped its key; a key remembered since stays.
    assert verdicts.get("revoked") is None and verdicts.get("other") is None and verdicts.get("kept") == READER

    verdicts.put("x", READER)
    stopping.clear()
    flaky = FakePubSub([], stopping, fail_first=True)
    again = FakePubSub([{"type": "message", "data": "x"}], stopping)
    follow_revocations(FakeClient([flaky, again]), "p-auth", verdicts, stopping, retry_s=0)
    assert again.channels == ["p-auth:revoked"] and len(verdicts) == 0


# ---- the settings that switch the levers, and the bench's budget ------------------------------

def test_the_levers_are_on_by_default_and_each_switches_off():
    sv = Settings().serving
    assert (sv.impressions_flush_ms, sv.impressions_sample, sv.trending_cache_s, sv.key_cache_s, sv.tower_batch) == \
        (100.0, 1.0, 1.0, 1.0, True)
    for setting in LEVERS.values():
        off = Settings(serving=setting).serving
        assert all(getattr(off, k) == v for k, v in setting.items())
    with pytest.raises(ValueError):
        Settings(serving={"impressions_batch_max": 5000})  # more than a record's places
    with pytest.raises(ValueError):
        Settings(serving={"impressions_sample": 0})  # impressions stay on


def test_the_lever_variants_are_all_off_then_each_alone_on():
    variants = lever_variants()
    assert variants["c-none"] == {"impressions_flush_ms": 0.0, "trending_cache_s": 0.0, "key_cache_s": 0.0,
                                  "tower_batch": False}
    assert variants["c+trending_cache"] == {"impressions_flush_ms": 0.0, "key_cache_s": 0.0, "tower_batch": False}
    assert set(variants) == {"c-none", *(f"c+{name}" for name in LEVERS)}
    assert lever_settings(Settings())["trending_cache_s"] == 1.0


def _variant(rps: float, cpu: float, p99: float = 50.0) -> dict:
    return {"rps": rps, "p99_ms": p99, "cpu_ms_per_request": cpu, "personal_share": 1.0, "errors": 0}


def test_cpu_per_request_of_c_is_judged_against_b_in_the_same_run():
    variants = {"a": _variant(200, 8.0, 150), "b": _variant(1000, 1.5), "c": _variant(820, 1.95), "d": _variant(1000, 1.8)}
    verdict = judge(variants)
    assert verdict["ratios"]["c/b cpu_ms_per_request"] == 1.3 and verdict["passed"]["c/b cpu_ms_per_request"]
    assert verdict["targets"]["c/b cpu_ms_per_request"] == "<= 1.3"
    assert verdict["cpu_ms_per_request"] == {"a": 8.0, "b": 1.5, "c": 1.95, "d": 1.8}
    assert verdict["pass"]
    variants["c"] = _variant(820, 1.96)  # 1.307 x b's
    verdict = judge(variants)
    assert not verdict["passed"]["c/b cpu_ms_per_request"] and not verdict["pass"]
    # Issue 32's run: c at 3.03 CPU-ms against b's 1.59 misses the budget.
    issue = {"a": _variant(198, 8.59, 156), "b": _variant(968, 1.59, 51), "c": _variant(474, 3.03, 84),
             "d": _variant(649, 2.00, 102)}
    assert judge(issue)["ratios"]["c/b cpu_ms_per_request"] == 1.906 and not judge(issue)["passed"]["c/b cpu_ms_per_request"]


class _Tower:
    """A servable model's tower that records each call's batch: row i's embedding is [i's id]."""

    def __init__(self, version: str, fail: bool = False):
        self.version, self.calls, self.fail = version, [], fail

    def user_embedding(self, users):
        self.calls.append([u for u in users])
        if self.fail:
            raise RuntimeError("tower broke")
        return np.array([[float(u)] for u in users])


def _gather(batcher, requests):
    async def run():
        return await asyncio.gather(*(batcher.embed(m, u) for m, u in requests), return_exceptions=True)
    return asyncio.run(run())


def test_requests_of_one_loop_turn_share_a_tower_call_per_model_and_get_their_own_rows():
    from serving.recommend import TowerBatcher
    old, new = _Tower("v1"), _Tower("v2")
    got = _gather(TowerBatcher(max_size=16), [(old, 1), (new, 2), (old, 3), (old, 4)])
    assert old.calls == [[1, 3, 4]] and new.calls == [[2]]  # a swap's batch: each version its own call
    assert [g.tolist() for g in got] == [[[1.0]], [[2.0]], [[3.0]], [[4.0]]]


def test_a_full_batch_runs_at_once_and_the_rest_waits_for_its_own_turn():
    from serving.recommend import TowerBatcher
    tower = _Tower("v1")
    started = time.monotonic()
    got = _gather(TowerBatcher(max_size=3, wait_s=0.2), [(tower, u) for u in range(7)])
    assert tower.calls == [[0, 1, 2], [3, 4, 5], [6]] and [g.item() for g in got] == list(range(7))
    assert 0.15 <= time.monotonic() - started < 5  # the last, partial batch waited its time


def test_a_tower_error_reaches_every_request_of_its_batch_and_the_next_batch_works():
    from serving.recommend import TowerBatcher
    batcher, broken = TowerBatcher(), _Tower("v1", fail=True)
    got = _gather(batcher, [(broken, 1), (broken, 2)])
    assert all(isinstance(g, RuntimeError) for g in got) and broken.calls == [[1, 2]]
    fine = _Tower("v2")
    assert [g.tolist() for g in _gather(batcher, [(fine, 5)])] == [[[5.0]]]


def test_the_request_paths_redis_commands_are_packed_as_redis_py_packs_them():
    from redis.asyncio import Connection
    from recsys.feature_store import HiredisPackedConnection
    commands = [("EVALSHA", "ab12", 2, "k:1", "k:2", "recs:read", 100.5, 200), ("LRANGE", "u:recent", 0, -1),
                ("SCRIPT LOAD", "return 1"), ("HGETALL", "é")]
    ours, theirs = HiredisPackedConnection(), Connection()
    assert b"".join(ours.pack_commands(commands)) == b"".join(theirs.pack_commands(commands))
    assert b"".join(ours.pack_command(*commands[0])) == b"".join(theirs.pack_command(*commands[0]))
    with pytest.raises(redis.DataError):
        ours.pack_command("SET", "k", None)
