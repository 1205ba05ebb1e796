"""``recsys chaos ray-nodes``: Ray Serve and Ray Train across Ray nodes, one node lost in each.

A Ray cluster of real ``ray start`` processes on this machine: a head that holds no work (0
logical CPUs: the GCS, Serve's controller and its one HTTP proxy, Train's controller, the
driver) and three worker nodes, each ``ray start --address=HEAD --num-cpus=2`` with a custom
resource that names it (``raynode_w1`` ..). Every node has its own node-manager, object-manager,
worker, metrics and agent ports (``node_ports``), all in 36000-38999, far from the project's
stack (Redis 26379, Kafka 29092, Ray 26380, serving 28000), and the scenario's folders are its
own (``HOME``, Ray's temp dir ``RAY_TEMP``), so it runs beside a developer's stack. Its nodes are
stopped by killing the processes it started (each node is one session: ``ray start --block``
and everything the node spawns), never with ``ray stop``, which ends every Ray process of the
user. A private Redis (``REDIS_PORT``) holds the features and the API key; no Kafka: the load
is recommendation reads (the event path's faults are ``kafka-leader-kill``'s).

1. Train: ``training.job.train`` with 2 Ray Train workers placed STRICT_SPREAD, so each worker
   is on its own node (asserted from the GCS's actor table: the ``RayTrainWorker`` actors' node
   ids). Once Train's controller has registered the first checkpoint, the node of one worker is
   killed (kill -9 of all its processes); ``FailureConfig(max_failures)`` restarts the group on
   the two nodes left and the loop resumes from that checkpoint (the card's
   ``resumed_from_epoch`` > 0). The model is published to the scenario's registry. Train's
   checkpoints go to a folder of ``HOME`` that every node of this machine sees; nodes on
   separate machines need shared storage there (``RunConfig(storage_path)``: S3, NFS).
2. A replacement node (w4) joins: three worker nodes again.
3. Serve: the recommendation app (``serving.app``) with ``REPLICAS`` fixed replicas, spread by
   Serve over the worker nodes (asserted: on at least 2), one HTTP proxy on the head
   (``proxy_location="HeadOnly"``: nodes on one machine cannot all bind the HTTP port). Under an
   open-loop load of ``RATE`` req/s (GET recommendations with an API key), the node holding the
   most replicas is killed with kill -9 a third of the way in. Counted: failed requests (non-2xx
   or no answer) of those sent, seconds until Serve has all replicas running on the surviving
   nodes, seconds from the kill to the last failed request; ``recovery_s`` is the larger.

Needs nothing first (no ``recsys demo``): about 3-4 minutes on 2 cores.

Ingress: Serve's default Python proxy (``serving.ingress="proxy"``), not the project's HAProxy
mode. In that mode each replica answers HTTP itself on a port from one range per node
(``RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT``, 30000-31000, allocated per node from the same
first port), so replicas of several nodes on one machine contend for the same ports, and with
the HAProxy replicas of the developer's own stack. On real machines the HAProxy mode fits.

Ray's multi-node mode needs ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1`` on the nodes (the project
sets 0, Ray's one-machine mode, which refuses a second node), and in it Ray publishes the
machine's address, not loopback: the nodes listen on it while the scenario runs.

Passed: training resumed from an epoch > 0 with its workers first on 2 different nodes and then
only on surviving ones; replicas on at least 2 nodes; Serve whole again within
``RECOVERY_BOUND_S`` and failed requests at most ``FAILED_SHARE_BOUND`` of those sent.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil

from lab import REPO, process, stack
from recsys import RAY_ENV
from recsys.errors import RecsysError
from recsys.settings import Settings

HOME = Path("/tmp/recsys-raynodes")  # the scenario's RECSYS_HOME: Redis, secrets, registry, Train's storage
RAY_TEMP = Path("/tmp/rnodes")  # Ray's temp dir for these nodes: short, a unix socket path has at most 107 bytes
GCS_PORT = 36380
CLIENT_SERVER_PORT = 36381
DASHBOARD_PORT = 36390  # the head's dashboard process (started even without the dashboard UI)
NODE_PORT_BASE, NODE_PORT_STEP = 36400, 200  # node i: 36400 + 200 i .. + 199
SERVE_PORT = 38000
REDIS_PORT = 38379
KAFKA_PORT = 38092  # nothing listens: the replicas' producer must never reach the developer's Kafka
WORKER_NODES = ("w1", "w2", "w3")
REPLACEMENT = "w4"
NODE_CPUS = 2
NODE_OBJECT_STORE_BYTES = 200 * 1024 * 1024
RESOURCE_PREFIX = "raynode_"

TRAIN_SOURCE = "synthetic:events=40000,users=1500,items=600,clusters=12,seed=5,taste=0.9"
TRAIN_USERS = 1500
TRAIN_MODEL = {"dim": 32, "user_dim": 16, "hidden": 64, "batch_size": 128, "temperature": 0.1, "learning_rate": 0.005}
TRAIN_EPOCHS = 6
TRAIN_WORKERS = 2

REPLICAS = 4
RATE = 60.0  # requests/s, open loop
LOAD_S = 75.0
KILL_AT_S = 20.0
RECOVERY_BOUND_S = 60.0
FAILED_SHARE_BOUND = 0.02
TRAIN_WORKER_CLASS = "RayTrainWorker"
REPLICA_CLASS_PREFIX = "ServeReplica:recsys:"


class RayNodesError(RecsysError):
    """The scenario could not run (a port taken, a node that does not start): exit 1."""


# ---- pure parts (tests/test_chaos_ray_units.py) ------------------------------------------------

def node_ports(index: int) -> dict[str, int]:
    """The ports of node ``index`` (0: the head): a block of NODE_PORT_STEP from NODE_PORT_BASE,
    the worker processes' range in its upper half."""
    base = NODE_PORT_BASE + NODE_PORT_STEP * index
    return {"node_manager": base, "object_manager": base + 1, "metrics_export": base + 2,
            "dashboard_agent_listen": base + 3, "dashboard_agent_grpc": base + 4, "runtime_env_agent": base + 5,
            "min_worker": base + 100, "max_worker": base + NODE_PORT_STEP - 1}


