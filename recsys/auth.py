"""API keys with scopes, and a token bucket per key: both in Redis, shared by every replica.

A key is ``rsk_`` and 43 random URL-safe characters, shown once when made. Redis keeps only
its sha256 (the key is 256 random bits, so a fast hash is as good as a slow one), under a
hash tag so that a key and its bucket share a Redis Cluster slot, and outside the features'
prefix, so that a feature rebuild (which clears that prefix) keeps the keys:

  <prefix>-auth:apikey:{<sha256>}     hash: id, name, scopes (space-separated), rate, burst, created_ms
  <prefix>-auth:ratelimit:{<sha256>}  hash: tokens, ts_ms (expires once full again)

One script checks the key, its scope and its bucket in one round trip. A replica remembers a
known key's scopes and limits for ``serving.key_cache_s`` (``KeyVerdicts``); while it does, a
request runs only the bucket's script, so the rate limit stays exact (one bucket in Redis for
every replica) and only the key's lookup is saved. ``recsys keys revoke`` deletes the key and
publishes its digest on ``<prefix>-auth:revoked``; each replica's follower
(``follow_revocations``) forgets it at once, so a revoked key fails within milliseconds, and
within ``key_cache_s`` even when the message is lost (the follower also forgets everything
whenever it reconnects).
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import re
import secrets
import threading
import time
from enum import Enum
from typing import Callable, NamedTuple

import redis
import redis.asyncio

from recsys.errors import InvalidInput, RecsysError, Unavailable, unavailable
from recsys.settings import Settings

KEY_PREFIX = "rsk_"
log = logging.getLogger(__name__)


class Scope(str, Enum):
    events_write = "events:write"
    catalogue_write = "catalogue:write"
    recs_read = "recs:read"
    admin = "admin"  # every scope


class Unauthorized(RecsysError):
    """No key, or one that Redis does not know (never made, or revoked)."""
    http_status = 401
    http_headers = {"WWW-Authenticate": "Bearer"}


class Forbidden(RecsysError):
    """A known key without the route's scope."""
    http_status = 403


class RateLimited(RecsysError):
    http_status = 429

    def __init__(self, retry_after_s: float):
        super().__init__(f"rate limit of this API key exceeded: retry after {retry_after_s:.3f} s")
        self.retry_after_s = retry_after_s

    @property
    def http_headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, math.ceil(self.retry_after_s)))}


# The token bucket, Lua functions the scripts share: ``refill`` gives the tokens of the bucket at
# ``key`` now (``rate`` tokens/s, at most ``burst``), ``take`` removes ``cost`` of them (the bucket
# may go below zero: a batch's events are repaid by waiting), ``spend`` takes one token if the
# bucket holds one and returns 0 (allowed) or 3 (over the limit) and the ms to wait. Redis's own
# clock (TIME) serves every replica alike.
_SPEND_FN = """
local function refill(key, rate, burst)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local bucket = redis.call('HMGET', key, 'tokens', 'ts_ms')
  local tokens = tonumber(bucket[1]) or burst
  local last = tonumber(bucket[2]) or now
  return math.min(burst, tokens + math.max(0, now - last) * rate / 1000), now
end
local function store(key, rate, burst, tokens, now)
  redis.call('HSET', key, 'tokens', tostring(tokens), 'ts_ms', now)
  redis.call('PEXPIRE', key, math.ceil((burst - tokens) / rate * 1000) + 1000)
end
local function take(key, rate, burst, cost)
  local tokens, now = refill(key, rate, burst)
  store(key, rate, burst, tokens - cost, now)
  return tokens - cost
end
local function spend(key, rate, burst)
  local tokens, now = refill(key, rate, burst)
  if tokens < 1 then return 3, math.ceil((1 - tokens) / rate * 1000) end
  store(key, rate, burst, tokens - 1, now)
  return 0, 0
end
"""

