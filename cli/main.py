"""The ``recsys`` command line.

Habits every command shares: ``-v`` before or after the command; ``--json`` wherever a
command can print JSON (one JSON line on stdout; commands that print only JSON accept it
too); ``recsys --version``; and distinct exit codes, listed in ``recsys --help`` and in
``recsys.errors``: 0 ok, 1 failed, 2 usage or bad input, 69 service unavailable, 70 internal
error, 130 interrupted.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from pathlib import Path

from recsys.errors import EXIT_CODES, INTERNAL, UNAVAILABLE, InvalidInput, RecsysError, exit_code
from recsys.settings import describe, get_settings, read_stack_state
from loadtest.cli import register as register_loadtest
from lab.bench.train import add_bench_gate_options, add_bench_train_options
from training.cli import register as register_training


def quiet_native_stderr(log_file: Path) -> None:
    """Quiet by default: what native code writes to file descriptor 2 (TensorFlow's absl lines,
    gRPC's, Ray's core) is appended to ``log_file``, and so is the stderr of child processes;
    Python's ``sys.stderr`` (messages, logging, tracebacks, progress bars) keeps the terminal."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    terminal = os.dup(2)
    fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stderr = os.fdopen(terminal, "w", buffering=1)


def _print(obj, as_json: bool) -> None:
    if as_json:
        print(json.dumps(obj, default=str))
    else:
        for key, value in obj.items():
            print(f"{key}: {json.dumps(value, default=str) if isinstance(value, (dict, list)) else value}")


def cmd_stack(args) -> int:
    from lab import stack
    settings = get_settings()
    if args.brokers is not None:
        settings = settings.updated(kafka={"brokers": args.brokers})
    if args.redis_cluster is not None:
        settings = settings.updated(redis={"cluster_masters": args.redis_cluster})
    if args.action == "up":  # monitoring, once started, comes back with the stack until `stack down`
        monitoring = args.monitoring or bool(read_stack_state(settings.home).get("monitoring"))
        result = stack.up(settings, progress=lambda msg: print(msg, file=sys.stderr), monitoring=monitoring)
    elif args.action == "down":
        result = stack.down(settings)
    else:
        result = stack.status(settings)
    monitoring = result.get("monitoring")
    targets = monitoring.pop("targets", []) if isinstance(monitoring, dict) and not args.json else []
    _print(result, args.json)
    for t in targets:  # Prometheus's scrape targets, one line each
        print(f"  scrape {t['job']:<10} {t['address']:<16} {t['health']}{'  ' + t['error'] if t.get('error') else ''}")
    return 0


def cmd_config(args) -> int:
    rows = describe(get_settings())
    if args.json:
        print(json.dumps(rows))
        return 0
    width = max(map(len, rows))
    for name, row in rows.items():
        value = row["value"] if isinstance(row["value"], str) else json.dumps(row["value"])
        print(f"{name:<{width}}  {value}  ({row['source']}{' ' + row['from'] if row['from'] else ''})")
    return 0


def open_source_from(args):
    from recsys.sources import open_source
    return open_source(args.source, args.user_col, args.item_col, args.ts_col)


def cmd_replay(args) -> int:
    from recsys.kafka_io import replay
    from recsys.privacy import Pseudonyms
    from recsys.sources import SyntheticSource
    source = open_source_from(args)
    total = source.events if isinstance(source, SyntheticSource) else None
    settings = get_settings()
    result = replay(Pseudonyms.of(settings).events(source.events_iter()), settings, rate=args.rate, limit=args.limit,
                    total=total, progress=not args.quiet)
    print(json.dumps({**result, "source": args.source}))
    return 0


def _serve_metrics(port: int, what: str) -> None:
    """This process's Prometheus metrics on RECSYS_MONITORING_BIND_HOST:port (none for 0)."""
    from recsys import metrics
    host = get_settings().monitoring.bind_host
    try:
        metrics.serve(port, host)
    except OSError as exc:
        raise RecsysError(f"cannot serve the {what}'s metrics on {host}:{port} ({exc.strerror}); another "
                          f"{what} on this machine? Give it --metrics-port (0: none)") from None


def cmd_stream(args) -> int:
    from recsys.stream import run_stream
    settings = get_settings()
    _serve_metrics(_port(args.metrics_port, settings.monitoring.stream_port), "stream worker")
    print(json.dumps(run_stream(settings, until_idle=args.until_idle)))
    return 0


