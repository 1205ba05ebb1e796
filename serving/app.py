"""The Ray Serve application: a FastAPI ingress that recommends and ingests events.

One deployment does the whole request path in-process (features from Redis in one
round trip, user tower, ANN, seen filter): a hop between deployments costs more than
the work itself on this path. Each replica watches the model registry and swaps to a
new ``current`` version in the background; requests keep the old model until the new
one is loaded, so a swap fails nothing.
"""

import asyncio
import gc
import itertools
import logging
import threading
import time
import urllib.request
from dataclasses import dataclass, replace
from typing import Optional

import redis
from fastapi import FastAPI, HTTPException, Path, Query, Request, Security
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from kafka.errors import KafkaError
from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError
from ray import serve
from ray.util import metrics

from recsys.auth import Authorizer, KeyVerdicts, Scope, auth_prefix, follow_revocations
from recsys.catalogue import CatalogueEntry, CatalogueFollower, CatalogueKeys, queue_put
from recsys.errors import MAY_ARRIVE, NOT_SENT, RecsysError, Unavailable, unavailable
from recsys.events import Event, EventTimeBounds
from recsys.experiments import in_candidate_arm, overlap_at_k
from recsys.features import ALL_TYPES, UserFeatures
from recsys.feature_store import FeatureReader, FeatureStore, TrendingCache, connect, connect_async, connect_node
from recsys.impressions import Impression, ImpressionSender, by_partition, encode_batch
from recsys.kafka_io import kafka_answers, producer, send_event
from recsys.privacy import Pseudonyms
from recsys.settings import Settings
from serving.admission import Admission
from serving.api_models import ERRORS, Accepted, CatalogueAnswer, ErrorAnswer, Health, Readiness, Recommendations
from serving.models import current_version, experiment, load_order, load_servable
from serving.watch import Watcher
from serving.recommend import ServableModel, TowerBatcher, needs_model, recommend

log = logging.getLogger(__name__)

K_MAX = 100
MAX_BATCH = 1000
MAX_EVENT_BYTES = 2048
MAX_ITEM_BYTES = 16 * 1024  # a catalogue entry: 32 genres of 64 characters, each escaped (\uXXXX)
MAX_ID_CHARS = 128  # as Event.user_id
EVENTS = TypeAdapter(list[Event])

app = FastAPI(title="recsys", version="0.1.0",
              description="Real-time recommendations (two-tower + ANN over Redis features) and event ingestion.")

LATENCY_MS = metrics.Histogram("recsys_request_latency_ms", "request latency by route",
                               boundaries=[1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000], tag_keys=("route",))
STAGE_MS = metrics.Histogram("recsys_stage_ms", "time per stage of a recommendation",
                             boundaries=[0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100], tag_keys=("stage",))
FALLBACKS = metrics.Counter("recsys_fallback_total", "answers given by the cold-start fallback")
EVENTS_ACCEPTED = metrics.Counter("recsys_events_accepted_total", "events accepted into Kafka")
MODEL_LOAD_FAILURES = metrics.Counter("recsys_model_load_failures_total",
                                      "model versions that failed to load (the replica served another)")
IMPRESSIONS_SENT = metrics.Counter("recsys_impressions_sent_total", "impressions the brokers acknowledged")
IMPRESSIONS_DROPPED = metrics.Counter("recsys_impressions_dropped_total",
                                      "impressions not sent: queue_full (Kafka slow or away) or kafka (refused)",
                                      tag_keys=("reason",))
ARM_REQUESTS = metrics.Counter("recsys_arm_requests_total", "recommendations by experiment arm and the version served",
                               tag_keys=("arm", "version"))
SHADOW_OVERLAP = metrics.Histogram("recsys_shadow_overlap", "overlap@k of a shadow candidate's list with the served list",
                                   boundaries=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.99], tag_keys=("version",))
SHADOW_LATENCY_MS = metrics.Histogram("recsys_shadow_latency_ms", "time to compute a shadow candidate's list",
                                      boundaries=[0.5, 1, 2, 5, 10, 20, 50, 100], tag_keys=("version",))
FRESH_ITEMS = metrics.Gauge("recsys_fresh_items", "catalogue items served by their content embedding (not yet known "
                            "to the version by id)", tag_keys=("version",))
MODEL_VERSION = metrics.Gauge("recsys_model_version_info", "1 for the version this replica serves", tag_keys=("version",))


