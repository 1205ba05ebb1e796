"""``recsys chaos SCENARIO --json``: the long fault scenarios, run apart from pytest the way
Kafka's system tests stand apart from its unit tests. Each prints one JSON line with events
sent, acknowledged, archived, lost and duplicated, failed requests, recovery seconds, and
whether it passed.

  kafka-leader-kill  a private 3-broker Kafka (replication factor 3, min.insync.replicas 2):
                   events posted through the API at 600/s for 60 s while the leader of partition 0
                   is killed with kill -9 three times (and restarted); every event answered 202 is
                   archived, retried 503s count once, and every request is answered (a 503 with
                   Retry-After at worst, never silence)
  redis-rebuild    a private Redis (its own port and folder) loses its process and its files;
                   ``recsys features rebuild`` and the stream worker bring every feature back
  replica-kill     kill -9 one of two Serve replicas under load: ≤ 1% failed, back in 30 s
  controller-kill  kill -9 Serve's controller under load: requests go on, the controller returns
  stream-workers   3 stream worker processes in one consumer group over 6 partitions; one killed
                   with kill -9 mid-stream and one added: the features equal one replay of every
                   event; then the group's rate with 1, 2 and 3 workers, as ratios in one run
  ray-nodes        Train and Serve across ``ray start`` nodes, one node killed in each (lab/chaos/ray.py)
  guardrail        a bad model as an A/B candidate under taste shoppers: the online guardrail ends the
                   experiment; a good one keeps running (lab/chaos/guardrail.py)
  abuse            hostile clients beside a normal one: chosen event ids, a million-item seen set,
                   large bodies, /readyz floods, bad bearers; the normal client gets no error and
                   keeps its p99 within 2x of the calm windows; every consumer stays up (lab/chaos/abuse.py)
  forget-under-load  50 users forgotten while their events are in flight through the API, Kafka and a
                   lagging consumer: nothing of them remains, every other user exact (lab/chaos/forget.py)
  rebuild-under-traffic  ``recsys features rebuild`` while events flow at 1,000/s and the archiver
                   writes: every user, item and trending score equals one replay of every event, and
                   the archive holds each event once (lab/chaos/rebuild.py)

The serving scenarios need the demo's model and users (``recsys demo`` first), as
``recsys bench serve`` does; they leave ``recsys serve``'s deployment as configured.
"""
from __future__ import annotations

import asyncio
import itertools
import multiprocessing as mp
import os
import random
import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from lab.bench.stream import recsys_child, scratch_settings
from lab.chaos.ray import ray_nodes
from lab.chaos.forget import forget_under_load
from lab.chaos.guardrail import guardrail
from lab import process, stack
from recsys.archive import read_partition_log, run_archiver
from recsys.auth import KeyStore, Scope
from recsys.errors import InvalidInput
from recsys.feature_store import FeatureStore, connect
from recsys.features import Keys, MemoryFeatures, event_ops
from recsys.kafka_io import broker_answers, connection, replay
from recsys.rebuild import rebuild_features
from recsys.settings import Settings
from recsys.sources import SyntheticSource
from recsys.stream import run_stream

CHAOS_REDIS_PORT_OFFSET = 11  # the private Redis of redis-rebuild: the stack's port + 11
CHAOS_KAFKA_PORT_OFFSET = 20  # the private brokers and controllers of kafka-leader-kill: the stack's + 20
CHAOS_API_PORT_OFFSET = 91  # its API (serving.plain under uvicorn): the serving port + 91


def _feature_counts(store: FeatureStore, users: list[str], items: list[str]) -> tuple[Counter, list]:
    """Per item, its event count; per user, the full features (for an exact comparison)."""
    counts = Counter({i: sum(store.item_counts(i).values()) for i in items})
    return counts, [u.to_json() for u in store.users(users)]


