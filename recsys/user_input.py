"""The user tower's input: one definition of each input, and the one encoder of them.

Every encoding of a user goes through ``encode``: a replica's requests (``recsys.model``), the
in-memory training data (``training.data``) and the Ray Data engine's blocks
(``training.examples``). The TensorFlow model (``training.model``), its workers' batches and the
numpy tower read the inputs by the names and shapes below, so adding an input is: its ``Input``
in ``schema``, its encoding in ``_ENCODERS``, and its use in the two towers' arithmetic.

``SCHEMA_VERSION`` changes whenever an input is added, dropped or encoded differently. The
exported model records its schema (``FILE``, ``recsys.model.export``) and a replica serves a
version only by the schema it recorded (``recorded_schema``): one whose schema this code does
not encode is refused with ``UnsupportedUserInput``.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional, Protocol, Sequence

import numpy as np

from recsys.errors import RecsysError
from recsys.events import EventType
from recsys.features import UserFeatures

SCHEMA_VERSION = 1
FILE = "user_input.json"  # the schema a model version was trained with, in its folder

USER = "user"      # the user's vocabulary code (0: unknown or dropped out)
HIST = "hist"      # the recent items' codes, newest first, 0 after the last (or unknown)
COUNTS = "counts"  # log(1 + count) of the user's events of each type, in ``EVENT_TYPES`` order
ITEM = "item"      # not the user's: a training example's positive item, the item tower's input

EVENT_TYPES = tuple(t.value for t in EventType)


@dataclass(frozen=True)
class Input:
    """One input of the user tower: ``width`` values per user, or one (a (n,) array) for None.
    ``vocabulary`` names the codes its values are ("user", "item"), None for other numbers."""

    name: str
    dtype: str
    width: Optional[int]
    vocabulary: Optional[str] = None

    def shape(self, n: int) -> tuple[int, ...]:
        return (n,) if self.width is None else (n, self.width)


@dataclass(frozen=True)
class Schema:
    """The user tower's inputs in order, as a model of one history length reads them."""

    version: int
    inputs: tuple[Input, ...]
    event_types: tuple[str, ...]  # what the columns of COUNTS count

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(i.name for i in self.inputs)

    def empty(self, n: int = 0) -> dict[str, np.ndarray]:
        """Zeros of every input for ``n`` users (0 is padding and the out-of-vocabulary code)."""
        return {i.name: np.zeros(i.shape(n), dtype=i.dtype) for i in self.inputs}

    def fit(self, columns: Mapping[str, np.ndarray], users: Optional[np.ndarray] = None,
            items: Optional[np.ndarray] = None) -> dict[str, np.ndarray]:
        """This schema's inputs from encoded ``columns`` (other columns left out): code columns
        mapped through ``users`` / ``items`` (an array: new code of each old code) when given, and
        cut or 0-padded to this schema's width (a history encoded longer or shorter)."""
        maps = {"user": users, "item": items}
        out = {}
        for i in self.inputs:
            x = columns[i.name]
            if maps.get(i.vocabulary) is not None:
                x = maps[i.vocabulary][x]
            if i.width is not None and x.shape[1] != i.width:
                if i.vocabulary is None:
                    raise ValueError(f"input {i.name!r}: {x.shape[1]} columns, the schema has {i.width}")
                x = x[:, :i.width] if x.shape[1] > i.width else np.pad(x, ((0, 0), (0, i.width - x.shape[1])))
            out[i.name] = x.astype(i.dtype, copy=False)
        return out

    def to_json(self) -> dict:
        return {"version": self.version, "inputs": [asdict(i) for i in self.inputs],
                "event_types": list(self.event_types)}

    @classmethod
    def from_json(cls, d: dict) -> "Schema":
        return cls(int(d["version"]), tuple(Input(**i) for i in d["inputs"]), tuple(d["event_types"]))

    def __str__(self) -> str:
        shapes = ", ".join(f"{i.name} {i.dtype}" + (f"[{i.width}]" if i.width is not None else "") for i in self.inputs)
        return f"schema {self.version} ({shapes}; counts of {', '.join(self.event_types)})"


def schema(history: int) -> Schema:
    """This code's schema for a model that reads ``history`` recent items."""
    return Schema(SCHEMA_VERSION, (Input(USER, "int32", None, "user"),
                                   Input(HIST, "int32", history, "item"),
                                   Input(COUNTS, "float32", len(EVENT_TYPES))), EVENT_TYPES)


