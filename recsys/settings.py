"""One typed settings object in sections, from four layers; the first that sets a field wins:

1. ``RECSYS_*`` environment variables. A section's field is ``RECSYS_<SECTION>_<FIELD>``:
   ``kafka.events_topic`` is ``RECSYS_KAFKA_EVENTS_TOPIC``, ``retraining.cron`` is
   ``RECSYS_RETRAINING_CRON``; the top-level folders are ``RECSYS_HOME``, ``RECSYS_ARCHIVE_DIR``...
2. A settings file: ``recsys.toml`` in the working folder, or the file ``RECSYS_CONFIG`` names.
   Top-level fields at the top, each section a table (``[kafka]`` ``brokers = 3``). A key that
   is no setting is an error naming the key and the file.
3. The stack's state: how ``recsys stack up`` started the running stack (Kafka brokers, Redis
   cluster masters), in ``<home>/stack.json``; ``recsys stack down`` removes it.
4. The defaults below.

``recsys config show`` prints every setting in effect and the layer it came from (``describe``).
"""
from __future__ import annotations

import json
import os
import re
import tomllib
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict

from recsys.errors import InvalidInput

CONFIG_FILE = "recsys.toml"  # read from the working folder
CONFIG_ENV = "RECSYS_CONFIG"  # or the file this names (then it must exist)
STACK_STATE = "stack.json"  # in the home folder, while the stack runs
STACK_FIELDS = {"kafka": ("brokers",), "redis": ("cluster_masters",)}  # what the stack remembers

from recsys.events import EventType


class KafkaSettings(BaseModel):
    # Ports stay clear of Ray's defaults (GCS 6379, worker ports 10002-19999). Broker i of
    # ``brokers`` (from 0) listens on the bootstrap port + 2i, its controller on controller_port + 2i.
    bootstrap: str = "127.0.0.1:29092"
    controller_port: int = 29093
    brokers: int = Field(1, ge=1, le=5)  # 3: replication factor 3, min.insync.replicas 2
    version: str = "4.1.1"
    events_topic: str = "user-events"
    dlq_topic: str = "user-events.dlq"
    # Every served list (recsys/impressions.py), keyed like the events and with as many
    # partitions, so a user's impressions and events share a partition number.
    impressions_topic: str = "impressions"
    events_partitions: int = 6  # up to 6 stream workers share a group (`recsys chaos stream-workers`)
    # Consumer groups: the stream worker's and the archiver's.
    stream_group: str = "features"
    archive_group: str = "archive"
    poll_batch: int = 500  # records per poll, and so per Redis round trip
    # A group consumer that holds no partition this long is recreated; after this many
    # recreations it exits non-zero (recsys.kafka_io.GroupMember). 0 s turns the bound off.
    assignment_timeout_s: float = 30.0
    recreate_attempts: int = 1
    # A consumer's wait for the group's coordinator (a commit, a read of committed offsets, the
    # leave on close) and for a dead letter's acknowledgement gives up after this long, so a
    # SIGTERM ends well within Kubernetes' 30 s grace while the coordinator or the dead-letter
    # topic is away: what is not committed then comes again, and changes nothing.
    request_timeout_s: float = Field(5.0, gt=0)
    # Where the brokers ask for it (deploy/k8s: Strimzi's TLS listener with SCRAM users); the
    # password is the secret ``kafka-password`` (recsys.secrets). Used by recsys.kafka_io.connection.
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    ssl_cafile: Path | None = None  # the brokers' CA (Strimzi: the cluster CA's ca.crt)

    @property
    def servers(self) -> list[str]:
        """Every broker's host:port, for clients to bootstrap from whichever answers."""
        host, port = self.bootstrap.rsplit(":", 1)
        return [f"{host}:{int(port) + 2 * i}" for i in range(self.brokers)]

    @property
    def replication_factor(self) -> int:
        return min(self.brokers, 3)

    @property
    def min_insync_replicas(self) -> int:
        """An acknowledged write is on this many brokers; one broker may be down meanwhile."""
        return max(1, self.replication_factor - 1)