def redis_rebuild(settings: Settings, events: int = 50_000, progress=print) -> dict:
    home = settings.home / "chaos-redis"  # its own Redis, archive and logs: the stack's data is never touched
    s = scratch_settings(settings, "chaos").updated(
        home=home, archive_dir=home / "archive", redis={"port": settings.redis.port + CHAOS_REDIS_PORT_OFFSET})
    stack.start_kafka(settings, progress)
    stack.start_redis(s, progress)
    stack.ensure_topics(s)
    try:
        sent = list(SyntheticSource(events=events, seed=12).events_iter())
        archived_part = int(len(sent) * 0.7)
        progress(f"chaos: {len(sent):,} events; {archived_part:,} archived before the crash, all in Redis")
        acked = replay(sent[:archived_part], s, progress=False)["produced"]
        archived = run_archiver(s, until_idle=3)["archived"]
        acked += replay(sent[archived_part:], s, progress=False)["produced"]
        run_stream(s, until_idle=3)
        store = FeatureStore(s)
        users, items = sorted({e.user_id for e in sent}), sorted({e.item_id for e in sent})
        before_items, before_users = _feature_counts(store, users, items)
        progress("chaos: kill -9 Redis, delete its files, start it empty")
        crashed = time.monotonic()
        os.kill(stack.running_pid(s, "redis"), signal.SIGKILL)
        time.sleep(0.5)
        shutil.rmtree(stack.service_dir(s, "redis"))
        stack.start_redis(s, progress)
        rebuilt = rebuild_features(s, progress=progress)
        caught_up = run_stream(s, until_idle=3)
        recovery_s = time.monotonic() - crashed
        after_items, after_users = _feature_counts(FeatureStore(s), users, items)
        lost = sum((before_items - after_items).values())
        duplicated = sum((after_items - before_items).values())
        exact = after_users == before_users and not lost and not duplicated
        return {"scenario": "redis-rebuild", "events_sent": len(sent), "acknowledged": acked, "archived": archived,
                "rebuilt_from_archive": rebuilt["applied"], "caught_up_from_kafka": caught_up["applied"],
                "lost": lost, "duplicated": duplicated, "users_exact": after_users == before_users,
                "failed_requests": 0, "recovery_s": round(recovery_s, 1), "passed": exact and acked == len(sent)}
    finally:
        stack.stop_redis(s)
        stack.delete_topics(s)
        shutil.rmtree(home, ignore_errors=True)


async def _post_events(url: str, headers: dict, rate: float, seconds: float, concurrency: int,
                       started_event=None) -> dict:
    """Events posted one per request at ``rate`` per second. Each is retried with its event_id
    after a 503 (once its Retry-After has passed) or a dropped connection (after 1 s) until it
    gets a 202, as a client should, while the next events go on (a client does not stall
    behind one partition). Returns the event ids answered 202 with their attempts, the times of
    those answers, per event the time from its first try to its 202, and per answered request
    the time from its sending (out of the client's pool of connections) to its answer."""
    import aiohttp
    rng, jitter = random.Random(7), random.Random(8)
    started = time.monotonic()
    if started_event is not None:
        started_event.set()
    give_up = started + seconds + 30
    acked: dict[str, tuple[str, int]] = {}  # event id -> (item id, attempts)
    ok_at: list[float] = []
    waited: list[float] = []
    answered_in: list[float] = []
    refused = 0
    statuses: Counter = Counter()

    async def post(session, event):
        nonlocal refused
        first = time.monotonic()
        for attempt in itertools.count(1):
            sent, retry_after = SimpleNamespace(at=None), "1"  # at: when the request left the client
            try:
                async with session.post(url, json=event, trace_request_ctx=sent) as resp:
                    status, retry_after = resp.status, resp.headers.get("Retry-After", "1")
                    body = await resp.read()
                answered_in.append(time.monotonic() - sent.at)
                refused += status == 503 and b"were not sent" in body  # the replica's bound, nothing sent
            except aiohttp.ConnectionTimeoutError:
                status = -1  # never sent: each of the client's connections stayed busy (or a connect took) 20 s
            except (aiohttp.ClientError, asyncio.TimeoutError):
                status = 0  # no answer: the API said nothing for 10 s, or dropped the connection
            statuses[status] += 1
            if status == 202:
                acked[event["event_id"]] = (event["item_id"], attempt)
                now = time.monotonic()
                ok_at.append(now - started)
                waited.append(now - first)
                return
            if status not in (-1, 0, 503) or time.monotonic() > give_up:
                return
            await asyncio.sleep(float(retry_after) + jitter.uniform(0, 0.2))  # spread: not all at once

    async def watch_lag():  # this process's own event loop falling behind: the client starved, not the API
        while True:
            before = time.monotonic()
            await asyncio.sleep(0.1)
            lags.append(time.monotonic() - before - 0.1)

    lags: list[float] = []
    watcher = asyncio.create_task(watch_lag())
    # Silence is the API's own: 10 s without a byte of the answer once the request is sent; the
    # wait for one of the client's connections is the client's queue, counted apart.
    timeout = aiohttp.ClientTimeout(total=None, connect=20, sock_read=10)
    tracing = aiohttp.TraceConfig()

    async def headers_sent(_session, ctx, _params):
        ctx.trace_request_ctx.at = time.monotonic()
    tracing.on_request_headers_sent.append(headers_sent)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency), timeout=timeout,
                                     headers=headers, trace_configs=[tracing]) as session:
        tasks = []
        for n in itertools.count():
            due = started + n / rate
            if due >= started + seconds:
                break
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            event = {"event_id": uuid.uuid4().hex, "user_id": f"u{rng.randrange(2000)}",
                     "item_id": f"i{rng.randrange(500)}", "type": "view", "ts": int(time.time() * 1000)}
            tasks.append(asyncio.create_task(post(session, event)))
        await asyncio.gather(*tasks)
    watcher.cancel()
    return {"refused": refused, "client_lag_max_s": round(max(lags, default=0.0), 2),
            "client_lag_p99_s": round(float(np.percentile(lags or [0.0], 99)), 2),"sent": len(tasks), "acked": acked, "ok_at": sorted(ok_at), "waited": waited,
            "answered_in": answered_in, "statuses": dict(statuses), "seconds": seconds}


