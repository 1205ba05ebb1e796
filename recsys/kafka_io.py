"""Kafka clients with the project's delivery settings, and the replay of a source into Kafka."""
from __future__ import annotations

import logging
import signal
import socket
import struct
import threading
import time
from typing import Callable, Iterable

from kafka import KafkaConsumer, KafkaProducer
from kafka.errors import KafkaError
from tqdm import tqdm

from recsys.errors import InvalidInput, RecsysError, Unavailable
from recsys.events import BAD_EVENT_KINDS, BadEvent, Event
from recsys.metrics import ASSIGNED_PARTITIONS, CONSUMED, DEAD_LETTERS, LAG, RECREATED, UNASSIGNED_SECONDS
from recsys.secrets import KAFKA_PASSWORD, env_name, read_secret
from recsys.settings import Settings


def connection(settings: Settings) -> dict:
    """How every Kafka client of the project reaches the brokers: the bootstrap servers, and TLS
    and SASL where ``settings.kafka.security_protocol`` asks for them."""
    k = settings.kafka
    conf: dict = {"bootstrap_servers": k.servers}
    if k.security_protocol != "PLAINTEXT":
        conf["security_protocol"] = k.security_protocol
    if k.security_protocol.startswith("SASL"):
        password = read_secret(settings, KAFKA_PASSWORD)
        if not (k.sasl_mechanism and k.sasl_username and password):
            raise InvalidInput(f"kafka: {k.security_protocol} needs RECSYS_KAFKA_SASL_MECHANISM, RECSYS_KAFKA_SASL_USERNAME "
                               f"and the secret {KAFKA_PASSWORD} ({env_name(KAFKA_PASSWORD)} or its file)")
        conf.update(sasl_mechanism=k.sasl_mechanism, sasl_plain_username=k.sasl_username, sasl_plain_password=password)
    if k.ssl_cafile is not None:
        conf["ssl_cafile"] = str(k.ssl_cafile)
    return conf


def producer(settings: Settings, **overrides) -> KafkaProducer:
    """acks=all (on min.insync.replicas brokers), retries, and idempotence, so that a retry
    after a lost reply or a leader change writes no second copy: a produce that returns
    from flush() is on the brokers once."""
    conf = dict(**connection(settings), acks="all", enable_idempotence=True, linger_ms=5,
                retries=5, max_in_flight_requests_per_connection=1)
    conf.update(overrides)
    return KafkaProducer(**conf)


def dead_letter_producer(settings: Settings) -> KafkaProducer:
    """A producer whose sends fail within ``kafka.request_timeout_s`` while the dead-letter topic
    is missing or unwritable (``dead_letter`` bounds the wait for its acknowledgements)."""
    timeout_ms = int(settings.kafka.request_timeout_s * 1000)
    return producer(settings, max_block_ms=timeout_ms, request_timeout_ms=timeout_ms)


def consumer(settings: Settings, group: str, listener=None, topics: tuple[str, ...] | None = None,
             **overrides) -> KafkaConsumer:
    """Manual commits: callers commit only after the effect of a batch is durable. ``topics``:
    the events topic unless given."""
    conf = dict(**connection(settings), group_id=group, enable_auto_commit=False,
                auto_offset_reset="earliest", max_poll_records=settings.kafka.poll_batch,
                # A crashed member's partitions move to the others after 6 s (the broker's minimum).
                session_timeout_ms=6000, heartbeat_interval_ms=2000)
    conf.update(overrides)
    cons = KafkaConsumer(**conf)
    topics = topics or (settings.kafka.events_topic,)
    cons.subscribe(list(topics), listener=listener)
    # Learn the topic's partitions before the first join. Otherwise the first assignment is
    # empty ("No partition metadata") and the metadata that arrives next forces a second
    # rebalance, which kafka-python 3.0.12 can lose: if poll()'s timeout ends while that
    # JoinGroup/SyncGroup is in flight, the leader's assignment step marks the metadata as
    # handled, nothing collects the finished join, and the member waits forever with no
    # partitions and its heartbeats off. See GroupMember for the bound on what remains.
    for topic in topics:
        cons.partitions_for_topic(topic)
    return cons


def broker_answers(server: str) -> bool:
    """True if the broker at ``host:port`` answers an ApiVersions request.

    Spoken raw: a KafkaAdminClient whose bootstrap fails leaks its IO thread, and
    a starting broker accepts connections well before it answers them.
    """
    host, port = server.rsplit(":", 1)
    request = struct.pack(">hhih", 18, 0, 7, -1)  # ApiVersions v0, correlation id 7, no client id
    try:
        with socket.create_connection((host, int(port)), timeout=2) as sock:
            sock.sendall(struct.pack(">i", len(request)) + request)
            reply = sock.recv(8)
    except OSError:
        return False
    return len(reply) == 8 and struct.unpack(">ii", reply)[1] == 7


