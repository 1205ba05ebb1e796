"""Issue 2 acceptance: events through the real Kafka broker into the real Redis server."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict

import pyarrow.parquet as pq
import pytest
import redis
from kafka import KafkaAdminClient
from kafka.errors import KafkaError

from recsys.archive import read_events
from recsys.events import Event
from recsys.feature_store import FeatureStore
from recsys.privacy import Pseudonyms
from recsys.kafka_io import producer, replay
from recsys.sources import MovieLensSource
from recsys.stream import read_dead_letters


def expected_from_u_data(path):
    """Counts, seen sets and last-50 lists straight from u.data, in (time, file line) order."""
    rows = [line.split("\t") for line in open(path / "u.data")]
    order = sorted(range(len(rows)), key=lambda i: (int(rows[i][3]), i))
    users, items, recent = Counter(), Counter(), defaultdict(list)
    for i in order:
        user, item = rows[i][0], rows[i][1]
        users[user] += 1
        items[item] += 1
        recent[user].append(item)
    return users, items, {u: set(lst) for u, lst in recent.items()}, {u: list(reversed(lst[-50:])) for u, lst in recent.items()}


def assert_features_match(settings, ml100k, pseudonymized: bool = False):
    """Redis holds exactly u.data's features; ``pseudonymized``: under the users' pseudonyms
    (events that came in through ``recsys replay``, an edge)."""
    users, items, seen, recent = expected_from_u_data(ml100k)
    store = FeatureStore(settings)
    stored_id = Pseudonyms.of(settings).user_id if pseudonymized else str
    raw = sorted(users)
    got = store.users([stored_id(u) for u in raw])
    mismatched = [u for u, f in zip(raw, got)
                  if f.counts != {"rating": users[u]} or f.recent != recent[u] or f.seen != seen[u]]
    assert not mismatched, f"{len(mismatched)} users differ, e.g. {mismatched[:5]}"
    pipe = store.redis.pipeline(transaction=False)
    for item in sorted(items):
        pipe.hgetall(store.keys.item(item))
    item_counts = dict(zip(sorted(items), pipe.execute()))
    wrong = [i for i, c in item_counts.items() if c != {"rating": str(items[i])}]
    assert not wrong, f"{len(wrong)} items differ, e.g. {wrong[:5]}"
    assert sum(store.redis.zcard(key) for key in store.keys.trending) == len(items)


def committed(settings) -> int:
    admin = KafkaAdminClient(bootstrap_servers=settings.kafka.servers)
    try:
        offsets = admin.list_group_offsets(settings.kafka.stream_group).get(settings.kafka.stream_group, {})
        return sum(o.offset for o in offsets.values() if o.offset > 0)
    finally:
        admin.close()


def stream_json(proc_or_result) -> dict:
    return json.loads(proc_or_result.stdout.strip().splitlines()[-1])


def test_movielens_replay_counts_exact(scratch, ml100k):
    out = scratch.cli("replay", "--source", f"movielens:{ml100k}", "--quiet")
    assert stream_json(out)["produced"] == 100_000
    stats = stream_json(scratch.cli("stream", "--until-idle", "3"))
    assert stats == {"consumed": 100_000, "applied": 100_000, "duplicates": 0, "dlq": 0}
    assert_features_match(scratch.settings, ml100k, pseudonymized=True)
    # The documented reading command shows the same thing (it takes the client's id).
    user = json.loads(scratch.cli("features", "user", "1", "--json").stdout)
    assert user["counts"]["rating"] == 272 and len(user["recent"]) == 50 and len(user["seen"]) == 272


def test_sigkill_midway_loses_and_doubles_nothing(scratch, ml100k):
    replay(MovieLensSource(ml100k).events_iter(), scratch.settings, progress=False)
    worker = scratch.popen("stream")
    deadline = time.monotonic() + 120
    while committed(scratch.settings) < 20_000:
        assert worker.poll() is None, worker.stderr.read()
        assert time.monotonic() < deadline, "the worker made no progress"
        time.sleep(0.1)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    done = committed(scratch.settings)
    assert done < 100_000, "killed too late to test anything"
    stats = stream_json(scratch.cli("stream", "--until-idle", "3"))
    assert stats["consumed"] + done >= 100_000
    assert_features_match(scratch.settings, ml100k)


def test_replaying_the_same_events_changes_nothing(scratch, ml100k):
    events = list(MovieLensSource(ml100k).events_iter())[:20_000]
    replay(events, scratch.settings, progress=False)
    first = stream_json(scratch.cli("stream", "--until-idle", "2"))
    store = FeatureStore(scratch.settings)
    users = sorted({e.user_id for e in events})
    before = [u.to_json() for u in store.users(users)]
    trending_before = store.trending(2000)
    replay(events, scratch.settings, progress=False)
    second = stream_json(scratch.cli("stream", "--until-idle", "2"))
    assert first["applied"] == 20_000 and second == {"consumed": 20_000, "applied": 0, "duplicates": 20_000, "dlq": 0}
    assert [u.to_json() for u in store.users(users)] == before
    assert store.trending(2000) == trending_before


def test_poison_records_go_to_the_dead_letter_topic(scratch):
    good = {"user_id": "u1", "item_id": "i1", "type": "click", "ts": 1_700_000_000_000}
    records = [
        json.dumps({**good, "event_id": "ok-1"}).encode(),
        b"{not json",
        json.dumps({"event_id": "bad-missing", "user_id": "u1", "type": "click", "ts": 1}).encode(),
        json.dumps({**good, "event_id": "bad-type", "ts": "yesterday"}).encode(),
        json.dumps({**good, "event_id": "bad-kind", "type": "teleport"}).encode(),
        json.dumps({**good, "event_id": "ok-2", "item_id": "i2"}).encode(),
    ]
    prod = producer(scratch.settings)
    for value in records:
        prod.send(scratch.settings.kafka.events_topic, key=b"u1", value=value)
    prod.flush()
    prod.close()
    stats = stream_json(scratch.cli("stream", "--until-idle", "2"))
    assert stats == {"consumed": 6, "applied": 2, "duplicates": 0, "dlq": 4}
    assert FeatureStore(scratch.settings).user("u1").recent == ["i2", "i1"]
    dead = read_dead_letters(scratch.settings)
    assert sorted(d["value"] for d in dead) == sorted(records[1:5])
    reasons = {d["value"]: d["reason"] for d in dead}
    assert "not JSON" in reasons[records[1]]
    assert "item_id" in reasons[records[2]]
    assert "ts" in reasons[records[3]]
    assert "type" in reasons[records[4]]
    assert all(d["topic"] == scratch.settings.kafka.events_topic and d["offset"].isdigit() for d in dead)


def test_archive_holds_each_event_once_after_sigkill(scratch, ml100k):
    events = list(MovieLensSource(ml100k).events_iter())
    replay(events, scratch.settings, progress=False)
    ledger = scratch.settings.archive_dir / "_ledger"
    archiver = scratch.popen("archive")
    deadline = time.monotonic() + 120
    while not (ledger.exists() and len(list(ledger.iterdir())) >= 2):
        assert archiver.poll() is None, archiver.stderr.read()
        assert time.monotonic() < deadline, "the archiver wrote nothing"
        time.sleep(0.05)
    archiver.send_signal(signal.SIGKILL)
    archiver.wait()
    partial = read_events(scratch.settings).num_rows
    assert 0 < partial < 100_000, f"killed at {partial} archived events: nothing to recover"
    scratch.cli("archive", "--until-idle", "3")
    # The files themselves, not read_events (which also drops repeated event ids).
    files = sorted(scratch.settings.archive_dir.glob("day=*/*.parquet"))
    ids = pq.ParquetDataset(files).read(columns=["event_id"])["event_id"].to_pylist()
    table = read_events(scratch.settings)
    assert len(ids) == len(set(ids)) == 100_000
    assert set(ids) == {e.event_id for e in events}
    ts = table["ts"].to_pylist()
    assert ts == sorted(ts)
    assert all(p.name.startswith("day=") for p in scratch.settings.archive_dir.iterdir() if p.name != "_ledger")


def test_archive_reader_keeps_one_copy_of_an_event_sent_twice(scratch, ml100k):
    events = list(MovieLensSource(ml100k).events_iter())[:300]
    replay(events, scratch.settings, progress=False)
    replay(events[:100], scratch.settings, progress=False)  # a producer's retry
    stats = json.loads(scratch.cli("archive", "--until-idle", "2").stdout)
    assert stats["archived"] == 400
    ids = read_events(scratch.settings)["event_id"].to_pylist()
    assert sorted(ids) == sorted(e.event_id for e in events)


@contextlib.contextmanager
def worker_holding_a_batch_without_redis(scratch, events, *worker_args):
    """A stream worker joins its group, Redis stops, the events arrive: the worker holds a batch
    it cannot apply. Redis starts again when the block ends."""
    from lab import stack
    worker = scratch.popen("stream", *worker_args)
    time.sleep(3)  # joined the group
    stack.stop_redis(scratch.settings)
    try:
        replay(events, scratch.settings, progress=False)
        time.sleep(3)
        assert worker.poll() is None, worker.stderr.read()
        yield worker
    finally:
        stack.start_redis(scratch.settings, progress=lambda *_: None)


def test_worker_rides_out_a_redis_restart(scratch, ml100k):
    events = list(MovieLensSource(ml100k).events_iter())[:5000]
    with worker_holding_a_batch_without_redis(scratch, events, "--until-idle", "5") as worker:
        pass
    out, err = worker.communicate(timeout=120)
    assert worker.returncode == 0, err
    assert "Redis unavailable" in err
    assert json.loads(out.strip().splitlines()[-1])["applied"] == 5000
    store = FeatureStore(scratch.settings)
    users = Counter(e.user_id for e in events)
    assert {u.user_id: u.counts.get("rating") for u in store.users(sorted(users))} == dict(users)


def _free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _consumer_metrics(port: int, group: str) -> dict:
    """The consumer's assignment metrics as the worker's Prometheus endpoint serves them."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples
            if s.labels.get("group") == group}


