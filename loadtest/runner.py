"""Run one load test: Locust headless (a child process), Serve's replicas sampled every second,
an optional stream worker, the nothing-lost check in Redis, the report folder.

Locust runs as ``python -m locust`` in its own process: Locust monkey-patches the
process with gevent, which Ray's client, kafka-python and the stream worker's threads
should not share, and a separate process gives the load generator its own core share.
The locustfile streams every request and every accepted event id to the report folder;
this process aligns them with the replica samples afterwards.
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from lab import process
from recsys.errors import INTERNAL, RecsysError, Unavailable
from recsys.settings import Settings
from loadtest import report
from loadtest.shapes import Profile

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
ROOT = LOCUSTFILE.parent.parent


class LoadTestError(RecsysError):
    """Locust could not run the load test at all (exit 70; no service to load is Unavailable, 69)."""
    exit_code = INTERNAL


@dataclass
class Options:
    profile: Profile
    host: str
    out: Path
    with_stream_worker: bool = True
    budgets: report.Budgets = field(default_factory=report.Budgets)
    settle_max_s: float = 60.0     # before the load: wait up to this long for replicas at the minimum
    cooldown_max_s: float = 45.0   # after the load: wait up to this long for replicas back at the minimum
    catchup_idle_s: float = 10.0   # the nothing-lost check gives up after this long without progress
    catchup_max_s: float = 120.0
    sample_every_s: float = 1.0
    stop_stream_worker_after_s: float | None = None  # fault injection (tests): drop the worker mid-run
    locust_env: dict = field(default_factory=dict)   # extra LOADTEST_* for the shoppers


def default_out(profile: str) -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return ROOT / "reports" / f"loadtest-{profile}-{stamp}"


# ---- replicas --------------------------------------------------------------

class ReplicaSampler:
    """Serve's replicas of the app, every ``every_s``, from its status API (wall-clock times):
    ``samples`` the running ones, ``wanted`` the ones the autoscaler has decided on (starting
    included), which rise a replica's start-up time earlier."""

    def __init__(self, settings: Settings, every_s: float = 1.0, progress=print):
        self.samples: list[tuple[float, int]] = []
        self.wanted: list[tuple[float, int]] = []
        self.every_s = every_s
        self.error: str | None = None
        self.min_replicas: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.available = self._connect(settings, progress)

    def _connect(self, settings: Settings, progress) -> bool:
        from lab import stack
        if not stack.ray_address(settings):
            self.error = "no local Ray cluster: replicas not sampled"
            return False
        try:
            from lab import serve_local as deploy
            deploy.connect_ray(settings, progress=lambda *_: None)
            auto = deploy.load_config()["deployments"]["RecsysApi"].get("autoscaling_config") or {}
            self.min_replicas = auto.get("min_replicas")
            if self.counts() is None:
                self.error = f"app {deploy.APP_NAME!r} not deployed on the local Ray cluster"
                return False
        except Exception as exc:  # Ray missing or unreachable: the test still runs, the SLO says why
            self.error = f"Serve status unavailable: {exc!r}"
            return False
        return True

    @staticmethod
    def counts() -> tuple[int, int] | None:
        """(running, wanted) replicas of the API deployment; None when the app is not deployed."""
        from lab import serve_local as deploy
        per = deploy.replica_states()
        if not per:
            return None
        states = per.get("RecsysApi") or next(iter(per.values()))
        return states.get("RUNNING", 0), sum(states.get(name, 0) for name in deploy.WANTED)

    def sample(self) -> int | None:
        """Running replicas now (and both counts recorded); None when not sampled."""
        try:
            counts = self.counts()
        except Exception as exc:  # a hiccup of the status API: skip this sample
            self.error = f"sampling failed once: {exc!r}"
            return None
        if counts is None:
            return None
        now = time.time()
        self.samples.append((now, counts[0]))
        self.wanted.append((now, counts[1]))
        return counts[0]

    def wait_for(self, target: int, max_s: float) -> bool:
        """Sample until the count is at most ``target`` or max_s passes."""
        def down_to_target() -> bool:
            n = self.sample()
            return n is not None and n <= target
        try:
            process.wait_until(down_to_target, max_s, f"{target} replicas", every_s=self.every_s)
        except process.NotInTime:
            return False
        return True

    def start(self) -> None:
        def loop():
            while not self._stop.wait(self.every_s):
                self.sample()
        self._thread = threading.Thread(target=loop, name="replica-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=10)


# ---- stream worker ---------------------------------------------------------

class WorkerThread:
    """The project's stream worker in a thread of this process, stoppable at any time.

    Supervised like a deployed worker: if it dies (Redis or Kafka restarting under it) a new
    one takes over within a second, and replays from the last committed offsets (the dedup
    markers absorb the replay). ``stop`` (or ``kill`` for fault injection) ends it for good.
    """

    def __init__(self, settings: Settings):
        self.settings = settings
        self.worker = None
        self.errors: list[str] = []
        self.stats = {"consumed": 0, "applied": 0, "duplicates": 0, "dlq": 0}
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stream-worker", daemon=True)

    def _run(self):
        from recsys.stream import StreamWorker
        while not self._stopping.is_set():
            try:
                self.worker = StreamWorker(self.settings)
                if self._stopping.is_set():  # stopped while it was being created
                    self.worker.close()
                    break
                self.worker.run()
            except Exception as exc:
                self.errors.append(repr(exc)[:300])
                self._stopping.wait(1.0)
            finally:
                if self.worker is not None:
                    for key in self.stats:
                        self.stats[key] += getattr(self.worker.stats, key)
                    self.worker = None

    def start(self) -> None:
        self._thread.start()

    def kill(self) -> None:
        """Stop consuming now (what ``stop`` does, without waiting)."""
        self._stopping.set()
        worker = self.worker
        if worker is not None:
            worker.stopping.set()

    def stop(self) -> dict:
        self.kill()
        self._thread.join(timeout=30)
        return {**self.stats, "restarts": len(self.errors), "errors": self.errors[-3:]}


# ---- events in Redis -------------------------------------------------------

def present(redis_client, keys, events: list[tuple[str, str]], chunk: int = 5000) -> list[bool]:
    """Whether each (event id, pseudonymous user) has its dedup marker, in pipelined EXISTS round trips."""
    out: list[bool] = []
    for i in range(0, len(events), chunk):
        pipe = redis_client.pipeline(transaction=False)
        for event_id, user in events[i:i + chunk]:
            pipe.exists(keys.dedup(user, event_id))
        out += [bool(x) for x in pipe.execute()]
    return out


def wait_in_redis(settings: Settings, posted: list[tuple[str, str]], idle_s: float, max_s: float) -> tuple[int, list[str], float]:
    """Poll until every posted (event id, raw user id) is in Redis, or no progress for idle_s, or
    max_s. Returns (found, a few missing event ids, seconds waited)."""
    from recsys.feature_store import connect
    from recsys.features import Keys
    from recsys.privacy import Pseudonyms
    client, keys, pseudonyms = connect(settings), Keys(settings.redis.prefix), Pseudonyms.of(settings)
    started = last_progress = time.monotonic()
    missing = [(event_id, pseudonyms.user_id(user)) for event_id, user in posted]
    while True:
        flags = present(client, keys, missing)
        still = [e for e, ok in zip(missing, flags) if not ok]
        now = time.monotonic()
        if len(still) < len(missing):
            last_progress = now
        missing = still
        if not missing or now - last_progress >= idle_s or now - started >= max_s:
            break
        time.sleep(0.5)
    client.close()
    return len(posted) - len(missing), [event_id for event_id, _ in missing[:10]], round(time.monotonic() - started, 2)


# ---- the stream seen by Prometheus -----------------------------------------

def stream_series(settings: Settings, start: float, end: float) -> tuple[dict | None, dict]:
    """The stream worker's consumer lag and freshness p99 over the run (seconds since ``start``,
    wall clock), from the local Prometheus; (None, why) when it is not running. The note
    gives each series' maximum."""
    from lab import prometheus
    if not prometheus.answers(settings):
        return None, {"prometheus": "not running (`recsys stack up --monitoring`): no lag or freshness series"}
    every = settings.monitoring.scrape_interval_s
    window = f"{max(15, int(3 * every))}s"  # a rate needs at least two scrapes
    queries = {
        "lag": f'sum(recsys_consumer_lag{{group="{settings.kafka.stream_group}"}})',
        "freshness_p99_s": f'histogram_quantile(0.99, sum by (le) (rate(recsys_stream_freshness_seconds_bucket'
                           f'{{job="stream"}}[{window}])))',
    }
    series = {}
    for name, expr in queries.items():
        found = prometheus.query_range(settings, expr, start - 10, end + every, every)
        series[name] = [(round(float(t) - start, 1), float(v)) for t, v in (found[0]["values"] if found else [])
                        if v not in ("NaN", "+Inf")]
    note = {"prometheus": prometheus.url(settings), "queries": queries,
            **{f"max_{name}": max((v for _, v in points), default=None) for name, points in series.items()}}
    return series, note


# ---- the run ---------------------------------------------------------------

def _service_answers(host: str, timeout_s: float = 10.0) -> None:
    from lab.serve_local import wait_http
    try:
        wait_http(f"{host.rstrip('/')}/healthz", timeout_s=timeout_s)
    except TimeoutError:
        raise Unavailable(f"{host}/healthz does not answer: deploy the app first (`recsys serve up`)") from None


def start_locust(host: str, env: dict, log: Path, *options: str) -> subprocess.Popen:
    """Locust headless against ``host``, a child process with its output in ``log``; ``env``
    carries the shoppers' LOADTEST_* variables (the profile, the key). Stop it with ``end``."""
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", host,
           "--loglevel", "WARNING", "--only-summary", "--exit-code-on-error", "0", *options]
    env = {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))}
    return process.spawn(cmd, log, env=env, cwd=ROOT, append=False)


