"""Data sources. Each yields events in time order (ties keep their source order).

Spec strings, as the command line takes them:
  ``synthetic`` or ``synthetic:events=100000,users=2000,items=1000,seed=7``
  ``synthetic:generator=sessions,...`` (sessions, intents and order: ``recsys.sessions``;
                     ``generator=clusters``, one cluster per user for good, is the default)
  ``movielens:DIR``  (MovieLens-100K ``u.data`` and ``u.item``)
  ``csv:PATH``       (with user/item/ts column names given separately)
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from recsys.errors import InvalidInput
from recsys.events import Event, EventType


class SourceError(InvalidInput):
    """A source spec or file that cannot be read; the message says what to fix."""


@dataclass
class SyntheticSource:
    """Shoppers drawn from taste clusters, items with Zipf-like popularity, sessions in time.

    Every item belongs to one taste cluster; a user browses mostly (``taste``) in their own
    cluster (one per user, for good) and otherwise follows global popularity. Sessions are short
    runs of events by one user: views, some clicks, fewer carts and purchases.
    With ``shift_at`` in (0, 1), every user moves to another cluster after that
    fraction of the events (taste drift, for retraining tests). With ``new_items_at`` in
    (0, 1), the catalogue is replaced after that fraction of the events by a new season's
    collection: the same clusters and popularity under new ids (``n{k}`` instead of ``i{k}``),
    which a model trained before it has never seen.
    Generated in chunks, so 10 million events never sit in memory at once.
    """

    events: int = 100_000
    users: int = 2_000
    items: int = 1_000
    clusters: int = 20
    taste: float = 0.8
    zipf: float = 1.1
    seed: int = 7
    start_ms: int = 1_700_000_000_000
    events_per_s: float = 20.0
    shift_at: float = 0.0
    new_items_at: float = 0.0
    categories: int = 0  # 1: items carry their taste cluster as a category feature
    name: str = field(default="synthetic", init=False)

    def __post_init__(self):
        if self.events < 0 or self.users < 1 or self.items < self.clusters or self.clusters < 1:
            raise SourceError("synthetic: need events >= 0, users >= 1, items >= clusters >= 1")
        rng = np.random.default_rng(self.seed)
        self.item_cluster = rng.integers(0, self.clusters, size=self.items)
        self.user_cluster = rng.integers(0, self.clusters, size=self.users)
        ranks = rng.permutation(self.items) + 1
        self.item_pop = ranks ** -self.zipf
        self.item_pop /= self.item_pop.sum()
        self.cluster_items = [np.flatnonzero(self.item_cluster == c) for c in range(self.clusters)]
        self.cluster_pop = [self.item_pop[ix] / self.item_pop[ix].sum() for ix in self.cluster_items]
        activity = (rng.permutation(self.users) + 1.0) ** -0.8
        self.user_activity = activity / activity.sum()
        # Draws by inverse CDF, as numpy's choice(p=...) does, without its O(n) set-up per draw: the
        # same events, and a million-item catalogue costs no more per event than a thousand.
        self._cdf_items = _cdf(self.item_pop)
        self._cdf_cluster = [_cdf(p) for p in self.cluster_pop]
        self._cdf_users = _cdf(self.user_activity)

    def item_features(self) -> Optional[dict[str, list[str]]]:
        """The whole catalogue: items no event touched still enter the model's vocabulary and index
        (``synthetic:items=1000000`` serves a million items). Featureless, unless ``categories``:
        then each item's category is its taste cluster (``c3``), as a catalogue's would be."""
        seasons = "in" if 0 < self.new_items_at < 1 else "i"
        return {f"{season}{k}": [f"c{self.item_cluster[k]}"] if self.categories else []
                for season in seasons for k in range(self.items)}

    def events_iter(self) -> Iterator[Event]:
        rng = np.random.default_rng(self.seed + 1)
        shift_index = int(self.shift_at * self.events) if 0 < self.shift_at < 1 else None
        new_items_index = int(self.new_items_at * self.events) if 0 < self.new_items_at < 1 else None
        produced, ts = 0, float(self.start_ms)
        types = [EventType.view, EventType.click, EventType.add_to_cart, EventType.purchase]
        while produced < self.events:
            # One session: a user, a handful of items from the user's taste, a few steps each.
            user = _draw(rng, self._cdf_users)
            cluster = int(self.user_cluster[user])
            if shift_index is not None and produced >= shift_index:
                cluster = (cluster + 1 + self.clusters // 2) % self.clusters
            for _ in range(int(rng.integers(1, 6))):
                if rng.random() < self.taste:
                    item = int(self.cluster_items[cluster][_draw(rng, self._cdf_cluster[cluster])])
                else:
                    item = _draw(rng, self._cdf_items)
                depth = 1 + int(rng.random() < 0.35) + int(rng.random() < 0.12) + int(rng.random() < 0.05)
                for step in range(depth):
                    if produced >= self.events:
                        return
                    ts += rng.exponential(1000.0 / self.events_per_s)
                    season = "n" if new_items_index is not None and produced >= new_items_index else "i"
                    yield Event(event_id=f"syn{self.seed}-{produced}", user_id=f"u{user}",
                                item_id=f"{season}{item}", type=types[min(step, 3)], ts=int(ts))
                    produced += 1


def _cdf(p: np.ndarray) -> np.ndarray:
    cdf = np.cumsum(p)
    return cdf / cdf[-1]


def _draw(rng: np.random.Generator, cdf: np.ndarray) -> int:
    """``rng.choice(len(cdf), p=...)``: one uniform draw, the same index."""
    return int(cdf.searchsorted(rng.random(), side="right"))


@dataclass
class MovieLensSource:
    """MovieLens-100K: every rating is one event of type ``rating`` (value = the stars)."""

    path: Path
    name: str = field(default="movielens", init=False)

    def __post_init__(self):
        self.path = Path(self.path)
        if not (self.path / "u.data").is_file():
            raise SourceError(f"movielens: {self.path / 'u.data'} not found (give the ml-100k folder)")

    def item_features(self) -> Optional[dict[str, list[str]]]:
        """Genres per item from ``u.item`` (pipe-separated, latin-1)."""
        genre_file, item_file = self.path / "u.genre", self.path / "u.item"
        if not item_file.is_file() or not genre_file.is_file():
            return None
        genres = [line.split("|")[0] for line in genre_file.read_text("latin-1").splitlines() if line.strip()]
        out = {}
        for line in item_file.read_text("latin-1").splitlines():
            cols = line.split("|")
            if len(cols) >= 5 + len(genres):
                out[cols[0]] = [g for g, flag in zip(genres, cols[-len(genres):]) if flag == "1"]
        return out

    def events_iter(self) -> Iterator[Event]:
        rows = []
        with open(self.path / "u.data") as fh:
            for line_no, line in enumerate(fh):
                user, item, rating, ts = line.split("\t")
                rows.append((int(ts), line_no, user, item, float(rating)))
        rows.sort(key=lambda r: (r[0], r[1]))
        for ts, line_no, user, item, rating in rows:
            yield Event(event_id=f"ml-{line_no}", user_id=user, item_id=item,
                        type=EventType.rating, value=rating, ts=ts * 1000)


@dataclass
class CsvSource:
    """Any CSV with a header; user, item and timestamp columns named by the caller.

    Timestamps in seconds or milliseconds (detected: values below 1e11 are seconds).
    Every row becomes one event of ``event_type``; other columns are ignored.
    """

    path: Path
    user_col: str = "user_id"
    item_col: str = "item_id"
    ts_col: str = "timestamp"
    event_type: EventType = EventType.click
    name: str = field(default="csv", init=False)

    def __post_init__(self):
        self.path = Path(self.path)
        if not self.path.is_file():
            raise SourceError(f"csv: {self.path} not found")
        with open(self.path, newline="") as fh:
            header = next(csv.reader(fh), [])
        missing = [c for c in (self.user_col, self.item_col, self.ts_col) if c not in header]
        if missing:
            raise SourceError(f"csv: {self.path} has no column {', '.join(missing)} (columns: {', '.join(header)})")

    def item_features(self) -> Optional[dict[str, list[str]]]:
        return None

    def events_iter(self) -> Iterator[Event]:
        rows = []
        with open(self.path, newline="") as fh:
            for row_no, row in enumerate(csv.DictReader(fh)):
                try:
                    ts = float(row[self.ts_col])
                except ValueError:
                    raise SourceError(f"csv: row {row_no + 2}: timestamp {row[self.ts_col]!r} is not a number") from None
                if not row[self.user_col] or not row[self.item_col] or not math.isfinite(ts):
                    raise SourceError(f"csv: row {row_no + 2}: empty user or item, or bad timestamp")
                rows.append((ts, row_no, row[self.user_col], row[self.item_col]))
        scale = 1000 if rows and max(r[0] for r in rows) < 1e11 else 1
        rows.sort(key=lambda r: (r[0], r[1]))
        for ts, row_no, user, item in rows:
            yield Event(event_id=f"csv-{self.path.stem}-{row_no}", user_id=user, item_id=item,
                        type=self.event_type, ts=int(ts * scale))


Source = SyntheticSource | MovieLensSource | CsvSource


def open_source(spec: str, user_col: str = "user_id", item_col: str = "item_id", ts_col: str = "timestamp") -> Source:
    """Turn a spec string into a source (see the module docstring)."""
    kind, _, arg = spec.partition(":")
    if kind == "synthetic":
        from recsys.sessions import SessionSource
        generators = {"clusters": SyntheticSource, "sessions": SessionSource}
        parts = dict(part.partition("=")[::2] for part in filter(None, arg.split(",")))
        cls = generators.get(parts.pop("generator", "clusters"))
        if cls is None:
            raise SourceError(f"synthetic: unknown generator (known: {', '.join(generators)})")
        allowed = {f.name: f.type for f in fields(cls) if f.init}
        params = {}
        for key, value in parts.items():
            if key not in allowed:
                raise SourceError(f"synthetic: unknown parameter {key!r} (known: generator, {', '.join(allowed)})")
            try:
                params[key] = value if allowed[key] == "str" else float(value) if allowed[key] == "float" else int(value)
            except ValueError:
                raise SourceError(f"synthetic: {key}={value!r} is not a number") from None
        return cls(**params)
    if kind == "movielens":
        return MovieLensSource(Path(arg or "../shared/data/ml-100k"))
    if kind == "csv":
        if not arg:
            raise SourceError("csv: give a path, e.g. csv:events.csv")
        return CsvSource(Path(arg), user_col, item_col, ts_col)
    raise SourceError(f"unknown source {spec!r}: use synthetic[:k=v,...], movielens:DIR or csv:PATH")
