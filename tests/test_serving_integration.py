"""Issue 4 acceptance: the Ray Serve API against the real stack, with a model trained by Ray Train.

Module flow: MovieLens-100K split by the evaluation protocol; the training part is replayed
through Kafka, streamed into Redis and archived; `recsys train --source archive` trains on it;
the Serve app answers from Redis features. A stream worker runs for the whole module so that
posted events reach Redis.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import json
import shutil
import socket
import threading
import time

import httpx
import pytest
from kafka import KafkaConsumer

from lab import stack
from recsys.evaluation import split_table
from recsys.feature_store import FeatureStore
from recsys.kafka_io import replay
from recsys.privacy import Pseudonyms
from recsys.registry import Registry
from recsys.sources import MovieLensSource
from recsys.training_data import events_table, iter_events
from lab.serve_local import serve_delete, serve_up
from training.job import evaluate_version


@pytest.fixture(scope="module")
def served(module_scratch, ml100k):
    s = module_scratch
    table = events_table(MovieLensSource(ml100k).events_iter())
    split = split_table(table)
    train = table.filter(~split.is_test)
    replay(Pseudonyms.of(s.settings).events(iter_events(train)), s.settings, progress=False)  # as `recsys replay` does
    s.cli("archive", "--until-idle", "3")
    s.cli("stream", "--until-idle", "3")
    card = json.loads(s.cli("train", "--source", "archive", "--workers", "2", "--json").stdout.strip().splitlines()[-1])
    worker = s.popen("stream")  # keeps Redis fresh for the posted events
    serve_up(s.settings, progress=lambda *_: None)
    client = s.client()
    yield {"scratch": s, "table": table, "split": split, "card": card, "client": client}
    client.close()
    worker.terminate()
    worker.wait(timeout=30)
    serve_delete(s.settings)


def recs(client, user, k=10):
    resp = client.get(f"/v1/recommendations/{user}", params={"k": k})
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_served_hr_equals_offline_evaluation(served):
    """Through Kafka, Redis and HTTP, the served answers are exactly those of the same model and
    ANN index in-process on point-in-time features, and their HR@10 is the offline evaluation's
    up to the index's approximation (offline scores every item exactly; the index's recall@10
    is about 0.99, so it may miss a few held-out items: 0.005 once, i.e. 5 of 943 users); and
    it is at least offline EASE's on the same split."""
    from recsys.model import load_model
    from recsys.training_data import iter_point_in_time
    from serving.recommend import recommend
    s, split, client, table = served["scratch"], served["split"], served["client"], served["table"]
    registry = Registry(s.settings.registry_dir)
    pseudonym = Pseudonyms.of(s.settings).user_id  # the model knows users by their pseudonyms
    known_as_stored = events_table(Pseudonyms.of(s.settings).events(iter_events(table)))
    offline = evaluate_version(registry.path(served["card"]["version"]), known_as_stored, s.settings)
    model = load_model(registry.path(served["card"]["version"]))
    rows = {int(r): n for n, r in enumerate(split.test_index)}
    feats = [None] * len(rows)
    for r, (_, f) in enumerate(iter_point_in_time(table, s.settings.features.recent_items)):
        if r in rows:
            feats[rows[r]] = dataclasses.replace(f, user_id=pseudonym(f.user_id))
    hits = in_process_hits = 0
    for n, (u, i) in enumerate(zip(split.test_users, split.test_items)):
        answer = recs(client, split.user_ids[u])
        assert answer["model_version"] == served["card"]["version"] and not answer["fallback"]
        hits += split.item_ids[i] in [x["item_id"] for x in answer["items"]]
        in_process_hits += split.item_ids[i] in recommend(model, feats[n], 10, trending=[]).items
    served_hr = hits / len(split.test_users)
    offline_hr = offline["metrics"]["two_tower"]["hr@10"]
    m = offline["metrics"]
    print(f"served HR@10 {served_hr:.4f}, same model in-process {in_process_hits / len(split.test_users):.4f}, "
          f"offline (exact scoring) {offline_hr:.4f}, EASE {m['ease']['hr@10']:.4f}, "
          f"recency-weighted EASE {m['recency_ease']['hr@10']:.4f}, item-kNN {m['itemknn']['hr@10']:.4f}")
    assert hits == in_process_hits
    assert abs(served_hr - offline_hr) <= 0.005  # the ANN's approximation only (issue 14)
    assert served_hr >= m["ease"]["hr@10"]  # a floor: through the whole pipeline, at least EASE offline


