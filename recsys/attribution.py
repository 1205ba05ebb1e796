"""Online metrics: later events joined to the impressions that showed their items (issue 18).

The rule (``expected_report`` states it in plain Python, and the tests hold the consumer to
it): an event of an attributable type (``online.attributable``: click, add to cart, purchase)
counts for the latest impression of the same user that showed its item, accepted at most
``online.window_s`` before the event. Times are the API's, not a client's, so a client's clock
does not move a hit: an event's and a single impression record's are their Kafka records'
times; an impression in a batch record (``recsys.impressions``) has its own served time, since
the record went out up to ``serving.impressions_flush_ms`` later. An event id counts once, an
impression's request id once. Per model version and arm:

  impressions           lists served
  items_shown           items in them
  hits:<type>           attributed events, by type
  lists_with_hit        lists with at least one attributed event
  rank:<r>              attributed events at rank r (1 = first)

CTR@k is hits:click / items_shown; the hit rate, lists_with_hit / impressions.

The guardrail: while an A/B experiment runs (``recsys models candidate V``), the consumer tests
every ``online.guard_every_s`` whether the candidate arm's hit rate is significantly below the
current arm's (``recsys.experiments.guardrail``, a sequential test) and, if so, ends the
experiment in the registry: the replicas then serve everyone the current model. It reads
counters of that run of the experiment alone (``recsys.experiments.ExperimentScope``): a list
served since the experiment started, by the current version in the current arm or by the
candidate in its arm, and the hits on it, count also under "<run>|<version>|<arm>", so both
arms cover the same span of time.

The consumer (``recsys online``, group ``online.group``) reads the impressions and the events
topics. They have as many partitions and are keyed alike, so Kafka's range assignment gives a
member partition p of both: a user's impressions and events. A batch record is taken apart into
its impressions (``Shown``), each merged at its own time. Applied with the stream worker's
rules: per event or impression, a script on the user's hash slot, then one on the arm's
(``{o:<version>|<arm>}``) with that arm's applied position per partition, so a replay or a
crash between the two applies each once. An impression's position is its record's offset x
4096 + its place in the record (``Shown.position``), so a batch record applied in part (its
later impressions wait for the events before them) and read again after a crash counts each
of its impressions once; offsets are committed only up to the first record not wholly applied. The user script remembers each event id's verdict with the
position it was first seen at (as the feature store's dedup markers do), so a replay gets the
same verdict and a client's retry of the id gets none. An event waits until the impressions of
its partition are consumed up to its time (or to the end), so that the join does not depend
on which topic Kafka delivers first.

Redis (prefix ``P``):

  P:shown:{u:<user>}     HASH "i:<item>" -> "ts|request|version|arm|rank" of the latest impression
                               showing it; "q:<request>" -> the position that first applied it
  P:attributed:{u:<user>} HASH "e:<event id>" -> "position|verdict"; "r:<request>" -> hits of that list
  P:online:{o:<v>|<arm>} HASH the counters above; "@<topic>:<p>" -> the arm's applied offset
  P:online:{o:<run>|<v>|<arm>} HASH the same, of one run of an A/B experiment ("<candidate>@<start ms>")
  P:online:arms          SET  "<version>|<arm>" of every arm seen
  P:online:guardrail     HASH candidate version -> the guardrail's verdict that ended its experiment (JSON)
Both user hashes expire ``online.window_s`` x 2 after their last write (at least the dedup TTL).
Every field starts with a tag that says what it holds, so an id a client chooses (an item or
event id) never names one of the consumer's own fields (issue 35: an event id "r:<request>"
once overwrote a list's hit count and crash-looped the consumer).
A forgotten user's impressions and events up to the tombstone's time (``recsys.erasure``) are
neither counted nor kept: both scripts read the tombstone first.
"""
from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import NamedTuple

import redis
from kafka import ConsumerRebalanceListener, OffsetAndMetadata, TopicPartition
from kafka.errors import KafkaError
from prometheus_client import Counter, Gauge

