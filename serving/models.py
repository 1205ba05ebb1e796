"""The registry as the serving side sees it: which version is current, and a servable model."""
from __future__ import annotations

from recsys.model import load_model
from recsys.registry import Registry
from recsys.settings import Settings


def current_version(settings: Settings) -> str | None:
    return Registry(settings.registry_dir).current()


def experiment(settings: Settings) -> dict | None:
    """The running A/B or shadow experiment (``Registry.start_experiment``), or None."""
    return Registry(settings.registry_dir).experiment()


def load_servable(settings: Settings, version: str):
    """The version as a replica serves it. A request is one query: FAISS's OpenMP threads would only
    add their start-up to each search and compete with the other replicas' cores (`recsys bench ann`
    times one thread)."""
    import faiss
    faiss.omp_set_num_threads(1)
    return load_model(Registry(settings.registry_dir).path(version))


def load_order(settings: Settings) -> list[str]:
    """The versions a starting server tries, in order: current, previous, then the others newest
    first, so that one broken version never leaves a new replica without a model."""
    registry = Registry(settings.registry_dir)
    current, previous = registry.current(), registry.previous()
    if current is None:
        return []
    head = [current] + ([previous] if previous and previous != current else [])
    return head + [v for v in reversed(registry.list()) if v not in head]