def ray_start_args(index: int, name: str | None) -> list[str]:
    """``ray start`` options of node ``index``: the head (index 0, ``name`` None) or a worker
    node named ``name`` (its custom resource ``raynode_<name>``)."""
    p = node_ports(index)
    args = ["--block", f"--temp-dir={RAY_TEMP}", "--disable-usage-stats", "--node-ip-address=127.0.0.1",
            f"--node-manager-port={p['node_manager']}", f"--object-manager-port={p['object_manager']}",
            f"--metrics-export-port={p['metrics_export']}", f"--dashboard-agent-listen-port={p['dashboard_agent_listen']}",
            f"--dashboard-agent-grpc-port={p['dashboard_agent_grpc']}", f"--runtime-env-agent-port={p['runtime_env_agent']}",
            f"--min-worker-port={p['min_worker']}", f"--max-worker-port={p['max_worker']}",
            f"--object-store-memory={NODE_OBJECT_STORE_BYTES}", "--include-log-monitor=false"]
    if name is None:
        return args + ["--head", f"--port={GCS_PORT}", f"--ray-client-server-port={CLIENT_SERVER_PORT}",
                       f"--dashboard-port={DASHBOARD_PORT}", "--include-dashboard=false", "--num-cpus=0"]
    return args + [f"--address=127.0.0.1:{GCS_PORT}", f"--num-cpus={NODE_CPUS}",
                   "--resources=" + json.dumps({RESOURCE_PREFIX + name: 1})]


def node_names(nodes: list[dict]) -> dict[str, str]:
    """Node id -> "head" or the worker node's name, from ``ray.nodes()`` (its custom resource)."""
    names = {}
    for n in nodes:
        res = n.get("Resources", {})
        named = [k[len(RESOURCE_PREFIX):] for k in res if k.startswith(RESOURCE_PREFIX)]
        names[n["NodeID"]] = named[0] if named else "head" if "node:__internal_head__" in res else n["NodeID"][:8]
    return names


def per_node(actors: list[dict], names: dict[str, str]) -> dict[str, int]:
    """Actors (GCS actor-table entries) per node name, sorted by name."""
    counts: dict[str, int] = {}
    for a in actors:
        node = names.get(a["Address"]["NodeID"], a["Address"]["NodeID"][:8])
        counts[node] = counts.get(node, 0) + 1
    return dict(sorted(counts.items()))