# KEYS: the key's hash, its bucket. ARGV: the scope, the default rate (tokens/s) and burst.
# Returns {1: unknown key, 0} or {0: allowed | 2: scope missing | 3: over the limit, ms to wait,
# the key's scopes, rate, burst} (what a replica remembers of a known key).
_AUTHORIZE = _SPEND_FN + """
local key = redis.call('HMGET', KEYS[1], 'scopes', 'rate', 'burst')
if not key[1] then return {1, 0} end
local rate = tonumber(key[2]) or tonumber(ARGV[2])
local burst = tonumber(key[3]) or tonumber(ARGV[3])
local scopes = ' ' .. key[1] .. ' '
if not (string.find(scopes, ' ' .. ARGV[1] .. ' ', 1, true) or string.find(scopes, ' admin ', 1, true)) then
  return {2, 0, key[1], tostring(rate), tostring(burst)}
end
local outcome, wait = spend(KEYS[2], rate, burst)
return {outcome, wait, key[1], tostring(rate), tostring(burst)}
"""

# A key the replica knows: its bucket alone. KEYS: the bucket. ARGV: rate, burst. Returns
# {0: allowed | 3: over the limit, ms to wait}.
_SPEND = _SPEND_FN + """
local outcome, wait = spend(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]))
return {outcome, wait}
"""

# The rest of a batch's cost, after ``spend`` let its request on: ``cost`` more tokens, taken
# whatever the bucket holds, so a key's rate counts events, not requests. KEYS: the key's hash,
# its bucket. ARGV: the default rate and burst, the cost. Returns the tokens left.
_CHARGE = _SPEND_FN + """
local key = redis.call('HMGET', KEYS[1], 'rate', 'burst')
local rate = tonumber(key[1]) or tonumber(ARGV[1])
local burst = tonumber(key[2]) or tonumber(ARGV[2])
return tostring(take(KEYS[2], rate, burst, tonumber(ARGV[3])))
"""

# A key as ``KeyStore.create`` makes it: anything else is refused before any Redis work.
_WELL_FORMED = re.compile(KEY_PREFIX + r"[A-Za-z0-9_-]{43}")


class Decision(NamedTuple):
    outcome: int  # 0 allowed, 1 unknown key, 2 scope missing, 3 over the limit
    retry_after_ms: int

    def raise_unless_allowed(self, scope: Scope) -> None:
        if self.outcome == 1:
            raise Unauthorized("unknown or revoked API key")
        if self.outcome == 2:
            raise Forbidden(f"this API key lacks the scope {scope.value!r}")
        if self.outcome == 3:
            raise RateLimited(self.retry_after_ms / 1000)


class KeyRecord(NamedTuple):
    """What a replica remembers of a known key."""
    scopes: frozenset[str]
    rate_per_s: float
    burst: float

    def has(self, scope: Scope) -> bool:
        return scope.value in self.scopes or Scope.admin.value in self.scopes


class KeyVerdicts:
    """Known keys' records by digest, each for ``ttl_s`` after Redis gave it; at most
    ``max_keys`` (the oldest forgotten first). Unknown keys are never remembered: a key made a
    moment ago works at once, and random keys cannot fill the cache."""

    def __init__(self, ttl_s: float, max_keys: int = 10_000, clock: Callable[[], float] = time.monotonic):
        self.ttl_s, self.max_keys, self._clock = ttl_s, max_keys, clock
        self._held: dict[str, tuple[float, KeyRecord]] = {}

    def get(self, sha: str) -> KeyRecord | None:
        held = self._held.get(sha)
        if held is None:
            return None
        if self._clock() - held[0] >= self.ttl_s:
            self._held.pop(sha, None)
            return None
        return held[1]

    def put(self, sha: str, record: KeyRecord) -> None:
        self._held.pop(sha, None)
        while len(self._held) >= self.max_keys:
            self._held.pop(next(iter(self._held)))
        self._held[sha] = (self._clock(), record)

    def drop(self, sha: str) -> None:
        """A revoked key (the message of ``KeyStore.revoke``)."""
        self._held.pop(sha, None)

    def clear(self) -> None:
        self._held.clear()

    def __len__(self) -> int:
        return len(self._held)


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def parse_scopes(text: str) -> list[Scope]:
    """``events:write,recs:read`` as scopes; an unknown name is an error that lists the known ones."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    known = {s.value: s for s in Scope}
    bad = [n for n in names if n not in known]
    if bad or not names:
        raise InvalidInput(f"unknown scope {', '.join(bad) or '(none given)'}: choose from {', '.join(known)}")
    return [known[n] for n in names]


def auth_prefix(settings: Settings) -> str:
    return f"{settings.redis.prefix}-auth"


def _key(prefix: str, sha: str) -> str:
    return f"{prefix}:apikey:{{{sha}}}"


def _bucket(prefix: str, sha: str) -> str:
    return f"{prefix}:ratelimit:{{{sha}}}"


def revocations_channel(prefix: str) -> str:
    """Where ``KeyStore.revoke`` publishes a revoked key's digest."""
    return f"{prefix}:revoked"