def end(proc: subprocess.Popen) -> int:
    """SIGTERM (Locust then writes its reports), SIGKILL after 20 s."""
    process.stop(proc, grace_s=20)
    return proc.returncode


@contextlib.contextmanager
def _api_key(settings: Settings, name: str):
    """LOADTEST_API_KEY if set (a remote host's key), else a key made for this run and revoked
    after it, with no rate limit that the run could reach."""
    if os.environ.get("LOADTEST_API_KEY"):
        yield os.environ["LOADTEST_API_KEY"]
        return
    from recsys.auth import KeyStore, Scope
    from recsys.feature_store import connect
    with KeyStore(settings, connect(settings)).temporary(f"loadtest-{name}", [Scope.events_write, Scope.recs_read]) as key:
        yield key


def _run_locust(opts: Options, env: dict, progress) -> tuple[int, float]:
    out = opts.out
    limit = opts.profile.duration_s + 60
    started = time.monotonic()
    proc = start_locust(opts.host, env, out / "locust.log", "--csv", str(out / "locust"), "--csv-full-history",
                        "--html", str(out / "locust.html"))
    try:
        rc = proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        progress(f"loadtest: Locust still running after {limit:.0f}s; stopping it")
        rc = end(proc)
    except BaseException:  # Ctrl-C: never leave the load running
        end(proc)
        raise
    return rc, time.monotonic() - started


