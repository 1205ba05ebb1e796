"""Admission of event posts to the wait for Kafka: pure counting, no I/O.

Without a bound, a replica takes every post while a partition has no leader, and each holds a
connection for the produce timeout. A client's pool fills with them, its own requests wait
behind them past its timeout, and on a busy machine the replica's event loop falls behind the
same way: the client hears nothing. With it, the posts beyond the bound get a 503 at once,
before anything is sent.
"""
from __future__ import annotations


class Admission:
    """At most ``limit`` holders at once; a caller beyond it is refused at once (no queue).

    ``enter()`` returns False when full, else takes a place that ``leave()`` gives back. One
    event loop calls both, so no lock is needed."""

    def __init__(self, limit: int):
        if limit < 1:
            raise ValueError(f"admission limit {limit}: at least 1")
        self.limit, self.held = limit, 0

    def enter(self) -> bool:
        if self.held >= self.limit:
            return False
        self.held += 1
        return True

    def leave(self) -> None:
        if self.held <= 0:
            raise RuntimeError("admission: leave() without a place held")
        self.held -= 1