@app.exception_handler(RecsysError)
async def _recsys_error(_: Request, exc: RecsysError):
    """The error family's one mapping to HTTP: its status, headers, and its message as the detail."""
    return JSONResponse(status_code=exc.http_status, content={"detail": str(exc)}, headers=exc.http_headers or None)


@app.exception_handler(redis.exceptions.RedisError)
@app.exception_handler(redis.exceptions.RedisClusterException)  # not a RedisError: a cluster client's own
async def _redis_error(request: Request, exc: Exception):
    """Redis failing where no route caught it (a cluster's slots being moved, say): a 503 to try again."""
    return await _recsys_error(request, unavailable("Redis", exc))


def _awaitable(future, loop: asyncio.AbstractEventLoop) -> asyncio.Future:
    """A kafka-python send future as an asyncio one (its callbacks run on the producer's thread)."""
    out = loop.create_future()

    def settle(how: str, value) -> None:
        if not out.done():
            getattr(out, how)(value)

    future.add_callback(lambda meta: loop.call_soon_threadsafe(settle, "set_result", meta))
    future.add_errback(lambda exc: loop.call_soon_threadsafe(settle, "set_exception", exc))
    return out


@dataclass(frozen=True)
class Candidate:
    """An experiment's candidate as a replica holds it: the loaded model and the registry's terms."""
    version: str
    model: ServableModel
    share: float
    shadow: bool


