"""``recsys top``: a live view of the running system, refreshed every second.

From the local Prometheus when it runs (``recsys stack up --monitoring``); otherwise from the
processes' own endpoints (Ray's exporter for Serve, the stream worker's, the archiver's, the
scheduler's), whose counters are differenced over the last 30 s for the rates and the p99s.
Gathering (``from_prometheus``, ``Endpoints``) is apart from drawing (``view``, with rich).
"""
from __future__ import annotations

import json
import math
import time
from collections import defaultdict, deque

import httpx
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from lab import prometheus
from recsys.settings import Settings

DEPLOYMENT = "RecsysApi"

# What Prometheus is asked (the same names as the dashboards and rules, deploy/monitoring).
QUERIES = {
    "rps": "sum by (route) (rate(ray_recsys_request_latency_ms_count[1m]))",
    "p99_ms": "histogram_quantile(0.99, sum by (le, route) (rate(ray_recsys_request_latency_ms_bucket[1m])))",
    "lag": "sum by (group) (recsys_consumer_lag)",
    "freshness_p99_s": "histogram_quantile(0.99, sum by (le) (rate(recsys_stream_freshness_seconds_bucket[1m])))",
    "replicas": f'sum(ray_serve_deployment_replica_healthy{{deployment="{DEPLOYMENT}"}})',
    "served": "max by (version) (ray_recsys_model_version_info) == 1",
    "model_created": "max by (version) (recsys_model_created_timestamp_seconds)",
    "rejections": "max(recsys_retrain_consecutive_rejections)",
    "last_decision": "max by (decision) (recsys_retrain_last_decision_info) == 1",
    "hr10": "max by (model) (recsys_retrain_hr10)",
}


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Prometheus's histogram_quantile over cumulative (upper bound, count) buckets, +Inf last:
    linear inside the bucket that holds the rank; the highest finite bound if it lies in +Inf."""
    buckets = sorted(buckets)
    total = buckets[-1][1] if buckets else 0
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for upper, count in buckets:
        if count >= rank:
            if math.isinf(upper):
                return lower
            return lower + (upper - lower) * (rank - below) / (count - below) if count > below else upper
        lower, below = upper, count
    return lower


def _by(series: list[dict], label: str) -> dict:
    return {s["metric"].get(label, ""): float(s["value"][1]) for s in series}


def from_prometheus(s: Settings) -> dict:
    got = {name: prometheus.query(s, expr) for name, expr in QUERIES.items()}
    created = _by(got["model_created"], "version")
    return {
        "source": prometheus.url(s),
        "rps": _by(got["rps"], "route"), "p99_ms": _by(got["p99_ms"], "route"),
        "lag": _by(got["lag"], "group"), "freshness_p99_s": next(iter(_by(got["freshness_p99_s"], "").values()), None),
        "replicas": next(iter(_by(got["replicas"], "").values()), None),
        "served": sorted(_by(got["served"], "version")),
        "model_age_s": {v: time.time() - t for v, t in created.items()},
        "rejections": next(iter(_by(got["rejections"], "").values()), None),
        "last_decision": next(iter(_by(got["last_decision"], "decision")), None),
        "hr10": _by(got["hr10"], "model"),
    }


class Endpoints:
    """The processes' endpoints read directly; rates and p99s difference the counters against
    the oldest read of the last ``window_s`` (Ray's exporter moves only every 10 s, its report
    interval, so a one-second difference is mostly zero)."""

    def __init__(self, s: Settings, window_s: float = 30.0):
        self.urls = {"serve": f"http://127.0.0.1:{s.ray.metrics_port}/metrics",
                     "stream": f"http://127.0.0.1:{s.monitoring.stream_port}/metrics",
                     "archive": f"http://127.0.0.1:{s.monitoring.archive_port}/metrics",
                     "scheduler": f"http://127.0.0.1:{s.monitoring.scheduler_port}/metrics"}
        self.window_s = window_s
        self.reads: deque[tuple[float, dict]] = deque()

    def read(self) -> dict:
        """{(sample name, frozenset(labels)): value}, summed over the label sets told apart only
        by Ray's per-process labels; a process that does not answer adds nothing."""
        samples: dict = defaultdict(float)
        keep = {"route", "stage", "le", "group", "version", "deployment", "decision", "model"}
        for url in self.urls.values():
            try:
                text = httpx.get(url, timeout=2).text
            except httpx.HTTPError:
                continue
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    labels = frozenset((k, v) for k, v in sample.labels.items() if k in keep)
                    samples[(sample.name, labels)] += sample.value
        return samples

    def snapshot(self) -> dict:
        now, current = time.monotonic(), self.read()
        while len(self.reads) > 1 and now - self.reads[1][0] >= self.window_s:
            self.reads.popleft()  # keep one read at least window_s old, once there is one
        before = self.reads[0] if self.reads else None
        self.reads.append((now, current))

        def pick(name: str, label: str | None = None) -> dict:
            return {dict(labels).get(label, "") if label else "": v for (n, labels), v in current.items() if n == name}

        def delta(name: str) -> dict:
            if before is None:
                return {}
            return {labels: v - before[1].get((n, labels), 0.0) for (n, labels), v in current.items() if n == name}

        seconds = now - before[0] if before else None
        rps = {dict(k).get("route", ""): v / seconds for k, v in delta("ray_recsys_request_latency_ms_count").items()} \
            if seconds else {}
        p99 = {}
        for route in rps:
            buckets = [(float(dict(k)["le"]), v) for k, v in delta("ray_recsys_request_latency_ms_bucket").items()
                       if dict(k).get("route") == route]
            p99[route] = histogram_quantile(0.99, buckets)
        fresh = [(float(dict(k)["le"]), v) for k, v in delta("recsys_stream_freshness_seconds_bucket").items()]
        healthy = {labels: v for (n, labels), v in current.items()
                   if n == "ray_serve_deployment_replica_healthy" and dict(labels).get("deployment") == DEPLOYMENT}
        served = pick("ray_recsys_model_version_info", "version")
        decision = pick("recsys_retrain_last_decision_info", "decision")
        return {
            "source": "endpoints", "rps": rps, "p99_ms": p99, "lag": pick("recsys_consumer_lag", "group"),
            "freshness_p99_s": histogram_quantile(0.99, fresh) if fresh else None,
            "replicas": sum(healthy.values()) if healthy else None,
            "served": sorted(v for v, x in served.items() if x == 1),
            "model_age_s": {v: time.time() - t for v, t in pick("recsys_model_created_timestamp_seconds", "version").items()},
            "rejections": next(iter(pick("recsys_retrain_consecutive_rejections").values()), None),
            "last_decision": next((d for d, x in decision.items() if x == 1), None),
            "hr10": pick("recsys_retrain_hr10", "model"),
        }


