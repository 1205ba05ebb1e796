"""``recsys chaos guardrail --json``: the online guardrail of A/B experiments, end to end, with
shoppers who click by taste (issue 18).

On the running local stack (Kafka and Redis), in scratch topics, groups and Redis prefix and a
private registry: a synthetic taste source's events are replayed through Kafka into Redis; the
training job trains a good model on them (current), a second good one (another seed) and a bad
one on the same events with every item id consistently renamed (it learns each item's
behaviour under another item's id, and its offline metrics on that data look as sound). The API
(``serving.plain`` under uvicorn) serves them, a stream worker and the online consumer
(``recsys online run``, the guardrail every ``GUARD_EVERY_S``) run beside it, and Locust's
taste shoppers (``loadtest/shoppers.py``) click the lists by their cluster and rank.

  1. the bad candidate at share 0.5 until the guardrail ends the experiment, or the candidate
     arm has ``MAX_CANDIDATE_LISTS`` lists, or ``MAX_LOAD_S`` passes: passed when it was ended
     within ``MAX_CANDIDATE_LISTS`` candidate lists;
  2. the second good model at share 0.5 until its arm has ``MAX_CANDIDATE_LISTS`` lists:
     passed when the experiment is still running then.

Each reports both arms' figures over its run (``recsys online report``: lists, lists with a
hit, CTR@k, hit ranks), and the first the guardrail's verdict.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from lab.bench.stream import recsys_child, scratch_settings, settings_env
from lab import stack
from lab.chaos import end_scratch_run
from loadtest import runner
from loadtest.shapes import Profile
from recsys.attribution import report, summarize
from recsys.auth import KeyStore, Scope
from recsys.feature_store import connect
from recsys.kafka_io import replay
from recsys.privacy import Pseudonyms
from recsys.registry import Registry
from recsys.settings import Settings
from recsys.sources import open_source
from recsys.stream import run_stream
from recsys.training_data import events_table, with_relabeled_items

TASTE = "synthetic:events=20000,users=1000,items=1000,clusters=20,categories=1"
API_PORT_OFFSET = 92  # the API: the serving port + 92
GUARD_EVERY_S = 2.0
MAX_CANDIDATE_LISTS = 1000
MAX_LOAD_S = 240.0
# Taste shoppers: the source's users (5% new ones), background events are views, so that only
# reactions to a list (clicks, carts, purchases on its items) can be its hits.
SHOPPERS = {"LOADTEST_TASTE_SOURCE": TASTE, "LOADTEST_NEW_USER_SHARE": "0.05", "LOADTEST_EVENT_MIX": "view=1",
            "LOADTEST_CLICK_MATCH": "0.3", "LOADTEST_CLICK_OTHER": "0.02", "LOADTEST_POSITION_DECAY": "1.0",
            "LOADTEST_BUY_SHARE": "0.2"}
LOAD = Profile(name="guardrail", base=12, ramp_to=12, peak=12, baseline_s=MAX_LOAD_S, ramp_s=0, surge_s=0, peak_s=0,
               decay_s=0, cooldown_s=0, wait_min_s=0.05, wait_max_s=0.25, description="12 taste shoppers, flat")


def _train(s: Settings, table, item_features, seed: int, promote: bool = False) -> dict:
    """One model by the training job (1 worker) on a prepared table, published; its card."""
    from recsys.model import ModelConfig
    from training.data import Prepared
    from training.job import default_config, train
    config = {"seed": seed}
    prepared = Prepared(table, item_features, ModelConfig.from_dict(default_config() | config), s.features.recent_items)
    return train(table, settings=s, workers=1, model_config=config, prepared=prepared, baselines={}, promote=promote)


def _models(s: Settings, progress) -> dict[str, dict]:
    """The taste source's events into Kafka and Redis; the good, the other good and the bad model."""
    from training.job import ensure_ray
    source = open_source(TASTE)
    events = list(Pseudonyms.of(s).events(source.events_iter()))  # the model and Redis know users by pseudonym
    replay(events, s, progress=False)
    applied = run_stream(s, until_idle=3)["applied"]
    progress(f"guardrail: {len(events):,} events of {TASTE} replayed, {applied:,} applied to Redis; training 3 models")
    table, features = events_table(events), source.item_features()
    started = ensure_ray(1, False, s.ray.worker_niceness, s.home / "logs" / "ray-workers.log")
    try:
        cards = {"current": _train(s, table, features, seed=1, promote=True),
                 "good": _train(s, table, features, seed=2),
                 "bad": _train(s, *with_relabeled_items(table, features, seed=3), seed=1)}
    finally:
        if started:
            import ray
            ray.shutdown()
    return cards


def _arms(s: Settings) -> dict[str, dict]:
    return {name: arm["counters"] for name, arm in report(s)["arms"].items()}