class RecsysService:
    """The request path itself, free of Serve: one per process (a Serve replica, or plain
    uvicorn in ``recsys bench serve``'s ceiling variant)."""

    def __init__(self, settings: Settings, model_poll_s: float = 1.0):
        self.settings = s = settings
        sv = s.serving
        self.tower = TowerBatcher(sv.tower_batch_max, sv.tower_batch_wait_s) if sv.tower_batch else None
        self.answers = itertools.count()  # which answers' stage times are observed
        self.bounds = EventTimeBounds.of(s.features)
        # Fail within a bounded time when Redis is gone, instead of hanging a request.
        bounded = {"timeout_s": sv.redis_timeout_s, "retries": sv.redis_retries}
        self.store = FeatureStore(s, connect(s, **bounded))  # readiness, the trending cache
        self.reader = FeatureReader(s, connect_async(s, **bounded))  # the request path
        self.stopping = threading.Event()  # the caches' threads run until it is set
        verdicts = KeyVerdicts(sv.key_cache_s, sv.key_cache_max) if sv.key_cache_s > 0 else None
        self.authorizer = Authorizer(s, self.reader.redis, verdicts)
        if verdicts is not None:
            threading.Thread(target=follow_revocations, name="revocations", daemon=True,
                             args=(connect_node(s), auth_prefix(s), verdicts, self.stopping)).start()
        self.trending = TrendingCache(self.store.trending, 2 * K_MAX, sv.trending_cache_s) if sv.trending_cache_s else None
        if self.trending is not None:
            threading.Thread(target=self.trending.run, args=(self.stopping,), name="trending", daemon=True).start()
        self.pseudonyms = Pseudonyms.of(s)
        self._producer = None
        self._producer_lock = threading.Lock()
        self.posts = Admission(sv.events_waiting_max)  # event posts waiting for Kafka
        self.impressions = ImpressionSender(self._send_impressions, capacity=sv.impression_queue,
                                            flush_s=sv.impressions_flush_ms / 1000, batch_max=sv.impressions_batch_max,
                                            sample=sv.impressions_sample,
                                            on_drop=lambda reason, n: IMPRESSIONS_DROPPED.inc(n, tags={"reason": reason}),
                                            on_sent=IMPRESSIONS_SENT.inc)
        self.model, self.version, self.load_failure = None, None, None
        self._readiness: Optional[tuple[float, dict]] = None  # (when its check began, the checks)
        self._readiness_check: Optional[asyncio.Future] = None
        self.catalogue_keys = CatalogueKeys.of(s)
        self.catalogue = CatalogueFollower(self.store.redis, self.catalogue_keys)
        self.catalogue_items: dict[str, list[str]] = {}  # every entry read, for a version loaded later
        self.candidate: Optional[Candidate] = None
        self.candidate_failure: Optional[str] = None  # a candidate version that failed to load
        self._follow_catalogue()  # before the first version loads: it starts with the whole catalogue
        for version in load_order(s):  # the current version, else the last good one: no crash loop
            try:
                self._swap_to(version)
                break
            except Exception as exc:
                self._load_failed(version, exc)
        self.watcher = Watcher(self._watch_round, model_poll_s, sv.watcher_stale_s, self.stopping).start()
        threading.Thread(target=self._warm_kafka, daemon=True).start()

    # -- model -----------------------------------------------------------
    def _swap_to(self, version: Optional[str]) -> None:
        if version == self.version:
            return
        model = self._loaded(version) if version else None
        # A request reads self.model once and names the version from that object, so it never
        # mixes two versions; self.version is the watcher's own bookkeeping.
        old, self.model, self.version = self.version, model, version
        if old:
            MODEL_VERSION.set(0, tags={"version": old})
        if version:
            MODEL_VERSION.set(1, tags={"version": version})

    def _loaded(self, version: str) -> ServableModel:
        """The version, with the catalogue's items it does not know added to its live index."""
        model = load_servable(self.settings, version)
        model.add_items(self.catalogue_items)
        return model

    def _follow_catalogue(self) -> None:
        """New catalogue entries into the live index of the served model and the candidate."""
        try:
            changed = self.catalogue.poll()
            self.catalogue_items.update(changed)
            for model in filter(None, (self.model, self.candidate and self.candidate.model)):
                model.add_items(changed)
        except Exception as exc:  # Redis away, say: the next poll reads what was missed; the watcher goes on
            log.warning("catalogue not followed: %r", exc)
        if self.model is not None:  # every poll: Ray drops a gauge not set for two export intervals
            FRESH_ITEMS.set(len(self.model.fresh), tags={"version": self.model.version})

    def _load_failed(self, version: str, exc: Exception) -> None:
        # /readyz needs no key: it names the error's type; its text (paths) goes to the log only.
        self.load_failure = {"version": version, "error": f"{type(exc).__name__} (the replica's log has the detail)"}
        MODEL_LOAD_FAILURES.inc()
        log.error("model %s failed to load, serving %s: %r", version, self.version, exc)

    def _watch_round(self) -> None:
        """One round of the registry watcher (serving/watch.py runs them, guarded)."""
        if self.version:  # Ray drops a gauge not set for two export intervals: set it again
            MODEL_VERSION.set(1, tags={"version": self.version})
        version = None
        try:
            version = current_version(self.settings)
            if version != (self.load_failure or {}).get("version"):  # versions never change: tried once is enough
                self._swap_to(version)
                self.load_failure = None  # the current version is the one served
        except Exception as exc:  # a broken version must not stop the watcher; keep serving the old one
            self._load_failed(version, exc)
        finally:
            self._follow_experiment()
            self._follow_catalogue()

    def _follow_experiment(self) -> None:
        """Load the experiment's candidate, follow its share and mode, drop it when it ends. A
        candidate that fails to load is left out (counted and logged, tried once): the current
        model serves everyone meanwhile."""
        exp = None
        try:
            exp = experiment(self.settings)
            held = self.candidate
            if exp is None:
                self.candidate = None
            elif held is not None and held.version == exp["candidate"]:
                self.candidate = replace(held, share=exp["share"], shadow=exp["shadow"])
            elif exp["candidate"] != self.candidate_failure:
                self.candidate = Candidate(exp["candidate"], self._loaded(exp["candidate"]),
                                           exp["share"], exp["shadow"])
        except Exception as exc:
            self.candidate, self.candidate_failure = None, exp["candidate"] if exp else None
            MODEL_LOAD_FAILURES.inc()
            log.error("experiment candidate %s failed to load, the current model serves all: %r", self.candidate_failure, exc)

    # -- kafka -----------------------------------------------------------
    def _kafka(self):
        """The producer, made on first use (a replica makes it at start, in the background). While
        another thread is still making it (a broker that does not answer can hold that for many
        seconds), a request fails at once with a 503 instead of queueing behind it."""
        if self._producer is not None:
            return self._producer
        if not self._producer_lock.acquire(blocking=False):
            raise Unavailable("Kafka unavailable: the producer is still connecting")
        try:
            if self._producer is None:
                try:
                    wait_ms = int(self.settings.serving.kafka_timeout_s * 1000)
                    self._producer = producer(self.settings, max_block_ms=wait_ms, request_timeout_ms=wait_ms)
                except KafkaError as exc:
                    raise unavailable("Kafka", exc) from None
            return self._producer
        finally:
            self._producer_lock.release()

    def _warm_kafka(self) -> None:
        try:
            self._kafka()
        except Unavailable:  # Kafka down at start: the first event tries again
            pass

    def _send_impressions(self, batch: list[Impression]) -> list[tuple[object, int]]:
        """On the impressions thread: the send may wait for the topic's metadata, a request never
        does. One record per impression, keyed by its user, when batching is off; else one batch
        record per partition, on the partition of its users' events."""
        prod, topic = self._kafka(), self.settings.kafka.impressions_topic
        if not self.settings.serving.impressions_flush_ms:
            return [(prod.send(topic, key=i.user_id.encode(), value=i.to_bytes()), 1) for i in batch]
        partitions = sorted(prod.partitions_for(topic))
        return [(prod.send(topic, partition=partitions[p], value=encode_batch(group)), len(group))
                for p, group in by_partition(batch, len(partitions)).items()]

    def _send(self, events: list[Event]) -> list:
        prod = self._kafka()
        return [send_event(prod, self.settings, e) for e in self.pseudonyms.events(events)]

    async def produce(self, events: list[Event]) -> None:
        """Accepted means on the brokers: nothing is lost after a 202. Only the send runs in a
        thread (it can wait for metadata); the acknowledgements are awaited on the event loop,
        so requests that wait for a broker hold no thread while a leader is being replaced."""
        if not self.posts.enter():
            raise unavailable("Kafka", RuntimeError(f"{self.posts.limit} event posts wait already"), NOT_SENT)
        loop = asyncio.get_running_loop()
        timeout_s = self.settings.serving.kafka_timeout_s
        try:
            # send() itself raises when the topic's metadata does not come within max_block_ms.
            futures = await asyncio.wait_for(asyncio.to_thread(self._send, events), timeout_s + 1.0)
            await asyncio.wait_for(asyncio.gather(*(_awaitable(f, loop) for f in futures)), timeout_s)
        except (KafkaError, asyncio.TimeoutError) as exc:
            # wait_for cannot stop the sending thread, nor the producer its queued records: the 503
            # says so, and a retry with the same event ids is deduplicated downstream.
            raise unavailable("Kafka", exc, MAY_ARRIVE) from None
        finally:
            self.posts.leave()

    # -- requests --------------------------------------------------------
    async def recommendations(self, user_id: str, k: int, api_key: Optional[str]) -> JSONResponse:
        """Answered under the client's own id; everything behind the API knows its pseudonym.
        The key check rides in the features' round trip (one Redis round trip in all)."""
        started = time.perf_counter()
        model, candidate, arm, shadow = self.model, self.candidate, "current", None
        check = None if self.settings.auth.public_reads else self.authorizer.command(api_key, Scope.recs_read)
        pseudonym = self.pseudonyms.user_id(user_id)
        if candidate is not None and in_candidate_arm(pseudonym, candidate.share, candidate.version):
            if candidate.shadow:
                shadow = candidate
            else:
                model, arm = candidate.model, "candidate"
        cached = self.trending.top(2 * k) if self.trending is not None else None
        filter_types = model.filter_types if model is not None else ALL_TYPES
        read = lambda: self.reader.user_and_trending(pseudonym, 2 * k, first=check, trending=cached is None,  # noqa: E731
                                                     filter_types=filter_types)
        try:
            try:
                user, trending, decision = await read()
            except redis.exceptions.NoScriptError:  # Redis restarted since the check's script was loaded
                await self.authorizer.load()
                user, trending, decision = await read()
            features_ms = (time.perf_counter() - started) * 1e3
        except redis.RedisError as exc:
            raise unavailable("Redis", exc) from None
        if check:
            self.authorizer.judge(decision, Scope.recs_read, api_key)
        trending = cached if trending is None else trending
        query, tower_ms = None, None
        if needs_model(model, user):
            t0 = time.perf_counter()
            query = await self.tower.embed(model, user) if self.tower else model.user_embedding([user])
            tower_ms = (time.perf_counter() - t0) * 1e3
        rec = recommend(model, user, k, trending, query=query)
        rec.stages_ms["features"] = features_ms
        if tower_ms is not None:
            rec.stages_ms["user_tower"] = tower_ms  # the wait for the batch included
        if next(self.answers) % self.settings.serving.stage_metrics_every == 0:
            for stage, ms in rec.stages_ms.items():
                STAGE_MS.observe(ms, tags={"stage": stage})
        if rec.fallback:
            FALLBACKS.inc()
        impression = Impression.served(pseudonym, rec.model_version, arm, rec.items)
        self.impressions.offer(impression)
        ARM_REQUESTS.inc(tags={"arm": arm, "version": str(rec.model_version)})
        if shadow is not None:  # on the event loop once this handler returns: timed, compared, never served
            asyncio.get_running_loop().call_soon(self._shadow, shadow, user, k, trending, rec.items)
        LATENCY_MS.observe((time.perf_counter() - started) * 1e3, tags={"route": "recommendations"})
        timing = ", ".join(f"{stage};dur={ms:.3f}" for stage, ms in rec.stages_ms.items())
        return JSONResponse({**rec.to_json(user_id), "request_id": impression.request_id}, headers={"Server-Timing": timing})

    async def put_item(self, item_id: str, entry: CatalogueEntry) -> dict:
        try:
            async with self.reader.redis.pipeline(transaction=True) as pipe:
                queue_put(pipe, self.catalogue_keys, item_id, entry, self.settings.serving.catalogue_log_max)
                await pipe.execute()
        except redis.RedisError as exc:
            raise unavailable("Redis", exc) from None
        model = self.model
        known = set(model.content.known(entry.genres)) if model is not None and model.content else set()
        return {"item_id": item_id, "genres": entry.genres, "unknown_genres": [g for g in entry.genres if g not in known]}

    @staticmethod
    def _shadow(candidate: Candidate, user: UserFeatures, k: int, trending: list, served: list[str]) -> None:
        try:
            t0 = time.perf_counter()
            items = recommend(candidate.model, user, k, trending).items
            SHADOW_LATENCY_MS.observe((time.perf_counter() - t0) * 1e3, tags={"version": candidate.version})
            SHADOW_OVERLAP.observe(overlap_at_k(served, items, k), tags={"version": candidate.version})
        except Exception:  # a shadow must never disturb the served path
            log.exception("shadow candidate %s failed", candidate.version)

    def close(self) -> None:
        """At shutdown: the impressions gathered but not sent yet go to Kafka (within seconds), the
        caches' threads stop."""
        self.stopping.set()
        self.impressions.close()
        if self._producer is not None:
            self._producer.flush(timeout=self.settings.serving.kafka_timeout_s)

    async def readiness(self) -> dict:
        """The checks, at most ``serving.readiness_cache_s`` old, made by one thread at a time: a
        flood of probes (they need no key) costs one check per period, and the probes wait on
        the event loop, holding no thread of the pool that /metrics uses."""
        held = self._readiness
        if held is not None and time.monotonic() - held[0] < self.settings.serving.readiness_cache_s:
            return held[1]
        if self._readiness_check is None or self._readiness_check.done():
            self._readiness_check = asyncio.ensure_future(self._check_readiness())
        return await asyncio.shield(self._readiness_check)

    async def _check_readiness(self) -> dict:
        started = time.monotonic()
        checks = await asyncio.to_thread(self._checks)
        self._readiness = (started, checks)
        return checks

    def _checks(self) -> dict:
        model = self.model
        checks = {"model": self.version, "redis": self._redis_ok(), "kafka": kafka_answers(self.settings),
                  "model_load_failure": self.load_failure, "fresh_items": len(model.fresh) if model is not None else 0,
                  "watcher": self.watcher.healthy()}
        return {"ready": checks["model"] is not None and checks["redis"] and checks["kafka"] and checks["watcher"],
                **checks}

    def _redis_ok(self) -> bool:
        try:
            return bool(self.store.redis.ping())
        except redis.RedisError:
            return False

    def metrics_text(self) -> str:
        url = f"http://127.0.0.1:{self.settings.ray.metrics_port}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                return resp.read().decode()
        except OSError as exc:
            raise Unavailable(f"Ray metrics exporter unavailable at {url}: {exc}") from None


