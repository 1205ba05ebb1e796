"""The online feature store in Redis: atomic, once-per-event updates and one-round-trip reads,
on one Redis or on a Redis Cluster (``redis.cluster_masters``).

Each event runs two scripts, each within one cluster slot (recsys/features.py): the user
script on the user's group, then the item script on the item's trending shard. Each group
keeps its own applied offset per partition, so a replay or a crash between the two scripts
applies each half once; the user script's verdict on the event id (kept in the user's group)
tells the item script whether the event is a client's retry. A verdict of retry is also marked
at its position in the user's group until the item script has run, so a replay after a crash
between the two tells the item script the same, even once the event id's marker has expired.
The user script also reads the user's tombstone (``recsys users forget``) in the same call, so
a forgotten user's events that come later (still in Kafka, or replayed) write nothing of the
user, at no extra round trip.
"""
from __future__ import annotations

import hashlib
import itertools
import logging
import threading
import time
from typing import Callable, Iterable

import hiredis
import redis
import redis.asyncio
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from recsys.events import Event
from recsys.features import (ALL_TYPES, OFFSET_FIELD, FilterTypes, Keys, Op, UserFeatures, item_ops, merge_trending,
                             offset_field, retry_field, seen_parts, user_ops)
from recsys.secrets import REDIS_PASSWORD, read_secret
from recsys.settings import Settings

log = logging.getLogger(__name__)

# The user script, on the user's group. KEYS: the event's dedup marker, the user's counts hash
# (which holds the applied offsets), refused positions and tombstone, then the ops' keys. ARGV:
# marker TTL, offset field, the event's offset (-1: none), its position, its time (ms), then
# (kind, member, arg) per op. Returns 1 applied, 0 a client's retry, 2 a replay, 3 a forgotten
# user's event (time up to the tombstone's): nothing of the user is written, not even an offset.
_APPLY_USER = """
local forgotten = redis.call('GET', KEYS[4])
if forgotten and tonumber(ARGV[5]) <= tonumber(forgotten) then return 3 end
local offset = tonumber(ARGV[3])
local refused = false
local retried = '@!' .. ARGV[4]
if offset >= 0 then
  local applied = redis.call('HGET', KEYS[2], ARGV[2])
  if applied and offset <= tonumber(applied) then
    if redis.call('ZSCORE', KEYS[3], ARGV[4]) == false then
      if redis.call('HEXISTS', KEYS[2], retried) == 1 then return 0 end
      local first = redis.call('GET', KEYS[1])
      if first and first ~= ARGV[4] then
        redis.call('HSET', KEYS[2], retried, 1)
        return 0
      end
      return 2
    end
    refused = true
  end
end
local function settle()
  if refused then redis.call('ZREM', KEYS[3], ARGV[4])
  elseif offset >= 0 then redis.call('HSET', KEYS[2], ARGV[2], ARGV[3]) end
end
if redis.call('SET', KEYS[1], ARGV[4], 'NX', 'EX', ARGV[1]) == false then
  settle()
  if offset >= 0 then redis.call('HSET', KEYS[2], retried, 1) end
  return 0
end
local function try(...)
  local r = redis.pcall(...)
  if type(r) == 'table' and r.err then
    redis.call('DEL', KEYS[1])
    if offset >= 0 then redis.call('ZADD', KEYS[3], offset, ARGV[4]) end
    error(r)
  end
  return r
end
for i = 5, #KEYS do
  local j = 6 + (i - 5) * 3
  local kind, member, arg = ARGV[j], ARGV[j + 1], ARGV[j + 2]
  if kind == 'recent' then
    try('LPUSH', KEYS[i], member)
    try('LTRIM', KEYS[i], 0, tonumber(arg) - 1)
  elseif kind == 'zmax' then
    try('ZADD', KEYS[i], 'GT', arg, member)
  elseif kind == 'ztop' then
    try('ZREMRANGEBYRANK', KEYS[i], 0, -tonumber(arg) - 1)
  elseif kind == 'hincr' then
    try('HINCRBY', KEYS[i], member, tonumber(arg))
  else
    try('UNKNOWN-OP-' .. kind)
  end
end
settle()
return 1
"""

