"""Online features: what one event changes, as a list of primitive operations.

This module is the single definition of the feature layout. The same operations
are applied by the Redis Lua script (``recsys.feature_store``) online and by
``MemoryFeatures`` offline, so training features at an instant equal what Redis
held at that instant.

Layout (``P`` = settings.redis.prefix, default ``recsys``). The part in braces is a Redis
Cluster hash tag: every key one script touches shares it, so each script runs on one slot.
A user's group ``{u:<user>}`` is written by the user script, an item's trending shard
``{t:<k>}`` (k = crc32(item id) mod ``redis.trending_shard_count``) by the item script:

  P:user:{u:<user>}:recent   LIST  item ids, newest first, at most ``recent_items``
  P:user:{u:<user>}:seen_at  ZSET  item id -> the time (ms) of the user's latest event on it; the
                                   ``seen_items`` latest only (a bounded seen filter, however
                                   many events a client posts for one id)
  P:user:{u:<user>}:seen_at:<type>  ZSET  the same for the user's events of one type, for the types a
                                   seen policy may filter alone (``FILTERED_APART``: add_to_cart,
                                   purchase, rating), bounded alike
  P:user:{u:<user>}:counts   HASH  event type -> count; ``@<topic>:<p>`` -> the highest
                                   offset of partition p whose event of this user is applied;
                                   ``@!<position>`` -> 1 while the item script of a position the
                                   user script judged a client's retry may not have run yet
  P:dedup:{u:<user>}:<event> STRING the event's first position (partition * 2**40 + offset,
                                   -1 without): its id was applied (expires after features.dedup_ttl_s)
  P:refused:{u:<user>}       ZSET  positions of this user's events whose writes Redis refused
  P:forgotten:{u:<user>}     STRING the user's tombstone (``recsys users forget``): events of the user
                                   with a time up to it (ms) are left out, never applied
  P:item:{t:<k>}:<item>:counts  HASH event type -> count
  P:trending:{t:<k>}         ZSET  item id -> log of the time-decayed event count; the top
                                   items are the merge of every shard's top (``merge_trending``)
  P:applied:{t:<k>}          HASH  "@<topic>:<p>" -> the highest offset of partition p applied to shard k
  P:refused:{t:<k>}          ZSET  positions refused by shard k

Nothing else lives under these kinds (``FEATURE_KINDS``): ``recsys features rebuild`` deletes
exactly them, so other state under the prefix (the online A/B counters, the scheduler's
lock, ...) survives it.
"""
from __future__ import annotations

import heapq
import itertools
import math
import zlib
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable, NamedTuple, Protocol

from recsys.events import Event, EventType
from recsys.settings import RedisSettings


class Op(NamedTuple):
    """One primitive update: ``kind`` is recent | zmax | ztop | hincr | zlogadd."""

    kind: str
    key: str
    member: str
    arg: float  # recent: max length; zmax: score; ztop: members kept; hincr: increment; zlogadd: log weight


# The types whose items a seen policy may filter while views and clicks come back (issue 34):
# each has its own bounded seen ZSET beside ``seen_at``, which holds every type's items.
FILTERED_APART = (EventType.add_to_cart, EventType.purchase, EventType.rating)
USER_PARTS = ("recent", "seen_at", *(f"seen_at:{t.value}" for t in FILTERED_APART), "counts")  # Keys.user(user_id, part)
OFFSET_FIELD = "@"  # a user's counts field that starts so holds an applied offset, not a count
RETRY_FIELD = OFFSET_FIELD + "!"  # no topic name holds "!": then a position judged a client's retry
# The key kinds of the online features (``Keys``), the part after the prefix.
FEATURE_KINDS = ("user", "dedup", "refused", "item", "trending", "applied")


def offset_field(topic: str, partition: int) -> str:
    """The hash field that holds a group's applied offset of one partition."""
    return f"{OFFSET_FIELD}{topic}:{partition}"


def retry_field(position: int) -> str:
    """The user's counts field that says the event at ``position`` (see ``feature_store._position``)
    is a client's retry, kept until its item script has run: a replay then tells the item script
    so whether or not the event id's marker has expired meanwhile (``_APPLY_USER`` builds the
    same name)."""
    return f"{RETRY_FIELD}{position}"