from recsys import kafka_io
from recsys.events import BadEvent, Event, EventTimeBounds, parse_event
from recsys.experiments import ExperimentScope, guardrail
from recsys.feature_store import connect, run_scripts
from recsys.features import Keys, offset_field
from recsys.impressions import Impression, decode_record
from recsys.registry import Registry, RegistryError
from recsys.settings import Settings

IMPRESSIONS = Counter("recsys_online_impressions_total", "lists served, as the online consumer counted them",
                      ["version", "arm"])
ITEMS_SHOWN = Counter("recsys_online_items_shown_total", "items in the lists served", ["version", "arm"])
HITS = Counter("recsys_online_hits_total", "events attributed to the list that showed their item",
               ["version", "arm", "type"])
LISTS_WITH_HIT = Counter("recsys_online_lists_with_hit_total", "lists with at least one attributed event",
                         ["version", "arm"])

GUARD_RATIO = Gauge("recsys_guardrail_likelihood_ratio", "the guardrail's mSPRT likelihood ratio of a running A/B "
                    "experiment (it stops the candidate at 1 / alpha when the candidate is worse)", ["candidate"])
GUARD_STOPS = Counter("recsys_guardrail_stops_total", "A/B experiments the guardrail ended", ["candidate"])

log = logging.getLogger(__name__)
REDIS_AWAY = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError)


# ---- the rule, in plain Python (the tests' reference) -------------------------------------------------

def expected_report(impressions: list[tuple[Impression, int]], events: list[tuple[Event, int]],
                    window_ms: int, attributable: tuple[str, ...]) -> dict[str, dict[str, int]]:
    """The counters per "version|arm" that the rule gives, from (impression, its ms: its record's,
    or in a batch record its own) and (event, record ms) in any order; first occurrences of
    request and event ids count."""
    arms: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    shown: dict[tuple[str, str], list[tuple[int, Impression, int]]] = defaultdict(list)
    seen_requests: set[str] = set()
    for imp, ts in sorted(impressions, key=lambda x: x[1]):
        if imp.request_id in seen_requests:
            continue
        seen_requests.add(imp.request_id)
        arm = arms[f"{imp.model_version}|{imp.arm}"]
        arm["impressions"] += 1
        arm["items_shown"] += len(imp.items)
        for rank, item in enumerate(imp.items, start=1):
            shown[(imp.user_id, item)].append((ts, imp, rank))
    seen_events: set[str] = set()
    list_hits: dict[str, int] = defaultdict(int)
    for event, ts in sorted(events, key=lambda x: x[1]):
        if event.event_id in seen_events or event.type.value not in attributable:
            continue
        seen_events.add(event.event_id)
        before = [s for s in shown[(event.user_id, event.item_id)] if s[0] <= ts and ts - s[0] <= window_ms]
        if not before:
            continue
        _, imp, rank = max(before, key=lambda s: s[0])
        arm = arms[f"{imp.model_version}|{imp.arm}"]
        arm[f"hits:{event.type.value}"] += 1
        arm[f"rank:{rank}"] += 1
        list_hits[imp.request_id] += 1
        arm["lists_with_hit"] += list_hits[imp.request_id] == 1
    return {name: dict(counts) for name, counts in arms.items()}


def summarize(counters: dict[str, int]) -> dict:
    """One arm's report: its counters and the rates made of them."""
    shown, lists = counters.get("items_shown", 0), counters.get("impressions", 0)
    ranks = {int(k[5:]): v for k, v in counters.items() if k.startswith("rank:")}
    hits = sum(ranks.values())
    return {"counters": dict(sorted(counters.items())), "impressions": lists, "items_shown": shown,
            "hits": {k[5:]: v for k, v in counters.items() if k.startswith("hits:")},
            "ctr_at_k": round(counters.get("hits:click", 0) / shown, 6) if shown else None,
            "hit_rate": round(counters.get("lists_with_hit", 0) / lists, 6) if lists else None,
            "mean_hit_rank": round(sum(r * n for r, n in ranks.items()) / hits, 3) if hits else None,
            "hit_ranks": dict(sorted(ranks.items()))}


# ---- the scripts ----------------------------------------------------------------------------------

