"""Retraining on a schedule and on triggers, behind a quality gate.

One run: the sliding window of the event archive -> Ray Train -> the candidate and the
current model scored on the same newest hold-out (EVALUATION.md's protocol on the window,
per user) -> the gate (a paired bootstrap interval of the HR@10 difference against a
non-inferiority margin, and most-popular as a floor) -> promote, or record the rejection and
leave serving untouched.
The Serve replicas follow the registry's ``current`` by themselves (hot swap).
An archive above ``training.memory_max_events`` goes through the Ray Data engine
(``training.ray_data``): the window, the examples and the held-out targets the gate scores.

Only one run at a time, across processes and machines: a lock in Redis with an expiry,
renewed while the run lives, so a crashed holder frees it within ``retraining.lock_ttl_s``.
A run that dies leaves the registry as it was: a version is renamed into place only when
complete, and ``current`` moves only after the gate.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import redis
from croniter import croniter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from recsys import evaluation
from recsys.archive import newest_ts, read_events, stored_after
from recsys.errors import Busy, LockLost
from recsys.feature_store import connect
from recsys.registry import Registry
from recsys.settings import Settings

_RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
_RENEW = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end return 0"


class RunLock:
    """A Redis lock with an expiry, renewed by a thread while held; released only by its owner.

    The renewal outlives Redis errors. A renewal that does not succeed within the TTL of the
    last one (Redis down or blocked, or the key taken over) marks the lock lost: ``check()``
    then raises, and the run must not promote (another run may be promoting meanwhile)."""

    def __init__(self, settings: Settings):
        self.redis = connect(settings)
        self.key = f"{settings.redis.prefix}:lock:retrain"
        self.ttl_ms = int(settings.retraining.lock_ttl_s * 1000)
        self.token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._stop = threading.Event()
        self.lost: Optional[str] = None

    def __enter__(self):
        if not self.redis.set(self.key, self.token, nx=True, px=self.ttl_ms):
            raise Busy(f"another retraining run is in progress (lock held by {self.redis.get(self.key)})")
        self._thread = threading.Thread(target=self._renew, args=(time.monotonic() + self.ttl_ms / 1000,), daemon=True)
        self._thread.start()
        return self

    def _renew(self, valid_until: float):
        ttl_s = self.ttl_ms / 1000
        while not self._stop.wait(ttl_s / 3):
            try:
                renewed, error = self.redis.eval(_RENEW, 1, self.key, self.token, self.ttl_ms), None
            except redis.RedisError as exc:
                renewed, error = None, exc
            now = time.monotonic()
            if renewed == 1 and now <= valid_until:
                valid_until = now + ttl_s
                continue
            if renewed == 0:
                self.lost = f"the run lock expired (not renewed within its {ttl_s:g} s TTL): another run may hold it"
            elif renewed == 1:  # renewed, but only after it had lapsed: another run may have held it
                self.lost = f"the run lock was renewed only after its {ttl_s:g} s TTL had passed"
            elif now > valid_until:
                self.lost = f"the run lock was not renewed within its {ttl_s:g} s TTL: {error!r}"
            else:
                continue  # an error within the TTL: try again
            return

    def check(self) -> None:
        if self.lost:
            raise LockLost(self.lost)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        try:
            self.redis.eval(_RELEASE, 1, self.key, self.token)
        except redis.RedisError:
            pass  # it expires by itself


@dataclass
class RunRecord:
    run_id: str
    trigger: str
    started_at: str
    decision: str = "failed"  # published | rejected | failed
    reason: str = ""
    window: dict = field(default_factory=dict)
    candidate: dict = field(default_factory=dict)
    current: dict = field(default_factory=dict)
    popularity_hr10: Optional[float] = None
    interval: dict = field(default_factory=dict)  # candidate - current HR@10, paired bootstrap
    duration_s: Optional[float] = None


def history_path(settings: Settings) -> Path:
    return settings.registry_dir / "history.jsonl"


def read_history(settings: Settings) -> list[dict]:
    path = history_path(settings)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _append_history(settings: Settings, record: RunRecord) -> None:
    settings.registry_dir.mkdir(parents=True, exist_ok=True)
    with open(history_path(settings), "a") as fh:  # one write of one line: appends do not interleave
        fh.write(json.dumps(asdict(record)) + "\n")


def gate(candidate_hits: np.ndarray, current_hits: Optional[np.ndarray], popularity_hits: np.ndarray,
         margin: float, resamples: int = 1000) -> tuple[bool, str, dict]:
    """(publish?, why, the interval) for per-user hits (HR@10) of the models on the same targets.

    Publish only a candidate above most-popular whose paired bootstrap 95% interval of
    (candidate - current) has its lower bound above -margin (non-inferiority; EVALUATION.md).
    """
    cand, pop = float(np.mean(candidate_hits)), float(np.mean(popularity_hits))
    ci, span = {}, "no current model"
    if current_hits is not None:
        ci = evaluation.paired_bootstrap(candidate_hits, current_hits, resamples) | {"margin": margin}
        span = (f"candidate - current HR@10 {ci['diff']:+.4f}, 95% interval [{ci['low']:+.4f}, {ci['high']:+.4f}] "
                f"over {ci['users']} users")
    if cand <= pop:
        return False, f"candidate HR@10 {cand:.4f} is not above most-popular {pop:.4f}; {span}", ci
    if ci and ci["low"] <= -margin:
        return False, f"{span}: the lower bound is not above the margin -{margin:g}", ci
    return True, f"candidate HR@10 {cand:.4f}, {span}{f', above -{margin:g}' if ci else ''}; most-popular {pop:.4f}", ci


def judge(settings: Settings, registry: Registry, candidate: str, current: Optional[str], holdout) -> dict:
    """Both published models scored per user on the holdout's test targets, and the gate's
    verdict: {passed, reason, interval, window, candidate, current, popularity_hr10}. ``holdout``:
    the window's event table, or its held-out targets on the Ray Data engine (``ArchiveData``)."""
    from training.job import held_out_ranks, version_ranks
    versions = [candidate] + ([current] if current else [])
    paths = [registry.path(v) for v in versions]
    split, ranks = (version_ranks(paths, holdout, settings) if isinstance(holdout, pa.Table)
                    else held_out_ranks(paths, holdout))

    def summary(version: str) -> dict:
        m = evaluation.metrics_from_ranks(ranks[version])
        return {"version": version, "hr@10": m["hr@10"], "ndcg@10": m["ndcg@10"]}
    popularity_hits = evaluation.popularity_ranks(split) < 10
    passed, reason, interval = gate(ranks[candidate] < 10, ranks[current] < 10 if current else None, popularity_hits,
                                    settings.retraining.gate_margin, settings.retraining.gate_resamples)
    return {"passed": passed, "reason": reason, "interval": interval, "window": split.window(),
            "candidate": summary(candidate), "current": summary(current) if current else {},
            "popularity_hr10": round(float(popularity_hits.mean()), 4)}


