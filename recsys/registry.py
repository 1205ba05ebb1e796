"""The model registry: one folder per version, ``current`` and ``previous`` pointers.

Layout under ``settings.registry_dir``::

  v0001/ ... v00NN/     one folder per published version (never modified once in place)
  pointers.json         {"current": "v0003", "previous": "v0002", "experiment": null}

A version is written under a hidden temporary name and renamed into place, so a reader
never sees a half-written version. The pointers live in one small file replaced with
``os.replace``: a reader sees either the old ones or the new ones, never a mix. Every change
of the pointers (promote, rollback, start or end an experiment) reads, changes and writes them
under an exclusive lock on ``.pointers.lock`` (``flock``, across processes: the CLI, the
scheduler's publish and the guardrail), so none can undo another's. An experiment
(``start_experiment``) names a candidate version that a share of users is served (A/B) or that
is computed beside the current one without being served (shadow); promoting any version, or a
rollback, ends it.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional

from recsys.errors import InvalidInput

_VERSION = re.compile(r"^v(\d{4,})$")


class RegistryError(InvalidInput):
    """A registry operation that cannot be done; the message says why."""


class CorruptVersion(RegistryError):
    """A version whose files do not match the sha256 sums in its model card."""


CARD = "model_card.json"


def file_sums(folder: Path) -> dict[str, str]:
    """sha256 of every file of a version folder but its card, by path relative to the folder."""
    folder = Path(folder)
    return {str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(folder.rglob("*")) if f.is_file() and f.name != CARD}


def verify_files(folder: Path, expected: dict[str, str]) -> None:
    """Raise CorruptVersion naming each file that is missing or whose sum differs."""
    got = file_sums(folder)
    bad = sorted(name for name, digest in expected.items() if got.get(name) != digest)
    if bad:
        raise CorruptVersion(f"{Path(folder).name}: {', '.join(bad)} missing or changed since training "
                             f"(sha256 in {CARD})")


class Registry:
    def __init__(self, root: Path):
        self.root = Path(root)

    # -- reading ---------------------------------------------------------------------------
    def list(self) -> list[str]:
        if not self.root.is_dir():
            return []
        names = [p.name for p in self.root.iterdir() if p.is_dir() and _VERSION.match(p.name)]
        return sorted(names, key=lambda n: int(_VERSION.match(n).group(1)))

    def pointers(self) -> dict:
        path = self.root / "pointers.json"
        if not path.exists():
            return {"current": None, "previous": None, "experiment": None}
        return {"experiment": None, **json.loads(path.read_text())}

    def experiment(self) -> Optional[dict]:
        """{"candidate": version, "share": s, "shadow": bool, "started_at": iso time}, or None."""
        return self.pointers()["experiment"]

    def current(self) -> Optional[str]:
        return self.pointers().get("current")

    def previous(self) -> Optional[str]:
        return self.pointers().get("previous")

    def resolve(self, version: str) -> str:
        """A version name from ``v0003``, ``3``, ``current`` or ``previous``."""
        if version in ("current", "previous"):
            v = self.pointers().get(version)
            if not v:
                raise RegistryError(f"registry {self.root}: no {version} model")
            return v
        if re.fullmatch(r"\d+", version):
            version = f"v{int(version):04d}"
        if version not in self.list():
            raise RegistryError(f"registry {self.root}: no version {version!r} (have: {', '.join(self.list()) or 'none'})")
        return version

    def path(self, version: str) -> Path:
        return self.root / self.resolve(version)

    def show(self, version: str) -> dict:
        v = self.resolve(version)
        card = self.root / v / "model_card.json"
        out = json.loads(card.read_text()) if card.exists() else {"version": v}
        p = self.pointers()
        return {**out, "is_current": p.get("current") == v, "is_previous": p.get("previous") == v}

    def summary(self) -> dict:
        rows = []
        for v in self.list():
            card = self.root / v / "model_card.json"
            c = json.loads(card.read_text()) if card.exists() else {}
            rows.append({"version": v, "created_at": c.get("created_at"), "source": c.get("source"),
                         "hr@10": c.get("metrics", {}).get("two_tower", {}).get("hr@10")})
        return {**self.pointers(), "versions": rows}

    # -- writing ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def _changing(self):
        """The pointers' lock, held while they are read, changed and written."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".pointers.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _write_pointers(self, current: Optional[str], previous: Optional[str], experiment: Optional[dict] = None) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".pointers.{uuid.uuid4().hex}.tmp"
        with open(tmp, "w") as fh:
            json.dump({"current": current, "previous": previous, "experiment": experiment}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.root / "pointers.json")

    def promote(self, version: str) -> dict:
        """Make ``version`` current; an experiment ends (whichever version it tried)."""
        v = self.resolve(version)
        with self._changing():
            p = self.pointers()
            if p["current"] == v and p["experiment"] is None:
                return p
            self._write_pointers(v, p["current"] if p["current"] != v else p["previous"])
            return self.pointers()

    def start_experiment(self, version: str, share: float, shadow: bool = False) -> dict:
        """Serve ``version`` to ``share`` of the users (by a stable hash of their pseudonym), or with
        ``shadow`` compute it for them beside the current one without serving it."""
        v = self.resolve(version)
        if not 0 < share <= 1:
            raise RegistryError(f"share {share}: give a share of users in (0, 1]")
        with self._changing():
            p = self.pointers()
            if not p["current"]:
                raise RegistryError(f"registry {self.root}: no current model to compare a candidate with")
            if v == p["current"]:
                raise RegistryError(f"{v} is the current model: a candidate must be another version")
            experiment = {"candidate": v, "share": share, "shadow": shadow,
                          "started_at": datetime.now(timezone.utc).isoformat(timespec="milliseconds")}
            self._write_pointers(p["current"], p["previous"], experiment)
            return self.pointers()

    def end_experiment(self, expected: Optional[dict] = None) -> dict:
        """Stop the experiment without promoting its candidate; with ``expected``, only if that
        is still the one running (the guardrail must not end an experiment started since)."""
        with self._changing():
            p = self.pointers()
            if p["experiment"] is None:
                raise RegistryError(f"registry {self.root}: no experiment running")
            if expected is not None and p["experiment"] != expected:
                raise RegistryError(f"registry {self.root}: the experiment changed meanwhile")
            self._write_pointers(p["current"], p["previous"])
            return self.pointers()

    def rollback(self) -> dict:
        with self._changing():
            p = self.pointers()
            if not p.get("previous"):
                raise RegistryError(f"registry {self.root}: no previous model to roll back to")
            self._write_pointers(p["previous"], p["current"])
            return self.pointers()

    def publish(self, write: Callable[[Path, str], None], promote: bool = True) -> str:
        """Write a new version with ``write(folder, version)`` into a temp folder, rename it in place.

        If ``write`` raises, the temp folder is removed and the registry is unchanged.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".tmp-{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            existing = self.list()
            n = int(_VERSION.match(existing[-1]).group(1)) + 1 if existing else 1
            write(tmp, f"v{n:04d}")
            while True:
                version = f"v{n:04d}"
                try:
                    os.rename(tmp, self.root / version)  # fails if a concurrent publisher took the name
                    break
                except OSError:
                    if not (self.root / version).exists():
                        raise
                    n += 1
                    card = tmp / "model_card.json"
                    if card.exists():  # keep the card's version in step with the folder name
                        c = json.loads(card.read_text())
                        c["version"] = f"v{n:04d}"
                        card.write_text(json.dumps(c, indent=1))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if promote:
            self.promote(version)
        return version

    def clean_temp(self) -> None:
        """Remove temp folders left by a crashed publisher."""
        for p in self.root.glob(".tmp-*"):
            shutil.rmtree(p, ignore_errors=True)