def _event_load_process(url, headers, rate, seconds, concurrency, started, queue):
    queue.put(asyncio.run(_post_events(url, headers, rate, seconds, concurrency, started)))


def _partitions(s: Settings, bootstrap_timeout_ms: int) -> list[dict]:
    """The events topic's partitions as the brokers describe them (leader, in-sync replicas)."""
    from kafka import KafkaAdminClient
    with KafkaAdminClient(**connection(s), bootstrap_timeout_ms=bootstrap_timeout_ms) as admin:
        (topic,) = admin.describe_topics([s.kafka.events_topic])
    return topic["partitions"]


def _leader(s: Settings, partition: int = 0) -> int:
    return next(p["leader_id"] for p in _partitions(s, 10000) if p["partition_index"] == partition)


def _wait_back_in_sync(s: Settings, server: str, timeout_s: float) -> bool:
    """True once the restarted broker answers and every partition of the events topic has all
    its replicas in sync again (an ISR read before that can still list the dead broker)."""
    def in_sync() -> bool:
        try:
            return all(len(p["isr_nodes"]) == s.kafka.replication_factor for p in _partitions(s, 5000))
        except Exception:  # a broker is still away: ask again
            return False
    deadline = time.monotonic() + timeout_s
    try:
        process.wait_until(lambda: broker_answers(server), timeout_s, f"{server} answers", every_s=0.2)
        process.wait_until(in_sync, deadline - time.monotonic(), "every replica is in sync")
    except process.NotInTime:
        return False
    return True


