"""Fault injection for tests of training's recovery; never used by production runs."""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass
class KillWorkerAtEpoch:
    """Kill worker ``rank`` (default: the last) hard at the start of ``epoch`` (1-based), once:
    ``marker`` records that it happened, so the restarted worker goes on."""

    epoch: int
    marker: str
    rank: int | None = None
    delay_s: float = 5.0

    def __call__(self, epoch: int, rank: int, world: int) -> None:
        target = world - 1 if self.rank is None else self.rank
        if epoch + 1 != self.epoch or rank != target or os.path.exists(self.marker):
            return
        # The other workers are already blocked in the epoch's first all-reduce; wait past the
        # controller's poll (2 s) so the last epoch's checkpoint is registered, then die hard.
        time.sleep(self.delay_s)
        Path(self.marker).write_text(f"worker {rank} killed in epoch {epoch + 1}\n")
        log.warning("fault injection: worker %d exits in epoch %d", rank, epoch + 1)  # flushed by its handler
        os._exit(1)
