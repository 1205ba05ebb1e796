"""The item catalogue: items and their content features, so that a new item is served without a retrain.

``PUT /v1/items/{item_id}`` writes an entry twice in one transaction (both keys share one hash
tag, so it holds on a Redis Cluster too)::

  P-catalogue:{c}       HASH   item id -> its genres (JSON list): the snapshot a starting replica reads
  P-catalogue:{c}:log   STREAM one entry per write (item, genres): what every replica tails

Outside the features' prefix ``P:``, as the API keys are: a feature rebuild clears that prefix,
and the catalogue cannot be rebuilt from the event log.

Each replica polls the log every ``serving.catalogue_poll_s`` and gives each item its served
model does not know an embedding from the model's content tower (``recsys.model.ContentTower``),
searched beside the ANN index. A retrain on the archive reads the snapshot as its item features,
so the retrained model knows the same items by id.
"""
from __future__ import annotations

import json
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from recsys.settings import Settings

Genre = Annotated[str, StringConstraints(min_length=1, max_length=64)]


class CatalogueEntry(BaseModel):
    """What a client sends for one item: its content features."""
    model_config = ConfigDict(extra="forbid")
    genres: list[Genre] = Field(min_length=1, max_length=32, description="categories, genres or tags of the item")


class CatalogueKeys:
    def __init__(self, prefix: str):
        self.items = f"{prefix}-catalogue:{{c}}"
        self.log = f"{prefix}-catalogue:{{c}}:log"

    @classmethod
    def of(cls, settings: Settings) -> "CatalogueKeys":
        return cls(settings.redis.prefix)


def queue_put(pipe, keys: CatalogueKeys, item_id: str, entry: CatalogueEntry, log_max: int) -> None:
    """Queue one write on a transaction pipeline (sync or async client); the caller executes it.
    The log keeps about ``log_max`` entries: a replica that falls further behind reads the snapshot."""
    genres = json.dumps(entry.genres)
    pipe.hset(keys.items, item_id, genres)
    pipe.xadd(keys.log, {"item": item_id, "genres": genres}, maxlen=log_max, approximate=True)


def _after(a: str, b: str) -> bool:
    """Whether stream id ``a`` comes after ``b``."""
    return tuple(map(int, a.split("-"))) > tuple(map(int, b.split("-")))


class CatalogueFollower:
    """A replica's view of the catalogue: ``poll`` returns the entries written since the last
    poll; everything on the first poll, and again when the log was trimmed past what it had read."""

    def __init__(self, redis, keys: CatalogueKeys):
        self.redis, self.keys = redis, keys
        self.last_id: str | None = None

    def poll(self, count: int = 10_000) -> dict[str, list[str]]:
        if self.last_id is None:
            return self._snapshot()
        pipe = self.redis.pipeline(transaction=False)
        pipe.xrange(self.keys.log, "-", "+", count=1)
        pipe.xrange(self.keys.log, f"({self.last_id}", "+", count=count)
        first, entries = pipe.execute()
        if first and _after(first[0][0], self.last_id):  # what it last read is trimmed: maybe more
            return self._snapshot()
        if entries:
            self.last_id = entries[-1][0]
        return {e["item"]: json.loads(e["genres"]) for _, e in entries}

    def _snapshot(self) -> dict[str, list[str]]:
        # The log's last id first, then the hash: a write in between is read twice, never missed.
        pipe = self.redis.pipeline(transaction=False)
        pipe.xrevrange(self.keys.log, "+", "-", count=1)
        pipe.hgetall(self.keys.items)
        last, items = pipe.execute()
        self.last_id = last[0][0] if last else "0-0"
        return {item: json.loads(genres) for item, genres in items.items()}


def snapshot(redis, settings: Settings) -> dict[str, list[str]]:
    """Every catalogue item's genres (what a retrain reads as item features)."""
    return {item: json.loads(genres) for item, genres in redis.hgetall(CatalogueKeys.of(settings).items).items()}

