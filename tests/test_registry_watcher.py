"""Issue 35: a replica's registry watcher survives whatever one round raises (logged, the next
round later and later), and readiness notices a watcher that died or stopped ending rounds."""
from __future__ import annotations

import threading

import redis

from serving.watch import MAX_BACKOFF_S, Watcher


class Waits(threading.Event):
    """A stopping event whose wait returns at once, noting the delay asked; set after ``n`` waits."""

    def __init__(self, n: int):
        super().__init__()
        self.delays, self.n = [], n

    def wait(self, timeout=None) -> bool:
        self.delays.append(timeout)
        return len(self.delays) > self.n


def test_a_failing_round_is_logged_and_the_next_waits_longer_until_one_succeeds(caplog):
    outcomes = iter([RuntimeError("bug"), redis.ConnectionError("Redis away"), None, KeyError("x"), None])

    def round_():
        outcome = next(outcomes)
        if outcome is not None:
            raise outcome

    stopping = Waits(5)
    watcher = Watcher(round_, every_s=1.0, stale_s=30, stopping=stopping)
    made = watcher.done_at
    watcher.run()  # returns only once stopping is set: no round ended it
    assert stopping.delays == [1.0, 2.0, 4.0, 1.0, 2.0, 1.0]
    assert watcher.failures == 0 and watcher.done_at > made
    assert sum("round failed" in r.getMessage() for r in caplog.records) == 3


def test_the_backoff_stops_growing_at_its_cap():
    def round_():
        raise RuntimeError("always")

    stopping = Waits(12)
    watcher = Watcher(round_, every_s=1.0, stale_s=30, stopping=stopping)
    watcher.run()
    assert stopping.delays[-1] == MAX_BACKOFF_S and max(stopping.delays) == MAX_BACKOFF_S and watcher.failures == 12


def test_readiness_sees_a_watcher_that_died_or_went_stale():
    stopping = threading.Event()
    ran = threading.Event()
    watcher = Watcher(ran.set, every_s=0.01, stale_s=5, stopping=stopping).start()
    assert ran.wait(5) and watcher.healthy()
    assert not watcher.healthy(now=watcher.done_at + 6)  # no round ended for longer than stale_s: hung
    stopping.set()
    watcher.thread.join(5)
    assert not watcher.healthy()  # the thread is gone
    assert not Watcher(ran.set, every_s=0.01, stale_s=5, stopping=threading.Event()).healthy()  # never ran