# An impression on its user's slot. KEYS: the user's shown hash, the user's tombstone. ARGV:
# ttl, request id, position, record ms, version, arm, then the items in rank order. Returns 1
# for a first application or a replay of its position (the arm script decides by its offset),
# 0 for another record of the same request or a forgotten user's impression (time up to the
# tombstone's). An item keeps its latest impression; on a tie of times, the first applied.
_IMPRESSION = """
local forgotten = redis.call('GET', KEYS[2])
if forgotten and tonumber(ARGV[4]) <= tonumber(forgotten) then return 0 end
local memo = redis.call('HGET', KEYS[1], 'q:' .. ARGV[2])
if memo and memo ~= ARGV[3] then return 0 end
if not memo then
  for i = 7, #ARGV do
    local old = redis.call('HGET', KEYS[1], 'i:' .. ARGV[i])
    if (not old) or tonumber(string.match(old, '^(%d+)')) < tonumber(ARGV[4]) then
      redis.call('HSET', KEYS[1], 'i:' .. ARGV[i], ARGV[4] .. '|' .. ARGV[2] .. '|' .. ARGV[5] .. '|' .. ARGV[6] .. '|' .. (i - 6))
    end
  end
  redis.call('HSET', KEYS[1], 'q:' .. ARGV[2], ARGV[3])
end
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 1
"""

# An attributable event on its user's slot. KEYS: the user's attributed hash, the user's shown
# hash, the user's tombstone. ARGV: ttl, event id, position, record ms, item, window ms, the
# event's own time. Returns the verdict: "version|arm|rank|first hit of its list (1/0)|the
# impression's ms", or "-" (no impression in the window, another record of an event id already
# seen, or a forgotten user's event). A replay of the first position gets the verdict it got then.
_EVENT = """
local forgotten = redis.call('GET', KEYS[3])
if forgotten and tonumber(ARGV[7]) <= tonumber(forgotten) then return '-' end
local memo = redis.call('HGET', KEYS[1], 'e:' .. ARGV[2])
if memo then
  local pos, verdict = string.match(memo, '^([^|]*)|(.*)$')
  if pos == ARGV[3] then return verdict end
  return '-'
end
local verdict = '-'
local shown = redis.call('HGET', KEYS[2], 'i:' .. ARGV[5])
if shown then
  local ts, request, version, arm, rank = string.match(shown, '^(%d+)|([^|]*)|([^|]*)|([^|]*)|(%d+)$')
  local t = tonumber(ARGV[4])
  if tonumber(ts) <= t and t - tonumber(ts) <= tonumber(ARGV[6]) then
    local n = redis.call('HINCRBY', KEYS[1], 'r:' .. request, 1)
    verdict = version .. '|' .. arm .. '|' .. rank .. '|' .. (n == 1 and '1' or '0') .. '|' .. ts
  end
end
redis.call('HSET', KEYS[1], 'e:' .. ARGV[2], ARGV[3] .. '|' .. verdict)
redis.call('EXPIRE', KEYS[1], ARGV[1])
return verdict
"""

# The counters of one arm. KEYS: the arm's hash. ARGV: the offset field, the record's offset,
# then (counter, increment) pairs. Each arm sees a partition's records in offset order, so its
# applied offset says which it has counted. Returns 1 when counted, 0 for a replay.
_ARM = """
local applied = redis.call('HGET', KEYS[1], ARGV[1])
if applied and tonumber(ARGV[2]) <= tonumber(applied) then return 0 end
for i = 3, #ARGV, 2 do
  redis.call('HINCRBY', KEYS[1], ARGV[i], tonumber(ARGV[i + 1]))
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
"""
ONLINE_SCRIPTS = (_IMPRESSION, _EVENT, _ARM)


@dataclass
class OnlineKeys:
    prefix: str

    def shown(self, user: str) -> str:
        return f"{self.prefix}:shown:{{u:{user}}}"

    def attributed(self, user: str) -> str:
        return f"{self.prefix}:attributed:{{u:{user}}}"

    def forgotten(self, user: str) -> str:
        """The user's tombstone (``recsys.erasure``), the feature store's."""
        return Keys(self.prefix).forgotten(user)

    def arm(self, name: str) -> str:
        return f"{self.prefix}:online:{{o:{name}}}"

    @property
    def arms(self) -> str:
        return f"{self.prefix}:online:arms"

    @property
    def guardrail(self) -> str:
        return f"{self.prefix}:online:guardrail"