class RedisSettings(BaseModel):
    host: str = "127.0.0.1"
    port: int = 26379  # a Redis Cluster: any of its masters (the client finds the others)
    prefix: str = "recsys"
    # Trending is this many sorted sets (recsys/features.py), so no one key takes every event's
    # write; a request reads every shard's top items (Redis CPU per request grows with them).
    # None: one per cluster master, or one. Changing it moves items between shards: rebuild the
    # features afterwards (`recsys features rebuild`).
    trending_shards: int | None = Field(None, ge=1)
    # 0: one Redis. N: a Redis Cluster of N masters (`recsys stack up --redis-cluster N` starts
    # one on port, port + 100, ...), and every client is a cluster client.
    cluster_masters: int = Field(0, ge=0)

    @property
    def trending_shard_count(self) -> int:
        return self.trending_shards or max(1, self.cluster_masters)

    @field_validator("cluster_masters")
    @classmethod
    def _cluster_of_three(cls, v: int) -> int:
        if v in (1, 2):
            raise ValueError("a Redis Cluster needs at least 3 masters (0: one Redis)")
        return v

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"


class AuthSettings(BaseModel):
    """API keys (recsys/auth.py): every route but the probes needs one, with its scope."""
    # True: GET recommendations needs no key (a public catalogue); events always need one.
    public_reads: bool = False
    # A key's token bucket (shared by all replicas, in Redis) unless the key sets its own.
    rate_per_s: float = Field(50.0, gt=0)
    burst: int = Field(100, ge=1)


class FeatureSettings(BaseModel):
    """The online features' shape (recsys/features.py), the same in Redis and in training data."""
    recent_items: int = 50
    # A user's seen set keeps the items of their latest events, this many (by event time): the
    # seen filter and the ANN's extra candidates stay bounded, whatever a client posts for an id.
    seen_items: int = Field(1000, ge=1)
    trending_half_life_s: float = 24 * 3600.0
    # A retried POST of one event id (a new Kafka record) is absorbed this long; a replay of the
    # topic needs no marker (each partition's applied offset is kept with the effects).
    dedup_ttl_s: int = 3600
    # Event time accepted (recsys.events.EventTimeBounds): from this instant (1990-01-01, before
    # any data set the project reads) to now plus this clock skew.
    oldest_event_ms: int = 631_152_000_000
    max_clock_skew_s: float = 300.0


class RaySettings(BaseModel):
    num_cpus: float = 4  # logical CPUs for the local cluster; replicas and train workers take fractions
    port: int = 26380  # the local cluster's GCS; `ray start --head --port`
    metrics_port: int = 28080
    # Ray starts its workers (Serve's proxy and replicas, Train workers) at nice 15, so any other
    # process on the machine takes the CPU first; a serving node's API must not yield that way.
    worker_niceness: int = 0


