"""`recsys top`'s drawing: a fixed snapshot rendered with rich to a string (no services)."""
from __future__ import annotations

import io

from rich.console import Console

from cli.top import view

SNAPSHOT = {
    "source": "http://127.0.0.1:29090", "rps": {"recommendations": 412.25, "events": 37.5},
    "p99_ms": {"recommendations": 18.75}, "lag": {"features": 1234.0, "archive": 0.0}, "freshness_p99_s": 0.4321,
    "replicas": 3.0, "served": ["v0007"], "model_age_s": {"v0007": 2 * 3600.0}, "rejections": 1.0,
    "last_decision": "published", "hr10": {"candidate": 0.1234, "current": 0.1111},
}
EMPTY = {"source": "endpoints", "rps": {}, "p99_ms": {}, "lag": {}, "freshness_p99_s": None, "replicas": None,
         "served": [], "model_age_s": {}, "rejections": None, "last_decision": None, "hr10": {}}


def _text(snap: dict) -> str:
    console = Console(file=io.StringIO(), width=120, color_system=None)
    console.print(view(snap, "12:34:56"))
    return console.file.getvalue()


def test_a_snapshot_draws_its_routes_and_figures():
    lines = _text(SNAPSHOT).splitlines()
    assert lines[0].rstrip() == "recsys top  12:34:56  from http://127.0.0.1:29090"
    cells = [[c for c in line.split() if c not in "│┃"] for line in lines]
    assert ["route", "req/s", "p99", "ms"] in cells
    assert ["events", "37.5", "-"] in cells and ["recommendations", "412.2", "18.8"] in cells
    text = "\n".join(lines)
    assert "consumer lag (records)  archive 0, features 1,234" in text
    assert "freshness p99           0.432 s" in text and "replicas (RecsysApi)    3" in text
    assert "model served            v0007; current v0007 (age 2.0 h)" in text
    assert "gate                    last decision published, consecutive rejections 1, HR@10 candidate 0.1234, " \
           "current 0.1111" in text


def test_an_empty_snapshot_draws_dashes():
    text = _text(EMPTY)
    assert "(no requests)" in text and "from endpoints" in text
    assert "freshness p99           - s" in text and "- (scheduler not seen)" in text
    assert "last decision -, consecutive rejections -, HR@10 -" in text
