"""The benchmarks' saved results: ``<home>/bench/<name>.json``, read back by ``recsys capacity``.

Each bench that yields a per-unit figure (CPU-ms per request, events/s per worker, bytes per
user, bytes per indexed item, examples/s per worker) saves the dict it prints, with when it was
measured and at which commit, so a capacity plan can say where each of its figures came from.
"""
from __future__ import annotations

import json
import os
import subprocess
from datetime import datetime, timezone
from pathlib import Path

from lab import REPO
from recsys.errors import InvalidInput
from recsys.settings import Settings

# name -> the command that writes it
BENCHES = {"serve": "recsys bench serve", "stream": "recsys bench stream", "ann": "recsys bench ann",
           "train": "recsys bench train", "redis-memory": "recsys bench redis-memory"}


def path(settings: Settings, name: str) -> Path:
    return settings.home / "bench" / f"{name}.json"


def git_commit(repo: Path = REPO) -> str | None:
    """``git rev-parse --short HEAD`` of the project, or None outside a git checkout."""
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True,
                              timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    return done.stdout.strip() or None


def save(settings: Settings, name: str, result: dict) -> Path:
    """Write ``result`` with ``measured_at`` (UTC) and ``commit``; atomically, so a reader never
    sees half a file."""
    if name not in BENCHES:
        raise ValueError(f"unknown bench {name!r}: one of {', '.join(BENCHES)}")
    target = path(settings, name)
    target.parent.mkdir(parents=True, exist_ok=True)
    record = {**result, "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "commit": git_commit()}
    tmp = target.with_suffix(f".json.tmp{os.getpid()}")
    tmp.write_text(json.dumps(record, default=str) + "\n")
    tmp.replace(target)
    return target


def load(settings: Settings, name: str) -> dict | None:
    """The saved result, or None when that bench has not been run here."""
    target = path(settings, name)
    try:
        return json.loads(target.read_text())
    except FileNotFoundError:
        return None
    except ValueError as exc:
        raise InvalidInput(f"{target} is not JSON ({exc}): run `{BENCHES.get(name, 'the bench')}` again") from None