_service: Optional[RecsysService] = None  # this process's; set by the Serve replica or by install()


def install(service: RecsysService) -> None:
    """The process's service; every object made so far (modules, the model, the clients) is
    frozen out of the garbage collector: a full collection walked those ~200,000 objects and
    would stop the process for 130 to 145 ms (measured in a started worker; not yet seen to
    decide a latency in a run)."""
    global _service
    _service = service
    gc.freeze()


def service() -> RecsysService:
    if _service is None:
        raise Unavailable("the service is starting")
    return _service


def _shutdown() -> None:
    if _service is not None:
        _service.close()


app.router.on_shutdown.append(_shutdown)  # the ASGI lifespan's end: a Serve replica's and uvicorn's


# -- routes ------------------------------------------------------------------
_bearer = HTTPBearer(auto_error=False, description="an API key from `recsys keys create`")


def _requires(scope: Scope):
    """A dependency that lets the request on only with a key holding ``scope``, within its rate."""
    async def check(credentials: Optional[HTTPAuthorizationCredentials] = Security(_bearer)) -> None:
        await service().authorizer.authorize(credentials.credentials if credentials else None, scope)
    return check


def _errors(*statuses: int) -> dict:
    return {status: {"model": ErrorAnswer, "description": ERRORS[status]} for status in statuses}


