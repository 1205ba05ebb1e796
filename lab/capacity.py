"""``recsys capacity``: what a load takes, from the per-unit figures the benchmarks measured.

Pure functions, no I/O: the command line reads the saved bench results (``lab.bench.store``)
and hands them in. Every figure a plan rests on is a ``Figure`` with its source, one of

- ``measured: .recsys/bench/<name>.json (commit, date)``: a bench run here;
- ``default: README ...``: a figure the README publishes from an earlier run, used only with
  ``--assume-defaults`` (not measured on this machine);
- ``published: <reference>``: an outside figure (Kafka, Redis), with its reference;
- ``setting: ...``: the project's own configuration;
- ``assumed: ...``: a planning choice (target utilisation, headroom), or a value given on the
  command line;

and every row of the plan names the figures it uses.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from recsys.errors import InvalidInput, RecsysError


@dataclass(frozen=True)
class Load:
    rps: float  # recommendation requests per second
    users: int
    items: int
    events_per_s: float

    def __post_init__(self):
        for name, value in asdict(self).items():
            if not value > 0:
                raise InvalidInput(f"--{name.replace('_', '-')} must be above 0 (got {value})")


@dataclass(frozen=True)
class Figure:
    value: float
    unit: str
    source: str


class MissingFigures(RecsysError):
    """Some per-unit figure has no bench file (and no override); the message names the benches."""
    exit_code = 2


# ---- the figures each bench yields ---------------------------------------------------------------

BENCH_OF = {  # figure -> the bench that measures it
    "serve.cpu_ms_per_request": "serve", "serve.rps_per_replica": "serve",
    "stream.events_per_s_per_worker": "stream",
    "redis.bytes_per_user": "redis-memory", "redis.events_per_user": "redis-memory",
    "redis.bytes_per_item": "redis-memory", "redis.bytes_per_dedup_event": "redis-memory",
    "redis.cpu_us_per_event": "redis-memory", "redis.cpu_us_per_item_script": "redis-memory",
    "redis.cpu_us_per_request_user": "redis-memory", "redis.cpu_us_per_trending_read": "redis-memory",
    "kafka.record_bytes": "redis-memory",
    "ann.bytes_per_item": "ann", "ann.p99_ms": "ann", "ann.items_measured": "ann",
    "train.examples_per_s_per_worker": "train", "train.items_measured": "train",
}
OPTIONAL = ("train.items_measured",)  # context only: a missing one drops a note, not the plan
COMMAND_OF = {"serve": "recsys bench serve (after recsys demo)", "stream": "recsys bench stream",
              "redis-memory": "recsys bench redis-memory", "ann": "recsys bench ann",
              "train": "recsys bench train"}


def _measured_in(folder: str, name: str, saved: dict, what: str) -> str:
    return (f"measured: {folder}/{name}.json ({what}; commit {saved.get('commit') or 'unknown'}, "
            f"{saved.get('measured_at') or 'date unknown'})")


def _largest_with(sizes: dict, kind: str) -> tuple[int, dict] | None:
    rows = [(int(n), size["indexes"][kind]) for n, size in sizes.items() if kind in size.get("indexes", {})]
    return max(rows, key=lambda r: r[0]) if rows else None


def bench_figures(saved: dict[str, dict | None], ann_kind: str, folder: str = ".recsys/bench") -> dict[str, Figure]:
    """The per-unit figures in the saved bench results (name -> result, None when not run) of
    ``folder``. ``ann_kind``: the index kind a model of the plan's catalogue ships
    (``recsys.ann.default_kind``)."""
    out: dict[str, Figure] = {}

    def _measured(name: str, result: dict, what: str) -> str:
        return _measured_in(folder, name, result, what)
    serve = saved.get("serve")
    if serve and serve.get("variants", {}).get("c", {}).get("cpu_ms_per_request"):
        c = serve["variants"]["c"]
        what = f"variant c, recommendations behind HAProxy, {serve['replicas']} replicas, {c['rps']:,.0f} req/s"
        out["serve.cpu_ms_per_request"] = Figure(c["cpu_ms_per_request"], "CPU-ms/request", _measured("serve", serve, what))
        out["serve.rps_per_replica"] = Figure(round(c["rps"] / serve["replicas"], 1), "req/s per replica",
                                              _measured("serve", serve, what + ", closed-loop clients on the same cores"))
    stream = saved.get("stream")
    if stream and stream.get("worker_events_per_s"):
        out["stream.events_per_s_per_worker"] = Figure(
            stream["worker_events_per_s"], "events/s per worker",
            _measured("stream", stream, f"one worker, Kafka -> Redis, {stream['events']:,} events, mean of 2 runs"))
    mem = saved.get("redis-memory")
    if mem and mem.get("bytes_per_user"):
        what = f"MEMORY USAGE after {mem['events']:,} synthetic events, {mem['users']:,} users, {mem['items']:,} items"
        out["redis.bytes_per_user"] = Figure(mem["bytes_per_user"], "B/user", _measured("redis-memory", mem, what))
        out["redis.events_per_user"] = Figure(mem["events_per_user"]["mean"], "events/user",
                                              _measured("redis-memory", mem, "the history behind bytes per user"))
        out["redis.bytes_per_item"] = Figure(mem["bytes_per_item"], "B/item",
                                             _measured("redis-memory", mem, what + "; counts hash + trending share"))
        out["redis.bytes_per_dedup_event"] = Figure(mem["bytes_per_event_in_dedup_window"], "B/event in window",
                                                    _measured("redis-memory", mem, "MEMORY USAGE of the dedup markers"))
        by_script, by_part = mem.get("redis_cpu_us_per_event_by_script"), mem.get("redis_cpu_us_per_request_by_part")
        if by_script:
            out["redis.cpu_us_per_event"] = Figure(mem["redis_cpu_us_per_event"], "Redis CPU-us/event",
                                                   _measured("redis-memory", mem, "INFO commandstats, both scripts"))
            out["redis.cpu_us_per_item_script"] = Figure(by_script["item"], "Redis CPU-us/event",
                                                         _measured("redis-memory", mem, "INFO commandstats, the item script"))
        if by_part:
            out["redis.cpu_us_per_request_user"] = Figure(
                by_part["user"], "Redis CPU-us/request",
                _measured("redis-memory", mem, "INFO commandstats, the user's three keys"))
            out["redis.cpu_us_per_trending_read"] = Figure(
                by_part["per_trending_shard"], "Redis CPU-us/shard read",
                _measured("redis-memory", mem, "INFO commandstats, one shard's top 20 (ZREVRANGE)"))
        out["kafka.record_bytes"] = Figure(mem["kafka_record_bytes"]["mean"], "B/event",
                                           _measured("redis-memory", mem, "key + JSON value of the synthetic events"))
    ann = saved.get("ann")
    found = _largest_with(ann.get("sizes", {}), ann_kind) if ann else None
    if found:
        n, row = found
        what = f"{ann_kind} at {n:,} items, FAISS {ann.get('faiss', '?')}, one thread"
        out["ann.bytes_per_item"] = Figure(row["bytes_per_item"], "B/item", _measured("ann", ann, what))
        out["ann.p99_ms"] = Figure(row["p99_ms"], "ms/query", _measured("ann", ann, what + f", recall@10 {row['recall@10']}"))
        out["ann.items_measured"] = Figure(n, "items", _measured("ann", ann, "the largest catalogue measured"))
    train = saved.get("train")
    if train and train.get("examples_per_s_1_worker"):
        items = train.get("items")
        what = f"1 worker, {train.get('source', '?')}, {items:,} items" if items else "1 worker"
        out["train.examples_per_s_per_worker"] = Figure(train["examples_per_s_1_worker"], "examples/s per worker",
                                                        _measured("train", train, what))
        if items:
            out["train.items_measured"] = Figure(items, "items", _measured("train", train, "the catalogue trained"))
    return out


# ---- documented defaults: the README's own measured figures (--assume-defaults) ------------------

def _readme(where: str) -> str:
    return f"default: README {where} (not measured on this machine)"


_ANN_1M = {  # README "Benchmarks", recsys bench ann at 1,000,000 items: (bytes/item, p99 ms)
    "flat": (256, 15.619), "flat_int8": (64, 6.645), "ivf_flat": (265, 0.090), "ivf_fp16": (137, 0.081),
    "ivf_int8": (73, 0.090), "ivf_pq": (41, 0.126), "ivf_pq_refine": (297, 0.086), "hnsw": (528, 0.214)}
_ANN_WHERE = "'Benchmarks', recsys bench ann at 1,000,000 items, FAISS 1.15.0, one thread (commit 59bfc99, 2026-12-01)"
_REDIS_WHERE = ("'Capacity', recsys bench redis-memory: 100,000 synthetic events, 1,964 users, 996 items, "
                "Redis 7.0.15, the cluster-safe layout (commit 522bad1, 2026-12-01)")


# The README's figures of `recsys bench redis-memory` (section "Capacity"), for --assume-defaults.
REDIS_DEFAULTS = {"bytes_per_user": 1386.9, "events_per_user": 50.9, "bytes_per_item": 242.1, "bytes_per_dedup_event": 136.0,
                  "cpu_us_per_event": 38.17, "cpu_us_per_item_script": 16.11, "cpu_us_per_request_user": 16.54,
                  "cpu_us_per_trending_read": 12.87, "record_bytes": 154.4}


def default_figures(ann_kind: str) -> dict[str, Figure]:
    serve = ("'Benchmarks', recsys bench serve with API keys (the default): variant c, 2 replicas, 761 req/s "
             "on 2 cores shared with the clients (commit 867cf6b, 2026-11-29)")
    out = {
        "serve.cpu_ms_per_request": Figure(2.02, "CPU-ms/request", _readme(serve)),
        "serve.rps_per_replica": Figure(380.5, "req/s per replica", _readme(serve)),
        "stream.events_per_s_per_worker": Figure(
            17_520, "events/s per worker",
            _readme("'Benchmarks', recsys bench stream: 18,353 / 17,111 / 17,096 events/s in 3 runs on 2 cores, "
                    "their mean (commit 2653cd7, 2026-11-29)")),
        "redis.bytes_per_user": Figure(REDIS_DEFAULTS["bytes_per_user"], "B/user", _readme(_REDIS_WHERE)),
        "redis.events_per_user": Figure(REDIS_DEFAULTS["events_per_user"], "events/user", _readme(_REDIS_WHERE)),
        "redis.bytes_per_item": Figure(REDIS_DEFAULTS["bytes_per_item"], "B/item", _readme(_REDIS_WHERE)),
        "redis.bytes_per_dedup_event": Figure(REDIS_DEFAULTS["bytes_per_dedup_event"], "B/event in window",
                                              _readme(_REDIS_WHERE)),
        "redis.cpu_us_per_event": Figure(REDIS_DEFAULTS["cpu_us_per_event"], "Redis CPU-us/event",
                                         _readme(_REDIS_WHERE + ", INFO commandstats")),
        "redis.cpu_us_per_item_script": Figure(REDIS_DEFAULTS["cpu_us_per_item_script"], "Redis CPU-us/event",
                                               _readme(_REDIS_WHERE + ", INFO commandstats")),
        "redis.cpu_us_per_request_user": Figure(REDIS_DEFAULTS["cpu_us_per_request_user"], "Redis CPU-us/request",
                                                _readme(_REDIS_WHERE + ", INFO commandstats")),
        "redis.cpu_us_per_trending_read": Figure(REDIS_DEFAULTS["cpu_us_per_trending_read"], "Redis CPU-us/shard read",
                                                 _readme(_REDIS_WHERE + ", INFO commandstats")),
        "kafka.record_bytes": Figure(REDIS_DEFAULTS["record_bytes"], "B/event", _readme(_REDIS_WHERE)),
        "train.examples_per_s_per_worker": Figure(
            626, "examples/s per worker",
            _readme("'A million items end to end': 1,253 examples/s with 2 workers sharing 2 cores at 1,000,000 "
                    "items, halved (commit 59bfc99, 2026-12-01)")),
        "train.items_measured": Figure(1_000_000, "items", _readme("'A million items end to end'")),
    }
    if ann_kind in _ANN_1M:
        size, p99 = _ANN_1M[ann_kind]
        out["ann.bytes_per_item"] = Figure(size, "B/item", _readme(_ANN_WHERE + f", {ann_kind}"))
        out["ann.p99_ms"] = Figure(p99, "ms/query", _readme(_ANN_WHERE + f", {ann_kind}"))
        out["ann.items_measured"] = Figure(1_000_000, "items", _readme(_ANN_WHERE))
    return out


# ---- published figures and planning assumptions ---------------------------------------------------

PUBLISHED = {
    "kafka.partition_mb_per_s": Figure(
        10, "MB/s per partition",
        "published: Jun Rao (Confluent), 'How to choose the number of topics/partitions in a Kafka cluster?' "
        "(2015): 'one can produce at 10s of MB/sec on just a single partition'; the low end taken. "
        "https://www.confluent.io/blog/how-choose-number-topics-partitions-kafka-cluster/"),
    "kafka.broker_mb_per_s": Figure(
        67.5, "MB/s produced per broker",
        "published: Jay Kreps, 'Benchmarking Apache Kafka: 2 Million Writes Per Second (On Three Cheap Machines)' "
        "(LinkedIn Engineering, 2014): three producers, 3x asynchronous replication, 2,024,032 records/s of 100 B "
        "on 3 brokers = 67.5 MB/s per broker (acks=1; this project produces with acks=all). "
        "https://engineering.linkedin.com/kafka/benchmarking-apache-kafka-2-million-writes-second-three-cheap-machines"),
    "kafka.max_partitions_per_broker": Figure(
        4000, "partition replicas per broker",
        "published: KIP-578 'Add configuration to limit number of partitions' (Apache Kafka wiki): 'the current "
        "generic recommendation to have no more than 4000 partitions per broker and no more than 200000 "
        "partitions per cluster'"),
    "redis.max_shard_gb": Figure(
        25, "GB per shard",
        "published: Redis Cloud docs, 'Clustering Redis Databases': 'Multiple shards should be used when data "
        "grows to 25 GB'. https://redis.io/docs/latest/operate/rc/databases/configuration/clustering/"),
}

ASSUMED = {
    "target_cpu_utilisation": Figure(0.6, "share of a CPU", "assumed: planning choice; every CPU-bound count is "
                                                          "divided by it (the rest absorbs surges and a lost node)"),
    "memory_headroom": Figure(0.25, "share above the data", "assumed: planning choice; Redis memory is planned at "
                                                          "data x 1.25 (fragmentation, an AOF rewrite's fork, growth)"),
    "cpus_per_replica": Figure(1, "CPUs per replica", "assumed: one CPU per Serve replica"),
    "kafka.replication_factor": Figure(3, "copies", "assumed: the project's replicated Kafka (recsys stack up "
                                                     "--brokers 3: replication factor 3, min.insync.replicas 2)"),
    "redis.replicas_per_shard": Figure(1, "replicas per shard", "assumed: one replica per Redis primary"),
    "training.workers": Figure(8, "workers", "assumed: Ray Train workers for one run"),
    "training.scaling_efficiency": Figure(
        1.0, "of linear", "assumed: linear scaling across workers, so the time is a lower bound (bench train "
                          "measured 0.36 with 2 workers sharing 2 cores, not a cross-machine figure)"),
}


def settings_figures(settings, model_config) -> dict[str, Figure]:
    """The project's own configuration as figures: ``settings`` a ``recsys.settings.Settings``,
    ``model_config`` a ``recsys.model.ModelConfig``."""
    days = settings.retraining.window_days
    return {
        "features.dedup_ttl_s": Figure(settings.features.dedup_ttl_s, "s",
                                       f"setting: RECSYS_FEATURES_DEDUP_TTL_S={settings.features.dedup_ttl_s}"),
        "training.window_s": Figure(days * 86400, "s",
                                    f"setting: RECSYS_RETRAINING_WINDOW_DAYS={days:g}; examples per epoch assumed "
                                    "= events/s x window (every event an example)"),
        "training.interval_s": Figure(settings.retraining.interval_s, "s",
                                      f"setting: RECSYS_RETRAINING_INTERVAL_S={settings.retraining.interval_s:g}"),
        "model.dim": Figure(model_config.dim, "dims", f"setting: ModelConfig.dim={model_config.dim} (item rows)"),
        "model.user_dim": Figure(model_config.user_dim, "dims",
                                 f"setting: ModelConfig.user_dim={model_config.user_dim} (user id rows)"),
    }


def resolve(measured: dict[str, Figure], overrides: dict[str, Figure] | None = None, assume_defaults: bool = False,
            ann_kind: str = "ivf_int8", base: dict[str, Figure] | None = None) -> dict[str, Figure]:
    """Every figure the plan needs: ``base`` (published, assumed, settings), then what the benches
    measured, then ``overrides`` (``--figures``, ``--set``); a bench figure still missing comes
    from the README's defaults with ``assume_defaults``, else ``MissingFigures`` names the benches."""
    base = base or {}
    overrides = overrides or {}
    unknown = sorted(set(overrides) - set(base) - set(BENCH_OF))
    if unknown:
        raise InvalidInput(f"unknown figure {', '.join(unknown)}; known: {', '.join(sorted({*base, *BENCH_OF}))}")
    figures = {**base, **measured}
    units = {name: fig.unit for name, fig in {**default_figures(ann_kind), **figures}.items()}
    for name, fig in overrides.items():  # a value given without a unit keeps the figure's unit
        figures[name] = Figure(fig.value, fig.unit or units.get(name, ""), fig.source)
    missing = [name for name in BENCH_OF if name not in figures]
    if missing and assume_defaults:
        defaults = default_figures(ann_kind)
        figures.update({name: defaults[name] for name in missing if name in defaults})
        missing = [name for name in missing if name not in figures]
    required = [name for name in missing if name not in OPTIONAL]
    if required:
        benches = sorted({BENCH_OF[name] for name in required}, key=list(COMMAND_OF).index)
        raise MissingFigures(
            "no saved figures for " + ", ".join(required) + ". Run "
            + "; ".join(f"`{COMMAND_OF[b]}` (writes .recsys/bench/{b}.json"
                        + (f", with the {ann_kind} index this catalogue ships" if b == "ann" else "") + ")"
                        for b in benches)
            + ". Or give them with --figures FILE, or use the README's figures with --assume-defaults.")
    return figures



