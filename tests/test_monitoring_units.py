"""Pure logic of the monitoring: the bulk freshness histogram, the quantile ``recsys top`` computes
without Prometheus, and the scheduler's figures from its run history."""
from __future__ import annotations

import json
from datetime import datetime, timezone

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from cli.top import histogram_quantile
from recsys.metrics import BulkHistogram
from recsys.settings import Settings
from training.scheduler import run_metrics


def test_bulk_histogram_counts_like_prometheus_le_buckets():
    registry = CollectorRegistry()
    hist = BulkHistogram("x_seconds", "test", (0.1, 1.0), registry=registry)
    hist.observe_many(np.array([0.05, 0.1, 0.5, 1.0, 2.0, 30.0]))
    hist.observe_many(np.array([]))
    samples = {(s.name, s.labels.get("le")): s.value
               for f in text_string_to_metric_families(generate_latest(registry).decode()) for s in f.samples}
    # le is "less or equal": 0.1 counts in the 0.1 bucket, 1.0 in the 1.0 bucket.
    assert samples[("x_seconds_bucket", "0.1")] == 2
    assert samples[("x_seconds_bucket", "1.0")] == 4
    assert samples[("x_seconds_bucket", "+Inf")] == 6 == samples[("x_seconds_count", None)]
    assert samples[("x_seconds_sum", None)] == pytest.approx(33.65)


def test_histogram_quantile_interpolates_inside_the_bucket_like_prometheus():
    buckets = [(0.1, 50.0), (1.0, 90.0), (float("inf"), 100.0)]
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.1)    # the rank ends the first bucket
    assert histogram_quantile(0.7, buckets) == pytest.approx(0.55)   # 20 of 40 into (0.1, 1.0]
    assert histogram_quantile(0.99, buckets) == pytest.approx(1.0)   # in +Inf: the highest finite bound
    assert histogram_quantile(0.25, buckets) == pytest.approx(0.05)  # from 0 up to the first bound
    assert histogram_quantile(0.99, [(0.1, 0.0), (float("inf"), 0.0)]) is None


def _run(started: datetime, decision: str, cand: float, cur: float | None, duration_s: float = 60.0) -> dict:
    return {"started_at": started.isoformat(), "decision": decision, "duration_s": duration_s,
            "candidate": {"hr@10": cand}, "current": {"hr@10": cur} if cur is not None else {}}


def test_scheduler_figures_from_the_history(tmp_path):
    settings = Settings(registry_dir=tmp_path / "models")
    t = lambda h: datetime(2026, 12, 1, h, tzinfo=timezone.utc)  # noqa: E731
    history = [_run(t(1), "published", 0.30, None), _run(t(2), "rejected", 0.20, 0.30),
               _run(t(3), "failed", 0.0, None), _run(t(4), "rejected", 0.21, 0.30)]
    figures = run_metrics(settings, history, now=t(5).timestamp())
    assert figures["recsys_retrain_runs"] == {"published": 1, "rejected": 2, "failed": 1}
    assert figures["recsys_retrain_consecutive_rejections"] == 2  # a failure does not reset it
    assert figures["recsys_retrain_last_start_timestamp_seconds"] == t(4).timestamp()
    assert figures["recsys_retrain_last_end_timestamp_seconds"] == t(4).timestamp() + 60
    assert figures["recsys_retrain_last_success_timestamp_seconds"] == t(1).timestamp() + 60
    assert figures["recsys_retrain_hr10"] == {"candidate": 0.21, "current": 0.30}
    assert figures["recsys_retrain_last_decision_info"] == {"published": 0.0, "rejected": 1.0, "failed": 0.0}
    assert figures["recsys_retrain_interval_seconds"] == settings.retraining.interval_s
    assert "recsys_model_created_timestamp_seconds" not in figures  # no model in the registry

    cron = settings.updated(retraining={"cron": "0 3 * * *"})
    assert run_metrics(cron, [], now=t(5).timestamp())["recsys_retrain_interval_seconds"] == 86400
    assert "recsys_retrain_last_success_timestamp_seconds" not in run_metrics(settings, [], now=0)


def test_a_published_model_counts_as_the_last_success(tmp_path):
    from recsys.registry import Registry
    settings = Settings(registry_dir=tmp_path / "models")

    def write(folder, version):
        (folder / "model_card.json").write_text(json.dumps({"version": version, "created_at": "2026-12-01T06:00:00+00:00"}))
    version = Registry(settings.registry_dir).publish(write)
    figures = run_metrics(settings, [], now=0)
    created = datetime(2026, 12, 1, 6, tzinfo=timezone.utc).timestamp()
    assert figures["recsys_model_created_timestamp_seconds"] == {version: created}
    assert figures["recsys_retrain_last_success_timestamp_seconds"] == created


def test_the_scheduler_collector_exports_each_figure_with_its_label(tmp_path):
    from training.scheduler import SchedulerMetrics, history_path
    settings = Settings(registry_dir=tmp_path / "models")
    settings.registry_dir.mkdir()
    run = _run(datetime(2026, 12, 1, 1, tzinfo=timezone.utc), "rejected", 0.2, 0.3)
    history_path(settings).write_text(json.dumps(run) + "\n")
    registry = CollectorRegistry()
    collector = SchedulerMetrics(settings)
    registry.register(collector)
    collector.running_since = 1.8e9  # a run in progress is the last one started
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(generate_latest(registry).decode()) for s in f.samples}
    assert samples[("recsys_retrain_runs_total", (("decision", "rejected"),))] == 1
    assert samples[("recsys_retrain_hr10", (("model", "current"),))] == 0.3
    assert samples[("recsys_retrain_last_decision_info", (("decision", "rejected"),))] == 1
    assert samples[("recsys_retrain_last_start_timestamp_seconds", ())] == 1.8e9
    assert samples[("recsys_retrain_consecutive_rejections", ())] == 1
