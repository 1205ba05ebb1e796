"""The event contract: one pydantic model validates every event on the wire."""
from __future__ import annotations

import json
from enum import Enum
from typing import Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from recsys.errors import InvalidInput


class EventType(str, Enum):
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
    value: Optional[float] = None
    ts: int = Field(ge=0, description="event time, milliseconds since the epoch")

    def to_bytes(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()


class BadEvent(InvalidInput):
    """A record that is not a valid event; ``reason`` says why, for the dead-letter topic."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def parse_event(raw: bytes | None) -> Event:
    """Decode one Kafka record value, raising BadEvent with a short reason."""
    if raw is None:
        raise BadEvent("empty record")
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadEvent(f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BadEvent(f"not a JSON object: {type(data).__name__}")
    try:
        return Event.model_validate(data)
    except ValidationError as exc:
        raise BadEvent("; ".join(f"{'.'.join(map(str, e['loc'])) or 'event'}: {e['msg']}" for e in exc.errors())) from None

