"""The Grafana dashboards of deploy/monitoring/dashboards and their provisioning (no services).

Every dashboard parses and has its own uid; every panel queries Prometheus with plain PromQL
(no Grafana variables, so each expr can be sent as is to Prometheus's HTTP API); the kustomization
that makes them a ConfigMap lists every dashboard file, and the Kubernetes scrape targets name
each job of the metrics contract once.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

MONITORING = Path(__file__).resolve().parents[1] / "deploy" / "monitoring"
DASHBOARDS = sorted((MONITORING / "dashboards").glob("*.json"))
JOBS = {"serve", "haproxy", "stream", "archive", "scheduler", "online", "redis"}


def _panels(dashboard: dict):
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])  # panels inside a collapsed row


def test_there_are_dashboards():
    assert {p.name for p in DASHBOARDS} >= {"requests.json", "stream.json", "retraining.json"}


def test_uids_are_unique():
    uids = [json.loads(p.read_text()).get("uid") for p in DASHBOARDS]
    assert all(uids), uids
    assert len(set(uids)) == len(uids), uids


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_is_well_formed(path: Path):
    dashboard = json.loads(path.read_text())
    assert dashboard["schemaVersion"] == 39 and dashboard["title"]
    variables = dashboard["templating"]["list"]
    assert any(v["name"] == "datasource" and v["type"] == "datasource" and v["query"] == "prometheus"
               for v in variables), variables
    panels = [p for p in _panels(dashboard) if p.get("type") != "row"]
    assert panels, f"{path.name}: no panels"
    problems = []
    for panel in panels:
        title = panel.get("title") or f"panel {panel.get('id')}"
        targets = panel.get("targets") or []
        if not targets:
            problems.append(f"{title}: no targets")
        if not {"x", "y", "w", "h"} <= set(panel.get("gridPos", {})):
            problems.append(f"{title}: no gridPos")
        if not panel.get("fieldConfig", {}).get("defaults", {}).get("unit"):
            problems.append(f"{title}: no unit")
        refs = [t.get("refId") for t in targets]
        if not all(refs) or len(set(refs)) != len(refs):
            problems.append(f"{title}: refIds {refs}")
        for target in targets:
            expr = (target.get("expr") or "").strip()
            if not expr:
                problems.append(f"{title}: empty expr")
            if "$" in expr:  # $__rate_interval, $datasource, ...: Grafana's, not PromQL
                problems.append(f"{title}: Grafana variable in {expr!r}")
    assert not problems, f"{path.name}: " + "; ".join(problems)


def test_kustomization_provisions_every_dashboard():
    kustomization = yaml.safe_load((MONITORING / "kustomization.yaml").read_text())
    generators = {g["name"]: g for g in kustomization["configMapGenerator"]}
    dashboards = generators["recsys-dashboards"]
    assert dashboards["options"]["labels"] == {"grafana_dashboard": "1"}
    on_disk = {f"dashboards/{p.name}" for p in DASHBOARDS}
    assert set(dashboards["files"]) == on_disk, f"listed {sorted(dashboards['files'])}, in dashboards/ {sorted(on_disk)}"
    for generator in generators.values():
        for name in generator.get("files", []):
            assert (MONITORING / name.split("=")[-1]).is_file(), name


def test_kubernetes_targets_name_each_job_once():
    groups = yaml.safe_load((MONITORING / "targets" / "k8s.yml").read_text())
    jobs = [g["labels"]["job"] for g in groups]
    assert sorted(jobs) == sorted(JOBS), jobs
    assert all(len(g["targets"]) == 1 for g in groups), groups