@app.get("/v1/recommendations/{user_id}", response_model=Recommendations, responses=_errors(401, 403, 422, 429, 503))
async def recommendations(user_id: str = Path(min_length=1, max_length=MAX_ID_CHARS),
                          k: int = Query(10, ge=1, le=K_MAX),
                          credentials: Optional[HTTPAuthorizationCredentials] = Security(_bearer)):
    """Top-k unseen items; the cold-start fallback (trending) for users without history.
    Needs a key with ``recs:read`` (unless reads are public), checked in the same Redis round
    trip as the features. The Server-Timing header gives the time of each stage in ms. Async:
    the work is a Redis round trip and about half a millisecond of numpy, cheaper on the event
    loop than a hop to the thread pool."""
    return await service().recommendations(user_id, k, credentials.credentials if credentials else None)


async def _body(request: Request, limit: int, what: str) -> bytes:
    """The body, read only up to ``limit`` bytes: a 413 as soon as it is exceeded, whether the
    client declared a Content-Length or sent chunks. Every route with a body reads it so, after
    its key check (FastAPI reads a body parameter before the route's dependencies run)."""
    too_big = HTTPException(413, detail=f"body over {limit} bytes; {what}")
    if int(request.headers.get("content-length") or 0) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


def _invalid(exc: ValidationError) -> HTTPException:
    """A 422 naming the fields at fault, or saying the JSON is malformed."""
    errors = exc.errors()
    if errors[0]["type"] == "json_invalid":
        return HTTPException(422, detail=[{"loc": ["body"], "msg": f"malformed JSON: {errors[0]['msg']}"}])
    return HTTPException(422, detail=[{"loc": ["body", *e["loc"]], "msg": e["msg"]} for e in errors])