def load_figures(records: list[tuple[float, int, float]], killed_at: float | None) -> dict:
    """Requests as (sent at, HTTP status or 0 for no answer, latency s), times on the clock of
    ``killed_at``: sent, failed (non-2xx or no answer), their share, p99, and the last failed
    request's answer after the kill (seconds from the kill; 0 when none failed after it)."""
    sent = len(records)
    failed = [(t, lat) for t, status, lat in records if not 200 <= status < 300]
    after = [t + lat - killed_at for t, lat in failed if killed_at is not None and t + lat >= killed_at]
    latencies = np.array([lat for _, status, lat in records if 200 <= status < 300] or [0.0])
    return {"requests": sent, "failed_requests": len(failed), "failed_share": round(len(failed) / sent, 4) if sent else 1.0,
            "failed_after_kill": len(after), "last_failure_after_kill_s": round(max(after), 2) if after else 0.0,
            "p50_ms": round(float(np.percentile(latencies, 50)) * 1e3, 1),
            "p99_ms": round(float(np.percentile(latencies, 99)) * 1e3, 1)}


# ---- the cluster ---------------------------------------------------------------------------------

def scenario_settings(settings: Settings) -> Settings:
    """The scenario's own home, Redis, Ray and serving ports; Serve's Python proxy as ingress."""
    return settings.updated(
        home=HOME, archive_dir=HOME / "archive", registry_dir=HOME / "models", secrets_dir=HOME / "secrets",
        redis={"port": REDIS_PORT, "prefix": "raynodes"},
        kafka={"bootstrap": f"127.0.0.1:{KAFKA_PORT}", "controller_port": KAFKA_PORT + 1, "brokers": 1},
        ray={"port": GCS_PORT, "metrics_port": node_ports(0)["metrics_export"], "num_cpus": NODE_CPUS * len(WORKER_NODES)},
        serving={"ingress": "proxy", "host": "127.0.0.1", "port": SERVE_PORT})


def _port_taken(port: int) -> bool:
    return process.port_open("127.0.0.1", port, timeout_s=0.5)


def session_pids(sid: int) -> list[int]:
    """The processes of session ``sid``: a node's ``ray start --block`` leads one, and its raylet,
    agents and workers (each worker in a process group of its own) stay in it."""
    out = []
    for pid in psutil.pids():
        with contextlib.suppress(OSError):
            if os.getsid(pid) == sid:
                out.append(pid)
    return out


@dataclass
class RayNode:
    name: str  # "head", "w1", ...
    index: int
    proc: subprocess.Popen
    log: Path
    node_id: str | None = None

    def kill(self, sig: int = signal.SIGKILL) -> int:
        """Signal every process of the node at once (kill -9: the machine is gone); returns how many."""
        pids = session_pids(self.proc.pid)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        return len(pids)

    def alive_pids(self) -> list[int]:
        alive = []
        for pid in session_pids(self.proc.pid):
            with contextlib.suppress(psutil.Error):
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
        return alive


