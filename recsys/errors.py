"""The project's one error family.

Every error raised on purpose is a ``RecsysError`` whose message says what went wrong and
what to do. The ``recsys`` command prints it on one line and exits with ``exit_code``; the
HTTP API answers with ``http_status``. Those two mappings live here and nowhere else.
"""
from __future__ import annotations


class RecsysError(Exception):
    exit_code = 2
    http_status = 500

    @property
    def http_headers(self) -> dict[str, str]:
        """Headers of the HTTP answer, e.g. when to try again."""
        return {}


class InvalidInput(RecsysError, ValueError):
    """Input that cannot be used as given: a source, events, a request, a version name."""
    http_status = 422


class Unavailable(RecsysError):
    """A service the work needs does not answer (Redis, Kafka, the metrics exporter)."""
    http_status = 503
    # A retried event is deduplicated by its event_id, so trying again is always safe.
    http_headers = {"Retry-After": "1"}


class Busy(RecsysError):
    """Another process holds the work's lock; trying again later is the answer."""
    exit_code = 1
    http_status = 409


class LockLost(RecsysError):
    """A lock was not renewed within its TTL: another process may hold it now."""


class TrainingError(RecsysError):
    """Training could not produce a model (a failed run, a bad checkpoint); the message says why."""