# The body is parsed by hand (size first, then event-time bounds from the settings); its
# schema is published for clients and API fuzzers all the same.
_EVENTS_BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "anyOf": [{"$ref": "#/components/schemas/Event"},
              {"type": "array", "items": {"$ref": "#/components/schemas/Event"}, "maxItems": MAX_BATCH}]}}}}}


_ITEM_BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "$ref": "#/components/schemas/CatalogueEntry"}}}}}


def _openapi() -> dict:
    """FastAPI's schema, plus the models of the event body (which the route parses by hand),
    with the event-time bounds: the newest time is now plus the clock skew when the schema is
    made, so a time valid by the schema stays valid later."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        event = TypeAdapter(Event).json_schema(ref_template="#/components/schemas/{model}")
        bounds = service().bounds
        event["properties"]["ts"].update(minimum=bounds.oldest_ms, maximum=int((time.time() + bounds.max_skew_s) * 1000))
        models = schema.setdefault("components", {}).setdefault("schemas", {})
        models.update(event.pop("$defs", {}))
        models["Event"] = event
        models["CatalogueEntry"] = CatalogueEntry.model_json_schema()
        app.openapi_schema = schema
    return app.openapi_schema


app.openapi = _openapi


@app.post("/v1/events", status_code=202, response_model=Accepted, openapi_extra=_EVENTS_BODY,
          dependencies=[Security(_requires(Scope.events_write))], responses=_errors(401, 403, 413, 422, 429, 503))
async def events(request: Request, credentials: HTTPAuthorizationCredentials = Security(_bearer)):
    """One event or a batch of up to 1,000: 202 once every one is on the Kafka brokers. Each
    event costs the key one token of its rate limit. A 503 means the events may still arrive:
    send them again with the same event ids (the stream worker drops the copies)."""
    started = time.perf_counter()
    raw = await _body(request, MAX_BATCH * MAX_EVENT_BYTES, f"at most {MAX_BATCH} events per request")
    # One event or a list: parsed as a list either way, strictly (JSON types as the schema says:
    # no 1.0 for an integer, no false for a number), in pydantic's own JSON parser.
    if not raw.strip():
        raise HTTPException(422, detail=[{"loc": ["body"], "msg": "no body: send one event or a list of events"}])
    batch = raw if raw.lstrip()[:1] == b"[" else b"[" + raw + b"]"
    try:
        accepted = EVENTS.validate_json(batch, strict=True, context={"bounds": service().bounds})
    except ValidationError as exc:
        raise _invalid(exc) from None
    if len(accepted) > MAX_BATCH:
        raise HTTPException(422, detail=[{"loc": ["body"], "msg": f"batch of {len(accepted)} events; at most {MAX_BATCH} per request"}])
    # The key check took one token; the batch's other events are taken meanwhile (one round trip
    # beside the produce, none for a single event).
    await asyncio.gather(service().authorizer.charge(credentials.credentials, len(accepted) - 1),
                         service().produce(accepted))
    if accepted:  # an empty batch is accepted too; Ray's counter takes only positive steps
        EVENTS_ACCEPTED.inc(len(accepted))
    LATENCY_MS.observe((time.perf_counter() - started) * 1e3, tags={"route": "events"})
    return {"accepted": len(accepted)}


@app.put("/v1/items/{item_id}", status_code=202, response_model=CatalogueAnswer, openapi_extra=_ITEM_BODY,
         dependencies=[Security(_requires(Scope.catalogue_write))], responses=_errors(401, 403, 413, 422, 429, 503))
async def put_item(request: Request, item_id: str = Path(min_length=1, max_length=MAX_ID_CHARS)):
    """Add an item to the catalogue (or change its genres): every replica serves it within seconds,
    embedded from its genres by the served model's content tower, until a retrain knows it by id.
    ``unknown_genres``: those the served model never saw (they do not shape the embedding). The
    body is read by hand, as the events' is: its size is capped, and only after the key check."""
    raw = await _body(request, MAX_ITEM_BYTES, "a catalogue entry is a list of at most 32 genres")
    try:
        entry = CatalogueEntry.model_validate_json(raw, strict=True)
    except ValidationError as exc:
        raise _invalid(exc) from None
    return await service().put_item(item_id, entry)


