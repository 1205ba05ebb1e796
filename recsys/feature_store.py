"""The online feature store in Redis: atomic, once-per-event updates and one-round-trip reads."""
from __future__ import annotations

import itertools
from typing import Iterable

import hiredis
import redis
import redis.asyncio
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from recsys.events import Event
from recsys.features import Keys, Op, UserFeatures, event_ops
from recsys.secrets import REDIS_PASSWORD, read_secret
from recsys.settings import Settings

# KEYS[1] is the event's dedup marker, KEYS[2] its partition's applied offset and KEYS[3] the
# partition's refused offsets (both the marker again when the event has no position), KEYS[4..]
# the keys of the ops; ARGV = marker ttl, the event's offset (-1: none), then (kind, member, arg)
# per op. An event at or below its partition's applied offset, or whose event id was applied
# within the ttl, changes nothing. A write Redis refuses (a key of the wrong type) takes the
# marker back, records the offset as refused and returns the error: the event applies when it
# comes again, though later events of its partition moved the applied offset past it (Redis
# does not roll a script back: ops before the failing one stay).
_APPLY = """
local offset = tonumber(ARGV[2])
local refused = false
if offset >= 0 then
  local applied = redis.call('GET', KEYS[2])
  if applied and offset <= tonumber(applied) then
    if redis.call('ZSCORE', KEYS[3], ARGV[2]) == false then return 0 end
    refused = true
  end
end
local function settle()
  if refused then redis.call('ZREM', KEYS[3], ARGV[2])
  elseif offset >= 0 then redis.call('SET', KEYS[2], ARGV[2]) end
end
if redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) == false then
  settle()
  return 0
end
local function try(...)
  local r = redis.pcall(...)
  if type(r) == 'table' and r.err then
    redis.call('DEL', KEYS[1])
    if offset >= 0 then redis.call('ZADD', KEYS[3], offset, ARGV[2]) end
    error(r)
  end
  return r
end
for i = 4, #KEYS do
  local j = 3 + (i - 4) * 3
  local kind, member, arg = ARGV[j], ARGV[j + 1], ARGV[j + 2]
  if kind == 'recent' then
    try('LPUSH', KEYS[i], member)
    try('LTRIM', KEYS[i], 0, tonumber(arg) - 1)
  elseif kind == 'sadd' then
    try('SADD', KEYS[i], member)
  elseif kind == 'hincr' then
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
settle()
return 1
"""


def connect(settings: Settings, timeout_s: float = 2.0, retries: int = 3) -> redis.Redis:
    """A client whose calls fail within about ``timeout_s * (retries + 1)`` when Redis is gone."""
    return redis.Redis(host=settings.redis.host, port=settings.redis.port, decode_responses=True,
                       password=read_secret(settings, REDIS_PASSWORD), socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                       retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), retries))


def connect_async(settings: Settings, timeout_s: float, retries: int) -> redis.asyncio.Redis:
    """The asyncio twin of ``connect``, for the request path of an async server."""
    return redis.asyncio.Redis(host=settings.redis.host, port=settings.redis.port, decode_responses=True,
                               password=read_secret(settings, REDIS_PASSWORD), socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                               retry=AsyncRetry(ExponentialBackoff(cap=1.0, base=0.05), retries))


class FeatureReader:
    """What one recommendation reads, on the asyncio client: an async endpoint awaits Redis
    on its event loop, with no hop to a thread pool (in a Serve replica that hop cost more
    CPU than the recommendation; README, "Serving")."""

    def __init__(self, settings: Settings, client: redis.asyncio.Redis):
        self.redis = client
        self.keys = Keys(settings.redis.prefix)

    async def user_and_trending(self, user_id: str, n: int, first: tuple | None = None
                                ) -> tuple[UserFeatures, list[tuple[str, float]], object]:
        """The user and the top-n trending items, in one round trip; ``first``, a command sent
        ahead of them in the same round trip (the API key check), and its reply (None without)."""
        pipe = self.redis.pipeline(transaction=False)
        if first:
            pipe.execute_command(*first)
        _queue_user(pipe, self.keys, user_id)
        pipe.zrevrange(self.keys.trending, 0, n - 1, withscores=True)
        res = await pipe.execute()
        head, res = (res[0], res[1:]) if first else (None, res)
        return _user_from(user_id, res[:3]), res[3], head


def _queue_user(pipe, keys: Keys, uid: str) -> None:
    pipe.lrange(keys.user(uid, "recent"), 0, -1)
    pipe.smembers(keys.user(uid, "seen"))
    pipe.hgetall(keys.user(uid, "counts"))


def _user_from(uid: str, res: list) -> UserFeatures:
    recent, seen, counts = res
    return UserFeatures(uid, recent, set(seen), {k: int(v) for k, v in counts.items()})


