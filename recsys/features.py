"""Online features: what one event changes, as a list of primitive operations.

This module is the single definition of the feature layout. The same operations
are applied by the Redis Lua script (``recsys.feature_store``) online and by
``MemoryFeatures`` offline, so training features at an instant equal what Redis
held at that instant.

Layout (``P`` = settings.redis.prefix, default ``recsys``):

  P:user:{user_id}:recent   LIST  item ids, newest first, at most ``recent_items``
  P:user:{user_id}:seen     SET   every item the user interacted with
  P:user:{user_id}:counts   HASH  event type -> count
  P:item:{item_id}:counts   HASH  event type -> count
  P:trending                ZSET  item id -> log of the time-decayed event count
  P:dedup:{event_id}        STRING marker: the event was applied (expires after features.dedup_ttl_s)
  P:applied:{topic}:{p}     STRING the highest offset of partition p whose event is applied
  P:refused:{topic}:{p}     ZSET  offsets of partition p whose writes Redis refused (applied when they come again)
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable, NamedTuple, Protocol

from recsys.events import Event, EventType


class Op(NamedTuple):
    """One primitive update: ``kind`` is recent | sadd | hincr | zlogadd."""

    kind: str
    key: str
    member: str
    arg: float  # recent: max length; hincr: increment; zlogadd: log weight; sadd: unused


USER_PARTS = ("recent", "seen", "counts")  # a user's keys: Keys.user(user_id, part)


class Keys:
    def __init__(self, prefix: str = "recsys"):
        self.prefix = prefix
        self.trending = f"{prefix}:trending"

    def user(self, user_id: str, part: str) -> str:
        return f"{self.prefix}:user:{user_id}:{part}"

    def item(self, item_id: str) -> str:
        return f"{self.prefix}:item:{item_id}:counts"

    def dedup(self, event_id: str) -> str:
        return f"{self.prefix}:dedup:{event_id}"

    def applied(self, topic: str, partition: int) -> str:
        """The highest offset of this partition whose event's effects are in the store."""
        return f"{self.prefix}:applied:{topic}:{partition}"

    def refused(self, topic: str, partition: int) -> str:
        """Offsets of this partition whose writes Redis refused, to apply when they come again."""
        return f"{self.prefix}:refused:{topic}:{partition}"


def log_weight(ts_ms: int, half_life_s: float) -> float:
    """An event's decayed weight 2**(t/half_life), in log space so it never overflows."""
    return ts_ms / (half_life_s * 1000.0) * math.log(2.0)


def event_ops(event: Event, keys: Keys, recent_items: int, half_life_s: float) -> list[Op]:
    """Every update one event makes to the online features."""
    t = event.type.value
    return [
        Op("recent", keys.user(event.user_id, "recent"), event.item_id, recent_items),
        Op("sadd", keys.user(event.user_id, "seen"), event.item_id, 0),
        Op("hincr", keys.user(event.user_id, "counts"), t, 1),
        Op("hincr", keys.item(event.item_id), t, 1),
        Op("zlogadd", keys.trending, event.item_id, log_weight(event.ts, half_life_s)),
    ]


COUNT_TYPES = [t.value for t in EventType]  # the order of the model's counts vector


def counts_vector(counts: dict[str, int]) -> list[float]:
    """The counts by type in ``COUNT_TYPES`` order, as log(1 + count)."""
    return [math.log1p(counts.get(t, 0)) for t in COUNT_TYPES]


@dataclass
class UserFeatures:
    user_id: str
    recent: list[str]  # newest first
    seen: set[str]
    counts: dict[str, int]

    @property
    def is_new(self) -> bool:
        return not self.recent

    def to_json(self) -> dict:
        return {"user_id": self.user_id, "recent": self.recent, "seen": sorted(self.seen),
                "counts": {t.value: self.counts.get(t.value, 0) for t in EventType}}


def logaddexp(a: float, b: float) -> float:
    m = max(a, b)
    return m + math.log(math.exp(a - m) + math.exp(b - m))


@dataclass
class MemoryFeatures:
    """The operations applied to plain dicts: the offline twin of the Redis store."""

    lists: dict = field(default_factory=lambda: defaultdict(list))
    sets: dict = field(default_factory=lambda: defaultdict(set))
    hashes: dict = field(default_factory=lambda: defaultdict(lambda: defaultdict(int)))
    zsets: dict = field(default_factory=lambda: defaultdict(dict))
    applied: set = field(default_factory=set)

    def apply(self, event_id: str, ops: list[Op]) -> bool:
        """Apply once per event id, like the Lua script; False for a duplicate."""
        if event_id in self.applied:
            return False
        self.applied.add(event_id)
        for op in ops:
            if op.kind == "recent":
                lst = self.lists[op.key]
                lst.insert(0, op.member)
                del lst[int(op.arg):]
            elif op.kind == "sadd":
                self.sets[op.key].add(op.member)
            elif op.kind == "hincr":
                self.hashes[op.key][op.member] += int(op.arg)
            elif op.kind == "zlogadd":
                z = self.zsets[op.key]
                z[op.member] = logaddexp(z[op.member], op.arg) if op.member in z else op.arg
            else:
                raise ValueError(f"unknown op {op.kind}")
        return True

    def user(self, keys: Keys, user_id: str) -> UserFeatures:
        return UserFeatures(user_id, list(self.lists.get(keys.user(user_id, "recent"), [])),
                            set(self.sets.get(keys.user(user_id, "seen"), set())),
                            dict(self.hashes.get(keys.user(user_id, "counts"), {})))


class OnlineFeatures(Protocol):
    """The online features as the stream worker writes them and the request path reads them:
    ``recsys.feature_store.FeatureStore`` in Redis, ``MemoryStore`` in memory (training data)."""

    def apply_events(self, events: Iterable[Event], positions: list[tuple[str, int, int]] | None = None) -> list[bool]:
        """Apply each event once per event id (and, given its (topic, partition, offset), once per
        position); True where applied, False for a duplicate."""

    def user(self, user_id: str) -> UserFeatures: ...

    def item_counts(self, item_id: str) -> dict[str, int]: ...

    def trending(self, k: int = 10) -> list[tuple[str, float]]:
        """The top-k items by time-decayed count, highest first (ties: the larger id first)."""


class MemoryStore:
    """``OnlineFeatures`` in plain dicts: the same operations as the Redis store, in memory."""

    def __init__(self, prefix: str = "mem", recent_items: int = 50, half_life_s: float = 24 * 3600.0):
        self.keys, self.recent_items, self.half_life_s = Keys(prefix), recent_items, half_life_s
        self.state = MemoryFeatures()

    def apply_events(self, events: Iterable[Event], positions: list[tuple[str, int, int]] | None = None) -> list[bool]:
        """Positions are not kept: a memory store sees each event once (training data)."""
        return [self.state.apply(e.event_id, event_ops(e, self.keys, self.recent_items, self.half_life_s))
                for e in events]

    def user(self, user_id: str) -> UserFeatures:
        return self.state.user(self.keys, user_id)

    def item_counts(self, item_id: str) -> dict[str, int]:
        return dict(self.state.hashes.get(self.keys.item(item_id), {}))

    def trending(self, k: int = 10) -> list[tuple[str, float]]:
        scores = self.state.zsets.get(self.keys.trending, {})
        return sorted(scores.items(), key=lambda kv: (kv[1], kv[0]), reverse=True)[:k]