class LocalCluster:
    """A head and worker nodes, each a ``ray start --block`` process in a session of its own."""

    def __init__(self, s: Settings, progress):
        self.s, self.progress = s, progress
        self.nodes: dict[str, RayNode] = {}
        self.logs = s.home / "logs" / "ray-nodes"
        self.logs.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        self.env = {**env, **RAY_ENV, **stack.ray_cluster_env(s),
                    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1",  # Ray's multi-node mode (see the module's doc)
                    "RAY_enable_worker_prestart": "0",  # no idle workers started ahead on 2 cores
                    "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])}

    def _start(self, name: str, index: int) -> RayNode:
        log = self.logs / f"{name}.log"
        proc = process.spawn([stack.ray_exe(), "start", *ray_start_args(index, None if name == "head" else name)],
                             log, env=self.env, cwd=REPO, new_session=True)
        node = self.nodes[name] = RayNode(name, index, proc, log)
        return node

    def start_head(self, timeout_s: float = 60.0) -> None:
        taken = [p for p in (GCS_PORT, CLIENT_SERVER_PORT, DASHBOARD_PORT, *node_ports(0).values()) if _port_taken(p)]
        if taken:
            raise RayNodesError(f"ports {taken} are taken: another ray-nodes run still up? (its processes run "
                                f"with --temp-dir={RAY_TEMP})")
        self.progress(f"ray-nodes: head on 127.0.0.1:{GCS_PORT} (0 CPUs)")
        subprocess.run([stack.ray_exe(), "get-auth-token", "--generate"], capture_output=True, env=self.env)
        head = self._start("head", 0)
        try:
            process.wait_until(lambda: _port_taken(GCS_PORT), timeout_s, f"the head listens on {GCS_PORT}", every_s=0.3,
                               gave_up=lambda: "it exited" if head.proc.poll() is not None else None)
        except process.NotInTime:
            raise RayNodesError(f"the head did not start; see {head.log}") from None

    def add_workers(self, names: list[str], attempts: int = 3) -> None:
        """Start worker nodes one after the other, each once Ray counts the one before alive (its
        node id recorded). ``ray start`` gives a raylet 30 s to register (Ray's own bound): on 2
        busy cores it can miss it, so a node that does not join is killed and started again."""
        import ray
        self.progress(f"ray-nodes: worker node(s) {', '.join(names)} ({NODE_CPUS} CPUs each) join")
        for name in names:
            for attempt in range(1, attempts + 1):
                taken = [p for p in node_ports(self._index(name)).values() if _port_taken(p)]
                if taken:
                    raise RayNodesError(f"ports {taken} of node {name} are taken")
                before = {x["NodeID"] for x in ray.nodes()}  # a killed attempt can look alive a while
                self._start(name, self._index(name))
                if self._joined(name, before):
                    break
                self.kill(name, quiet=True)
                if attempt == attempts:
                    raise RayNodesError(f"node {name} did not join in {attempts} attempts; see {self.logs}")
                self.progress(f"ray-nodes: node {name} did not join (attempt {attempt}); starting it again")

    def _joined(self, name: str, before: set[str], timeout_s: float = 90.0) -> bool:
        import ray
        node = self.nodes[name]

        def alive() -> bool:
            node.node_id = next((nid for nid, n in node_names([x for x in ray.nodes() if x["Alive"]]).items()
                                 if n == name and nid not in before), None)
            return node.node_id is not None
        try:
            process.wait_until(alive, timeout_s, f"Ray counts node {name} alive",
                               gave_up=lambda: "it exited" if node.proc.poll() is not None else None)
        except process.NotInTime:
            return False
        return True

    def _index(self, name: str) -> int:
        return 1 + [*WORKER_NODES, REPLACEMENT].index(name)

    def names(self) -> dict[str, str]:
        """Node id -> name, of every node this cluster started (alive or not)."""
        return {n.node_id: n.name for n in self.nodes.values() if n.node_id}

    def kill(self, name: str, quiet: bool = False) -> float:
        """kill -9 every process of the node; returns when it happened (time.monotonic())."""
        node = self.nodes[name]
        killed = time.monotonic()
        n = node.kill()
        for _ in range(20):  # a worker being forked right then: again until none is left
            if not node.alive_pids():
                break
            node.kill()
            time.sleep(0.1)
        node.proc.wait(timeout=10)
        if not quiet:
            self.progress(f"ray-nodes: kill -9 node {name} ({n} processes)")
        return killed

    def stop(self) -> None:
        """SIGTERM every process of every node (workers first), then SIGKILL what is left."""
        nodes = sorted(self.nodes.values(), key=lambda n: n.name == "head")
        process.stop([pid for node in nodes for pid in session_pids(node.proc.pid)], grace_s=15, every_s=0.3)
        for node in nodes:  # a worker forked meanwhile
            node.kill(signal.SIGKILL)
        for node in nodes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.proc.wait(timeout=10)


def _alive_actors(match) -> list[dict]:
    """ALIVE actors of the GCS's actor table whose class name ``match`` accepts."""
    from ray._private import state
    return [a for a in state.actors(actor_state_name="ALIVE").values() if match(a["ActorClassName"])]


# ---- 1. training ---------------------------------------------------------------------------------

class _TrainWatch(threading.Thread):
    """Beside the training run: the workers' nodes; once the first checkpoint is registered,
    kill -9 the node of one worker; then the nodes of the restarted group."""

    def __init__(self, cluster: LocalCluster, storage: Path, progress):
        super().__init__(daemon=True)
        self.cluster, self.storage, self.progress = cluster, storage, progress
        self.first: dict[str, str] = {}  # actor id -> node name, of the first group
        self.restarted: dict[str, str] = {}
        self.victim: str | None = None
        self.killed_at: float | None = None
        self.checkpoint_epoch: int | None = None
        self.error: str | None = None
        self.stopping = threading.Event()

    def _workers(self) -> dict[str, str]:
        names = self.cluster.names()
        return {a["ActorID"]: names.get(a["Address"]["NodeID"], "?")
                for a in _alive_actors(lambda c: c == TRAIN_WORKER_CLASS)}

    def _registered_epoch(self) -> int | None:
        """The epoch of the latest checkpoint Train's controller registered (its snapshot file)."""
        for snapshot in self.storage.glob("*/checkpoint_manager_snapshot.json"):
            with contextlib.suppress(OSError, ValueError):
                latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result")
                if latest:
                    return int(latest["metrics"]["epoch"])
        return None

    def run(self) -> None:
        try:
            self._run()
        except Exception as exc:  # reported in the result; the training run goes on
            self.error = f"{type(exc).__name__}: {exc}"

    def _run(self) -> None:
        while not self.stopping.is_set():
            workers = self._workers()
            if len(workers) == TRAIN_WORKERS:
                self.first = workers
                epoch = self._registered_epoch()
                if epoch is not None:
                    self.checkpoint_epoch = epoch
                    break
            time.sleep(0.2)
        if self.stopping.is_set():
            return
        self.progress(f"ray-nodes: train workers on {sorted(self.first.values())}; the checkpoint of epoch "
                      f"{self.checkpoint_epoch} is registered")
        self.victim = sorted(self.first.values())[-1]
        self.killed_at = self.cluster.kill(self.victim)
        while not self.stopping.is_set():
            workers = {a: n for a, n in self._workers().items() if a not in self.first}
            if len(workers) == TRAIN_WORKERS:
                self.restarted = workers
                self.progress(f"ray-nodes: the group restarted on {sorted(workers.values())}, "
                              f"{time.monotonic() - self.killed_at:.1f} s after the kill")
                return
            time.sleep(0.2)


def train_phase(s: Settings, cluster: LocalCluster, progress) -> dict:
    from training.job import train
    storage = s.home / "ray_results"
    watch = _TrainWatch(cluster, storage, progress)
    progress(f"ray-nodes: training, {TRAIN_WORKERS} workers STRICT_SPREAD, {TRAIN_EPOCHS} epochs on {TRAIN_SOURCE}")
    watch.start()
    t0 = time.monotonic()
    try:
        card = train(TRAIN_SOURCE, settings=s.updated(training={"placement_strategy": "STRICT_SPREAD"}),
                     workers=TRAIN_WORKERS, epochs=TRAIN_EPOCHS, model_config=TRAIN_MODEL, max_failures=2)
    finally:
        watch.stopping.set()
        watch.join(timeout=10)
    seconds = time.monotonic() - t0
    first_nodes, restarted_nodes = sorted(watch.first.values()), sorted(watch.restarted.values())
    resumed = card["training"]["resumed_from_epoch"]
    progress(f"ray-nodes: published {card['version']} in {seconds:.0f} s, resumed from epoch {resumed}")
    checks = {"workers_on_2_nodes": len(set(first_nodes)) == TRAIN_WORKERS,
              "killed_a_worker_node": watch.victim is not None and watch.victim in first_nodes,
              "restarted_on_survivors": len(restarted_nodes) == TRAIN_WORKERS and watch.victim not in restarted_nodes
              and len(set(restarted_nodes)) == TRAIN_WORKERS,
              "resumed_from_checkpoint": resumed > 0,
              "all_epochs": [h["epoch"] for h in card["training"]["history"]] == list(range(1, TRAIN_EPOCHS + 1))}
    return {"seconds": round(seconds, 1), "training_seconds": card["training"]["seconds"], "epochs": TRAIN_EPOCHS,
            "workers": TRAIN_WORKERS, "nodes_before_kill": first_nodes, "killed_node": watch.victim,
            "killed_after_checkpoint_of_epoch": watch.checkpoint_epoch, "nodes_after_restart": restarted_nodes,
            "resumed_from_epoch": resumed, "version": card["version"],
            "hr@10": card["metrics"]["two_tower"]["hr@10"], "watch_error": watch.error,
            "checks": checks, "passed": all(checks.values()) and watch.error is None}


# ---- 3. serving ----------------------------------------------------------------------------------

async def _get_load(urls: list[str], headers: dict, rate: float, seconds: float, started) -> list:
    """GET each URL in turn at ``rate`` per second, open loop; (sent at, status or 0, latency)."""
    import aiohttp
    records: list[tuple[float, int, float]] = []

    async def get(session, url):
        t = time.monotonic()
        try:
            async with session.get(url) as resp:
                await resp.read()
                status = resp.status
        except (aiohttp.ClientError, asyncio.TimeoutError):
            status = 0
        records.append((t, status, time.monotonic() - t))

    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256), timeout=timeout,
                                     headers=headers) as session:
        begin = time.monotonic()
        started.set()
        tasks = []
        for n in range(int(rate * seconds)):
            await asyncio.sleep(max(0.0, begin + n / rate - time.monotonic()))
            tasks.append(asyncio.create_task(get(session, urls[n % len(urls)])))
        await asyncio.gather(*tasks)
    return records