class SentEvents:
    """A batch of scripts written to one connection of the store's pool, its replies not yet
    read; the connection goes back to the pool once they are (or is dropped on an error)."""

    def __init__(self, store: FeatureStore, commands: list[tuple]):
        self.store, self.commands, self.conn = store, commands, None
        if commands:
            self.conn = store.redis.connection_pool.get_connection()
            try:
                # hiredis packs each command in C; redis-py's own packer first re-checks every argument.
                self.conn.send_packed_command([b"".join(hiredis.pack_command(c) for c in commands)])
            except BaseException:
                self.drop()
                raise

    def replies(self) -> list[bool]:
        """Per event, True when applied, False for a duplicate. Every reply is read before the
        first error is raised, as a pipeline does; a script Redis no longer holds (it restarted
        since it was loaded) is loaded and the batch sent again, which changes nothing that
        was applied."""
        if self.conn is None:
            return []
        conn, self.conn = self.conn, None
        pool = self.store.redis.connection_pool
        applied, error = [], None
        try:
            for _ in self.commands:
                try:
                    applied.append(bool(conn.read_response()))
                except redis.ResponseError as exc:
                    error = error or exc
        except BaseException:
            conn.disconnect()
            raise
        finally:
            pool.release(conn)
        if isinstance(error, redis.exceptions.NoScriptError):
            self.store.redis.script_load(_APPLY)
            return SentEvents(self.store, self.commands).replies()
        if error is not None:
            raise error
        return applied

    def drop(self) -> None:
        """Give up on the replies (the worker stops): the connection is closed, not reused."""
        if self.conn is not None:
            self.conn.disconnect()
            self.store.redis.connection_pool.release(self.conn)
            self.conn = None


class FeatureStore:
    def __init__(self, settings: Settings, client: redis.Redis | None = None):
        self.settings = settings
        self.redis = client or connect(settings)
        self.keys = Keys(settings.redis.prefix)
        self._apply = self.redis.register_script(_APPLY)

    def ops(self, event: Event) -> list[Op]:
        s = self.settings
        return event_ops(event, self.keys, s.features.recent_items, s.features.trending_half_life_s)

    def apply_events(self, events: Iterable[Event], positions: list[tuple[str, int, int]] | None = None) -> list[bool]:
        """Apply each event atomically in one pipelined round trip: once per event id within
        ``features.dedup_ttl_s`` (a client's retry), and, given each event's (topic, partition,
        offset), once per position for good (a replay of the topic, however old).

        Returns, per event, True when applied and False when it was a duplicate.
        """
        return self.send_events(events, positions).replies()

    def send_events(self, events: Iterable[Event], positions: list[tuple[str, int, int]] | None = None) -> SentEvents:
        """``apply_events`` in two halves: this one writes the scripts to Redis and returns at
        once, ``replies()`` waits for their results. Redis runs them on its own core meanwhile,
        so the stream worker polls and decodes its next batch in that time, in one thread."""
        commands = []
        for event, position in zip(events, positions or itertools.repeat(None)):
            marker = self.keys.dedup(event.event_id)
            args = [self.settings.features.dedup_ttl_s, position[2] if position else -1]
            ops = self.ops(event)
            for op in ops:
                args += [op.kind, op.member, repr(op.arg)]
            place = [self.keys.applied(*position[:2]), self.keys.refused(*position[:2])] if position else [marker] * 2
            keys = [marker, *place] + [op.key for op in ops]
            commands.append(("EVALSHA", self._apply.sha, len(keys), *keys, *args))
        return SentEvents(self, commands)

    def applied_offsets(self, topic: str, partitions: Iterable[int]) -> dict[int, int | None]:
        """Per partition, the highest offset whose effects are in the store (None: none yet)."""
        parts = list(partitions)
        values = self.redis.mget([self.keys.applied(topic, p) for p in parts]) if parts else []
        return {p: int(v) if v is not None else None for p, v in zip(parts, values)}

    def user(self, user_id: str) -> UserFeatures:
        return self.users([user_id])[0]

    def users(self, user_ids: list[str]) -> list[UserFeatures]:
        """Features of several users in one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        for uid in user_ids:
            _queue_user(pipe, self.keys, uid)
        res = pipe.execute()
        return [_user_from(uid, res[3 * i:3 * i + 3]) for i, uid in enumerate(user_ids)]

    def item_counts(self, item_id: str) -> dict[str, int]:
        return {k: int(v) for k, v in self.redis.hgetall(self.keys.item(item_id)).items()}

    def trending(self, k: int = 10) -> list[tuple[str, float]]:
        """Top-k items by time-decayed count; the score is the log of the decayed weight."""
        return self.redis.zrevrange(self.keys.trending, 0, k - 1, withscores=True)

    def clear(self) -> int:
        """Delete every key under this store's prefix (scratch runs and tests)."""
        n = 0
        for batch in _chunks(self.redis.scan_iter(match=f"{self.keys.prefix}:*", count=1000), 1000):
            n += self.redis.unlink(*batch)
        return n

    def trending_score(self, item_id: str) -> float | None:
        return self.redis.zscore(self.keys.trending, item_id)


def _chunks(iterable, size):
    batch = []
    for x in iterable:
        batch.append(x)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
