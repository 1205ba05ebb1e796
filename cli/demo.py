"""``recsys demo``: the whole loop on the project's synthetic data, from a fresh machine.

Stack up -> replay synthetic sessions (``recsys.sessions``, a timeline ending now) through
Kafka -> stream them into Redis and archive them -> train the two-tower model with Ray Train
(2 workers) -> serve it with Ray Serve -> ask for recommendations over HTTP -> one user clicks
items of a taste cluster outside their long-term mixture; the share of that cluster in their
top 10 is shown beside a control user's, who posts nothing, with the time from the clicks' 202
to the first changed list. The share is reported, not promised: how far five clicks move a
known user's list is what issue 34's user tower is for.
"""
from __future__ import annotations

import contextlib
import threading
import time
from typing import Optional

from pathlib import Path

import httpx
import numpy as np

from lab import process, stack
from recsys.archive import run_archiver
from recsys.auth import KeyStore, Scope
from recsys.evaluation import figure
from recsys.feature_store import FeatureStore
from recsys.kafka_io import replay
from recsys.privacy import Pseudonyms
from recsys.settings import Settings
from recsys.sessions import SessionSource
from recsys.stream import StreamWorker, run_stream


def _step(n: int, text: str) -> None:
    print(f"\n== {n}. {text}", flush=True)


def _reaction(client, user: str, before: list[str], accepted_at: float, timeout_s: float = 10.0) -> str:
    """How long after ``accepted_at`` (the events' 202) the first GET whose top 10 differs from
    ``before`` ended (``recsys bench reaction`` measures this for 200 users under load)."""
    while time.perf_counter() - accepted_at < timeout_s:
        items = [x["item_id"] for x in client.get(f"/v1/recommendations/{user}", params={"k": 10}).json()["items"]]
        if items != before:
            return f"{(time.perf_counter() - accepted_at) * 1e3:.0f} ms after the 202"
    return f"not within {timeout_s:.0f} s"


def _show(answer: dict) -> str:
    items = ", ".join(x["item_id"] for x in answer["items"])
    return f"{answer['user_id']}: [{items}] (model {answer['model_version']}, fallback {answer['fallback']})"