def _fmt(value, spec: str = ".1f", missing: str = "-") -> str:
    return missing if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _age(seconds: float) -> str:
    return f"{seconds / 86400:.1f} d" if seconds >= 86400 else f"{seconds / 3600:.1f} h" if seconds >= 3600 \
        else f"{seconds / 60:.0f} min"


def view(snap: dict, clock: str) -> Group:
    """A snapshot drawn with rich: a table of the routes, then the pipeline's figures. Pure: the
    same snapshot and clock draw the same view (tests/test_top.py renders it to a string)."""
    routes = Table()
    routes.add_column("route")
    routes.add_column("req/s", justify="right")
    routes.add_column("p99 ms", justify="right")
    for r in sorted(set(snap["rps"]) | set(snap["p99_ms"])) or ["(no requests)"]:
        routes.add_row(r, _fmt(snap["rps"].get(r)), _fmt(snap["p99_ms"].get(r)))
    figures = Table.grid(padding=(0, 2))
    figures.add_column(style="bold")
    figures.add_column()
    figures.add_row("consumer lag (records)", ", ".join(f"{g} {v:,.0f}" for g, v in sorted(snap["lag"].items())) or "-")
    figures.add_row("freshness p99", f"{_fmt(snap['freshness_p99_s'], '.3f')} s")
    figures.add_row(f"replicas ({DEPLOYMENT})", _fmt(snap["replicas"], ".0f"))
    figures.add_row("model served", f"{', '.join(snap['served']) or '-'}; current "
                    + (", ".join(f"{v} (age {_age(a)})" for v, a in snap["model_age_s"].items())
                       or "- (scheduler not seen)"))
    figures.add_row("gate", f"last decision {snap['last_decision'] or '-'}, consecutive rejections "
                    f"{_fmt(snap['rejections'], '.0f')}, HR@10 "
                    + (", ".join(f"{m} {v:.4f}" for m, v in sorted(snap["hr10"].items())) or "-"))
    return Group(Text(f"recsys top  {clock}  from {snap['source']}", style="bold"), routes, figures)


def run(s: Settings, once: bool = False, as_json: bool = False, every_s: float = 1.0) -> int:
    endpoints = None if prometheus.answers(s) else Endpoints(s)
    if endpoints is not None:
        endpoints.snapshot()  # the first read: rates need two
        time.sleep(every_s)

    def snapshot() -> dict:
        return from_prometheus(s) if endpoints is None else endpoints.snapshot()

    if as_json:
        while True:
            print(json.dumps(snapshot(), default=str), flush=True)
            if once:
                return 0
            time.sleep(every_s)
    console = Console()
    if once:
        console.print(view(snapshot(), time.strftime("%H:%M:%S")))
        return 0
    with Live(console=console, auto_refresh=False) as live:
        while True:
            live.update(view(snapshot(), time.strftime("%H:%M:%S")), refresh=True)
            time.sleep(every_s)