def kafka_answers(s: Settings) -> bool:
    """True if any of the brokers answers (clients find the others through it)."""
    return any(broker_answers(server) for server in s.kafka.servers)


log = logging.getLogger(__name__)


class NoAssignment(Unavailable):
    """A group consumer got no partitions in time, even after being recreated (exit 69)."""


class AssignmentWatch:
    """When a consumer has waited too long for partitions: pure timing, no I/O.

    ``observe(assigned, now)`` returns True when the consumer should be recreated (it has
    held no partition for ``timeout_s``) and raises NoAssignment once ``attempts`` recreations
    did not help. Holding partitions resets both. ``timeout_s <= 0`` turns the bound off.
    """

    def __init__(self, timeout_s: float, attempts: int, now: float):
        self.timeout_s, self.attempts = timeout_s, attempts
        self.since: float | None = now  # waiting since; None while partitions are held
        self.recreated = 0

    def unassigned_for(self, now: float) -> float:
        return 0.0 if self.since is None else now - self.since

    def observe(self, assigned: bool, now: float) -> bool:
        if assigned:
            self.since, self.recreated = None, 0
            return False
        if self.since is None:
            self.since = now
        if self.timeout_s <= 0 or now - self.since < self.timeout_s:
            return False
        if self.recreated >= self.attempts:
            raise NoAssignment(f"no partitions assigned for {now - self.since:.0f} s, "
                               f"also after recreating the consumer {self.recreated} time(s)")
        self.recreated += 1
        self.since = now
        return True


class GroupMember:
    """A group consumer whose wait for partitions is bounded: after
    ``kafka.assignment_timeout_s`` without partitions it is closed and made anew, and after
    ``kafka.recreate_attempts`` such tries the poll raises NoAssignment (the process exits
    non-zero). The state is exported as Prometheus metrics labelled by group.

    A member without partitions counts as a fault: the project runs at most as many members
    of a group as the topic has partitions.
    """

    def __init__(self, settings: Settings, group: str, make: Callable[[], KafkaConsumer]):
        self.group, self.make = group, make
        self.watch = AssignmentWatch(settings.kafka.assignment_timeout_s, settings.kafka.recreate_attempts,
                                     time.monotonic())
        self.consumer = make()
        for kind in BAD_EVENT_KINDS:  # at 0 from the start: the first dead letter is an increase
            DEAD_LETTERS.labels(group, kind)
        CONSUMED.labels(group)
        self.lag_reported_at = 0.0
        self.lag_labels: set[tuple[str, str, str]] = set()
        self.done: dict = {}  # TopicPartition -> the next offset whose effects are not done yet

    def mark_done(self, next_offsets: dict) -> None:
        """The owner's progress (TopicPartition -> next offset to do), which the lag counts from."""
        self.done.update(next_offsets)

    def poll(self, timeout_ms: int) -> dict:
        polled = self.consumer.poll(timeout_ms=timeout_ms)
        held = self.consumer.assignment()
        now = time.monotonic()
        if self.watch.observe(bool(held), now):
            self._recreate()
        ASSIGNED_PARTITIONS.labels(self.group).set(len(held))
        UNASSIGNED_SECONDS.labels(self.group).set(self.watch.unassigned_for(now))
        if now - self.lag_reported_at >= 1.0:
            self.lag_reported_at = now
            self._report_lag(held)
        return polled

    def _report_lag(self, held) -> None:
        """Each held partition's lag: records from the last done one (``mark_done``; before any,
        the consumer's position) to the high watermark of the last fetch (nothing before the
        first), as Kafka's own tools count from the committed offset. No series is left for
        partitions that moved away."""
        labels = set()
        for tp in held:
            try:
                highwater = self.consumer.highwater(tp)
                done = self.done.get(tp)
                if done is None:
                    done = self.consumer.position(tp, timeout_ms=0)
            except KafkaError:  # moved away meanwhile
                continue
            if highwater is not None and done is not None:
                labels.add(key := (self.group, tp.topic, str(tp.partition)))
                LAG.labels(*key).set(max(0, highwater - done))
        self.done = {tp: offset for tp, offset in self.done.items() if tp in held}  # a partition back is anew
        for gone in self.lag_labels - labels:
            LAG.remove(*gone)
        self.lag_labels = labels

    def _recreate(self) -> None:
        log.warning("consumer of group %s: no partitions assigned for %.0f s; recreating it (attempt %d of %d)",
                    self.group, self.watch.timeout_s, self.watch.recreated, self.watch.attempts)
        RECREATED.labels(self.group).inc()
        self.consumer.close(autocommit=False)
        try:
            self.consumer = self.make()
        except KafkaError as exc:
            raise NoAssignment(f"group {self.group}: could not recreate the consumer: {exc}") from exc