def kafka_leader_kill(settings: Settings, seconds: float = 60.0, rate: float = 600.0, kills: int = 3,
                      concurrency: int = 512, progress=print) -> dict:
    """Kafka's replication_test, hard-bounce flavour, through the project's own API."""
    from lab.bench.serve import PlainUvicorn
    home = settings.home / "chaos-kafka"
    shutil.rmtree(home, ignore_errors=True)
    host, port = settings.kafka.bootstrap.rsplit(":", 1)
    s = settings.updated(home=home, archive_dir=home / "archive", registry_dir=home / "models",
                         kafka={"bootstrap": f"{host}:{int(port) + CHAOS_KAFKA_PORT_OFFSET}", "brokers": 3,
                                "controller_port": settings.kafka.controller_port + CHAOS_KAFKA_PORT_OFFSET},
                         redis={"port": settings.redis.port + CHAOS_REDIS_PORT_OFFSET + 1})
    nodes = {n.node_id: n for n in stack.kafka_nodes(s)}
    api = None
    try:
        stack.start_redis(s, progress)
        stack.start_kafka(s, progress)
        key = KeyStore(s, connect(s)).create("chaos", [Scope.events_write], rate_per_s=1e6, burst=10**6)["key"]
        api = PlainUvicorn(s, workers=1, port=settings.serving.port + CHAOS_API_PORT_OFFSET, ready_path="/healthz")
        ctx = mp.get_context("spawn")
        queue, load_started = ctx.Queue(), ctx.Event()
        load = ctx.Process(target=_event_load_process, args=(f"{api.url}/v1/events", {"Authorization": f"Bearer {key}"},
                                                             rate, seconds, concurrency, load_started, queue))
        progress(f"chaos: {rate:g} events/s through the API for {seconds:g} s; kill -9 the leader {kills} times")
        load.start()
        load_started.wait(timeout=60)
        started = time.monotonic()
        bounces = []
        for k in range(kills):
            time.sleep(max(0.0, started + (k + 1) * seconds / (kills + 1) - time.monotonic()))
            node = nodes[_leader(s)]
            progress(f"chaos: kill -9 {node.name}, leader of partition 0")
            killed = time.monotonic()
            os.kill(stack.running_pid(s, node.name), signal.SIGKILL)
            time.sleep(2.0)
            stack.start_kafka_node(s, node, progress)
            in_sync = _wait_back_in_sync(s, node.server, timeout_s=60)
            bounces.append({"node": node.node_id, "at_s": round(killed - started, 1),
                            "back_in_sync_s": round(time.monotonic() - killed, 1) if in_sync else None})
        result = queue.get(timeout=seconds + 120)
        load.join()
        archived = run_archiver(s, until_idle=3)["archived"]
        run_stream(s, until_idle=3)
        return _replication_figures(s, result, archived, bounces)
    finally:
        if api is not None:
            api.stop()
        stack.stop_kafka(s)
        stack.stop_redis(s)
        shutil.rmtree(home, ignore_errors=True)


def _replication_figures(s: Settings, load: dict, archived: int, bounces: list) -> dict:
    """Every 202 in the archive; a copy only where the client retried; effects once per event."""
    acked = load["acked"]
    records = Counter()
    for p in range(s.kafka.events_partitions):
        records.update(read_partition_log(s, p)["event_id"].to_pylist())
    lost = sum(1 for e in acked if e not in records)
    first_try_copies = sum(records[e] - 1 for e, (_, attempts) in acked.items() if attempts == 1 and records[e] > 1)
    store = FeatureStore(s)
    applied = sum(sum(store.item_counts(i).values()) for i in {item for item, _ in acked.values()})
    duplicated = applied - len(records)  # events counted in Redis beyond one per archived event id
    statuses = Counter(load["statuses"])
    ok_at = [0.0, *load["ok_at"]]
    longest_gap = max(b - a for a, b in zip(ok_at, ok_at[1:]))  # with no 202 at all
    waited = np.array(load["waited"])  # an event's first try to its 202: its partition's outage
    responses = sum(statuses.values()) - statuses.get(-1, 0)  # requests that reached the API
    answered_in = np.array(load["answered_in"] or [0.0])
    events_per_s = len(acked) / load["seconds"]
    # Degraded means fast 503s with Retry-After, never silence: every request is answered.
    passed = (not lost and not duplicated and not first_try_copies and not statuses.get(0) and events_per_s >= 500
              and len(bounces) == 3 and all(b["back_in_sync_s"] is not None for b in bounces))
    return {"scenario": "kafka-leader-kill", "events_sent": load["sent"], "acknowledged": len(acked),
            "archived": len(records), "archived_records": archived, "lost": lost, "duplicated": duplicated,
            "copies_from_client_retries": sum(records.values()) - len(records) - first_try_copies,
            "copies_without_retry": first_try_copies, "events_per_s": round(events_per_s, 1),
            "responses": responses, "share_503": round(statuses.get(503, 0) / responses, 4),
            "no_answer": statuses.get(0, 0), "not_sent_client_queue": statuses.get(-1, 0),
            "failed_requests": responses - statuses.get(202, 0),
            "refused_503": load["refused"], "answer_p50_s": round(float(np.percentile(answered_in, 50)), 2),
            "answer_p99_s": round(float(np.percentile(answered_in, 99)), 2),
            "answer_max_s": round(float(answered_in.max()), 2), "client_lag_max_s": load["client_lag_max_s"],
            "client_lag_p99_s": load["client_lag_p99_s"],
            "longest_unavailability_s": round(float(waited.max()), 2), "longest_without_any_202_s": round(longest_gap, 2),
            "wait_for_202_p99_s": round(float(np.percentile(waited, 99)), 2), "kills": bounces,
            "recovery_s": max((b["back_in_sync_s"] or 0) for b in bounces), "passed": passed}


