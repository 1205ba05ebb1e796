"""The benchmarks' saved results: ``<home>/bench/<name>.json``, read back by ``recsys capacity``.

Each bench that yields a per-unit figure (CPU-ms per request, events/s per worker, bytes per
user, bytes per indexed item, examples/s per worker) saves the dict it prints, with when it was
measured and at which commit, so a capacity plan can say where each of its figures came from. The file keeps the last
``HISTORY_LIMIT`` runs, oldest first (``{"history": [...]}``), for ``recsys bench report``'s plots;
a file of one bare result, as written before the history, reads as a history of one run.
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
           "train": "recsys bench train", "redis-memory": "recsys bench redis-memory",
           "reaction": "recsys bench reaction"}
HISTORY_LIMIT = 50  # runs kept per bench, oldest dropped first


def path(settings: Settings, name: str) -> Path:
    return settings.home / "bench" / f"{name}.json"


def saved_names(settings: Settings) -> list[str]:
    """The benches with a saved result here, sorted."""
    return sorted(p.stem for p in (settings.home / "bench").glob("*.json"))


def _git(repo: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_commit(repo: Path = REPO) -> str | None:
    """``git rev-parse --short HEAD`` of the project, with ``+dirty`` when tracked files differ
    from it (the run measured code no commit holds), or None outside a git checkout."""
    commit = _git(repo, "rev-parse", "--short", "HEAD")
    if commit and _git(repo, "status", "--porcelain", "--untracked-files=no"):
        commit += "+dirty"
    return commit or None


def save(settings: Settings, name: str, result: dict) -> Path:
    """Append ``result`` with ``measured_at`` (UTC) and ``commit`` to the bench's history;
    atomically, so a reader never sees half a file."""
    if name not in BENCHES:
        raise ValueError(f"unknown bench {name!r}: one of {', '.join(BENCHES)}")
    target = path(settings, name)
    target.parent.mkdir(parents=True, exist_ok=True)
    record = {**result, "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "commit": git_commit()}
    try:
        runs = history(settings, name)
    except InvalidInput:  # an unreadable file is replaced, as it was before the history
        runs = []
    tmp = target.with_suffix(f".json.tmp{os.getpid()}")
    tmp.write_text(json.dumps({"history": [*runs, record][-HISTORY_LIMIT:]}, default=str) + "\n")
    tmp.replace(target)
    return target


def history(settings: Settings, name: str) -> list[dict]:
    """Every saved run of the bench, oldest first; empty when it has not been run here."""
    target = path(settings, name)
    try:
        data = json.loads(target.read_text())
    except FileNotFoundError:
        return []
    except ValueError as exc:
        raise InvalidInput(f"{target} is not JSON ({exc}): run `{BENCHES.get(name, 'the bench')}` again") from None
    if isinstance(data, dict) and list(data) == ["history"] and isinstance(data["history"], list):
        return data["history"]
    return [data]  # one bare result: the format before the history


def load(settings: Settings, name: str) -> dict | None:
    """The latest saved result, or None when that bench has not been run here."""
    runs = history(settings, name)
    return runs[-1] if runs else None