def _load_process(urls, headers, rate, seconds, started, queue) -> None:
    queue.put(asyncio.run(_get_load(urls, headers, rate, seconds, started)))


def _replicas(cluster: LocalCluster) -> tuple[dict[str, int], list[dict]]:
    actors = _alive_actors(lambda c: c.startswith(REPLICA_CLASS_PREFIX))
    return per_node(actors, cluster.names()), actors


def serve_phase(s: Settings, cluster: LocalCluster, progress) -> dict:
    from ray import serve

    from recsys.auth import KeyStore, Scope
    from recsys.feature_store import connect
    from serving.app import RecsysApi
    from lab.bench.serve import known_users
    from lab.serve_local import base_url, load_config, replicas, wait_http
    options = {k: v for k, v in load_config()["deployments"]["RecsysApi"].items() if k != "autoscaling_config"}
    progress(f"ray-nodes: Serve, {REPLICAS} replicas, one proxy on the head at {base_url(s)}")
    quiet = lambda: logging.getLogger("ray.serve").setLevel(logging.WARNING)  # noqa: E731 deploy chatter; errors show
    quiet()
    serve.start(proxy_location="HeadOnly", http_options={"host": s.serving.host, "port": s.serving.port})
    quiet()  # serve.start sets its logger up again
    serve.run(RecsysApi.options(**options, num_replicas=REPLICAS).bind(settings=s.model_dump(mode="json")),
              name="recsys", route_prefix="/", blocking=False)
    wait_http(f"{base_url(s)}/healthz", timeout_s=300)
    try:
        process.wait_until(lambda: replicas().get("RecsysApi", 0) >= REPLICAS, 300, f"Serve runs {REPLICAS} replicas")
    except process.NotInTime:
        raise RayNodesError(f"Serve ran {replicas()} of {REPLICAS} replicas after 300 s") from None
    before, _ = _replicas(cluster)
    progress(f"ray-nodes: replicas per node {before}")
    victim = max((n for n in before if n != "head"), key=lambda n: (before[n], n))
    users = known_users(s, 500, candidates=TRAIN_USERS)
    urls = [f"{base_url(s)}/v1/recommendations/{u}?k=10" for u in users]
    key = KeyStore(s, connect(s)).create("ray-nodes", [Scope.recs_read], rate_per_s=1e6, burst=10**6)["key"]
    ctx = mp.get_context("spawn")
    queue, started = ctx.Queue(), ctx.Event()
    load = ctx.Process(target=_load_process, args=(urls, {"Authorization": f"Bearer {key}"}, RATE, LOAD_S, started, queue))
    progress(f"ray-nodes: {RATE:g} req/s for {LOAD_S:g} s; kill -9 node {victim} ({before[victim]} replicas) at "
             f"{KILL_AT_S:g} s")
    load.start()
    if not started.wait(timeout=120):
        raise RayNodesError("the load process did not start")
    time.sleep(KILL_AT_S)
    killed_at = cluster.kill(victim)
    back_s, after = None, {}
    while time.monotonic() - killed_at < max(RECOVERY_BOUND_S * 2, LOAD_S):
        with contextlib.suppress(Exception):  # Serve's status can fail while Ray notices the dead node
            after, actors = _replicas(cluster)
            if (replicas().get("RecsysApi", 0) >= REPLICAS and len(actors) >= REPLICAS
                    and victim not in after):
                back_s = time.monotonic() - killed_at
                break
        time.sleep(0.25)
    progress(f"ray-nodes: replicas per node {after}, "
             + (f"all {REPLICAS} running {back_s:.1f} s after the kill" if back_s is not None else "NOT whole again"))
    records = queue.get(timeout=LOAD_S + 180)
    load.join(timeout=30)
    figures = load_figures(records, killed_at)
    recovery = None if back_s is None else max(back_s, figures["last_failure_after_kill_s"])
    checks = {"replicas_on_2_nodes": len(before) >= 2, "replicas_back": back_s is not None,
              "recovered_within_bound": recovery is not None and recovery <= RECOVERY_BOUND_S,
              "failed_share_within_bound": figures["failed_share"] <= FAILED_SHARE_BOUND}
    return {"replicas": REPLICAS, "replicas_per_node_before": before, "killed_node": victim,
            "replicas_per_node_after": after, "rps": round(figures["requests"] / LOAD_S, 1), **figures,
            "replicas_back_s": None if back_s is None else round(back_s, 1),
            "recovery_s": None if recovery is None else round(recovery, 1), "checks": checks,
            "passed": all(checks.values())}