def _serving_fault(settings: Settings, scenario: str, progress) -> dict:
    """Locust's shoppers (``CHAOS_PROFILE``: about half of what Locust and Serve reach together
    on 2 cores) on two fixed replicas, their posted events followed into Redis; the fault a
    third of the way in; count what failed, and time how long until the cluster is whole again."""
    import ray

    from loadtest.runner import Options, run as run_load
    from loadtest.shapes import CHAOS_PROFILE
    from lab.bench.serve import IngressCluster, pids_named
    from lab.serve_local import base_url, replicas, serve_up
    cluster = IngressCluster(settings, replicas=2)
    s = cluster.ensure(settings.serving.ingress)
    out = settings.home / "chaos-serving" / scenario
    shutil.rmtree(out, ignore_errors=True)
    kind = "ray::ServeReplica:recsys:RecsysApi" if scenario == "replica-kill" else "ray::ServeController"
    fault: dict = {}

    def inject() -> None:  # a third of the way into the load (Locust writes shape_start.txt when it starts)
        while not (out / "shape_start.txt").exists():
            time.sleep(0.2)
        time.sleep(CHAOS_PROFILE.duration_s / 3)
        before = pids_named(kind)
        if not before:
            fault["error"] = f"found no {kind} process to kill"
            return
        victim = min(before)
        progress(f"chaos: kill -9 {scenario.split('-')[0]} pid {victim}")
        killed = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        while time.monotonic() - killed < 120:
            # Whole again: a new process in the victim's place, and Serve (its controller
            # answering) counts two running replicas.
            try:
                if pids_named(kind) - before and replicas().get("RecsysApi", 0) >= 2:
                    fault["recovery_s"] = time.monotonic() - killed
                    return
            except Exception:  # the controller is away: serve.status() fails until it is back
                pass
            time.sleep(0.2)

    injector = threading.Thread(target=inject, daemon=True)
    injector.start()
    summary = run_load(s, Options(profile=CHAOS_PROFILE, host=base_url(s), out=out, settle_max_s=0, cooldown_max_s=0),
                       progress=progress)
    injector.join(timeout=130)
    ray.shutdown()
    stack.stop_ray(settings)
    serve_up(settings, progress=lambda *_: None)  # back to the configured deployment
    if "error" in fault:
        raise InvalidInput(f"chaos {scenario}: {fault['error']}")
    from loadtest.report import Requests
    requests = Requests.read_csv(out / "requests.csv", float((out / "shape_start.txt").read_text()))
    sent, failed = len(requests), int((~requests.ok).sum())
    failed_share = failed / sent if sent else 1.0
    recovery_s = fault.get("recovery_s")
    events = summary["events"]
    lost = events["posted"] - events["in_redis"]
    passed = (failed_share <= 0.01 and recovery_s is not None and not lost
              and (scenario != "replica-kill" or recovery_s <= 30))
    return {"scenario": scenario, "requests": sent, "rps": round(sent / CHAOS_PROFILE.duration_s, 1),
            "failed_requests": failed, "failed_share": round(failed_share, 4),
            "p99_ms": round(float(np.percentile(requests.latency_ms, 99)), 1) if sent else None,
            "recovery_s": round(recovery_s, 1) if recovery_s is not None else None,
            "events_sent": events["posted"], "acknowledged": events["posted"], "archived": None,
            "lost": lost, "duplicated": 0, "passed": passed, "report": str(out)}


WORKER_IDLE_S = 20.0  # a worker exits after this long without records: longer than a dead member's
#                      session timeout (10 s), so the survivors are still there to take its partitions


def _worker(s: Settings, log: Path, idle_s: float = WORKER_IDLE_S) -> subprocess.Popen:
    """One ``recsys stream`` process of the scenario's consumer group, logging to ``log``."""
    return recsys_child(s, log, "stream", "--until-idle", str(idle_s))