# ---- the plan ------------------------------------------------------------------------------------

def plan(load: Load, figures: dict[str, Figure]) -> dict:
    """The resources for ``load``. Each row: component, what, value, unit, how (the formula) and
    uses (the figures it rests on, each in ``figures`` with its source)."""
    f = {name: fig.value for name, fig in figures.items()}
    rows: list[dict] = []

    def row(component: str, what: str, value, unit: str, how: str, uses: list[str]):
        missing = [u for u in uses if u not in figures]
        if missing:
            raise MissingFigures(f"no figure {', '.join(missing)} for {what}")
        rows.append({"component": component, "what": what, "value": value, "unit": unit, "how": how,
                     "uses": uses, "sources": [figures[u].source for u in uses]})
        return value

    util, rf = f["target_cpu_utilisation"], f["kafka.replication_factor"]
    # Per-unit figures the plan rests on, as the issue names them.
    row("per unit", "requests per replica-CPU", round(1000 / f["serve.cpu_ms_per_request"], 1), "req/s per CPU",
        "1000 / CPU-ms per request (at full use of the CPU)", ["serve.cpu_ms_per_request"])
    per_partition = f["kafka.partition_mb_per_s"] * 1e6 / f["kafka.record_bytes"]
    row("per unit", "events/s per partition", round(per_partition), "events/s",
        "partition MB/s / record bytes", ["kafka.partition_mb_per_s", "kafka.record_bytes"])

    # Serving
    cpus = row("serving", "CPUs", math.ceil(load.rps * f["serve.cpu_ms_per_request"] / 1000 / util), "CPUs",
               "rps x CPU-ms per request / 1000 / target utilisation",
               ["serve.cpu_ms_per_request", "target_cpu_utilisation"])
    replicas = row("serving", "replicas", math.ceil(cpus / f["cpus_per_replica"]), "replicas",
                   "CPUs / CPUs per replica", ["serve.cpu_ms_per_request", "target_cpu_utilisation", "cpus_per_replica"])
    row("serving", "requests/s per replica", round(load.rps / replicas, 1), "req/s",
        "rps / replicas (compare: the bench's req/s per replica)", ["serve.cpu_ms_per_request", "serve.rps_per_replica"])

    # Stream workers, Kafka
    workers = row("stream", "stream workers", math.ceil(load.events_per_s / (f["stream.events_per_s_per_worker"] * util)),
                  "processes", "events/s / (events/s per worker x target utilisation)",
                  ["stream.events_per_s_per_worker", "target_cpu_utilisation"])
    ingress = row("kafka", "ingress", round(load.events_per_s * f["kafka.record_bytes"] / 1e6, 2), "MB/s",
                  "events/s x record bytes (key + value; Kafka's batch framing adds a little)", ["kafka.record_bytes"])
    by_bytes = math.ceil(ingress / (f["kafka.partition_mb_per_s"] * util))
    partitions = row("kafka", "partitions", max(by_bytes, workers), "partitions",
                     f"max(ingress / (partition MB/s x utilisation) = {by_bytes}, one per stream worker = {workers})",
                     ["kafka.record_bytes", "kafka.partition_mb_per_s", "target_cpu_utilisation",
                      "stream.events_per_s_per_worker"])
    by_throughput = math.ceil(ingress / (f["kafka.broker_mb_per_s"] * util))
    by_count = math.ceil(partitions * rf / f["kafka.max_partitions_per_broker"])
    row("kafka", "brokers", max(int(rf), by_throughput, by_count), "brokers",
        f"max(replication factor = {rf:g}, ingress / (broker MB/s x utilisation) = {by_throughput}, "
        f"partitions x replication factor / max per broker = {by_count})",
        ["kafka.replication_factor", "kafka.broker_mb_per_s", "kafka.max_partitions_per_broker", "kafka.record_bytes",
         "target_cpu_utilisation"])

    # Redis
    gb = 1e9
    users_gb = row("redis", "user features", round(load.users * f["redis.bytes_per_user"] / gb, 2), "GB",
                   "users x bytes per user", ["redis.bytes_per_user", "redis.events_per_user"])
    items_gb = row("redis", "item features and trending", round(load.items * f["redis.bytes_per_item"] / gb, 2), "GB",
                   "items x bytes per item", ["redis.bytes_per_item"])
    dedup_gb = row("redis", "dedup markers", round(load.events_per_s * f["features.dedup_ttl_s"]
                                                   * f["redis.bytes_per_dedup_event"] / gb, 2), "GB",
                   "events/s x dedup TTL x bytes per marker", ["redis.bytes_per_dedup_event", "features.dedup_ttl_s"])
    memory = row("redis", "memory (primaries)", round((users_gb + items_gb + dedup_gb) * (1 + f["memory_headroom"]), 1),
                 "GB", "(users + items + dedup) x (1 + memory headroom)",
                 ["redis.bytes_per_user", "redis.bytes_per_item", "redis.bytes_per_dedup_event", "memory_headroom"])
    # Items spread only over the trending shards: enough of them that no primary's share of the
    # item scripts passes the target utilisation of its core.
    trending = row("redis", "trending shards", max(1, math.ceil(load.events_per_s * f["redis.cpu_us_per_item_script"]
                                                                / 1e6 / util)), "sorted sets",
                   "events/s x item script us / 1e6 / utilisation (RECSYS_REDIS_TRENDING_SHARDS); "
                   "a request reads every shard's top items", ["redis.cpu_us_per_item_script", "target_cpu_utilisation"])
    per_request = f["redis.cpu_us_per_request_user"] + trending * f["redis.cpu_us_per_trending_read"]
    cores = row("redis", "Redis CPU", round((load.events_per_s * f["redis.cpu_us_per_event"]
                                             + load.rps * per_request) / 1e6, 2), "cores",
                f"(events/s x us per event + rps x (user's keys us + {trending} x shard read us = "
                f"{per_request:.1f} us)) / 1e6",
                ["redis.cpu_us_per_event", "redis.cpu_us_per_request_user", "redis.cpu_us_per_trending_read"])
    by_memory, by_cpu = math.ceil(memory / f["redis.max_shard_gb"]), math.ceil(cores / util)
    shards = row("redis", "shards", max(by_memory, by_cpu, trending, 1), "primaries",
                 f"max(memory / max shard GB = {by_memory}, Redis CPU / utilisation = {by_cpu}, "
                 f"trending shards = {trending}) (one core each)",
                 ["redis.max_shard_gb", "memory_headroom", "redis.cpu_us_per_event", "redis.cpu_us_per_request_user",
                  "target_cpu_utilisation"])
    row("redis", "memory with replicas", round(memory * (1 + f["redis.replicas_per_shard"]), 1), "GB",
        f"memory x (1 + replicas per shard); {shards} primaries + {shards * int(f['redis.replicas_per_shard'])} replicas",
        ["redis.replicas_per_shard", "memory_headroom", "redis.bytes_per_user"])

    # Index and model per replica
    index_gb = row("replica", "ANN index", round(load.items * f["ann.bytes_per_item"] / gb, 2), "GB",
                   "items x index bytes per item", ["ann.bytes_per_item", "ann.items_measured"])
    tower_gb = row("replica", "user tower tables (int8)", round((load.users * (f["model.user_dim"] + 4)
                                                                 + load.items * (f["model.dim"] + 4)) / gb, 2), "GB",
                   "users x (user_dim + 4) + items x (dim + 4): int8 codes + a fp32 scale per row",
                   ["model.user_dim", "model.dim"])
    row("replica", "model memory per replica", round(index_gb + tower_gb, 2), "GB", "index + tower tables",
        ["ann.bytes_per_item", "model.user_dim", "model.dim"])
    row("replica", "ANN p99 per query", f["ann.p99_ms"], "ms", "as measured at the largest catalogue, one thread",
        ["ann.p99_ms", "ann.items_measured"])

    # Training
    examples = row("training", "examples per epoch", round(load.events_per_s * f["training.window_s"]), "examples",
                   "events/s x window", ["training.window_s"])
    one = examples / f["train.examples_per_s_per_worker"]
    row("training", "epoch on one worker", _hours(one), "hours", "examples / examples/s per worker",
        ["training.window_s", "train.examples_per_s_per_worker"])
    row("training", f"epoch on {f['training.workers']:g} workers",
        _hours(one / (f["training.workers"] * f["training.scaling_efficiency"])), "hours",
        "epoch on one worker / (workers x scaling efficiency)",
        ["training.window_s", "train.examples_per_s_per_worker", "training.workers", "training.scaling_efficiency"])
    row("training", "workers for one epoch per retraining interval",
        math.ceil(one / (f["training.interval_s"] * f["training.scaling_efficiency"])), "workers",
        "epoch on one worker / (interval x scaling efficiency)",
        ["training.window_s", "train.examples_per_s_per_worker", "training.interval_s", "training.scaling_efficiency"])

    used = sorted({u for r in rows for u in r["uses"]})
    return {"load": asdict(load), "plan": rows,
            "figures": {name: asdict(figures[name]) for name in used},
            "notes": notes(load, figures)}