def _evalsha(script: str, keys: list[str], args: list) -> tuple:
    return ("EVALSHA", hashlib.sha1(script.encode()).hexdigest(), len(keys), *keys, *args)


# ---- impressions as the merge takes them ------------------------------------------------------------

PLACES = 4096  # impressions per record at most (serving.impressions_batch_max): an arm's position unit


class Shown(NamedTuple):
    """One impression of an impressions record, with the record's place and the time the rule
    uses for it (a batch's impressions their own, a single record its record's)."""
    topic: str
    partition: int
    offset: int
    index: int  # its place in the record
    timestamp: int  # ms
    impression: Impression

    @property
    def position(self) -> int:
        """The arm script's applied position: records in offset order, a record's impressions in place order."""
        return self.offset * PLACES + self.index

    @property
    def key(self) -> bytes:
        return self.impression.user_id.encode()

    @property
    def value(self) -> bytes:
        """What the dead-letter topic gets of it: the impression alone, as a single record."""
        return self.impression.to_bytes()

    @property
    def memo(self) -> str:
        """What the user script remembers as the position that first applied the request."""
        pos = (self.partition << 40) + self.offset
        return str(pos) if self.index == 0 else f"{pos}:{self.index}"


def shown(record) -> list[Shown]:
    """A record of the impressions topic as its impressions, in their order; ValueError,
    KeyError or TypeError when it is not one (see ``recsys.impressions.decode_record``)."""
    impressions, batch = decode_record(record.value)
    if len(impressions) > PLACES:
        raise ValueError(f"{len(impressions)} impressions in one record; at most {PLACES}")
    return [Shown(record.topic, record.partition, record.offset, i, imp.ts if batch else record.timestamp, imp)
            for i, imp in enumerate(impressions)]


def commit_offsets(applied: list, remaining: dict) -> dict:
    """Per partition, the next offset to read after ``applied`` (records or ``Shown``): past
    the last one, but no further than the first record still buffered (a batch applied in part)."""
    offsets: dict = {}
    for r in applied:
        tp = TopicPartition(r.topic, r.partition)
        offsets[tp] = max(offsets.get(tp, 0), r.offset + 1)
    for tp, buffered in remaining.items():
        if tp in offsets and buffered:
            offsets[tp] = min(offsets[tp], buffered[0].offset)
    return offsets


# ---- the consumer ---------------------------------------------------------------------------------

@dataclass
class OnlineStats:
    impressions: int = 0
    events: int = 0
    hits: int = 0
    dlq: int = 0
    held: int = field(default=0, repr=False)


