"""``recsys chaos SCENARIO --json``: the long fault scenarios, run apart from pytest the way
Kafka's system tests stand apart from its unit tests. Each prints one JSON line with events
sent, acknowledged, archived, lost and duplicated, failed requests, recovery seconds, and
whether it passed.

  redis-rebuild    a private Redis (its own port and folder) loses its process and its files;
                   ``recsys features rebuild`` and the stream worker bring every feature back
  replica-kill     kill -9 one of two Serve replicas under load: ≤ 1% failed, back in 30 s
  controller-kill  kill -9 Serve's controller under load: requests go on, the controller returns

The serving scenarios need the demo's model and users (``recsys demo`` first), as
``recsys bench serve`` does; they leave ``recsys serve``'s deployment as configured.
"""
from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from collections import Counter

from cli.bench_stream import scratch_settings
from deploy.local import stack
from recsys.archive import run_archiver
from recsys.errors import InvalidInput
from recsys.feature_store import FeatureStore
from recsys.kafka_io import replay
from recsys.rebuild import rebuild_features
from recsys.settings import Settings
from recsys.sources import SyntheticSource
from recsys.stream import run_stream

CHAOS_REDIS_PORT_OFFSET = 11  # the private Redis of redis-rebuild: the stack's port + 11


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
        os.kill(stack._pid(s, "redis"), signal.SIGKILL)
        time.sleep(0.5)
        shutil.rmtree(stack._dir(s, "redis"))
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


def _serving_fault(settings: Settings, scenario: str, seconds: float, concurrency: int, progress) -> dict:
    """Load on two fixed replicas; the fault a third of the way in; count what failed, and time
    how long until the cluster is whole again."""
    import ray

    from serving.bench import _Cluster, _known_users, closed_loop, pids_named
    from serving.deploy import base_url, replicas, serve_up
    ids = _known_users(settings, 500)
    cluster = _Cluster(settings, replicas=2)
    s = cluster.ensure(settings.serving.ingress)
    urls = [f"{base_url(s)}/v1/recommendations/{u}?k=10" for u in ids]
    closed_loop(urls, concurrency, 3)  # warm-up
    result: dict = {}
    load = threading.Thread(target=lambda: result.update(closed_loop(urls, concurrency, seconds)))
    load.start()
    time.sleep(seconds / 3)
    kind = "ray::ServeReplica:recsys:RecsysApi" if scenario == "replica-kill" else "ray::ServeController"
    before = pids_named(kind)
    if not before:
        raise InvalidInput(f"chaos {scenario}: found no process to kill")
    victim = min(before)
    progress(f"chaos: kill -9 {scenario.split('-')[0]} pid {victim}")
    killed = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    recovery_s = None
    while recovery_s is None and time.monotonic() - killed < 120:
        # Whole again: a new process in the victim's place, and Serve (its controller answering)
        # counts two running replicas.
        try:
            if pids_named(kind) - before and replicas().get("RecsysApi", 0) >= 2:
                recovery_s = time.monotonic() - killed
        except Exception:  # the controller is away: serve.status() fails until it is back
            pass
        time.sleep(0.2)
    load.join()
    ray.shutdown()
    stack.stop_ray(settings)
    serve_up(settings, progress=lambda *_: None)  # back to the configured deployment
    sent = result["answered"] + result["errors"]
    failed_share = result["errors"] / sent if sent else 1.0
    passed = failed_share <= 0.01 and recovery_s is not None and (scenario != "replica-kill" or recovery_s <= 30)
    return {"scenario": scenario, "requests": sent, "failed_requests": result["errors"],
            "failed_share": round(failed_share, 4), "p99_ms": round(result["p99_ms"], 1),
            "recovery_s": round(recovery_s, 1) if recovery_s is not None else None,
            "events_sent": 0, "acknowledged": 0, "archived": 0, "lost": 0, "duplicated": 0, "passed": passed}


SCENARIOS = {
    "redis-rebuild": lambda s, progress: redis_rebuild(s, progress=progress),
    "replica-kill": lambda s, progress: _serving_fault(s, "replica-kill", 30.0, 4, progress),
    "controller-kill": lambda s, progress: _serving_fault(s, "controller-kill", 30.0, 4, progress),
}


def run_chaos(settings: Settings, scenario: str, progress=print) -> dict:
    if scenario not in SCENARIOS:
        raise InvalidInput(f"unknown chaos scenario {scenario!r}; known: {', '.join(SCENARIOS)}")
    return SCENARIOS[scenario](settings, progress)
