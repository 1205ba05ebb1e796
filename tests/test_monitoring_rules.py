"""The Prometheus rules (deploy/monitoring/rules.yml) are valid, pass their promtool unit
tests (rules_test.yml), test every alert both firing and silent, and use the budgets the rest
of the project uses. Needs promtool only (no services)."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from loadtest.report import Budgets

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "deploy" / "monitoring" / "rules.yml"
RULES_TEST = ROOT / "deploy" / "monitoring" / "rules_test.yml"


def _promtool(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("promtool")
    if exe is None:  # a failure, not a skip: the rules would go untested
        pytest.fail("promtool not found on PATH: run `bash deploy/local/setup.sh` (installs the Debian "
                    "`prometheus` package, which has promtool)")
    return subprocess.run([exe, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def _alerts() -> dict[str, dict]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {r["alert"]: r for g in groups for r in g["rules"] if "alert" in r}


def _threshold(alert: str, series: str, op: str) -> float:
    """The number in the alert's expression ``<series> <op> <number>``."""
    expr = _alerts()[alert]["expr"].strip()
    m = re.fullmatch(rf"{re.escape(series)} {re.escape(op)} ([0-9.]+)", expr)
    assert m, f"{alert}: expected '{series} {op} <number>', got {expr!r}"
    return float(m.group(1))


def test_promtool_check_rules():
    r = _promtool("check", "rules", str(RULES.relative_to(ROOT)))
    assert r.returncode == 0, r.stdout + r.stderr


def test_promtool_unit_tests_pass():
    r = _promtool("test", "rules", str(RULES_TEST.relative_to(ROOT)))
    assert r.returncode == 0, r.stdout + r.stderr


def test_every_alert_has_a_one_line_runbook_and_a_firing_and_a_silent_case():
    cases = [c for group in yaml.safe_load(RULES_TEST.read_text())["tests"] for c in group.get("alert_rule_test", [])]
    alerts = _alerts()
    assert len(alerts) >= 10
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in ("page", "ticket"), name
        assert rule["annotations"]["summary"].strip(), name
        runbook = rule["annotations"].get("runbook", "").strip()
        assert runbook and "\n" not in runbook, f"{name}: the runbook must be one line"
        mine = [c for c in cases if c["alertname"] == name]
        assert any(c.get("exp_alerts") for c in mine), f"{name}: no test case where it fires"
        # exp_alerts must be given as []: a case without it says nothing about intent.
        assert any("exp_alerts" in c and c["exp_alerts"] == [] for c in mine), f"{name}: no case where it stays silent"


def test_replicas_alert_threshold_is_the_serve_max_replicas():
    config = yaml.safe_load((ROOT / "serving" / "config.yaml").read_text())
    dep = next(d for d in config["applications"][0]["deployments"] if d["name"] == "RecsysApi")
    max_replicas = dep["autoscaling_config"]["max_replicas"]
    assert _threshold("RecsysReplicasAtMaximum", "recsys:serve_replicas:sum", ">=") == max_replicas
    assert f"maximum of {max_replicas} replicas" in _alerts()["RecsysReplicasAtMaximum"]["annotations"]["summary"]


def test_latency_and_error_alerts_use_the_load_test_budgets():
    budgets = Budgets()
    assert _threshold("RecsysLatencyP99OverBudget", "route:recsys_request_latency_ms:p99_5m", ">") == budgets.p99_ms
    assert _threshold("RecsysErrorRatioHigh", "recsys:http_error_ratio:rate5m", ">") == budgets.max_error_rate
    assert f"budget {budgets.p99_ms:g} ms" in _alerts()["RecsysLatencyP99OverBudget"]["annotations"]["summary"]
    assert f"budget {budgets.max_error_rate:.1%}" in _alerts()["RecsysErrorRatioHigh"]["annotations"]["summary"]