# The item script, on the item's trending shard. KEYS: the shard's applied offsets (a hash,
# field ARGV[1] per partition), its refused positions, then the ops' keys. ARGV: offset field,
# the event's offset (-1: none), its position, "apply" or "advance" (the user script's verdict
# was a retry: only the offset moves), then (kind, member, arg) per op. Each shard sees a
# partition's events in offset order, so its offset says which of them it applied.
_APPLY_ITEM = """
local offset = tonumber(ARGV[2])
local refused = false
if offset >= 0 then
  local applied = redis.call('HGET', KEYS[1], ARGV[1])
  if applied and offset <= tonumber(applied) then
    if redis.call('ZSCORE', KEYS[2], ARGV[3]) == false then return 0 end
    refused = true
  end
end
local function try(...)
  local r = redis.pcall(...)
  if type(r) == 'table' and r.err then
    if offset >= 0 then redis.call('ZADD', KEYS[2], offset, ARGV[3]) end
    error(r)
  end
  return r
end
if ARGV[4] == 'apply' then
  for i = 3, #KEYS do
    local j = 5 + (i - 3) * 3
    local kind, member, arg = ARGV[j], ARGV[j + 1], ARGV[j + 2]
    if kind == 'hincr' then
      try('HINCRBY', KEYS[i], member, tonumber(arg))
    elseif kind == 'zlogadd' then
      local w = tonumber(arg)
      local old = try('ZSCORE', KEYS[i], member)
      if old then
        old = tonumber(old)
        local m = math.max(old, w)
        w = m + math.log(math.exp(old - m) + math.exp(w - m))
      end
      try('ZADD', KEYS[i], w, member)
    else
      try('UNKNOWN-OP-' .. kind)
    end
  end
end
if refused then redis.call('ZREM', KEYS[2], ARGV[3])
elseif offset >= 0 then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
return 1
"""
SCRIPTS = (_APPLY_USER, _APPLY_ITEM)
_SHA = {script: hashlib.sha1(script.encode()).hexdigest() for script in SCRIPTS}


def _client_options(settings: Settings, timeout_s: float) -> dict:
    return dict(host=settings.redis.host, port=settings.redis.port, decode_responses=True,
                password=read_secret(settings, REDIS_PASSWORD), socket_timeout=timeout_s, socket_connect_timeout=timeout_s)


def connect(settings: Settings, timeout_s: float = 2.0, retries: int = 3) -> redis.Redis | redis.RedisCluster:
    """A client whose calls fail within about ``timeout_s * (retries + 1)`` when Redis is gone; a
    cluster client (which asks the node for the cluster's slots at once) with ``cluster_masters``."""
    retry = Retry(ExponentialBackoff(cap=1.0, base=0.05), retries)
    if settings.redis.cluster_masters:
        return redis.RedisCluster(**_client_options(settings, timeout_s), retry=retry)
    return redis.Redis(**_client_options(settings, timeout_s), retry=retry)


class HiredisPackedConnection(redis.asyncio.Connection):
    """Commands packed by hiredis (C), as redis-py's synchronous connection already does: the
    asyncio one packs in Python, which was about 2% of a replica's CPU (issue 33's profile)."""

    def pack_command(self, *args) -> list[bytes]:
        if isinstance(args[0], str):  # "SCRIPT LOAD": the server wants the words apart
            args = (*args[0].encode().split(), *args[1:])
        try:
            return [hiredis.pack_command(args)]
        except TypeError as exc:  # an argument Redis cannot take (None, say): redis-py's own error
            raise redis.DataError(str(exc)) from None

    def pack_commands(self, commands: Iterable[Iterable]) -> list[bytes]:
        return [b"".join(self.pack_command(*command)[0] for command in commands)]


def connect_async(settings: Settings, timeout_s: float, retries: int) -> redis.asyncio.Redis | redis.asyncio.RedisCluster:
    """The asyncio twin of ``connect``, for the request path of an async server."""
    retry = AsyncRetry(ExponentialBackoff(cap=1.0, base=0.05), retries)
    if settings.redis.cluster_masters:
        return redis.asyncio.RedisCluster(**_client_options(settings, timeout_s), retry=retry)
    pool = redis.asyncio.ConnectionPool(connection_class=HiredisPackedConnection, retry=retry,
                                        **_client_options(settings, timeout_s))
    return redis.asyncio.Redis(connection_pool=pool)


