"""Impressions: every list the API serves, on the Kafka topic ``kafka.impressions_topic``, so
that later events can be joined to what was shown (online metrics, issue 18).

An impression is the request id (also in the API's answer), the user's pseudonym, the model
version and experiment arm, the items in rank order, and the time served (ms). Two record
shapes, both read by ``decode_record``:

- a single impression (a JSON object, keyed by the pseudonym): what a replica sends with
  batching off (``serving.impressions_flush_ms`` 0), and what was written before batches;
- a batch (a JSON array of compact impressions, items as a plain list), one record per
  partition per flush: a replica gathers what it served for ``serving.impressions_flush_ms``
  (or ``impressions_batch_max`` answers) and sends each partition's share to that partition,
  the one Kafka's default partitioner gives the pseudonym, so a user's impressions still
  share a partition number with the user's events (``partition_of``).

Sending never blocks or fails a request: ``ImpressionSender.offer`` appends the impression to a
bounded buffer and returns at once; one thread gathers and sends from it, woken once per batch
(not once per impression: a wake-up per answer costs the event loop a GIL hand-over each). A
full buffer (reason ``queue_full``: Kafka slow or away longer than the buffer lasts), a producer
that cannot be made, or a send the brokers refuse drops the impressions and counts them by reason.
"""
from __future__ import annotations

import collections
import json
import logging
import random
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Callable, Iterable

from kafka.partitioner.default import murmur2

log = logging.getLogger(__name__)

_compact = json.JSONEncoder(separators=(",", ":")).encode


@dataclass(frozen=True)
class Impression:
    request_id: str
    user_id: str  # the pseudonym
    model_version: str | None  # None: no model yet (the trending fallback)
    arm: str  # "current", or an experiment's arm
    items: tuple[str, ...]  # rank 1 first
    ts: int  # ms since the epoch, when served

    @classmethod
    def served(cls, user_id: str, model_version: str | None, arm: str, items: list[str]) -> Impression:
        return cls(uuid.uuid4().hex, user_id, model_version, arm, tuple(items), int(time.time() * 1000))

    def to_bytes(self) -> bytes:
        """The single-impression record (items with their ranks)."""
        record = asdict(self)
        record["items"] = [{"item_id": item, "rank": rank} for rank, item in enumerate(self.items, start=1)]
        return _compact(record).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> Impression:
        """A single-impression record."""
        return cls._from_single(json.loads(raw))

    @classmethod
    def _from_single(cls, record: dict) -> Impression:
        items = sorted(record["items"], key=lambda x: x["rank"])
        return cls(record["request_id"], record["user_id"], record["model_version"], record["arm"],
                   tuple(x["item_id"] for x in items), int(record["ts"]))


def encode_batch(impressions: list[Impression]) -> bytes:
    """A batch record: a JSON array of impressions, each one's items a list in rank order."""
    return _compact([[i.request_id, i.user_id, i.model_version, i.arm, list(i.items), i.ts]
                     for i in impressions]).encode()


def decode_record(raw: bytes) -> tuple[list[Impression], bool]:
    """The impressions of a record of either shape, and whether it was a batch (whose
    impressions carry their own served times; a single record's time is the record's).
    ValueError, KeyError or TypeError for anything else."""
    record = json.loads(raw)
    if isinstance(record, dict):
        return [Impression._from_single(record)], False
    if not isinstance(record, list) or not record:
        raise ValueError("an impressions record is an object or a non-empty array")
    out = []
    for request_id, user_id, version, arm, items, ts in record:
        if not (isinstance(request_id, str) and isinstance(user_id, str) and isinstance(arm, str)
                and isinstance(items, list) and all(isinstance(x, str) for x in items)):
            raise TypeError(f"not an impression: {request_id!r}")
        out.append(Impression(request_id, user_id, version, arm, tuple(items), int(ts)))
    return out, True


def partition_of(user_id: str, partitions: int) -> int:
    """The partition Kafka's default partitioner gives a record keyed by ``user_id`` (the
    events' key), so a batch goes where its users' events go."""
    return (murmur2(user_id.encode()) & 0x7FFFFFFF) % partitions


