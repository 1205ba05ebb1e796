"""Secrets: the Redis password and the key of the user-id pseudonyms.

Each is read from the environment (``RECSYS_SECRET_<NAME>``, e.g. from a Kubernetes Secret)
or else from ``<secrets_dir>/<name>``, a file of mode 0600 that ``recsys stack up`` makes on
first start. They are not settings fields: settings travel to Serve replicas as plain JSON
in the deploy arguments, which Ray shows on its dashboard.
"""
from __future__ import annotations

import os
import secrets as _random
from pathlib import Path

from recsys.errors import Unavailable
from recsys.settings import Settings

REDIS_PASSWORD = "redis-password"
USER_ID_KEY = "user-id-key"
KAFKA_PASSWORD = "kafka-password"  # the SASL user's, where settings.kafka.security_protocol asks for one


def env_name(name: str) -> str:
    return "RECSYS_SECRET_" + name.upper().replace("-", "_")


def secret_path(settings: Settings, name: str) -> Path:
    return settings.secrets_dir / name


def read_secret(settings: Settings, name: str) -> str | None:
    """The secret from the environment, else its file; None when neither has it."""
    value = os.environ.get(env_name(name))
    if value:
        return value
    path = secret_path(settings, name)
    return path.read_text().strip() or None if path.is_file() else None


def require_secret(settings: Settings, name: str) -> str:
    value = read_secret(settings, name)
    if value is None:
        raise Unavailable(f"secret {name!r} not found: set {env_name(name)} or run `recsys stack up`, "
                          f"which writes {secret_path(settings, name)}")
    return value


def ensure_secret(settings: Settings, name: str) -> str:
    """The secret, made (32 random bytes, URL-safe) into its file if neither place has it."""
    value = read_secret(settings, name)
    if value is not None:
        return value
    path = secret_path(settings, name)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(_random.token_urlsafe(32) + "\n")
    try:
        os.link(tmp, path)  # never replaces a file another process made meanwhile
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    return read_secret(settings, name)