def _wait_for_metric(worker, port: int, group: str, name: str, minimum: float, timeout_s: float = 60) -> dict:
    import httpx
    deadline = time.monotonic() + timeout_s
    while True:
        assert worker.poll() is None, worker.communicate()[1][-2000:]
        assert time.monotonic() < deadline, f"{name} never reached {minimum}"
        try:
            metrics = _consumer_metrics(port, group)
            if metrics.get(name, -1) >= minimum:
                return metrics
        except httpx.HTTPError:
            pass  # the endpoint is not up yet
        time.sleep(0.2)


def test_worker_without_partitions_recreates_its_consumer_then_exits_nonzero(scratch):
    """The bound on waiting for partitions: a worker whose topic is gone never gets any; it shows
    that as a metric, recreates its consumer once after the timeout, and then exits 69 (unavailable) with a message."""
    from lab import stack
    stack.delete_topics(scratch.settings)
    port = _free_port()
    env = {**scratch.env, "RECSYS_KAFKA_ASSIGNMENT_TIMEOUT_S": "3", "RECSYS_KAFKA_RECREATE_ATTEMPTS": "1"}
    worker = subprocess.Popen([sys.executable, "-m", "cli", "stream", "--metrics-port", str(port)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    group = scratch.settings.kafka.stream_group
    waiting = _wait_for_metric(worker, port, group, "recsys_consumer_unassigned_seconds", 1.0)
    assert waiting["recsys_consumer_assigned_partitions"] == 0
    out, err = worker.communicate(timeout=120)
    assert worker.returncode == 69, err[-2000:]
    assert "no partitions assigned for 3 s; recreating it (attempt 1 of 1)" in err
    assert "recsys stream: no partitions assigned for 3 s, also after recreating the consumer 1 time(s)" in err
    assert out == ""


def test_worker_recreated_after_a_missing_topic_comes_back_consumes_everything(scratch, ml100k):
    """Joined while the topic is unavailable, recreated after the timeout, then it works: every
    event applied. The worker runs until SIGTERM (not --until-idle, which could end it between
    its assignment and the replay on a busy machine)."""
    from lab import stack
    stack.delete_topics(scratch.settings)
    port = _free_port()
    env = {**scratch.env, "RECSYS_KAFKA_ASSIGNMENT_TIMEOUT_S": "3", "RECSYS_KAFKA_RECREATE_ATTEMPTS": "100"}
    worker = subprocess.Popen([sys.executable, "-m", "cli", "stream", "--metrics-port", str(port)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        group = scratch.settings.kafka.stream_group
        _wait_for_metric(worker, port, group, "recsys_consumer_recreated_total", 1.0)
        stack.ensure_topics(scratch.settings)
        events = list(MovieLensSource(ml100k).events_iter())[:2000]
        replay(events, scratch.settings, progress=False)
        users = Counter(e.user_id for e in events)
        store = FeatureStore(scratch.settings)
        deadline = time.monotonic() + 180
        while sum(u.counts.get("rating", 0) for u in store.users(sorted(users))) < 2000:
            assert worker.poll() is None, worker.communicate()[1][-2000:]
            assert time.monotonic() < deadline, "the recreated worker did not apply the events"
            time.sleep(0.2)
    finally:
        worker.send_signal(signal.SIGTERM)
    out, err = worker.communicate(timeout=60)
    assert worker.returncode == 0, err[-2000:]
    assert "recreating it" in err
    assert json.loads(out.strip().splitlines()[-1])["applied"] == 2000
    assert {u.user_id: u.counts.get("rating") for u in store.users(sorted(users))} == dict(users)


def test_redis_and_memory_stores_hold_the_same_features(scratch):
    """The OnlineFeatures protocol's parity: one event stream (every event type, repeated items,
    and 2,000 duplicate event ids) applied to the Redis store and to the in-memory store that
    builds the training data gives the same features for every user and item, and the same trending."""
    from recsys.features import SEEN_POLICIES, MemoryStore, OnlineFeatures
    from recsys.sources import SyntheticSource
    s = scratch.settings
    events = list(SyntheticSource(events=20_000, users=300, items=200, seed=11).events_iter())
    stores: list[OnlineFeatures] = [FeatureStore(s), MemoryStore(s.redis.prefix, s.features.recent_items, s.features.trending_half_life_s)]
    stream = events + events[:2_000]
    for i in range(0, len(stream), 500):
        applied = [store.apply_events(stream[i:i + 500]) for store in stores]
        assert applied[0] == applied[1]
    users, items = sorted({e.user_id for e in events}), sorted({e.item_id for e in events})
    assert len(users) > 250 and len(items) > 150
    redis_store, memory = stores
    assert [u.to_json() for u in redis_store.users(users)] == [memory.user(u).to_json() for u in users]
    for policy in SEEN_POLICIES.values():  # each seen policy's seen sets (issue 34)
        assert [u.seen for u in redis_store.users(users, policy)] == [memory.user(u, policy).seen for u in users]
    assert sum(len(memory.user(u, SEEN_POLICIES["purchase+rating"]).seen) for u in users) > 0
    assert {i: redis_store.item_counts(i) for i in items} == {i: memory.item_counts(i) for i in items}
    online, offline = redis_store.trending(len(items)), memory.trending(len(items))
    assert [item for item, _ in online] == [item for item, _ in offline]
    assert max(abs(a - b) for (_, a), (_, b) in zip(online, offline)) < 1e-9


def test_request_path_reader_reads_what_the_store_holds(scratch):
    """The replica's asyncio reader (commands written at once, replies read back by hand) gives
    each user's features and the merged trending top exactly as the synchronous store reads
    them; a refused command ahead of them (a key check whose script Redis lost) raises its
    error, and the pool's connection still serves the next read."""
    import asyncio
    from recsys.feature_store import FeatureReader, connect_async
    from recsys.features import SEEN_POLICIES
    from recsys.sources import SyntheticSource
    s = scratch.settings
    store = FeatureStore(s)
    events = list(SyntheticSource(events=3_000, users=50, items=80, seed=5).events_iter())
    store.apply_events(events)
    users = sorted({e.user_id for e in events})

    async def read_all():
        reader = FeatureReader(s, connect_async(s, 2.0, 1))
        got = [await reader.user_and_trending(u, 20) for u in users]
        lenient = [(await reader.user_and_trending(u, 20, filter_types=bought))[0] for u in users]
        with pytest.raises(redis.exceptions.NoScriptError):
            await reader.user_and_trending(users[0], 20, first=("EVALSHA", "0" * 40, 0))
        after = await reader.user_and_trending(users[0], 20, first=("PING",))
        await reader.redis.aclose()
        return got, after, lenient

    bought = SEEN_POLICIES["purchase+rating"]
    got, after, lenient = asyncio.run(read_all())
    assert [user.to_json() for user, _, _ in got] == [u.to_json() for u in store.users(users)]
    assert [u.to_json() for u in lenient] == [u.to_json() for u in store.users(users, bought)]
    assert all(a.seen <= b.seen for a, (b, _, _) in zip(lenient, got)) and any(a.seen < b.seen for a, (b, _, _) in zip(lenient, got))
    assert all(trending == store.trending(20) for _, trending, _ in got)
    assert after[0].to_json() == store.user(users[0]).to_json() and after[2] in ("PONG", b"PONG", True)


def test_a_flood_of_events_for_one_user_keeps_a_bounded_seen_set(scratch):
    """Issue 35 finding 9: any key with events:write could post a million events for a victim's
    id, and every request for that user then read the whole seen set and asked the ANN for that
    many more candidates. Redis keeps the latest ``seen_items`` (by event time, as the memory
    store does, in any order), and a read takes at most that many whatever the key holds."""
    import random

    from recsys.events import Event
    from recsys.features import MemoryStore
    s = scratch.settings.updated(features={"seen_items": 50})
    events = [Event(event_id=f"f{n}", user_id="victim", item_id=f"i{n % 1500}", type="view", ts=10**12 + n)
              for n in range(3000)]
    events = random.Random(5).sample(events, len(events))
    redis_store = FeatureStore(s)
    memory = MemoryStore(s.redis.prefix, s.features.recent_items, s.features.trending_half_life_s, seen_items=50)
    for i in range(0, len(events), 500):
        redis_store.apply_events(events[i:i + 500])
        memory.apply_events(events[i:i + 500])
    seen = redis_store.user("victim").seen
    assert seen == memory.user("victim").seen == {f"i{n % 1500}" for n in range(2950, 3000)}
    assert redis_store.redis.zcard(redis_store.keys.user("victim", "seen_at")) == 50
    redis_store.redis.zadd(redis_store.keys.user("big", "seen_at"), {f"j{n}": n for n in range(5000)})
    assert redis_store.user("big").seen == {f"j{n}" for n in range(4950, 5000)}


def _expected(events):
    """Per user: rating counts, seen set and last-50 list; per item: rating counts. In the
    order sent, which is each user's order in Kafka (keyed by user)."""
    users, items, recent = Counter(), Counter(), defaultdict(list)
    for e in events:
        users[e.user_id] += 1
        items[e.item_id] += 1
        recent[e.user_id].append(e.item_id)
    return users, items, recent


def assert_exact(settings, events):
    users, items, recent = _expected(events)
    store = FeatureStore(settings)
    got = {u.user_id: (u.counts, u.seen, u.recent) for u in store.users(sorted(users))}
    want = {u: ({"rating": users[u]}, set(recent[u]), list(reversed(recent[u][-50:]))) for u in users}
    wrong = [u for u in users if got[u] != want[u]]
    assert not wrong, f"{len(wrong)} users differ, e.g. {wrong[:3]}"
    wrong = [i for i in items if store.item_counts(i) != {"rating": items[i]}]
    assert not wrong, f"{len(wrong)} items differ, e.g. {wrong[:3]}"


def test_sigterm_during_a_redis_outage_commits_nothing_unapplied(scratch, ml100k):
    """Issue 12: a worker stopped while it waits for Redis commits nothing of that batch (before,
    its exit committed the polled position: the batch was lost)."""
    events = list(MovieLensSource(ml100k).events_iter())[:5000]
    with worker_holding_a_batch_without_redis(scratch, events) as worker:
        worker.send_signal(signal.SIGTERM)
        out, err = worker.communicate(timeout=60)
        assert worker.returncode == 0, err
        assert "Redis unavailable" in err
        assert committed(scratch.settings) == 0, "offsets of unapplied events were committed"
    stats = stream_json(scratch.cli("stream", "--until-idle", "3"))
    assert stats["applied"] == 5000
    assert_exact(scratch.settings, events)


def test_a_redis_error_that_is_not_a_connection_error_commits_nothing_unapplied(scratch, ml100k):
    """A key of the wrong type makes Redis refuse one event's writes (a ResponseError): the
    worker exits non-zero without committing that batch, and that event's dedup marker is
    taken back. Once the key is fixed, a rerun makes the features exact."""
    events = list(MovieLensSource(ml100k).events_iter())[:3000]
    store = FeatureStore(scratch.settings)
    victim = events[1234].user_id
    store.redis.set(store.keys.user(victim, "recent"), "not a list")
    replay(events, scratch.settings, progress=False)
    failed = subprocess.run([sys.executable, "-m", "cli", "stream", "--until-idle", "3"], env=scratch.env,
                            capture_output=True, text=True, timeout=120)
    assert failed.returncode != 0 and "WRONGTYPE" in failed.stderr, failed.stderr[-2000:]
    assert committed(scratch.settings) < 3000
    store.redis.delete(store.keys.user(victim, "recent"))
    stats = stream_json(scratch.cli("stream", "--until-idle", "3"))
    assert stats["applied"] >= 1  # at least the victim's event, whose marker was taken back
    assert_exact(scratch.settings, events)


def _good_and_poison_without_a_dead_letter_topic(s):
    """The dead-letter topic deleted, then 200 good events with a poison record after every
    seventh in the events topic: (the good events, the poison records)."""
    from lab import stack
    with stack.kafka_admin(s) as admin:
        admin.delete_topics([s.kafka.dlq_topic])
    good = [{"event_id": f"ok-{n}", "user_id": f"u{n % 7}", "item_id": f"i{n}", "type": "click",
             "ts": 1_700_000_000_000 + n} for n in range(200)]
    poison = [b"{not json %d" % n for n in range(0, 200, 7)]
    prod = producer(s)
    for n, event in enumerate(good):
        prod.send(s.kafka.events_topic, key=event["user_id"].encode(), value=json.dumps(event).encode())
        if n % 7 == 0:
            prod.send(s.kafka.events_topic, key=event["user_id"].encode(), value=b"{not json %d" % n)
    prod.flush()
    prod.close()
    return good, poison


def test_an_unwritable_dead_letter_topic_holds_the_commit_until_it_is_back(scratch):
    """The dead-letter topic gone: the worker keeps trying, commits nothing meanwhile, and once
    the topic is back every poison record is in it and every good event in Redis."""
    from lab import stack
    s = scratch.settings
    good, poison = _good_and_poison_without_a_dead_letter_topic(s)
    worker = scratch.popen("stream")
    try:
        time.sleep(12)  # joined, applied the good events, failing on the dead letters
        assert worker.poll() is None, worker.stderr.read()
        assert committed(s) == 0, "offsets committed before their dead letters were written"
        stack.ensure_topics(s)
        deadline = time.monotonic() + 90
        while committed(s) < len(good) + len(poison):
            assert worker.poll() is None, worker.stderr.read()
            assert time.monotonic() < deadline, f"committed {committed(s)} of {len(good) + len(poison)}"
            time.sleep(0.5)
    finally:
        worker.send_signal(signal.SIGTERM)
        out, err = worker.communicate(timeout=60)
    assert "dead-letter topic unavailable" in err
    dead = read_dead_letters(s)
    assert sorted({d["value"] for d in dead}) == sorted(poison)
    assert all(d["consumer"] == s.kafka.stream_group for d in dead)
    store = FeatureStore(s)
    assert sum(u.counts.get("click", 0) for u in store.users([f"u{n}" for n in range(7)])) == len(good)


def test_random_bytes_and_json_among_valid_traffic_all_land_in_the_dead_letter_topic(scratch):
    """Fuzz (issue 12): 1,000 random byte strings and random JSON values mixed into valid traffic.
    The stream worker and the archiver keep running to the end, the valid events are exact in
    Redis and in the archive, and every bad record is in the dead-letter topic (once per
    consumer group that rejected it)."""
    import random
    s = scratch.settings
    rng = random.Random(12)
    now_ms = int(time.time() * 1000)

    def random_json():
        pick = rng.randrange(6)
        if pick == 0:
            return rng.choice([None, True, 3, -1.5, "text", [], {}])
        if pick == 1:  # a valid-looking event with one field wrong
            event = {"event_id": "f", "user_id": "u", "item_id": "i", "type": "view", "ts": now_ms}
            key = rng.choice(list(event))
            event[key] = rng.choice([None, "", 10**15, -5, "x" * 300, [1], {"a": 1}, float("nan")])
            return event
        if pick == 2:
            return {"ts": rng.choice([10**15, 1, -1]), "event_id": "e", "user_id": "u", "item_id": "i", "type": "view"}
        if pick == 3:
            return {"event_id": "e", "user_id": "u", "item_id": "i", "type": "rating", "value": float("inf"), "ts": now_ms}
        return [rng.random() for _ in range(rng.randrange(5))]

    bad = []
    for n in range(1000):
        if n % 2:
            bad.append(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64))))
        else:
            bad.append(json.dumps(random_json()).encode())
    good = [{"event_id": f"ok-{n}", "user_id": f"u{n % 50}", "item_id": f"i{n % 90}", "type": "rating",
             "value": 4.0, "ts": now_ms - 10_000 + n} for n in range(3000)]
    prod = producer(s)
    stream = [json.dumps(e).encode() for e in good] + bad
    rng.shuffle(stream)
    for value in stream:
        prod.send(s.kafka.events_topic, key=b"k%d" % rng.randrange(8), value=value)
    prod.flush()
    prod.close()
    stats = stream_json(scratch.cli("stream", "--until-idle", "3"))
    assert stats == {"consumed": 4000, "applied": 3000, "duplicates": 0, "dlq": 1000}
    archived = json.loads(scratch.cli("archive", "--until-idle", "3").stdout.strip().splitlines()[-1])
    assert archived["archived"] == 3000 and archived["dlq"] == 1000
    dead = read_dead_letters(s)
    for group in (s.kafka.stream_group, s.kafka.archive_group):
        mine = sorted(d["value"] for d in dead if d["consumer"] == group)
        assert mine == sorted(bad), group
    store = FeatureStore(s)
    want = Counter(e["user_id"] for e in good)
    assert {u.user_id: u.counts.get("rating") for u in store.users(sorted(want))} == dict(want)
    assert sorted(read_events(s).column("event_id").to_pylist()) == sorted(e["event_id"] for e in good)


def _snapshot(settings, users, items):
    store = FeatureStore(settings)
    return ([u.to_json() for u in store.users(users)], [store.item_counts(i) for i in items])


def test_redis_lost_with_its_files_is_rebuilt_exactly_from_the_archive(scratch, ml100k):
    """Issue 12: kill -9 Redis and delete its data files, `recsys features rebuild`, then the
    stream worker catches up: every MovieLens-100K user's and item's features equal those from
    before the crash. The stream ran ahead of the archive (the last 30,000 events were in Redis
    only), so the rebuild must also move the worker's group back to the archive's end."""
    import shutil

    from lab import stack
    s = scratch.settings
    events = list(MovieLensSource(ml100k).events_iter())
    replay(events[:70_000], s, progress=False)
    scratch.cli("archive", "--until-idle", "3")
    replay(events[70_000:], s, progress=False)
    stats = stream_json(scratch.cli("stream", "--until-idle", "3"))
    assert stats["applied"] == 100_000
    users, items = sorted({e.user_id for e in events}), sorted({e.item_id for e in events})
    before = _snapshot(s, users, items)
    os.kill(stack.running_pid(s, "redis"), signal.SIGKILL)
    time.sleep(0.5)
    shutil.rmtree(stack.service_dir(s, "redis"))
    stack.start_redis(s, progress=lambda *_: None)
    assert FeatureStore(s).redis.dbsize() == 0, "Redis came back with data"
    rebuilt = stream_json(scratch.cli("features", "rebuild", "--json"))
    assert rebuilt["events"] == 70_000 and rebuilt["applied"] == 70_000
    caught_up = stream_json(scratch.cli("stream", "--until-idle", "3"))
    assert caught_up["applied"] == 30_000 and caught_up["duplicates"] == 0
    assert _snapshot(s, users, items) == before


def test_replaying_the_whole_topic_from_offset_zero_changes_nothing_without_markers(scratch, ml100k):
    """Issue 12: the applied offsets make a replay of the topic exact however old its events:
    here the event-id markers are gone (as after their TTL) and the group starts from 0 again."""
    s = scratch.settings
    events = list(MovieLensSource(ml100k).events_iter())[:20_000]
    replay(events, s, progress=False)
    scratch.cli("stream", "--until-idle", "3")
    users, items = sorted({e.user_id for e in events}), sorted({e.item_id for e in events})
    before = _snapshot(s, users, items)
    store = FeatureStore(s)
    markers = list(store.redis.scan_iter(match=f"{store.keys.prefix}:dedup:*", count=5000))
    assert len(markers) == 20_000
    for i in range(0, len(markers), 5000):
        store.redis.delete(*markers[i:i + 5000])
    replay_group = {**scratch.env, "RECSYS_KAFKA_STREAM_GROUP": s.kafka.stream_group + "-replay"}
    again = stream_json(subprocess.run([sys.executable, "-m", "cli", "stream", "--until-idle", "3"], env=replay_group,
                                       capture_output=True, text=True, check=True))
    assert again == {"consumed": 20_000, "applied": 0, "duplicates": 20_000, "dlq": 0}
    assert _snapshot(s, users, items) == before


def test_a_rebuild_while_the_archiver_writes_applies_every_event_once(scratch, ml100k, monkeypatch):
    """Issue 35: the archiver runs on during a rebuild. Here it archives a whole backlog right
    after the rebuild read partition 0's log: once the stream worker has caught up, every event
    is applied once (before, the group moved past what was archived meanwhile, for good)."""
    from recsys import rebuild
    s = scratch.settings
    events = list(MovieLensSource(ml100k).events_iter())[:6000]
    replay(events[:4000], s, progress=False)
    scratch.cli("archive", "--until-idle", "2")
    replay(events[4000:], s, progress=False)
    assert stream_json(scratch.cli("stream", "--until-idle", "2"))["applied"] == 6000
    read_log = rebuild.read_partition_log
    archived_meanwhile = []

    def archiver_writes_meanwhile(*args, **kw):
        log = read_log(*args, **kw)
        if not archived_meanwhile:
            archived_meanwhile.append(stream_json(scratch.cli("archive", "--until-idle", "2"))["archived"])
        return log

    monkeypatch.setattr(rebuild, "read_partition_log", archiver_writes_meanwhile)
    rebuilt = rebuild.rebuild_features(s, progress=lambda *_: None)
    # All but partition 0's share of the 2,000 (its log was read before they were archived).
    assert archived_meanwhile == [2000] and 4000 < rebuilt["applied"] < 6000
    caught_up = stream_json(scratch.cli("stream", "--until-idle", "2"))
    assert caught_up["applied"] == 6000 - rebuilt["applied"] and caught_up["duplicates"] == 0
    assert_exact(s, events)


def test_a_rebuild_keeps_the_online_state_and_the_retraining_lock(scratch):
    """Issue 35: a rebuild clears the online features only: the online A/B counters, the arms'
    applied offsets, the guardrail's stop, the impressions and verdicts, and the scheduler's
    lock (all under the same prefix) stay as they were."""
    from recsys.attribution import OnlineKeys
    from recsys.rebuild import rebuild_features
    from training.scheduler import RunLock
    s = scratch.settings
    store, online = FeatureStore(s), OnlineKeys(s.redis.prefix)
    kept = {online.shown("u1"): {"i1": "1|r1|v1|current|0"}, online.attributed("u1"): {"e1": "3|click"},
            online.arm("v1|current"): {"lists": "7", "@impressions:0": "41"}, online.arms: {"v1|current": "1"},
            online.guardrail: {"stopped": "v2"}}
    for key, fields in kept.items():
        store.redis.hset(key, mapping=fields)
    lock = RunLock(s).key
    store.redis.set(lock, "host:1:abc", px=60_000)
    store.apply_events([Event(event_id="e1", user_id="u1", item_id="i1", type="click", ts=1_700_000_000_000)],
                       [(s.kafka.events_topic, 0, 0)])
    assert store.user("u1").counts == {"click": 1}
    rebuilt = rebuild_features(s, progress=lambda *_: None)
    assert {key: store.redis.hgetall(key) for key in kept} == kept
    assert store.redis.get(lock) == "host:1:abc"
    assert rebuilt["cleared_keys"] >= 5 and store.user("u1").counts == {}
    assert [k for pattern in store.keys.feature_patterns() for k in store.redis.scan_iter(match=pattern)] == []


def test_a_retry_judged_before_a_crash_is_still_a_retry_after_its_marker_expired(scratch):
    """Issue 35: e1 applied; its retry lands at a new offset, the user script judges it a retry
    and the worker dies before the item scripts; it comes back after e1's marker expired. The
    replay must not count e1 twice on the item's side (before, the item scripts were told "apply")."""
    from recsys.feature_store import SentEvents
    from recsys.features import MemoryStore
    s = scratch.settings
    store, topic = FeatureStore(s), s.kafka.events_topic
    e1 = Event(event_id="e1", user_id="u1", item_id="i1", type="click", ts=1_700_000_000_000)
    other = Event(event_id="e2", user_id="u1", item_id="i2", type="view", ts=1_700_000_000_500)
    assert store.apply_events([e1, other], [(topic, 0, 10), (topic, 0, 11)]) == [True, True]
    assert SentEvents(store, [e1], [(topic, 0, 500)]).user_verdicts() == [0]  # then the crash
    assert store.redis.delete(store.keys.dedup("u1", "e1")) == 1  # the marker expired meanwhile
    assert store.apply_events([e1], [(topic, 0, 500)]) == [False]  # the replay
    memory = MemoryStore(s.redis.prefix, s.features.recent_items, s.features.trending_half_life_s)
    memory.apply_events([e1, other])
    assert [store.item_counts(i) for i in ("i1", "i2")] == [memory.item_counts(i) for i in ("i1", "i2")]
    online, offline = store.trending(2), memory.trending(2)
    assert [i for i, _ in online] == [i for i, _ in offline]
    assert [w for _, w in online] == pytest.approx([w for _, w in offline], rel=1e-12)
    assert store.user("u1").to_json() == memory.user("u1").to_json()
    # Once the item scripts ran, the retry's mark is gone: the user's group holds no more than before.
    assert sorted(store.redis.hkeys(store.keys.user("u1", "counts"))) == ["@" + f"{topic}:0", "click", "view"]


def test_an_archiver_rebalanced_with_rows_in_hand_writes_each_row_once(scratch, ml100k):
    """Issue 35: an archiver holds polled rows, unwritten, when a second member joins and later
    leaves: each rebalance drops the rows of the partitions it revokes (they are polled again
    from the ledger), so every event is stored once (before, the rows polled again were written
    beside the ones kept, and the stored count was too high)."""
    import threading

    from prometheus_client import REGISTRY

    from recsys.archive import run_archiver, stored_events
    s = scratch.settings
    events = list(MovieLensSource(ml100k).events_iter())[:3000]
    replay(events, s, progress=False)
    stop_first, first_stats = threading.Event(), []
    first = threading.Thread(target=lambda: first_stats.append(
        run_archiver(s, flush_records=10**6, flush_seconds=3600, stopping=stop_first)))
    first.start()
    try:
        def lag(p):
            return REGISTRY.get_sample_value("recsys_consumer_lag", {
                "group": s.kafka.archive_group, "topic": s.kafka.events_topic, "partition": str(p)})
        deadline = time.monotonic() + 60
        while [lag(p) for p in range(s.kafka.events_partitions)] != [0.0] * s.kafka.events_partitions:
            assert first.is_alive() and time.monotonic() < deadline, "the first archiver did not poll every event"
            time.sleep(0.2)
        assert stored_events(s.archive_dir) == 0  # all 3,000 in its hands, none written
        second = run_archiver(s, until_idle=2)  # joins, takes half, writes it, leaves
        assert 0 < second["archived"] < 3000
    finally:
        stop_first.set()
        first.join(timeout=60)
    assert first_stats and first_stats[0]["archived"] + second["archived"] == 3000
    assert stored_events(s.archive_dir) == 3000
    assert sorted(read_events(s).column("event_id").to_pylist()) == sorted(e.event_id for e in events)


def test_sigterm_while_the_dead_letter_topic_is_away_ends_soon_and_loses_no_dead_letter(scratch, tmp_path):
    """Issue 35: an archiver stopped while the dead-letter topic is gone exits within a few
    seconds (before, its retry loop ignored SIGTERM, and Kubernetes killed it after 30 s), and
    writes nothing of the batch: run again once the topic is back, it archives every good event
    once and dead-letters every poison record (before, the files went first, and the ledger
    passed poison records that never reached the dead-letter topic)."""
    from lab import stack
    from lab.bench.stream import settings_env
    s = scratch.settings
    good, poison = _good_and_poison_without_a_dead_letter_topic(s)
    log = tmp_path / "archiver.err"
    with open(log, "w") as err:
        archiver = subprocess.Popen([sys.executable, "-m", "cli", "archive"], env=settings_env(s),
                                    stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        deadline = time.monotonic() + 90
        while "dead-letter topic unavailable" not in log.read_text():
            assert archiver.poll() is None, log.read_text()[-2000:]
            assert time.monotonic() < deadline, "the archiver never reached the dead letters"
            time.sleep(0.2)
        stopped_at = time.monotonic()
        archiver.send_signal(signal.SIGTERM)
        archiver.communicate(timeout=40)
        assert time.monotonic() - stopped_at < 20
    finally:
        if archiver.poll() is None:
            archiver.kill()
            archiver.wait()
    stack.ensure_topics(s)
    again = stream_json(scratch.cli("archive", "--until-idle", "2"))
    assert again["archived"] == len(good) and again["dlq"] == len(poison)
    assert sorted(read_events(s).column("event_id").to_pylist()) == sorted(e["event_id"] for e in good)
    assert sorted(d["value"] for d in read_dead_letters(s)) == sorted(poison)


def test_sigterm_while_the_coordinator_is_away_ends_within_the_grace_period(scratch, tmp_path):
    """Issue 35: a stream worker stopped while its group's coordinator does not answer (its one
    broker frozen by SIGSTOP: a private Kafka, not the stack's) exits within Kubernetes' 30 s
    grace: the exit's reads of committed offsets, its commit and its close are bounded (before,
    they waited for the coordinator for ever)."""
    from lab import stack
    from lab.bench.stream import settings_env
    base = scratch.settings
    host, port = base.kafka.bootstrap.rsplit(":", 1)
    s = base.updated(home=tmp_path / "home", kafka={"bootstrap": f"{host}:{int(port) + 40}",
                                                    "controller_port": base.kafka.controller_port + 40})
    stack.start_kafka(s, progress=lambda *_: None)
    broker = stack.running_pid(s, stack.kafka_nodes(s)[0].name)
    worker = None
    try:
        replay([Event(event_id=f"e{n}", user_id=f"u{n % 13}", item_id=f"i{n % 5}", type="view",
                      ts=1_700_000_000_000 + n) for n in range(300)], s, progress=False)
        worker = subprocess.Popen([sys.executable, "-m", "cli", "stream"], env=settings_env(s),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        def done() -> int:
            try:
                return committed(s)
            except KafkaError:  # the new broker's offsets topic not made yet
                return 0
        deadline = time.monotonic() + 90
        while done() < 300:
            assert worker.poll() is None and time.monotonic() < deadline, "the worker applied nothing"
            time.sleep(0.2)
        os.kill(broker, signal.SIGSTOP)
        stopped_at = time.monotonic()
        worker.send_signal(signal.SIGTERM)
        try:
            worker.communicate(timeout=40)
        finally:
            os.kill(broker, signal.SIGCONT)
        assert time.monotonic() - stopped_at < 25
    finally:
        if worker is not None and worker.poll() is None:
            worker.kill()
            worker.wait()
        os.kill(broker, signal.SIGCONT)
        stack.stop_kafka(s)
    assert sum(u.counts.get("view", 0) for u in FeatureStore(s).users([f"u{k}" for k in range(13)])) == 300