class OnlineConsumer:
    """Impressions and events of each partition, merged in record time, applied in two halves
    (user slot, then arm), offsets committed after (see the module's docstring)."""

    def __init__(self, settings: Settings):
        self.settings, o = settings, settings.online
        self.topics = (settings.kafka.impressions_topic, settings.kafka.events_topic)
        self.redis = connect(settings)
        self.keys = OnlineKeys(settings.redis.prefix)
        self.bounds = EventTimeBounds.of(settings.features)
        self.ttl = int(max(2 * o.window_s, settings.features.dedup_ttl_s))
        self.window_ms = int(o.window_s * 1000)
        self.buffers: dict[TopicPartition, list] = defaultdict(list)
        self.paused: set[TopicPartition] = set()
        self.member = kafka_io.GroupMember(settings, o.group, lambda: kafka_io.consumer(
            settings, o.group, topics=self.topics, listener=_DropBuffers(self)))
        self.dlq = kafka_io.producer(settings, max_block_ms=5000, request_timeout_ms=5000)
        self.stats = OnlineStats()
        self.done: dict[TopicPartition, OffsetAndMetadata] = {}
        self.stopping = threading.Event()
        self.guarded_at = 0.0

    # -- the guardrail -------------------------------------------------------------------------------
    def guard(self) -> dict | None:
        """Test a running A/B experiment (at most every ``online.guard_every_s``); end it when its
        candidate is significantly worse. Returns the verdict that ended one, else None."""
        o, now = self.settings.online, time.monotonic()
        if now - self.guarded_at < o.guard_every_s:
            return None
        self.guarded_at = now
        registry = Registry(self.settings.registry_dir)
        pointers = registry.pointers()
        exp, current, scope = pointers["experiment"], pointers["current"], ExperimentScope.of(pointers)
        if scope is None:
            return None
        arms = [self.redis.hmget(self.keys.arm(scope.arm(arm)), ["impressions", "lists_with_hit"])
                for arm in ("current", "candidate")]
        (n_a, x_a), (n_b, x_b) = ((int(n or 0), int(x or 0)) for n, x in arms)
        verdict = guardrail((n_a, x_a), (n_b, x_b), o.guard_alpha, o.guard_effect, o.guard_min_lists)
        GUARD_RATIO.labels(exp["candidate"]).set(verdict.likelihood_ratio)
        if not verdict.stop:
            return None
        try:
            registry.end_experiment(expected=exp)
        except RegistryError:  # promoted, stopped or replaced meanwhile: nothing to end
            return None
        record = {"candidate": exp["candidate"], "current": current, "ended_at": time.time(), "reason": verdict.reason,
                  "lists": list(verdict.lists), "hit_rates": [verdict.current_rate, verdict.candidate_rate],
                  "likelihood_ratio": verdict.likelihood_ratio}
        self.redis.hset(self.keys.guardrail, exp["candidate"], json.dumps(record))
        GUARD_STOPS.labels(exp["candidate"]).inc()
        log.warning("guardrail: ended the experiment of %s: %s", exp["candidate"], verdict.reason)
        return record

    # -- the merge ---------------------------------------------------------------------------------
    def _caught_up(self, tp: TopicPartition) -> bool:
        """Nothing more of ``tp`` is to come now (its fetched records all taken, which the caller
        knows): not ours, or fetched to its high watermark."""
        consumer = self.member.consumer
        if tp not in consumer.assignment():
            return True
        highwater = consumer.highwater(tp)
        return highwater is not None and consumer.position(tp, timeout_ms=0) >= highwater

    def ready(self) -> list:
        """The buffered records that can be applied now, each partition's in record-time order (an
        impression before an event of the same time); the others stay until the other topic's
        records up to their time are here."""
        out = []
        imp_topic, ev_topic = self.topics
        for p in sorted({tp.partition for tp in self.buffers}):
            imps, evs = self.buffers[TopicPartition(imp_topic, p)], self.buffers[TopicPartition(ev_topic, p)]
            i = e = 0
            while i < len(imps) or e < len(evs):
                if i < len(imps) and e < len(evs):
                    take_imp = imps[i].timestamp <= evs[e].timestamp
                elif i < len(imps):
                    take_imp = True
                    if not self._caught_up(TopicPartition(ev_topic, p)):
                        break
                else:
                    take_imp = False
                    if not self._caught_up(TopicPartition(imp_topic, p)):
                        break
                if take_imp:
                    out.append(imps[i])
                    i += 1
                else:
                    out.append(evs[e])
                    e += 1
            del imps[:i], evs[:e]
        return out

    def _flow(self) -> None:
        """Pause a partition whose buffer is full (the other topic lags), resume it once half is taken."""
        limit, consumer = self.settings.online.buffer_records, self.member.consumer
        full = {tp for tp, records in self.buffers.items() if len(records) >= limit}
        drained = {tp for tp in self.paused if len(self.buffers[tp]) < limit // 2}
        if full - self.paused:
            consumer.pause(*(full - self.paused))
        if drained:
            consumer.resume(*drained)
        self.paused = (self.paused | full) - drained
        self.stats.held = sum(len(r) for r in self.buffers.values())

    # -- the effects ---------------------------------------------------------------------------------
    def apply(self, records: list) -> list:
        """Both halves of each record's effect; returns the bad records with why (for the DLQ)."""
        imp_topic = self.topics[0]
        decoded, bad, first = [], [], []
        for r in records:
            try:
                if isinstance(r, Shown):
                    imp = r.impression
                    decoded.append((r, imp))
                    first.append(_evalsha(_IMPRESSION, [self.keys.shown(imp.user_id), self.keys.forgotten(imp.user_id)],
                                          [self.ttl, imp.request_id, r.memo, r.timestamp, str(imp.model_version),
                                           imp.arm, *imp.items]))
                elif r.topic == imp_topic:  # it did not decode when it came: again, for the reason
                    shown(r)
                    raise ValueError("an impressions record without impressions")
                else:
                    event = parse_event(r.value, self.bounds)
                    if event.type.value not in self.settings.online.attributable:
                        continue
                    decoded.append((r, event))
                    first.append(_evalsha(_EVENT, [self.keys.attributed(event.user_id), self.keys.shown(event.user_id),
                                                   self.keys.forgotten(event.user_id)],
                                          [self.ttl, event.event_id, _pos(r), r.timestamp, event.item_id, self.window_ms,
                                           event.ts]))
            except (BadEvent, ValueError, KeyError, TypeError) as exc:
                bad.append((r, exc if isinstance(exc, BadEvent) else BadEvent(f"not an impression: {exc!r}"[:500])))
        verdicts = run_scripts(self.redis, first, scripts=ONLINE_SCRIPTS, keep=script_failed)
        scope = ExperimentScope.of(Registry(self.settings.registry_dir).pointers())
        second = []  # (arm's counters, record, increments, what the metrics count: None in an experiment's)
        for (r, what), verdict in zip(decoded, verdicts):
            if isinstance(verdict, Exception):
                bad.append((r, _failed(verdict)))
                continue
            if isinstance(what, Impression):
                if verdict != 1:
                    continue
                version, arm, served = str(what.model_version), what.arm, r.timestamp
                incr, counted = ["impressions", 1, "items_shown", len(what.items)], ("impression", len(what.items))
            elif verdict != "-":
                version, arm, rank, first_hit, served = verdict.split("|")
                incr = [f"hits:{what.type.value}", 1, f"rank:{rank}", 1, "lists_with_hit", int(first_hit)]
                counted = (what.type.value, int(first_hit))
            else:
                continue
            second.append((f"{version}|{arm}", r, incr, counted))
            in_experiment = scope and scope.counts(version, arm, int(served))
            if in_experiment:
                second.append((in_experiment, r, incr, None))
        if second:
            commands = [_evalsha(_ARM, [self.keys.arm(name)],
                                 [offset_field(r.topic, r.partition), r.position if isinstance(r, Shown) else r.offset,
                                  *incr]) for name, r, incr, _ in second]
            pipe = self.redis.pipeline(transaction=False)
            pipe.sadd(self.keys.arms, *{name for name, _, _, counted in second if counted})
            pipe.execute()
            applied = run_scripts(self.redis, commands, scripts=ONLINE_SCRIPTS, keep=script_failed)
            failed = {}  # a record once, whichever of its arms' scripts failed
            for (name, r, _, counted), done in zip(second, applied):
                if isinstance(done, Exception):
                    failed.setdefault(id(r), (r, _failed(done)))
                elif done and counted:
                    _count(name, *counted)
                    self.stats.hits += counted[0] != "impression"
            bad.extend(failed.values())
        self.stats.impressions += sum(isinstance(w, Impression) for _, w in decoded)
        self.stats.events += sum(not isinstance(w, Impression) for _, w in decoded)
        return bad

    def process(self, records: list) -> bool:
        """Effects, then dead letters, then the commit; False when stopped before they were done."""
        bad = kafka_io.until_done(lambda: self.apply(records), "Redis", REDIS_AWAY, self.stopping)
        if bad is None or kafka_io.until_done(
                lambda: kafka_io.dead_letter(self.dlq, self.settings, self.settings.online.group, bad),
                "the dead-letter topic", (KafkaError,), self.stopping) is None:
            return False
        self.stats.dlq += len(bad)
        offsets = commit_offsets(records, self.buffers)
        commit = {tp: OffsetAndMetadata(o, "", -1) for tp, o in offsets.items()}
        self.done.update(commit)
        self.member.mark_done(offsets)
        self.member.consumer.commit_async(offsets=commit)
        return True

    def run(self, until_idle: float | None = None) -> OnlineStats:
        def on_poll(polled: dict) -> None:
            for tp, records in polled.items():
                self.buffers[tp].extend(self._entries(records) if tp.topic == self.topics[0] else records)
            records = self.ready()
            if records and not self.process(records):
                self.stopping.set()
            self._flow()
            try:
                self.guard()
            except REDIS_AWAY:  # tried again at the next poll
                pass

        try:
            kafka_io.consume(self.member, on_poll, self.stopping, until_idle,
                             busy=lambda: any(self.buffers.values()))
        finally:
            self.close()
        return self.stats

    @staticmethod
    def _entries(records: list) -> list:
        """Impressions records as their impressions; one that does not decode stays whole (for the DLQ)."""
        out = []
        for r in records:
            try:
                out.extend(shown(r))
            except (ValueError, KeyError, TypeError):
                out.append(r)
        return out

    def close(self) -> None:
        try:
            kafka_io.commit_done_and_close(self.member.consumer, self.done, self.settings.kafka.request_timeout_s)
        finally:
            self.dlq.close()


class _DropBuffers(ConsumerRebalanceListener):
    """Partitions that move away take their buffered, unapplied records with them: the new
    owner reads them again from the committed offsets."""

    def __init__(self, owner: OnlineConsumer):
        self.owner = owner

    def on_partitions_revoked(self, revoked):
        for tp in revoked:
            self.owner.buffers.pop(tp, None)
            self.owner.paused.discard(tp)

    def on_partitions_assigned(self, assigned):
        pass


def script_failed(reply: Exception) -> bool:
    """A script that ran and failed on its record's data (a key of the wrong type, a field that
    is not a number): it would fail the same way on every try, so the record goes to the dead
    letters and the consumer goes on. Refusals that come from Redis's state (busy, out of
    memory, read-only, a cluster moving slots) are not the record's fault and are raised."""
    text = str(reply)
    return (type(reply) is redis.ResponseError and "@user_script" in text
            and not text.startswith(("BUSY", "MISCONF", "NOREPLICAS")))


def _failed(reply: Exception) -> BadEvent:
    return BadEvent(f"a script failed on it: {reply}"[:500], "script")


def _pos(record) -> int:
    return (record.partition << 40) + record.offset


def _count(name: str, kind: str, n: int) -> None:
    version, arm = name.split("|")
    if kind == "impression":
        IMPRESSIONS.labels(version, arm).inc()
        ITEMS_SHOWN.labels(version, arm).inc(n)
    else:
        HITS.labels(version, arm, kind).inc()
        if n:
            LISTS_WITH_HIT.labels(version, arm).inc()


def run_online(settings: Settings, until_idle: float | None = None) -> dict:
    stats = OnlineConsumer(settings).run(until_idle)
    return {"impressions": stats.impressions, "events": stats.events, "hits": stats.hits, "dlq": stats.dlq}


def report(settings: Settings) -> dict:
    """Every arm's counters and rates, from Redis (``recsys online report``); and those of the
    running A/B experiment's run, which the guardrail judges (``experiment_arms``)."""
    client, keys = connect(settings), OnlineKeys(settings.redis.prefix)
    names = sorted(client.smembers(keys.arms))
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.hgetall(keys.arm(name))
    pointers = Registry(settings.registry_dir).pointers()
    scope = ExperimentScope.of(pointers)
    running = [scope.arm(arm) for arm in ("current", "candidate")] if scope else []
    for name in running:
        pipe.hgetall(keys.arm(name))
    replies = pipe.execute()
    counters = [summarize({k: int(v) for k, v in arm.items() if not k.startswith("@")}) for arm in replies]
    arms, experiment_arms = dict(zip(names, counters)), dict(zip(running, counters[len(names):]))
    guardrail_ = {c: json.loads(v) for c, v in client.hgetall(keys.guardrail).items()}
    return {"window_s": settings.online.window_s, "attributable": list(settings.online.attributable), "arms": arms,
            "guardrail_stops": guardrail_, "experiment": pointers["experiment"], "experiment_arms": experiment_arms}