def connect_node(settings: Settings, timeout_s: float = 2.0) -> redis.Redis:
    """A client of the configured node alone, for pub/sub: a cluster's nodes pass every
    published message to each other, so one node is enough."""
    return redis.Redis(**_client_options(settings, timeout_s))


class FeatureReader:
    """What one recommendation reads, on the asyncio client: an async endpoint awaits Redis
    on its event loop, with no hop to a thread pool (in a Serve replica that hop cost more
    CPU than the recommendation; README, "Serving")."""

    def __init__(self, settings: Settings, client: redis.asyncio.Redis | redis.asyncio.RedisCluster):
        self.redis = client
        self.keys = Keys.of(settings.redis)
        self.seen_items = settings.features.seen_items

    async def user_and_trending(self, user_id: str, n: int, first: tuple | None = None, trending: bool = True,
                                filter_types: FilterTypes = ALL_TYPES
                                ) -> tuple[UserFeatures, list[tuple[str, float]] | None, object]:
        """The user (``seen``: the items of ``filter_types``'s events, the served model's seen
        policy) and the top-n trending items (every shard's top n, merged; None when not
        ``trending``: the replica's ``TrendingCache`` has them), in one pipelined round trip (on
        a cluster, one to each node, at once); ``first``, a command sent ahead of them in the
        same round trip (the API key check), and its reply (None without)."""
        commands = [first] if first else []
        user = _user_commands(self.keys, user_id, self.seen_items, filter_types)
        commands += user
        commands += [("ZREVRANGE", key, 0, n - 1, "WITHSCORES") for key in self.keys.trending if trending]
        res = await self._round_trip(commands)
        head, res = (res[0], res[1:]) if first else (None, res)
        shards = [[(item, float(score)) for item, score in shard] for shard in res[len(user):]]
        return _user_from(user_id, res[:len(user)]), merge_trending(shards, n) if trending else None, head

    async def _round_trip(self, commands: list[tuple]) -> list:
        """The replies, the first refused command's error raised once all are read. On one Redis
        the commands go out at once on one connection of the pool and the replies are read back
        as they come, without a pipeline's per-command bookkeeping and reply callbacks (about
        half of the read's CPU in issue 33's profile); on a cluster, a pipeline (a round trip to
        each node, at once)."""
        if isinstance(self.redis, redis.asyncio.RedisCluster):
            pipe = self.redis.pipeline(transaction=False)
            for command in commands:
                pipe.execute_command(*command)
            return await pipe.execute()
        pool = self.redis.connection_pool
        conn = await pool.get_connection()
        try:
            replies = await conn.retry.call_with_retry(lambda: _exchange(conn, commands), lambda _: conn.disconnect())
        except BaseException:  # cancelled half way (the client left) or failed: replies may be unread
            await conn.disconnect()
            raise
        finally:
            await pool.release(conn)
        for reply in replies:
            if isinstance(reply, redis.ResponseError):
                raise reply
        return replies


async def _exchange(conn: redis.asyncio.Connection, commands: list[tuple]) -> list:
    """Every reply of ``commands`` on ``conn``, a ResponseError in the place of a refused one."""
    await conn.send_packed_command(conn.pack_commands(commands))
    out = []
    for _ in commands:
        try:
            out.append(await conn.read_response())
        except redis.ResponseError as exc:
            out.append(exc)
    return out