class Keys:
    def __init__(self, prefix: str = "recsys", trending_shards: int = 1):
        self.prefix, self.trending_shards = prefix, trending_shards
        self.trending = [f"{prefix}:trending:{{t:{k}}}" for k in range(trending_shards)]

    @classmethod
    def of(cls, redis: RedisSettings) -> Keys:
        return cls(redis.prefix, redis.trending_shard_count)

    def user(self, user_id: str, part: str) -> str:
        return f"{self.prefix}:user:{{u:{user_id}}}:{part}"

    def dedup(self, user_id: str, event_id: str) -> str:
        return f"{self.prefix}:dedup:{{u:{user_id}}}:{event_id}"

    def user_refused(self, user_id: str) -> str:
        return f"{self.prefix}:refused:{{u:{user_id}}}"

    def forgotten(self, user_id: str) -> str:
        return f"{self.prefix}:forgotten:{{u:{user_id}}}"

    def shard(self, item_id: str) -> int:
        """The item's trending shard: its counts and its trending entry live in that slot."""
        return zlib.crc32(item_id.encode()) % self.trending_shards

    def item(self, item_id: str) -> str:
        return f"{self.prefix}:item:{{t:{self.shard(item_id)}}}:{item_id}:counts"

    def shard_applied(self, shard: int) -> str:
        """Per partition (``offset_field``), the highest offset whose event is applied to the shard."""
        return f"{self.prefix}:applied:{{t:{shard}}}"

    def shard_refused(self, shard: int) -> str:
        return f"{self.prefix}:refused:{{t:{shard}}}"

    def feature_patterns(self) -> list[str]:
        """SCAN patterns that match every key above and nothing else under the prefix."""
        return [f"{self.prefix}:{kind}:*" for kind in FEATURE_KINDS]


def merge_trending(shards: list[list[tuple[str, float]]], n: int) -> list[tuple[str, float]]:
    """The top n of the shards' own top-n lists (each item lives in one shard), highest first,
    ties broken by the larger id as Redis's ZREVRANGE does."""
    return heapq.nlargest(n, itertools.chain.from_iterable(shards), key=lambda kv: (kv[1], kv[0]))


def log_weight(ts_ms: int, half_life_s: float) -> float:
    """An event's decayed weight 2**(t/half_life), in log space so it never overflows."""
    return ts_ms / (half_life_s * 1000.0) * math.log(2.0)


SEEN_ITEMS = 1000  # settings.features.seen_items's default

FilterTypes = frozenset  # of EventType: the event types whose items the seen filter removes
ALL_TYPES: FilterTypes = frozenset(EventType)  # every touched item is filtered (before issue 34)
# The seen policies training chooses from on validation (``recsys.evaluation.choose_seen_policy``), by
# name, the first one winning ties: today's behaviour first.
SEEN_POLICIES: dict[str, FilterTypes] = {
    "all": ALL_TYPES,
    "cart+purchase+rating": frozenset(FILTERED_APART),
    "purchase+rating": frozenset({EventType.purchase, EventType.rating}),
}


def seen_parts(filter_types: FilterTypes) -> tuple[str, ...]:
    """The user's seen ZSETs that hold the items of ``filter_types``: ``seen_at`` for every type,
    else one per type, which only ``FILTERED_APART``'s types have."""
    if filter_types == ALL_TYPES:
        return ("seen_at",)
    if not filter_types or not filter_types <= set(FILTERED_APART):
        raise ValueError(f"seen filter {sorted(t.value for t in filter_types)}: every type, or some of "
                         f"{[t.value for t in FILTERED_APART]}")
    return tuple(f"seen_at:{t.value}" for t in FILTERED_APART if t in filter_types)


def policy_types(names) -> FilterTypes:
    """A model card's ``seen_policy.filter_types`` (a list of type names) as the filter; a card
    without one (before issue 34) filters every type."""
    return ALL_TYPES if names is None else frozenset(EventType(n) for n in names)


def user_ops(event: Event, keys: Keys, recent_items: int, seen_items: int = SEEN_ITEMS) -> list[Op]:
    """What one event changes in its user's group. The seen set keeps each item's latest event
    time and only the ``seen_items`` latest items: the same whatever order events come in; so
    does the seen set of the event's type when it has one (``FILTERED_APART``)."""
    seen = [keys.user(event.user_id, "seen_at")]
    if event.type in FILTERED_APART:
        seen.append(keys.user(event.user_id, f"seen_at:{event.type.value}"))
    return [
        Op("recent", keys.user(event.user_id, "recent"), event.item_id, recent_items),
        *(op for key in seen for op in (Op("zmax", key, event.item_id, event.ts), Op("ztop", key, "", seen_items))),
        Op("hincr", keys.user(event.user_id, "counts"), event.type.value, 1),
    ]


