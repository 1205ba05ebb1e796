"""``recsys chaos abuse``: hostile clients beside a normal one (issue 35, point 3).

The app is ``serving.plain`` under uvicorn (a replica's own code) on the stack's Kafka and
Redis, with a scratch topic and Redis prefix; a stream worker, the archiver and the online
consumer run on them. A normal client asks for recommendations and posts events at a steady
rate the whole time. Abuse and calm alternate in windows (same run, so the machine's other
load falls on both alike), 60 s of abuse in all:

- chosen event ids: ``r:`` plus a request id the abuser was served, ids of 128 characters,
  batches of 1,000 events for one target id (its seen set must stay bounded);
- a victim whose seen set holds a million items (written straight into Redis, as an unbounded
  set would have grown), asked for again and again (a request reads at most
  ``features.seen_items`` of them);
- large bodies on every route, with and without a key (a declared 100 MB, 3 MB sent);
- ``/readyz`` floods, and bad bearer strings (random, and well-formed unknown keys).

Passed: the normal client got no error, its p99 under abuse is within 2x of its p99 in the
calm windows, and every consumer is still running.
"""
from __future__ import annotations

import asyncio
import json
import random
import secrets
import shutil
import time
from collections import Counter

import numpy as np

from lab import process, stack
from lab.chaos import end_scratch_run
from lab.bench.stream import recsys_child, scratch_settings
from recsys.auth import KeyStore, Scope
from recsys.feature_store import FeatureStore
from recsys.kafka_io import replay
from recsys.privacy import Pseudonyms
from recsys.settings import Settings
from recsys.sources import SyntheticSource

WINDOW_S = 10.0
ABUSE_WINDOWS = 6  # alternating with as many calm ones: 60 s of abuse
NORMAL_RPS = 40.0  # recommendations per second, and a tenth as many event posts
VICTIM = "victim"  # asked for, its seen set a million items
VICTIM_SEEN = 1_000_000
TARGET = "target"  # the abuser's events are for this id: its seen set must stay bounded
ABUSERS = 6  # concurrent abusive loops
API_PORT_OFFSET = 92  # the serving port + 92 (kafka-leader-kill's API takes + 91)


async def _normal(url: str, key: str, users: list[str], seconds: float) -> list[tuple[float, float, int | str]]:
    """(start offset s, latency ms, status) of every request; with no answer, the status is
    the exception's name (any exception: one request's failure is an error, not the end of the
    client)."""
    import aiohttp
    rng, out = random.Random(3), []
    started = time.monotonic()

    async def one(session, method, path, **kw):
        t0 = time.monotonic()
        try:
            async with session.request(method, url + path, **kw) as resp:
                await resp.read()
                status = resp.status
        except Exception as exc:  # noqa: BLE001 (counted as an error)
            status = type(exc).__name__
        out.append((t0 - started, (time.monotonic() - t0) * 1e3, status))

    tasks = []
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"},
                                     timeout=aiohttp.ClientTimeout(total=10)) as session:
        for n in range(int(seconds * NORMAL_RPS)):
            await asyncio.sleep(max(0.0, started + n / NORMAL_RPS - time.monotonic()))
            if n % 10 == 9:
                event = {"event_id": f"n-{n}", "user_id": rng.choice(users), "item_id": f"i{rng.randrange(300)}",
                         "type": "view", "ts": int(time.time() * 1000)}
                tasks.append(asyncio.create_task(one(session, "POST", "/v1/events", json=event)))
            else:
                tasks.append(asyncio.create_task(one(session, "GET", f"/v1/recommendations/{rng.choice(users)}")))
        await asyncio.gather(*tasks)
    return out


async def _bodies(n: int):
    """A body streamed in 64 KiB chunks (aiohttp takes an async iterable; a plain generator
    fails with TypeError before anything is sent)."""
    for _ in range(n):
        yield b" " * 65536


async def _abuse(url: str, key: str, windows: list[tuple[float, float]]) -> Counter:
    """Hostile requests during each (start, end) window, offsets from now; statuses by kind."""
    import aiohttp
    rng, statuses = random.Random(11), Counter()
    started = time.monotonic()
    keyed = {"Authorization": f"Bearer {key}"}

    def bearer() -> dict:
        return {"Authorization": rng.choice(["Bearer " + secrets.token_hex(rng.randrange(1, 200)),
                                             "Bearer rsk_" + secrets.token_urlsafe(32), "Basic eA==", "Bearer "])}

    def event(event_id: str) -> dict:
        return {"event_id": event_id, "user_id": TARGET, "item_id": f"x{rng.randrange(10**6)}", "type": "click",
                "ts": int(time.time() * 1000)}

    async def go(session, kind, method, path, **kw):
        try:
            async with session.request(method, url + path, **kw) as resp:
                body = await resp.read()
                statuses[f"{kind} {resp.status}"] += 1
                return resp.status, body
        except Exception as exc:  # noqa: BLE001 (a hostile request may end any way)
            statuses[f"{kind} {type(exc).__name__}"] += 1
            return 0, b""

    async def loop(session, end):
        while time.monotonic() < end:
            pick = rng.randrange(9)
            if pick == 0:
                await go(session, "readyz", "GET", "/readyz")
            elif pick == 1:
                await go(session, "bad bearer", "GET", f"/v1/recommendations/{VICTIM}", headers=bearer())
            elif pick == 2:
                await go(session, "bad bearer events", "POST", "/v1/events", headers=bearer(), json=event("b"))
            elif pick == 3:
                status, body = await go(session, "victim", "GET", f"/v1/recommendations/{VICTIM}?k=100", headers=keyed)
                if status == 200:  # a chosen id: the request id it was served
                    rid = json.loads(body)["request_id"]
                    await go(session, "chosen ids", "POST", "/v1/events", headers=keyed,
                             json=[event(f"r:{rid}"), event("e" * 128)])
            elif pick == 4:
                await go(session, "batch", "POST", "/v1/events", headers=keyed,
                         json=[event(f"flood-{rng.random()}") for _ in range(1000)])
            elif pick == 5:  # a declared 100 MB, and 3 MB sent in chunks, with and without a key
                await go(session, "big item", "PUT", "/v1/items/x", data=_bodies(48),
                         headers={**rng.choice([keyed, bearer()]), "Content-Type": "application/json"})
            elif pick == 6:
                await go(session, "big events", "POST", "/v1/events", data=_bodies(48),
                         headers={**rng.choice([keyed, {}]), "Content-Type": "application/json"})
            elif pick == 7:
                await go(session, "big get", "GET", f"/v1/recommendations/{VICTIM}", data=_bodies(16), headers=keyed)
            else:
                await go(session, "declared 100 MB", "PUT", "/v1/items/x", data=b"{" * 1024,
                         headers={**rng.choice([keyed, {}]), "Content-Length": str(100 * 2**20)})

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        for start, end in windows:
            await asyncio.sleep(max(0.0, started + start - time.monotonic()))
            await asyncio.gather(*(loop(session, started + end) for _ in range(ABUSERS)))
    return statuses


