"""The Serve config and the Kubernetes manifests are valid for the code and Serve's schema."""
from pathlib import Path

import inspect

import yaml
from pydantic import BaseModel
from ray.serve import Application
from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
from ray.serve.config import AutoscalingConfig
from ray.serve.schema import ServeDeploySchema

ROOT = Path(__file__).resolve().parents[1]


def _serve_configs():
    yield yaml.safe_load((ROOT / "serving" / "config.yaml").read_text())
    service = yaml.safe_load((ROOT / "deploy" / "k8s" / "rayservice.yaml").read_text())
    yield yaml.safe_load(service["spec"]["serveConfigV2"])


def test_serve_configs_follow_the_serve_schema_and_name_real_code():
    import importlib
    for config in _serve_configs():
        schema = ServeDeploySchema.model_validate(config)
        for app in schema.applications:
            module, _, attr = app.import_path.partition(":")
            builder = getattr(importlib.import_module(module), attr)
            # A typed builder, called the way Serve calls it: the config's args are validated
            # against its argument's model, and it returns the application.
            args_type = next(iter(inspect.signature(builder).parameters.values())).annotation
            assert isinstance(args_type, type) and issubclass(args_type, BaseModel), app.import_path
            assert isinstance(call_user_app_builder_with_args_if_necessary(builder, app.args or {}), Application)
            for dep in app.deployments:
                auto = AutoscalingConfig(**dep.autoscaling_config)
                assert auto.min_replicas < auto.max_replicas
                assert auto.downscale_delay_s > auto.upscale_delay_s  # scale up fast, down slowly: no flapping


def test_every_manifest_parses():
    files = sorted((ROOT / "deploy" / "k8s").glob("*.yaml"))
    assert len(files) >= 8
    kinds = {doc["kind"] for f in files for doc in yaml.safe_load_all(f.read_text()) if doc}
    assert {"RayService", "RayJob", "CronJob", "StatefulSet", "Deployment", "Service"} <= kinds


def test_serving_pods_run_the_haproxy_ingress_and_only_ray_pods_reach_their_other_ports():
    """rayservice.yaml turns on the HAProxy ingress on head and workers alike, and the
    NetworkPolicy that selects those pods admits outside traffic only to the front door (8000)
    and metrics (8080: Ray's, 9101: HAProxy's, from Prometheus); the replicas' own ports only from Ray pods."""
    service = yaml.safe_load((ROOT / "deploy" / "k8s" / "rayservice.yaml").read_text())
    cluster = service["spec"]["rayClusterConfig"]
    templates = [cluster["headGroupSpec"]["template"], *(g["template"] for g in cluster["workerGroupSpecs"])]
    policy = yaml.safe_load((ROOT / "deploy" / "k8s" / "networkpolicy.yaml").read_text())
    selector = policy["spec"]["podSelector"]["matchLabels"]
    for template in templates:
        env = {e["name"]: e["value"] for c in template["spec"]["containers"] for e in c.get("env", [])}
        assert env.get("RAY_SERVE_ENABLE_HA_PROXY") == "1" and env.get("RAY_SERVE_THROUGHPUT_OPTIMIZED") == "1"
        assert selector.items() <= template["metadata"]["labels"].items()
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    for rule in policy["spec"]["ingress"]:
        peers = rule.get("from", [])
        if peers == [{"podSelector": {"matchLabels": selector}}]:
            continue  # Ray's own pods: every port
        assert {p["port"] for p in rule["ports"]} <= {8000, 8080, 9101}, rule
    kustomization = yaml.safe_load((ROOT / "deploy" / "k8s" / "kustomization.yaml").read_text())
    assert "networkpolicy.yaml" in kustomization["resources"]