class TrendingCache:
    """The merged trending top-``n`` of one replica, read by ``refresh`` in the background
    (``run``: every ``max_age_s / 2``) so that a request reads none of the trending shards.
    ``top(k)`` gives it while its read began at most ``max_age_s`` ago, else None (the refresh
    failed or fell behind: the request reads the shards itself), so a cold-start answer lags
    Redis by at most ``max_age_s``."""

    def __init__(self, read: Callable[[int], list[tuple[str, float]]], n: int, max_age_s: float,
                 clock: Callable[[], float] = time.monotonic):
        self._read, self.n, self.max_age_s, self._clock = read, n, max_age_s, clock
        self._held: tuple[float, list[tuple[str, float]]] | None = None

    def refresh(self) -> None:
        started = self._clock()
        self._held = (started, self._read(self.n))

    def top(self, k: int) -> list[tuple[str, float]] | None:
        held = self._held
        if held is None or k > self.n or self._clock() - held[0] > self.max_age_s:
            return None
        return held[1][:k]

    def run(self, stopping: threading.Event) -> None:
        while not stopping.is_set():
            try:
                self.refresh()
            except redis.RedisError as exc:  # requests read the shards themselves once it is too old
                log.warning("trending cache not refreshed: %r", exc)
            stopping.wait(self.max_age_s / 2)


def _user_commands(keys: Keys, uid: str, seen_items: int, filter_types: FilterTypes = ALL_TYPES) -> list[tuple]:
    """The reads of one user's features, in ``_user_from``'s order: recent, one read per seen set
    of ``filter_types`` (``seen_parts``: one for every type, else one per type) of at most its
    ``seen_items`` latest items, whatever the set holds, and counts."""
    return [("LRANGE", keys.user(uid, "recent"), 0, -1),
            *(("ZREVRANGE", keys.user(uid, part), 0, seen_items - 1) for part in seen_parts(filter_types)),
            ("HGETALL", keys.user(uid, "counts"))]


def _user_from(uid: str, res: list) -> UserFeatures:
    recent, *seen, counts = res
    return UserFeatures(uid, recent, set().union(*seen),
                        {k: int(v) for k, v in counts.items() if not k.startswith(OFFSET_FIELD)})


class Pending:
    """Commands written to Redis, their replies not read yet. On one Redis they go out on one
    connection of the pool at once, so Redis runs them while the caller does other work; on a
    cluster a pipeline sends each node its commands when the replies are asked for."""

    def __init__(self, client: redis.Redis | redis.RedisCluster, commands: list[tuple]):
        self.client, self.commands, self.conn = client, commands, None
        if commands and not isinstance(client, redis.RedisCluster):
            self.conn = client.connection_pool.get_connection()
            try:
                # hiredis packs each command in C; redis-py's own packer first re-checks every argument.
                self.conn.send_packed_command([b"".join(hiredis.pack_command(c) for c in commands)])
            except BaseException:
                self.drop()
                raise

    def replies(self) -> list:
        """Every reply, a ResponseError in the place of a refused command (as a pipeline does)."""
        if not self.commands:
            return []
        if isinstance(self.client, redis.RedisCluster):
            pipe = self.client.pipeline(transaction=False)
            for command in self.commands:
                pipe.execute_command(*command)
            return pipe.execute(raise_on_error=False)
        conn, self.conn = self.conn, None
        out = []
        try:
            for _ in self.commands:
                try:
                    out.append(conn.read_response())
                except redis.ResponseError as exc:
                    out.append(exc)
        except BaseException:
            conn.disconnect()
            raise
        finally:
            self.client.connection_pool.release(conn)
        return out

    def drop(self) -> None:
        """Give up on the replies: the connection is closed, not reused."""
        if self.conn is not None:
            self.conn.disconnect()
            self.client.connection_pool.release(self.conn)
            self.conn = None


def run_scripts(client: redis.Redis | redis.RedisCluster, commands: list[tuple], pending: Pending | None = None,
                scripts: tuple[str, ...] = SCRIPTS, keep: Callable[[Exception], bool] = lambda exc: False) -> list:
    """The replies of ``scripts``' commands (sent already when ``pending``). Every reply is read
    before the first error is raised, but errors that ``keep`` accepts stay in their places (the
    caller deals with each); scripts Redis no longer holds (it restarted since they were
    loaded) are loaded and the commands sent again, which changes nothing that was applied."""
    replies = (pending or Pending(client, commands)).replies()
    if any(isinstance(r, redis.exceptions.NoScriptError) for r in replies):
        for script in scripts:
            client.script_load(script)
        replies = Pending(client, commands).replies()
    error = next((r for r in replies if isinstance(r, Exception) and not keep(r)), None)
    if error is not None:
        raise error
    return replies


