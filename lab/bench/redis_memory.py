"""``recsys bench redis-memory``: what the online features cost Redis, per user, per item and per
event in the dedup window, measured on real keys.

Synthetic events (``SyntheticSource``, user ids pseudonymized as the API and ``recsys replay`` do:
33 characters each) are applied by ``FeatureStore.apply_events``, the stream worker's own writes,
under a scratch key prefix; then ``MEMORY USAGE key SAMPLES 0`` (every element counted) is read
for every key they made:

- per user: the recent list, the seen set and the counts hash;
- per item: the counts hash, plus the item's share of the trending shards (their MEMORY USAGE
  over their members: the ZSETs grow with the catalogue);
- per event in the dedup window: the event id's marker (a string with an expiry; one per event
  applied within ``features.dedup_ttl_s``).

Events are applied at positions of the events topic's partitions (each user on one partition), so the
applied offsets the stream worker keeps are counted too. Beside memory, the Redis CPU per
applied event (its user and item scripts, ``EVALSHA``) and per recommendation's reads (the
user's three keys and every trending shard's top items in one pipeline) come
from ``INFO commandstats`` before and after. Both are server-wide counters: calls that other
clients made meanwhile are reported (``foreign_calls``), since they blur the figure. At the end
every scratch key is deleted, and the ``used_memory`` that freed is reported beside the sum of
MEMORY USAGE (MEMORY USAGE leaves out the expiry entries and the key table's own slots).
"""
from __future__ import annotations

import time
import uuid
import zlib
from typing import Callable

import numpy as np

from recsys.feature_store import SCRIPTS, FeatureStore, run_scripts
from recsys.features import USER_PARTS
from recsys.privacy import Pseudonyms
from recsys.settings import Settings
from recsys.sources import SyntheticSource

READ_COMMANDS = ("lrange", "hgetall", "zrevrange")  # one recommendation's feature reads
TRENDING_READ = 20  # a request for k = 10 reads the top 2k trending items (serving.app)


def _positions(events, topic: str, partitions: int) -> list[tuple[str, int, int]]:
    """Kafka positions as the producer's key (the user) would give them: one partition per user."""
    next_offset = [0] * partitions
    out = []
    for e in events:
        p = zlib.crc32(e.user_id.encode()) % partitions
        out.append((topic, p, next_offset[p]))
        next_offset[p] += 1
    return out


def _stats(client) -> dict[str, tuple[int, int]]:
    """Per command (lower case): (calls, usec) from INFO commandstats."""
    return {name[len("cmdstat_"):]: (int(v["calls"]), int(v["usec"]))
            for name, v in client.info("commandstats").items() if name.startswith("cmdstat_")}


def _delta(before: dict, after: dict, commands) -> tuple[int, int]:
    calls = sum(after.get(c, (0, 0))[0] - before.get(c, (0, 0))[0] for c in commands)
    usec = sum(after.get(c, (0, 0))[1] - before.get(c, (0, 0))[1] for c in commands)
    return calls, usec


def _memory_usage(client, keys: list[str], chunk: int = 2000) -> list[int]:
    out: list[int] = []
    for a in range(0, len(keys), chunk):
        pipe = client.pipeline(transaction=False)
        for key in keys[a:a + chunk]:
            pipe.memory_usage(key, samples=0)
        out += [int(v or 0) for v in pipe.execute()]
    return out


def _stats_of(values: list[int] | np.ndarray) -> dict:
    v = np.asarray(values, dtype=float)
    return {"mean": round(float(v.mean()), 1), "p50": round(float(np.percentile(v, 50)), 1),
            "p99": round(float(np.percentile(v, 99)), 1), "max": round(float(v.max()), 1)}


def _used_memory(client) -> int:
    return int(client.info("memory")["used_memory"])