class KeyStore:
    """Make, list and revoke keys (``recsys keys``)."""

    def __init__(self, settings: Settings, client: redis.Redis):
        self.settings, self.redis, self.prefix = settings, client, auth_prefix(settings)

    def create(self, name: str, scopes: list[Scope], rate_per_s: float | None = None,
               burst: int | None = None) -> dict:
        """A new key: the one time its secret is returned."""
        if rate_per_s is not None and rate_per_s <= 0 or burst is not None and burst < 1:
            raise InvalidInput("a key's rate must be above 0 per second and its burst at least 1")
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        sha = digest(key)
        record = {"id": sha[:12], "name": name, "scopes": " ".join(s.value for s in scopes),
                  "created_ms": int(time.time() * 1000)}
        if rate_per_s is not None:
            record["rate"] = rate_per_s
        if burst is not None:
            record["burst"] = burst
        self.redis.hset(_key(self.prefix, sha), mapping=record)
        return {**self._public(record), "key": key}

    def clear(self) -> int:
        """Delete every key and bucket under this prefix (scratch runs and tests)."""
        names = list(self.redis.scan_iter(match=f"{self.prefix}:*", count=1000))
        return self.redis.delete(*names) if names else 0

    @contextlib.contextmanager
    def temporary(self, name: str, scopes: list[Scope], rate_per_s: float = 1e6, burst: int = 1_000_000):
        """A key for one run (a load test, a benchmark), revoked after it; by default no limit
        that the run could reach, since the run measures the system, not the limiter."""
        made = self.create(name, scopes, rate_per_s, burst)
        try:
            yield made["key"]
        finally:
            self.revoke(made["id"])

    def _public(self, record: dict) -> dict:
        a = self.settings.auth
        return {"id": record["id"], "name": record["name"], "scopes": record["scopes"].split(),
                "rate_per_s": float(record.get("rate", a.rate_per_s)), "burst": int(record.get("burst", a.burst)),
                "created_ms": int(record["created_ms"])}

    def _records(self) -> dict[str, dict]:
        found = {}
        for name in self.redis.scan_iter(match=f"{self.prefix}:apikey:*", count=1000):
            record = self.redis.hgetall(name)
            if record:
                found[name] = record
        return found

    def list(self) -> list[dict]:
        return sorted((self._public(r) for r in self._records().values()), key=lambda r: r["created_ms"])

    def revoke(self, key_id: str) -> dict:
        """Revoke the key whose id (from ``create`` or ``list``) is ``key_id``; it fails at once."""
        for name, record in self._records().items():
            if record["id"] == key_id:
                sha = name.rsplit("{", 1)[1].rstrip("}")
                self.redis.delete(_key(self.prefix, sha), _bucket(self.prefix, sha))
                self.redis.publish(revocations_channel(self.prefix), sha)  # replicas forget it now
                return self._public(record)
        raise InvalidInput(f"no API key with id {key_id!r} (see `recsys keys list`)")



