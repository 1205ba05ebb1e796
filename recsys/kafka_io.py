"""Kafka clients with the project's delivery settings, and the replay of a source into Kafka."""
from __future__ import annotations

import time
from typing import Iterable

from kafka import KafkaConsumer, KafkaProducer
from tqdm import tqdm

from recsys.events import Event
from recsys.settings import Settings


def producer(settings: Settings, **overrides) -> KafkaProducer:
    """acks=all and retries: a produce that returns from flush() is on the broker."""
    conf = dict(bootstrap_servers=settings.kafka_bootstrap, acks="all", linger_ms=5,
                retries=5, max_in_flight_requests_per_connection=1)
    conf.update(overrides)
    return KafkaProducer(**conf)


def consumer(settings: Settings, group: str, listener=None, **overrides) -> KafkaConsumer:
    """Manual commits: callers commit only after the effect of a batch is durable."""
    conf = dict(bootstrap_servers=settings.kafka_bootstrap, group_id=group, enable_auto_commit=False,
                auto_offset_reset="earliest", max_poll_records=settings.stream_batch,
                # A crashed member's partitions move to the others after 6 s (the broker's minimum).
                session_timeout_ms=6000, heartbeat_interval_ms=2000)
    conf.update(overrides)
    cons = KafkaConsumer(**conf)
    cons.subscribe([settings.events_topic], listener=listener)
    return cons


def send_event(prod: KafkaProducer, settings: Settings, event: Event):
    """Keyed by user id, so one user's events stay in order on one partition."""
    return prod.send(settings.events_topic, key=event.user_id.encode(), value=event.to_bytes())


def replay(events: Iterable[Event], settings: Settings, rate: float = 0.0, limit: int | None = None,
           total: int | None = None, progress: bool = True) -> dict:
    """Produce events into Kafka, at ``rate`` events/s (0 = as fast as possible)."""
    prod = producer(settings)
    produced, started = 0, time.monotonic()
    first_ts = last_ts = None
    failures: list[Exception] = []
    bar = tqdm(total=limit or total, unit="ev", disable=not progress, mininterval=0.5)
    try:
        for event in events:
            if limit is not None and produced >= limit:
                break
            if rate > 0:
                wait = started + produced / rate - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
            send_event(prod, settings, event).add_errback(failures.append)
            first_ts = event.ts if first_ts is None else first_ts
            last_ts = event.ts
            produced += 1
            bar.update(1)
        prod.flush()
    finally:
        bar.close()
        prod.close()
    if failures:
        raise RuntimeError(f"{len(failures)} of {produced} events were not accepted by Kafka: {failures[0]!r}")
    elapsed = time.monotonic() - started
    return {"produced": produced, "seconds": round(elapsed, 3),
            "events_per_s": round(produced / elapsed, 1) if elapsed else None,
            "first_ts": first_ts, "last_ts": last_ts, "topic": settings.events_topic}
