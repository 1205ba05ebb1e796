"""The pure parts of ``recsys chaos ray-nodes`` (lab/chaos/ray.py): its port plan, the node
names and the replicas per node read from Ray's tables, and the load's figures. The scenario
itself is a documented command (README, "Fault scenarios"), not a pytest test."""
from __future__ import annotations

from lab.chaos import ray as cr
from recsys.settings import Settings

STACK_PORTS = {26379, 26380, 28000, 28080, 28101, 28404, 29092, 29093, 28201, 28202, 28203, 29090, 29121, 8265, 10001}


def _all_ports() -> list[int]:
    nodes = [p for i in range(1 + len(cr.WORKER_NODES) + 1) for p in cr.node_ports(i).values()
             if p not in (cr.node_ports(i)["min_worker"], cr.node_ports(i)["max_worker"])]
    ranges = [p for i in range(1 + len(cr.WORKER_NODES) + 1)
              for p in range(cr.node_ports(i)["min_worker"], cr.node_ports(i)["max_worker"] + 1)]
    return [cr.GCS_PORT, cr.CLIENT_SERVER_PORT, cr.DASHBOARD_PORT, cr.SERVE_PORT, cr.REDIS_PORT, cr.KAFKA_PORT,
            *nodes, *ranges]


def test_every_node_has_its_own_ports_far_from_the_stacks():
    ports = _all_ports()
    assert len(ports) == len(set(ports))  # no two nodes (or services) share a port
    assert all(36000 <= p <= 38999 for p in ports)
    assert not set(ports) & STACK_PORTS
    s = cr.scenario_settings(Settings())
    assert (s.redis.port, s.ray.port, s.serving.port, s.serving.ingress) == (cr.REDIS_PORT, cr.GCS_PORT, cr.SERVE_PORT, "proxy")
    assert s.home == s.registry_dir.parent == s.secrets_dir.parent == cr.HOME


def test_ray_start_arguments_of_the_head_and_of_a_worker_node():
    head = cr.ray_start_args(0, None)
    assert "--head" in head and "--num-cpus=0" in head and f"--port={cr.GCS_PORT}" in head
    w2 = cr.ray_start_args(2, "w2")
    assert f"--address=127.0.0.1:{cr.GCS_PORT}" in w2 and "--head" not in w2
    assert '--resources={"raynode_w2": 1}' in w2
    assert f"--node-manager-port={cr.node_ports(2)['node_manager']}" in w2
    assert all(a.startswith("--") for a in head + w2)


def _node(nid, **resources):
    return {"NodeID": nid, "Alive": True, "Resources": {"CPU": 2.0, **resources}}


def test_node_names_and_actors_per_node():
    nodes = [_node("aa" * 28, **{"node:__internal_head__": 1.0}), _node("bb" * 28, raynode_w1=1.0),
             _node("cc" * 28, raynode_w3=1.0), _node("dd" * 28)]
    names = cr.node_names(nodes)
    assert names == {"aa" * 28: "head", "bb" * 28: "w1", "cc" * 28: "w3", "dd" * 28: "dddddddd"}
    actors = [{"Address": {"NodeID": nid}} for nid in ("cc" * 28, "bb" * 28, "cc" * 28, "ee" * 28)]
    assert cr.per_node(actors, names) == {"eeeeeeee": 1, "w1": 1, "w3": 2}


def test_load_figures_count_failures_and_the_last_one_after_the_kill():
    records = [(0.0, 200, 0.01), (1.0, 200, 0.02), (2.0, 500, 0.1), (2.5, 0, 1.0), (3.0, 200, 0.01), (4.0, 503, 0.5)]
    f = cr.load_figures(records, killed_at=2.05)
    assert (f["requests"], f["failed_requests"], f["failed_after_kill"]) == (6, 3, 3)
    assert f["failed_share"] == 0.5
    assert f["last_failure_after_kill_s"] == round(4.5 - 2.05, 2)  # answered at 4.0 + 0.5
    assert cr.load_figures(records[:2], killed_at=0.5)["last_failure_after_kill_s"] == 0.0
    assert cr.load_figures([], None)["failed_share"] == 1.0
