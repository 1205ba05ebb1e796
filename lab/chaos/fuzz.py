"""``recsys chaos fuzz``: the live Serve app fuzzed from its own OpenAPI schema by Schemathesis.

Every check (server errors, status codes, content types, headers, response schemas, negative
data rejected, positive data accepted, auth enforced, ...), positive and negative data, at
least ``cases`` generated cases per operation, against the deployed app on a scratch topic
and Redis prefix of its own (fuzzed events never reach the real data). Passed: no failure.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections import defaultdict
from pathlib import Path

from lab.bench.stream import scratch_settings
from lab import stack
from recsys.auth import KeyStore, Scope
from recsys.feature_store import FeatureStore
from recsys.settings import Settings

HOOKS = "lab.chaos.fuzz_hooks"


def per_operation(ndjson: Path) -> dict[str, dict]:
    """Cases and failed cases per operation (stateful link sequences count as their own)."""
    cases, failed, checks = defaultdict(set), defaultdict(set), defaultdict(lambda: defaultdict(int))
    for line in ndjson.read_text().splitlines():
        event = json.loads(line)
        finished = event.get("ScenarioFinished")
        if not finished:
            continue
        recorder = finished["recorder"]
        label = recorder.get("label") or "stateful"
        cases[label].update(recorder.get("cases", {}))
        for case_id, results in recorder.get("checks", {}).items():
            for check in results:
                if check["status"] == "failure":
                    failed[label].add(case_id)
                    checks[label][check["name"]] += 1
    return {label: {"cases": len(ids), "failed_cases": len(failed[label]), "failed_checks": dict(checks[label])}
            for label, ids in sorted(cases.items())}


def _schema_ts_max(url: str) -> int:
    with urllib.request.urlopen(f"{url}/openapi.json", timeout=10) as resp:
        schema = json.loads(resp.read())
    return schema["components"]["schemas"]["Event"]["properties"]["ts"]["maximum"]


def fuzz(settings: Settings, cases: int = 500, progress=print) -> dict:
    from lab.serve_local import base_url, serve_up
    s = scratch_settings(settings, "fuzz")
    stack.ensure_topics(s)
    out = settings.home / "chaos-fuzz"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    store = FeatureStore(s)
    try:
        serve_up(s, progress=lambda *_: None)
        url = base_url(s)
        key = KeyStore(s, store.redis).create("fuzz", [Scope.admin], rate_per_s=1e6, burst=10**6)["key"]
        ts_max = _schema_ts_max(url)
        env = {**os.environ, "SCHEMATHESIS_HOOKS": HOOKS, "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
               "RECSYS_FUZZ_TS_UNDECIDED": f"{ts_max},{ts_max + 3_600_000}"}
        cmd = [str(Path(sys.executable).with_name("schemathesis")), "run", f"{url}/openapi.json", "--checks", "all",
               "--mode", "all", "--max-examples", str(cases), "--seed", "13", "--no-color", "--workers", "2",
               "--header", f"Authorization: Bearer {key}", "--report", "ndjson,junit",
               "--report-dir", str(out), "--report-ndjson-path", str(out / "events.ndjson")]
        progress(f"chaos fuzz: schemathesis, all checks, positive and negative data, {cases} cases per operation "
                 f"against {url}; report in {out}")
        started = time.monotonic()
        with (out / "schemathesis.log").open("w") as log:
            rc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
        seconds = time.monotonic() - started
    finally:
        store.clear()
        KeyStore(s, store.redis).clear()
        stack.delete_topics(s)
        serve_up(settings, progress=lambda *_: None)  # back to the configured deployment
    operations = per_operation(out / "events.ndjson")
    failures = sum(op["failed_cases"] for op in operations.values())
    server_errors = sum(op["failed_checks"].get("not_a_server_error", 0) for op in operations.values())
    schema_breaks = sum(op["failed_checks"].get("response_schema_conformance", 0) for op in operations.values())
    return {"scenario": "fuzz", "operations": operations, "failed_cases": failures, "server_errors": server_errors,
            "schema_violations": schema_breaks, "schemathesis_exit": rc, "seconds": round(seconds, 1),
            "passed": rc == 0 and failures == 0, "report": str(out)}