def _hours(seconds: float) -> float:
    hours = seconds / 3600
    return round(hours) if hours >= 100 else round(hours, 1)


def notes(load: Load, figures: dict[str, Figure]) -> list[str]:
    """What the figures do not carry over to this load."""
    f = {name: fig.value for name, fig in figures.items()}
    out = [
        "Redis shards: each event runs one script in its user's hash slot and one in its item's trending shard "
        "(README 'Online feature layout'), so users spread over every primary and items over the trending "
        "shards; every request reads every shard's top items, so more trending shards than the item writes need "
        "cost request CPU. Trending changes slowly (a 24 h half-life): a replica could cache the merged top "
        "items for a second and take those reads off Redis.",
        f"Bytes per user grow with a user's distinct items (the seen set has no bound); measured at "
        f"{f.get('redis.events_per_user', 0):g} events per user on average.",
        "Kafka: the archiver (a second consumer group) reads the topic again; its rate is not measured here.",
    ]
    ann_n = f.get("ann.items_measured")
    if ann_n and load.items > 2 * ann_n:
        out.append(f"ANN: bytes and p99 measured at {ann_n:,.0f} items, the plan has {load.items:,}. An IVF index's "
                   "bytes per item barely change with n (codes + an 8-byte id); its search time grows about as "
                   "sqrt(n) at a fixed nprobe, and items without interactions need far more probes (README 'A million "
                   "items end to end': 2.39 ms per query at 1M such items).")
    train_n = f.get("train.items_measured")
    if train_n and load.items > 2 * train_n:
        out.append(f"Training: examples/s measured at {train_n:,.0f} items; tf_keras's Adam updates the whole "
                   f"embedding table each step (README 'A million items end to end'), so at {load.items:,} items "
                   "expect a lower rate.")
    elif not train_n:
        out.append("Training: the catalogue of the training figure is not known; its rate falls with the catalogue.")
    return out