def dead_letter(prod: KafkaProducer, settings: Settings, group: str, bad: list[tuple[object, BadEvent]]) -> int:
    """Send each (record, why) to the dead-letter topic, with the reason, the consumer group
    that rejected it and its source position as headers and the original bytes as value, and
    wait until the broker has every one (raises KafkaError if not, within about
    ``kafka.request_timeout_s``): then its offset may be committed."""
    futures = [prod.send(settings.kafka.dlq_topic, key=record.key, value=record.value or b"",
                         headers=[("reason", why.reason.encode()[:1000]), ("consumer", group.encode()),
                                  ("topic", record.topic.encode()), ("partition", str(record.partition).encode()),
                                  ("offset", str(record.offset).encode())])
               for record, why in bad]
    deadline = time.monotonic() + settings.kafka.request_timeout_s
    for f in futures:
        f.get(timeout=max(0.0, deadline - time.monotonic()))
    for _, why in bad:
        DEAD_LETTERS.labels(group, why.kind).inc()
    return len(futures)


def send_event(prod: KafkaProducer, settings: Settings, event: Event):
    """Keyed by user id, so one user's events stay in order on one partition."""
    return prod.send(settings.kafka.events_topic, key=event.user_id.encode(), value=event.to_bytes())


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
            "first_ts": first_ts, "last_ts": last_ts, "topic": settings.kafka.events_topic}


def commit_done_and_close(consumer: KafkaConsumer, done: dict, timeout_s: float) -> None:
    """A consumer's exit: commit what is done (synchronously, for the partitions still held),
    nothing else, then close. Held, and ahead of the group's position: a partition that moved
    away and came back with nothing processed since must not be rewound to what was done before.
    The reads and the commit take ``timeout_s`` at most, the close as much: with the coordinator
    away, what is not committed comes again to the next owner (the effects are idempotent)."""
    deadline = time.monotonic() + timeout_s

    def left_ms() -> int:
        return max(1, int((deadline - time.monotonic()) * 1000))
    try:
        held = consumer.assignment()
        ahead = {tp: om for tp, om in done.items()
                 if tp in held and om.offset > (consumer.committed(tp, timeout_ms=left_ms()) or 0)}
        if ahead:
            consumer.commit(offsets=ahead, timeout_ms=left_ms())
    except KafkaError as exc:
        log.warning("exit: done offsets not committed (%r); they come again, and change nothing", exc)
    finally:
        consumer.close(autocommit=False, timeout_ms=int(timeout_s * 1000))


def until_done(effect: Callable, what: str, transient: tuple, stopping: threading.Event):
    """A consumer's effect (a batch into Redis, dead letters to the broker), run until it
    succeeds, waiting out ``transient`` errors (0.1 s, doubling to 5 s); None if ``stopping``
    is set meanwhile. The effects are safe to run again (applied offsets, markers)."""
    delay = 0.1
    while True:
        try:
            return effect()
        except transient as exc:
            if stopping.is_set():
                return None
            log.warning("%s unavailable (%r); retrying in %.1fs", what, exc, delay)
            if stopping.wait(delay):
                return None
            delay = min(delay * 2, 5.0)


def consume(member: GroupMember, on_poll: Callable[[dict], None], stopping: threading.Event,
            until_idle: float | None = None, busy: Callable[[], bool] = lambda: False) -> None:
    """The loop of every group consumer: poll, and hand each poll to ``on_poll`` (empty ones
    too, for work that is due by time), until SIGTERM or SIGINT sets ``stopping``, or until
    ``until_idle`` seconds pass without records while partitions are held and nothing is
    ``busy``. Signal handlers are installed from the main thread only, and restored after."""
    in_main = threading.current_thread() is threading.main_thread()
    previous = ({sig: signal.signal(sig, lambda *_: stopping.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
                if in_main else {})
    last_record = time.monotonic()
    try:
        while not stopping.is_set():
            polled = member.poll(timeout_ms=200)
            on_poll(polled)
            now = time.monotonic()
            if any(polled.values()) or not member.consumer.assignment():  # idle counts once partitions are ours
                last_record = now
            elif until_idle is not None and not busy() and now - last_record >= until_idle:
                break
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
