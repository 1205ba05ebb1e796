"""Issue 18 (point 5): new items without a retrain. A catalogue entry (item id and genres) is
embedded by the served model's content tower and searched beside its ANN index, in every replica."""
from __future__ import annotations

import contextlib
import json
import time

import httpx
import numpy as np
import pytest

from recsys.auth import Scope
from recsys.catalogue import CatalogueEntry, CatalogueFollower, CatalogueKeys, queue_put
from recsys.feature_store import FeatureStore
from recsys.features import SEEN_POLICIES
from recsys.kafka_io import replay
from recsys.model import ContentTower, FreshItems
from recsys.privacy import Pseudonyms
from recsys.sources import open_source
from tests.conftest import plain_api

API_PORTS = (28095, 28096)  # two replicas of the app
LATE_PORT = 28097


# ---- pure logic ---------------------------------------------------------------------------------

def test_fresh_items_merge_with_the_index_best_first_and_take_updates():
    ids = ["a", "b", "c"]
    fresh = FreshItems(ids, dim=2)
    q = np.array([[1.0, 0.0]], dtype=np.float32)
    idx, scores = np.array([[2, 0, -1]]), np.array([[0.9, 0.5, 0.0]], dtype=np.float32)
    assert fresh.merge(q, idx, scores, 3)[0].tolist() == [[2, 0, -1]]  # nothing fresh: the index's answer
    fresh.add(["n1", "n2"], np.array([[0.7, 0.7], [0.0, 1.0]], dtype=np.float32))
    assert ids == ["a", "b", "c", "n1", "n2"] and len(fresh) == 2
    top, top_scores = fresh.merge(q, idx, scores, 3)
    assert top.tolist() == [[2, 3, 0]] and np.allclose(top_scores, [[0.9, 0.7, 0.5]])
    fresh.add(["n2"], np.array([[1.0, 0.0]], dtype=np.float32))  # a catalogue update: new vector, same row
    assert ids == ["a", "b", "c", "n1", "n2"] and fresh.merge(q, idx, scores, 1)[0].tolist() == [[4]]
    assert fresh.merge(q, idx, scores, 6)[0][0, -1] == -1  # padding stays last


def test_the_content_head_embeds_known_genres_only():
    rng = np.random.default_rng(0)
    weights = {"content_w": rng.normal(size=(2, 5)).astype(np.float32), "content_b": rng.normal(size=5).astype(np.float32),
               "item_table": np.zeros((3, 4), dtype=np.float32)}
    tower = ContentTower(ContentTower.weights(weights), ["drama", "noir"])
    got = tower.embed([["drama"], ["noir", "unheard-of"], ["noir", "drama"]])
    mh = np.array([[1, 0], [0, 1], [1, 1]], dtype=np.float32)
    expected = mh @ weights["content_w"] + weights["content_b"]
    assert np.allclose(got, expected / np.linalg.norm(expected, axis=1, keepdims=True), atol=1e-6)
    assert tower.known(["noir", "unheard-of"]) == ["noir"]
    assert ContentTower.weights({"item_table": weights["item_table"]}) == {}  # a model without genres has none


@pytest.mark.parametrize("body", [{}, {"genres": []}, {"genres": [""]}, {"genres": ["x"] * 33},
                                  {"genres": ["x"], "price": 3}])
def test_a_bad_catalogue_entry_is_refused(body):
    with pytest.raises(ValueError):
        CatalogueEntry(**body)


# ---- against Redis -----------------------------------------------------------------------------

def test_the_follower_reads_the_snapshot_then_the_log_and_again_after_a_trim(scratch):
    redis = FeatureStore(scratch.settings).redis
    keys = CatalogueKeys.of(scratch.settings)

    def put(item, *genres, log_max=100_000):
        pipe = redis.pipeline(transaction=True)
        queue_put(pipe, keys, item, CatalogueEntry(genres=list(genres)), log_max)
        pipe.execute()

    follower = CatalogueFollower(redis, keys)
    assert follower.poll() == {}
    put("x1", "a")
    put("x2", "b", "c")
    assert follower.poll() == {"x1": ["a"], "x2": ["b", "c"]}
    assert follower.poll() == {}
    put("x1", "z")
    assert follower.poll() == {"x1": ["z"]}
    late = CatalogueFollower(redis, keys)
    assert late.poll() == {"x1": ["z"], "x2": ["b", "c"]}  # a new replica: the whole catalogue
    redis.xtrim(keys.log, maxlen=0)  # the log trimmed past what the follower read: read it all again
    put("x3", "d")
    assert follower.poll() == {"x1": ["z"], "x2": ["b", "c"], "x3": ["d"]}
    assert follower.poll() == {}