class ServingSettings(BaseModel):
    host: str = "127.0.0.1"
    port: int = 28000
    # "haproxy": HAProxy in front of the replicas, which answer HTTP themselves (Ray Serve's
    # HA proxy and throughput-optimized modes); "proxy": Ray Serve's default Python proxy.
    ingress: Literal["haproxy", "proxy"] = "haproxy"
    haproxy_stats_port: int = 28404  # HAProxy's stats page and Prometheus exporter, on loopback
    haproxy_metrics_port: int = 28101
    # A request (headers and body) must arrive within this long, or HAProxy answers 408
    # without involving a replica: a client sending a byte a second holds nothing.
    request_read_timeout_s: int = 10
    # The API's Redis client: a read that takes longer than the timeout is tried again this many
    # times, then the request gets a 503. A busy machine stalls Redis replies past 0.5 s now and
    # then; a refused connection (Redis down) still fails within milliseconds per try.
    redis_timeout_s: float = 1.0
    redis_retries: int = 1
    # An event post waits this long for the topic's metadata and again for the brokers' acks,
    # then answers 503. At 2 s, a fresh clone's smoke load test (500 req/s on 2 cores) got 71
    # 503s that outlasted the clients' retries: acks that took 2-4.5 s on a saturated machine.
    kafka_timeout_s: float = 4.0
    # At most this many event posts wait for Kafka at once per replica (serving/admission.py):
    # the next are answered 503 with Retry-After at once, nothing sent. Without it, a partition
    # with no leader holds a connection per post for kafka_timeout_s, and on a busy machine
    # clients heard nothing at all (issue 35, finding 12).
    events_waiting_max: int = Field(256, ge=1)
    # Impressions wait here for the sending thread; when it is full (Kafka slow or away) they are
    # dropped and counted (recsys_impressions_dropped_total): a request never waits for them.
    impression_queue: int = Field(10_000, ge=1)
    # Cost levers of the request path (issue 33); each can be turned off alone to measure it.
    # Impressions: the sending thread gathers them this long (or this many) and sends one record
    # per partition (recsys/impressions.py); 0 ms: one record per impression, as before batches.
    impressions_flush_ms: float = Field(100.0, ge=0)
    impressions_batch_max: int = Field(500, ge=1, le=4096)  # 4096: recsys.attribution.PLACES
    # The share of answers whose impression is sent; below 1 the online metrics see a sample
    # (recsys.impressions.ImpressionSender says what they lose).
    impressions_sample: float = Field(1.0, gt=0, le=1)
    # The merged trending top, cached per replica and read again in the background this often
    # (twice per period: a cold-start answer lags Redis by at most this); 0: read per request.
    trending_cache_s: float = Field(1.0, ge=0)
    # A replica remembers a known API key's scopes and limits this long (a revoked key still
    # passes here for at most this long when the revocation's message is lost; recsys/auth.py);
    # the token bucket stays in Redis, exact. 0: every request looks the key up.
    key_cache_s: float = Field(1.0, ge=0)
    key_cache_max: int = Field(10_000, ge=1)  # keys remembered per replica
    # /readyz (no key needed) answers from one check at most this old, made by one thread at a
    # time: a flood of probes costs one Redis ping and one broker check per period per replica.
    readiness_cache_s: float = Field(1.0, ge=0)
    # One user-tower call for the requests that reach it together (serving.recommend.TowerBatcher):
    # up to tower_batch_max, gathered for tower_batch_wait_s (0: those of the same event-loop
    # turn). Off: one call per request.
    tower_batch: bool = True
    tower_batch_max: int = Field(16, ge=1)
    tower_batch_wait_s: float = Field(0.0, ge=0)
    # The stage times (recsys_stage_ms) of one answer in this many: the dashboards plot their
    # sum over their count, which sampling leaves unbiased; 1: every answer.
    stage_metrics_every: int = Field(4, ge=1)
    # The catalogue's log (recsys/catalogue.py) keeps about this many entries; a replica that
    # falls further behind reads the whole catalogue again.
    catalogue_log_max: int = Field(100_000, ge=100)
    # A replica whose registry watcher has not ended a round for this long (it hangs, or every
    # round fails) answers /readyz with 503 (serving/watch.py); a round includes loading a new
    # version, which takes seconds.
    watcher_stale_s: float = Field(300.0, gt=0)
    # Serve kills a proxy whose ready or health check takes longer than this (Ray's defaults:
    # 5 s and 10 s), which a busy 2-core machine exceeds; the deploy then fails with ActorDiedError.
    proxy_ready_check_timeout_s: float = 30.0
    proxy_health_check_timeout_s: float = 30.0
    # A stopping replica behind the local HAProxy stays reachable this long before it refuses new
    # connections (Ray's default, 30 s, gives a cloud load balancer time to deregister it). The
    # local HAProxy is reloaded on loopback within a second and retries a refused connection on
    # another replica, so a few seconds lose nothing: every scale-down, redeploy and delete is
    # 27 s shorter.
    replica_drain_s: float = Field(3.0, ge=0)


Precision = Literal["fp32", "fp16", "int8"]