def bench(settings: Settings, events: int = 100_000, users: int = 2_000, items: int = 1_000, seed: int = 7,
          reads: int = 2_000, batch: int | None = None, progress: Callable[[str], None] = lambda line: None) -> dict:
    """Apply ``events`` synthetic events under a scratch prefix, measure, delete. Nothing outside
    the scratch prefix is read or written (INFO is read-only)."""
    t0 = time.perf_counter()
    prefix = f"bench-redis-memory-{uuid.uuid4().hex[:8]}"
    s = settings.updated(redis={"prefix": prefix})
    store = FeatureStore(s)
    client, keys = store.redis, store.keys
    batch = batch or settings.kafka.poll_batch
    progress(f"redis-memory: {events:,} synthetic events ({users:,} users, {items:,} items) under prefix {prefix}")
    data = list(Pseudonyms("bench-redis-memory").events(
        SyntheticSource(events=events, users=users, items=items, seed=seed).events_iter()))
    record_bytes = [len(e.user_id.encode()) + len(e.to_bytes()) for e in data]  # a Kafka record's key + value
    try:
        for script in SCRIPTS:  # a fresh Redis would refuse the first batch's EVALSHAs
            client.script_load(script)
        positions = _positions(data, settings.kafka.events_topic, settings.kafka.events_partitions)
        script_calls, script_usec = {"user": 0, "item": 0}, {"user": 0, "item": 0}
        for a in range(0, len(data), batch):  # the stream worker's writes, each script's CPU apart
            before = _stats(client)
            sent = store.send_events(data[a:a + batch], positions[a:a + batch])
            verdicts = sent.user_verdicts()
            mid = _stats(client)
            run_scripts(client, sent.item_commands(verdicts))
            after = _stats(client)
            for script, (start, end) in (("user", (before, mid)), ("item", (mid, after))):
                calls, usec = _delta(start, end, ("evalsha",))
                script_calls[script] += calls
                script_usec[script] += usec

        user_ids = sorted({e.user_id for e in data})
        item_ids = sorted({e.item_id for e in data})
        events_per_user = np.bincount(np.unique([e.user_id for e in data], return_inverse=True)[1])
        progress(f"redis-memory: MEMORY USAGE of {len(USER_PARTS) * len(user_ids):,} user keys, {len(item_ids):,} item keys, "
                 f"{len(data):,} dedup markers")
        per_part = {part: _memory_usage(client, [keys.user(u, part) for u in user_ids]) for part in USER_PARTS}
        per_user = np.sum([per_part[p] for p in USER_PARTS], axis=0)
        item_counts = _memory_usage(client, [keys.item(i) for i in item_ids])
        trending_bytes = sum(int(client.memory_usage(key, samples=0) or 0) for key in keys.trending)
        trending_members = sum(int(client.zcard(key)) for key in keys.trending)
        trending_share = trending_bytes / max(1, trending_members)
        markers = _memory_usage(client, [keys.dedup(e.user_id, e.event_id) for e in data])
        seen_sizes = []
        for a in range(0, len(user_ids), 2000):
            pipe = client.pipeline(transaction=False)
            for u in user_ids[a:a + 2000]:
                pipe.zcard(keys.user(u, "seen_at"))
            seen_sizes += pipe.execute()
        encodings = {part: client.object("encoding", keys.user(user_ids[int(np.argmax(per_part[part]))], part))
                     for part in USER_PARTS}
        encodings["trending"] = client.object("encoding", keys.trending[0])

        # One recommendation's reads (the API key check, one more EVALSHA, left out), per request.
        rng = np.random.default_rng(seed)
        sample = [user_ids[i] for i in rng.integers(0, len(user_ids), reads)]
        before = _stats(client)
        for a in range(0, len(sample), 100):  # the user's keys (the seen set is a ZREVRANGE too) ...
            pipe = client.pipeline(transaction=False)
            for u in sample[a:a + 100]:
                pipe.lrange(keys.user(u, "recent"), 0, -1)
                pipe.zrevrange(keys.user(u, "seen_at"), 0, settings.features.seen_items - 1)
                pipe.hgetall(keys.user(u, "counts"))
            pipe.execute()
        users_read = _stats(client)
        for a in range(0, len(sample), 100):  # ... then the trending shards, measured apart
            pipe = client.pipeline(transaction=False)
            for _ in sample[a:a + 100]:
                for key in keys.trending:
                    pipe.zrevrange(key, 0, TRENDING_READ - 1, withscores=True)
            pipe.execute()
        after = _stats(client)
        read_calls, read_usec = _delta(before, after, READ_COMMANDS)
        trending_calls, trending_usec = _delta(users_read, after, ("zrevrange",))

        # used_memory freed by deleting (DEL frees at once): the markers first, then the rest.
        memory_before = _used_memory(client)
        marker_keys = [keys.dedup(e.user_id, e.event_id) for e in data]
        for a in range(0, len(marker_keys), 1000):
            client.delete(*marker_keys[a:a + 1000])
        memory_mid = _used_memory(client)
        feature_keys = [keys.user(u, p) for u in user_ids for p in USER_PARTS] + [keys.item(i) for i in item_ids]
        for a in range(0, len(feature_keys), 1000):
            client.delete(*feature_keys[a:a + 1000])
        client.delete(*keys.trending)
        memory_after = _used_memory(client)
    finally:
        store.clear()
    sum_usage = int(per_user.sum() + sum(item_counts) + trending_bytes)
    bytes_per_item = float(np.mean(item_counts)) + trending_share
    return {
        "events": len(data), "users": len(user_ids), "items": len(item_ids), "seed": seed,
        "prefix": prefix, "redis_version": client.info("server").get("redis_version"),
        "events_per_user": _stats_of(events_per_user), "seen_items_per_user": _stats_of(seen_sizes),
        "bytes_per_user": round(float(per_user.mean()), 1),
        "bytes_per_user_by_key": {p: _stats_of(per_part[p]) for p in USER_PARTS},
        "bytes_per_user_dist": _stats_of(per_user),
        "bytes_per_item": round(bytes_per_item, 1),
        "bytes_per_item_by_key": {"counts": _stats_of(item_counts), "trending_share": round(trending_share, 1)},
        "trending": {"bytes": trending_bytes, "members": trending_members},
        "bytes_per_event_in_dedup_window": round(float(np.mean(markers)), 1),
        "dedup_ttl_s": settings.features.dedup_ttl_s,
        "encodings_of_the_largest": encodings,
        "kafka_record_bytes": _stats_of(record_bytes),
        "redis_cpu_us_per_event": round(sum(script_usec.values()) / len(data), 2) if data else None,
        "redis_cpu_us_per_event_by_script": {k: round(v / len(data), 2) for k, v in script_usec.items()} if data else None,
        "trending_shards": keys.trending_shards,
        "redis_cpu_us_per_request": round(read_usec / len(sample), 2) if sample else None,
        "redis_cpu_us_per_request_by_part": {
            "user": round((read_usec - trending_usec) / len(sample), 2),
            "per_trending_shard": round(trending_usec / (len(sample) * keys.trending_shards), 2)} if sample else None,
        "foreign_calls": {"evalsha": sum(script_calls.values()) - 2 * len(data),
                          "reads": read_calls - (3 + keys.trending_shards) * len(sample)},
        "used_memory_freed": {
            "dedup_markers_bytes_per_event": round((memory_before - memory_mid) / len(data), 1) if data else None,
            "features_bytes": memory_mid - memory_after, "features_memory_usage_sum": sum_usage,
            "features_freed_vs_memory_usage": round((memory_mid - memory_after) / sum_usage, 3) if sum_usage else None},
        "seconds": round(time.perf_counter() - t0, 1),
    }


