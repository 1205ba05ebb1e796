"""The stream worker: Kafka ``user-events`` -> Redis online features, at least once, effects once.

Per poll: decode every record, apply the good ones to Redis in one pipelined round trip
(each event atomic, and applied once: by its partition's applied offset, kept in Redis with
the effects, and by its event id for a client's retries), send the bad ones to the dead-letter
topic (reason and source position in headers, original bytes as value) and wait for the
broker's acknowledgement, and only then commit the batch's offsets. Redis or the dead-letter
topic away: the worker retries the batch until they are back. Every exit (SIGTERM, SIGINT,
an exception) commits only the offsets of batches whose effects are done, so a batch cut
short comes again, and the replay changes nothing.

Under a backlog (a poll that returned a full batch), two stages overlap in the one thread:
the worker writes a batch's scripts to Redis, polls and decodes the next batch while Redis
runs them on its own core, and only then reads their replies, sends the dead letters and
commits. Batches still take effect one at a time and in order, which the applied offsets rely
on. Without a backlog each batch is finished at once, so no event waits for a next poll.
"""
from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import redis
from kafka import OffsetAndMetadata, TopicPartition
from kafka.errors import KafkaError

from recsys import kafka_io, metrics
from recsys.events import BadEvent, EventTimeBounds, parse_event
from recsys.feature_store import FeatureStore, SentEvents
from recsys.settings import Settings


@dataclass
class StreamStats:
    consumed: int = 0
    applied: int = 0
    duplicates: int = 0
    dlq: int = 0


REDIS_AWAY = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError)


@dataclass
class Batch:
    """One poll, decoded: the events with their positions and Kafka timestamps (ms), the bad
    records with why."""
    records: list
    good: list = field(default_factory=list)
    positions: list = field(default_factory=list)
    timestamps: list = field(default_factory=list)
    bad: list = field(default_factory=list)


def next_offsets(records) -> dict[TopicPartition, OffsetAndMetadata]:
    """The offsets to commit once these records are done: each partition's last offset + 1."""
    last: dict[TopicPartition, int] = {}
    for r in records:
        tp = TopicPartition(r.topic, r.partition)
        last[tp] = max(last.get(tp, -1), r.offset)
    return {tp: OffsetAndMetadata(offset + 1, "", -1) for tp, offset in last.items()}


