"""The online feature store in Redis: atomic, once-per-event updates and one-round-trip reads."""
from __future__ import annotations

from typing import Iterable

import redis
import redis.asyncio
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from recsys.events import Event
from recsys.features import Keys, Op, UserFeatures, event_ops
from recsys.settings import Settings

# KEYS[1] is the event's dedup marker, KEYS[2..] the keys of the ops;
# ARGV = ttl, then (kind, member, arg) per op. Applies everything or nothing.
_APPLY = """
if redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) == false then return 0 end
for i = 2, #KEYS do
  local j = 2 + (i - 2) * 3
  local kind, member, arg = ARGV[j], ARGV[j + 1], ARGV[j + 2]
  if kind == 'recent' then
    redis.call('LPUSH', KEYS[i], member)
    redis.call('LTRIM', KEYS[i], 0, tonumber(arg) - 1)
  elseif kind == 'sadd' then
    redis.call('SADD', KEYS[i], member)
  elseif kind == 'hincr' then
    redis.call('HINCRBY', KEYS[i], member, tonumber(arg))
  elseif kind == 'zlogadd' then
    local w = tonumber(arg)
    local old = redis.call('ZSCORE', KEYS[i], member)
    if old then
      old = tonumber(old)
      local m = math.max(old, w)
      w = m + math.log(math.exp(old - m) + math.exp(w - m))
    end
    redis.call('ZADD', KEYS[i], w, member)
  else
    return redis.error_reply('unknown op ' .. kind)
  end
end
return 1
"""


def connect(settings: Settings, timeout_s: float = 2.0, retries: int = 3) -> redis.Redis:
    """A client whose calls fail within about ``timeout_s * (retries + 1)`` when Redis is gone."""
    return redis.Redis(host=settings.redis.host, port=settings.redis.port, decode_responses=True,
                       socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                       retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), retries))


def connect_async(settings: Settings, timeout_s: float, retries: int) -> redis.asyncio.Redis:
    """The asyncio twin of ``connect``, for the request path of an async server."""
    return redis.asyncio.Redis(host=settings.redis.host, port=settings.redis.port, decode_responses=True,
                               socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                               retry=AsyncRetry(ExponentialBackoff(cap=1.0, base=0.05), retries))


class FeatureReader:
    """What one recommendation reads, on the asyncio client: an async endpoint awaits Redis
    on its event loop, with no hop to a thread pool (in a Serve replica that hop cost more
    CPU than the recommendation; README, "Serving")."""

    def __init__(self, settings: Settings, client: redis.asyncio.Redis):
        self.redis = client
        self.keys = Keys(settings.redis.prefix)

    async def user_and_trending(self, user_id: str, n: int) -> tuple[UserFeatures, list[tuple[str, float]]]:
        """The user and the top-n trending items, in one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        _queue_user(pipe, self.keys, user_id)
        pipe.zrevrange(self.keys.trending, 0, n - 1, withscores=True)
        res = await pipe.execute()
        return _user_from(user_id, res[:3]), res[3]


def _queue_user(pipe, keys: Keys, uid: str) -> None:
    pipe.lrange(keys.user(uid, "recent"), 0, -1)
    pipe.smembers(keys.user(uid, "seen"))
    pipe.hgetall(keys.user(uid, "counts"))


def _user_from(uid: str, res: list) -> UserFeatures:
    recent, seen, counts = res
    return UserFeatures(uid, recent, set(seen), {k: int(v) for k, v in counts.items()})


class FeatureStore:
    def __init__(self, settings: Settings, client: redis.Redis | None = None):
        self.settings = settings
        self.redis = client or connect(settings)
        self.keys = Keys(settings.redis.prefix)
        self._apply = self.redis.register_script(_APPLY)

    def ops(self, event: Event) -> list[Op]:
        s = self.settings
        return event_ops(event, self.keys, s.features.recent_items, s.features.trending_half_life_s)

    def apply_events(self, events: Iterable[Event]) -> list[bool]:
        """Apply each event atomically, once per event id, in one pipelined round trip.

        Returns, per event, True when applied and False when it was a duplicate.
        """
        pipe = self.redis.pipeline(transaction=False)
        n = 0
        for event in events:
            ops = self.ops(event)
            args = [self.settings.features.dedup_ttl_s]
            for op in ops:
                args += [op.kind, op.member, repr(op.arg)]
            self._apply(keys=[self.keys.dedup(event.event_id)] + [op.key for op in ops], args=args, client=pipe)
            n += 1
        return [bool(r) for r in pipe.execute()] if n else []

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
