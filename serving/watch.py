"""A replica's registry watcher as a guarded loop (issue 35): it follows the model registry and
the catalogue every ``every_s``, and nothing one round raises ends it. A failed round is
logged and counted, and the next waits twice as long (up to ``MAX_BACKOFF_S``), so a fault that
lasts does not flood the log. ``healthy`` is what readiness asks: the thread is alive and a
round ended within ``stale_s`` (a round that hangs, or rounds that keep failing, make the
replica unready instead of serving an old model unnoticed)."""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 60.0


class Watcher:
    def __init__(self, round_: Callable[[], None], every_s: float, stale_s: float, stopping: threading.Event):
        self.round, self.every_s, self.stale_s, self.stopping = round_, every_s, stale_s, stopping
        self.done_at = time.monotonic()  # the replica loaded its model just before: as good as a round
        self.failures = 0  # in a row
        self.thread = threading.Thread(target=self.run, name="registry-watcher", daemon=True)

    def start(self) -> Watcher:
        self.thread.start()
        return self

    def run(self) -> None:
        delay = self.every_s
        while not self.stopping.wait(delay):
            try:
                self.round()
            except Exception:
                self.failures += 1
                delay = min(delay * 2, max(self.every_s, MAX_BACKOFF_S))
                log.exception("registry watcher: round failed (%d in a row); next in %.1f s", self.failures, delay)
            else:
                self.done_at, self.failures, delay = time.monotonic(), 0, self.every_s

    def healthy(self, now: float | None = None) -> bool:
        return self.thread.is_alive() and (time.monotonic() if now is None else now) - self.done_at <= self.stale_s