# ---- end to end ----------------------------------------------------------------------------------

SPEC = "synthetic:events=30000,users=400,items=1000,clusters=10,categories=1,seed=11"


@pytest.fixture(scope="module")
def taste_model(module_scratch):
    """A model trained by the real job on a synthetic source whose items carry their taste
    cluster as a category; the source's events replayed through Kafka into Redis."""
    s = module_scratch
    s.env = {**s.env, "RECSYS_TRAINING_SEEN_POLICY": "choose"}  # the production default (conftest fixes it)
    card = json.loads(s.cli("train", "--source", SPEC, "--workers", "1", "--json").stdout.strip().splitlines()[-1])
    source = open_source(SPEC)
    replay(Pseudonyms.of(s.settings).events(source.events_iter()), s.settings, progress=False)
    s.cli("stream", "--until-idle", "3")
    return s, source, card


def _top(api, user: str, k: int = 50) -> list[str]:
    resp = api.get(f"/v1/recommendations/{user}", params={"k": k})
    assert resp.status_code == 200, resp.text
    assert not resp.json()["fallback"], f"{user} has no history in Redis"
    return [x["item_id"] for x in resp.json()["items"]]


def test_a_new_item_reaches_every_replica_within_5s_and_only_its_cluster(taste_model):
    s, source, card = taste_model
    cluster = 3
    ours = [f"u{k}" for k in np.flatnonzero(source.user_cluster == cluster)]
    others = [f"u{k}" for k in np.flatnonzero(source.user_cluster != cluster)][:60]
    key = s.api_key()
    with contextlib.ExitStack() as stack:
        apis = [stack.enter_context(plain_api(s.settings, port, key)) for port in API_PORTS]
        item = "fresh-c3"
        assert all(item not in _top(api, ours[0]) and api.get("/readyz").json()["fresh_items"] == 0 for api in apis)
        for bad in ({"genres": []}, {"genres": "c3"}, {"tags": ["c3"]}):
            assert apis[0].put(f"/v1/items/{item}", json=bad).status_code == 422
        reader = stack.enter_context(httpx.Client(base_url=f"http://127.0.0.1:{API_PORTS[0]}", headers={
            "Authorization": f"Bearer {s.api_key(Scope.recs_read)}"}))
        assert reader.put(f"/v1/items/{item}", json={"genres": ["c3"]}).status_code == 403
        resp = apis[0].put(f"/v1/items/{item}", json={"genres": [f"c{cluster}", "limited-edition"]})
        put_at = time.monotonic()
        assert resp.status_code == 202, resp.text
        assert resp.json()["unknown_genres"] == ["limited-edition"]
        live_after = {}  # each replica says how many catalogue items its live index holds
        while len(live_after) < len(apis):
            for i, api in enumerate(apis):
                if i not in live_after and api.get("/readyz").json()["fresh_items"] == 1:
                    live_after[i] = time.monotonic() - put_at
            assert time.monotonic() - put_at < 5.0, f"live in {sorted(live_after)} of 2 replicas after 5 s"
            time.sleep(0.1)
        hits_ours = [item in _top(apis[len(u) % 2], u) for u in ours]
        hits_others = [item in _top(apis[len(u) % 2], u) for u in others]
        print(f"new item live on both replicas after {max(live_after.values()):.2f} s; in the top 50 of "
              f"{sum(hits_ours)}/{len(ours)} cluster-{cluster} users and {sum(hits_others)}/{len(others)} others")
        # The content head's quality varies between trainings: 40/40 against 0/60 in one run, 21/40 against 4/60 in
        # another, 37/40 against 7/60 in CI. A list of 50 from 1,001 items holds a given item by chance 5% of the time.
        assert np.mean(hits_ours) >= 0.4 and np.mean(hits_others) <= 0.2, (hits_ours, hits_others)
        assert np.mean(hits_ours) >= 4 * np.mean(hits_others), (hits_ours, hits_others)
        assert card["seen_policy"]["chosen"] in SEEN_POLICIES, card["seen_policy"]
        assert card["version"] == apis[0].get(f"/v1/recommendations/{ours[0]}").json()["model_version"]  # no retrain
        late = stack.enter_context(plain_api(s.settings, LATE_PORT, key))  # a replica started later reads it all
        assert late.get("/readyz").json()["fresh_items"] == 1
        assert [item in _top(late, u) for u in ours] == hits_ours  # and ranks it as the others do