def format_plan(result: dict) -> str:
    """The plan as text: the rows, then the figures with their sources, then the notes."""
    load = result["load"]
    lines = [f"Capacity for {load['rps']:,.0f} req/s, {load['users']:,} users, {load['items']:,} items, "
             f"{load['events_per_s']:,.0f} events/s", ""]
    table = [("component", "what", "value", "how")]
    for r in result["plan"]:
        table.append((r["component"], r["what"], f"{_number(r['value'])} {r['unit']}", r["how"]))
    widths = [max(len(t[i]) for t in table) for i in range(3)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(t[:3], widths)) + "  " + t[3] for t in table]
    lines += ["", "Figures:"]
    width = max(len(n) for n in result["figures"])
    for name, fig in result["figures"].items():
        lines.append(f"  {name:<{width}}  {_number(fig['value']):>12} {fig['unit']}")
        lines.append(f"  {'':<{width}}  {fig['source']}")
    lines += ["", "Notes:"] + [f"  - {n}" for n in result["notes"]]
    return "\n".join(lines)


def _number(value: float) -> str:
    """1,234 for whole numbers, else at most 3 decimals without trailing zeros."""
    if float(value).is_integer():
        return f"{int(value):,}"
    return f"{value:,.3f}".rstrip("0").rstrip(".")


def parse_overrides(data: dict, label: str) -> dict[str, Figure]:
    """``--figures FILE``: ``{"name": {"value": v, "source": "...", "unit": "..."}}``; every figure
    needs its source."""
    out = {}
    if not isinstance(data, dict):
        raise InvalidInput(f"{label}: a JSON object of figures, e.g. "
                           '{"serve.cpu_ms_per_request": {"value": 2.0, "source": "..."}}')
    for name, item in data.items():
        if not isinstance(item, dict) or not isinstance(item.get("value"), (int, float)) or not item.get("source"):
            raise InvalidInput(f"{label}: figure {name!r} needs a numeric value and a source")
        out[name] = Figure(item["value"], item.get("unit", ""), f"{item['source']} (from {label})")
    return out


def parse_set(pairs: list[str]) -> dict[str, Figure]:
    """``--set name=value``: a figure given on the command line, marked assumed."""
    out = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        try:
            number = float(value)
        except ValueError:
            number = None
        if not sep or not name or number is None:
            raise InvalidInput(f"--set {pair!r}: give NAME=NUMBER, e.g. target_cpu_utilisation=0.5")
        out[name] = Figure(number, "", f"assumed: --set {name}={value} on the command line")
    return out
