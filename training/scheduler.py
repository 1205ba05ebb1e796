"""Retraining on a schedule and on triggers, behind a quality gate.

One run: the sliding window of the event archive -> Ray Train -> the candidate and the
current model evaluated on the same newest hold-out (EVALUATION.md's protocol on the
window) -> the gate -> promote, or record the rejection and leave serving untouched.
The Serve replicas follow the registry's ``current`` by themselves (hot swap).

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

import pyarrow as pa
import pyarrow.compute as pc
import redis
from croniter import croniter

from recsys.archive import read_events
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


def gate(candidate_hr: float, current_hr: Optional[float], popularity_hr: float, tolerance: float) -> tuple[bool, str]:
    """Publish only a candidate at least as good as the current model (within tolerance) and above most-popular."""
    if candidate_hr <= popularity_hr:
        return False, f"candidate HR@10 {candidate_hr:.4f} is not above most-popular {popularity_hr:.4f}"
    if current_hr is not None and candidate_hr < current_hr * (1 - tolerance):
        return False, (f"candidate HR@10 {candidate_hr:.4f} is below the current model's {current_hr:.4f} "
                       f"x (1 - {tolerance:g})")
    against = f"current {current_hr:.4f}" if current_hr is not None else "no current model"
    return True, f"candidate HR@10 {candidate_hr:.4f} vs {against}, most-popular {popularity_hr:.4f}"


def training_window(settings: Settings) -> pa.Table:
    """The newest ``retraining.window_days`` of the archive (everything for 0)."""
    table = read_events(settings)
    if table.num_rows and settings.retraining.window_days > 0:
        newest = pc.max(table["ts"]).as_py()
        table = table.filter(pc.greater(table["ts"], newest - int(settings.retraining.window_days * 86_400_000)))
    return table


def run_once(settings: Settings, trigger: str = "manual", table: Optional[pa.Table] = None) -> dict:
    """One retraining run under the lock; returns its history record. Raises Busy if another runs.

    ``table`` trains on other data than the archive's window (a test's corrupted data, say);
    the gate still judges both models on the window's hold-out, never on the data under test.
    """
    from training.job import evaluate_version, train
    registry = Registry(settings.registry_dir)
    with RunLock(settings) as lock:
        registry.clean_temp()  # what a killed run left behind
        record = RunRecord(run_id=uuid.uuid4().hex[:12], trigger=trigger,
                           started_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        started = time.monotonic()
        try:
            holdout = training_window(settings)
            card = train(holdout if table is None else table, workers=settings.training.workers,
                         epochs=settings.training.epochs, settings=settings, promote=False)
            lock.check()  # not worth evaluating if it cannot promote
            metrics = card["metrics"]
            if table is not None:
                metrics = evaluate_version(registry.path(card["version"]), holdout, settings)["metrics"]
            record.window = card["data_window"]
            record.candidate = {"version": card["version"], "hr@10": metrics["two_tower"]["hr@10"],
                                "ndcg@10": metrics["two_tower"]["ndcg@10"]}
            record.popularity_hr10 = metrics["popularity"]["hr@10"]
            current_version = registry.current()
            current_hr = None
            if current_version:
                cur = evaluate_version(registry.path(current_version), holdout, settings)["metrics"]["two_tower"]
                current_hr = cur["hr@10"]
                record.current = {"version": current_version, "hr@10": cur["hr@10"], "ndcg@10": cur["ndcg@10"]}
            passed, record.reason = gate(record.candidate["hr@10"], current_hr, record.popularity_hr10,
                                         settings.retraining.gate_tolerance)
            lock.check()  # a run whose lock lapsed must not promote: another may be promoting
            if passed:
                registry.promote(card["version"])
            record.decision = "published" if passed else "rejected"
        except Exception as exc:
            record.decision, record.reason = "failed", f"{type(exc).__name__}: {exc}"[:500]
        record.duration_s = round(time.monotonic() - started, 1)
        _append_history(settings, record)
        return asdict(record)


def new_events_since_current(settings: Settings) -> int:
    """Archived events newer than the data the current model was trained on."""
    registry = Registry(settings.registry_dir)
    version = registry.current()
    since = registry.show(version).get("data_window", {}).get("max_ts", 0) if version else 0
    table = read_events(settings)
    return int(pc.sum(pc.greater(table["ts"], since)).as_py() or 0)


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


def run_scheduler(settings: Settings, max_runs: Optional[int] = None, log=print) -> None:
    """Poll the triggers every ``retraining.poll_s``; run when one fires and the lock is free."""
    if settings.retraining.cron and not croniter.is_valid(settings.retraining.cron):
        raise ValueError(f"RECSYS_RETRAINING_CRON {settings.retraining.cron!r} is not a cron expression")
    runs = 0
    while max_runs is None or runs < max_runs:
        history = read_history(settings)
        last = datetime.fromisoformat(history[-1]["started_at"]).timestamp() if history else None
        trigger = due_trigger(settings, last, time.time())
        if trigger:
            try:
                record = run_once(settings, trigger)
                runs += 1
                log(json.dumps(record))
            except Busy as exc:
                log(f"scheduler: {exc}; waiting")
        time.sleep(settings.retraining.poll_s)
