"""``recsys bench reaction``: how long after a click its user's list changes, under load.

For each measured user (known to the demo's data): ask for the top 10, click its first item
(``POST /v1/events``, a fresh ``event_id``), then ask again and again until the list differs
from the one before the click. The clicked item becomes *seen* once the stream worker has
applied the event, so the list always changes when the click has reached Redis; with a
user tower that follows the session it changes further. The reaction time runs from the
POST's 202 to the end of the first GET that answers with the changed list, so it holds the
API's acceptance into Kafka, the stream worker's poll and apply, and one GET.

Background load meanwhile: a separate process with closed-loop shoppers (other known users)
asking for their lists and posting a click on one shown item each time, so the stream worker
and the replicas are busy as under a load test. A stream worker (``recsys stream``) is
started for the run and stopped after it.
"""
from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import sys
import time
import uuid

import numpy as np

from lab import process
from lab.bench.serve import known_users
from lab.serve_local import base_url, wait_http
from recsys.auth import KeyStore, Scope
from recsys.errors import RecsysError
from recsys.feature_store import FeatureStore
from recsys.settings import Settings


def click(user: str, item: str) -> dict:
    return {"event_id": f"reaction-{uuid.uuid4().hex}", "user_id": user, "item_id": item, "type": "click",
            "ts": int(time.time() * 1000)}


async def _listed(session, base: str, user: str) -> list[str]:
    async with session.get(f"{base}/v1/recommendations/{user}?k=10") as resp:
        if resp.status != 200:
            raise RecsysError(f"GET recommendations for {user}: {resp.status} {(await resp.text())[:200]}")
        return [x["item_id"] for x in (await resp.json())["items"]]


async def _post(session, base: str, event: dict) -> None:
    async with session.post(f"{base}/v1/events", json=[event]) as resp:
        if resp.status != 202:
            raise RecsysError(f"POST /v1/events: {resp.status} {(await resp.text())[:200]}")


async def react(session, base: str, user: str, timeout_s: float) -> dict:
    """One user's click and the wait for its list to change: ``ms`` (None when it did not
    within ``timeout_s``) and the GETs it took."""
    before = await _listed(session, base, user)
    if not before:
        raise RecsysError(f"{user} got an empty list: run `recsys demo` first")
    await _post(session, base, click(user, before[0]))
    accepted = time.perf_counter()
    polls = 0
    while time.perf_counter() - accepted < timeout_s:
        polls += 1
        if await _listed(session, base, user) != before:
            return {"ms": (time.perf_counter() - accepted) * 1e3, "polls": polls}
    return {"ms": None, "polls": polls}


async def _measure(base: str, users: list[str], concurrency: int, timeout_s: float, headers: dict) -> list[dict]:
    import aiohttp
    gate = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession(headers=headers, connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        async def one(user):
            async with gate:
                return await react(session, base, user, timeout_s)
        return await asyncio.gather(*(one(u) for u in users))


async def _shoppers(base: str, users: list[str], concurrency: int, ready, stop, headers: dict) -> dict:
    """Closed-loop shoppers until ``stop`` is set: a list, then a click on one of its items;
    ``ready`` is set once the first lists came back."""
    import aiohttp
    counts = {"gets": 0, "events": 0, "errors": 0}
    started = time.monotonic()

    async def shopper(k: int):
        n = k
        while not stop.is_set():
            user = users[n % len(users)]
            n += concurrency
            try:
                shown = await _listed(session, base, user)
                counts["gets"] += 1
                ready.set()
                if shown:
                    await _post(session, base, click(user, shown[n % len(shown)]))
                    counts["events"] += 1
            except (aiohttp.ClientError, RecsysError):
                counts["errors"] += 1
    async with aiohttp.ClientSession(headers=headers, connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        await asyncio.gather(*(shopper(k) for k in range(concurrency)))
    seconds = time.monotonic() - started
    return {**counts, "seconds": round(seconds, 1), "rps": round((counts["gets"] + counts["events"]) / seconds, 1)}


def _background_process(base, users, concurrency, ready, stop, headers, out) -> None:
    out.put(asyncio.run(_shoppers(base, users, concurrency, ready, stop, headers)))


def summary(results: list[dict], budget_ms: float) -> dict:
    """Percentiles of the users' reaction times; passed when every user's list changed and the
    p99 is within ``budget_ms``."""
    ms = np.array([r["ms"] for r in results if r["ms"] is not None])
    late = sum(r["ms"] is None for r in results)
    pct = {f"p{q}": round(float(np.percentile(ms, q)), 1) for q in (50, 90, 99)} if len(ms) else {}
    return {"users": len(results), "changed": len(ms), "unchanged_within_timeout": late,
            "reaction_ms": {**pct, "max": round(float(ms.max()), 1) if len(ms) else None},
            "gets_per_user_p50": float(np.median([r["polls"] for r in results])) if results else None,
            "p99_budget_ms": budget_ms, "passed": late == 0 and bool(len(ms)) and pct["p99"] <= budget_ms}


def bench_reaction(settings: Settings, users: int = 200, concurrency: int = 4, background: int = 8,
                   timeout_s: float = 5.0, p99_budget_ms: float = 250.0, progress=print) -> dict:
    base = base_url(settings)
    wait_http(f"{base}/readyz", timeout_s=30)
    ids = known_users(settings, users + 5 + 4 * background)
    if len(ids) < users + 5 + background:
        raise RecsysError(f"bench reaction needs {users + 5 + background} users with history in Redis, "
                          f"found {len(ids)}: run `recsys demo` first")
    warm, measured, others = ids[:5], ids[5:5 + users], ids[5 + users:]
    env = {**os.environ, **{k: v for k, v in settings.environment().items() if v is not None}}
    log = settings.home / "logs" / "bench-reaction-stream.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    worker = process.spawn([sys.executable, "-m", "cli", "stream"], log, env=env, append=False)
    keys = KeyStore(settings, FeatureStore(settings).redis)
    ctx = mp.get_context("spawn")
    ready, stop, out = ctx.Event(), ctx.Event(), ctx.Queue()
    try:
        with keys.temporary("bench-reaction", [Scope.recs_read, Scope.events_write]) as key:
            headers = {"Authorization": f"Bearer {key}"}
            progress("bench reaction: waiting for the stream worker to apply a first click")
            warmed = asyncio.run(_measure(base, warm, 1, 60.0, headers))
            if all(w["ms"] is None for w in warmed):
                raise RecsysError(f"no click reached a list within 60 s: see {log}")
            shoppers = ctx.Process(target=_background_process,
                                   args=(base, others, background, ready, stop, headers, out))
            shoppers.start()
            try:
                if not ready.wait(60):
                    raise RecsysError("the background shoppers got no answer within 60 s")
                time.sleep(2.0)  # the background at full speed first
                progress(f"bench reaction: {users} users, {concurrency} at a time, beside {background} shoppers")
                results = asyncio.run(_measure(base, measured, concurrency, timeout_s, headers))
            finally:
                stop.set()
                load = out.get(timeout=60)
                shoppers.join(timeout=30)
    finally:
        process.stop(worker, grace_s=30)
    return {**summary(results, p99_budget_ms), "concurrency": concurrency,
            "background": {"shoppers": background, **load}}
