"""``recsys chaos forget-under-load --json``: users forgotten while their events are in flight
(issue 35).

On the running local stack (Kafka and Redis), in scratch topics, groups and Redis prefix and a
private archive, with no Ray Serve: the API (``serving.plain`` under uvicorn) takes the events
and recommendation requests of ``USERS`` clients. Each client posts its own events one after
another (so a user's order on the wire is the order of its 202s): views, and now and then a
recommendation request and a click on its first item; every fifth client's clock runs
``AHEAD_S`` ahead (the API accepts up to 300 s). A stream worker and the archiver follow live;
the online consumer lags: it starts once the load is over.

``FORGET_AT_S`` into the load, ``FORGOTTEN`` users are forgotten with ``recsys users forget
--stdin`` while they go on posting (a forgotten user's later events are within the skew of
the forget, so they are the user's too). Once the lag has drained, and again after a replay of
the whole topic in a new group (a lost commit):

- nothing of the forgotten users is left: no Redis key (their tombstones aside), no row in the
  archive's files, none in ``read_events``, no online state;
- every other user's features equal one replay of its acknowledged events (recent list, seen
  set, counts), and the archive holds each of those events.

``lost``: acknowledged events of the other users missing from their counts or the archive;
``duplicated``: events counted beyond one, the replay's included.
"""
from __future__ import annotations

import asyncio
import itertools
import random
import re
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict

import pyarrow.parquet as pq

from lab import process, stack
from lab.chaos import end_scratch_run
from lab.bench.stream import recsys_child, scratch_settings, settings_env
from recsys.archive import event_files, read_events
from recsys.attribution import OnlineConsumer, report
from recsys.auth import KeyStore, Scope
from recsys.events import Event
from recsys.feature_store import FeatureStore, connect
from recsys.features import Keys, MemoryFeatures, user_ops
from recsys.privacy import Pseudonyms
from recsys.settings import Settings
from recsys.stream import run_stream

API_PORT_OFFSET = 93  # the API: the serving port + 93
USERS = 300
FORGOTTEN = 50
SECONDS = 40.0
FORGET_AT_S = 15.0
EVERY_S = 1.0  # each client's pause between two events: about USERS events/s in all
AHEAD_S = 200.0
_USER_TAG = re.compile(r"\{u:([^}]+)\}")


async def _client(session, url: str, raw: str, ahead_ms: int, until: float, acked: list, rng: random.Random,
                  counts: dict) -> None:
    """One user: an event at a time, each retried with its id until a 202 (or the end); ``acked``
    gets (event, when its 202 came), ``counts`` the answers other than 202 and the lists served."""
    async def post(event: dict) -> bool:
        while time.monotonic() < until + 30:
            try:
                async with session.post(f"{url}/v1/events", json=event) as resp:
                    await resp.read()
                    if resp.status == 202:
                        return True
                    counts[resp.status] += 1
            except (OSError, asyncio.TimeoutError):
                counts["no answer"] += 1
            await asyncio.sleep(0.2)
        return False

    await asyncio.sleep(rng.random() * EVERY_S)
    for n in itertools.count():
        if time.monotonic() >= until:
            return
        item, kind = f"i{rng.randrange(400)}", "view"
        if n % 5 == 4:  # a list, and a click on its first item: an impression and a hit for the online state
            async with session.get(f"{url}/v1/recommendations/{raw}", params={"k": 5}) as resp:
                items = (await resp.json()).get("items") if resp.status == 200 else None
                counts["lists served"] += bool(items)
            if items:
                item, kind = items[0]["item_id"], "click"
        event = {"event_id": uuid.uuid4().hex, "user_id": raw, "item_id": item, "type": kind,
                 "ts": int(time.time() * 1000) + ahead_ms}
        if await post(event):
            acked.append((event, time.monotonic()))
        await asyncio.sleep(EVERY_S)


async def _load(url: str, key: str, users: list[str], seconds: float) -> tuple[dict, dict]:
    import aiohttp
    until = time.monotonic() + seconds
    acked: dict[str, list] = {u: [] for u in users}
    counts: dict = defaultdict(int)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=len(users)), headers={
            "Authorization": f"Bearer {key}"}, timeout=aiohttp.ClientTimeout(total=10)) as session:
        await asyncio.gather(*(_client(session, url, u, int(AHEAD_S * 1000) if k % 5 == 0 else 0, until, acked[u],
                                       random.Random(k), counts) for k, u in enumerate(users)))
    return acked, dict(counts)


def _expected(s: Settings, acked: dict[str, list], pseudonym) -> dict[str, dict]:
    """Each user's features after one replay of its acknowledged events, in their order."""
    keys, mem = Keys.of(s.redis), MemoryFeatures()
    for raw, events in acked.items():
        for e, _ in events:
            event = Event(**{**e, "user_id": pseudonym(raw)})
            mem.apply(event.event_id, user_ops(event, keys, s.features.recent_items))
    return {raw: mem.user(keys, pseudonym(raw)).to_json() for raw in acked}


