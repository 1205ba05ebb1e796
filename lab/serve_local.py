"""Start, stop and inspect the Serve application on the local Ray cluster (``recsys serve``)."""
from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from pathlib import Path

import yaml

from lab import process, stack
from recsys.settings import Settings

CONFIG = Path(__file__).resolve().parents[1] / "serving" / "config.yaml"
APP_NAME = "recsys"


def load_config(path: Path = CONFIG) -> dict:
    """The application's deployment options from the Serve config file."""
    config = yaml.safe_load(path.read_text())
    app = next(a for a in config["applications"] if a["name"] == APP_NAME)
    return {"http": config.get("http_options", {}), "deployments": {d.pop("name"): d for d in app["deployments"]}}


def connect_ray(settings: Settings, progress=print):
    """Connect this process to the project's Ray cluster (started if needed)."""
    import ray
    address = stack.start_ray(settings, progress)
    port = address.rsplit(":", 1)[1]
    if ray.is_initialized() and not ray.get_runtime_context().gcs_address.endswith(f":{port}"):
        ray.shutdown()  # attached to another cluster, e.g. a private one a training run started
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False, logging_level="ERROR")
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # deploy chatter; errors still show
    return ray


def start_serve(settings: Settings, http: dict) -> None:
    from ray import serve
    serve.start(http_options={"host": settings.serving.host, "port": settings.serving.port,
                              **{k: v for k, v in http.items() if k not in ("host", "port")}})


def answers(url: str) -> bool:
    """Whether a GET of ``url`` succeeds (a 2xx or 3xx status) within 2 s."""
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except OSError:
        return False


def wait_http(url: str, timeout_s: float = 60.0) -> None:
    """Until ``url`` answers; NotInTime (a TimeoutError) after ``timeout_s``."""
    process.wait_until(lambda: answers(url), timeout_s, f"{url} answers", every_s=0.3)


def base_url(settings: Settings) -> str:
    return f"http://{settings.serving.host}:{settings.serving.port}"


def serve_up(settings: Settings, config_path: Path = CONFIG, progress=print) -> dict:
    """Deploy (or update in place) the recsys app; return once it answers HTTP."""
    from ray import serve

    from serving.app import AppArgs, build_app
    connect_ray(settings, progress)
    config = load_config(config_path)
    start_serve(settings, config["http"])
    app = build_app(AppArgs(settings=settings.model_dump(mode="json"), deployment=config["deployments"]["RecsysApi"]))
    progress(f"serve: deploying {APP_NAME} on {base_url(settings)}")
    serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
    wait_http(f"{base_url(settings)}/healthz")
    return serve_status(settings)


WANTED = ("STARTING", "UPDATING", "RECOVERING", "RUNNING")  # the replicas the autoscaler has decided on


def replica_states(app_name: str = APP_NAME) -> dict[str, dict[str, int]]:
    """Replicas per state per deployment, from Serve's own status API."""
    from ray import serve
    app = serve.status().applications.get(app_name)
    if app is None:
        return {}
    return {name: {str(getattr(k, "value", k)): n for k, n in d.replica_states.items()}
            for name, d in app.deployments.items()}


def replicas(app_name: str = APP_NAME) -> dict[str, int]:
    """Running replicas per deployment."""
    return {name: states.get("RUNNING", 0) for name, states in replica_states(app_name).items()}


def serve_status(settings: Settings) -> dict:
    from ray import serve
    if not stack.ray_address(settings):
        return {"state": "stopped"}
    connect_ray(settings, progress=lambda *_: None)
    apps = serve.status().applications
    if APP_NAME not in apps:
        return {"state": "not deployed"}
    try:
        with urllib.request.urlopen(f"{base_url(settings)}/readyz", timeout=3) as resp:
            ready = json.loads(resp.read())
    except urllib.error.HTTPError as exc:  # 503: not ready, and the body says why
        ready = json.loads(exc.read())
    except OSError as exc:
        ready = {"ready": False, "error": str(exc)}
    return {"state": apps[APP_NAME].status.value, "url": base_url(settings), "replicas": replicas(), "readyz": ready}


def serve_delete(settings: Settings) -> None:
    """Delete the recsys app and its replicas, leaving Serve and its ingress up for the next
    deploy (a test's app whose topics are gone would otherwise keep polling for them)."""
    from ray import serve
    connect_ray(settings, progress=lambda *_: None)
    serve.delete(APP_NAME)


def serve_down(settings: Settings) -> dict:
    """Shut Serve down: the app, its controller and proxies, and the HAProxy they started."""
    from ray import serve
    if stack.ray_address(settings):
        ray = connect_ray(settings, progress=lambda *_: None)
        try:
            serve.shutdown()
        except ray.exceptions.ActorDiedError:  # Ray 2.60: shutdown kills the controller it waits on
            pass
        _wait_controller_gone(ray)
    stack.stop_haproxy(settings)
    return {"state": "stopped"}


def _wait_controller_gone(ray, timeout_s: float = 60.0) -> None:
    """Until Serve's controller actor is gone: a deploy that starts while a shutdown is still
    draining direct-ingress replicas gets a controller that the shutdown then kills."""
    def gone() -> bool:
        try:
            ray.get_actor("SERVE_CONTROLLER_ACTOR", namespace="serve")
        except ValueError:
            return True
        return False
    process.wait_until(gone, timeout_s, "Serve's controller is gone after shutdown")