def _applied(store: FeatureStore, s: Settings) -> int:
    """Events whose effects are in Redis: a fresh topic's offsets count its records from 0."""
    offsets = store.applied_offsets(s.kafka.events_topic, range(s.kafka.events_partitions))
    return sum(v + 1 for v in offsets.values() if v is not None)


def expected_features(sent: list, s: Settings) -> tuple[Counter, list, dict]:
    """What one replay of every event leaves: the offline twin of the store (recsys.features)."""
    keys, mem = Keys.of(s.redis), MemoryFeatures()
    for e in sent:
        mem.apply(e.event_id, event_ops(e, keys, s.features.recent_items, s.features.trending_half_life_s,
                                        s.features.seen_items))
    users, items = sorted({e.user_id for e in sent}), sorted({e.item_id for e in sent})
    counts = Counter({i: sum(mem.hashes.get(keys.item(i), {}).values()) for i in items})
    trending = {item: w for key in keys.trending for item, w in mem.zsets.get(key, {}).items()}
    return counts, [mem.user(keys, u).to_json() for u in users], trending


def features_of(store: FeatureStore, sent: list) -> tuple[Counter, list, dict]:
    """What the store holds of these events' users and items, as ``expected_features`` gives it."""
    users, items = sorted({e.user_id for e in sent}), sorted({e.item_id for e in sent})
    counts, features = _feature_counts(store, users, items)
    return counts, features, dict(store.trending(len(items)))


def compare_features(want: tuple[Counter, list, dict], got: tuple[Counter, list, dict]) -> dict:
    """Item counts, user features and trending scores, as wanted (one replay of every event) and as
    found. ``lost``: events counted less than wanted on their item; ``duplicated``: counted more;
    trending scores are sums of decayed floats, equal up to the order of the additions."""
    (want_items, want_users, want_trending), (got_items, got_users, got_trending) = want, got
    lost, duplicated = sum((want_items - got_items).values()), sum((got_items - want_items).values())
    trending_exact = got_trending.keys() == want_trending.keys() and all(
        abs(got_trending[i] - w) <= 1e-9 * max(1.0, abs(w)) for i, w in want_trending.items())
    users_exact = got_users == want_users
    return {"lost": lost, "duplicated": duplicated, "users_exact": users_exact, "trending_exact": trending_exact,
            "exact": users_exact and trending_exact and not lost and not duplicated}


def stream_workers(settings: Settings, events: int = 120_000, progress=print) -> dict:
    """Stream workers in one group: a kill -9 and a join mid-stream, then 1/2/3 workers' rates."""
    partitions = max(6, settings.kafka.events_partitions)
    s = scratch_settings(settings, "workers").updated(kafka={"events_partitions": partitions})
    logs = settings.home / "logs" / "chaos-stream-workers"
    logs.mkdir(parents=True, exist_ok=True)
    stack.start_kafka(settings, progress)
    stack.start_redis(settings, progress)
    stack.ensure_topics(s)
    procs: list[subprocess.Popen] = []
    try:
        sent = list(SyntheticSource(events=events, seed=21).events_iter())
        acked = replay(sent, s, progress=False)["produced"]
        store = FeatureStore(s)
        progress(f"chaos: {acked:,} events on {partitions} partitions; 3 workers in group {s.kafka.stream_group}")
        procs = [_worker(s, logs / f"worker-{n}.log") for n in range(3)]
        started = time.monotonic()
        try:
            process.wait_until(lambda: _applied(store, s) >= 0.3 * len(sent), 300, "the workers apply 30% of the events",
                               every_s=0.1)
        except process.NotInTime:
            raise RuntimeError(f"chaos: the workers applied {_applied(store, s):,} events in 300 s (logs: {logs})") from None
        at_kill = _applied(store, s)
        progress(f"chaos: kill -9 worker 1 at {at_kill:,} events applied; worker 3 joins")
        procs[1].kill()
        procs.append(_worker(s, logs / "worker-3.log"))
        for p in procs:
            p.wait(timeout=600)
        done_s = time.monotonic() - started
        exact = compare_features(expected_features(sent, s), features_of(store, sent))
        progress(f"chaos: {'exact' if exact['exact'] else 'NOT exact'}: lost {exact['lost']}, duplicated "
                 f"{exact['duplicated']}, users exact {exact['users_exact']}, trending exact "
                 f"{exact['trending_exact']} ({done_s:.1f} s)")
        rates = _worker_rates(settings, s, len(sent), logs, progress)
        one = np.mean(rates["1"])
        return {"scenario": "stream-workers", "events_sent": len(sent), "acknowledged": acked,
                "partitions": partitions, "applied_at_kill": at_kill,
                **{k: exact[k] for k in ("lost", "duplicated", "users_exact", "trending_exact")},
                "exit_codes": [p.returncode for p in procs], "seconds": round(done_s, 1),
                "events_per_s": {w: [round(r, 1) for r in v] for w, v in rates.items()},
                "rate_vs_1_worker": {w: round(float(np.mean(v)) / one, 2) for w, v in rates.items()},
                "cpus": os.cpu_count(), "failed_requests": 0, "passed": exact["exact"] and acked == len(sent)}
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for p in procs:
            p.wait()
        stack.delete_topics(s)
        FeatureStore(s).clear()