def by_partition(impressions: Iterable[Impression], partitions: int) -> dict[int, list[Impression]]:
    out: dict[int, list[Impression]] = {}
    for imp in impressions:
        out.setdefault(partition_of(imp.user_id, partitions), []).append(imp)
    return out


class ImpressionSender:
    """A bounded buffer in front of one thread that gathers impressions for up to ``flush_s``
    (or ``batch_max`` of them) and hands each batch to ``send``: the I/O, which returns one
    ``(future, impressions in it)`` per Kafka record, each future with ``add_callback`` and
    ``add_errback``. ``on_drop(reason, n)`` counts what is lost: "queue_full" or "kafka";
    ``on_sent(n)`` what the brokers acknowledged.

    ``sample``: the share of answers whose impression is offered at all (1.0: every one). Below
    1 the online metrics see a sample: their counters (impressions, items shown, hits) scale
    by about ``sample``, while rates (CTR@k, hit rate) stay unbiased but noisier; the guardrail
    sees fewer lists, so it needs longer to stop a bad candidate (``online.guard_min_lists``
    counts sampled lists); and an event on an item of an unsampled list is attributed to no
    list (or to an older sampled list that showed the item, within the window)."""

    def __init__(self, send: Callable[[list[Impression]], list[tuple[object, int]]],
                 on_drop: Callable[[str, int], None], on_sent: Callable[[int], None] = lambda n: None,
                 capacity: int = 10_000, flush_s: float = 0.1, batch_max: int = 500, sample: float = 1.0,
                 clock: Callable[[], float] = time.monotonic, draw: Callable[[], float] = random.random):
        self._send, self._on_drop, self._on_sent = send, on_drop, on_sent
        # flush_s 0: each impression goes alone, at once.
        self._flush_s, self._batch_max = flush_s, 1 if flush_s <= 0 else max(1, batch_max)
        self._capacity, self._sample, self._clock, self._draw = capacity, sample, clock, draw
        self._pending: collections.deque[Impression] = collections.deque()  # append/popleft: safe across threads
        self._wake = threading.Event()  # a batch's first impression, a full batch, or close()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="impressions", daemon=True)
        self._thread.start()

    def offer(self, impression: Impression) -> bool:
        """Buffer the impression (or leave it out of the sample); False (and counted) when the
        buffer is full. Never waits; wakes the sending thread only for a batch's first impression
        and for a full batch."""
        if self._sample < 1.0 and self._draw() >= self._sample:
            return True
        if len(self._pending) >= self._capacity:
            self._on_drop("queue_full", 1)
            return False
        self._pending.append(impression)
        n = len(self._pending)
        if n == 1 or n == self._batch_max:
            self._wake.set()
        return True

    def close(self, timeout_s: float = 5.0) -> None:
        """Send what is buffered (within ``timeout_s``), then stop the thread."""
        self._closed = True
        self._wake.set()
        self._thread.join(timeout_s)

    def _run(self) -> None:
        while not (self._closed and not self._pending):
            if not self._pending:
                self._wake.wait()
                self._wake.clear()
                continue
            deadline = self._clock() + self._flush_s  # from the batch's first impression
            while len(self._pending) < self._batch_max and not self._closed:
                left = deadline - self._clock()
                if left <= 0:
                    break
                self._wake.wait(left)
                self._wake.clear()
            batch = [self._pending.popleft() for _ in range(min(self._batch_max, len(self._pending)))]
            self._flush(batch)

    def _flush(self, batch: list[Impression]) -> None:
        try:
            records = self._send(batch)
        except Exception as exc:  # the producer could not be made, or the topic's metadata did not come
            log.debug("%d impressions dropped: %r", len(batch), exc)
            self._on_drop("kafka", len(batch))
            return
        for future, n in records:
            future.add_callback(lambda _meta, n=n: self._on_sent(n))
            future.add_errback(lambda _exc, n=n: self._on_drop("kafka", n))