def format_table(result: dict) -> str:
    r = result
    u, i = r["bytes_per_user_by_key"], r["bytes_per_item_by_key"]
    rows = [
        ("per user (mean)", f"{r['bytes_per_user']:,.0f} B",
         f"recent {u['recent']['mean']:,.0f} + seen sets {sum(v['mean'] for k, v in u.items() if k.startswith('seen_at')):,.0f} "
         f"+ counts {u['counts']['mean']:,.0f}; "
         f"{r['events_per_user']['mean']:.1f} events, {r['seen_items_per_user']['mean']:.1f} distinct items per user"),
        ("per item (mean)", f"{r['bytes_per_item']:,.0f} B",
         f"counts {i['counts']['mean']:,.0f} + trending share {i['trending_share']:,.0f} "
         f"({r['trending']['members']:,} members, {r['encodings_of_the_largest']['trending']})"),
        ("per event in the dedup window", f"{r['bytes_per_event_in_dedup_window']:,.1f} B",
         f"MEMORY USAGE of a marker; used_memory freed per marker "
         f"{r['used_memory_freed']['dedup_markers_bytes_per_event']} B (ttl {r['dedup_ttl_s']} s)"),
        ("Redis CPU per event", f"{r['redis_cpu_us_per_event']} us",
         "user script {user} + item script {item} (EVALSHA), INFO commandstats".format(**r["redis_cpu_us_per_event_by_script"])),
        ("Redis CPU per request", f"{r['redis_cpu_us_per_request']} us",
         "the user's keys {user} + {shards} x trending shard's top {n} {per_trending_shard}, INFO commandstats".format(
             shards=r["trending_shards"], n=TRENDING_READ, **r["redis_cpu_us_per_request_by_part"])),
        ("Kafka record (key + value)", f"{r['kafka_record_bytes']['mean']:,.0f} B", "JSON event, pseudonymized user id"),
    ]
    width = max(len(a) for a, _, _ in rows)
    return "\n".join(f"{a:<{width}}  {b:>10}  {c}" for a, b, c in rows)
