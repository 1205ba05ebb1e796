"""The peak-season load test: pure logic (shapes, shoppers, SLO evaluation) and one run
against the real stack (Kafka, Redis, Ray Serve) whose stream worker drops out, so nothing-lost
must fail. Then every dashboard query is asked of the real Prometheus.

The smoke and peak profiles themselves are system scenarios, not tests: ``recsys loadtest
--profile smoke|peak --json`` runs one and prints its SLOs and a pass flag (loadtest/README.md).
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from loadtest import report
from loadtest.shapes import PHASES, PROFILES, Profile, get_profile
from loadtest.shoppers import Population, ShopperConfig, zipf_cum_weights

# ---- shapes ----------------------------------------------------------------


def test_profiles_have_every_phase_in_order_and_fit_their_budget():
    for profile in PROFILES.values():
        assert [p.name for p in profile.phases] == list(PHASES)
        assert profile.peak >= 3 * profile.base, "a surge is several times the baseline"
    assert PROFILES["smoke"].duration_s < 120
    assert 7 * 60 <= PROFILES["peak"].duration_s <= 10 * 60


def test_schedule_is_piecewise_linear_and_ends():
    p = Profile("t", base=10, ramp_to=20, peak=50, baseline_s=10, ramp_s=10, surge_s=5, peak_s=10,
                decay_s=10, cooldown_s=5)
    assert p.duration_s == 50
    assert p.windows()["peak"] == (25, 35)
    assert [p.users_at(t) for t in (0, 9.9, 15, 20, 22.5, 25, 34.9, 40, 45, 49.9)] == \
        [10, 10, 15, 20, 35, 50, 50, 30, 10, 10]
    assert p.users_at(50) is None and p.phase_at(50) is None
    assert p.phase_at(26).name == "peak"
    assert p.spawn_rate() >= 2 * (50 - 20) / 5  # follows the surge within a tick
    assert Profile(**json.loads(json.dumps(p.spec()))) == p
    with pytest.raises(ValueError, match="unknown load profile"):
        get_profile("nope")


# ---- shoppers --------------------------------------------------------------


def test_population_is_popularity_skewed_with_new_users():
    pop = Population(ShopperConfig(known_users=1000, user_skew=1.1, new_user_share=0.1), seed=1)
    draws = [pop.shopper() for _ in range(20_000)]
    new = sum(is_new for _, is_new in draws)
    assert 0.08 < new / len(draws) < 0.12
    assert len({uid for uid, is_new in draws if is_new}) == new, "new users are never seen before"
    known = Counter(uid for uid, is_new in draws if not is_new)
    top10 = sum(n for _, n in known.most_common(10))
    assert top10 / sum(known.values()) > 0.3, "a few heavy shoppers make much of the traffic"
    assert known.most_common(1)[0][0] == "u1"


def test_events_are_valid_and_follow_the_mix():
    from recsys.events import Event
    pop = Population(ShopperConfig(event_mix="view=6,click=3,purchase=1", shown_item_share=1.0), seed=2)
    events = [pop.event("u7", shown=["i3", "i4"]) for _ in range(2000)]
    for e in events[:50]:
        Event.model_validate(e)
    assert len({e["event_id"] for e in events}) == len(events)
    assert {e["item_id"] for e in events} == {"i3", "i4"}
    types = Counter(e["type"] for e in events)
    assert set(types) == {"view", "click", "purchase"} and types["view"] > types["click"] > types["purchase"]
    assert np.mean([pop.visit_length() for _ in range(5000)]) == pytest.approx(8, rel=0.1)


def test_shopper_config_from_env():
    c = ShopperConfig.from_env({"LOADTEST_EVENT_SHARE": "0.5", "LOADTEST_KNOWN_USERS": "10",
                                "LOADTEST_EVENT_MIX": "purchase=1"})
    assert (c.event_share, c.known_users, c.mix()) == (0.5, 10, (("purchase",), (1.0,)))
    with pytest.raises(ValueError):
        ShopperConfig.from_env({"LOADTEST_EVENT_MIX": "teleport=1"})
    assert zipf_cum_weights(3, 1.0) == pytest.approx([1, 1.5, 1.5 + 1 / 3])

TASTE = "synthetic:users=500,items=400,clusters=10,categories=1"


def _strip_ids(x):
    """A draw without its uuid parts (new users' ids, event ids), which are not seeded."""
    if isinstance(x, dict):
        return {k: v for k, v in x.items() if k not in ("event_id", "ts")}
    uid, is_new = x
    return ("new" if is_new else uid), is_new


def test_without_a_taste_source_shoppers_are_as_before():
    plain = Population(ShopperConfig(), seed=5)
    knobs = Population(ShopperConfig(click_match=1.0, click_other=1.0, buy_share=1.0), seed=5)
    for pop in (plain, knobs):
        assert pop.reactions("u3", ["i1", "i2"]) == []
    draws = [[_strip_ids(f(pop)) for _ in range(300) for f in (Population.shopper, lambda p: p.event("u1", ["i9"]))]
             for pop in (plain, knobs)]
    assert draws[0] == draws[1]
    assert {e["item_id"] for e in draws[0] if isinstance(e, dict)} - {"i9"}, "popular items besides the shown one"
    assert all(uid.startswith("u") and int(uid[1:]) >= 1 for uid, _ in draws[0][::2] if uid != "new")


def test_taste_shoppers_are_the_sources_users_and_browse_their_own_cluster():
    from recsys.sources import open_source
    src = open_source(TASTE)
    pop = Population(ShopperConfig(taste_source=TASTE, new_user_share=0.0, event_mix="view=1"), seed=3)
    users = Counter(pop.shopper()[0] for _ in range(5000))
    assert all(0 <= int(u[1:]) < 500 for u in users)
    heaviest = int(np.argmax(src.user_activity))
    assert users.most_common(1)[0][0] == f"u{heaviest}", "drawn by the source's activity"
    events = [pop.event("u7", shown=["i1"]) for _ in range(2000)]
    own = np.mean([src.item_cluster[int(e["item_id"][1:])] == src.user_cluster[7] for e in events])
    assert own > 0.75, "mostly of the user's own cluster (the source's taste is 0.8)"


def test_taste_shoppers_click_their_own_cluster_and_the_top_ranks():
    from recsys.sources import open_source
    src = open_source(TASTE)
    pop = Population(ShopperConfig(taste_source=TASTE, click_match=0.4, click_other=0.04, buy_share=0.5), seed=4)
    user = "u11"
    mine = [f"i{k}" for k in np.flatnonzero(src.item_cluster == src.user_cluster[11])]
    others = [f"i{k}" for k in np.flatnonzero(src.item_cluster != src.user_cluster[11])]
    rng = np.random.default_rng(0)
    clicks = Counter()  # (own cluster?, rank) -> clicks
    shown = Counter()
    types = Counter()
    for _ in range(3000):
        items = list(rng.choice(mine, 5, replace=False)) + list(rng.choice(others, 5, replace=False))
        rng.shuffle(items)
        for rank, item in enumerate(items, start=1):
            shown[(item in mine, rank)] += 1
        for e in pop.reactions(user, items):
            assert e["user_id"] == user and e["item_id"] in items
            types[e["type"]] += 1
            if e["type"] == "click":
                clicks[(e["item_id"] in mine, items.index(e["item_id"]) + 1)] += 1
    rate = lambda own, ranks: sum(clicks[(own, r)] for r in ranks) / sum(shown[(own, r)] for r in ranks)  # noqa: E731
    assert rate(True, range(1, 11)) > 5 * rate(False, range(1, 11)), "own-cluster items get far more clicks"
    assert rate(True, [1]) == pytest.approx(0.4, abs=0.05) and rate(False, [1]) == pytest.approx(0.04, abs=0.02)
    by_rank = [rate(True, [r]) for r in range(1, 11)]
    assert by_rank[0] > by_rank[2] > by_rank[9], "higher ranks get more clicks"
    assert rate(True, [2]) == pytest.approx(0.2, abs=0.04)  # 0.4 / 2 ** position_decay
    assert types["click"] > types["add_to_cart"] > types["purchase"] > 0
    assert types["add_to_cart"] / types["click"] == pytest.approx(0.5, abs=0.06)
    assert ShopperConfig.from_env({"LOADTEST_TASTE_SOURCE": TASTE, "LOADTEST_CLICK_MATCH": "0.5"}).click_match == 0.5


# ---- SLO evaluation from recorded samples ------------------------------------

WINDOWS = Profile("t", base=10, ramp_to=20, peak=50, baseline_s=10, ramp_s=10, surge_s=5, peak_s=10,
                  decay_s=10, cooldown_s=5).windows()


def _requests(n_per_s=20, end=50, slow_in_peak_ms=None, failures=0, seed=0):
    rng = np.random.default_rng(seed)
    t = np.sort(rng.uniform(0, end, n_per_s * end))
    lat = rng.uniform(5, 50, len(t))
    if slow_in_peak_ms:
        peak = (t >= 25) & (t < 35)
        lat[np.flatnonzero(peak)[::20]] = slow_in_peak_ms  # 5% of the peak's requests
    ok = np.ones(len(t), dtype=bool)
    ok[:failures] = False
    route = np.where(rng.random(len(t)) < 0.2, report.EVENTS, report.RECS).astype(object)
    return report.Requests(t, route, lat, ok)


GOOD_REPLICAS = [(float(t), 1) for t in range(-3, 18)] + [(float(t), 2) for t in range(18, 30)] + \
    [(float(t), 3) for t in range(30, 42)] + [(float(t), 1) for t in range(42, 60)]


def _by_name(slos):
    return {s["name"]: s for s in slos}


def test_all_slos_pass_on_a_good_run():
    slos = report.evaluate(_requests(), GOOD_REPLICAS, WINDOWS, posted=300, found=300, min_replicas=1)
    assert [s["name"] for s in slos] == ["p99_during_peak", "error_rate", "replicas_up_in_surge",
                                        "replicas_steady", "replicas_down_after", "nothing_lost"]
    assert all(s["passed"] for s in slos), slos
    assert _by_name(slos)["replicas_up_in_surge"]["measured"] == {"baseline": 1, "at_surge_start": 2, "max": 3}


def test_each_slo_fails_on_its_own_fault():
    req = _requests()
    slow = _by_name(report.evaluate(_requests(slow_in_peak_ms=900), GOOD_REPLICAS, WINDOWS, 1, 1,
                                    report.Budgets(p99_ms=500)))
    assert not slow["p99_during_peak"]["passed"] and slow["p99_during_peak"]["measured"] == 900
    errors = _by_name(report.evaluate(_requests(failures=3), GOOD_REPLICAS, WINDOWS, 1, 1))  # 3 of 1000
    assert not errors["error_rate"]["passed"]
    ok_errors = _by_name(report.evaluate(_requests(failures=1), GOOD_REPLICAS, WINDOWS, 1, 1))  # 1 of 1000
    assert ok_errors["error_rate"]["passed"]

    flat = [(float(t), 1) for t in range(-3, 60)]
    never_up = _by_name(report.evaluate(req, flat, WINDOWS, 1, 1, min_replicas=1))
    assert not never_up["replicas_up_in_surge"]["passed"] and not never_up["replicas_down_after"]["passed"]
    stays_up = [(t, n) for t, n in GOOD_REPLICAS if t < 42] + [(float(t), 2) for t in range(42, 60)]
    stuck = _by_name(report.evaluate(req, stays_up, WINDOWS, 1, 1, min_replicas=1))
    assert stuck["replicas_up_in_surge"]["passed"] and not stuck["replicas_down_after"]["passed"]
    flapping = [(t, n) for t, n in GOOD_REPLICAS if t < 30] + [(30.0, 1), (31.0, 3), (33.0, 2), (36.0, 3)] + \
        [(float(t), 1) for t in range(42, 60)]  # up, down, up, down, up, down: 5 reversals
    flaps = _by_name(report.evaluate(req, flapping, WINDOWS, 1, 1, min_replicas=1))
    assert not flaps["replicas_steady"]["passed"] and flaps["replicas_steady"]["measured"] == 5
    assert flaps["replicas_up_in_surge"]["passed"] and flaps["replicas_down_after"]["passed"]
    assert _by_name(report.evaluate(req, GOOD_REPLICAS, WINDOWS, 1, 1))["replicas_steady"]["measured"] == 1
    started_high = [(t, max(n, 2)) for t, n in GOOD_REPLICAS]  # not at the minimum before the rush
    assert not _by_name(report.evaluate(req, started_high, WINDOWS, 1, 1, min_replicas=1))["replicas_up_in_surge"]["passed"]
    no_samples = _by_name(report.evaluate(req, [], WINDOWS, 1, 1))
    assert not no_samples["replicas_up_in_surge"]["passed"]

    lost = _by_name(report.evaluate(req, GOOD_REPLICAS, WINDOWS, posted=300, found=299))
    assert not lost["nothing_lost"]["passed"]
    assert lost["nothing_lost"]["measured"] == {"posted": 300, "in_redis": 299}
    assert not _by_name(report.evaluate(req, GOOD_REPLICAS, WINDOWS, posted=0, found=0))["nothing_lost"]["passed"]
    empty = _by_name(report.evaluate(report.Requests.empty(), GOOD_REPLICAS, WINDOWS, 1, 1))
    assert not empty["p99_during_peak"]["passed"] and not empty["error_rate"]["passed"]


def test_the_time_from_the_surges_start_to_the_first_new_replica():
    """Issue 32's smoke run: the surge began at 20 s and replicas stayed at 1 until 35 s."""
    late = [(float(t), 1) for t in range(-3, 35)] + [(35.4, 2), (41.0, 4)] + [(float(t), 1) for t in range(50, 60)]
    assert report.surge_to_first_new_replica_s(late, WINDOWS) == 15.4
    assert report.surge_to_first_new_replica_s(GOOD_REPLICAS, WINDOWS) == -2.0  # up during the ramp already
    flat = [(float(t), 1) for t in range(-3, 60)]
    assert report.surge_to_first_new_replica_s(flat, WINDOWS) is None
    high_before = [(float(t), 2) for t in range(-3, 60)]  # more than the minimum all along: none new
    assert report.surge_to_first_new_replica_s(high_before, WINDOWS) is None
    assert report.headline(_requests(), late, WINDOWS)["surge_to_first_new_replica_s"] == 15.4
    assert report.headline(_requests(), [], WINDOWS)["surge_to_first_new_replica_s"] is None
    # The autoscaler's decision (replicas starting counted) shows before the replica runs.
    decided = sorted([(t, 2 if 21.5 <= t < 35.4 else n) for t, n in late] + [(21.5, 2)])
    head = report.headline(_requests(), late, WINDOWS, decided)
    assert head["surge_to_scale_up_decision_s"] == 1.5 and head["surge_to_first_new_replica_s"] == 15.4
    assert head["replica_reversals"] == 1 and report.headline(_requests(), late, WINDOWS)["surge_to_scale_up_decision_s"] is None


def test_timeline_buckets_per_second_and_plots(tmp_path):
    req = report.Requests(np.array([0.1, 0.5, 0.9, 1.2, 3.5]), np.array([report.RECS] * 4 + [report.EVENTS], dtype=object),
                          np.array([10.0, 20.0, 30.0, 40.0, 5.0]), np.array([True, True, False, True, True]))
    rows = report.timeline(req, [(-0.5, 1), (1.5, 2)], lambda t: 7, end_s=4)
    assert [r["rps"] for r in rows] == [3, 1, 0, 1]
    assert [r["errors"] for r in rows] == [1, 0, 0, 0]
    assert [r["replicas"] for r in rows] == [1, 2, 2, 2]
    assert rows[0]["p50_ms"] == 20.0 and rows[2]["p99_ms"] is None and rows[3]["events_rps"] == 1
    png = report.plot(rows, {"baseline": (0, 2), "peak": (2, 4)}, tmp_path / "x.png", "test", 500)
    assert png.stat().st_size > 1000
    csv_path = tmp_path / "requests.csv"
    csv_path.write_text("start_s,route,latency_ms,ok,status\n100.5,/v1/events,3.0,1,202\n101.0,/v1/ev")
    read = report.Requests.read_csv(csv_path, t0=100.0)
    assert len(read) == 1 and read.t[0] == pytest.approx(0.5) and read.ok[0]


# ---- against the real stack ----------------------------------------------------


@pytest.fixture(scope="module")
def app(live_stack, tmp_path_factory):
    """The recsys app deployed on Ray Serve with this module's scratch topics and Redis prefix."""
    from conftest import Scratch
    from lab import serve_local as deploy
    scratch = Scratch(live_stack, tmp_path_factory.mktemp("loadtest"), "loadtest")
    deploy.serve_up(scratch.settings, progress=lambda *_: None)
    yield scratch
    deploy.serve_down(scratch.settings)
    scratch.close()


@pytest.fixture(scope="module")
def monitoring(live_stack):
    """The project's Prometheus and Redis exporter (``recsys stack up --monitoring``), scraping
    the default loopback ports, which this module's processes are given."""
    from lab import prometheus, stack
    was_running = prometheus.answers(live_stack)
    stack.start_monitoring(live_stack, progress=lambda *_: None)
    yield live_stack
    if not was_running:
        stack.stop_monitoring(live_stack)


def test_nothing_lost_fails_when_the_stream_worker_drops_out(app, tmp_path):
    from loadtest import runner
    from lab.serve_local import base_url
    tiny = Profile("tiny", base=4, ramp_to=6, peak=8, baseline_s=4, ramp_s=4, surge_s=2, peak_s=8,
                   decay_s=2, cooldown_s=4, wait_min_s=0.1, wait_max_s=0.3)
    opts = runner.Options(profile=tiny, host=base_url(app.settings), out=tmp_path / "report",
                          settle_max_s=0, cooldown_max_s=0, catchup_idle_s=3,
                          stop_stream_worker_after_s=12, locust_env={"LOADTEST_EVENT_SHARE": "0.5"})
    summary = runner.run(app.settings, opts, progress=lambda *_: None)
    lost = {s["name"]: s for s in summary["slos"]}["nothing_lost"]
    posted, found = lost["measured"]["posted"], lost["measured"]["in_redis"]
    assert not lost["passed"] and not summary["passed"]
    assert 0 < found < posted, lost  # applied until the worker stopped, the rest never reached Redis
    assert json.loads((tmp_path / "report" / "summary.json").read_text())["passed"] is False


# ---- the dashboards against the real Prometheus ----------------------------------------

DASHBOARDS = Path(__file__).resolve().parents[1] / "deploy" / "monitoring" / "dashboards"


def dashboard_queries() -> list[tuple[str, str, str]]:
    """(dashboard file, panel title, expr) of every panel target."""
    return [(path.name, panel["title"], target["expr"])
            for path in sorted(DASHBOARDS.glob("*.json"))
            for panel in json.loads(path.read_text())["panels"] for target in panel.get("targets", [])]


def _burst(client, seconds: float) -> None:
    """The load test's shoppers' recommendations and events for ``seconds`` (about 30 requests/s),
    for rates at "now"."""
    from loadtest.shoppers import Population, ShopperConfig
    shoppers, deadline = Population(ShopperConfig(), seed=7), time.monotonic() + seconds
    while time.monotonic() < deadline:
        user, _ = shoppers.shopper()
        answer = client.get(f"/v1/recommendations/{user}")
        assert answer.status_code == 200
        shown = [x["item_id"] for x in answer.json()["items"]]  # events on shown items: online hits
        assert client.post("/v1/events", json=[shoppers.event(user, shown)]).status_code == 202
        time.sleep(0.05)


def _archived(settings) -> int:
    from recsys.archive import read_events
    return read_events(settings).num_rows if any(settings.archive_dir.glob("day=*/*.parquet")) else 0


def _spawn(env: dict, logs: Path, *args: str) -> subprocess.Popen:
    """A ``recsys`` command in the background, its output to a file (a pipe nobody reads would
    fill and stop it)."""
    log = (logs / f"{args[0]}.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "cli", *args], env=env, stdout=log, stderr=subprocess.STDOUT)
    proc.log_path = Path(log.name)
    return proc


def _wait_until(what: str, check, timeout_s: float, procs=()) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        for proc in procs:
            assert proc.poll() is None, f"{proc.args[3]} exited: {proc.log_path.read_text()[-2000:]}"
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s:.0f} s"
        time.sleep(1)


def test_every_dashboard_query_returns_data_from_the_real_prometheus(app, monitoring, tmp_path):
    """The stream worker, archiver, online consumer and scheduler run as the CLI runs them (their metrics ports
    the defaults Prometheus scrapes), a model is published and a scheduled retraining judged,
    a bad record is dead-lettered, and a burst of requests is served; then each panel's query
    is sent to Prometheus's HTTP API: it parses, and returns at least one finite value. The rules
    file is loaded too: every group healthy, and the dead-letter alert active. ``recsys top`` shows
    the same figures, from Prometheus and from the endpoints directly."""
    from kafka import KafkaProducer
    from cli.top import Endpoints
    from lab import prometheus
    from training.scheduler import read_history
    ports = monitoring.monitoring
    procs = [_spawn(app.env, tmp_path, "stream", "--metrics-port", str(ports.stream_port)),
             _spawn(app.env, tmp_path, "archive", "--metrics-port", str(ports.archive_port)),
             _spawn(app.env, tmp_path, "online", "run", "--metrics-port", str(ports.online_port))]
    try:
        producer = KafkaProducer(bootstrap_servers=app.settings.kafka.servers)
        producer.send(app.settings.kafka.events_topic, b"not an event").get(timeout=30)  # to the DLQ, by both groups
        producer.close()
        app.cli("replay", "--source", "synthetic:events=20000,users=400,items=200", "--quiet")  # training data
        with app.client() as client:
            _burst(client, 10)
            _wait_until("the archive holds the events", lambda: _archived(app.settings) >= 20_000, 180, procs)
            train = subprocess.run([sys.executable, "-m", "cli", "train", "--source", "archive", "--workers", "1",
                                    "--epochs", "1", "--json"], env=app.env, capture_output=True, text=True, timeout=600)
            assert train.returncode == 0, train.stderr[-2000:]
            env = {**app.env, "RECSYS_RETRAINING_INTERVAL_S": "1e9", "RECSYS_TRAINING_WORKERS": "1",
                   "RECSYS_TRAINING_EPOCHS": "1", "RECSYS_RETRAINING_POLL_S": "1",
                   "RECSYS_RETRAINING_WINDOW_DAYS": "0"}  # the synthetic events are from 2023
            procs.append(_spawn(env, tmp_path, "scheduler", "--metrics-port", str(ports.scheduler_port)))
            _wait_until("a scheduled retraining judged", lambda: read_history(app.settings), 600, procs)
            assert read_history(app.settings)[-1]["decision"] in ("published", "rejected"), read_history(app.settings)
            _wait_until("Prometheus scraped the run",
                        lambda: prometheus.scalar(monitoring, "sum(recsys_retrain_runs_total)") == 1, 60, procs)
            _wait_until("the replicas serve a published model",  # loaded in the background (hot swap)
                        lambda: prometheus.query(monitoring, "ray_recsys_model_version_info == 1"), 300, procs)
            endpoints = Endpoints(monitoring)  # `recsys top` without Prometheus: two reads of the endpoints
            endpoints.snapshot()
            _burst(client, 20)  # longer than Ray's 10 s report interval
            direct = endpoints.snapshot()
        top = subprocess.run([sys.executable, "-m", "cli", "top", "--once", "--json"], env=app.env,
                             capture_output=True, text=True, timeout=60)
        assert top.returncode == 0, top.stderr[-2000:]
        for snap in (json.loads(top.stdout), direct):
            print(snap)
            assert snap["rps"]["recommendations"] > 0 and snap["p99_ms"]["recommendations"] > 0, snap
            assert app.settings.kafka.stream_group in snap["lag"] and snap["freshness_p99_s"] is not None, snap
            assert snap["replicas"] >= 1 and snap["served"], snap
            assert snap["last_decision"] in ("published", "rejected") and "candidate" in snap["hr10"], snap
            assert snap["model_age_s"], snap
        empty, failed = [], []
        for board, title, expr in dashboard_queries():
            try:
                values = [float(s["value"][1]) for s in prometheus.query(monitoring, expr)]
            except prometheus.PromQLError as exc:
                failed.append(f"{board} / {title}: {exc}")
                continue
            if not any(math.isfinite(v) for v in values):
                empty.append(f"{board} / {title}: {expr}")
        assert not failed, failed
        assert not empty, empty
        print(f"{len(dashboard_queries())} dashboard queries, each with data")
        import httpx
        groups = httpx.get(f"{prometheus.url(monitoring)}/api/v1/rules", timeout=10).json()["data"]["groups"]
        assert groups and all(r["health"] == "ok" for g in groups for r in g["rules"]), groups
        active = {a["labels"]["alertname"] for a in
                  httpx.get(f"{prometheus.url(monitoring)}/api/v1/alerts", timeout=10).json()["data"]["alerts"]}
        assert "RecsysDeadLetters" in active, active
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=60)


def test_peak_users_changes_only_the_peak_and_must_be_positive():
    import argparse

    from loadtest.cli import chosen_profile, register
    smoke = chosen_profile("smoke")
    wider = chosen_profile("smoke", 120)
    assert (smoke.peak, wider.peak, wider.duration_s) == (60, 120, smoke.duration_s)
    assert wider.users_at(wider.windows()["peak"][0] + 1) == 120 and wider.base == smoke.base
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    assert parser.parse_args(["loadtest", "--peak-users", "90"]).peak_users == 90
    assert parser.parse_args(["loadtest"]).peak_users is None
    for bad in ("0", "-5", "many"):
        with pytest.raises(SystemExit):
            parser.parse_args(["loadtest", "--peak-users", bad])