def test_a_click_is_reflected_in_recent_items_and_leaves_the_recommendations(served):
    """Behaviour, not speed: freshness is measured by ``recsys bench stream`` (p50/p99), since a
    wall-clock threshold here fails whenever the 2-core machine is busy. The deadline only
    catches a hang; the elapsed time is printed."""
    client = served["client"]
    user = served["split"].user_ids[served["split"].test_users[0]]
    clicked = recs(client, user)["items"][0]["item_id"]
    resp = client.post("/v1/events", json={"event_id": f"fresh-{time.time_ns()}", "user_id": user,
                                           "item_id": clicked, "type": "click", "ts": int(time.time() * 1000)})
    assert resp.status_code == 202 and resp.json() == {"accepted": 1}
    posted = time.monotonic()
    store = FeatureStore(served["scratch"].settings)
    pseudonym = Pseudonyms.of(store.settings).user_id(user)
    while True:
        elapsed = time.monotonic() - posted
        gone = clicked not in [x["item_id"] for x in recs(client, user)["items"]]
        recent = store.user(pseudonym).recent[:1] == [clicked]
        if gone and recent:
            break
        assert elapsed < 30, f"after {elapsed:.2f}s: absent from recommendations {gone}, in recent items {recent}"
        time.sleep(0.02)
    print(f"click reflected after {elapsed * 1000:.0f} ms")


def test_new_user_gets_trending_then_personal_items(served):
    client, store = served["client"], FeatureStore(served["scratch"].settings)
    user = f"newcomer-{time.time_ns()}"
    # A replica answers a cold start from its trending cache, which lags Redis by at most
    # serving.trending_cache_s: within that bound (and no events meanwhile) the two agree.
    deadline = time.monotonic() + 2 * served["scratch"].settings.serving.trending_cache_s + 1
    while True:
        first = recs(client, user)
        trending = [item for item, _ in store.trending(10)]
        assert first["fallback"], first
        if [x["item_id"] for x in first["items"]] == trending:
            break
        assert time.monotonic() < deadline, (first["items"], trending)
        time.sleep(0.1)
    clicked = ["50", "181", "100"]
    events = [{"event_id": f"{user}-{n}", "user_id": user, "item_id": item, "type": "click",
               "ts": int(time.time() * 1000) + n} for n, item in enumerate(clicked)]
    assert client.post("/v1/events", json=events).json() == {"accepted": 3}
    deadline = time.monotonic() + 5
    while (answer := recs(client, user))["fallback"]:
        assert time.monotonic() < deadline, "still the fallback 5 s after the user's events"
        time.sleep(0.05)
    assert len(answer["items"]) == 10 and not set(clicked) & {x["item_id"] for x in answer["items"]}


def _hammer(client, users, stop: threading.Event, log: list):
    """One client: requests back to back, each logged with the time it was sent."""
    with httpx.Client(base_url=client.base_url, headers=client.headers, timeout=10) as own:
        n = 0
        while not stop.is_set():
            sent = time.monotonic()
            resp = own.get(f"/v1/recommendations/{users[n % len(users)]}", params={"k": 10})
            log.append((sent, resp.status_code, resp.json().get("model_version")))
            n += 1


CLIENTS = 8


