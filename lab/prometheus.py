"""The local Prometheus's HTTP API (``recsys stack up --monitoring``): instant and range
queries, for the load-test report, ``recsys top`` and the dashboards' test."""
from __future__ import annotations

import httpx

from recsys.errors import RecsysError
from recsys.settings import Settings


class PromQLError(RecsysError):
    """Prometheus refused a query (it does not parse, or it failed), with Prometheus's reason."""


def url(s: Settings) -> str:
    return f"http://127.0.0.1:{s.monitoring.prometheus_port}"


def answers(s: Settings) -> bool:
    try:
        return httpx.get(f"{url(s)}/-/ready", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _get(s: Settings, path: str, params: dict) -> dict:
    reply = httpx.get(f"{url(s)}/api/v1/{path}", params=params, timeout=10)
    body = reply.json()
    if body.get("status") != "success":
        raise PromQLError(f"{params.get('query')!r}: {body.get('errorType')}: {body.get('error')}")
    return body["data"]


def query(s: Settings, expr: str, at: float | None = None) -> list[dict]:
    """An instant query's series: [{"metric": {labels}, "value": [t, "v"]}]."""
    return _get(s, "query", {"query": expr, **({"time": at} if at is not None else {})})["result"]


def query_range(s: Settings, expr: str, start: float, end: float, step: float) -> list[dict]:
    """A range query's series: [{"metric": {labels}, "values": [[t, "v"], ...]}]."""
    return _get(s, "query_range", {"query": expr, "start": start, "end": end, "step": step})["result"]


def scalar(s: Settings, expr: str) -> float | None:
    """The value of a query that yields one series (the first if more), None when it yields none."""
    series = query(s, expr)
    return float(series[0]["value"][1]) if series else None


def targets(s: Settings) -> list[dict]:
    """Each active scrape target: job, address, health (up, down, unknown), the last error."""
    active = _get(s, "targets", {"state": "active"})["activeTargets"]
    return sorted(({"job": t["labels"].get("job"), "address": t["labels"].get("instance"), "health": t["health"],
                    **({"error": t["lastError"]} if t.get("lastError") else {})} for t in active),
                  key=lambda t: t["job"] or "")
