"""The registry as the serving side sees it: which version is current, and a servable model."""
from __future__ import annotations

from recsys.model import load_model
from recsys.registry import Registry
from recsys.settings import Settings


def current_version(settings: Settings) -> str | None:
    return Registry(settings.registry_dir).current()


def load_servable(settings: Settings, version: str):
    return load_model(Registry(settings.registry_dir).path(version))