# ---- the scenario --------------------------------------------------------------------------------

def _load_features(s: Settings) -> int:
    """The training source's events, pseudonymized as the API's callers are, into Redis."""
    from recsys.feature_store import FeatureStore
    from recsys.privacy import Pseudonyms
    from recsys.sources import open_source
    events = list(Pseudonyms.of(s).events(open_source(TRAIN_SOURCE).events_iter()))
    return sum(FeatureStore(s).apply_events(events))


def ray_nodes(settings: Settings, progress=print) -> dict:
    """The scenario (the module's doc); its one result. Ray's driver prints the GCS's error
    messages (a node marked dead, with its raylet's last 20 log lines) to stdout: here they go
    to a log file, so that stdout keeps the one JSON line."""
    if _port_taken(REDIS_PORT) or _port_taken(SERVE_PORT):
        raise RayNodesError(f"port {REDIS_PORT} or {SERVE_PORT} is taken: another ray-nodes run still up?")
    shutil.rmtree(HOME, ignore_errors=True)
    shutil.rmtree(RAY_TEMP, ignore_errors=True)
    (HOME / "logs").mkdir(parents=True)
    with (HOME / "logs" / "ray-driver.log").open("w") as out, contextlib.redirect_stdout(out):
        return _ray_nodes(settings, progress)