def cmd_online(args) -> int:
    from recsys.attribution import report, run_online
    settings = get_settings()
    if args.action == "report":
        _print(report(settings), args.json)
        return 0
    _serve_metrics(_port(args.metrics_port, settings.monitoring.online_port), "online consumer")
    print(json.dumps(run_online(settings, until_idle=args.until_idle)))
    return 0


def cmd_archive(args) -> int:
    from recsys.archive import run_archiver
    settings = get_settings()
    _serve_metrics(_port(args.metrics_port, settings.monitoring.archive_port), "archiver")
    print(json.dumps(run_archiver(settings, until_idle=args.until_idle)))
    return 0


def _port(given: int | None, default: int) -> int:
    return default if given is None else given


def cmd_features(args) -> int:
    from recsys.feature_store import FeatureStore
    if args.kind == "rebuild":
        from recsys.rebuild import rebuild_features
        _print(rebuild_features(get_settings(), progress=lambda msg: print(msg, file=sys.stderr)), args.json)
        return 0
    if not args.id:
        raise InvalidInput(f"give the {args.kind} id")
    store = FeatureStore(get_settings())
    if args.kind == "user":
        from recsys.privacy import Pseudonyms
        result = store.user(Pseudonyms.of(store.settings).user_id(args.id)).to_json()
    else:
        result = {"item_id": args.id, "counts": store.item_counts(args.id),
                  "trending_log_score": store.trending_score(args.id)}
    _print(result, args.json)
    return 0


def cmd_keys(args) -> int:
    from recsys.auth import KeyStore, parse_scopes
    from recsys.feature_store import connect
    settings = get_settings()
    store = KeyStore(settings, connect(settings))
    if args.action == "create":
        if not args.name or not args.scopes:
            raise InvalidInput("create: give --name and --scopes")
        made = store.create(args.name, parse_scopes(args.scopes), args.rate, args.burst)
        print("the key is shown this once; keep it in a secret store", file=sys.stderr)
        _print(made, args.json)
    elif args.action == "revoke":
        if not args.id:
            raise InvalidInput("revoke: give the key's id (recsys keys list)")
        _print({"revoked": store.revoke(args.id)}, args.json)
    else:
        keys = store.list()
        if args.json:
            print(json.dumps(keys))
        for k in [] if args.json else keys:
            print(f"{k['id']}  {k['name']:<20} {','.join(k['scopes']):<28} {k['rate_per_s']:g}/s burst {k['burst']}")
    return 0


def cmd_users(args) -> int:
    """Ids from stdin, one a line (``--stdin``), stay out of the process list and the shell's
    history; one on the command line still works, with a warning."""
    from recsys.erasure import forget_user
    if (args.id is None) != args.stdin:
        raise InvalidInput("users forget: give the ids on stdin, one a line (--stdin), or one ID, not both")
    if args.id is not None:
        print("recsys users: an id on the command line shows in the process list and the shell's history; "
              "prefer: recsys users forget --stdin < ids", file=sys.stderr)
    ids = [args.id] if args.id is not None else [line.rstrip("\r\n") for line in sys.stdin]
    settings = get_settings()
    for raw_id in filter(None, ids):
        _print(forget_user(settings, raw_id), args.json)
    return 0


def cmd_chaos(args) -> int:
    from lab.chaos.scenarios import run_chaos
    result = run_chaos(get_settings(), args.scenario, progress=lambda msg: print(msg, file=sys.stderr))
    _print(result, args.json)
    return 0 if result["passed"] else 1


def _save_bench(settings, name: str, result: dict) -> None:
    """Keep a bench's result for `recsys capacity` (<home>/bench/<name>.json), said on stderr."""
    from lab.bench import store as bench_store
    print(f"saved {bench_store.save(settings, name, result)}", file=sys.stderr)


def cmd_bench_stream(args) -> int:
    from lab.bench.stream import bench_stream
    settings = get_settings()
    result = bench_stream(settings, events=args.events, steady_rate=args.rate, steady_seconds=args.seconds)
    _save_bench(settings, "stream", result)
    _print(result, args.json)
    return 0