@app.get("/healthz", response_model=Health)
async def healthz() -> dict:
    return {"status": "ok"}


@app.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness, "description": "not ready"}})
async def readyz():
    """The replica's checks (model, Redis, Kafka), at most ``serving.readiness_cache_s`` old."""
    checks = await service().readiness()
    return JSONResponse(status_code=200 if checks["ready"] else 503, content=checks)


@app.get("/metrics", dependencies=[Security(_requires(Scope.admin))], response_class=PlainTextResponse,
         responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}},
                    **{status: {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorAnswer"}}},
                                "description": ERRORS[status]} for status in (401, 403, 429, 503)}})
def metrics_page() -> PlainTextResponse:
    """This node's Prometheus metrics (every replica's, and Serve's own), from Ray's exporter."""
    return PlainTextResponse(service().metrics_text())


@serve.deployment
@serve.ingress(app)
class RecsysApi:
    """The Serve deployment: its replica process holds one RecsysService for the routes above."""

    def __init__(self, settings: Optional[dict] = None, model_poll_s: float = 1.0):
        install(RecsysService(Settings(**(settings or {})), model_poll_s))


class AppArgs(BaseModel):
    """The app's arguments (``args`` in serving/config.yaml), validated by Serve before it deploys:
    ``settings`` fields override the environment's ``RECSYS_*``; ``deployment`` options are for
    ``recsys serve``, which reads them from that file (``serve deploy`` applies them itself)."""

    model_config = ConfigDict(extra="forbid")
    settings: dict = {}
    model_poll_s: float = 1.0
    deployment: dict = {}


def build_app(args: AppArgs) -> serve.Application:
    """The typed app builder that serving/config.yaml's import_path names."""
    settings = Settings(**args.settings)  # fails here, at deploy time, not in every replica
    return RecsysApi.options(**args.deployment).bind(settings=settings.model_dump(mode="json"),
                                                     model_poll_s=args.model_poll_s)