def item_ops(event: Event, keys: Keys, half_life_s: float) -> list[Op]:
    """What one event changes in its item's trending shard."""
    return [
        Op("hincr", keys.item(event.item_id), event.type.value, 1),
        Op("zlogadd", keys.trending[keys.shard(event.item_id)], event.item_id, log_weight(event.ts, half_life_s)),
    ]


def event_ops(event: Event, keys: Keys, recent_items: int, half_life_s: float, seen_items: int = SEEN_ITEMS) -> list[Op]:
    """Every update one event makes to the online features."""
    return user_ops(event, keys, recent_items, seen_items) + item_ops(event, keys, half_life_s)


@dataclass
class UserFeatures:
    user_id: str
    recent: list[str]  # newest first
    seen: set[str]  # the items the seen filter removes: of every type, or of the policy's (``seen_parts``)
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
            elif op.kind == "zmax":
                z = self.zsets[op.key]
                z[op.member] = max(z.get(op.member, op.arg), op.arg)
            elif op.kind == "ztop":  # Redis drops the lowest ranks: by score, then by member
                z = self.zsets[op.key]
                while len(z) > op.arg:
                    del z[min(z, key=lambda m: (z[m], m))]
            elif op.kind == "hincr":
                self.hashes[op.key][op.member] += int(op.arg)
            elif op.kind == "zlogadd":
                z = self.zsets[op.key]
                z[op.member] = logaddexp(z[op.member], op.arg) if op.member in z else op.arg
            else:
                raise ValueError(f"unknown op {op.kind}")
        return True

    def user(self, keys: Keys, user_id: str, filter_types: FilterTypes = ALL_TYPES) -> UserFeatures:
        seen = set().union(*(self.zsets.get(keys.user(user_id, part), {}) for part in seen_parts(filter_types)))
        return UserFeatures(user_id, list(self.lists.get(keys.user(user_id, "recent"), [])), seen,
                            dict(self.hashes.get(keys.user(user_id, "counts"), {})))


class OnlineFeatures(Protocol):
    """The online features as the stream worker writes them and the request path reads them:
    ``recsys.feature_store.FeatureStore`` in Redis, ``MemoryStore`` in memory (training data)."""

    def apply_events(self, events: Iterable[Event], positions: list[tuple[str, int, int]] | None = None) -> list[bool]:
        """Apply each event once per event id (and, given its (topic, partition, offset), once per
        position); True where applied, False for a duplicate."""

    def user(self, user_id: str, filter_types: FilterTypes = ALL_TYPES) -> UserFeatures:
        """The user's features, ``seen`` holding the items of ``filter_types``'s events."""

    def item_counts(self, item_id: str) -> dict[str, int]: ...

    def trending(self, k: int = 10) -> list[tuple[str, float]]:
        """The top-k items by time-decayed count, highest first (ties: the larger id first)."""


class MemoryStore:
    """``OnlineFeatures`` in plain dicts: the same operations as the Redis store, in memory."""

    def __init__(self, prefix: str = "mem", recent_items: int = 50, half_life_s: float = 24 * 3600.0,
                 seen_items: int = SEEN_ITEMS):
        self.keys, self.recent_items, self.half_life_s, self.seen_items = Keys(prefix), recent_items, half_life_s, seen_items
        self.state = MemoryFeatures()

    def apply_events(self, events: Iterable[Event], positions: list[tuple[str, int, int]] | None = None) -> list[bool]:
        """Positions are not kept: a memory store sees each event once (training data)."""
        return [self.state.apply(e.event_id, event_ops(e, self.keys, self.recent_items, self.half_life_s, self.seen_items))
                for e in events]

    def user(self, user_id: str, filter_types: FilterTypes = ALL_TYPES) -> UserFeatures:
        return self.state.user(self.keys, user_id, filter_types)

    def item_counts(self, item_id: str) -> dict[str, int]:
        return dict(self.state.hashes.get(self.keys.item(item_id), {}))

    def trending(self, k: int = 10) -> list[tuple[str, float]]:
        return merge_trending([list(self.state.zsets.get(key, {}).items()) for key in self.keys.trending], k)

