"""The stream worker: Kafka ``user-events`` -> Redis online features, at least once, effects once.

Per poll: decode every record, send bad ones to the dead-letter topic (reason and
source position in headers, original bytes as value), apply the good ones to Redis
in one pipelined round trip (each event atomic and deduplicated by event id),
flush the dead letters, and only then commit the offsets (asynchronously; a final
synchronous commit on a clean exit). A crash anywhere before
the commit replays the batch, and the dedup markers make the replay change nothing.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict, dataclass

import redis

from recsys import kafka_io
from recsys.events import BadEvent, parse_event
from recsys.feature_store import FeatureStore
from recsys.settings import Settings

log = logging.getLogger(__name__)

@dataclass
class StreamStats:
    consumed: int = 0
    applied: int = 0
    duplicates: int = 0
    dlq: int = 0


def dead_letter_headers(record, reason: str) -> list[tuple[str, bytes]]:
    return [("reason", reason.encode()[:1000]), ("topic", record.topic.encode()),
            ("partition", str(record.partition).encode()), ("offset", str(record.offset).encode())]


class StreamWorker:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.store = FeatureStore(settings)
        self.member = kafka_io.GroupMember(settings, settings.kafka.stream_group,
                                           lambda: kafka_io.consumer(settings, settings.kafka.stream_group))
        self.dlq = kafka_io.producer(settings)
        self.stats = StreamStats()
        self.stopping = threading.Event()  # set by SIGTERM/SIGINT, or by an embedding thread

    def process(self, records) -> None:
        """One batch: effects first (Redis, dead letters), offsets after."""
        good = []
        for record in records:
            try:
                good.append(parse_event(record.value))
            except BadEvent as exc:
                self.dlq.send(self.settings.kafka.dlq_topic, key=record.key, value=record.value or b"",
                              headers=dead_letter_headers(record, exc.reason))
                self.stats.dlq += 1
        applied = self._apply_until_done(good)
        if applied is None:  # stopping while Redis is away: no commit, the batch comes again
            return
        self.dlq.flush()
        # Asynchronous: a commit lost in a crash only replays events the dedup markers absorb.
        self.member.consumer.commit_async()
        self.stats.consumed += len(records)
        self.stats.applied += sum(applied)
        self.stats.duplicates += len(applied) - sum(applied)

    def _apply_until_done(self, events) -> list[bool] | None:
        """Retry the batch while Redis is unreachable or restarting; the dedup markers make
        a partly applied batch safe to apply again."""
        delay = 0.1
        while True:
            try:
                return self.store.apply_events(events)
            except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError) as exc:
                if self.stopping.is_set():
                    return None
                log.warning("Redis unavailable (%s); retrying in %.1fs", exc, delay)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def run(self, until_idle: float | None = None) -> StreamStats:
        """Consume until SIGTERM/SIGINT, or until ``until_idle`` seconds pass with no record."""
        def on_poll(polled):
            records = [r for batch in polled.values() for r in batch]
            if records:
                self.process(records)
        try:
            kafka_io.consume(self.member, on_poll, self.stopping, until_idle)
        finally:
            self.close()
        return self.stats

    def close(self) -> None:
        consumer = self.member.consumer
        if consumer.assignment():
            consumer.commit()
        consumer.close(autocommit=False)
        self.dlq.close()


def run_stream(settings: Settings, until_idle: float | None = None) -> dict:
    stats = StreamWorker(settings).run(until_idle)
    return asdict(stats)


def read_dead_letters(settings: Settings, timeout_s: float = 5.0) -> list[dict]:
    """Everything on the dead-letter topic, for tests and inspection."""
    from kafka import KafkaConsumer
    cons = KafkaConsumer(settings.kafka.dlq_topic, bootstrap_servers=settings.kafka.bootstrap, group_id=None,
                         auto_offset_reset="earliest", consumer_timeout_ms=int(timeout_s * 1000))
    out = [{"value": r.value, **{k: v.decode() for k, v in r.headers}} for r in cons]
    cons.close()
    return out