def _worker_rates(settings: Settings, s: Settings, n: int, logs: Path, progress) -> dict[str, list[float]]:
    """The group's events/s with 1, 2 and 3 workers, each run a fresh group and Redis prefix on the
    same records, in the order 1 2 3 3 2 1 (a noisy neighbour hurts all alike); from the first
    effect in Redis to the last, so process start-up does not count."""
    rates: dict[str, list[float]] = {}
    for workers in (1, 2, 3, 3, 2, 1):
        run = s.updated(kafka={"stream_group": f"{s.kafka.stream_group}-{workers}-{uuid.uuid4().hex[:6]}"},
                        redis={"prefix": f"{s.redis.prefix}-{workers}-{uuid.uuid4().hex[:6]}"})
        store = FeatureStore(run)
        procs = [_worker(run, logs / f"rate-{workers}.log", idle_s=3.0) for _ in range(workers)]
        try:
            first = None
            deadline = time.monotonic() + 600
            while (applied := _applied(store, run)) < n and time.monotonic() < deadline:
                if applied and first is None:
                    first = (time.monotonic(), applied)
                time.sleep(0.05)
            last = time.monotonic()
            if first is None or applied < n:
                raise RuntimeError(f"chaos: {workers} worker(s) applied {applied:,} of {n:,} (logs: {logs})")
            rates.setdefault(str(workers), []).append((n - first[1]) / (last - first[0]))
            progress(f"chaos: {workers} worker(s): {rates[str(workers)][-1]:,.0f} events/s")
        finally:
            for p in procs:
                p.wait(timeout=120)
            store.clear()
    return rates


SCENARIOS = {
    "kafka-leader-kill": lambda s, progress: kafka_leader_kill(s, progress=progress),
    "redis-rebuild": lambda s, progress: redis_rebuild(s, progress=progress),
    "replica-kill": lambda s, progress: _serving_fault(s, "replica-kill", progress),
    "controller-kill": lambda s, progress: _serving_fault(s, "controller-kill", progress),
    "fuzz": lambda s, progress: _fuzz(s, progress=progress),
    "stream-workers": lambda s, progress: stream_workers(s, progress=progress),
    "ray-nodes": lambda s, progress: ray_nodes(s, progress=progress),
    "guardrail": lambda s, progress: guardrail(s, progress=progress),
    "abuse": lambda s, progress: _abuse(s, progress=progress),
    "forget-under-load": lambda s, progress: forget_under_load(s, progress=progress),
    "rebuild-under-traffic": lambda s, progress: _rebuild_under_traffic(s, progress=progress),
}


def _rebuild_under_traffic(settings: Settings, progress) -> dict:
    from lab.chaos.rebuild import rebuild_under_traffic
    return rebuild_under_traffic(settings, progress=progress)


def _abuse(settings: Settings, progress) -> dict:
    from lab.chaos.abuse import abuse
    return abuse(settings, progress=progress)


def _fuzz(settings: Settings, progress) -> dict:
    from lab.chaos.fuzz import fuzz
    return fuzz(settings, progress=progress)


def run_chaos(settings: Settings, scenario: str, progress=print) -> dict:
    if scenario not in SCENARIOS:
        raise InvalidInput(f"unknown chaos scenario {scenario!r}; known: {', '.join(SCENARIOS)}")
    return SCENARIOS[scenario](settings, progress)