class Authorizer:
    """The request path's check, on the API's asyncio Redis client: one command, which the
    recommendation route sends in the same pipeline as its feature reads (one round trip).
    With ``verdicts``, a key known to this replica runs only its bucket's script."""

    _SHA = hashlib.sha1(_AUTHORIZE.encode()).hexdigest()
    _SPEND_SHA = hashlib.sha1(_SPEND.encode()).hexdigest()
    _CHARGE_SHA = hashlib.sha1(_CHARGE.encode()).hexdigest()

    def __init__(self, settings: Settings, client: redis.asyncio.Redis, verdicts: KeyVerdicts | None = None):
        self.settings, self.redis, self.prefix = settings, client, auth_prefix(settings)
        self.verdicts = verdicts

    def command(self, key: str | None, scope: Scope) -> tuple:
        """The check as one Redis command (EVALSHA); Unauthorized at once when there is no key or
        one that no key could be (no Redis work for a random string), Forbidden at once for a
        remembered key without the scope."""
        if not key:
            raise Unauthorized("an API key is required: send the header 'Authorization: Bearer <key>'")
        if not _WELL_FORMED.fullmatch(key):
            raise Unauthorized("malformed API key: a key is 'rsk_' and 43 URL-safe characters")
        sha, a = digest(key), self.settings.auth
        known = self.verdicts.get(sha) if self.verdicts is not None else None
        if known is not None:
            if not known.has(scope):
                raise Forbidden(f"this API key lacks the scope {scope.value!r}")
            return ("EVALSHA", self._SPEND_SHA, 1, _bucket(self.prefix, sha), known.rate_per_s, known.burst)
        return ("EVALSHA", self._SHA, 2, _key(self.prefix, sha), _bucket(self.prefix, sha), scope.value,
                a.rate_per_s, a.burst)

    def judge(self, reply, scope: Scope, key: str) -> None:
        """Raise Unauthorized, Forbidden or RateLimited for the command's reply, or return; a
        full check's reply on a known key is remembered."""
        if len(reply) > 2 and self.verdicts is not None:
            self.verdicts.put(digest(key), KeyRecord(frozenset(reply[2].split()), float(reply[3]), float(reply[4])))
        Decision(int(reply[0]), int(reply[1])).raise_unless_allowed(scope)

    async def load(self) -> None:
        """Load the scripts (Redis forgets scripts when it restarts): answers NoScriptError."""
        await self.redis.script_load(_AUTHORIZE)
        await self.redis.script_load(_SPEND)
        await self.redis.script_load(_CHARGE)

    async def authorize(self, key: str | None, scope: Scope) -> None:
        """The check on its own: raise Unauthorized, Forbidden or RateLimited, or return."""
        self.judge(await self._run(self.command(key, scope)), scope, key)

    async def charge(self, key: str, cost: int) -> None:
        """Take ``cost`` more tokens from the bucket of a key that ``authorize`` let on (the rest
        of a batch: the rate counts events). The bucket may go below zero; the key's next
        request waits until it is repaid."""
        if cost > 0:
            sha, a = digest(key), self.settings.auth
            try:
                await self._run(("EVALSHA", self._CHARGE_SHA, 2, _key(self.prefix, sha), _bucket(self.prefix, sha),
                                 a.rate_per_s, a.burst, cost))
            except Unavailable:  # logged; the events are on their way already, their post must not fail here
                pass

    async def _run(self, command: tuple):
        try:
            try:
                return await self.redis.execute_command(*command)
            except redis.exceptions.NoScriptError:
                await self.load()
                return await self.redis.execute_command(*command)
        except redis.RedisError as exc:
            raise unavailable("Redis", exc) from None


def follow_revocations(client: redis.Redis, prefix: str, verdicts: KeyVerdicts, stopping: threading.Event,
                       retry_s: float = 1.0) -> None:
    """A replica's thread: forget each revoked key as its message comes (``KeyStore.revoke``).
    Messages sent while it is not subscribed are lost, so it forgets every key whenever it
    (re)subscribes; the cache's TTL bounds what a lost message can cost."""
    channel = revocations_channel(prefix)
    while not stopping.is_set():
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        try:
            pubsub.subscribe(channel)
            verdicts.clear()
            while not stopping.is_set():
                message = pubsub.get_message(timeout=1.0)
                if message is not None and message["type"] == "message":
                    verdicts.drop(message["data"])
        except redis.RedisError as exc:
            log.warning("revocations not followed (every key is looked up again): %r", exc)
            verdicts.clear()
            stopping.wait(retry_s)
        finally:
            pubsub.close()
