"""The event contract: one pydantic model validates every event on the wire."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from enum import Enum
from functools import lru_cache
from typing import TYPE_CHECKING, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from recsys.errors import InvalidInput

if TYPE_CHECKING:  # the settings name event types (``online.attributable``): they import this module
    from recsys.settings import FeatureSettings


@dataclass(frozen=True)
class EventTimeBounds:
    """The event times accepted: from ``oldest_ms`` to now plus ``max_skew_s``. A time far in
    the future would take over the trending scores and shrink the retraining window (one in
    the year 33658 stopped the archiver for good); one before any real data is a unit mistake."""

    oldest_ms: int
    max_skew_s: float

    @classmethod
    def of(cls, features: FeatureSettings) -> "EventTimeBounds":
        return cls(features.oldest_event_ms, features.max_clock_skew_s)

    def check(self, ts: int, now_s: float | None = None) -> None:
        newest = int(((time.time() if now_s is None else now_s) + self.max_skew_s) * 1000)
        if not self.oldest_ms <= ts <= newest:
            raise ValueError(f"event time {ts} ms is outside [{self.oldest_ms} ms, now + {self.max_skew_s:g} s]")


@lru_cache(maxsize=1)
def default_bounds() -> EventTimeBounds:
    """The bounds of the default settings."""
    from recsys.settings import FeatureSettings
    return EventTimeBounds.of(FeatureSettings())


class EventType(str, Enum):
    """The event types: the one list (the model's counts, the evaluation protocol, the settings
    and the load test's shoppers read it)."""
    view = "view"
    click = "click"
    add_to_cart = "add_to_cart"
    purchase = "purchase"
    rating = "rating"


class Event(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    event_id: str = Field(min_length=1, max_length=128)
    user_id: str = Field(min_length=1, max_length=128)
    item_id: str = Field(min_length=1, max_length=128)
    type: EventType
    value: Optional[float] = Field(default=None, allow_inf_nan=False)
    ts: int = Field(ge=0, description="event time, milliseconds since the epoch")

    @field_validator("ts", mode="before")
    @classmethod
    def _integral_number(cls, ts):
        """1.0 is an integer in JSON Schema (and so in the published schema): taken as 1, also
        where the API validates strictly (which refuses "1", true and 1.5)."""
        return int(ts) if isinstance(ts, float) and ts.is_integer() else ts

    @field_validator("ts")
    @classmethod
    def _event_time_in_bounds(cls, ts: int, info: ValidationInfo) -> int:
        """Checked where events come in from outside (the API, the consumers): they validate
        with ``context={"bounds": EventTimeBounds}``. Code that builds events (sources,
        tests) states its own times."""
        bounds = (info.context or {}).get("bounds")
        if bounds is not None:
            bounds.check(ts)
        return ts

    def to_bytes(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()


BAD_EVENT_KINDS = ("empty", "not_json", "not_object", "invalid")


class BadEvent(InvalidInput):
    """A record that is not a valid event; ``reason`` says why, for the dead-letter topic, and
    ``kind`` is its class (empty, not_json, not_object, invalid), a metric's label."""

    def __init__(self, reason: str, kind: str = "invalid"):
        super().__init__(reason)
        self.reason, self.kind = reason, kind


def parse_event(raw: bytes | None, bounds: EventTimeBounds | None = None) -> Event:
    """Decode one Kafka record value, raising BadEvent with a short reason (``bounds``: the
    default settings' when None). Pydantic parses the JSON itself (in Rust: half the CPU of
    json.loads and a validation of the dict)."""
    if raw is None:
        raise BadEvent("empty record", "empty")
    try:
        return Event.model_validate_json(raw, context={"bounds": bounds or default_bounds()})
    except ValidationError as exc:
        errors = exc.errors()
        if errors[0]["type"] == "json_invalid":
            raise BadEvent(f"not JSON: {errors[0]['msg']}", "not_json") from None
        if errors[0]["type"] == "model_type":
            raise BadEvent(f"not a JSON object: {type(json.loads(raw)).__name__}", "not_object") from None
        raise BadEvent("; ".join(f"{'.'.join(map(str, e['loc'])) or 'event'}: {e['msg']}" for e in errors)) from None
