"""Fixtures for tests against the real local stack (Kafka broker, Redis server, Ray).

The stack is started by the project's own ``lab.stack.up`` (idempotent) and, if this
session started it, stopped at the end. Each test gets its own topics, consumer groups,
Redis key prefix and archive folder, so tests never see each other's data.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lab import stack
from lab.bench.stream import scratch_settings, settings_env
from recsys.feature_store import FeatureStore
from recsys.settings import get_settings

# A training on event data chooses its seen policy by training a second model on the validation
# stage (training.seen_policy "choose"): the suite's trainings fix it instead, which halves their
# time; tests/test_catalogue.py's end-to-end run chooses.
os.environ.setdefault("RECSYS_TRAINING_SEEN_POLICY", "all")

ML100K = Path(os.environ.get("RECSYS_ML100K", Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-100k"))

# Tests that use one of these fixtures need a service the project starts (Kafka, Redis, Ray):
# they are marked ``services``, so ``pytest -m "not services"`` is the fast tier without them.
# A test that starts a service another way carries ``@pytest.mark.services`` itself.
SERVICE_FIXTURES = {"live_stack", "scratch", "module_scratch", "ray_session", "redis_settings", "cluster"}


def pytest_collection_modifyitems(items):
    for item in items:
        if SERVICE_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.services)


@pytest.fixture(scope="session")
def live_stack():
    """The stack with its Ray cluster, and ``RAY_ADDRESS`` set to that cluster for the rest of
    the session: a training run (in a test, or a ``recsys`` child) joins it instead of starting
    and stopping a private one (7-9 s each, some 20 runs in the suite), as it would join a
    cluster on Kubernetes. ``ensure_ray``'s private cluster, the command line's default, is what
    a run gets without the variable (``tests/test_training.py``'s MovieLens run)."""
    settings = get_settings()
    status = stack.status(settings)
    was_running = all(status[name]["state"] == "running" for name in ("kafka", "redis", "ray"))
    stack.up(settings)  # a failure here fails the test loudly: no silent skip
    before = os.environ.get("RAY_ADDRESS")
    os.environ["RAY_ADDRESS"] = stack.start_ray(settings, progress=lambda *_: None)
    yield settings
    if before is None:
        os.environ.pop("RAY_ADDRESS", None)
    else:
        os.environ["RAY_ADDRESS"] = before
    if not was_running:
        stack.down(settings)


class Scratch:
    """Settings for one test's private topics, groups, prefix and archive, and a way to run the CLI."""

    def __init__(self, base, folder: Path, tag: str):
        self.settings = scratch_settings(base, tag).updated(
            archive_dir=folder / "archive", registry_dir=folder / "models")
        self.env = settings_env(self.settings)
        stack.ensure_topics(self.settings)

    def api_key(self, *scopes, rate_per_s: float = 1e6, burst: int = 10**6, name: str = "test") -> str:
        """A key of this scratch space (its Redis prefix); admin (every scope) by default."""
        from recsys.auth import KeyStore, Scope
        store = KeyStore(self.settings, FeatureStore(self.settings).redis)
        return store.create(name, list(scopes) or [Scope.admin], rate_per_s, burst)["key"]

    def client(self, *scopes, **kw):
        """An HTTP client of the deployed app that sends a key of this scratch space."""
        import httpx
        from lab.serve_local import base_url
        return httpx.Client(base_url=base_url(self.settings), timeout=10,
                            headers={"Authorization": f"Bearer {self.api_key(*scopes, **kw)}"})

    def cli(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "cli", *args], env=self.env, capture_output=True,
                              text=True, check=True, **kw)

    def popen(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "cli", *args], env=self.env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def close(self):
        from recsys.auth import KeyStore
        stack.delete_topics(self.settings)
        from recsys.catalogue import CatalogueKeys
        store = FeatureStore(self.settings)
        store.clear()
        KeyStore(self.settings, store.redis).clear()
        catalogue = CatalogueKeys.of(self.settings)
        store.redis.delete(catalogue.items, catalogue.log)


def _tag(name: str) -> str:
    return name[:20].replace("_", "-").replace("[", "-").rstrip("]")


@pytest.fixture
def scratch(live_stack, tmp_path, request):
    s = Scratch(live_stack, tmp_path, _tag(request.node.name))
    yield s
    s.close()


@pytest.fixture(scope="module")
def module_scratch(live_stack, tmp_path_factory, request):
    """One scratch space shared by the tests of a module (e.g. one trained model)."""
    s = Scratch(live_stack, tmp_path_factory.mktemp("scratch"), _tag(request.module.__name__.split(".")[-1]))
    yield s
    s.close()


@pytest.fixture(scope="module")
def ray_session(live_stack):
    """Ray for a module's tests: the stack's cluster (``RAY_ADDRESS``, ``training.job.ensure_ray``)."""
    import ray

    from training.job import ensure_ray
    ensure_ray(2, False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def ml100k() -> Path:
    assert (ML100K / "u.data").is_file(), f"MovieLens-100K not found at {ML100K} (set RECSYS_ML100K)"
    return ML100K


@contextlib.contextmanager
def plain_api(settings, port: int, key: str):
    """``serving.plain`` (a replica's own app, without Serve) under uvicorn with ``settings``,
    and an HTTP client of it that sends ``key``; stopped on leaving."""
    import httpx
    api = subprocess.Popen([sys.executable, "-m", "uvicorn", "serving.plain:create", "--factory", "--port", str(port),
                            "--log-level", "warning"], env=settings_env(settings), stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10, headers={"Authorization": f"Bearer {key}"})
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if client.get("/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert api.poll() is None, api.stderr.read()[-2000:]
            assert time.monotonic() < deadline, "the API did not start"
            time.sleep(0.5)
        yield client
    finally:
        client.close()
        api.terminate()
        api.wait(timeout=30)

