"""``recsys bench serve``: the recommendation endpoint against a no-op Serve endpoint.

Both run in the same Serve instance with the same replica settings (fixed replicas,
the config's CPUs per replica) and get the same closed-loop HTTP load from a separate
process, so the ratios say what the recommendation path costs on top of Serve itself.
"""
from __future__ import annotations

import asyncio
import multiprocessing as mp
import random
import time

import numpy as np
from fastapi import FastAPI, Query
from ray import serve

from recsys.feature_store import FeatureStore
from recsys.settings import Settings
from serving.deploy import base_url, connect_ray, load_config, serve_up, start_serve, wait_http

noop_app = FastAPI()


@serve.deployment
@serve.ingress(noop_app)
class NoopApi:
    @noop_app.get("/v1/recommendations/{user_id}")
    def recommendations(self, user_id: str, k: int = Query(10, ge=1, le=100)) -> dict:
        return {"user_id": user_id, "items": []}


async def _closed_loop(urls: list[str], concurrency: int, seconds: float) -> dict:
    import aiohttp
    latencies, errors, stages = [], 0, {}
    deadline = time.monotonic() + seconds

    async def client(session):
        nonlocal errors
        while time.monotonic() < deadline:
            t0 = time.perf_counter()
            try:
                async with session.get(random.choice(urls)) as resp:
                    await resp.read()
                    ok = resp.status == 200
                    for part in filter(None, resp.headers.get("Server-Timing", "").split(", ")):
                        name, _, dur = part.partition(";dur=")
                        stages.setdefault(name, []).append(float(dur))
            except aiohttp.ClientError:
                ok = False
            latencies.append((time.perf_counter() - t0) * 1e3)
            errors += not ok

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        started = time.monotonic()
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
        elapsed = time.monotonic() - started
    lat = np.array(latencies)
    return {"requests": len(lat), "errors": errors, "rps": round(len(lat) / elapsed, 1),
            "p50_ms": round(float(np.percentile(lat, 50)), 2), "p99_ms": round(float(np.percentile(lat, 99)), 2),
            "stages_mean_ms": {k: round(float(np.mean(v)), 3) for k, v in stages.items()}}


def _load_process(urls, concurrency, seconds, queue):
    queue.put(asyncio.run(_closed_loop(urls, concurrency, seconds)))


def closed_loop(urls: list[str], concurrency: int, seconds: float) -> dict:
    """Closed-loop load from a separate process (the server keeps its own cores' share)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_load_process, args=(urls, concurrency, seconds, queue))
    proc.start()
    result = queue.get(timeout=seconds + 120)
    proc.join()
    return result


def bench_serve(settings: Settings, replicas: int = 2, concurrency: int = 16, seconds: float = 15.0,
                users: int = 500) -> dict:
    config = load_config()
    options = dict(config["deployments"]["RecsysApi"])
    options.pop("autoscaling_config", None)
    options["num_replicas"] = replicas
    connect_ray(settings, progress=lambda *_: None)
    start_serve(settings, config["http"])
    from serving.app import RecsysApi
    serve.run(RecsysApi.options(**options).bind(settings=settings.model_dump(mode="json")),
              name="recsys", route_prefix="/", blocking=False)
    serve.run(NoopApi.options(**options).bind(), name="noop", route_prefix="/noop", blocking=False)
    base = base_url(settings)
    wait_http(f"{base}/noop/v1/recommendations/u?k=10")
    store = FeatureStore(settings)
    known = [k.split(":")[-2] for k in store.redis.scan_iter(match=f"{store.keys.prefix}:user:*:recent", count=1000)]
    ids = random.Random(0).sample(known, min(users, len(known))) if known else ["nobody"]
    rec_urls = [f"{base}/v1/recommendations/{u}?k=10" for u in ids]
    noop_urls = [f"{base}/noop/v1/recommendations/{u}?k=10" for u in ids]
    closed_loop(rec_urls, concurrency, 3)  # warm-up: imports, connections, caches
    runs = {"noop": [], "recsys": []}
    for _ in range(2):  # interleaved, so a noisy neighbour hurts both alike
        runs["noop"].append(closed_loop(noop_urls, concurrency, seconds / 2))
        runs["recsys"].append(closed_loop(rec_urls, concurrency, seconds / 2))
    serve.delete("noop")
    serve_up(settings, progress=lambda *_: None)  # back to the autoscaling config
    noop, rec = (_merge(runs[name]) for name in ("noop", "recsys"))
    return {"replicas": replicas, "concurrency": concurrency, "users": len(ids), "noop": noop, "recsys": rec,
            "throughput_ratio": round(rec["rps"] / noop["rps"], 3),
            "p99_ratio": round(rec["p99_ms"] / noop["p99_ms"], 3),
            "targets": {"throughput_ratio": ">= 0.8", "p99_ratio": "<= 1.5"}}


def _merge(runs: list[dict]) -> dict:
    n = sum(r["requests"] for r in runs)
    return {"requests": n, "errors": sum(r["errors"] for r in runs),
            "rps": round(sum(r["rps"] for r in runs) / len(runs), 1),
            "p50_ms": round(float(np.mean([r["p50_ms"] for r in runs])), 2),
            "p99_ms": round(max(r["p99_ms"] for r in runs), 2),
            "stages_mean_ms": {k: round(float(np.mean([r["stages_mean_ms"].get(k, 0) for r in runs])), 3)
                               for k in runs[-1]["stages_mean_ms"]}}
