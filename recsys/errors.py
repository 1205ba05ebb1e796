"""The project's one error family, and the ``recsys`` command's exit codes.

Every error raised on purpose is a ``RecsysError`` whose message says what went wrong and
what to do. The ``recsys`` command prints it on one line and exits with ``exit_code``; the
HTTP API answers with ``http_status``. Those two mappings live here and nowhere else.

Exit codes of ``recsys`` (distinct, so a script can tell them apart):

====  ==========================================================================================
 0    ok
 1    failed: a check, gate, bench target or scenario that did not pass; work that ran and failed
 2    usage or bad input: a wrong argument, an invalid source, event or version, bad settings
 69   service unavailable: Kafka, Redis, Ray or the API does not answer
 70   internal error: an unexpected exception (its traceback is printed)
 130  interrupted (Ctrl-C)
====  ==========================================================================================
"""
from __future__ import annotations

import logging
import time

OK, FAILED, USAGE, UNAVAILABLE, INTERNAL, INTERRUPTED = 0, 1, 2, 69, 70, 130

EXIT_CODES = {OK: "ok", FAILED: "failed: a check, gate or scenario that did not pass",
              USAGE: "usage or bad input (arguments, sources, events, settings)",
              UNAVAILABLE: "service unavailable: Kafka, Redis, Ray or the API does not answer",
              INTERNAL: "internal error (a traceback is printed)", INTERRUPTED: "interrupted"}


class RecsysError(Exception):
    exit_code = FAILED
    http_status = 500

    @property
    def http_headers(self) -> dict[str, str]:
        """Headers of the HTTP answer, e.g. when to try again."""
        return {}


class InvalidInput(RecsysError, ValueError):
    """Input that cannot be used as given: a source, events, a request, a version name."""
    exit_code = USAGE
    http_status = 422


class Unavailable(RecsysError):
    """A service the work needs does not answer (Redis, Kafka, the metrics exporter)."""
    exit_code = UNAVAILABLE
    http_status = 503
    # A retried event is deduplicated by its event_id, so trying again is always safe.
    http_headers = {"Retry-After": "1"}


class Busy(RecsysError):
    """Another process holds the work's lock; trying again later is the answer."""
    http_status = 409


class LockLost(RecsysError):
    """A lock was not renewed within its TTL: another process may hold it now."""


class TrainingError(RecsysError):
    """Training could not produce a model (a failed run, a bad checkpoint); the message says why."""


log = logging.getLogger(__name__)
_LOG_EVERY_S = 10.0
_logged: dict[str, float] = {}


def _log_detail(service: str, exc: BaseException) -> None:
    """The cause, in the log, at most once per ``_LOG_EVERY_S`` per service (an outage under load
    would write a line per request)."""
    now = time.monotonic()
    if now - _logged.get(service, -_LOG_EVERY_S) >= _LOG_EVERY_S:
        _logged[service] = now
        log.warning("%s unavailable: %r", service, exc)


RETRY = "try again after Retry-After"
# An event post not acknowledged in time: the send cannot be called back (it may be on its way,
# or in the producer's queue), so a retry with the same event ids is the safe answer.
MAY_ARRIVE = "the events may still arrive; send them again with the same event ids (duplicates are dropped)"
# An event post refused before its send, because too many wait for the brokers already: nothing
# of it was sent.
NOT_SENT = "too many event posts wait for the brokers on this replica; these events were not sent: " + RETRY


def unavailable(service: str, exc: BaseException, hint: str = RETRY) -> Unavailable:
    """The API's answer when ``service`` fails: a message that names no host, port or path (the
    caller may hold no key yet); the cause goes to the log."""
    _log_detail(service, exc)
    return Unavailable(f"{service} unavailable: {hint}")


def unavailable_errors() -> tuple[type[BaseException], ...]:
    """The client libraries' errors that mean a service does not answer (imported only when
    asked): a refused or timed-out connection to Redis, Kafka, Ray (a ConnectionError) or HTTP."""
    import httpx
    import kafka.errors
    import redis.exceptions
    return (ConnectionError, redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
            kafka.errors.KafkaTimeoutError, kafka.errors.KafkaConnectionError,
            httpx.ConnectError, httpx.ConnectTimeout)


def exit_code(exc: BaseException) -> int:
    """The ``recsys`` command's exit code for an error that reached it."""
    from pydantic import ValidationError
    if isinstance(exc, RecsysError):
        return exc.exit_code
    if isinstance(exc, ValidationError):  # settings (environment, recsys.toml) that do not parse
        return USAGE
    if isinstance(exc, unavailable_errors()):
        return UNAVAILABLE
    if isinstance(exc, KeyboardInterrupt):
        return INTERRUPTED
    return INTERNAL
