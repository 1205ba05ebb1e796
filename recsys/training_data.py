"""Point-in-time training data: user features exactly as the online store held them.

The features of every interaction are computed from the user's history strictly
before it, by the same code the online stream worker runs: ``recsys.features.event_ops``
applied to a ``MemoryStore`` (the offline twin of the Redis store), read with
``MemoryStore.user`` before the event's own operations are applied.

Tables are the event-log layout (``recsys.archive``): event_id, user_id, item_id, type,
value, ts (ms). ``events_table`` builds one from any iterable of events (a source).
"""
from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa

from recsys import archive
from recsys.errors import InvalidInput
from recsys.events import Event, EventType
from recsys.features import MemoryStore, UserFeatures

REQUIRED = ("user_id", "item_id", "ts")


class DataError(InvalidInput):
    """Events that cannot be used for training; the message says why."""


def events_table(events: Iterable[Event]) -> pa.Table:
    """A time-ordered event table (archive layout) from events, e.g. ``source.events_iter()``."""
    return sort_table(archive.events_table(list(events)))


def sort_table(table: pa.Table) -> pa.Table:
    """Rows in time order, ties keeping their table order (a stable sort on ts)."""
    check_table(table)
    ts = table.column("ts").to_numpy()
    order = np.argsort(ts, kind="stable")
    if np.all(order == np.arange(len(order))):
        return table
    return table.take(pa.array(order))


def with_shuffled_items(table: pa.Table, seed: int = 0) -> pa.Table:
    """The table with its item ids permuted across events: a model trained on it learns noise
    (the sabotaged candidate the retraining gate must reject)."""
    items = np.random.default_rng(seed).permutation(table["item_id"].to_numpy(zero_copy_only=False))
    return table.set_column(table.column_names.index("item_id"), "item_id", pa.array(items))


def with_relabeled_items(table: pa.Table, item_features: dict | None, seed: int = 0) -> tuple[pa.Table, dict | None]:
    """The table and item features with every item id renamed by one seeded permutation of the
    ids: a model trained on them learns each item's behaviour under another item's id, as a broken
    id mapping upstream would teach it (``recsys chaos guardrail``'s bad candidate). Its offline
    metrics, on the relabelled data, look as good as a sound model's."""
    ids = sorted(set(table["item_id"].to_pylist()) | set(item_features or ()))
    rename = dict(zip(ids, (str(i) for i in np.random.default_rng(seed).permutation(ids))))
    items = pa.array([rename[i] for i in table["item_id"].to_pylist()])
    features = {rename[i]: f for i, f in item_features.items()} if item_features is not None else None
    return table.set_column(table.column_names.index("item_id"), "item_id", items), features


def check_table(table: pa.Table) -> None:
    missing = [c for c in REQUIRED if c not in table.column_names]
    if missing:
        raise DataError(f"event table has no column {', '.join(missing)} (columns: {', '.join(table.column_names)})")


def iter_events(table: pa.Table) -> Iterator[Event]:
    """The table's rows as events (missing event ids/types are filled in: row number, ``rating``)."""
    check_table(table)
    n = table.num_rows
    users = table.column("user_id").to_pylist()
    items = table.column("item_id").to_pylist()
    ts = table.column("ts").to_pylist()
    ids = table.column("event_id").to_pylist() if "event_id" in table.column_names else [f"row-{i}" for i in range(n)]
    types = table.column("type").to_pylist() if "type" in table.column_names else ["rating"] * n
    values = table.column("value").to_pylist() if "value" in table.column_names else [None] * n
    for i in range(n):
        yield Event.model_construct(event_id=str(ids[i]), user_id=str(users[i]), item_id=str(items[i]),
                                    type=EventType(types[i]), value=values[i], ts=int(ts[i]))


def iter_point_in_time(table: pa.Table, recent_items: int = 50, half_life_s: float = 24 * 3600.0,
                       prefix: str = "pit") -> Iterator[tuple[Event, UserFeatures]]:
    """(event, the user's features strictly before it), for every row in time order.

    Each event's features are read with ``MemoryStore.user`` and only then are the
    event's ``event_ops`` applied, exactly like the stream worker would have left Redis.
    A duplicate event id changes nothing (the store is idempotent), as online.
    """
    store = MemoryStore(prefix, recent_items, half_life_s)
    for event in iter_events(sort_table(table)):
        feats = store.user(event.user_id)
        store.apply_events([event])
        yield event, feats


def point_in_time_features(table: pa.Table, recent_items: int = 50, half_life_s: float = 24 * 3600.0
                           ) -> list[UserFeatures]:
    """One ``UserFeatures`` per row (time order): the user's state just before that event."""
    return [f for _, f in iter_point_in_time(table, recent_items, half_life_s)]


def user_features_at(table: pa.Table, user_id: str, ts: int, recent_items: int = 50,
                     half_life_s: float = 24 * 3600.0) -> UserFeatures:
    """The features of ``user_id`` at instant ``ts`` (ms): its events with ts strictly before."""
    check_table(table)
    import pyarrow.compute as pc
    mask = pc.and_(pc.equal(table.column("user_id"), str(user_id)), pc.less(table.column("ts"), int(ts)))
    store = MemoryStore("pit", recent_items, half_life_s)
    store.apply_events(iter_events(sort_table(table.filter(mask))))
    return store.user(str(user_id))
