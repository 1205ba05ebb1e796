"""``recsys bench serve``: four ways of answering the same requests, in one run.

  a  the no-op endpoint behind Ray Serve's default ingress (its Python proxy): the old floor
  b  the no-op endpoint behind the HAProxy ingress (Serve's HA proxy + throughput-optimized modes)
  c  the recommendation endpoint behind the HAProxy ingress: what ``recsys serve`` runs
  d  the same FastAPI app and handler code under plain uvicorn, no Serve: the ceiling

With ``levers``, (c) is also measured with the request path's cost levers of issue 33
(``LEVERS``: settings of ``serving``) all off ("c-none") and each one alone on ("c+<lever>"),
in the same run; (c) itself has them all on, as configured.

Every variant gets the same closed-loop HTTP client (a separate process), concurrency and
known users, its own warm-up, and two measured runs in alternating order (a b c d, then
d c b a), so a noisy neighbour hurts all alike. Besides req/s and latency, each run counts
the CPU time of every process on the serving path (proxy or HAProxy, replicas, controller;
uvicorn's workers) per answered request: on a shared machine that is steadier than req/s.
"""
from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import random
import sys
import time

import numpy as np
import psutil
from fastapi import FastAPI, Query
from ray import serve

from lab import process, stack
from recsys.auth import KeyStore, Scope
from recsys.errors import RecsysError
from recsys.feature_store import FeatureStore
from recsys.privacy import Pseudonyms
from recsys.settings import Settings
from lab.serve_local import base_url, connect_ray, load_config, serve_up, start_serve, wait_http

noop_app = FastAPI()


@noop_app.get("/v1/recommendations/{user_id}")
def noop_recommendations(user_id: str, k: int = Query(10, ge=1, le=100)) -> dict:
    return {"user_id": user_id, "items": []}


@serve.deployment
@serve.ingress(noop_app)
class NoopApi:
    """The recommendation route answered with nothing: what Serve itself costs."""


VARIANTS = {"a": ("proxy", "noop"), "b": ("haproxy", "noop"), "c": ("haproxy", "recsys"), "d": ("uvicorn", "recsys")}
TARGETS = {  # (c) against the others, from the same run
    "c/a throughput": (">=", 3.0), "c/a p99": ("<=", 1.0), "c/b throughput": (">=", 0.8),
    "c/d throughput": (">=", 0.5), "c/a cpu_ms_per_request": ("<=", 1 / 3),
    "c/b cpu_ms_per_request": ("<=", 1.3)}  # issue 33's standing budget
# The cost levers of the request path (issue 33): the serving settings that turn each off.
LEVERS = {"impressions_batch": {"impressions_flush_ms": 0.0}, "trending_cache": {"trending_cache_s": 0.0},
          "key_cache": {"key_cache_s": 0.0}, "tower_batch": {"tower_batch": False}}


def lever_variants() -> dict[str, dict]:
    """(c)'s extra variants, as serving settings: every lever off, then each one alone on."""
    off = {k: v for setting in LEVERS.values() for k, v in setting.items()}
    out = {"c-none": off}
    for name, setting in LEVERS.items():
        out[f"c+{name}"] = {k: v for k, v in off.items() if k not in setting}
    return out


async def _closed_loop(urls: list[str], concurrency: int, seconds: float, headers: dict) -> dict:
    import aiohttp
    latencies, errors, answered, personal = [], 0, 0, 0
    stages: dict[str, list[float]] = {}  # the replica's own time per stage, from Server-Timing
    deadline = time.monotonic() + seconds

    async def client(session):
        nonlocal errors, answered, personal
        while time.monotonic() < deadline:
            t0 = time.perf_counter()
            try:
                async with session.get(random.choice(urls)) as resp:
                    body = await resp.json() if resp.status == 200 else None
                    for stage, ms in server_timing(resp.headers.get("Server-Timing", "")).items():
                        stages.setdefault(stage, []).append(ms)
            except (aiohttp.ClientError, ValueError):
                body = None
            latencies.append((time.perf_counter() - t0) * 1e3)
            if body is None:
                errors += 1
                continue
            answered += 1
            personal += body.get("fallback") is False  # a model's answer, not trending

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency), headers=headers) as session:
        started = time.monotonic()
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
        elapsed = time.monotonic() - started
    lat = np.array(latencies)
    return {"answered": answered, "errors": errors, "personal": personal, "seconds": elapsed,
            "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
            "stages": stages}


def server_timing(header: str) -> dict[str, float]:
    """``features;dur=0.412, ann;dur=0.051`` -> {"features": 0.412, "ann": 0.051} (ms)."""
    out = {}
    for part in header.split(","):
        name, _, dur = part.strip().partition(";dur=")
        try:
            out[name] = float(dur)
        except ValueError:
            continue
    return out


def _load_process(urls, concurrency, seconds, headers, queue):
    queue.put(asyncio.run(_closed_loop(urls, concurrency, seconds, headers)))


