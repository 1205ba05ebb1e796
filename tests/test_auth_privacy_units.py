"""Unit tests of the pure parts of issue 13: scopes, decisions, pseudonyms, tombstones, secret files."""
from __future__ import annotations

import os
import stat

import pyarrow as pa
import pytest

from recsys.archive import forgotten_rows
from recsys.auth import Decision, Forbidden, RateLimited, Scope, Unauthorized, parse_scopes
from recsys.errors import InvalidInput
from recsys.events import Event
from recsys.privacy import Pseudonyms
from recsys.secrets import USER_ID_KEY, ensure_secret, env_name, read_secret
from recsys.settings import Settings


def test_scopes_parse_and_unknown_ones_are_named():
    assert parse_scopes("recs:read, events:write") == [Scope.recs_read, Scope.events_write]
    with pytest.raises(InvalidInput, match="bogus.*events:write, catalogue:write, recs:read, admin"):
        parse_scopes("recs:read,bogus")
    with pytest.raises(InvalidInput, match="none given"):
        parse_scopes(" , ")


def test_decisions_map_to_401_403_429_with_headers():
    Decision(0, 0).raise_unless_allowed(Scope.recs_read)
    with pytest.raises(Unauthorized) as e:
        Decision(1, 0).raise_unless_allowed(Scope.recs_read)
    assert e.value.http_status == 401 and e.value.http_headers == {"WWW-Authenticate": "Bearer"}
    with pytest.raises(Forbidden, match="events:write"):
        Decision(2, 0).raise_unless_allowed(Scope.events_write)
    with pytest.raises(RateLimited) as e:
        Decision(3, 1500).raise_unless_allowed(Scope.recs_read)
    assert e.value.http_status == 429 and e.value.http_headers == {"Retry-After": "2"}
    with pytest.raises(RateLimited) as e:
        Decision(3, 40).raise_unless_allowed(Scope.recs_read)
    assert e.value.http_headers == {"Retry-After": "1"}  # never 0: a client would retry at once


def test_pseudonyms_are_keyed_deterministic_and_fixed_length():
    one, other = Pseudonyms("key-1"), Pseudonyms("key-2")
    assert one.user_id("alice") == one.user_id("alice") != one.user_id("alice ")
    assert one.user_id("alice") != other.user_id("alice")  # without the key, no way to recompute it
    assert len(one.user_id("a" * 128)) == len(one.user_id("b")) == 33 and one.user_id("b").startswith("p")
    event = Event(event_id="e", user_id="alice", item_id="i", type="view", ts=1)
    assert one.event(event) == event.model_copy(update={"user_id": one.user_id("alice")})


def test_tombstones_hide_a_users_rows_up_to_their_time_only():
    table = pa.table({"user_id": ["a", "b", "a", "c", "a"], "ts": [1, 2, 5, 6, 9]})
    assert forgotten_rows(table, {"a": 5}).tolist() == [True, False, True, False, False]
    assert forgotten_rows(table, {"a": 5, "c": 100}).tolist() == [True, False, True, True, False]
    assert not forgotten_rows(table, {}).any() and not forgotten_rows(table, {"z": 10}).any()


def test_a_secret_is_made_once_mode_0600_and_the_environment_wins(tmp_path, monkeypatch):
    monkeypatch.delenv(env_name(USER_ID_KEY), raising=False)
    settings = Settings(secrets_dir=tmp_path / "secrets")
    assert read_secret(settings, USER_ID_KEY) is None
    made = ensure_secret(settings, USER_ID_KEY)
    assert len(made) >= 40 and ensure_secret(settings, USER_ID_KEY) == made  # never replaced
    mode = stat.S_IMODE(os.stat(tmp_path / "secrets" / USER_ID_KEY).st_mode)
    assert mode == 0o600
    monkeypatch.setenv("RECSYS_SECRET_USER_ID_KEY", "from-the-environment")
    assert read_secret(settings, USER_ID_KEY) == "from-the-environment"


def test_a_users_arm_is_stable_and_the_shares_hold():
    from recsys.experiments import in_candidate_arm, overlap_at_k
    users = [f"user-{n}" for n in range(20_000)]
    half = [in_candidate_arm(u, 0.5, "v0002") for u in users]
    assert half == [in_candidate_arm(u, 0.5, "v0002") for u in users]  # stable
    assert abs(sum(half) / len(users) - 0.5) < 0.02
    tenth = [in_candidate_arm(u, 0.1, "v0002") for u in users]
    assert abs(sum(tenth) / len(users) - 0.1) < 0.01
    assert all(h for h, t in zip(half, tenth) if t)  # a smaller share is inside the larger one
    other = [in_candidate_arm(u, 0.5, "v0003") for u in users]
    assert 0.4 < sum(a == b for a, b in zip(half, other)) / len(users) < 0.6  # another split per experiment
    assert all(in_candidate_arm(u, 1.0, "v0002") for u in users[:100])
    assert overlap_at_k(["a", "b", "c"], ["c", "x", "a"], k=3) == 2 / 3 and overlap_at_k([], ["a"]) == 1.0


def test_the_guardrail_stops_a_worse_candidate_and_rarely_an_equal_one():
    """Checked after every 100 lists per arm, as the online consumer does: with equal hit rates
    it stops in at most alpha of the runs (always-valid); a candidate at 0.12 against 0.20
    stops within 3,000 lists per arm in nearly every run, and a better one never."""
    import numpy as np

    from recsys.experiments import guardrail
    rng = np.random.default_rng(7)

    def first_stop(p_a: float, p_b: float, lists: int = 3000, step: int = 100) -> int | None:
        a, b = rng.random(lists) < p_a, rng.random(lists) < p_b
        for n in range(step, lists + 1, step):
            if guardrail((n, int(a[:n].sum())), (n, int(b[:n].sum())), alpha=0.05, effect=0.02).stop:
                return n
        return None

    equal = [first_stop(0.2, 0.2) for _ in range(300)]
    assert sum(s is not None for s in equal) / len(equal) <= 0.05
    worse = [first_stop(0.2, 0.12) for _ in range(100)]
    assert sum(s is not None for s in worse) >= 95 and np.median([s for s in worse if s]) <= 1500
    assert all(first_stop(0.2, 0.3) is None for _ in range(50))
    assert not guardrail((100, 50), (100, 0), min_lists=200).stop  # too few lists to judge
