"""Issue 18 (point 2): events joined to the impressions that showed their items, per model
version and arm; exact against the rule (``expected_report``) through the real broker and
Redis, in whichever order the two topics arrive, after a kill -9, and under a full replay; the
guardrail; and (point 4) Locust's taste shoppers, whose reactions count for the lists they saw."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import replace
from typing import NamedTuple

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from loadtest import runner
from loadtest.shapes import Profile
from recsys.attribution import PLACES, commit_offsets, expected_report, shown, summarize
from recsys.events import Event
from recsys.impressions import Impression, by_partition, encode_batch
from recsys.kafka_io import connection, replay
from recsys.privacy import Pseudonyms
from recsys.sources import open_source
from tests.conftest import plain_api

WINDOW_MS = 1_800_000
ATTRIBUTABLE = ("click", "add_to_cart", "purchase")


def imp(request: str, user: str, items: list[str], version="v1", arm="current") -> Impression:
    return Impression(request, user, version, arm, tuple(items), 0)


def ev(eid: str, user: str, item: str, type_: str = "click", ts: int = 1_700_000_000_000) -> Event:
    return Event(event_id=eid, user_id=user, item_id=item, type=type_, ts=ts)


def test_the_rule_latest_impression_within_the_window_each_id_once():
    t = 1_000_000
    impressions = [(imp("r1", "a", ["x", "y", "z"]), t), (imp("r2", "a", ["y", "w"], "v2", "candidate"), t + 4000),
                   (imp("r1", "a", ["x", "y", "z"]), t + 9000),  # the same request again: counted once
                   (imp("r3", "b", ["x"]), t)]
    events = [(ev("e1", "a", "y"), t + 5000),            # y: latest impression before it is r2, rank 1
              (ev("e2", "a", "x", "add_to_cart"), t + 1000),  # x: r1, rank 1
              (ev("e3", "a", "z", "view"), t + 2000),     # not attributable
              (ev("e4", "a", "z", "purchase"), t + WINDOW_MS + 1),  # z's impression is out of the window
              (ev("e1", "a", "y"), t + 6000),             # a retry of e1: nothing
              (ev("e5", "a", "q"), t + 100),              # never shown
              (ev("e6", "b", "x"), t - 1),                # before its impression
              (ev("e7", "a", "x", "purchase"), t + 3000)]  # r1 again: a second hit of the same list
    got = expected_report(impressions, events, WINDOW_MS, ATTRIBUTABLE)
    assert got == {"v1|current": {"impressions": 2, "items_shown": 4, "hits:add_to_cart": 1, "hits:purchase": 1,
                                  "rank:1": 2, "lists_with_hit": 1},
                   "v2|candidate": {"impressions": 1, "items_shown": 2, "hits:click": 1, "rank:1": 1,
                                    "lists_with_hit": 1}}
    assert summarize(got["v2|candidate"])["ctr_at_k"] == 0.5 and summarize(got["v1|current"])["hit_rate"] == 0.5


class Record(NamedTuple):
    """What the consumer reads of a Kafka record."""
    topic: str
    partition: int
    offset: int
    timestamp: int
    value: bytes


def test_a_batch_record_is_its_impressions_each_at_its_own_time_and_place():
    first, second = (Impression(f"r{n}", f"p{n}", "v1", "current", ("x", "y"), 1_000 + n) for n in range(2))
    batch = shown(Record("impressions", 3, 17, 5_000, encode_batch([first, second])))
    assert [(e.impression, e.timestamp, e.index) for e in batch] == [(first, 1_000, 0), (second, 1_001, 1)]
    assert [e.position for e in batch] == [17 * PLACES, 17 * PLACES + 1]
    assert batch[0].memo == str((3 << 40) + 17) and batch[1].memo == f"{(3 << 40) + 17}:1"
    (single,) = shown(Record("impressions", 3, 18, 5_000, first.to_bytes()))
    assert (single.impression, single.timestamp, single.position) == (first, 5_000, 18 * PLACES)  # the record's time
    assert batch[1].position < single.position  # an arm's positions follow the partition's order
    with pytest.raises(ValueError):
        shown(Record("impressions", 3, 19, 5_000, b"[]"))


def test_offsets_are_committed_only_past_records_wholly_applied():
    imps, evs = TopicPartition("impressions", 0), TopicPartition("events", 0)
    batch = shown(Record("impressions", 0, 7, 0, encode_batch([imp(f"r{n}", "a", ["x"]) for n in range(3)])))
    before = Record("impressions", 0, 6, 0, b"")
    event = Record("events", 0, 40, 0, b"")
    # The batch's first impression applied, the others wait for a later event: commit up to 7 (re-read it).
    assert commit_offsets([before, batch[0], event], {imps: batch[1:], evs: []}) == {imps: 7, evs: 41}
    assert commit_offsets(batch[1:], {imps: []}) == {imps: 8}
    assert commit_offsets([event], {imps: batch}) == {evs: 41}  # a partition with nothing applied: no commit


def _traffic(seed: int, users: int = 60, lists: int = 400, events: int = 1500):
    """Impressions and later events of a few users, with their record times; some of each
    sent twice (a client's retry: a new record with the same id)."""
    rng = random.Random(seed)
    base = int(time.time() * 1000) - 3 * 3600 * 1000
    arms = [("v1", "current"), ("v2", "candidate")]
    impressions, evs = [], []
    for n in range(lists):
        user, (version, arm) = f"p{rng.randrange(users)}", rng.choice(arms)
        items = rng.sample([f"i{k}" for k in range(40)], 5)
        impressions.append((Impression(f"r{n}", user, version, arm, tuple(items), 0), base + rng.randrange(7200_000)))
    for n in range(events):
        user = f"p{rng.randrange(users)}"
        at = base + rng.randrange(9000_000)
        evs.append((Event(event_id=f"e{n}", user_id=user, item_id=f"i{rng.randrange(40)}", ts=at,
                          type=rng.choice(["click", "click", "add_to_cart", "purchase", "view"])), at))
    impressions += [(i, ts + 500) for i, ts in rng.sample(impressions, 20)]
    evs += [(e, ts + 700) for e, ts in rng.sample(evs, 60)]
    return impressions, evs


def _produce(s, impressions, events, batch: int = 1) -> None:
    """Events first, then impressions, each in record-time order: the topics arrive apart.
    ``batch`` > 1: impressions as a replica batches them, up to that many per record of their
    partition, each with its own time (the record's: its last impression's)."""
    prod = KafkaProducer(**connection(s), acks="all")
    for e, ts in sorted(events, key=lambda x: x[1]):
        prod.send(s.kafka.events_topic, key=e.user_id.encode(), value=e.to_bytes(), timestamp_ms=ts)
    prod.flush()
    in_order = sorted(impressions, key=lambda x: x[1])
    if batch == 1:
        for i, ts in in_order:
            prod.send(s.kafka.impressions_topic, key=i.user_id.encode(), value=i.to_bytes(), timestamp_ms=ts)
    else:
        timed = by_partition([replace(i, ts=ts) for i, ts in in_order], s.kafka.events_partitions)
        for partition, group in timed.items():
            for n in range(0, len(group), batch):
                part = group[n:n + batch]
                prod.send(s.kafka.impressions_topic, partition=partition, value=encode_batch(part),
                          timestamp_ms=part[-1].ts)
    prod.flush()
    prod.close()


def _counters(scratch) -> dict:
    out = json.loads(scratch.cli("online", "report", "--json").stdout.strip().splitlines()[-1])
    return {name: arm["counters"] for name, arm in out["arms"].items()}


@pytest.mark.parametrize("batch", [1, 7], ids=["single", "batched"])
def test_the_consumer_is_exact_after_a_kill_and_under_a_replay(scratch, batch):
    """Single impression records, and batch records (each impression at its own time, a record
    possibly applied in part before the kill)."""
    s = scratch.settings
    impressions, events = _traffic(seed=18)
    want = expected_report(impressions, events, WINDOW_MS, ATTRIBUTABLE)
    assert sum(c.get("lists_with_hit", 0) for c in want.values()) > 20  # the traffic has hits to find
    _produce(s, impressions, events, batch)
    worker = subprocess.Popen([sys.executable, "-m", "cli", "online", "run"], env=scratch.env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(4)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    out = json.loads(scratch.cli("online", "run", "--until-idle", "3").stdout.strip().splitlines()[-1])
    assert out["dlq"] == 0
    assert _counters(scratch) == want
    # Everything again from offset 0, in a new group: the same counters.
    again = scratch.settings.updated(online={"group": s.online.group + "-again"})
    from lab.bench.stream import settings_env
    subprocess.run([sys.executable, "-m", "cli", "online", "run", "--until-idle", "3"], env=settings_env(again),
                   check=True, capture_output=True, timeout=300)
    assert _counters(scratch) == want


def _registry_with_two_versions(s):
    from recsys.registry import Registry
    registry = Registry(s.registry_dir)
    v1, v2 = (registry.publish(lambda folder, version: (folder / "model_card.json").write_text(
        json.dumps({"version": version}))) for _ in range(2))
    registry.promote(v1)
    return registry, v1, v2


def _ab_traffic(v1: str, v2: str, hit_rates: dict, base: int, lists: int = 800, seed: int = 3, tag: str = "ab"):
    """Lists of both arms, served from ``base`` (ms) on; a list gets a click on one of its items
    with its arm's hit rate."""
    rng = random.Random(seed)
    impressions, events = [], []
    for n in range(lists):
        version, arm = (v2, "candidate") if n % 2 else (v1, "current")
        user, at = f"q{n % 97}", base + n * 100
        items = tuple(f"i{rng.randrange(500)}" for _ in range(5))
        impressions.append((Impression(f"{tag}{n}", user, version, arm, items, 0), at))
        if rng.random() < hit_rates[arm]:
            events.append((Event(event_id=f"{tag}e{n}", user_id=user, item_id=rng.choice(items), type="click",
                                 ts=at + 30_000), at + 30_000))
    return impressions, events


def _started_ms(registry) -> int:
    from recsys.experiments import ExperimentScope
    return ExperimentScope.of(registry.pointers()).started_ms


def test_the_guardrail_ends_an_experiment_whose_candidate_loses(scratch):
    """A/B arms of 400 lists each, 30% of the current's lists with a click and 8% of the
    candidate's: the consumer's sequential test ends the experiment by itself; the report says why."""
    s = scratch.settings
    registry, v1, v2 = _registry_with_two_versions(s)
    registry.start_experiment(v2, 0.5)
    impressions, events = _ab_traffic(v1, v2, {"current": 0.3, "candidate": 0.08}, _started_ms(registry))
    _produce(s, impressions, events)
    scratch.cli("online", "run", "--until-idle", "8")
    assert registry.experiment() is None and registry.current() == v1
    report = json.loads(scratch.cli("online", "report", "--json").stdout.strip().splitlines()[-1])
    stop = report["guardrail_stops"][v2]
    assert stop["current"] == v1 and "candidate worse" in stop["reason"] and stop["likelihood_ratio"] >= 20
    assert report["arms"][f"{v2}|candidate"]["hit_rate"] < report["arms"][f"{v1}|current"]["hit_rate"]


def test_the_guardrail_leaves_an_equal_candidate_running(scratch):
    s = scratch.settings
    registry, v1, v2 = _registry_with_two_versions(s)
    registry.start_experiment(v2, 0.5)
    impressions, events = _ab_traffic(v1, v2, {"current": 0.25, "candidate": 0.25}, _started_ms(registry), seed=4)
    _produce(s, impressions, events)
    scratch.cli("online", "run", "--until-idle", "8")
    assert registry.experiment()["candidate"] == v2
    report = json.loads(scratch.cli("online", "report", "--json").stdout.strip().splitlines()[-1])
    assert report["guardrail_stops"] == {} and report["arms"][f"{v2}|candidate"]["impressions"] == 400


def test_the_guardrail_compares_only_lists_served_during_the_experiment(scratch):
    """Issue 35 (7): before the experiment, the current version's lists had a high hit rate (a
    busy day) and an earlier run of the same candidate a low one; during it, both arms do
    alike. Judged on all their lists, the candidate would be stopped; judged on this run's, it
    is not, and the report shows this run's lists alone."""
    s = scratch.settings
    registry, v1, v2 = _registry_with_two_versions(s)
    registry.start_experiment(v2, 0.5)
    start = _started_ms(registry)
    before = _ab_traffic(v1, v2, {"current": 0.4, "candidate": 0.05}, start - 3 * 3600_000, tag="old")
    during = _ab_traffic(v1, v2, {"current": 0.15, "candidate": 0.15}, start, seed=5)
    _produce(s, before[0] + during[0], before[1] + during[1])
    scratch.cli("online", "run", "--until-idle", "8")
    report = json.loads(scratch.cli("online", "report", "--json").stdout.strip().splitlines()[-1])
    assert registry.experiment()["candidate"] == v2 and report["guardrail_stops"] == {}
    run = report["experiment_arms"]
    want = expected_report(during[0], during[1], WINDOW_MS, ATTRIBUTABLE)
    assert {name.split("|", 1)[1]: arm["counters"] for name, arm in run.items()} == want
    assert report["arms"][f"{v1}|current"]["impressions"] == 800  # every list, in the all-time counters


def test_taste_shoppers_reactions_are_attributed_to_the_lists_that_showed_them(scratch, tmp_path):
    """Locust's taste shoppers against the API (no model yet: trending answers) click, cart and
    buy only items of the lists just shown to them, so the online consumer attributes (nearly)
    every such event to its list, the top ranks most."""
    s = scratch.settings
    taste = "synthetic:events=3000,users=200,items=200,clusters=5,categories=1"
    replay(Pseudonyms.of(s).events(open_source(taste).events_iter()), s, progress=False)
    scratch.cli("stream", "--until-idle", "3", "--metrics-port", "0")  # trending, for the answers
    load = Profile("taste", base=4, ramp_to=4, peak=4, baseline_s=15, ramp_s=0, surge_s=0, peak_s=0, decay_s=0,
                   cooldown_s=0, wait_min_s=0.05, wait_max_s=0.2)
    key = scratch.api_key()
    env = {**os.environ, "LOADTEST_API_KEY": key, "LOADTEST_PROFILE_SPEC": json.dumps(load.spec()),
           "LOADTEST_TASTE_SOURCE": taste, "LOADTEST_EVENT_MIX": "view=1", "LOADTEST_CLICK_MATCH": "0.6",
           "LOADTEST_CLICK_OTHER": "0.1"}
    with plain_api(s, s.serving.port + 93, key) as api:
        locust = runner.start_locust(str(api.base_url), env, tmp_path / "locust.log")
        assert locust.wait(timeout=90) == 0, (tmp_path / "locust.log").read_text()[-2000:]
    consumer = KafkaConsumer(s.kafka.events_topic, **connection(s), group_id=None, auto_offset_reset="earliest",
                             consumer_timeout_ms=5000)
    posted = [e for r in consumer for e in [json.loads(r.value)] if e["event_id"].startswith("lt-")]
    consumer.close()
    reactions = [e for e in posted if e["type"] in ATTRIBUTABLE]
    assert len(reactions) > 30 and len(posted) > len(reactions), "taste reactions and background views"
    scratch.cli("online", "run", "--until-idle", "3", "--metrics-port", "0")
    report = json.loads(scratch.cli("online", "report", "--json").stdout.strip().splitlines()[-1])
    arm = report["arms"]["None|current"]  # no model: the trending fallback, in the current arm
    assert 0 < arm["hit_rate"] <= 1 and arm["ctr_at_k"] > 0
    assert 0.9 * len(reactions) <= sum(arm["hits"].values()) <= len(reactions)
    assert arm["hit_ranks"]["1"] > arm["hit_ranks"].get("10", 0)


def _run_online(scratch) -> dict:
    done = subprocess.run([sys.executable, "-m", "cli", "online", "run", "--until-idle", "3"], env=scratch.env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_client_chosen_ids_cannot_collide_with_the_consumers_own_fields(scratch):
    """Issue 35 (5): a click whose event id is "r:" + a request id it was served, and one whose
    item id is "q:" + it, are ordinary events: before, the first turned the list's hit count into
    a string (the next click's HINCRBY failed and the consumer crash-looped) and the second read
    the request's memo as an impression."""
    s = scratch.settings
    t = int(time.time() * 1000) - 3600_000
    impressions = [(Impression("req1", "u1", "v1", "current", ("x", "y"), 0), t)]
    events = [(ev("r:req1", "u1", "x", ts=t + 1000), t + 1000), (ev("e2", "u1", "y", ts=t + 2000), t + 2000),
              (ev("e3", "u1", "q:req1", ts=t + 3000), t + 3000), (ev("e:e2", "u1", "x", ts=t + 4000), t + 4000)]
    want = expected_report(impressions, events, WINDOW_MS, ATTRIBUTABLE)
    assert want["v1|current"]["lists_with_hit"] == 1 and want["v1|current"]["hits:click"] == 3
    _produce(s, impressions, events)
    out = _run_online(scratch)
    assert out["dlq"] == 0 and out["events"] == 4
    assert _counters(scratch) == want


def test_a_script_error_on_one_record_goes_to_the_dead_letters_and_the_rest_is_counted(scratch):
    """Issue 35 (5): a record whose script fails (here its user's hash holds the wrong type) goes
    to the dead-letter topic with the reason, and the consumer goes on, exact for everyone else.
    Batch records: a failed impression is dead-lettered alone, the others of its record count."""
    from recsys.attribution import OnlineKeys
    from recsys.feature_store import connect
    from recsys.stream import read_dead_letters
    s = scratch.settings
    impressions, events = _traffic(seed=35, users=8, lists=60, events=200)
    connect(s).set(OnlineKeys(s.redis.prefix).shown("p3"), "not a hash")
    good = lambda pairs: [(x, ts) for x, ts in pairs if x.user_id != "p3"]  # noqa: E731
    want = expected_report(good(impressions), good(events), WINDOW_MS, ATTRIBUTABLE)
    bad_imps = sum(i.user_id == "p3" for i, _ in impressions)  # a request's every record fails
    bad_events = sum(e.user_id == "p3" and e.type.value in ATTRIBUTABLE for e, _ in events)
    assert bad_imps and bad_events and sum(c.get("lists_with_hit", 0) for c in want.values()) > 5
    _produce(s, impressions, events, batch=3)
    out = _run_online(scratch)
    assert _counters(scratch) == want
    dead = read_dead_letters(s)
    assert out["dlq"] == len(dead) == bad_imps + bad_events
    assert all("WRONGTYPE" in d["reason"] and d["consumer"] == s.online.group for d in dead)
    assert {json.loads(d["value"])["user_id"] for d in dead} == {"p3"}


def test_an_experiment_runs_counters_hold_its_two_arms_lists_since_its_start():
    from recsys.experiments import ExperimentScope
    exp = {"candidate": "v2", "share": 0.5, "shadow": False, "started_at": "2026-01-01T00:00:00.250+00:00"}
    scope = ExperimentScope.of({"current": "v1", "previous": None, "experiment": exp})
    start = scope.started_ms
    assert scope.counts("v1", "current", start) == scope.arm("current") == f"v2@{start}|v1|current"
    assert scope.counts("v2", "candidate", start + 1) == f"v2@{start}|v2|candidate"
    assert scope.counts("v1", "current", start - 1) is None  # served before it started
    assert scope.counts("v2", "current", start) is None and scope.counts("None", "current", start) is None
    again = ExperimentScope.of({"current": "v1", "experiment": {**exp, "started_at": "2026-01-02T00:00:00+00:00"}})
    assert again.arm("candidate") != scope.arm("candidate")  # a run again: counted afresh
    assert ExperimentScope.of({"current": "v1", "experiment": {**exp, "shadow": True}}) is None
    assert ExperimentScope.of({"current": "v1", "experiment": None}) is None
