"""Pseudonymous user ids: a keyed HMAC replaces the user id where events come in.

The API (events and recommendations), ``recsys replay`` and training from a source call
``Pseudonyms``; Kafka, Redis, the archive and model files only ever hold the pseudonym.
Clients keep using their own ids. Without the key a pseudonym cannot be reversed or
recomputed from a guessed id (a plain hash of a guessable id could be).
"""
from __future__ import annotations

import hashlib
import hmac
from typing import Iterable, Iterator

from recsys.events import Event
from recsys.secrets import USER_ID_KEY, require_secret
from recsys.settings import Settings

PREFIX = "p"


class Pseudonyms:
    def __init__(self, key: str):
        self._key = key.encode()

    @classmethod
    def of(cls, settings: Settings) -> Pseudonyms:
        return cls(require_secret(settings, USER_ID_KEY))

    def user_id(self, raw: str) -> str:
        """``p`` and 128 bits of HMAC-SHA256 in hex: 33 characters, whatever the raw id."""
        return PREFIX + hmac.new(self._key, raw.encode(), hashlib.sha256).hexdigest()[:32]

    def event(self, event: Event) -> Event:
        return event.model_copy(update={"user_id": self.user_id(event.user_id)})

    def events(self, events: Iterable[Event]) -> Iterator[Event]:
        return (self.event(e) for e in events)