class StreamWorker:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.bounds = EventTimeBounds.of(settings.features)
        self.store = FeatureStore(settings)
        self.member = kafka_io.GroupMember(settings, settings.kafka.stream_group,
                                           lambda: kafka_io.consumer(settings, settings.kafka.stream_group))
        # A send to a missing or unwritable dead-letter topic fails after kafka.request_timeout_s
        # and is tried again.
        self.dlq = kafka_io.dead_letter_producer(settings)
        self.stats = StreamStats()
        self.done: dict[TopicPartition, OffsetAndMetadata] = {}  # offsets whose effects are done
        self.stopping = threading.Event()  # set by SIGTERM/SIGINT, or by an embedding thread

    def decode(self, records) -> Batch:
        batch = Batch(records)
        for record in records:
            try:
                batch.good.append(parse_event(record.value, self.bounds))
                batch.positions.append((record.topic, record.partition, record.offset))
                batch.timestamps.append(record.timestamp)
            except BadEvent as exc:
                batch.bad.append((record, exc))
        return batch

    def send(self, batch: Batch) -> SentEvents | None:
        """The batch's scripts written to Redis, replies unread; None if Redis is away (then
        ``effects`` applies the batch itself, retrying)."""
        try:
            return self.store.send_events(batch.good, batch.positions)
        except REDIS_AWAY:
            return None

    def effects(self, batch: Batch, sent: SentEvents | None = None) -> list[bool] | None:
        """Redis writes (their replies, when ``sent`` already), then acknowledged dead letters,
        each retried while its service is away. Per event, applied or a duplicate; None when
        stopped before both were done."""
        def apply() -> list[bool]:
            nonlocal sent
            if sent is not None:
                written, sent = sent, None
                return written.replies()
            return self.store.apply_events(batch.good, batch.positions)

        applied = kafka_io.until_done(apply, "Redis", REDIS_AWAY, self.stopping)
        if applied is None or kafka_io.until_done(
                lambda: kafka_io.dead_letter(self.dlq, self.settings, self.settings.kafka.stream_group, batch.bad),
                "the dead-letter topic", (KafkaError,), self.stopping) is None:
            return None
        return applied

    def finish(self, batch: Batch, applied: list[bool] | None) -> bool:
        """Commit a batch whose effects are done; False (nothing committed) when they are not."""
        if applied is None:
            return False
        offsets = next_offsets(batch.records)
        self.done.update(offsets)
        self.member.mark_done({tp: om.offset for tp, om in offsets.items()})
        # Asynchronous: a commit lost in a crash only replays events the applied offsets absorb.
        self.member.consumer.commit_async(offsets=offsets)
        n_applied = sum(applied)
        self.stats.consumed += len(batch.records)
        self.stats.applied += n_applied
        self.stats.duplicates += len(applied) - n_applied
        self.stats.dlq += len(batch.bad)
        metrics.CONSUMED.labels(self.settings.kafka.stream_group).inc(len(batch.records))
        metrics.APPLIED.inc(n_applied)
        metrics.DUPLICATES.inc(len(applied) - n_applied)
        metrics.FRESHNESS.observe_many(time.time() - np.array(batch.timestamps, dtype=float) / 1000)
        return True

    def process(self, records) -> bool:
        """One batch, start to end: effects first, offsets after. False when stopped before
        the effects were done: nothing is committed then."""
        batch = self.decode(records)
        return self.finish(batch, self.effects(batch))

    def run(self, until_idle: float | None = None) -> StreamStats:
        """Consume until SIGTERM/SIGINT, or until ``until_idle`` seconds pass with no record."""
        pending: tuple[Batch, SentEvents | None] | None = None  # written to Redis, not finished

        def settle() -> None:
            nonlocal pending
            if pending is not None:
                batch, sent = pending
                pending = None
                if not self.finish(batch, self.effects(batch, sent)):
                    self.stopping.set()  # stopped mid-batch: poll no further

        def on_poll(polled):
            nonlocal pending
            records = [r for batch in polled.values() for r in batch]
            batch = self.decode(records) if records else None
            settle()
            if batch is None or self.stopping.is_set():
                return
            pending = (batch, self.send(batch))
            if len(records) < self.settings.kafka.poll_batch:
                settle()  # no backlog: the next poll may wait for records, these must not

        try:
            kafka_io.consume(self.member, on_poll, self.stopping, until_idle, busy=lambda: pending is not None)
            settle()
        finally:
            if pending is not None:  # cut short by an exception: not done, not committed
                if pending[1] is not None:
                    pending[1].drop()
            self.close()
        return self.stats

    def close(self) -> None:
        """Commit what is done, nothing else (``kafka_io.commit_done_and_close``)."""
        try:
            kafka_io.commit_done_and_close(self.member.consumer, self.done, self.settings.kafka.request_timeout_s)
        finally:
            self.dlq.close(timeout=self.settings.kafka.request_timeout_s)


def run_stream(settings: Settings, until_idle: float | None = None) -> dict:
    stats = StreamWorker(settings).run(until_idle)
    return asdict(stats)


def read_dead_letters(settings: Settings, timeout_s: float = 5.0) -> list[dict]:
    """Everything on the dead-letter topic, for tests and inspection."""
    from kafka import KafkaConsumer
    cons = KafkaConsumer(settings.kafka.dlq_topic, **kafka_io.connection(settings), group_id=None,
                         auto_offset_reset="earliest", consumer_timeout_ms=int(timeout_s * 1000))
    out = [{"value": r.value, **{k: v.decode() for k, v in r.headers}} for r in cons]
    cons.close()
    return out