def run(settings: Settings, opts: Options, progress=print) -> dict:
    """Run the profile against opts.host, write the report folder, return summary.json's content."""
    profile = opts.profile
    _service_answers(opts.host)
    out = opts.out
    out.mkdir(parents=True, exist_ok=True)
    wall_start = time.time()

    sampler = ReplicaSampler(settings, opts.sample_every_s, progress)
    if sampler.available and sampler.min_replicas is not None:
        progress(f"loadtest: waiting for replicas at the minimum ({sampler.min_replicas})")
        sampler.wait_for(sampler.min_replicas, opts.settle_max_s)
    sampler.start()

    worker = killer = None
    if opts.with_stream_worker:
        from recsys import metrics
        metrics.serve(settings.monitoring.stream_port, settings.monitoring.bind_host)  # Prometheus scrapes the worker as job "stream"
        worker = WorkerThread(settings)
        worker.start()
        if opts.stop_stream_worker_after_s is not None:
            killer = threading.Timer(opts.stop_stream_worker_after_s, worker.kill)
            killer.start()

    env = {**os.environ, **opts.locust_env, "LOADTEST_PROFILE_SPEC": json.dumps(profile.spec()),
           "LOADTEST_RECORD_DIR": str(out)}
    progress(f"loadtest: profile {profile.name} ({profile.duration_s:.0f}s) against {opts.host}; report in {out}")
    try:
        with _api_key(settings, profile.name) as key:
            rc, locust_s = _run_locust(opts, {**env, "LOADTEST_API_KEY": key}, progress)
        start_file = out / "shape_start.txt"
        if not start_file.exists():
            raise LoadTestError(f"Locust did not start the load (exit {rc}); see {out / 'locust.log'}")
        t0 = float(start_file.read_text())
        posted_file = out / "events_posted.txt"
        posted = [tuple(x.split()) for x in posted_file.read_text().splitlines() if x.strip()] if posted_file.exists() else []

        # Cool-down: no load; wait for Serve to come back to the minimum (downscale_delay_s).
        cooldown_s = 0.0
        if sampler.available and sampler.min_replicas is not None:
            progress("loadtest: cool-down, waiting for replicas back at the minimum")
            c0 = time.monotonic()
            sampler.wait_for(sampler.min_replicas, opts.cooldown_max_s)
            cooldown_s = round(time.monotonic() - c0, 1)

        progress(f"loadtest: checking {len(posted)} accepted events in Redis")
        found, missing, waited = wait_in_redis(settings, posted, opts.catchup_idle_s, opts.catchup_max_s)
    finally:
        if killer:
            killer.cancel()
        worker_stats = worker.stop() if worker else None
        sampler.stop()

    req = report.Requests.read_csv(out / "requests.csv", t0)
    replicas = [(t - t0, n) for t, n in sampler.samples]
    wanted = [(t - t0, n) for t, n in sampler.wanted]
    windows = profile.windows()
    end_s = max([profile.duration_s] + [t for t, _ in replicas])
    first = min([0.0] + [t for t, _ in replicas])
    rows = report.timeline(req, replicas, lambda t: profile.users_at(t) if t >= 0 else 0, end_s, start_s=max(-10.0, first))
    report.write_csv(rows, out / "timeline.csv")
    report.write_csv([{"t": round(t, 3), "replicas": n, "wanted": w} for (t, n), (_, w) in zip(replicas, wanted)],
                     out / "replicas.csv")
    slos = report.evaluate(req, replicas, windows, len(posted), found, opts.budgets, sampler.min_replicas)
    stream, stream_note = stream_series(settings, t0, t0 + end_s)
    if stream:
        report.write_csv([{"t": t, "series": name, "value": v} for name, points in stream.items() for t, v in points],
                         out / "stream.csv")
    plot_windows = {**windows, "after": (profile.duration_s, end_s)} if end_s > profile.duration_s else windows
    plot_path = None
    try:
        plot_path = str(report.plot(rows, plot_windows, out / "loadtest.png",
                                    f"recsys load test, profile {profile.name} ({opts.host})", opts.budgets.p99_ms,
                                    stream))
    except ImportError as exc:
        progress(f"loadtest: no plot ({exc}); install matplotlib")

    summary = {
        "profile": profile.to_json(), "host": opts.host, "passed": all(s["passed"] for s in slos), "slos": slos,
        "headline": report.headline(req, replicas, windows, wanted),
        "events": {"posted": len(posted), "in_redis": found, "missing_examples": missing, "waited_s": waited,
                   "stream_worker": worker_stats if worker else "external", "monitoring": stream_note},
        "replicas": {"min_replicas": sampler.min_replicas, "sampled": bool(sampler.samples),
                     "error": sampler.error, "cooldown_wait_s": cooldown_s},
        "locust": {"exit_code": rc, "seconds": round(locust_s, 1)},
        "budgets": report.as_dict(opts.budgets),
        "started": datetime.fromtimestamp(wall_start, timezone.utc).isoformat(timespec="seconds"),
        "duration_s": round(time.time() - wall_start, 1),
        "files": {"folder": str(out), "plot": plot_path, "html": str(out / "locust.html"),
                  "summary": str(out / "summary.json")},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary
