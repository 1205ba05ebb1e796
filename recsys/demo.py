"""``recsys demo``: the whole loop on the project's synthetic data, from a fresh machine."""
from __future__ import annotations

import json

from recsys import stack
from recsys.feature_store import FeatureStore
from recsys.kafka_io import replay
from recsys.settings import Settings
from recsys.sources import SyntheticSource
from recsys.stream import run_stream


def run_demo(settings: Settings, events: int = 20_000) -> int:
    print("== 1. local stack (Kafka broker + Redis server)")
    print(json.dumps(stack.up(settings)))
    print(f"== 2. replay {events} synthetic events into Kafka topic {settings.events_topic}")
    source = SyntheticSource(events=events)
    print(json.dumps(replay(source.events_iter(), settings, total=events)))
    print("== 3. stream them into the Redis online features")
    print(json.dumps(run_stream(settings, until_idle=3.0)))
    store = FeatureStore(settings)
    print("== 4. what Redis holds now")
    print("trending items:", ", ".join(f"{item}" for item, _ in store.trending(10)))
    top_user = max(store.users([f"u{u}" for u in range(min(source.users, 200))]), key=lambda u: len(u.seen))
    summary = top_user.to_json()
    summary["seen"] = f"{len(summary['seen'])} items"
    print("most active user:", json.dumps(summary))
    return 0