class TrainingSettings(BaseModel):
    """How a retraining runs, and the compression of what it publishes (README "Compression")."""
    workers: int = 2  # Ray Train workers of a scheduled retraining
    # How the archive becomes training examples (README "Training data at archive scale").
    # ray_data: streamed on Ray Data, no process holds the log (training.ray_data); memory: read
    # whole on the driver (training.data.Prepared), the reference the other is tested equal to,
    # which also reports item-kNN and EASE; auto: memory up to memory_max_events stored events.
    # Other sources (generators, files, tables) are in memory either way.
    data_engine: Literal["auto", "memory", "ray_data"] = "auto"
    memory_max_events: int = Field(2_000_000, ge=0)
    data_block_rows: int = Field(250_000, ge=1_000)  # events per Ray Data block (memory per task)
    # Ray's placement of the workers: PACK fills a node first (its ring all-reduce stays local);
    # STRICT_SPREAD puts each on its own node (`recsys chaos ray-nodes`).
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    epochs: int | None = None  # None: the model config's
    # int8 by default: on MovieLens-100K and the synthetic stream it kept HR@10 within 1% of fp32
    # (`recsys bench compression`) in a quarter of the tables' and the index's bytes.
    tower_precision: Precision = "int8"  # the user tower's embedding tables as served (matrices: fp32)
    item_precision: Precision = "int8"  # the item vectors' codes in the ANN index
    ann_kind: str | None = None  # a recsys.ann.KINDS name; None: exact below ann_exact_below items, IVF above
    ann_exact_below: int = Field(50_000, ge=1)
    ann_target_recall: float = Field(0.95, gt=0, le=1)  # recall@10 against exact search, on held-out users
    # The seen filter the published model serves (recsys.features.SEEN_POLICIES): "choose" picks it
    # on the validation targets of protocol R, which costs a training on the validation stage;
    # a policy's name fixes it without.
    seen_policy: Literal["choose", "all", "cart+purchase+rating", "purchase+rating"] = "choose"

    @field_validator("ann_kind")
    @classmethod
    def _known_kind(cls, v: str | None) -> str | None:
        from recsys.ann import KINDS  # imports FAISS: only when a kind is given
        if v is not None and v not in KINDS:
            raise ValueError(f"unknown ANN kind {v!r}: one of {', '.join(KINDS)}")
        return v


class RetrainingSettings(BaseModel):
    """The schedule, gate and lock of training/scheduler.py."""
    interval_s: float = 24 * 3600.0
    cron: str | None = None  # e.g. "0 3 * * *"; takes precedence over the interval
    min_new_events: int = 50_000  # new archived events since the current model's data that trigger a run
    window_days: float = 30.0  # sliding training window, back from the newest event; 0 = everything
    # Publish if the lower bound of the paired bootstrap 95% interval of (candidate - current)
    # HR@10 is above -gate_margin (absolute HR@10; non-inferiority, EVALUATION.md).
    gate_margin: float = 0.05
    gate_resamples: int = 1000
    lock_ttl_s: float = 30.0  # the run lock expires this long after its holder stops renewing it
    poll_s: float = 10.0


class OnlineSettings(BaseModel):
    """Online metrics: later events joined to the impressions that showed their items
    (recsys/attribution.py, `recsys online`)."""
    group: str = "online"  # the consumer group on the impressions and events topics
    window_s: float = Field(1800.0, gt=0)  # an event counts for an impression at most this much older
    attributable: tuple[EventType, ...] = (EventType.click, EventType.add_to_cart, EventType.purchase)
    # Records held per partition while the other topic catches up, before its fetching pauses.
    buffer_records: int = Field(5000, ge=10)
    # The guardrail (recsys.experiments.guardrail): every guard_every_s the consumer tests an A/B
    # experiment's arms' share of lists with a hit and ends the experiment when the candidate is
    # worse at false-stop rate guard_alpha; guard_effect is the mixture's scale, the size of loss
    # it is most sensitive to; it waits for guard_min_lists lists per arm.
    guard_alpha: float = Field(0.05, gt=0, lt=1)
    guard_effect: float = Field(0.02, gt=0)
    guard_min_lists: int = Field(200, ge=1)
    guard_every_s: float = Field(5.0, gt=0)