class SentEvents:
    """A batch's user scripts, written to Redis; ``replies()`` reads their verdicts, then runs
    the item scripts."""

    def __init__(self, store: FeatureStore, events: list[Event], positions: list | None):
        self.store, self.events = store, events
        self.positions = positions or [None] * len(events)
        keys, s = store.keys, store.settings
        self.user_commands = []
        for event, position in zip(events, self.positions):
            field, offset, place = _position(position)
            ops = user_ops(event, keys, s.features.recent_items, s.features.seen_items)
            self.user_commands.append(("EVALSHA", _SHA[_APPLY_USER], 4 + len(ops), keys.dedup(event.user_id, event.event_id),
                                       keys.user(event.user_id, "counts"), keys.user_refused(event.user_id),
                                       keys.forgotten(event.user_id), *(op.key for op in ops),
                                       s.features.dedup_ttl_s, field, offset, place, event.ts, *_op_args(ops)))
        self.pending = Pending(store.redis, self.user_commands)

    def replies(self) -> list[bool]:
        """Per event, True when applied, False for a duplicate (a retry or a replay) or a
        forgotten user's event."""
        verdicts = self.user_verdicts()
        run_scripts(self.store.redis, self.item_commands(verdicts))
        run_scripts(self.store.redis, self.retries_done(verdicts), scripts=())
        return [v == 1 for v in verdicts]

    def user_verdicts(self) -> list[int]:
        """The user scripts' replies: 1 applied, 0 a retry, 2 a replay, 3 forgotten (see ``_APPLY_USER``)."""
        pending, self.pending = self.pending, None
        return run_scripts(self.store.redis, self.user_commands, pending)

    def item_commands(self, verdicts: list[int]) -> list[tuple]:
        """The item scripts that follow the user scripts' verdicts."""
        keys, s = self.store.keys, self.store.settings
        commands = []
        for event, position, verdict in zip(self.events, self.positions, verdicts):
            field, offset, place = _position(position)
            shard, ops = keys.shard(event.item_id), item_ops(event, keys, s.features.trending_half_life_s)
            commands.append(("EVALSHA", _SHA[_APPLY_ITEM], 2 + len(ops), keys.shard_applied(shard),
                             keys.shard_refused(shard), *(op.key for op in ops), field, offset, place,
                             "advance" if verdict in (0, 3) else "apply", *_op_args(ops)))
        return commands

    def retries_done(self, verdicts: list[int]) -> list[tuple]:
        """Once the item scripts ran: the commands that drop the marks the user scripts left on
        positions they judged retries (a crash before this leaves a mark, which changes nothing)."""
        keys = self.store.keys
        return [("HDEL", keys.user(event.user_id, "counts"), retry_field(place))
                for event, position, verdict in zip(self.events, self.positions, verdicts)
                if verdict == 0 and (place := _position(position)[2]) >= 0]

    def drop(self) -> None:
        """Give up on the replies (the worker stops)."""
        if self.pending is not None:
            self.pending.drop()
            self.pending = None


def _position(position: tuple[str, int, int] | None) -> tuple[str, int, int]:
    """An event's (topic, partition, offset) as the scripts take it: the offset field, the offset,
    and the position as one integer, partition * 2**40 + offset (-1, -1 without one). An integer
    is what a dedup marker holds: Redis stores it in 8 bytes, where text took 20 more per marker.
    It leaves the topic out: a prefix's store takes one events topic."""
    if position is None:
        return "-", -1, -1
    topic, partition, offset = position
    return offset_field(topic, partition), offset, (partition << 40) + offset


def _op_args(ops: list[Op]) -> list:
    return [x for op in ops for x in (op.kind, op.member, repr(op.arg))]