def _normal_process(url, key, users, seconds):
    return asyncio.run(_normal(url, key, users, seconds))


def _abuse_process(url, key, windows):
    return dict(asyncio.run(_abuse(url, key, windows)))


def _p99(latencies: list[float]) -> float | None:
    return round(float(np.percentile(latencies, 99)), 1) if latencies else None


def figures(normal: list[tuple[float, float, int]], windows: list[tuple[float, float]]) -> dict:
    """The normal client's errors and its p99 in the abuse windows and in the calm ones."""
    def abused(t: float) -> bool:
        return any(a <= t < b for a, b in windows)
    calm = [ms for t, ms, status in normal if not abused(t)]
    under = [ms for t, ms, status in normal if abused(t)]
    errors = Counter(str(status) for _, _, status in normal if status not in (200, 202))
    p99_calm, p99_abuse = _p99(calm), _p99(under)
    return {"requests": len(normal), "errors": sum(errors.values()), "error_statuses": dict(errors),
            "p99_calm_ms": p99_calm, "p99_abuse_ms": p99_abuse,
            "p99_ratio": round(p99_abuse / p99_calm, 2) if p99_calm and p99_abuse else None}


def abuse(settings: Settings, progress=print) -> dict:
    from lab.bench.serve import PlainUvicorn
    s = scratch_settings(settings, "abuse")
    logs = settings.home / "chaos-abuse"
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir(parents=True)
    stack.ensure_topics(s)
    store = FeatureStore(s)
    keys = KeyStore(s, store.redis)
    api, consumers, clients = None, {}, []
    try:
        replay(SyntheticSource(events=20_000, users=500, items=300, seed=4).events_iter(), s, progress=False)
        for name in ("stream", "archive", "online"):
            args = ("online", "run") if name == "online" else (name,)
            consumers[name] = recsys_child(s, logs / f"{name}.log", *args)
        victim = store.keys.user(Pseudonyms.of(s).user_id(VICTIM), "seen_at")
        progress(f"chaos abuse: a victim with {VICTIM_SEEN:,} seen items")
        for a in range(0, VICTIM_SEEN, 50_000):
            store.redis.zadd(victim, {f"s{n}": n for n in range(a, a + 50_000)})
        normal_key = keys.create("normal", [Scope.recs_read, Scope.events_write], rate_per_s=1e6, burst=10**6)["key"]
        abuser_key = keys.create("abuser", [Scope.recs_read, Scope.events_write, Scope.catalogue_write])["key"]
        api = PlainUvicorn(s, workers=1, port=settings.serving.port + API_PORT_OFFSET, ready_path="/healthz")
        users = [f"u{n}" for n in range(500)]
        windows = [((2 * w + 1) * WINDOW_S, (2 * w + 2) * WINDOW_S) for w in range(ABUSE_WINDOWS)]
        seconds = 2 * ABUSE_WINDOWS * WINDOW_S
        progress(f"chaos abuse: a normal client at {NORMAL_RPS:g} req/s for {seconds:g} s; abuse in "
                 f"{ABUSE_WINDOWS} windows of {WINDOW_S:g} s, calm between; logs in {logs}")
        clients = [process.Child(_normal_process, api.url, normal_key, users, seconds),
                   process.Child(_abuse_process, api.url, abuser_key, windows)]
        normal_result = clients[0].result(seconds + 120, "the normal client is done")
        abuse_result = clients[1].result(120, "the abusers are done")
        up = {name: proc.poll() is None for name, proc in consumers.items()}
        result = figures(normal_result, windows)
        target_size = store.redis.zcard(store.keys.user(Pseudonyms.of(s).user_id(TARGET), "seen_at"))
    finally:
        for child in clients:
            child.kill()
        end_scratch_run(s, consumers.values(), api)
        keys.clear()
    bounded = target_size <= s.features.seen_items
    passed = (result["errors"] == 0 and result["p99_ratio"] is not None and result["p99_ratio"] <= 2.0
              and all(up.values()) and bounded)
    return {"scenario": "abuse", "abuse_seconds": ABUSE_WINDOWS * WINDOW_S, "normal": result,
            "abuse": dict(sorted(abuse_result.items())), "consumers_up": up, "target_seen_set": target_size,
            "passed": passed, "logs": str(logs)}