def _swap_under_load(served, change, expect: str):
    """Eight concurrent clients across the replicas; the swap must fail nothing, and every
    request sent 3 s or more after it must be answered by the new version."""
    client, split = served["client"], served["split"]
    users = [split.user_ids[u] for u in split.test_users[:80]]
    logs, stop = [[] for _ in range(CLIENTS)], threading.Event()
    threads = [threading.Thread(target=_hammer, args=(client, users[i::CLIENTS], stop, logs[i])) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    swapped = time.monotonic()
    change()
    time.sleep(5.0)
    stop.set()
    for t in threads:
        t.join()
    log = sorted(entry for per_client in logs for entry in per_client)
    assert all(status == 200 for _, status, _ in log), "a request failed during the swap"
    late = [v for sent, _, v in log if sent >= swapped + 3.0]
    assert len(late) >= CLIENTS and set(late) == {expect}, f"3 s after the swap: {set(late)}"
    first_new = next(sent for sent, _, v in log if v == expect) - swapped
    print(f"swap to {expect}: {len(log)} requests from {CLIENTS} clients, none failed; first answer of the new "
          f"version {first_new:.2f} s after the swap")


def test_promote_and_rollback_swap_without_failures_across_two_replicas(served, tmp_path):
    import yaml

    from lab.serve_local import CONFIG, replicas
    s = served["scratch"]
    config = yaml.safe_load(CONFIG.read_text())
    scaling = config["applications"][0]["deployments"][0]["autoscaling_config"]
    scaling.update(min_replicas=2, initial_replicas=2)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    serve_up(s.settings, config_path=tmp_path / "config.yaml", progress=lambda *_: None)
    try:
        deadline = time.monotonic() + 120
        while replicas().get("RecsysApi", 0) < 2:
            assert time.monotonic() < deadline, f"still {replicas()} replicas"
            time.sleep(1)
        registry = Registry(s.settings.registry_dir)
        v1 = served["card"]["version"]
        # A second version: the same artifact files under a new version (what is tested is the swap).
        v2 = registry.publish(lambda folder, version: _copy_version(registry.path(v1), folder, version), promote=False)
        _swap_under_load(served, lambda: registry.promote(v2), v2)
        _swap_under_load(served, registry.rollback, v1)
        assert registry.current() == v1 and replicas().get("RecsysApi", 0) >= 2
    finally:
        serve_up(s.settings, progress=lambda *_: None)  # back to the configured autoscaling


def test_a_corrupt_version_is_refused_and_a_new_replica_starts_on_the_last_good_one(served):
    """Issue 12: a promoted version with a truncated .npy fails its sha256 check. Running
    replicas keep serving the good version and say so in /readyz, the failure is counted in
    /metrics, and a new replica (the same start-up code, in this process) starts on the last
    good version instead of crash-looping."""
    from serving.app import RecsysService
    s, client = served["scratch"], served["client"]
    registry = Registry(s.settings.registry_dir)
    good = registry.current()
    assert registry.show(good)["files"], "a trained version carries its files' sha256"
    bad = registry.publish(lambda folder, version: _copy_version(registry.path(good), folder, version), promote=False)
    embeddings = registry.path(bad) / "item_embeddings.npy"
    embeddings.write_bytes(embeddings.read_bytes()[:1000])
    registry.promote(bad)
    try:
        deadline = time.monotonic() + 15
        while not (ready := client.get("/readyz").json()).get("model_load_failure"):
            assert time.monotonic() < deadline, f"no replica noticed the corrupt version: {ready}"
            time.sleep(0.5)
        assert ready["model"] == good and ready["model_load_failure"]["version"] == bad
        assert "/" not in ready["model_load_failure"]["error"]  # no key needed: its type, no path (issue 35)
        assert recs(client, "1")["model_version"] == good
        fresh = RecsysService(s.settings, model_poll_s=3600)
        assert fresh.version == good and fresh.load_failure["version"] == bad
        deadline = time.monotonic() + 60
        while "recsys_model_load_failures_total" not in client.get("/metrics").text:
            assert time.monotonic() < deadline, "the load failure was not counted in /metrics"
            time.sleep(1)
    finally:
        registry.rollback()
    assert registry.current() == good


def _histogram(text: str, name: str, version: str) -> dict[str, float]:
    """A Ray-exported histogram's bucket counts by upper bound, summed over the processes."""
    from prometheus_client.parser import text_string_to_metric_families
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == f"ray_{name}_bucket" and sample.labels.get("version") == version:
                out[sample.labels["le"]] = out.get(sample.labels["le"], 0.0) + sample.value
    return out


def test_an_ab_experiment_splits_users_stably_and_a_shadow_is_only_measured(served):
    """Issue 18 (point 3): `recsys models candidate V --share 0.5` serves V to the users whose
    pseudonym hashes into its half, the same users every time, and their impressions name the
    arm; `--shadow` serves the current model to everyone and only measures the candidate
    (overlap@k with the served list, latency); `recsys models promote V` ends the experiment."""
    from kafka import KafkaConsumer

    from recsys.experiments import in_candidate_arm
    from recsys.impressions import decode_record
    from recsys.kafka_io import connection
    s, client = served["scratch"], served["client"]
    registry = Registry(s.settings.registry_dir)
    v1 = registry.current()
    v2 = registry.publish(lambda folder, version: _copy_version(registry.path(v1), folder, version), promote=False)
    pseudonym = Pseudonyms.of(s.settings).user_id
    users = [str(u) for u in range(1, 201)]
    arms = {u: in_candidate_arm(pseudonym(u), 0.5, v2) for u in users}
    assert 0.35 < sum(arms.values()) / len(users) < 0.65

    def versions(some):
        return {u: recs(client, u)["model_version"] for u in some}

    def follow(want: dict, what: str):
        deadline = time.monotonic() + 30
        while (got := versions(want)) != want:
            assert time.monotonic() < deadline, f"the replicas did not follow {what}: {got}"
            time.sleep(0.5)

    try:
        s.cli("models", "candidate", v2, "--share", "0.5")
        follow({u: v2 if arms[u] else v1 for u in users[:20]}, "the A/B experiment")
        answers = {u: recs(client, u) for u in users}
        assert {u: a["model_version"] for u, a in answers.items()} == {u: v2 if arms[u] else v1 for u in users}
        assert versions(users[:50]) == {u: answers[u]["model_version"] for u in users[:50]}  # stable
        consumer = KafkaConsumer(s.settings.kafka.impressions_topic, **connection(s.settings), group_id=None,
                                 auto_offset_reset="earliest", consumer_timeout_ms=5000)
        shown = {imp.request_id: imp for r in consumer for imp in decode_record(r.value)[0]}
        consumer.close()
        for u, answer in answers.items():
            imp = shown[answer["request_id"]]
            assert (imp.arm, imp.model_version, imp.user_id) == (("candidate", v2) if arms[u] else ("current", v1)) + (pseudonym(u),)

        s.cli("models", "candidate", v2, "--share", "1.0", "--shadow")
        follow({u: v1 for u in users[:20]}, "the shadow experiment")
        assert set(versions(users).values()) == {v1}
        deadline = time.monotonic() + 60
        while not (buckets := _histogram(client.get("/metrics").text, "recsys_shadow_overlap", v2)).get("+Inf"):
            assert time.monotonic() < deadline, "no shadow overlap exported within 60 s"
            versions(users[:20])
            time.sleep(1)
        # The candidate is a copy of the served version: every shadow list equals the served one.
        assert buckets["0.99"] == 0 and buckets["+Inf"] > 0
        s.cli("models", "promote", v2)
        follow({u: v2 for u in users[:20]}, "the promotion")
        assert registry.experiment() is None
    finally:
        registry.promote(v1)
    assert registry.current() == v1


def _but_request_id(answer):
    """An answer without its request id, which names each answer apart."""
    return {k: v for k, v in answer.items() if k != "request_id"} if isinstance(answer, dict) else answer


def _copy_version(src, dst, version):
    shutil.copytree(src, dst, dirs_exist_ok=True)
    card = json.loads((dst / "model_card.json").read_text())
    (dst / "model_card.json").write_text(json.dumps({**card, "version": version}))


@pytest.mark.parametrize("path, status, field", [
    ("/v1/recommendations/1?k=0", 422, "k"),
    ("/v1/recommendations/1?k=101", 422, "k"),
    ("/v1/recommendations/1?k=ten", 422, "k"),
])
def test_bad_queries_give_422_with_the_field(served, path, status, field):
    resp = served["client"].get(path)
    assert resp.status_code == status and resp.json()["detail"][0]["loc"][-1] == field


def test_hostile_input_gets_4xx_without_being_read_whole(served):
    client = served["client"]
    resp = client.get("/v1/recommendations/" + "u" * 129)  # longer than any stored id
    assert resp.status_code == 422 and resp.json()["detail"][0]["loc"] == ["path", "user_id"]
    resp = client.get("/v1/recommendations/" + "u" * 20_000)  # got 200 before; over HAProxy's request buffer now
    assert resp.status_code in (400, 414, 422)

    def chunks():  # no Content-Length: the 413 must come from counting the chunks
        for _ in range(5000):
            yield b" " * 1024
    resp = client.post("/v1/events", content=chunks(), headers={"content-type": "application/json"})
    assert resp.status_code == 413 and "bytes" in resp.json()["detail"]
    body = client.get("/openapi.json").json()["paths"]["/v1/events"]["post"]["requestBody"]
    schema = body["content"]["application/json"]["schema"]
    assert {"$ref": "#/components/schemas/Event"} in schema["anyOf"]  # the body is published, for fuzzers


def test_a_client_sending_a_byte_a_second_gets_408_and_holds_no_replica(served):
    settings = served["scratch"].settings
    limit = settings.serving.request_read_timeout_s
    with socket.create_connection((settings.serving.host, settings.serving.port), timeout=limit + 20) as slow:
        slow.sendall(b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n")
        started, answer = time.monotonic(), b""
        slow.settimeout(1.0)
        while time.monotonic() - started < limit + 15:
            try:
                slow.sendall(b" ")  # one byte a second
            except OSError:  # closed on us: read what it said
                pass
            try:
                answer = slow.recv(200)
                break
            except TimeoutError:  # meanwhile everyone else is served
                assert served["client"].get("/healthz").status_code == 200
        waited = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert limit - 1 <= waited <= limit + 10


def test_bad_events_and_oversized_batches_give_422(served):
    client = served["client"]
    resp = client.post("/v1/events", content=b"{not json", headers={"content-type": "application/json"})
    assert resp.status_code == 422 and "malformed JSON" in resp.json()["detail"][0]["msg"]
    resp = client.post("/v1/events", json={"event_id": "x", "user_id": "u", "item_id": "i", "type": "teleport", "ts": 1})
    assert resp.status_code == 422 and resp.json()["detail"][0]["loc"] == ["body", 0, "type"]
    resp = client.post("/v1/events", json=[{"event_id": "x", "user_id": "u", "item_id": "i", "type": "view"}])
    assert resp.status_code == 422 and resp.json()["detail"][0]["loc"] == ["body", 0, "ts"]
    event = {"event_id": "x", "user_id": "u", "item_id": "i", "type": "rating", "ts": int(time.time() * 1000)}
    for field, bad in (("ts", {"ts": 10**15}), ("ts", {"ts": 1}), ("value", {"value": float("nan")})):
        resp = client.post("/v1/events", content=json.dumps({**event, **bad}), headers={"content-type": "application/json"})
        assert resp.status_code == 422 and resp.json()["detail"][0]["loc"] == ["body", 0, field], (bad, resp.text)
    for field, bad in (("ts", {"ts": event["ts"] + 0.5}), ("ts", {"ts": str(event["ts"])}), ("value", {"value": False}),
                       ("item_id", {"item_id": 7})):
        resp = client.post("/v1/events", json={**event, **bad})  # strict JSON types, as the schema says
        assert resp.status_code == 422 and resp.json()["detail"][0]["loc"] == ["body", 0, field], (bad, resp.text)
    big = [{**event, "event_id": str(n)} for n in range(1001)]
    resp = client.post("/v1/events", json=big)
    assert resp.status_code == 422 and "1000" in resp.json()["detail"][0]["msg"]


def test_health_ready_docs_and_metrics(served):
    client = served["client"]
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["model"] == served["card"]["version"]
    assert "/v1/recommendations/{user_id}" in client.get("/openapi.json").json()["paths"]
    names = ("ray_recsys_stage_ms", "recsys_request_latency_ms", "recsys_fallback_total",
             "recsys_model_version_info", "recsys_events_accepted_total")
    # Ray exports each metric on its own schedule, seconds apart under load: wait for all of them.
    deadline = time.monotonic() + 60
    while missing := [name for name in names if name not in client.get("/metrics").text]:
        assert time.monotonic() < deadline, f"not exported within 60 s: {missing}"
        time.sleep(1)


def test_redis_down_gives_503_quickly_then_recovers(served):
    client, settings = served["client"], served["scratch"].settings
    stack.stop_redis(settings)
    try:
        started = time.monotonic()
        resp = client.get("/v1/recommendations/1")
        assert resp.status_code == 503 and "Redis" in resp.json()["detail"]
        assert resp.headers["retry-after"] == "1"  # when to try again
        # Fails fast instead of hanging (1 s socket timeout, one retry): a hang would hit the
        # client's 10 s timeout. The bound is generous so a busy machine does not trip it.
        assert time.monotonic() - started < 8.0
        # Readiness answers from a check at most serving.readiness_cache_s (1 s) old: not ready
        # once a check after the outage has run.
        deadline = time.monotonic() + 10
        while client.get("/readyz").status_code != 503:
            assert time.monotonic() < deadline, "/readyz still ready 10 s into a Redis outage"
            time.sleep(0.2)
    finally:
        stack.start_redis(settings, progress=lambda *_: None)
    assert recs(client, "1")["items"]


def test_kafka_down_gives_503_quickly_then_recovers(served):
    client, settings = served["client"], served["scratch"].settings
    event = {"event_id": f"k-{time.time_ns()}", "user_id": "1", "item_id": "1", "type": "view",
             "ts": int(time.time() * 1000)}
    stack.stop_kafka(settings)
    try:
        started = time.monotonic()
        resp = client.post("/v1/events", json=event)
        assert resp.status_code == 503 and "Kafka" in resp.json()["detail"]
        # the produce timeout (settings.serving.kafka_timeout_s), not a hang (client: 10 s)
        assert time.monotonic() - started < 2 * settings.serving.kafka_timeout_s + 1.0
    finally:
        stack.start_kafka(settings, progress=lambda *_: None)
    deadline = time.monotonic() + 30
    while (resp := client.post("/v1/events", json=event)).status_code != 202:
        assert time.monotonic() < deadline, resp.text
        time.sleep(0.5)
    # Back for consumers too: a fresh consumer group joins and reads (the broker's group
    # coordinator loads after its produce path is up; later tests need both).
    consumer = KafkaConsumer(settings.kafka.events_topic, bootstrap_servers=settings.kafka.servers,
                             group_id=f"after-restart-{time.time_ns()}", auto_offset_reset="earliest")
    try:
        deadline = time.monotonic() + 60
        while not any(consumer.poll(timeout_ms=1000).values()):
            assert time.monotonic() < deadline, "no consumer group could read 60 s after the broker restart"
    finally:
        consumer.close()


def _listeners(pids) -> list[tuple[str, int, int]]:
    """(address, port, pid) of every listening TCP socket of these processes."""
    import psutil
    return [(c.laddr.ip, c.laddr.port, c.pid) for c in psutil.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.pid in pids]


def _loopback(ip: str) -> bool:
    return ipaddress.ip_address(ip.removeprefix("::ffff:")).is_loopback


def _refuses_without_ray_token(port: int) -> bool:
    """A call to Serve's inter-deployment gRPC service without Ray's auth token is refused."""
    import grpc
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            channel.unary_unary("/ray.serve.ASGIService/HandleRequest")(b"", timeout=10)
        except grpc.RpcError as exc:
            return exc.code() == grpc.StatusCode.UNAUTHENTICATED
    return False


def test_every_listening_socket_is_on_loopback_or_refuses_strangers(served):
    """Issue 13 point 7. Every listening socket of the stack: Kafka, Redis, Ray's own processes
    (GCS, raylet, agents, workers: Ray's one-machine mode, recsys.RAY_ENV) and HAProxy (front
    door, stats, Prometheus; through deploy/local/haproxy-loopback) are on loopback, and so are
    the replicas' own HTTP ports, which answer exactly as the front door does, same routes,
    answers and errors, and refuse a request without a key (401). The one socket beyond
    loopback is each replica's inter-deployment gRPC server, which Serve binds to all
    interfaces whatever the node's address: it refuses a call without Ray's auth token."""
    import psutil
    from ray.serve._private.constants import (RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT,
                                              RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT)
    client, settings = served["client"], served["scratch"].settings
    stack_pids = {name: {service["pid"]} for name, service in stack.status(settings).items() if name in ("kafka", "redis")}
    stack_pids["haproxy"] = set(stack.haproxy_pids(settings))
    stack_pids["ray"] = {p.pid for p in psutil.process_iter(["cmdline"])
                         if any("ray" in part for part in (p.info["cmdline"] or [])[:2])} - stack_pids["haproxy"]
    replicas = {p.pid for p in psutil.process_iter(["cmdline"])
                if " ".join(p.info["cmdline"] or []).startswith("ray::ServeReplica:recsys:RecsysApi")}
    listed, guarded = [], []
    for name, pids in stack_pids.items():
        own = _listeners(pids)
        listed += [(name, ip, port) for ip, port, _ in own]
        assert own, f"no listening socket found for {name}"
        beyond = [(ip, port, pid) for ip, port, pid in own if not _loopback(ip)]
        guarded += [(ip, port) for ip, port, pid in beyond if pid in replicas and _refuses_without_ray_token(port)]
        unguarded = [(ip, port) for ip, port, _ in beyond if (ip, port) not in guarded]
        assert not unguarded, f"{name} listens beyond loopback: {unguarded}"
    print("listening sockets:", json.dumps(sorted(set(listed))), "beyond loopback, refusing without Ray's token:",
          json.dumps(guarded))
    assert ("haproxy", "127.0.0.1", settings.serving.port) in listed
    direct = [port for ip, port, _ in _listeners(replicas)
              if RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT <= port <= RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT]
    assert direct, "no replica answers HTTP on its own port: is the HAProxy ingress on?"
    stranger = {"event_id": "x", "user_id": "1", "item_id": "1", "type": "view", "ts": int(time.time() * 1000)}
    for port in direct:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10, headers=client.headers) as replica, \
                httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as no_key:
            # User 5: no test posts events for them, so the answer cannot change between the two reads.
            for path in ("/v1/recommendations/5?k=5", "/v1/recommendations/2?k=0", "/healthz", "/nope"):
                front, own = client.get(path), replica.get(path)
                assert (front.status_code, _but_request_id(front.json())) == (own.status_code, _but_request_id(own.json())), (port, path)
            bad = {"event_id": "x", "user_id": "1", "item_id": "1", "type": "nope", "ts": 1}
            assert replica.post("/v1/events", json=bad).json() == client.post("/v1/events", json=bad).json()
            assert no_key.get("/v1/recommendations/1").status_code == 401
            assert no_key.post("/v1/events", json=stranger).status_code == 401
            assert no_key.get("/metrics").status_code == 401


def test_serve_down_and_ray_stop_leave_no_haproxy_and_a_redeploy_works(served):
    """Last in this module: it takes the app down twice. HAProxy runs while Serve does;
    `recsys serve down` and `ray stop` (also `recsys stack down`) leave none behind, so the
    next deploy can bind its ports."""
    import ray

    from lab.serve_local import serve_down
    client, settings = served["client"], served["scratch"].settings
    assert stack.haproxy_pids(settings), "the HAProxy ingress is not running"
    serve_down(settings)
    assert not stack.haproxy_pids(settings)
    serve_up(settings, progress=lambda *_: None)
    assert recs(client, "1")["items"] and stack.haproxy_pids(settings)
    ray.shutdown()  # this process's connection to the cluster about to stop
    stack.stop_ray(settings)
    assert not stack.haproxy_pids(settings) and not stack.ray_address(settings)
    serve_up(settings, progress=lambda *_: None)
    assert recs(client, "1")["items"]