class MonitoringSettings(BaseModel):
    """Where each process serves its Prometheus metrics, and the local Prometheus that scrapes them
    (``recsys stack up --monitoring``; deploy/monitoring). 0 turns an endpoint off."""
    # Loopback here; a pod whose Prometheus runs in another pod binds all interfaces (0.0.0.0).
    bind_host: str = "127.0.0.1"
    stream_port: int = 28201  # the stream worker (also the load test's embedded one)
    archive_port: int = 28202
    scheduler_port: int = 28203
    online_port: int = 28204
    prometheus_port: int = 29090
    redis_exporter_port: int = 29121
    scrape_interval_s: float = 5.0


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RECSYS_", extra="ignore",
                                      env_nested_delimiter="_", env_nested_max_split=1)

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings) -> tuple[PydanticBaseSettingsSource, ...]:
        """Arguments, then the environment, the settings file, the stack's state (module docstring)."""
        return (init_settings, env_settings, _Layer(settings_cls, lambda higher: read_config()),
                _Layer(settings_cls, _stack_layer))

    # Where everything the local stack and the pipeline write lives (ignored by git).
    home: Path = Field(default=Path(".recsys"), description="state folder: stack data, archive, models")
    stack_cache: Path = Field(default=Path(".stack"), description="cached Kafka jars")
    archive_dir: Path = Field(default=Path(".recsys/archive"), description="Parquet event log")
    registry_dir: Path = Field(default=Path(".recsys/models"), description="model versions")
    # Secret values are never settings (settings travel to Serve replicas as plain JSON): each is
    # read from RECSYS_SECRET_<NAME> or from a file of this folder (recsys/secrets.py).
    secrets_dir: Path = Field(default=Path(".recsys/secrets"), description="secret files, mode 0600")

    auth: AuthSettings = AuthSettings()
    kafka: KafkaSettings = KafkaSettings()
    redis: RedisSettings = RedisSettings()
    features: FeatureSettings = FeatureSettings()
    ray: RaySettings = RaySettings()
    serving: ServingSettings = ServingSettings()
    training: TrainingSettings = TrainingSettings()
    retraining: RetrainingSettings = RetrainingSettings()
    monitoring: MonitoringSettings = MonitoringSettings()
    online: OnlineSettings = OnlineSettings()

    @field_validator("home", "stack_cache", "archive_dir", "registry_dir", "secrets_dir")
    @classmethod
    def _absolute(cls, path: Path) -> Path:
        """Absolute at load time, so Ray workers (another working directory) see the same folders."""
        return path.expanduser().resolve()

    def updated(self, **changes: Any) -> Settings:
        """A copy with ``changes``; a section takes a dict of its fields to change, e.g.
        ``s.updated(home=path, kafka={"events_topic": "t"})``. Validated like the environment."""
        data = self.model_dump()
        for name, value in changes.items():
            if name not in data:
                raise TypeError(f"Settings has no field {name!r}")
            data[name] = {**data[name], **value} if isinstance(value, dict) else value
        return Settings(**data)

    def environment(self) -> dict[str, str | None]:
        """These settings as ``RECSYS_*`` variables, for a child process; None for an unset field."""
        env = {}
        for name, value in self.model_dump(mode="json").items():
            fields = {f"{name}_{k}": v for k, v in value.items()} if isinstance(value, dict) else {name: value}
            env.update({f"RECSYS_{k.upper()}": None if v is None else json.dumps(v) if isinstance(v, (list, dict)) else str(v)
                        for k, v in fields.items()})
        return env


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()


# ---- the settings file and the stack's state ---------------------------------------------------

class _Layer(PydanticBaseSettingsSource):
    """A layer of settings from ``read(higher)``, a nested dict; ``higher``: what the layers above
    it set (the stack's state is found in the home folder they name)."""

    def __init__(self, settings_cls: type[BaseSettings], read):
        super().__init__(settings_cls)
        self.read = read

    def get_field_value(self, field, field_name: str) -> tuple[Any, str, bool]:
        return self().get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return self.read(self.current_state)