def _left_of(s: Settings, gone: set[str]) -> dict[str, int]:
    """What is left of the forgotten users: Redis keys (tombstones aside), archived rows, rows read."""
    store = FeatureStore(s)
    tombstone = f"{s.redis.prefix}:forgotten:"
    redis_keys = sum(1 for k in store.redis.scan_iter(match=f"{s.redis.prefix}:*", count=1000)
                     if not k.startswith(tombstone) and (m := _USER_TAG.search(k)) and m.group(1) in gone)
    files = sum(u in gone for f in event_files(s.archive_dir) for u in pq.read_table(f, columns=["user_id"])["user_id"].to_pylist())
    read = sum(u in gone for u in read_events(s)["user_id"].to_pylist())
    return {"redis_keys": redis_keys, "archive_rows": files, "rows_read": read}


def forget_under_load(settings: Settings, progress=print) -> dict:
    from lab.bench.serve import PlainUvicorn
    home = settings.home / "chaos-forget"
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    s = scratch_settings(settings, "forget").updated(archive_dir=home / "archive", registry_dir=home / "models")
    stack.start_kafka(settings, progress)
    stack.start_redis(settings, progress)
    stack.ensure_topics(s)
    users = [f"fu{k}" for k in range(USERS)]
    forgotten = users[::USERS // FORGOTTEN][:FORGOTTEN]
    pseudonym = Pseudonyms.of(s).user_id
    gone = {pseudonym(u) for u in forgotten}
    procs, api = [], None
    t0 = time.monotonic()
    try:
        procs = [recsys_child(s, home / "stream.log", "stream"), recsys_child(s, home / "archive.log", "archive")]
        api = PlainUvicorn(s, workers=1, port=settings.serving.port + API_PORT_OFFSET, ready_path="/healthz")
        with KeyStore(s, connect(s)).temporary("forget", [Scope.recs_read, Scope.events_write]) as key:
            result: list = []
            load = threading.Thread(target=lambda: result.append(asyncio.run(_load(api.url, key, users, SECONDS))))
            progress(f"chaos: {USERS} users post through the API for {SECONDS:g} s; {FORGOTTEN} are forgotten at "
                     f"{FORGET_AT_S:g} s; the online consumer lags")
            load.start()
            time.sleep(FORGET_AT_S)
            forgot_at = time.monotonic()
            out = subprocess.run([sys.executable, "-m", "cli", "users", "forget", "--stdin", "--json"],
                                 input="\n".join(forgotten) + "\n", env=settings_env(s), capture_output=True,
                                 text=True, check=True, timeout=300)
            forget_s = time.monotonic() - forgot_at
            progress(f"chaos: {len(out.stdout.splitlines())} users forgotten in {forget_s:.1f} s, under load")
            load.join()
        acked, statuses = result[0]
        api.stop()
        api = None
        process.stop(procs, grace_s=30)  # committed what they applied; the rest comes again
        drained = {"stream": run_stream(s, until_idle=3), "online": OnlineConsumer(s).run(until_idle=3).events}
        from recsys.archive import run_archiver
        drained["archive"] = run_archiver(s, until_idle=3)
        replayed = run_stream(s.updated(kafka={"stream_group": f"{s.kafka.stream_group}-replay"}), until_idle=3)
        left = _left_of(s, gone)
        others = [u for u in users if u not in set(forgotten)]
        want = _expected(s, {u: acked[u] for u in others}, pseudonym)
        got = {u: f.to_json() for u, f in zip(others, FeatureStore(s).users([pseudonym(u) for u in others]))}
        total = lambda features: sum(features["counts"].values())  # noqa: E731
        lost = sum(max(0, total(want[u]) - total(got[u])) for u in others)
        duplicated = sum(max(0, total(got[u]) - total(want[u])) for u in others) + replayed["applied"]
        archived = set(read_events(s)["event_id"].to_pylist())
        lost_archive = sum(e["event_id"] not in archived for u in others for e, _ in acked[u])
        users_exact = got == want
        passed = (not lost and not lost_archive and not duplicated and users_exact and not any(left.values()))
        online = report(s)["arms"]
        return {"scenario": "forget-under-load", "users": USERS, "forgotten": FORGOTTEN,
                "events_acknowledged": sum(map(len, acked.values())),
                "forgotten_users_events_acknowledged": sum(len(acked[u]) for u in forgotten),
                "of_them_after_the_forget": sum(at > forgot_at for u in forgotten for _, at in acked[u]),
                "answers": statuses, "forget_s": round(forget_s, 1), "drained": drained,
                "replay_applied": replayed["applied"], "left_of_forgotten": left, "lost": lost + lost_archive,
                "lost_in_features": lost, "lost_in_archive": lost_archive, "duplicated": duplicated,
                "users_exact": users_exact, "online_lists": sum(a["impressions"] for a in online.values()),
                "seconds": round(time.monotonic() - t0, 1), "passed": passed}
    finally:
        end_scratch_run(s, procs, api, [home])
