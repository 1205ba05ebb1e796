"""Locust shoppers against the recsys API, driven by a peak-season shape.

Run by ``recsys loadtest`` (which records replicas and checks SLOs), or by hand::

    LOADTEST_API_KEY=$(recsys keys create --name me --scopes recs:read,events:write --json | jq -r .key) \
    LOADTEST_PROFILE=smoke .venv/bin/locust -f loadtest/locustfile.py --headless --host http://127.0.0.1:28000

Environment:
  LOADTEST_API_KEY       the API key the shoppers send (``recsys loadtest`` makes one per run)
  LOADTEST_PROFILE       a profile of loadtest/shapes.py (default smoke)
  LOADTEST_PROFILE_SPEC  a profile as JSON (Profile.spec()), instead of a name
  LOADTEST_RECORD_DIR    if set: every request goes to requests.csv there (start time, route,
                         latency, ok, status), every event id answered 202 to events_posted.txt,
                         and the shape's start time to shape_start.txt
  LOADTEST_*             the shoppers' behaviour (loadtest/shoppers.py, ShopperConfig)
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from locust import FastHttpUser, LoadTestShape, between, events, task

from loadtest.report import EVENTS, EVENTS_RETRIED, RECS, RECS_RETRIED

RETRIES = 3  # a 503'd request is sent again up to this many times, as a client with backoff would
from loadtest.shapes import Profile, get_profile
from loadtest.shoppers import Population, ShopperConfig


def _profile() -> Profile:
    spec = os.environ.get("LOADTEST_PROFILE_SPEC")
    return Profile(**json.loads(spec)) if spec else get_profile(os.environ.get("LOADTEST_PROFILE", "smoke"))


PROFILE = _profile()
CONFIG = ShopperConfig.from_env()
POPULATION = Population(CONFIG)


class _Recorder:
    """Raw per-request samples and accepted event ids, streamed to files (buffered)."""

    def __init__(self, folder: str | None):
        self.folder = Path(folder) if folder else None
        self.requests = self.posted = None
        if self.folder:
            self.folder.mkdir(parents=True, exist_ok=True)
            self.requests = (self.folder / "requests.csv").open("w", buffering=1 << 16)
            self.requests.write("start_s,route,latency_ms,ok,status\n")
            self.posted = (self.folder / "events_posted.txt").open("w", buffering=1 << 16)

    def request(self, start_s: float, route: str, latency_ms: float, ok: bool, status: int) -> None:
        if self.requests:
            self.requests.write(f"{start_s:.4f},{route},{latency_ms:.2f},{int(ok)},{status}\n")

    def accepted(self, event_id: str, user_id: str) -> None:
        if self.posted:
            self.posted.write(f"{event_id} {user_id}\n")

    def shape_started(self) -> None:
        if self.folder:
            (self.folder / "shape_start.txt").write_text(f"{time.time():.4f}\n")

    def close(self) -> None:
        for f in (self.requests, self.posted):
            if f:
                f.close()
        self.requests = self.posted = None


RECORDER = _Recorder(os.environ.get("LOADTEST_RECORD_DIR"))


@events.request.add_listener
def _on_request(request_type, name, response_time, response_length, response=None, context=None,
                exception=None, start_time=None, **_):
    status = getattr(response, "status_code", 0) or 0
    RECORDER.request(start_time or time.time() - response_time / 1000, name, response_time, exception is None, status)


@events.quitting.add_listener
def _on_quitting(environment, **_):
    RECORDER.close()


class Shopper(FastHttpUser):
    """One shopper per visit: recommendations first, then mostly recommendations, some events.
    A shopper with taste (``LOADTEST_TASTE_SOURCE``) posts its reactions to a list on its next
    requests, before anything else, and before the next visit."""

    wait_time = between(PROFILE.wait_min_s, PROFILE.wait_max_s)
    default_headers = {"Authorization": f"Bearer {os.environ.get('LOADTEST_API_KEY', '')}"}
    # Fail fast instead of piling up when the service is overloaded.
    network_timeout = 10.0
    connection_timeout = 5.0

    def on_start(self):
        self.pending: list[dict] = []  # reactions to the lists shown, to post next
        self._new_visit()

    def _new_visit(self):
        self.user_id, self.is_new = POPULATION.shopper()
        self.left = POPULATION.visit_length()
        self.shown: list[str] = []
        self.first = True

    @task
    def browse(self):
        if self.pending:
            self.post_event(self.pending.pop(0))
            return
        if self.left <= 0:
            self._new_visit()
        self.left -= 1
        if not self.first and POPULATION.wants_event():
            self.post_event()
        else:
            self.recommend()
        self.first = False

    def _send(self, request, check, retried_name: str) -> None:
        """Like a well-behaved client: a 503 (a broker or Redis that did not answer in time) is
        sent again after its Retry-After (at most 1 s), up to RETRIES times; safe, since a GET
        changes nothing and an event's event_id makes its post idempotent. Each 503'd attempt is
        recorded under ``retried_name``; an error is what remains after the last try."""
        for attempt in range(RETRIES + 1):
            with request() as resp:
                if resp.status_code != 503 or attempt == RETRIES:
                    check(resp)
                    return
                resp.request_meta["name"] = retried_name
                resp.success()
                retry_after = (resp.headers or {}).get("Retry-After") or "1"
            time.sleep(min(1.0, float(retry_after)) if retry_after.replace(".", "", 1).isdigit() else 1.0)

    def recommend(self):
        url = f"/v1/recommendations/{self.user_id}?k={CONFIG.k}"
        self._send(lambda: self.client.get(url, name=RECS, catch_response=True), self._check_recs, RECS_RETRIED)

    def _check_recs(self, resp) -> None:
        if resp.status_code != 200:
            resp.failure(f"status {resp.status_code}")
            return
        try:
            body = resp.json()
            items = [it["item_id"] for it in body["items"]]
        except (ValueError, KeyError, TypeError) as exc:
            resp.failure(f"bad body: {exc!r}")
            return
        if self.first and self.is_new and not body.get("fallback"):
            resp.failure("a new user was not answered by the fallback")
            return
        self.shown = items
        self.pending += POPULATION.reactions(self.user_id, items)

    def post_event(self, event: dict | None = None):
        event = event or POPULATION.event(self.user_id, self.shown)
        self._send(lambda: self.client.post(EVENTS, json=event, name=EVENTS, catch_response=True),
                   lambda resp: self._check_event(resp, event), EVENTS_RETRIED)

    def _check_event(self, resp, event: dict) -> None:
        if resp.status_code != 202:
            resp.failure(f"status {resp.status_code}")
            return
        try:
            accepted = resp.json().get("accepted")
        except ValueError:
            accepted = None
        if accepted != 1:
            resp.failure(f"accepted {accepted!r}, expected 1")
            return
        RECORDER.accepted(event["event_id"], event["user_id"])


class PeakSeason(LoadTestShape):
    """Follows the profile's users over time; stops the test (and headless Locust) at its end."""

    def reset_time(self):
        super().reset_time()
        RECORDER.shape_started()

    def tick(self):
        users = PROFILE.users_at(self.get_run_time())
        if users is None:
            return None
        return users, PROFILE.spawn_rate()