def closed_loop(urls: list[str], concurrency: int, seconds: float, headers: dict) -> dict:
    """Closed-loop load from a separate process (the server keeps its own cores' share)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_load_process, args=(urls, concurrency, seconds, headers, queue))
    proc.start()
    result = queue.get(timeout=seconds + 120)
    proc.join()
    return result


def pids_named(*prefixes: str) -> set[int]:
    """Processes whose command line starts with one of these (Ray names its actors' processes
    ``ray::<Class>``, e.g. ``ray::ServeReplica:recsys:RecsysApi``)."""
    return {proc.info["pid"] for proc in psutil.process_iter(["pid", "cmdline"])
            if " ".join(proc.info["cmdline"] or []).startswith(prefixes)}


def serve_path_pids(s: Settings) -> set[int]:
    """Serve's processes (controller, proxies, replicas) and this stack's HAProxy."""
    return set(stack.haproxy_pids(s)) | pids_named("ray::Serve", "ray::ProxyActor", "ray::HAProxyManager")


def _cpu_s(pids: set[int]) -> dict[int, float]:
    out = {}
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            out[pid] = t.user + t.system
        except psutil.Error:
            continue
    return out


def measure(urls: list[str], concurrency: int, seconds: float, pids, headers: dict) -> dict:
    """One measured run; ``pids()`` names the serving path's processes (looked up again at
    the end, so a process that started during the run counts from zero)."""
    before = _cpu_s(pids())
    run = closed_loop(urls, concurrency, seconds, headers)
    after = _cpu_s(pids())
    run["cpu_s"] = sum(t - before.get(pid, 0.0) for pid, t in after.items())
    return run


def _summary(runs: list[dict]) -> dict:
    answered = sum(r["answered"] for r in runs)
    seconds = sum(r["seconds"] for r in runs)
    return {"requests": answered, "errors": sum(r["errors"] for r in runs),
            "rps": round(answered / seconds, 1),  # errors are not throughput
            "p50_ms": round(float(np.mean([r["p50_ms"] for r in runs])), 2),
            "p99_ms": round(max(r["p99_ms"] for r in runs), 2),
            "personal_share": round(sum(r["personal"] for r in runs) / answered, 3) if answered else 0.0,
            "stages_ms": {stage: {"p50": round(float(np.percentile(v, 50)), 4), "p99": round(float(np.percentile(v, 99)), 4)}
                          for stage in sorted({st for r in runs for st in r["stages"]})
                          for v in [np.concatenate([r["stages"].get(stage, []) for r in runs])]},
            "cpu_ms_per_request": round(1e3 * sum(r["cpu_s"] for r in runs) / answered, 3) if answered else None}


class IngressCluster:
    """The local Ray cluster in one ingress mode at a time, with the apps a variant needs."""

    def __init__(self, settings: Settings, replicas: int):
        self.settings, self.replicas, self.mode, self.serving = settings, replicas, None, None
        options = dict(load_config()["deployments"]["RecsysApi"])
        options.pop("autoscaling_config", None)
        self.options = {**options, "num_replicas": replicas}

    def ensure(self, mode: str, serving: dict | None = None) -> Settings:
        """The cluster in ``mode``, the recommendation app with ``serving`` settings on top of the
        configured ones (deployed again when they change)."""
        from serving.app import RecsysApi
        serving = serving or {}
        s = self.settings.updated(serving={**serving, "ingress": mode})
        if mode != self.mode:
            stack.stop_ray(s)
            connect_ray(s, progress=lambda *_: None)
            start_serve(s, load_config()["http"])
            serve.run(NoopApi.options(**self.options).bind(), name="noop", route_prefix="/noop", blocking=False)
            wait_http(f"{base_url(s)}/noop/v1/recommendations/u?k=10")
            self.mode, self.serving = mode, None
        if serving != self.serving:
            serve.run(RecsysApi.options(**self.options).bind(settings=s.model_dump(mode="json")),
                      name="recsys", route_prefix="/", blocking=False)
            wait_http(f"{base_url(s)}/readyz")
            self.serving = serving
        return s


class PlainUvicorn:
    """serving.plain under uvicorn with as many worker processes as Serve has replicas."""

    def __init__(self, settings: Settings, workers: int, port: int, ready_path: str = "/readyz"):
        self.url = f"http://127.0.0.1:{port}"
        env = {**os.environ, **{k: v for k, v in settings.environment().items() if v is not None}}
        self.proc = process.spawn(
            [sys.executable, "-m", "uvicorn", "serving.plain:create", "--factory", "--host", "127.0.0.1",
             "--port", str(port), "--workers", str(workers), "--no-access-log", "--log-level", "warning"],
            None, env=env)
        wait_http(f"{self.url}{ready_path}")

    def pids(self) -> set[int]:
        parent = psutil.Process(self.proc.pid)
        return {parent.pid, *(c.pid for c in parent.children(recursive=True))}

    def stop(self) -> None:
        process.stop(self.proc, grace_s=30)


def known_users(settings: Settings, n: int, candidates: int = 20_000) -> list[str]:
    """Users of the demo's synthetic data (ids u0, u1, ...) with history in Redis, which knows
    them only by their pseudonyms."""
    store, pseudonyms = FeatureStore(settings), Pseudonyms.of(settings)
    ids = [f"u{i}" for i in range(candidates)]
    pipe = store.redis.pipeline(transaction=False)
    for uid in ids:
        pipe.exists(store.keys.user(pseudonyms.user_id(uid), "recent"))
    known = [uid for uid, exists in zip(ids, pipe.execute()) if exists]
    if not known:
        raise RecsysError("bench serve needs users with history in Redis and a published model: run `recsys demo` first")
    return random.Random(0).sample(known, min(n, len(known)))


def bench_serve(settings: Settings, replicas: int = 2, concurrency: int = 16, seconds: float = 20.0,
                users: int = 500, uvicorn_port: int = 28090, levers: bool = False, progress=print) -> dict:
    ids = known_users(settings, users)
    cluster = IngressCluster(settings, replicas)
    plain = None
    extra = lever_variants() if levers else {}
    order = [*VARIANTS, *extra]
    runs = {v: [] for v in order}
    keys = KeyStore(settings, FeatureStore(settings).redis)
    with keys.temporary("bench-serve", [Scope.recs_read]) as key:
        headers = {"Authorization": f"Bearer {key}"}
        try:
            for sequence in (order, order[::-1]):
                for v in sequence:
                    mode, endpoint = VARIANTS.get(v, VARIANTS["c"])
                    if mode == "uvicorn":
                        plain = plain or PlainUvicorn(settings, replicas, uvicorn_port)
                        base, pids = plain.url, plain.pids
                    else:
                        s = cluster.ensure(mode, extra.get(v))
                        base = base_url(s) + ("/noop" if endpoint == "noop" else "")
                        pids = lambda s=s: serve_path_pids(s)  # noqa: E731
                    urls = [f"{base}/v1/recommendations/{u}?k=10" for u in ids]
                    progress(f"bench serve: {v} ({endpoint}, {mode}) warm-up, then {seconds / 2:g} s")
                    closed_loop(urls, concurrency, 3, headers)
                    runs[v].append(measure(urls, concurrency, seconds / 2, pids, headers))
        finally:
            if plain:
                plain.stop()
    stack.stop_ray(settings)
    serve_up(settings, progress=lambda *_: None)  # back to the configured ingress and autoscaling
    variants = {v: {"endpoint": VARIANTS.get(v, VARIANTS["c"])[1], "ingress": VARIANTS.get(v, VARIANTS["c"])[0],
                    **({"serving": extra[v]} if v in extra else {}), **_summary(runs[v])} for v in order}
    return {"replicas": replicas, "concurrency": concurrency, "users": len(ids), "model": _served_model(settings),
            "levers": lever_settings(settings), "variants": variants, **judge(variants)}


def lever_settings(settings: Settings) -> dict:
    """The serving settings behind (c)'s cost (its levers as configured, impressions sampled)."""
    names = sorted({k for setting in LEVERS.values() for k in setting} | {"impressions_sample", "impressions_batch_max",
                                                                          "tower_batch_max", "tower_batch_wait_s"})
    return {name: getattr(settings.serving, name) for name in names}