def window_start(settings: Settings) -> Optional[int]:
    """The training window's bound: events after it (None: everything)."""
    if settings.retraining.window_days <= 0:
        return None
    newest = newest_ts(settings.archive_dir)
    return None if newest is None else newest - int(settings.retraining.window_days * 86_400_000)


def training_window(settings: Settings) -> pa.Table:
    """The newest ``retraining.window_days`` of the archive (everything for 0)."""
    table = read_events(settings)
    if table.num_rows and settings.retraining.window_days > 0:
        newest = pc.max(table["ts"]).as_py()
        table = table.filter(pc.greater(table["ts"], newest - int(settings.retraining.window_days * 86_400_000)))
    return table


def _train_and_judge(settings: Settings, registry: Registry, table: Optional[pa.Table], lock: RunLock
                     ) -> tuple[dict, dict]:
    """(the candidate's card, the gate's verdict): in memory, or on the Ray Data engine for a
    large archive (``training.data_engine``), where one Ray serves the data, training and gate.
    A lapsed lock ends the run before the gate: it could not promote."""
    from training.job import default_config, ray_connected, train
    from training.ray_data import ArchiveData, streams_archive
    kw = dict(workers=settings.training.workers, epochs=settings.training.epochs, settings=settings, promote=False)
    if table is not None or not streams_archive(settings):
        holdout = training_window(settings)
        card = train(holdout if table is None else table, **kw)
        lock.check()
        return card, judge(settings, registry, card["version"], registry.current(), holdout)
    with ray_connected(settings, settings.training.workers):
        current = registry.current()
        # the examples keep the longest history either model reads
        history = max([default_config()["history"],
                       *([registry.show(current).get("config", {}).get("history", 0)] if current else [])])
        data = ArchiveData(settings, history, settings.features.recent_items, settings.training.data_block_rows,
                           after_ts=window_start(settings))
        card = train("archive", prepared=data, **kw)
        lock.check()
        return card, judge(settings, registry, card["version"], current, data)


def run_once(settings: Settings, trigger: str = "manual", table: Optional[pa.Table] = None) -> dict:
    """One retraining run under the lock; returns its history record. Raises Busy if another runs.

    ``table`` trains on other data than the archive's window (a test's corrupted data, say);
    the gate still judges both models on the window's hold-out, never on the data under test.
    """
    registry = Registry(settings.registry_dir)
    with RunLock(settings) as lock:
        registry.clean_temp()  # what a killed run left behind
        record = RunRecord(run_id=uuid.uuid4().hex[:12], trigger=trigger,
                           started_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        started = time.monotonic()
        try:
            card, verdict = _train_and_judge(settings, registry, table, lock)
            passed = verdict.pop("passed")
            for name, value in verdict.items():
                setattr(record, name, value)
            lock.check()  # a run whose lock lapsed must not promote: another may be promoting
            if passed:
                registry.promote(card["version"])
            record.decision = "published" if passed else "rejected"
        except Exception as exc:
            record.decision, record.reason = "failed", f"{type(exc).__name__}: {exc}"[:500]
        record.duration_s = round(time.monotonic() - started, 1)
        _append_history(settings, record)
        return asdict(record)


def _unix(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def schedule_interval_s(settings: Settings, now: float) -> float:
    """The schedule's period: the interval, or the gap between the cron's next two firings."""
    if settings.retraining.cron:
        firings = croniter(settings.retraining.cron, now)
        first = firings.get_next(float)
        return firings.get_next(float) - first
    return settings.retraining.interval_s


def run_metrics(settings: Settings, history: list[dict], now: float) -> dict:
    """The scheduler's Prometheus figures from the run history and the registry (pure but for
    reading the model card): what ``SchedulerMetrics`` exports, by metric name."""
    ended = [r for r in history if r.get("duration_s") is not None]
    runs = {d: sum(r["decision"] == d for r in history) for d in ("published", "rejected", "failed")}
    rejections = 0
    for r in reversed(history):
        if r["decision"] == "published":
            break
        rejections += r["decision"] == "rejected"
    out: dict = {"recsys_retrain_runs": runs, "recsys_retrain_consecutive_rejections": rejections,
                 "recsys_retrain_interval_seconds": schedule_interval_s(settings, now)}
    if history:
        last = history[-1]
        out["recsys_retrain_last_start_timestamp_seconds"] = _unix(last["started_at"])
        out["recsys_retrain_last_decision_info"] = {d: float(last["decision"] == d) for d in runs}
        out["recsys_retrain_hr10"] = {m: last[m]["hr@10"] for m in ("candidate", "current") if last.get(m)}
    if ended:
        out["recsys_retrain_last_end_timestamp_seconds"] = _unix(ended[-1]["started_at"]) + ended[-1]["duration_s"]
    successes = [_unix(r["started_at"]) + r["duration_s"] for r in ended if r["decision"] == "published"]
    registry = Registry(settings.registry_dir)
    current = registry.current()
    if current:
        created = _unix(registry.show(current)["created_at"])
        out["recsys_model_created_timestamp_seconds"] = {current: created}
        successes.append(created)
    if successes:
        out["recsys_retrain_last_success_timestamp_seconds"] = max(successes)
    return out


_SCHEDULER_METRICS = {  # name: help
    "recsys_retrain_runs": "retraining runs by decision (published, rejected, failed)",
    "recsys_retrain_consecutive_rejections": "gate rejections since the last published run",
    "recsys_retrain_interval_seconds": "the schedule's period",
    "recsys_retrain_last_start_timestamp_seconds": "start of the last retraining run",
    "recsys_retrain_last_decision_info": "1 for the last run's decision",
    "recsys_retrain_last_end_timestamp_seconds": "end of the last retraining run that ended",
    "recsys_retrain_hr10": "HR@10 of the last run's candidate and of the model it was compared with",
    "recsys_model_created_timestamp_seconds": "creation time of the current (served) model",
    "recsys_retrain_last_success_timestamp_seconds": "the newest of: the end of the last published run, "
                                                     "the current model's creation",
}
# The label of the metrics that have one.
_SCHEDULER_LABELS = {"recsys_retrain_runs": "decision", "recsys_retrain_hr10": "model",
                     "recsys_model_created_timestamp_seconds": "version", "recsys_retrain_last_decision_info": "decision"}


class SchedulerMetrics(Collector):
    """Read at each scrape, so the figures survive a restart of the scheduler and count runs
    made by ``recsys retrain-now`` as well. A run of this scheduler still going (``running_since``)
    is the last run started."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.running_since: Optional[float] = None

    def collect(self):
        figures = run_metrics(self.settings, read_history(self.settings), time.time())
        if self.running_since is not None:
            figures["recsys_retrain_last_start_timestamp_seconds"] = self.running_since
        for name, value in figures.items():
            kind = CounterMetricFamily if name == "recsys_retrain_runs" else GaugeMetricFamily
            label = _SCHEDULER_LABELS.get(name)
            family = kind(name, _SCHEDULER_METRICS[name], labels=[label] if label else None)
            if isinstance(value, dict):
                for key, v in value.items():
                    family.add_metric([key], v)
            else:
                family.add_metric([], value)
            yield family


def new_events_since_current(settings: Settings) -> int:
    """Archived events newer than the data the current model was trained on."""
    registry = Registry(settings.registry_dir)
    version = registry.current()
    since = registry.show(version).get("data_window", {}).get("max_ts", 0) if version else 0
    return stored_after(settings.archive_dir, since)


def due_trigger(settings: Settings, last_run_at: Optional[float], now: float) -> Optional[str]:
    """Which trigger fires now, if any: the schedule (cron or interval), then new events."""
    if last_run_at is None:
        return "schedule"
    if settings.retraining.cron:
        if croniter(settings.retraining.cron, last_run_at).get_next(float) <= now:
            return "schedule"
    elif now - last_run_at >= settings.retraining.interval_s:
        return "schedule"
    if new_events_since_current(settings) >= settings.retraining.min_new_events:
        return "new-events"
    return None


def run_scheduler(settings: Settings, max_runs: Optional[int] = None, log=print,
                  metrics: Optional[SchedulerMetrics] = None) -> None:
    """Poll the triggers every ``retraining.poll_s``; run when one fires and the lock is free."""
    if settings.retraining.cron and not croniter.is_valid(settings.retraining.cron):
        raise ValueError(f"RECSYS_RETRAINING_CRON {settings.retraining.cron!r} is not a cron expression")
    runs = 0
    while max_runs is None or runs < max_runs:
        history = read_history(settings)
        last = datetime.fromisoformat(history[-1]["started_at"]).timestamp() if history else None
        trigger = due_trigger(settings, last, time.time())
        if trigger:
            if metrics is not None:
                metrics.running_since = time.time()
            try:
                record = run_once(settings, trigger)
                runs += 1
                log(json.dumps(record))
            except Busy as exc:
                log(f"scheduler: {exc}; waiting")
            finally:
                if metrics is not None:
                    metrics.running_since = None
        time.sleep(settings.retraining.poll_s)
