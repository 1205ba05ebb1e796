"""Issue 17: the online features on a real 3-master Redis Cluster, started by the project's own
stack (``recsys stack up --redis-cluster 3``): every script stays in one slot, the keys spread
over the masters, MovieLens-100K is exact, and the API answers from the cluster."""
from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest

from lab import stack
from recsys.events import Event
from recsys.feature_store import FeatureStore, Pending, SentEvents
from recsys.features import MemoryStore
from tests.conftest import Scratch, plain_api
from tests.test_stream_integration import assert_features_match, stream_json

CLUSTER_PORT = 27379  # masters on 27379, 27479, 27579; their cluster bus on + 1000
API_PORT = 28093


@pytest.fixture(scope="module")
def cluster(live_stack, tmp_path_factory):
    """The cluster's settings: its own folder and ports, the stack's Kafka and secrets."""
    home = tmp_path_factory.mktemp("redis-cluster")
    settings = live_stack.updated(home=home, redis={"port": CLUSTER_PORT, "cluster_masters": 3})
    done = subprocess.run([sys.executable, "-m", "cli", "stack", "up", "--redis-cluster", "3", "--json"],
                          env=_env(settings), capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["redis"]["cluster_masters"] == [f"127.0.0.1:{CLUSTER_PORT + 100 * i}" for i in range(3)]
    yield settings
    stack.stop_redis(settings)


@pytest.fixture
def on_cluster(cluster, tmp_path, request):
    s = Scratch(cluster, tmp_path, request.node.name[:16].replace("_", "-"))
    yield s
    s.close()


def _env(settings) -> dict:
    from lab.bench.stream import settings_env
    return settings_env(settings)


def ev(n: int, user: str, item: str, ts: int = 1_700_000_000_000) -> Event:
    return Event(event_id=f"e{n}", user_id=user, item_id=item, type="click", ts=ts + n)


def test_movielens_is_exact_on_the_cluster_and_a_replay_changes_nothing(on_cluster, ml100k):
    s = on_cluster.settings
    assert stream_json(on_cluster.cli("replay", "--source", f"movielens:{ml100k}", "--quiet"))["produced"] == 100_000
    stats = stream_json(on_cluster.cli("stream", "--until-idle", "3"))
    assert stats == {"consumed": 100_000, "applied": 100_000, "duplicates": 0, "dlq": 0}
    assert_features_match(s, ml100k, pseudonymized=True)
    store = FeatureStore(s)
    per_master = [sum(1 for _ in stack.redis_at(s, port).scan_iter(match=f"{s.redis.prefix}:*", count=1000))
                  for _, port in stack.redis_nodes(s)]
    assert min(per_master) > 0.15 * sum(per_master), f"keys per master: {per_master}"
    trending = store.trending(50)
    # The same events again (new records, new offsets): every one is a retry of an applied id.
    assert stream_json(on_cluster.cli("replay", "--source", f"movielens:{ml100k}", "--quiet", "--limit", "20000"))["produced"] == 20_000
    again = stream_json(on_cluster.cli("stream", "--until-idle", "3"))
    assert again == {"consumed": 20_000, "applied": 0, "duplicates": 20_000, "dlq": 0}
    assert_features_match(s, ml100k, pseudonymized=True)
    assert store.trending(50) == trending


@pytest.mark.parametrize("where", ["one Redis", "cluster"])
def test_a_crash_between_the_user_and_item_scripts_applies_each_half_once(where, scratch, on_cluster):
    """The user scripts of a batch ran, the item scripts did not (the worker died between them):
    the batch again applies only the item halves, and a client's retry of one event (same id, a
    later offset) applies nothing, even when its first pass stopped between the scripts too."""
    s = (scratch if where == "one Redis" else on_cluster).settings
    store = FeatureStore(s)
    events = [ev(n, f"u{n % 5}", f"i{n % 11}") for n in range(200)]
    positions = [("t", 0, n) for n in range(200)]
    SentEvents(store, events, positions).user_verdicts()  # the user half only: then the "crash"
    assert sum(sum(store.item_counts(f"i{k}").values()) for k in range(11)) == 0
    assert store.apply_events(events, positions) == [False] * 200  # replays: each item half once
    retry = [ev(7, "u2", "i7")]  # event e7 again, as a new record at offset 200
    assert SentEvents(store, retry, [("t", 0, 200)]).user_verdicts() == [0]
    assert store.apply_events(retry, [("t", 0, 200)]) == [False]
    memory = MemoryStore(s.redis.prefix, s.features.recent_items, s.features.trending_half_life_s)
    memory.apply_events(events)
    assert [store.item_counts(f"i{k}") for k in range(11)] == [memory.item_counts(f"i{k}") for k in range(11)]
    assert [store.user(f"u{k}").to_json() for k in range(5)] == [memory.user(f"u{k}").to_json() for k in range(5)]
    online, offline = store.trending(11), memory.trending(11)
    assert [i for i, _ in online] == [i for i, _ in offline]
    assert [w for _, w in online] == pytest.approx([w for _, w in offline], rel=1e-12)
    assert store.applied_offsets("t", [0, 1]) == {0: 200, 1: None}
    assert isinstance(Pending(store.redis, []).replies(), list)


def test_the_api_answers_from_the_cluster(on_cluster):
    """serving.plain (the replica's own app under uvicorn) on the cluster: the API key's check,
    the user's features and every trending shard in one pipelined round trip. With no model
    the answer is the trending items the user has not seen."""
    s = on_cluster.settings
    store = FeatureStore(s)
    events = [ev(n, "someone" if n % 4 == 0 else f"u{n % 9}", f"i{n % 30}") for n in range(400)]
    from recsys.privacy import Pseudonyms
    pseudonym = Pseudonyms.of(s).user_id
    store.apply_events([e.model_copy(update={"user_id": pseudonym(e.user_id)}) for e in events])
    with plain_api(s, API_PORT, on_cluster.api_key()) as api:
        got = api.get("/v1/recommendations/someone?k=10")
        assert got.status_code == 200, got.text
        body = got.json()
        seen = store.user(pseudonym("someone")).seen
        assert seen and body["fallback"] is True
        want = [item for item, _ in store.trending(20) if item not in seen][:10]
        assert [x["item_id"] for x in body["items"]] == want
        assert httpx.get(f"{api.base_url}/v1/recommendations/someone?k=10", timeout=10).status_code == 401
