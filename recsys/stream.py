"""The stream worker: Kafka ``user-events`` -> Redis online features, at least once, effects once.

Per poll: decode every record, apply the good ones to Redis in one pipelined round trip
(each event atomic, and applied once: by its partition's applied offset, kept in Redis with
the effects, and by its event id for a client's retries), send the bad ones to the dead-letter
topic (reason and source position in headers, original bytes as value) and wait for the
broker's acknowledgement, and only then commit the batch's offsets. Redis or the dead-letter
topic away: the worker retries the batch until they are back. Every exit (SIGTERM, SIGINT,
an exception) commits only the offsets of batches whose effects are done, so a batch cut
short comes again, and the replay changes nothing.
"""
from __future__ import annotations

import threading
from dataclasses import asdict, dataclass

import redis
from kafka import OffsetAndMetadata, TopicPartition
from kafka.errors import KafkaError

from recsys import kafka_io
from recsys.events import BadEvent, EventTimeBounds, parse_event
from recsys.feature_store import FeatureStore
from recsys.settings import Settings


@dataclass
class StreamStats:
    consumed: int = 0
    applied: int = 0
    duplicates: int = 0
    dlq: int = 0


REDIS_AWAY = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError)


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
        # A send to a missing or unwritable dead-letter topic fails after 5 s and is tried again.
        self.dlq = kafka_io.producer(settings, max_block_ms=5000, request_timeout_ms=5000)
        self.stats = StreamStats()
        self.done: dict[TopicPartition, OffsetAndMetadata] = {}  # offsets whose effects are done
        self.stopping = threading.Event()  # set by SIGTERM/SIGINT, or by an embedding thread

    def process(self, records) -> bool:
        """One batch: effects first (Redis, acknowledged dead letters), offsets after.
        False when stopped before the effects were done: nothing is committed then."""
        good, positions, bad = [], [], []
        for record in records:
            try:
                good.append(parse_event(record.value, self.bounds))
                positions.append((record.topic, record.partition, record.offset))
            except BadEvent as exc:
                bad.append((record, exc.reason))
        applied = kafka_io.until_done(lambda: self.store.apply_events(good, positions), "Redis", REDIS_AWAY,
                                      self.stopping)
        if applied is None or kafka_io.until_done(
                lambda: kafka_io.dead_letter(self.dlq, self.settings, self.settings.kafka.stream_group, bad),
                "the dead-letter topic", (KafkaError,), self.stopping) is None:
            return False
        offsets = next_offsets(records)
        self.done.update(offsets)
        # Asynchronous: a commit lost in a crash only replays events the applied offsets absorb.
        self.member.consumer.commit_async(offsets=offsets)
        self.stats.consumed += len(records)
        self.stats.applied += sum(applied)
        self.stats.duplicates += len(applied) - sum(applied)
        self.stats.dlq += len(bad)
        return True

    def run(self, until_idle: float | None = None) -> StreamStats:
        """Consume until SIGTERM/SIGINT, or until ``until_idle`` seconds pass with no record."""
        def on_poll(polled):
            records = [r for batch in polled.values() for r in batch]
            if records and not self.process(records):
                self.stopping.set()  # stopped mid-batch: poll no further
        try:
            kafka_io.consume(self.member, on_poll, self.stopping, until_idle)
        finally:
            self.close()
        return self.stats

    def close(self) -> None:
        """Commit what is done (synchronously, for the partitions still held), nothing else."""
        consumer = self.member.consumer
        held = consumer.assignment()
        # Held, and ahead of the group's position: a partition that moved away and came back
        # with nothing processed since must not be rewound to what was done before.
        done = {tp: om for tp, om in self.done.items() if tp in held and om.offset > (consumer.committed(tp) or 0)}
        try:
            if done:
                consumer.commit(offsets=done)
        finally:
            consumer.close(autocommit=False)
            self.dlq.close()


def run_stream(settings: Settings, until_idle: float | None = None) -> dict:
    stats = StreamWorker(settings).run(until_idle)
    return asdict(stats)


def read_dead_letters(settings: Settings, timeout_s: float = 5.0) -> list[dict]:
    """Everything on the dead-letter topic, for tests and inspection."""
    from kafka import KafkaConsumer
    cons = KafkaConsumer(settings.kafka.dlq_topic, bootstrap_servers=settings.kafka.servers, group_id=None,
                         auto_offset_reset="earliest", consumer_timeout_ms=int(timeout_s * 1000))
    out = [{"value": r.value, **{k: v.decode() for k, v in r.headers}} for r in cons]
    cons.close()
    return out