def config_file() -> Path | None:
    """The settings file in use: the one RECSYS_CONFIG names, else ./recsys.toml if there is one."""
    named = os.environ.get(CONFIG_ENV)
    if named:
        path = Path(named).expanduser()
        if not path.is_file():
            raise InvalidInput(f"{CONFIG_ENV}={named}: no such file")
        return path.resolve()
    return Path(CONFIG_FILE).resolve() if Path(CONFIG_FILE).is_file() else None


def read_config() -> dict[str, Any]:
    """The settings file's values as a nested dict ({} without a file); every key must be a setting."""
    path = config_file()
    if path is None:
        return {}
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise InvalidInput(f"settings file {path}: {exc}") from None
    for name, value in data.items():
        field = Settings.model_fields.get(name)
        if field is None:
            raise InvalidInput(f"settings file {path}: unknown key {name!r}: no such setting")
        section = field.annotation if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel) \
            else None
        if section is not None and isinstance(value, dict):
            for key in value:
                if key not in section.model_fields:
                    raise InvalidInput(f"settings file {path}: unknown key '{name}.{key}': no such setting")
    return data


def stack_state_path(home: Path) -> Path:
    return Path(home).expanduser().resolve() / STACK_STATE


def read_stack_state(home: Path) -> dict[str, Any]:
    """What ``recsys stack up`` recorded in this home folder ({} when the stack was not started)."""
    path = stack_state_path(home)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise InvalidInput(f"stack state {path}: {exc}; remove it, or run `recsys stack up` again") from None


def _stack_layer(higher: dict) -> dict[str, Any]:
    home = higher.get("home", Settings.model_fields["home"].default)
    return read_stack_state(home).get("settings", {})


def remember_stack(s: Settings, monitoring: bool) -> None:
    """Record how the stack was started, so later commands find it with no variables (stack.up).
    Monitoring once started stays remembered until ``forget_stack``."""
    monitoring = monitoring or bool(read_stack_state(s.home).get("monitoring"))
    state = {"settings": {section: {f: getattr(getattr(s, section), f) for f in fields}
                          for section, fields in STACK_FIELDS.items()}, "monitoring": monitoring}
    path = stack_state_path(s.home)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{STACK_STATE}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(state, indent=1) + "\n")
    tmp.replace(path)


def forget_stack(s: Settings) -> None:
    """The stack is down: nothing to remember (stack.down)."""
    stack_state_path(s.home).unlink(missing_ok=True)


# ---- what `recsys config show` prints ----------------------------------------------------------

SECRET_NAME = re.compile(r"(^|_)(password|passwd|secret|token|key|credentials?)$")


def shown(name: str, value: Any) -> Any:
    """A setting's value as printed: masked when its name says it is a secret."""
    return "********" if value is not None and SECRET_NAME.search(name.rsplit(".", 1)[-1]) else value


def describe(s: Settings | None = None) -> dict[str, dict[str, Any]]:
    """Every setting in effect by dotted name: its value (JSON form, secrets masked), the layer it
    came from (default, file, env, stack) and where (the file or the variable)."""
    s = s or Settings()
    env = EnvSettingsSource(Settings)()
    file, config = config_file(), read_config()
    state_path = stack_state_path(s.home)
    state = read_stack_state(s.home).get("settings", {})
    rows = {}
    for name, value in s.model_dump(mode="json").items():
        fields = {f"{name}.{k}": (name, k, v) for k, v in value.items()} if isinstance(value, dict) \
            else {name: (name, None, value)}
        for dotted, (top, key, v) in fields.items():
            def has(layer: dict) -> bool:
                return top in layer and (key is None or (isinstance(layer[top], dict) and key in layer[top]))
            if has(env):
                origin = ("env", "RECSYS_" + dotted.replace(".", "_").upper())
            elif has(config):
                origin = ("file", str(file))
            elif has(state):
                origin = ("stack", str(state_path))
            else:
                origin = ("default", None)
            rows[dotted] = {"value": shown(dotted, v), "source": origin[0], "from": origin[1]}
    return rows