def _since(before: dict, after: dict, name: str) -> dict:
    """An arm's report over a run: its counters' growth since ``before``."""
    was = before.get(name, {})
    return summarize({k: v - was.get(k, 0) for k, v in after.get(name, {}).items() if v - was.get(k, 0)})


def _experiment(s: Settings, api: str, key: str, current: str, candidate: str, stop_expected: bool, log: Path,
                progress) -> dict:
    """One A/B experiment under the taste shoppers' load, until the guardrail ends it, its
    candidate arm has MAX_CANDIDATE_LISTS lists or MAX_LOAD_S passes."""
    registry = Registry(s.registry_dir)
    names = {"current": f"{current}|current", "candidate": f"{candidate}|candidate"}
    before = _arms(s)
    registry.start_experiment(candidate, 0.5)
    time.sleep(3)  # the API follows the registry within a second, then loads the candidate
    progress(f"guardrail: candidate {candidate} at share 0.5 ({'bad' if stop_expected else 'good'}); shoppers on")
    started = time.monotonic()
    load = runner.start_locust(api, {**settings_env(s), **SHOPPERS, "LOADTEST_API_KEY": key,
                                     "LOADTEST_PROFILE_SPEC": json.dumps(LOAD.spec())}, log)
    stopped_s = None
    try:
        while load.poll() is None:
            if registry.experiment() is None:
                stopped_s = round(time.monotonic() - started, 1)
                break
            if _arms(s).get(names["candidate"], {}).get("impressions", 0) >= MAX_CANDIDATE_LISTS:
                break
            time.sleep(0.5)
    finally:
        runner.end(load)
    time.sleep(2 * GUARD_EVERY_S)  # the consumer takes the last records in and looks once more
    if stopped_s is None and registry.experiment() is None:
        stopped_s = round(time.monotonic() - started, 1)
    if registry.experiment() is not None:
        registry.end_experiment()
    after = _arms(s)
    verdict = report(s)["guardrail_stops"].get(candidate)
    arms = {arm: _since(before, after, name) for arm, name in names.items()}
    lists = arms["candidate"]["impressions"]
    passed = (stopped_s is not None and verdict is not None and verdict["lists"][1] <= MAX_CANDIDATE_LISTS
              if stop_expected else stopped_s is None and lists >= MAX_CANDIDATE_LISTS)
    out = {"candidate": candidate, "stopped": stopped_s is not None, "seconds_to_stop": stopped_s,
           "lists_at_stop": dict(zip(("current", "candidate"), verdict["lists"])) if verdict else None,
           "lists": {a: arms[a]["impressions"] for a in arms},
           "lists_with_hit": {a: arms[a]["counters"].get("lists_with_hit", 0) for a in arms},
           "hit_rate": {a: arms[a]["hit_rate"] for a in arms}, "ctr_at_k": {a: arms[a]["ctr_at_k"] for a in arms},
           "verdict": verdict, "arms": arms, "passed": passed}
    progress(f"guardrail: {json.dumps({k: out[k] for k in ('stopped', 'seconds_to_stop', 'lists', 'hit_rate')})}")
    return out


def guardrail(settings: Settings, progress=print) -> dict:
    from lab.bench.serve import PlainUvicorn
    home = settings.home / "chaos-guardrail"
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    s = scratch_settings(settings, "guardrail").updated(registry_dir=home / "models",
                                                        online={"guard_every_s": GUARD_EVERY_S})
    stack.start_kafka(settings, progress)
    stack.start_redis(settings, progress)
    stack.ensure_topics(s)
    t0 = time.monotonic()
    procs, api = [], None
    try:
        cards = _models(s, progress)
        procs = [recsys_child(s, home / "stream.log", "stream"), recsys_child(s, home / "online.log", "online", "run")]
        api = PlainUvicorn(s, workers=1, port=settings.serving.port + API_PORT_OFFSET, ready_path="/healthz")
        current = cards["current"]["version"]
        with KeyStore(s, connect(s)).temporary("guardrail", [Scope.recs_read, Scope.events_write]) as key:
            bad = _experiment(s, api.url, key, current, cards["bad"]["version"], True, home / "locust-bad.log", progress)
            good = _experiment(s, api.url, key, current, cards["good"]["version"], False, home / "locust-good.log",
                               progress)
        return {"scenario": "guardrail", "source": TASTE, "shoppers": SHOPPERS, "shoppers_at_once": LOAD.base,
                "max_candidate_lists": MAX_CANDIDATE_LISTS, "max_load_s": MAX_LOAD_S,
                "guard": {"every_s": GUARD_EVERY_S, "alpha": s.online.guard_alpha, "effect": s.online.guard_effect,
                          "min_lists": s.online.guard_min_lists},
                "offline_hr@10": {name: card["metrics"]["two_tower"]["hr@10"] for name, card in cards.items()},
                "bad_candidate": bad, "good_candidate": good, "seconds": round(time.monotonic() - t0, 1),
                "passed": bad["passed"] and good["passed"]}
    finally:
        end_scratch_run(s, procs, api, [home / "models"])