def cmd_bench_redis_memory(args) -> int:
    from lab import stack
    from lab.bench.redis_memory import bench, format_table
    settings = get_settings()
    progress = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    stack.start_redis(settings, progress=progress)
    result = bench(settings, events=args.events, users=args.users, items=args.items, seed=args.seed, reads=args.reads,
                   progress=progress)
    _save_bench(settings, "redis-memory", result)
    if args.json:
        print(json.dumps(result))
    else:
        print(format_table(result))
    return 0


def cmd_capacity(args) -> int:
    from lab import capacity
    from lab.bench import store as bench_store
    from recsys.ann import default_kind
    from recsys.model import ModelConfig
    settings = get_settings()
    load = capacity.Load(args.rps, args.users, args.items, args.events_per_s)
    t = settings.training
    kind = t.ann_kind or default_kind(args.items, t.item_precision, t.ann_exact_below)
    overrides = {}
    if args.figures:
        try:
            data = json.loads(Path(args.figures).read_text())
        except (OSError, ValueError) as exc:
            raise InvalidInput(f"--figures {args.figures}: {exc}") from None
        overrides.update(capacity.parse_overrides(data, args.figures))
    overrides.update(capacity.parse_set(args.set))
    folder = bench_store.path(settings, "x").parent
    try:
        folder_label = str(folder.relative_to(Path.cwd()))
    except ValueError:
        folder_label = str(folder)
    saved = {name: bench_store.load(settings, name) for name in bench_store.BENCHES}
    base = {**capacity.PUBLISHED, **capacity.ASSUMED, **capacity.settings_figures(settings, ModelConfig())}
    figures = capacity.resolve(capacity.bench_figures(saved, kind, folder_label), overrides, args.assume_defaults,
                               kind, base)
    result = {**capacity.plan(load, figures), "ann_kind": kind}
    print(json.dumps(result) if args.json else capacity.format_plan(result))
    return 0


def cmd_serve(args) -> int:
    from lab import serve_local as deploy
    settings = get_settings()
    if args.action == "up":
        from lab import stack
        stack.up(settings, progress=lambda msg: print(msg, file=sys.stderr))
        result = deploy.serve_up(settings, progress=lambda msg: print(msg, file=sys.stderr))
    elif args.action == "down":
        result = deploy.serve_down(settings)
    else:
        result = deploy.serve_status(settings)
    _print(result, args.json)
    return 0