def _ray_nodes(settings: Settings, progress) -> dict:
    import ray

    from recsys.secrets import USER_ID_KEY, ensure_secret
    s = scenario_settings(settings)
    ensure_secret(s, USER_ID_KEY)
    cluster = LocalCluster(s, progress)
    started = time.monotonic()
    passed = False
    try:
        stack.start_redis(s, progress)
        applied = _load_features(s)
        progress(f"ray-nodes: {applied:,} events applied to the scenario's Redis (port {REDIS_PORT})")
        cluster.start_head()
        ray.init(address=f"127.0.0.1:{GCS_PORT}", log_to_driver=False, logging_level="ERROR")
        cluster.nodes["head"].node_id = next(nid for nid, n in node_names(ray.nodes()).items() if n == "head")
        driver_on_head = ray.get_runtime_context().get_node_id() == cluster.nodes["head"].node_id
        cluster.add_workers(list(WORKER_NODES))
        training = train_phase(s, cluster, progress)
        cluster.add_workers([REPLACEMENT])
        serving = serve_phase(s, cluster, progress)
        passed = driver_on_head and training["passed"] and serving["passed"]
        return {"scenario": "ray-nodes", "nodes": ["head", *WORKER_NODES], "replacement_node": REPLACEMENT,
                "node_ids": {n.name: n.node_id[:12] for n in cluster.nodes.values() if n.node_id},
                "cpus_per_worker_node": NODE_CPUS, "head_cpus": 0, "driver_on_head": driver_on_head,
                "training": training, "serving": serving,
                "requests": serving["requests"], "failed_requests": serving["failed_requests"],
                "failed_share": serving["failed_share"], "recovery_s": serving["recovery_s"],
                "bounds": {"recovery_s": RECOVERY_BOUND_S, "failed_share": FAILED_SHARE_BOUND},
                "seconds": round(time.monotonic() - started, 1), "cpus": os.cpu_count(), "passed": passed}
    finally:
        progress("ray-nodes: tearing down (the scenario's nodes and Redis only)")
        with contextlib.suppress(Exception):
            ray.shutdown()
        cluster.stop()
        stack.stop_redis(s)
        if passed:
            shutil.rmtree(RAY_TEMP, ignore_errors=True)
            shutil.rmtree(HOME, ignore_errors=True)
        else:
            progress(f"ray-nodes: logs kept in {HOME / 'logs'} and {RAY_TEMP}")

