"""recsys capacity: the plan from the benches' saved figures (pure, fast), the figure files, the
command's clear error without them, and `recsys bench redis-memory` against the real Redis."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lab import capacity
from lab.bench import store as bench_store
from lab.capacity import Figure, Load, MissingFigures
from recsys.model import ModelConfig
from recsys.settings import Settings

# What the benches save (abridged to the fields the plan reads), as bench_store.save writes them.
STAMP = {"measured_at": "2026-12-01T21:00:00+00:00", "commit": "abc1234"}
SAVED = {
    "serve": {"replicas": 2, "variants": {"c": {"rps": 800.0, "cpu_ms_per_request": 2.0}}, **STAMP},
    "stream": {"events": 50_000, "worker_events_per_s": 17_000.0, **STAMP},
    "redis-memory": {"events": 100_000, "users": 2000, "items": 1000, "bytes_per_user": 1500.0,
                     "events_per_user": {"mean": 50.0}, "bytes_per_item": 150.0,
                     "bytes_per_event_in_dedup_window": 90.0, "redis_cpu_us_per_event": 25.0,
                     "redis_cpu_us_per_request": 15.0,
                     "redis_cpu_us_per_event_by_script": {"user": 6.0, "item": 4.0},
                     "redis_cpu_us_per_request_by_part": {"user": 9.0, "per_trending_shard": 6.0}, "kafka_record_bytes": {"mean": 170.0}, **STAMP},
    "ann": {"faiss": "1.15.0", "sizes": {
        "10000": {"indexes": {"ivf_int8": {"bytes_per_item": 79.0, "p99_ms": 0.016, "recall@10": 0.97}}},
        "1000000": {"indexes": {"ivf_int8": {"bytes_per_item": 73.0, "p99_ms": 0.09, "recall@10": 0.96}}}}, **STAMP},
    "train": {"source": "movielens:x", "items": 1682, "examples_per_s_1_worker": 30_000.0, **STAMP},
}
BASE = {**capacity.PUBLISHED, **capacity.ASSUMED, **capacity.settings_figures(Settings(), ModelConfig())}
LOAD = Load(rps=100_000, users=100_000_000, items=10_000_000, events_per_s=200_000)


def figures(saved=SAVED, **kw) -> dict[str, Figure]:
    return capacity.resolve(capacity.bench_figures(saved, "ivf_int8"), base=BASE, **kw)


def values(result: dict) -> dict[str, float]:
    return {r["what"]: r["value"] for r in result["plan"]}


def test_the_plan_scales_linearly_with_the_load():
    one, two = (values(capacity.plan(Load(LOAD.rps * k, LOAD.users * k, LOAD.items * k, LOAD.events_per_s * k),
                                     figures())) for k in (1, 2))
    for what in ("CPUs", "replicas", "stream workers", "user features", "item features and trending",
                 "dedup markers", "ANN index", "examples per epoch"):
        assert two[what] == pytest.approx(2 * one[what], rel=0.02, abs=1), what
    # Redis CPU grows faster: twice the events need twice the trending shards, and every request
    # reads each of them. 200k events/s x 4 us of item script / 0.6 = 1.3 cores: 2 shards.
    assert (one["trending shards"], two["trending shards"]) == (2, 3)
    assert one["Redis CPU"] == pytest.approx((200_000 * 25 + 100_000 * (9 + 2 * 6)) / 1e6, abs=0.01)
    assert two["Redis CPU"] > 2 * one["Redis CPU"]
    # 100k req/s x 2 CPU-ms / 0.6 utilisation: 334 CPUs, one per replica
    assert one["CPUs"] == 334 and one["replicas"] == 334
    assert one["stream workers"] == 20  # 200k / (17k x 0.6) = 19.6
    assert one["partitions"] >= one["stream workers"]  # a worker per partition at most
    assert one["requests per replica-CPU"] == 500


def test_redis_shards_when_memory_passes_the_shard_limit():
    few = values(capacity.plan(Load(rps=10, users=1000, items=1000, events_per_s=10), figures()))
    assert few["shards"] == 1
    many = values(capacity.plan(LOAD, figures()))
    limit = capacity.PUBLISHED["redis.max_shard_gb"].value
    assert many["memory (primaries)"] > limit
    assert many["shards"] >= many["memory (primaries)"] / limit
    # Memory alone decides when Redis CPU costs nothing.
    cheap = {**figures(), "redis.cpu_us_per_event": Figure(0.0, "", "test"),
             "redis.cpu_us_per_item_script": Figure(0.0, "", "test"),
             "redis.cpu_us_per_request_user": Figure(0.0, "", "test"),
             "redis.cpu_us_per_trending_read": Figure(0.0, "", "test")}
    mem_only = values(capacity.plan(LOAD, cheap))
    assert mem_only["shards"] == -(-mem_only["memory (primaries)"] // limit)
    assert mem_only["memory with replicas"] == pytest.approx(2 * mem_only["memory (primaries)"], abs=0.1)


def test_every_figure_of_the_plan_has_a_source():
    result = capacity.plan(LOAD, figures())
    assert result["plan"] and result["notes"]
    for row in result["plan"]:
        assert row["uses"] and len(row["sources"]) == len(row["uses"]), row["what"]
        for name in row["uses"]:
            assert result["figures"][name]["source"], name
    kinds = {f["source"].split(":")[0] for f in result["figures"].values()}
    assert kinds <= {"measured", "published", "assumed", "setting"}
    assert result["figures"]["serve.cpu_ms_per_request"]["source"].startswith(
        "measured: .recsys/bench/serve.json") and "abc1234" in result["figures"]["serve.cpu_ms_per_request"]["source"]
    assert "confluent.io" in result["figures"]["kafka.partition_mb_per_s"]["source"]
    # the ANN figure comes from the largest catalogue measured
    assert result["figures"]["ann.bytes_per_item"]["value"] == 73.0
    assert "Capacity for 100,000 req/s" in capacity.format_plan(result)


def test_a_missing_bench_file_names_the_bench_to_run():
    saved = {k: v for k, v in SAVED.items() if k not in ("stream", "redis-memory")}
    with pytest.raises(MissingFigures) as err:
        figures(saved)
    msg = str(err.value)
    assert "recsys bench stream" in msg and "recsys bench redis-memory" in msg and "--assume-defaults" in msg
    assert "recsys bench serve" not in msg and err.value.exit_code == 2
    # an ann file without the kind this catalogue ships counts as missing
    with pytest.raises(MissingFigures, match="ivf_int8"):
        capacity.resolve(capacity.bench_figures({**SAVED, "ann": {"sizes": {}}}, "ivf_int8"), base=BASE)


def test_defaults_and_overrides_fill_in_marked_as_such():
    saved = {k: v for k, v in SAVED.items() if k != "stream"}
    fig = figures(saved, assume_defaults=True)
    assert fig["stream.events_per_s_per_worker"].source.startswith("default: README")
    assert fig["serve.cpu_ms_per_request"].source.startswith("measured:")  # a saved figure wins over the default
    given = capacity.parse_overrides({"stream.events_per_s_per_worker": {"value": 1000, "source": "a run elsewhere"}},
                                     "f.json")
    fig = figures(saved, overrides={**given, **capacity.parse_set(["target_cpu_utilisation=0.5"])})
    assert fig["stream.events_per_s_per_worker"] == Figure(1000, "events/s per worker", "a run elsewhere (from f.json)")
    assert fig["target_cpu_utilisation"].value == 0.5 and fig["target_cpu_utilisation"].source.startswith("assumed")
    with pytest.raises(Exception, match="needs a numeric value and a source"):
        capacity.parse_overrides({"x": {"value": 1}}, "f.json")
    with pytest.raises(Exception, match="unknown figure"):
        figures(overrides=capacity.parse_set(["no.such_figure=1"]))


def test_bench_store_saves_what_was_printed_with_date_and_commit(tmp_path):
    s = Settings().updated(home=tmp_path)
    assert bench_store.load(s, "stream") is None
    path = bench_store.save(s, "stream", {"worker_events_per_s": 1.5})
    assert path == tmp_path / "bench" / "stream.json"
    saved = bench_store.load(s, "stream")
    assert saved["worker_events_per_s"] == 1.5 and saved["measured_at"].endswith("+00:00")
    assert "commit" in saved  # the short hash, or null outside a git checkout


def _capacity_cli(home, *extra):
    env = {**os.environ, "RECSYS_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "cli", "capacity", "--rps", "100000", "--users", "100000000",
                           "--items", "10000000", "--events-per-s", "200000", *extra],
                          env=env, capture_output=True, text=True, timeout=120)


def test_the_command_exits_2_naming_the_benches_or_plans_with_defaults(tmp_path):
    done = _capacity_cli(tmp_path)
    assert done.returncode == 2, done.stderr
    assert "recsys bench serve" in done.stderr and "recsys bench stream" in done.stderr
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "serve.json").write_text(json.dumps(SAVED["serve"]))
    done = _capacity_cli(tmp_path, "--assume-defaults", "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["figures"]["serve.cpu_ms_per_request"]["source"].startswith("measured: ")
    assert result["figures"]["stream.events_per_s_per_worker"]["source"].startswith("default: ")
    assert result["ann_kind"] == "ivf_int8"


@pytest.fixture(scope="module")
def redis_settings():
    """The suite's Redis, started by the project's own stack code when it is not running (and then
    stopped again); a Redis this module did not start is left running. Only Redis: the bench needs
    no Kafka."""
    from lab import stack
    from recsys.settings import get_settings
    settings = get_settings()
    started = not stack.redis_answers(settings)
    stack.start_redis(settings, progress=lambda *_: None)
    yield settings
    if started:
        stack.stop_redis(settings)


def test_redis_memory_bench_on_the_real_redis(redis_settings):
    from recsys.feature_store import connect
    from lab.bench.redis_memory import bench
    r = bench(redis_settings.updated(redis={"trending_shards": 1}), events=5000, users=300, items=200, reads=200)
    assert r["events"] == 5000 and r["users"] <= 300 and 128 < r["items"] <= 200  # trending past its listpack size
    assert r["bytes_per_user"] > r["bytes_per_item"] > 0 and r["bytes_per_event_in_dedup_window"] > 0
    assert r["trending"]["members"] == r["items"] and r["encodings_of_the_largest"]["trending"] == "skiplist"
    assert r["bytes_per_user"] == pytest.approx(sum(v["mean"] for v in r["bytes_per_user_by_key"].values()), abs=1)
    assert r["redis_cpu_us_per_event"] == pytest.approx(sum(r["redis_cpu_us_per_event_by_script"].values()), abs=0.02)
    assert min(r["redis_cpu_us_per_event_by_script"].values()) > 0 and min(r["redis_cpu_us_per_request_by_part"].values()) > 0
    assert 100 < r["kafka_record_bytes"]["mean"] < 400  # a JSON event keyed by its 33-character pseudonym
    assert not list(connect(redis_settings).scan_iter(match=f"{r['prefix']}:*"))  # its keys are gone
