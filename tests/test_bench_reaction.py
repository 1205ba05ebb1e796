"""recsys bench reaction's pure parts: one user's click-and-wait against a fake API, and the
summary's pass flag. The command itself runs against the real stack (README, "Benchmarks")."""
from __future__ import annotations

import asyncio

import pytest

from lab.bench.reaction import react, summary
from recsys.errors import RecsysError


class _Answer:
    def __init__(self, status: int, body):
        self.status, self.body = status, body

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        return False

    async def json(self):
        return self.body

    async def text(self):
        return str(self.body)


class FakeApi:
    """Lists that change ``after`` GETs past the click (never with None); records the posts."""

    def __init__(self, after: int | None, first: list[str] = ("i1", "i2", "i3"), post_status: int = 202):
        self.after, self.first, self.post_status = after, list(first), post_status
        self.posted, self.gets_since_click = [], 0

    def get(self, url):
        if self.posted:
            self.gets_since_click += 1
        changed = self.posted and self.after is not None and self.gets_since_click >= self.after
        items = self.first[1:] if changed else self.first
        return _Answer(200, {"items": [{"item_id": i} for i in items]})

    def post(self, url, json):
        self.posted.extend(json)
        return _Answer(self.post_status, {"accepted": len(json)})


def test_the_first_item_is_clicked_and_the_wait_ends_at_the_first_changed_list():
    api = FakeApi(after=3)
    got = asyncio.run(react(api, "http://x", "u1", timeout_s=5))
    (event,) = api.posted
    assert (event["user_id"], event["item_id"], event["type"]) == ("u1", "i1", "click")
    assert event["event_id"].startswith("reaction-") and got["polls"] == 3 and got["ms"] >= 0


def test_a_list_that_never_changes_is_a_miss_and_a_refused_click_an_error():
    assert asyncio.run(react(FakeApi(after=None), "http://x", "u1", timeout_s=0.05))["ms"] is None
    with pytest.raises(RecsysError, match="POST /v1/events: 503"):
        asyncio.run(react(FakeApi(after=1, post_status=503), "http://x", "u1", timeout_s=1))
    with pytest.raises(RecsysError, match="empty list"):
        asyncio.run(react(FakeApi(after=1, first=[]), "http://x", "u1", timeout_s=1))


def test_the_summary_passes_only_when_every_list_changed_within_the_budget():
    fast = [{"ms": float(ms), "polls": 1} for ms in range(1, 101)]
    ok = summary(fast, budget_ms=250)
    assert ok["passed"] and ok["changed"] == 100 and ok["reaction_ms"]["p50"] == 50.5 and ok["reaction_ms"]["max"] == 100
    assert not summary(fast, budget_ms=90)["passed"]  # p99 99.01 over 90
    missed = summary([*fast, {"ms": None, "polls": 40}], budget_ms=250)
    assert not missed["passed"] and missed["unchanged_within_timeout"] == 1
    assert not summary([], budget_ms=250)["passed"]


def test_the_results_page_shows_the_reaction_percentiles_and_the_background():
    from lab.bench import report
    run = {"users": 200, "changed": 199, "reaction_ms": {"p50": 30.6, "p90": 49.9, "p99": 96.4, "max": 122.6},
           "p99_budget_ms": 250.0, "passed": False, "background": {"shoppers": 8, "rps": 260.2},
           "measured_at": "2026-12-07T17:00:00+00:00", "commit": "abc1234"}
    page = report.render({"reaction": [run]})
    assert "| reaction p99, ms | 96.4 |" in page and "| users whose list changed | 199 of 200 |" in page
    assert "8 background shoppers at 260.2 req/s" in page