def run_demo(settings: Settings, events: int = 100_000, epochs: Optional[int] = None) -> int:
    from lab.serve_local import base_url, serve_up
    from training.job import train

    _step(1, "local stack: Kafka broker, Redis server")
    up = stack.up(settings)
    print(f"Kafka {settings.kafka.version} on {settings.kafka.bootstrap}, Redis on {settings.redis.url} "
          f"(logs: {Path(up['kafka']['log']).parent})")
    # Sessions, intents and order in time, ending now: the replayed history and the demo's own
    # clicks form one timeline, so `recsys retrain-now` after the demo has its window.
    source = SessionSource(events=events)
    _step(2, f"replay {events:,} synthetic events into Kafka topic {settings.kafka.events_topic}")
    pseudonyms = Pseudonyms.of(settings)  # what enters Kafka has no raw user id
    sent = replay(pseudonyms.events(source.events_iter()), settings, total=events)
    print(f"{sent['produced']:,} events in {sent['seconds']:.1f} s ({sent['events_per_s']:,.0f} events/s)")
    _step(3, "stream them into the Redis online features; archive them for training")
    streamed = run_stream(settings, until_idle=3.0)
    archived = run_archiver(settings, until_idle=3.0)
    print(f"stream worker: {streamed['applied']:,} events applied to Redis ({streamed['duplicates']:,} skipped "
          f"as already applied, {streamed['dlq']} to the dead-letter topic)")
    print(f"archiver: {archived['archived']:,} events in the Parquet log for training")
    store = FeatureStore(settings)
    print("trending now:", ", ".join(item for item, _ in store.trending(10)))

    _step(4, "train the two-tower model with Ray Train (2 workers) on the archive")
    card = train("archive", workers=2, epochs=epochs, settings=settings)
    m = card["metrics"]
    print(f"published {card['version']}: HR@10 two-tower {m['two_tower']['hr@10']:.3f} | most-popular "
          f"{m['popularity']['hr@10']:.3f} | item-kNN {figure(m['itemknn'], fmt='.3f')} | EASE {figure(m['ease'], fmt='.3f')} | "
          f"recency-weighted EASE {figure(m['recency_ease'], fmt='.3f')} | session-kNN {figure(m['session_knn'], fmt='.3f')} (protocol {card['data_window']['protocol']}: "
          f"{'the next new item' if card['data_window']['protocol'] == 'B' else 'the last interaction'})")

    _step(5, "serve it with Ray Serve")
    served = serve_up(settings)
    replicas = sum(served["replicas"].values())
    print(f"{served['url']} answers with model {served['readyz']['model']} "
          f"({replicas} replica{'s' * (replicas != 1)}; autoscaled by load)")
    worker = StreamWorker(settings)  # keeps Redis fresh for the events posted below
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    keys = KeyStore(settings, store.redis)
    with keys.temporary("demo", [Scope.events_write, Scope.recs_read], rate_per_s=100, burst=100) as key, \
            httpx.Client(base_url=base_url(settings), timeout=10, headers={"Authorization": f"Bearer {key}"}) as client:
        # The version may take a poll interval to reach every replica.
        with contextlib.suppress(process.NotInTime):  # the demo goes on either way
            process.wait_until(lambda: client.get("/v1/recommendations/u0").json()["model_version"] == card["version"],
                               15, f"{card['version']} answers", every_s=0.3)
        _step(6, "recommendations for a few users (GET /v1/recommendations/{user})")
        # The demo knows its users' own ids; Redis knows only their pseudonyms.
        candidates = [f"u{n}" for n in range(50)]
        features = store.users([pseudonyms.user_id(u) for u in candidates])
        active = [u for u, f in zip(candidates, features) if f.recent][:3]
        for user in active + ["brand-new-user"]:
            print(_show(client.get(f"/v1/recommendations/{user}", params={"k": 5}).json()))

        user, control = active[0], active[1]
        mixture = set(source.mixture[int(user[1:])].tolist())  # the user's long-term taste clusters
        cluster = next(c for c in range(source.clusters)
                       if c not in mixture and c != source.user_cluster[int(control[1:])])
        top = {u: client.get(f"/v1/recommendations/{u}", params={"k": 10}).json() for u in (user, control)}
        seen = set(store.users([pseudonyms.user_id(user)])[0].seen)
        # The cluster's most popular items the user has not touched: a new taste, in 5 clicks.
        members = source.cluster_items[cluster][np.argsort(-source.item_pop[source.cluster_items[cluster]])]
        clicked = [f"i{k}" for k in members if f"i{k}" not in seen][:5]
        _step(7, f"{user} views and clicks {', '.join(clicked)} (taste cluster {cluster}, outside their mixture; "
                 f"POST /v1/events); {control} posts nothing")
        now = int(time.time() * 1000)
        batch = [{"event_id": f"demo-{now}-{n}-{t}", "user_id": user, "item_id": item, "type": t, "ts": now + 2 * n + j}
                 for n, item in enumerate(clicked) for j, t in enumerate(("view", "click"))]
        accepted = client.post('/v1/events', json=batch).json()["accepted"]
        reaction = _reaction(client, user, [x["item_id"] for x in top[user]["items"]], time.perf_counter())
        print(f"accepted {accepted} events; {user}'s list changed {reaction}")
        with contextlib.suppress(process.NotInTime):  # the stream worker applies them within about a second
            process.wait_until(lambda: set(clicked) <= store.users([pseudonyms.user_id(user)])[0].seen, 10,
                               "the clicks are in Redis", every_s=0.05)
        after = {u: client.get(f"/v1/recommendations/{u}", params={"k": 10}).json() for u in (user, control)}

        def share(answer: dict) -> float:
            items = [x["item_id"] for x in answer["items"]]
            ours = [int(t[1:]) for t in items if t[1:].isdigit() and int(t[1:]) < len(source.item_cluster)]
            return sum(source.item_cluster[k] == cluster for k in ours) / max(1, len(items))  # others: not the source's
        shares = {u: (share(top[u]), share(after[u])) for u in (user, control)}
        for u in (user, control):
            print(f"{u}: cluster {cluster}'s share of the top 10 {shares[u][0]:.0%} -> {shares[u][1]:.0%}  "
                  f"now: {_show(after[u])}")
    worker.stopping.set()
    thread.join(timeout=10)

    _step(8, "summary")
    print(f"{events:,} events streamed into Redis and archived; model {card['version']} trained on 2 Ray Train "
          f"workers, HR@10 {m['two_tower']['hr@10']:.3f} (most-popular {m['popularity']['hr@10']:.3f}); "
          f"served at {base_url(settings)}; after 5 clicks in taste cluster {cluster}, its share of {user}'s top 10 "
          f"went {shares[user][0]:.0%} -> {shares[user][1]:.0%} (control {control}: {shares[control][0]:.0%} -> "
          f"{shares[control][1]:.0%}); the list changed {reaction}."
          f"\nThe API needs a key: recsys keys create --name me --scopes recs:read,events:write"
          f"\nStop everything: recsys serve down && recsys stack down")
    return 0