def cmd_bench_new_items(args) -> int:
    from lab.bench.new_items import DEFAULT_SOURCE, bench
    result = bench(get_settings(), args.source or DEFAULT_SOURCE, args.new_share, epochs=args.epochs,
                   progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    if args.json:
        print(json.dumps(result))
    else:
        for model, f in result["figures"].items():
            print(f"{model:18s} new items HR@10 {f['new_items']['hr@10']:.4f} HR@50 {f['new_items']['hr@50']:.4f} | "
                  f"all targets HR@10 {f['all']['hr@10']:.4f} HR@50 {f['all']['hr@50']:.4f}")
        print(f"{result['new_item_targets']} of {result['test_targets']} test targets are new items; content head / full "
              f"retrain HR@50 {result['content_vs_full_hr@50']}; {'PASS' if result['passed'] else 'FAIL'}")
    return 0 if result["passed"] else 1


def cmd_bench_ann(args) -> int:
    from recsys.ann import default_kind
    from lab.bench.ann import KINDS, bench, format_table
    settings = get_settings()
    result = bench(args.items, queries=args.queries, tuning_queries=args.tuning_queries,
                   kinds=tuple(args.kinds or KINDS), spread=args.spread,
                   progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    t = settings.training  # the kind a model of each size ships, and its figures
    result["default_kinds"] = {
        n: {"kind": kind, **{k: size["indexes"][kind][k] for k in ("bytes_per_item", "p99_ms", "recall@10")}}
        for n, size in result["sizes"].items()
        for kind in [t.ann_kind or default_kind(int(n), t.item_precision, t.ann_exact_below)]
        if kind in size["indexes"]}
    _save_bench(settings, "ann", result)
    if args.json:
        print(json.dumps(result))
    else:
        print(format_table(result))
        print(json.dumps({"targets": result["targets"], "passed": result["passed"]}))
    return 1 if args.check and not result["passed"] else 0


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(s.replace("_", "")) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: item counts separated by commas, e.g. 10000,100000") from None
    if min(sizes) < 1000:
        raise argparse.ArgumentTypeError("at least 1000 items per size")
    return sizes


def cmd_bench_compression(args) -> int:
    from lab.bench.train import default_ml100k
    from lab.bench.compression import bench, format_table
    sources = args.sources or [f"movielens:{default_ml100k()}", "synthetic"]
    result = bench(sources, get_settings(), workers=args.workers, epochs=args.epochs,
                   progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    if args.json:
        print(json.dumps(result))
    else:
        print(format_table(result))
        print(json.dumps({k: result[k] for k in ("int8_relative_hr@10_loss", "max_int8_loss", "passed")}))
    return 1 if args.check and not result["passed"] else 0


def cmd_bench_data(args) -> int:
    from lab.bench.data import bench
    result = bench(get_settings(), [int(n) for n in args.events.split(",")], args.users_per_event,
                   progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    _print(result, args.json)
    return 1 if args.check and not result["pass"] else 0


def cmd_bench_serve(args) -> int:
    from lab.bench.serve import bench_serve
    settings = get_settings()
    result = bench_serve(settings, replicas=args.replicas, concurrency=args.concurrency, seconds=args.seconds,
                         levers=args.levers, progress=lambda msg: print(msg, file=sys.stderr))
    _save_bench(settings, "serve", result)
    _print(result, args.json)
    return 1 if args.check and not result["pass"] else 0


def cmd_bench_reaction(args) -> int:
    from lab.bench.reaction import bench_reaction
    settings = get_settings()
    result = bench_reaction(settings, users=args.users, concurrency=args.concurrency, background=args.background,
                            timeout_s=args.timeout_s, p99_budget_ms=args.p99_budget_ms,
                            progress=lambda msg: print(msg, file=sys.stderr))
    _save_bench(settings, "reaction", result)
    _print(result, args.json)
    return 1 if args.check and not result["passed"] else 0


def cmd_bench_freshness(args) -> int:
    from lab.bench.freshness import bench_freshness, default_sources
    settings = get_settings()
    result = bench_freshness(settings, args.source or default_sources(), workers=args.workers, epochs=args.epochs,
                             progress=lambda msg: print(msg, file=sys.stderr))
    _print(result, args.json)
    return 1 if args.check and not result["passed"] else 0


def cmd_bench_report(args) -> int:
    from lab.bench.report import write
    _print(write(get_settings(), *([Path(args.out)] if args.out else [])), args.json)
    return 0


def cmd_retrain_now(args) -> int:
    from training.scheduler import run_once
    record = run_once(get_settings(), trigger="manual")  # Busy: exit 1, through main
    _print(record, args.json)
    return 0 if record["decision"] != "failed" else 1


def cmd_scheduler(args) -> int:
    from prometheus_client import REGISTRY
    from training.scheduler import SchedulerMetrics, run_scheduler
    settings = get_settings()
    metrics = SchedulerMetrics(settings)
    REGISTRY.register(metrics)
    _serve_metrics(_port(args.metrics_port, settings.monitoring.scheduler_port), "scheduler")
    run_scheduler(settings, max_runs=args.max_runs, metrics=metrics)
    return 0


def cmd_top(args) -> int:
    from cli.top import run
    try:
        return run(get_settings(), once=args.once, as_json=args.json)
    except KeyboardInterrupt:
        return 0


def cmd_demo(args) -> int:
    from cli.demo import run_demo
    return run_demo(get_settings(), events=args.events, epochs=args.epochs)


def _source_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", default="synthetic",
                   help="synthetic[:events=N,users=N,items=N,seed=N,...] | movielens:DIR | csv:PATH")
    p.add_argument("--user-col", default="user_id", help="csv: the user column")
    p.add_argument("--item-col", default="item_id", help="csv: the item column")
    p.add_argument("--ts-col", default="timestamp", help="csv: the timestamp column (seconds or ms)")


VERBOSE_HELP = ("log at INFO level, with TensorFlow's, Ray's and kafka-python's lines (default: warnings only; "
                "native stderr to .recsys/logs/native-stderr.log); before or after the command")
ONLY_JSON_HELP = "one JSON line (what it prints anyway; accepted for scripts that pass --json to every command)"


class CommandParser(argparse.ArgumentParser):
    """A command's parser: it takes -v too, so ``recsys stream -v`` works like ``recsys -v stream``.
    Its default is SUPPRESS, so a command without -v leaves the main parser's value as it was."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as package_version
    try:
        return package_version("recsys")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    epilog = "exit codes:\n" + "\n".join(f"  {code:<4} {meaning}" for code, meaning in EXIT_CODES.items())
    parser = argparse.ArgumentParser(prog="recsys", description="Real-time recommendation reference application.",
                                     epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    parser.add_argument("--version", action="version", version=f"recsys {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=CommandParser)

    p = sub.add_parser("stack", help="start, stop or inspect the local Kafka + Redis stack (+ Prometheus)")
    p.add_argument("action", choices=["up", "down", "status"])
    p.add_argument("--monitoring", action="store_true",
                   help="up: also Prometheus and the Redis exporter (deploy/monitoring; status lists the scrape "
                        "targets); remembered: a later `stack up` starts them again until `stack down`")
    p.add_argument("--brokers", type=int, default=None,
                   help="Kafka nodes: 3 runs a replicated cluster (replication factor 3, min.insync.replicas 2); "
                        "default kafka.brokers (1). Remembered in <home>/stack.json until `stack down`: later "
                        "commands find them all with no RECSYS_KAFKA_BROKERS")
    p.add_argument("--redis-cluster", type=int, default=None, metavar="N",
                   help="a Redis Cluster of N masters (3 or more) on the Redis port, + 100, ...; default "
                        "redis.cluster_masters (0: one Redis). Remembered like --brokers: later commands use a "
                        "cluster client with no RECSYS_REDIS_CLUSTER_MASTERS")
    p.add_argument("--json", action="store_true", help="one JSON line")
    p.set_defaults(func=cmd_stack)

    p = sub.add_parser("config", help="every setting in effect, with where it came from: env (the variable), "
                                      "file (recsys.toml or $RECSYS_CONFIG), stack (how `stack up` started it) "
                                      "or default; secrets masked")
    p.add_argument("action", choices=["show"])
    p.add_argument("--json", action="store_true",
                   help='one JSON line: {"kafka.brokers": {"value": 3, "source": "stack", "from": PATH}, ...}')
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("replay", help="produce a source's events into Kafka, in time order")
    _source_options(p)
    p.add_argument("--rate", type=float, default=0.0, help="events per second, 0 for as fast as possible")
    p.add_argument("--limit", type=int, default=None, help="stop after N events")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help=ONLY_JSON_HELP)
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("stream", help="consume events into the Redis online features")
    p.add_argument("--until-idle", type=float, default=None, metavar="SECONDS",
                   help="exit after this many seconds without new records")
    p.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                   help="serve Prometheus metrics on 127.0.0.1:PORT (default RECSYS_MONITORING_*_PORT; 0: none)")
    p.add_argument("--json", action="store_true", help=ONLY_JSON_HELP)
    p.set_defaults(func=cmd_stream)

    p = sub.add_parser("online", help="online metrics: run the consumer that joins events to the impressions that "
                                      "showed their items, or report CTR@k, hit rate and hit ranks per model and arm")
    p.add_argument("action", choices=["run", "report"])
    p.add_argument("--until-idle", type=float, default=None, metavar="SECONDS",
                   help="run: exit after this many seconds without records (default: run until SIGTERM)")
    p.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                   help="run: Prometheus metrics on this port (default RECSYS_MONITORING_ONLINE_PORT; 0: none)")
    p.add_argument("--json", action="store_true", help="report: one JSON line (run prints one JSON line anyway)")
    p.set_defaults(func=cmd_online)

    p = sub.add_parser("archive", help="append events to the Parquet event log for training")
    p.add_argument("--until-idle", type=float, default=None, metavar="SECONDS",
                   help="exit after this many seconds without new records")
    p.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                   help="serve Prometheus metrics on 127.0.0.1:PORT (default RECSYS_MONITORING_*_PORT; 0: none)")
    p.add_argument("--json", action="store_true", help=ONLY_JSON_HELP)
    p.set_defaults(func=cmd_archive)

    p = sub.add_parser("features", help="print what Redis holds for a user or an item; or rebuild it all from "
                                        "the archive (stop the stream workers first)")
    p.add_argument("kind", choices=["user", "item", "rebuild"])
    p.add_argument("id", nargs="?", help="the user's or item's id")
    p.add_argument("--json", action="store_true", help="one JSON line")
    p.set_defaults(func=cmd_features)

    p = sub.add_parser("keys", help="API keys: create (printed once), list, revoke; stored hashed in Redis")
    p.add_argument("action", choices=["create", "list", "revoke"])
    p.add_argument("id", nargs="?", help="revoke: the key's id")
    p.add_argument("--name", help="create: who or what uses the key")
    p.add_argument("--scopes", help="create: comma-separated, of events:write, recs:read, catalogue:write, admin (all of them)")
    p.add_argument("--rate", type=float, default=None, help="create: requests per second (default RECSYS_AUTH_RATE_PER_S)")
    p.add_argument("--burst", type=int, default=None, help="create: bucket size (default RECSYS_AUTH_BURST)")
    p.add_argument("--json", action="store_true", help="one JSON line")
    p.set_defaults(func=cmd_keys)

    p = sub.add_parser("users", help="forget a user: online features, archived events, the next model")
    p.add_argument("action", choices=["forget"])
    p.add_argument("id", nargs="?", help="the user's id, as clients send it (visible to other users of the "
                                         "machine: prefer --stdin)")
    p.add_argument("--stdin", action="store_true", help="read the ids from stdin, one a line")
    p.add_argument("--json", action="store_true", help="one JSON line per user")
    p.set_defaults(func=cmd_users)

    p = sub.add_parser("chaos", help="a long fault scenario (system test): one JSON line with what was lost, "
                                     "failed and how long recovery took; exit 1 when it did not pass")
    p.add_argument("scenario", choices=["kafka-leader-kill", "redis-rebuild", "replica-kill", "controller-kill", "fuzz",
                                        "stream-workers", "ray-nodes", "guardrail", "abuse", "forget-under-load",
                                        "rebuild-under-traffic"])
    p.add_argument("--json", action="store_true", help="one JSON line")
    p.set_defaults(func=cmd_chaos)

    p = sub.add_parser("bench", help="benchmarks that print ratios against a reference measured in the same run")
    bench = p.add_subparsers(dest="bench", required=True, metavar="BENCH")
    b = bench.add_parser("stream", help="stream worker vs raw Kafka consume and raw Redis writes; freshness")
    b.add_argument("--events", type=int, default=50_000, help="events for the throughput runs")
    b.add_argument("--rate", type=float, default=1000.0, help="events/s for the freshness run")
    b.add_argument("--seconds", type=float, default=10.0, help="length of the freshness run")
    b.add_argument("--json", action="store_true", help="one JSON line")
    b.set_defaults(func=cmd_bench_stream)
    b = bench.add_parser("train", help="two-tower vs baselines on MovieLens-100K; 1 vs 2 workers; ANN vs exact")
    add_bench_train_options(b)
    b = bench.add_parser("gate", help="the retraining gate per seed: same-data candidate published, shuffled rejected")
    add_bench_gate_options(b)
    b.add_argument("--json", action="store_true", help=ONLY_JSON_HELP)
    b = bench.add_parser("new-items", help="items served from their catalogue genres by the content head, against the "
                                           "same items after a full retrain: HR@10/HR@50 on their test targets")
    b.add_argument("--source", default=None, help="a source whose items have genres (default: lab.bench.new_items.DEFAULT_SOURCE)")
    b.add_argument("--new-share", type=float, default=0.1, help="share of the items held back as new")
    b.add_argument("--epochs", type=int, default=None, help="default: the model config's")
    b.add_argument("--json", action="store_true", help="one JSON line")
    b.set_defaults(func=cmd_bench_new_items)
    b = bench.add_parser("ann", help="FAISS's exact, IVF-Flat, IVF-fp16, IVF-int8, IVF-PQ and HNSW indexes: single-query "
                                      "p50/p99 on one thread, recall@10, build time, bytes per item")
    b.add_argument("--items", type=_sizes, default=[10_000, 100_000, 1_000_000], help="catalogue sizes, e.g. 10000,100000")
    b.add_argument("--queries", type=int, default=1000, help="held-out queries: recall and latency")
    b.add_argument("--tuning-queries", type=int, default=500, help="queries that choose nprobe / efSearch")
    b.add_argument("--spread", type=float, default=0.5,
                   help="noise per dimension around the cluster centres (standard normal): larger is harder")
    b.add_argument("--kinds", type=lambda s: [k for k in s.split(",") if k], default=None,
                   help="index kinds of recsys.ann, comma-separated (default: all of lab.bench.ann.KINDS; flat, the "
                        "reference, is always measured)")
    b.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    b.add_argument("--json", action="store_true", help="one JSON line")
    b.set_defaults(func=cmd_bench_ann)
    b = bench.add_parser("compression", help="teacher (dim 128), default (64), student (32) and distilled student "
                                              "served at fp32, fp16 and int8: HR@10, NDCG@10, bytes, stage times")
    b.add_argument("--source", dest="sources", action="append", default=None,
                   help="a source spec, repeatable (default: MovieLens-100K and the synthetic stream)")
    b.add_argument("--workers", type=int, default=2)
    b.add_argument("--epochs", type=int, default=None, help="default: the model config's")
    b.add_argument("--check", action="store_true", help="exit 1 when int8 loses more than 1%% HR@10")
    b.add_argument("--json", action="store_true", help="one JSON line")
    b.set_defaults(func=cmd_bench_compression)
    b = bench.add_parser("data", help="the archive's examples on Ray Data vs in memory: wall time, peak memory of "
                                       "the driver and of Ray's workers, examples/s, per log size")
    b.add_argument("--events", default="1000000,10000000", help="synthetic log sizes, comma-separated")
    b.add_argument("--users-per-event", type=float, default=0.02, help="the logs' users, per event")
    b.add_argument("--check", action="store_true", help="exit 1 when the engine's memory is not flat")
    b.add_argument("--json", action="store_true", help="one JSON line")
    b.set_defaults(func=cmd_bench_data)
    b = bench.add_parser("serve", help="no-op and recommendation endpoints behind Serve's default and HAProxy "
                                        "ingress, and under plain uvicorn: req/s, p99, CPU-ms per request")
    b.add_argument("--replicas", type=int, default=2, help="fixed replicas (uvicorn: workers) of each variant")
    b.add_argument("--concurrency", type=int, default=16, help="closed-loop clients")
    b.add_argument("--seconds", type=float, default=20.0, help="measured load time per variant (two runs)")
    b.add_argument("--levers", action="store_true", help="also (c) with the cost levers all off and each alone on")
    b.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    b.add_argument("--json", action="store_true", help="one JSON line")
    b.set_defaults(func=cmd_bench_serve)

    b = bench.add_parser("freshness", help="one trained model's HR@10 and NDCG@10 with the users' features at the "
                                            "target's instant, at the start of its day, and an hour before")
    b.add_argument("--source", action="append", default=None,
                   help="a source, repeatable (default: the sessions generator, then MovieLens-100K from RECSYS_ML100K)")
    b.add_argument("--workers", type=int, default=2, help="Ray Train workers")
    b.add_argument("--epochs", type=int, default=None, help="epochs (default: the model config's)")
    b.add_argument("--check", action="store_true", help="exit 1 when the first source's a/b of HR@10 is under 1.3")
    b.add_argument("--json", action="store_true", help="one JSON line")
    b.set_defaults(func=cmd_bench_freshness)
    b = bench.add_parser("reaction", help="time from a click's 202 to the first GET whose list changed, per user, "
                                           "beside closed-loop shoppers (the running Serve app; starts a stream worker)")
    b.add_argument("--users", type=int, default=200, help="users measured (known users of the demo's data)")
    b.add_argument("--concurrency", type=int, default=4, help="measured users at a time")
    b.add_argument("--background", type=int, default=8, help="closed-loop background shoppers")
    b.add_argument("--timeout-s", dest="timeout_s", type=float, default=5.0,
                   help="a list unchanged this long after the click counts as a miss")
    b.add_argument("--p99-budget-ms", dest="p99_budget_ms", type=float, default=250.0, help="the pass flag's p99")
    b.add_argument("--check", action="store_true", help="exit 1 when a list did not change or the p99 is over budget")
    b.add_argument("--json", action="store_true", help="one JSON line")
    b.set_defaults(func=cmd_bench_reaction)

    b = bench.add_parser("redis-memory", help="bytes per user, per item and per event in the dedup window "
                                               "(MEMORY USAGE of real keys), Redis CPU per event and per request")
    b.add_argument("--events", type=int, default=100_000, help="synthetic events to apply (under a scratch prefix)")
    b.add_argument("--users", type=int, default=2_000, help="synthetic users")
    b.add_argument("--items", type=int, default=1_000, help="synthetic items")
    b.add_argument("--seed", type=int, default=7, help="the synthetic source's seed")
    b.add_argument("--reads", type=int, default=2_000, help="recommendation reads timed for Redis CPU per request")
    b.add_argument("--json", action="store_true", help="one JSON line")
    b.set_defaults(func=cmd_bench_redis_memory)
    b = bench.add_parser("report", help="the saved results (.recsys/bench/*.json) as docs/benchmarks/results.md "
                                         "and its plots")
    b.add_argument("--out", help="folder of the page and plots (default: the project's docs/benchmarks)")
    b.add_argument("--json", action="store_true", help="one JSON line")
    b.set_defaults(func=cmd_bench_report)

    p = sub.add_parser("capacity", help="replicas, CPUs, Kafka partitions and brokers, stream workers, Redis memory "
                                        "and shards, index memory, training time for a load, from the benches' "
                                        "saved figures (.recsys/bench/*.json), each with its source")
    p.add_argument("--rps", type=float, required=True, help="recommendation requests per second")
    p.add_argument("--users", type=int, required=True, help="users with online features")
    p.add_argument("--items", type=int, required=True, help="items in the catalogue (and the index)")
    p.add_argument("--events-per-s", type=float, required=True, help="events per second into Kafka")
    p.add_argument("--assume-defaults", action="store_true",
                   help="a figure without a saved bench result comes from the README's published run (marked "
                        "'default'), instead of exit 2")
    p.add_argument("--figures", default=None, metavar="FILE",
                   help='figures that replace the saved ones: JSON {"name": {"value": V, "source": "..."}}')
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="a figure or assumption given here (e.g. target_cpu_utilisation=0.5), marked assumed; "
                        "repeatable")
    p.add_argument("--json", action="store_true", help="one JSON line")
    p.set_defaults(func=cmd_capacity)

    register_training(sub)
    register_loadtest(sub)

    p = sub.add_parser("retrain-now", help="one retraining run now: train, gate, publish or reject")
    p.add_argument("--json", action="store_true", help="one JSON line")
    p.set_defaults(func=cmd_retrain_now)

    p = sub.add_parser("top", help="a live view, every second: requests/s and p99, consumer lag, freshness, "
                                   "replicas, model version and age, gate (from Prometheus, else the endpoints)")
    p.add_argument("--once", action="store_true", help="one view, then exit")
    p.add_argument("--json", action="store_true", help="each view as one JSON line")
    p.set_defaults(func=cmd_top)

    p = sub.add_parser("scheduler", help="retrain on the schedule (RECSYS_RETRAINING_*) and on new events")
    p.add_argument("--max-runs", type=int, default=None, help="exit after this many runs")
    p.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                   help="serve Prometheus metrics on 127.0.0.1:PORT (default RECSYS_MONITORING_SCHEDULER_PORT; 0: none)")
    p.set_defaults(func=cmd_scheduler)

    p = sub.add_parser("serve", help="deploy the Ray Serve API (returns once it answers), or stop/inspect it")
    p.add_argument("action", nargs="?", choices=["up", "down", "status"], default="up")
    p.add_argument("--json", action="store_true", help="one JSON line")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("demo", help="the whole loop on synthetic data: stack, Kafka, Redis, Ray Train, Ray Serve")
    p.add_argument("--events", type=int, default=100_000, help="synthetic events to replay")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: the model config's)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if not args.verbose:
            quiet_native_stderr(get_settings().home / "logs" / "native-stderr.log")
            # kafka-python warns of each retry while a broker starts; we report outcomes
            logging.getLogger("kafka").setLevel(logging.ERROR)
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                            format="recsys %(name)s %(levelname)s: %(message)s")
        return args.func(args)
    except (Exception, KeyboardInterrupt) as exc:  # recsys.errors.exit_code: the one mapping to exit codes
        code = exit_code(exc)
        if code == INTERNAL:
            traceback.print_exc()
        elif code == UNAVAILABLE and not isinstance(exc, RecsysError):
            print(f"recsys {args.command}: a service does not answer ({type(exc).__name__}: {exc}); is the stack "
                  f"up? (`recsys stack status`)", file=sys.stderr)
        elif not isinstance(exc, KeyboardInterrupt):
            print(f"recsys {args.command}: {exc}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
