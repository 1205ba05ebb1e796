"""A replicated Kafka, locally: `recsys stack up --brokers 3` on its own ports and folder.

The long scenario (600 events/s through the API while the leader is killed three times) is
``recsys chaos kafka-leader-kill``; this is the fast case: the layout, and acknowledged writes
that survive a kill -9 of a leader, once each.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid

import pytest
from kafka import KafkaAdminClient, KafkaConsumer
from kafka.admin import ConfigResource, ConfigResourceType
from kafka.errors import KafkaError

from lab.bench.stream import settings_env
from lab import stack
from recsys.events import Event
from recsys.kafka_io import producer, send_event
from recsys.settings import get_settings

PORT_OFFSET = 30  # Kafka and Redis ports clear of the stack's (+0) and of `recsys chaos` (+11, +12, +20)


def _events_topic(admin: KafkaAdminClient, topic: str) -> list[dict]:
    (described,) = admin.describe_topics([topic])
    return described["partitions"]


def _produce(s, n: int, **overrides) -> list[str]:
    prod = producer(s, **overrides)
    ids = [uuid.uuid4().hex for _ in range(n)]
    try:
        futures = [send_event(prod, s, Event(event_id=i, user_id=f"u{k % 37}", item_id="i1", type="view", ts=1))
                   for k, i in enumerate(ids)]
        for f in futures:
            f.get(timeout=30)
    finally:
        prod.close(timeout=5)
    return ids


@pytest.fixture
def cluster(tmp_path):
    base = get_settings()
    host, port = base.kafka.bootstrap.rsplit(":", 1)
    s = base.updated(home=tmp_path / "home", redis={"port": base.redis.port + PORT_OFFSET}, kafka={
        "bootstrap": f"{host}:{int(port) + PORT_OFFSET}", "controller_port": base.kafka.controller_port + PORT_OFFSET,
        "events_topic": "cluster-events", "dlq_topic": "cluster-events.dlq"})
    env = settings_env(s)
    try:
        up = subprocess.run([sys.executable, "-m", "cli", "stack", "up", "--brokers", "3", "--json"], env=env,
                            capture_output=True, text=True, timeout=240)
        assert up.returncode == 0, up.stderr[-2000:]
        yield s.updated(kafka={"brokers": 3}), json.loads(up.stdout)["kafka"]
    finally:
        stack.stop_kafka(s)
        stack.stop_redis(s)


def test_three_brokers_keep_acknowledged_writes_once_through_a_leader_kill(cluster):
    s, status = cluster
    assert status["state"] == "running" and status["replication_factor"] == 3
    assert [b["state"] for b in status["brokers"]] == ["running"] * 3
    with KafkaAdminClient(bootstrap_servers=s.kafka.servers) as admin:
        partitions = _events_topic(admin, s.kafka.events_topic)
        config = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, s.kafka.events_topic)])
    assert len(partitions) == s.kafka.events_partitions
    assert all(len(p["replica_nodes"]) == 3 and len(p["isr_nodes"]) == 3 for p in partitions)
    assert config["topic"][s.kafka.events_topic]["min.insync.replicas"]["value"] == "2"

    nodes = {n.node_id: n for n in stack.kafka_nodes(s)}
    leader = nodes[next(p["leader_id"] for p in partitions if p["partition_index"] == 0)]
    os.kill(stack.running_pid(s, leader.name), signal.SIGKILL)
    ids = _produce(s, 300)  # acks=all: on both brokers left (min.insync.replicas=2)

    cons = KafkaConsumer(s.kafka.events_topic, bootstrap_servers=s.kafka.servers, group_id=None,
                         auto_offset_reset="earliest", consumer_timeout_ms=5000)
    got = [json.loads(r.value)["event_id"] for r in cons]
    cons.close()
    assert sorted(got) == sorted(ids)  # every acknowledged write, once: idempotent retries

    second = next(n for n in nodes.values() if n != leader)
    os.kill(stack.running_pid(s, second.name), signal.SIGKILL)
    with pytest.raises(KafkaError):  # one broker in sync is fewer than min.insync.replicas: refused
        _produce(s, 1, request_timeout_ms=2000, delivery_timeout_ms=6000, max_block_ms=6000)
    # The last broker has lost its controller quorum: it could not shut down in order, and would
    # hold the teardown for stack's whole SIGTERM grace (30 s) before being killed anyway.
    last = next(n for n in nodes.values() if n not in (leader, second))
    os.kill(stack.running_pid(s, last.name), signal.SIGKILL)