class FeatureStore:
    def __init__(self, settings: Settings, client: redis.Redis | redis.RedisCluster | None = None):
        self.settings = settings
        self.redis = client or connect(settings)
        self.keys = Keys.of(settings.redis)

    def apply_events(self, events: Iterable[Event], positions: list[tuple[str, int, int]] | None = None) -> list[bool]:
        """Apply each event atomically per key group in two pipelined round trips: once per event
        id within ``features.dedup_ttl_s`` (a client's retry), and, given each event's (topic,
        partition, offset), once per position for good (a replay of the topic, however old).

        Returns, per event, True when applied and False when it was a duplicate.
        """
        return self.send_events(events, positions).replies()

    def send_events(self, events: Iterable[Event], positions: list[tuple[str, int, int]] | None = None) -> SentEvents:
        """``apply_events`` in two halves: this one writes the user scripts to Redis and returns at
        once, ``replies()`` waits for their results and runs the item scripts. Redis runs the
        first half meanwhile, so the stream worker polls and decodes its next batch in that time."""
        return SentEvents(self, list(events), positions)

    def applied_offsets(self, topic: str, partitions: Iterable[int]) -> dict[int, int | None]:
        """Per partition, the highest offset whose effects are in the store (None: none yet):
        every event runs one trending shard's item script, so the highest over the shards."""
        parts = list(partitions)
        if not parts:
            return {}
        pipe = self.redis.pipeline(transaction=False)
        for k in range(self.keys.trending_shards):
            pipe.hmget(self.keys.shard_applied(k), [offset_field(topic, p) for p in parts])
        rows = pipe.execute()
        return {p: max((int(r[i]) for r in rows if r[i] is not None), default=None) for i, p in enumerate(parts)}

    def mark_forgotten(self, tombstones: dict[str, int]) -> None:
        """Per user, its tombstone: from now on the user scripts leave out the user's events
        with a time up to it (ms)."""
        pipe = self.redis.pipeline(transaction=False)
        for user_id, until_ms in tombstones.items():
            pipe.set(self.keys.forgotten(user_id), until_ms)
        pipe.execute()

    def user(self, user_id: str, filter_types: FilterTypes = ALL_TYPES) -> UserFeatures:
        return self.users([user_id], filter_types)[0]

    def users(self, user_ids: list[str], filter_types: FilterTypes = ALL_TYPES) -> list[UserFeatures]:
        """Features of several users in one round trip (``seen``: the items of ``filter_types``'s events)."""
        pipe = self.redis.pipeline(transaction=False)
        reads = [_user_commands(self.keys, uid, self.settings.features.seen_items, filter_types) for uid in user_ids]
        for command in (c for user in reads for c in user):
            pipe.execute_command(*command)
        res, n = pipe.execute(), len(reads[0]) if reads else 0
        return [_user_from(uid, res[n * i:n * (i + 1)]) for i, uid in enumerate(user_ids)]

    def item_counts(self, item_id: str) -> dict[str, int]:
        return {k: int(v) for k, v in self.redis.hgetall(self.keys.item(item_id)).items()}

    def trending(self, k: int = 10) -> list[tuple[str, float]]:
        """Top-k items by time-decayed count; the score is the log of the decayed weight."""
        pipe = self.redis.pipeline(transaction=False)
        for key in self.keys.trending:
            pipe.zrevrange(key, 0, k - 1, withscores=True)
        return merge_trending(pipe.execute(), k)

    def trending_score(self, item_id: str) -> float | None:
        return self.redis.zscore(self.keys.trending[self.keys.shard(item_id)], item_id)

    def clear(self) -> int:
        """Delete every key under this store's prefix (scratch runs and tests)."""
        return self._unlink(f"{self.keys.prefix}:*")

    def clear_features(self) -> int:
        """Delete the online features (``features.FEATURE_KINDS``) and nothing else under the
        prefix: the online A/B state, the scheduler's lock and the like stay."""
        return sum(self._unlink(pattern) for pattern in self.keys.feature_patterns())

    def _unlink(self, pattern: str) -> int:
        n = 0
        for batch in _chunks(self.redis.scan_iter(match=pattern, count=1000), 1000):
            n += self.redis.unlink(*batch)
        return n


def _chunks(iterable, size):
    it = iter(iterable)
    while batch := list(itertools.islice(it, size)):
        yield batch