def _served_model(settings: Settings) -> dict:
    """The current version's catalogue and index: the ANN stage's figures depend on them."""
    from recsys.registry import Registry
    registry = Registry(settings.registry_dir)
    version = registry.current()
    card = registry.show(version) if version else {}
    ann = card.get("ann", {})
    return {"version": version, "items": ann.get("items"), "index": ann.get("kind"), "params": ann.get("params"),
            "compression": {k: v for k, v in card.get("compression", {}).items() if k in ("tower", "items")}}


def judge(variants: dict) -> dict:
    """The ratios of (c) to the others, and whether each meets its target."""
    a, b, c, d = (variants[v] for v in "abcd")
    ratios = {"c/a throughput": c["rps"] / a["rps"], "c/a p99": c["p99_ms"] / a["p99_ms"],
              "c/b throughput": c["rps"] / b["rps"], "c/d throughput": c["rps"] / d["rps"],
              "c/a cpu_ms_per_request": c["cpu_ms_per_request"] / a["cpu_ms_per_request"],
              "c/b cpu_ms_per_request": c["cpu_ms_per_request"] / b["cpu_ms_per_request"]}
    passed = {name: (ratios[name] >= bound if op == ">=" else ratios[name] <= bound)
              for name, (op, bound) in TARGETS.items()}
    passed["c answers from the model"] = c["personal_share"] >= 0.9 and c["errors"] == 0
    return {"cpu_ms_per_request": {v: variant["cpu_ms_per_request"] for v, variant in variants.items()},
            "ratios": {k: round(v, 3) for k, v in ratios.items()},
            "targets": {k: f"{op} {bound:.3g}" for k, (op, bound) in TARGETS.items()},
            "passed": passed, "pass": all(passed.values())}
