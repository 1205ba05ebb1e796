"""The fault scenarios of ``recsys chaos``: each breaks one part of the running system and checks what it promised."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Iterable

from lab import process, stack
from recsys.feature_store import FeatureStore
from recsys.settings import Settings


def end_scratch_run(s: Settings, procs: Iterable = (), api=None, folders: Iterable[Path] = ()) -> None:
    """The end of a scenario on scratch settings (``lab.bench.stream.scratch_settings``): its API
    and child processes stopped (children commit what they did), its topics and Redis prefix
    deleted, its folders removed."""
    if api is not None:
        api.stop()
    process.stop(list(procs), grace_s=30)
    stack.delete_topics(s)
    FeatureStore(s).clear()
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)