NAMES = schema(0).names  # the inputs' names, whatever the history


# ---- the one encoder ----------------------------------------------------------------------------

class Codes(Protocol):
    """Vocabulary codes of ids (1-based, 0: unknown): ``recsys.model.Vocab``, or the Ray Data
    engine's sorted ids (``training.examples``)."""

    def user_codes(self, ids: Sequence[str]) -> np.ndarray: ...

    def item_codes(self, ids: Sequence[str]) -> np.ndarray: ...


def _user(features: Sequence[UserFeatures], spec: Input, codes: Codes) -> np.ndarray:
    return codes.user_codes([f.user_id for f in features])


def _hist(features: Sequence[UserFeatures], spec: Input, codes: Codes) -> np.ndarray:
    recent = [f.recent[:spec.width] for f in features]
    lens = np.array([len(r) for r in recent], dtype=np.int64)
    out = np.zeros(spec.shape(len(features)), dtype=spec.dtype)
    cols = np.arange(lens.sum()) - np.repeat(np.cumsum(lens) - lens, lens)
    out[np.repeat(np.arange(len(recent)), lens), cols] = codes.item_codes([t for r in recent for t in r])
    return out


def _counts(features: Sequence[UserFeatures], spec: Input, codes: Codes) -> np.ndarray:
    return np.array([[math.log1p(f.counts.get(t, 0)) for t in EVENT_TYPES] for f in features],
                    dtype=spec.dtype).reshape(spec.shape(len(features)))


_ENCODERS: dict[str, Callable[[Sequence[UserFeatures], Input, Codes], np.ndarray]] = {
    USER: _user, HIST: _hist, COUNTS: _counts}


def encode(features: Sequence[UserFeatures], spec: Schema, codes: Codes) -> dict[str, np.ndarray]:
    """Every input of ``spec`` for a batch of users' features, of the schema's dtype and shape."""
    out = {}
    for i in spec.inputs:
        x = np.asarray(_ENCODERS[i.name](features, i, codes), dtype=i.dtype)
        if x.shape != i.shape(len(features)):
            raise ValueError(f"input {i.name!r} encoded as {x.shape}, the schema says {i.shape(len(features))}")
        out[i.name] = x
    return out


def encode_all(features, n: int, spec: Schema, codes: Codes, chunk: int = 4096) -> dict[str, np.ndarray]:
    """``encode`` of an iterable of ``n`` users' features, ``chunk`` at a time (a log's point-in-time
    features are not all held at once)."""
    out, batch, row = spec.empty(n), [], 0
    for f in features:
        batch.append(f)
        if len(batch) == chunk:
            row = _put(out, row, encode(batch, spec, codes))
            batch = []
    row = _put(out, row, encode(batch, spec, codes))
    if row != n:
        raise ValueError(f"{row} users' features for {n} rows")
    return out


def _put(out: dict[str, np.ndarray], row: int, rows: dict[str, np.ndarray]) -> int:
    for name, x in rows.items():
        out[name][row:row + len(x)] = x
    return row + len(next(iter(rows.values())))


# ---- the schema a model records ------------------------------------------------------------------

class UnsupportedUserInput(RecsysError):
    """A model version trained on a user input schema this code does not encode."""


def write(folder: Path, spec: Schema) -> None:
    (Path(folder) / FILE).write_text(json.dumps(spec.to_json(), indent=1))


def recorded_schema(folder: Path, history: int, version: str) -> Schema:
    """The schema the model in ``folder`` (reading ``history`` recent items) was trained with, if
    this code encodes it; else ``UnsupportedUserInput`` naming the version, the recorded schema and
    this code's. A version exported before models recorded their schema (no ``FILE``) was trained
    on schema 1 (user, hist, counts of the five event types), which is ``schema(history)`` here."""
    ours = schema(history)
    path = Path(folder) / FILE
    if not path.exists():  # predates the record: schema 1
        return ours
    recorded = json.loads(path.read_text())
    if recorded != ours.to_json():
        try:
            named = str(Schema.from_json(recorded))
        except (KeyError, TypeError, ValueError):  # a layout this code cannot even read
            named = json.dumps(recorded, separators=(",", ":"))
        raise UnsupportedUserInput(f"model {version} was trained on user input {named}; this code encodes {ours}: "
                                   f"serve {version} with the code that trained it, or retrain it")
    return ours
