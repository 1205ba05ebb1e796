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
    with pytest.raises(InvalidInput, match="bogus.*events:write, recs:read, admin"):
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
