"""``recsys bench stream``: the stream worker against raw Kafka and raw Redis, in one run.

Each figure is a ratio against a reference measured in the same run on the same
machine, since these machines are shared and noisy.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
from kafka import KafkaConsumer

from lab import REPO, process, stack
from recsys.feature_store import FeatureStore
from recsys.kafka_io import connection, replay
from recsys.settings import Settings
from recsys.sources import SyntheticSource
from recsys.stream import StreamWorker


def scratch_settings(settings: Settings, tag: str) -> Settings:
    """Fresh topics, consumer groups and Redis prefix, so a run never touches real data, and no
    metrics endpoints, which would take the ports of the real processes'."""
    run = f"{tag}-{uuid.uuid4().hex[:8]}"
    return settings.updated(
        kafka={"events_topic": f"{run}-events", "dlq_topic": f"{run}-events.dlq", "impressions_topic": f"{run}-impressions",
               "stream_group": f"{run}-features", "archive_group": f"{run}-archive"},
        redis={"prefix": run}, online={"group": f"{run}-online"},
        monitoring={"stream_port": 0, "archive_port": 0, "scheduler_port": 0, "online_port": 0})


def settings_env(settings: Settings) -> dict:
    """The environment that gives a child ``recsys`` process these settings."""
    env = dict(os.environ)
    for key, value in settings.environment().items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def recsys_child(settings: Settings, log: Path, *args: str) -> subprocess.Popen:
    """``recsys ARGS`` as a child process with these settings and no metrics endpoint, its output
    appended to ``log``."""
    return process.spawn([sys.executable, "-m", "cli", *args, "--metrics-port", "0"], log,
                         env=settings_env(settings), cwd=REPO)


def _rate(n: int, seconds: float) -> float:
    return round(n / seconds, 1)


def _raw_kafka_rate(settings: Settings, n: int) -> float:
    cons = KafkaConsumer(settings.kafka.events_topic, **connection(settings), group_id=None,
                         auto_offset_reset="earliest", max_poll_records=settings.kafka.poll_batch)
    seen, started = 0, time.monotonic()
    while seen < n:
        seen += sum(len(b) for b in cons.poll(timeout_ms=500).values())
    elapsed = time.monotonic() - started
    cons.close()
    return _rate(n, elapsed)


def _raw_redis_rate(settings: Settings, events) -> float:
    store = FeatureStore(settings)
    batch = settings.kafka.poll_batch
    started = time.monotonic()
    for i in range(0, len(events), batch):
        store.apply_events(events[i:i + batch])
    return _rate(len(events), time.monotonic() - started)


def _run_until(worker: StreamWorker, n: int, timeout_s: float = 300.0) -> tuple[float, float, int]:
    """Run the worker (its two stages, as ``recsys stream`` does) until it has consumed ``n``
    records. Returns when its first batch was done, when the n-th was, and that first batch's
    size: the rate leaves out the consumer group's join, which raw Kafka (no group) has not."""
    marks: dict[str, float] = {}
    first_batch = 0

    def watch() -> None:
        nonlocal first_batch
        deadline = time.monotonic() + timeout_s
        while worker.stats.consumed < n and time.monotonic() < deadline:
            if "first" not in marks and worker.stats.consumed:
                marks["first"], first_batch = time.monotonic(), worker.stats.consumed
            time.sleep(0.002)
        marks["last"] = time.monotonic()
        worker.stopping.set()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    worker.run()
    watcher.join()
    if worker.stats.consumed < n:
        raise TimeoutError(f"the stream worker consumed {worker.stats.consumed} of {n} records in {timeout_s:.0f} s")
    return marks.get("first", marks["last"]), marks["last"], first_batch


def _worker_rate(settings: Settings, n: int) -> float:
    first, last, first_batch = _run_until(StreamWorker(settings), n)
    return _rate(n - first_batch, last - first)


class _TimedWorker(StreamWorker):
    """Records, per event, the time from the producer's send to its Redis write's return."""

    def __init__(self, settings):
        super().__init__(settings)
        self.freshness_ms: list[float] = []

    def effects(self, batch, sent=None):
        applied = super().effects(batch, sent)
        now_ms = time.time() * 1000
        self.freshness_ms += [now_ms - r.timestamp for r in batch.records]
        return applied


def _freshness(settings: Settings, rate: float, seconds: float) -> dict:
    """A producer process at a steady rate; the worker in this process times each event."""
    worker = _TimedWorker(settings)
    n = int(rate * seconds)
    thread = threading.Thread(target=_run_until, args=(worker, n))
    thread.start()
    cmd = [sys.executable, "-m", "cli", "replay", "--source", f"synthetic:events={n},seed=11",
           "--rate", str(rate), "--quiet"]
    subprocess.run(cmd, env=settings_env(settings), check=True, stdout=subprocess.DEVNULL)
    thread.join()
    lat = np.array(worker.freshness_ms[int(0.1 * len(worker.freshness_ms)):])  # skip the warm-up
    return {"events": len(worker.freshness_ms), "p50_ms": round(float(np.percentile(lat, 50)), 2),
            "p99_ms": round(float(np.percentile(lat, 99)), 2), "max_ms": round(float(lat.max()), 2)}


def bench_stream(settings: Settings, events: int = 50_000, steady_rate: float = 1000.0,
                 steady_seconds: float = 10.0) -> dict:
    """Raw Kafka once; the worker and raw Redis twice each, in the order Redis, worker, worker,
    Redis (each on its own copy of the data), so that drift on a noisy machine weighs on both."""
    stack.up(settings, progress=lambda *_: None)
    runs = [scratch_settings(settings, f"bench-{i}") for i in range(2)]
    steady = scratch_settings(settings, "bench-steady")
    raws = [run.updated(redis={"prefix": run.redis.prefix + "-raw"}) for run in runs]
    for s in (*runs, steady):
        stack.ensure_topics(s)
    try:
        data = list(SyntheticSource(events=events, seed=5).events_iter())
        for run in runs:
            replay(data, run, progress=False)
        raw_kafka = _raw_kafka_rate(runs[0], events)
        raw_redis = [_raw_redis_rate(raws[0], data)]
        worker = [_worker_rate(runs[0], events), _worker_rate(runs[1], events)]
        raw_redis.append(_raw_redis_rate(raws[1], data))
        fresh = _freshness(steady, steady_rate, steady_seconds)
    finally:
        for s in (*runs, steady, *raws):
            stack.delete_topics(s)
            FeatureStore(s).clear()
    raw_redis_rate, worker_rate = float(np.mean(raw_redis)), float(np.mean(worker))
    slower = min(raw_kafka, raw_redis_rate)
    return {
        "events": events,
        "worker_events_per_s": round(worker_rate, 1),
        "raw_kafka_consume_per_s": raw_kafka,
        "raw_redis_apply_per_s": round(raw_redis_rate, 1),
        "runs": {"worker": worker, "raw_redis": raw_redis},
        "worker_vs_slower_raw": round(worker_rate / slower, 3),
        "freshness_at_rate": steady_rate,
        "freshness": fresh,
        "targets": {"worker_vs_slower_raw": ">= 0.75", "freshness_p99_ms": "<= 50"},
        "passed": worker_rate / slower >= 0.75 and fresh["p99_ms"] <= 50,
    }
