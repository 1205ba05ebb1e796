"""Impressions: every list the API serves, on the Kafka topic ``kafka.impressions_topic``, so
that later events can be joined to what was shown (online metrics, issue 18).

A record is keyed by the pseudonymous user id, as the user's events are, so with as many
partitions as the events topic a user's impressions and events share a partition number. Its
value is JSON: the request id (also in the API's answer), the user's pseudonym, the model
version and experiment arm, the items in rank order, and the time served (ms).

Sending never blocks or fails a request: ``ImpressionSender.offer`` puts the impression in a
bounded queue and returns at once; one thread sends from it. A full queue (Kafka slow or away
longer than the queue lasts), a producer that cannot be made, or a send the brokers refuse
drops the impression and counts it by reason.
"""
from __future__ import annotations

import json
import logging
import queue
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Callable

log = logging.getLogger(__name__)


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
        record = asdict(self)
        record["items"] = [{"item_id": item, "rank": rank} for rank, item in enumerate(self.items, start=1)]
        return json.dumps(record, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> Impression:
        record = json.loads(raw)
        items = sorted(record["items"], key=lambda x: x["rank"])
        return cls(record["request_id"], record["user_id"], record["model_version"], record["arm"],
                   tuple(x["item_id"] for x in items), int(record["ts"]))


class ImpressionSender:
    """A bounded queue in front of one sending thread. ``send(impression)`` is the I/O (a Kafka
    send, which may wait for the brokers' metadata) and returns a future-like object with
    ``add_errback``; ``on_drop(reason, n)`` counts what is lost: "queue_full" or "kafka"."""

    def __init__(self, send: Callable[[Impression], object], on_drop: Callable[[str, int], None],
                 on_sent: Callable[[int], None] = lambda n: None, capacity: int = 10_000):
        self._send, self._on_drop, self._on_sent = send, on_drop, on_sent
        self._queue: queue.Queue[Impression | None] = queue.Queue(maxsize=capacity)
        self._thread = threading.Thread(target=self._run, name="impressions", daemon=True)
        self._thread.start()

    def offer(self, impression: Impression) -> bool:
        """Queue the impression; False (and counted) when the queue is full. Never waits."""
        try:
            self._queue.put_nowait(impression)
            return True
        except queue.Full:
            self._on_drop("queue_full", 1)
            return False

    def close(self, timeout_s: float = 5.0) -> None:
        """Send what is queued (within ``timeout_s``), then stop the thread."""
        try:
            self._queue.put(None, timeout=timeout_s)
        except queue.Full:
            return
        self._thread.join(timeout_s)

    def _run(self) -> None:
        while (impression := self._queue.get()) is not None:
            try:
                future = self._send(impression)
            except Exception as exc:  # the producer could not be made, or the topic's metadata did not come
                log.debug("impression dropped: %r", exc)
                self._on_drop("kafka", 1)
                continue
            future.add_callback(lambda _meta: self._on_sent(1))
            future.add_errback(lambda _exc: self._on_drop("kafka", 1))
