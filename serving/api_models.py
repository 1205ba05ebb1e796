"""The API's answers as models: published in OpenAPI, so clients and API fuzzers know every shape."""
from __future__ import annotations

from typing import Any, Optional, Union

from pydantic import BaseModel


class ScoredItem(BaseModel):
    item_id: str
    score: float


class Recommendations(BaseModel):
    user_id: str  # the client's own id, as asked
    items: list[ScoredItem]
    model_version: Optional[str]
    fallback: bool  # True: the trending items (a new user, or no model yet)
    request_id: str  # names this answer's impression (recsys/impressions.py)


class Accepted(BaseModel):
    accepted: int  # events now on the Kafka brokers


class CatalogueAnswer(BaseModel):
    item_id: str
    genres: list[str]
    unknown_genres: list[str]  # genres the served model does not know: they do not shape the item's embedding


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    ready: bool
    model: Optional[str]
    redis: bool
    kafka: bool
    model_load_failure: Optional[dict[str, str]]
    fresh_items: int  # catalogue items this replica serves by their content embedding (recsys/catalogue.py)
    watcher: bool  # the registry watcher is alive and ended a round within serving.watcher_stale_s (serving/watch.py)


class ErrorAnswer(BaseModel):
    """A message, or for 422 the fields at fault: ``[{"loc": [...], "msg": ...}]``."""
    detail: Union[str, list[dict[str, Any]]]


ERRORS = {
    401: "no API key, or an unknown or revoked one (header WWW-Authenticate)",
    403: "the API key lacks this route's scope",
    413: "the body is over the size limit",
    422: "a parameter or the body is not valid; the detail names the fields",
    429: "the API key's rate limit is exceeded (header Retry-After)",
    503: "Redis or Kafka does not answer in time; try again (header Retry-After)",
}
