"""The Kubernetes manifests (deploy/k8s) build with kustomize and validate offline, and carry
what the deployment promises.

Both builds (the base, ``kubectl kustomize deploy/k8s``, and the training run, deploy/k8s/train)
are validated object by object against the vendored schemas in deploy/k8s/schemas: Kubernetes'
own kinds against the JSON schemas of Kubernetes v1.32 (strict: an unknown field is an error),
and the custom resources against the ``openAPIV3Schema`` of KubeRay's and Strimzi's CRDs, made
strict the way the API server's strict field validation is (an unknown field is an error where
the CRD does not preserve unknown fields), their metadata against Kubernetes' ObjectMeta, and the
CRDs' CEL rules (x-kubernetes-validations) of the plain kind they use evaluated; a rule beyond that
subset, on a field a manifest uses, fails the validation.

Then each property has its own check, and ``test_each_check_fails_on_a_broken_manifest`` breaks
the build in one place per check and sees that check fail:
Redis's password from the Secret; Kafka's listeners TLS with SCRAM-SHA-512 and its users SCRAM;
topics at replication factor 3 with min.insync.replicas 2; token authentication on every Ray pod;
the HAProxy ingress environment of the local stack on the Serve pods; requests and limits on every
container; a PodDisruptionBudget for each stateful or serving component; NetworkPolicies under
which only the named pods reach Redis and Kafka (evaluated as the API does, pod by pod); a GPU
worker group for the training RayJob.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shutil
import subprocess
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import jsonschema
import pytest
import yaml
from referencing import Registry, Resource

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
SCHEMAS = K8S / "schemas"
KUBE_VERSION = "v1.32.0"
KUBE_SCHEMAS = SCHEMAS / "kubernetes" / f"{KUBE_VERSION}-local-strict"
DEFINITIONS_ID = "https://kubernetes.io/api/_definitions.json"
OBJECT_META = f"{DEFINITIONS_ID}#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"
IMAGE_ROOT = "/home/ray/recsys/"  # where the Dockerfile puts the repository
NAMESPACE = "recsys"
Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

# Who may reach Redis and Kafka, by the names pods() gives them.
REDIS_CLIENTS = {"RayService/recsys:head", "RayService/recsys:serve", "Deployment/stream-worker",
                 "Deployment/online-consumer", "Deployment/recsys-scheduler", "CronJob/recsys-retrain",
                 "Deployment/redis-exporter"}
KAFKA_CLIENTS = {"RayService/recsys:head", "RayService/recsys:serve", "Deployment/stream-worker",
                 "Deployment/archiver", "Deployment/online-consumer"}


# ---- the builds ----------------------------------------------------------------------------

def _kustomize(path: Path, *flags: str) -> list[dict]:
    installed = ROOT / ".venv" / "bin" / "kustomize"  # deploy/local/setup.sh's fallback
    if shutil.which("kubectl"):
        command = ["kubectl", "kustomize", *flags, str(path)]
    elif shutil.which("kustomize") or installed.exists():
        command = [shutil.which("kustomize") or str(installed), "build", *flags, str(path)]
    else:
        pytest.fail("neither kubectl (kubectl kustomize) nor kustomize is on PATH: see deploy/k8s/README.md")
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stderr}"
    return [doc for doc in yaml.load_all(done.stdout, Loader=Loader) if doc]


def _key(obj: dict) -> tuple:
    return obj["apiVersion"], obj["kind"], obj["metadata"].get("namespace"), obj["metadata"]["name"]


@lru_cache(maxsize=1)
def _builds() -> tuple[list[dict], list[dict]]:
    return _kustomize(K8S), _kustomize(K8S / "train", "--load-restrictor", "LoadRestrictionsNone")


def objects() -> list[dict]:
    """The base's objects and the training run's, each once (a fresh copy to change at will)."""
    base, train = _builds()
    merged = {_key(o): o for o in base}
    for obj in train:
        assert merged.get(_key(obj), obj) == obj, f"{_key(obj)} differs between deploy/k8s and deploy/k8s/train"
        merged[_key(obj)] = obj
    return copy.deepcopy(list(merged.values()))


def one(objs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [o for o in objs if o["kind"] == kind and name in (None, o["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def every(objs: list[dict], kind: str) -> list[dict]:
    return [o for o in objs if o["kind"] == kind]


def settings_data(objs: list[dict]) -> dict:
    """The ConfigMap recsys-settings (its name carries kustomize's hash)."""
    found = [o for o in objs if o["kind"] == "ConfigMap" and re.fullmatch(r"recsys-settings-[a-z0-9]+", o["metadata"]["name"])]
    assert len(found) == 1, "one ConfigMap recsys-settings-<hash>"
    return found[0]["data"]


def ray_cluster(obj: dict) -> dict:
    return obj["spec"]["rayClusterConfig" if obj["kind"] == "RayService" else "rayClusterSpec"]


# ---- schemas -------------------------------------------------------------------------------

@lru_cache(maxsize=1)
def _registry() -> Registry:
    definitions = json.loads((KUBE_SCHEMAS / "_definitions.json").read_text())
    return Registry().with_resource(DEFINITIONS_ID, Resource.from_contents(definitions))


def _builtin_schema(obj: dict) -> tuple[dict, str] | None:
    # kubernetes-validate's file names: networking.k8s.io/v1 NetworkPolicy -> networkpolicy-networking-v1.json
    api = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", obj["apiVersion"])
    path = KUBE_SCHEMAS / f"{obj['kind'].lower()}-{api}.json"
    return (json.loads(path.read_text()), f"Kubernetes {KUBE_VERSION}") if path.is_file() else None


_CEL_TOKEN = re.compile(r"""\s*(?:(?P<str>'[^']*'|"[^"]*")|(?P<num>[0-9]+)|(?P<op>==|!=|<=|>=|\|\||&&|[<>!().\[\],])"""
                        r"|(?P<id>[A-Za-z_][A-Za-z0-9_]*))")


def _cel_to_python(rule: str) -> str | None:
    """A Python expression for a CEL rule of the plain kind these CRDs use (self's fields, has(),
    comparisons, &&, ||, !, in [...]); None for anything else."""
    tokens, pos = [], 0
    while pos < len(rule.rstrip()):
        m = _CEL_TOKEN.match(rule, pos)
        if not m:
            return None
        tokens.append((m.lastgroup, m.group(m.lastgroup)))
        pos = m.end()
    out, i = [], 0
    while i < len(tokens):
        kind, tok = tokens[i]
        if (kind, tok) == ("id", "has"):
            call = tokens[i + 1:i + 6]
            if [t[1] for t in call[:3]] != ["(", "self", "."] or call[3][0] != "id" or call[4][1] != ")":
                return None
            out.append(f"({call[3][1]!r} in self)")
            i += 6
            continue
        if (kind, tok) == ("id", "self"):
            expr, i = "self", i + 1
            while i + 1 < len(tokens) and tokens[i][1] == "." and tokens[i + 1][0] == "id":
                expr, i = f"_get({expr}, {tokens[i + 1][1]!r})", i + 2
            out.append(expr)
            continue
        if kind == "id":
            if tok not in ("in", "true", "false"):
                return None  # oldSelf, functions, macros: not this subset
            out.append({"in": " in ", "true": "True", "false": "False"}[tok])
        elif kind == "op":
            out.append({"||": " or ", "&&": " and ", "!": " not "}.get(tok, tok))
        else:
            out.append(tok)
        i += 1
    return "".join(out)


def _get(obj, key):
    return obj[key]  # a missing field is an evaluation error in CEL too (KeyError: the rule fails here)


def _cel(validator, rules, instance, schema):
    """x-kubernetes-validations: each rule evaluated as the API server does on a create (transition
    rules, which name oldSelf, only apply to an update); a rule outside the subset above fails."""
    for rule in rules:
        if "oldSelf" in rule["rule"]:
            continue
        expr = _cel_to_python(rule["rule"])
        try:
            ok = expr is not None and eval(expr, {"__builtins__": {}}, {"self": instance, "_get": _get})  # noqa: S307
        except (TypeError, KeyError):
            ok = None
        if expr is None or ok is None:
            yield jsonschema.ValidationError(f"a CEL rule this test cannot evaluate: {rule['rule']}")
        elif not ok:
            yield jsonschema.ValidationError(f"CEL rule {rule['rule']!r}: {rule.get('message', 'failed')}")


CrdValidator = jsonschema.validators.extend(jsonschema.Draft202012Validator,
                                            validators={"x-kubernetes-validations": _cel})


def _strict(schema: dict) -> dict:
    """A CRD's structural schema as JSON Schema, strict about unknown fields as the API server is."""
    out = dict(schema)
    if out.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if out.get("x-kubernetes-int-or-string") and "type" not in out and "anyOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if "properties" in out:
        out["properties"] = {k: _strict(v) for k, v in out["properties"].items()}
        if "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = _strict(out["additionalProperties"])
    if isinstance(out.get("items"), dict):
        out["items"] = _strict(out["items"])
    for key in ("anyOf", "oneOf", "allOf"):
        if key in out:
            out[key] = [_strict(s) for s in out[key]]
    if isinstance(out.get("not"), dict):
        out["not"] = _strict(out["not"])
    return out


@lru_cache(maxsize=1)
def _crds() -> dict[tuple[str, str], tuple[dict, str]]:
    """(apiVersion, kind) -> (JSON schema, source) for every served version of the vendored CRDs."""
    found = {}
    for path in sorted((SCHEMAS / "crds").glob("*/*.yaml")):
        for crd in yaml.load_all(path.read_text(), Loader=Loader):
            if not crd or crd.get("kind") != "CustomResourceDefinition":
                continue
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                if not version.get("served"):
                    continue
                api = f"{group}/{version['name']}"
                schema = _strict(version["schema"]["openAPIV3Schema"])
                schema["properties"]["apiVersion"] = {"const": api}
                schema["properties"]["kind"] = {"const": kind}
                schema["properties"]["metadata"] = {"$ref": OBJECT_META}
                schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind", "metadata"})
                found[(api, kind)] = (schema, f"{path.parent.name} CRD {path.name}")
    return found


def schema_errors(obj: dict) -> tuple[str | None, list[str]]:
    """The schema source an object was checked against (None: none found) and its errors."""
    builtin = _builtin_schema(obj)
    if builtin is not None:
        schema, source = builtin
        validator = jsonschema.Draft202012Validator(schema, registry=_registry())
    elif (obj.get("apiVersion"), obj.get("kind")) in _crds():
        schema, source = _crds()[(obj["apiVersion"], obj["kind"])]
        validator = CrdValidator(schema, registry=_registry())
    else:
        return None, [f"{obj.get('apiVersion')} {obj.get('kind')}: no schema in deploy/k8s/schemas"]
    name = f"{obj['kind']}/{obj['metadata'].get('name')}"
    return source, [f"{name}: {'.'.join(map(str, e.absolute_path)) or '(top)'}: {e.message[:300]}"
                    for e in validator.iter_errors(obj)]


def check_schemas(objs: list[dict]) -> Counter:
    counts, errors = Counter(), []
    for obj in objs:
        source, found = schema_errors(obj)
        errors += found
        counts[(source, obj["kind"])] += 1
    assert not errors, "schema errors:\n" + "\n".join(errors)
    return counts


# ---- pods, selectors and NetworkPolicies ---------------------------------------------------

@dataclass
class Pod:
    name: str
    labels: dict
    spec: dict | None = None          # None: a pod the operator makes from its own template
    namespace: str = NAMESPACE

    def port(self, name: str) -> int | None:
        for c in (self.spec or {}).get("containers", []):
            for p in c.get("ports", []):
                if p.get("name") == name:
                    return p["containerPort"]
        return None


def pods(objs: list[dict]) -> list[Pod]:
    """Every pod the objects make, with the labels their controllers and operators add."""
    out = []
    for o in objs:
        kind, name, spec = o["kind"], o["metadata"]["name"], o.get("spec", {})
        where = f"{kind}/{name}"
        if kind in ("Deployment", "StatefulSet", "Job"):
            t = spec["template"]
            out.append(Pod(where, dict(t.get("metadata", {}).get("labels", {})), t["spec"]))
        elif kind == "CronJob":
            t = spec["jobTemplate"]["spec"]["template"]
            out.append(Pod(where, dict(t.get("metadata", {}).get("labels", {})), t["spec"]))
        elif kind in ("RayService", "RayJob"):
            cluster = ray_cluster(o)
            head = cluster["headGroupSpec"]["template"]
            out.append(Pod(f"{where}:head", {**head.get("metadata", {}).get("labels", {}), "ray.io/node-type": "head",
                                             "ray.io/group": "headgroup"}, head["spec"]))
            for group in cluster.get("workerGroupSpecs", []):
                t = group["template"]
                out.append(Pod(f"{where}:{group['groupName']}", {**t.get("metadata", {}).get("labels", {}),
                               "ray.io/node-type": "worker", "ray.io/group": group["groupName"]}, t["spec"]))
            if kind == "RayJob" and spec.get("submissionMode", "K8sJobMode") == "K8sJobMode":
                out.append(Pod(f"{where}:submitter", {"batch.kubernetes.io/job-name": name, "job-name": name},
                               (spec.get("submitterPodTemplate") or {}).get("spec")))
        elif kind == "KafkaNodePool":
            cluster = o["metadata"]["labels"]["strimzi.io/cluster"]
            out.append(Pod(where, {"strimzi.io/cluster": cluster, "strimzi.io/kind": "Kafka",
                                   "strimzi.io/name": f"{cluster}-kafka", "strimzi.io/pool-name": name}))
    return out


# Pods that are not recsys's: anything in another namespace, a Prometheus in "monitoring", and the
# operators (KubeRay's, in its own namespace).
FOREIGN = [Pod("another namespace", {}, namespace="default"),
           Pod("another namespace, labelled like the app", {"app.kubernetes.io/name": "recsys-serve",
                                                            "app": "stream-worker"}, namespace="default"),
           Pod("monitoring namespace", {"app": "prometheus"}, namespace="monitoring"),
           Pod("kuberay operator", {"app.kubernetes.io/name": "kuberay-operator"}, namespace="kuberay-system")]


def matches(selector: dict | None, labels: dict) -> bool:
    if selector is None:
        return False
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for e in selector.get("matchExpressions") or []:
        key, op, values = e["key"], e["operator"], e.get("values", [])
        if (op == "In" and labels.get(key) not in values) or (op == "NotIn" and key in labels and labels[key] in values) \
                or (op == "Exists" and key not in labels) or (op == "DoesNotExist" and key in labels):
            return False
    return True


def _peer_admits(peer: dict, source: Pod) -> bool:
    if "ipBlock" in peer:
        return True  # an address range can hold any pod
    if "namespaceSelector" in peer:
        in_namespace = matches(peer["namespaceSelector"], {"kubernetes.io/metadata.name": source.namespace})
    else:
        in_namespace = source.namespace == NAMESPACE
    return in_namespace and ("podSelector" not in peer or matches(peer["podSelector"], source.labels))


def _port_admits(ports: list | None, target: Pod, port: int) -> bool:
    if not ports:
        return True
    for p in ports:
        number = p.get("port")
        if isinstance(number, str):
            number = target.port(number)
        if number is None or number == port or (p.get("endPort") and number <= port <= p["endPort"]):
            return True
    return False


def strimzi_policies(objs: list[dict]) -> list[dict]:
    """The NetworkPolicy Strimzi makes for a Kafka's brokers: each listener's port admits its
    networkPolicyPeers (everyone when there are none); the rest is Strimzi's own traffic."""
    made = []
    for kafka in every(objs, "Kafka"):
        cluster = kafka["metadata"]["name"]
        made.append({"metadata": {"name": f"{cluster}-network-policy-kafka"}, "spec": {
            "podSelector": {"matchLabels": {"strimzi.io/cluster": cluster, "strimzi.io/kind": "Kafka",
                                            "strimzi.io/name": f"{cluster}-kafka"}},
            "policyTypes": ["Ingress"],
            "ingress": [{"from": listener.get("networkPolicyPeers", []), "ports": [{"port": listener["port"]}]}
                        for listener in kafka["spec"]["kafka"]["listeners"]]}})
    return made


def admitted(policies: list[dict], target: Pod, source: Pod, port: int) -> bool:
    """Whether ``source`` may open ``port`` on ``target`` under these NetworkPolicies (all in
    the target's namespace), as Kubernetes decides: open unless a policy selects the target, then
    only what one of those policies' rules admits."""
    selecting = [p for p in policies if matches(p["spec"]["podSelector"], target.labels)
                 and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])]
    if not selecting:
        return True
    return any((not rule.get("from") or any(_peer_admits(peer, source) for peer in rule["from"]))
               and _port_admits(rule.get("ports"), target, port)
               for policy in selecting for rule in policy["spec"].get("ingress") or [])


def _all_policies(objs: list[dict]) -> list[dict]:
    return every(objs, "NetworkPolicy") + strimzi_policies(objs)


def _the_pod(objs: list[dict], name: str) -> Pod:
    found = [p for p in pods(objs) if p.name == name]
    assert len(found) == 1, f"no pod {name}"
    return found[0]


def _sources(objs: list[dict]) -> list[Pod]:
    return pods(objs) + FOREIGN


# ---- the checks ----------------------------------------------------------------------------

def env_of(container: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def all_containers(objs: list[dict]):
    """(where, container) for every container the objects describe, the operators' included."""
    for pod in pods(objs):
        if pod.spec is None:
            continue
        for c in pod.spec.get("initContainers", []) + pod.spec.get("containers", []):
            yield f"{pod.name}/{c['name']}", c
    for o in every(objs, "RayService") + every(objs, "RayJob"):
        cluster = ray_cluster(o)
        if cluster.get("enableInTreeAutoscaling"):
            yield f"{o['kind']}/{o['metadata']['name']}:autoscaler", cluster.get("autoscalerOptions", {})
    for pool in every(objs, "KafkaNodePool"):
        yield f"KafkaNodePool/{pool['metadata']['name']}:kafka", pool["spec"]
    for kafka in every(objs, "Kafka"):
        for name, part in (kafka["spec"].get("entityOperator") or {}).items():
            if name in ("topicOperator", "userOperator"):
                yield f"Kafka/{kafka['metadata']['name']}:{name}", part
        for name in ("cruiseControl", "kafkaExporter"):
            if name in kafka["spec"]:
                yield f"Kafka/{kafka['metadata']['name']}:{name}", kafka["spec"][name]


_UNITS = {"m": 1e-3, "": 1, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def quantity(value) -> float:
    number, unit = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(value)).groups()
    return float(number) * _UNITS[unit]


def check_resources(objs: list[dict]) -> int:
    problems, n = [], 0
    for where, c in all_containers(objs):
        n += 1
        res = c.get("resources") or {}
        for kind in ("requests", "limits"):
            missing = {"cpu", "memory"} - set(res.get(kind) or {})
            if missing:
                problems.append(f"{where}: no {kind} for {', '.join(sorted(missing))}")
        for resource, request in (res.get("requests") or {}).items():
            limit = (res.get("limits") or {}).get(resource)
            if limit is not None and quantity(request) > quantity(limit):
                problems.append(f"{where}: {resource} request {request} over its limit {limit}")
    assert not problems, "\n".join(problems)
    return n


def check_redis_password(objs: list[dict]) -> None:
    redis = one(objs, "StatefulSet", "redis")["spec"]["template"]["spec"]["containers"][0]
    from_secret = {"secretKeyRef": {"name": "recsys-secrets", "key": "RECSYS_SECRET_REDIS_PASSWORD"}}
    assert env_of(redis).get("RECSYS_SECRET_REDIS_PASSWORD") == from_secret, "Redis's password is not the Secret's"
    script = " ".join(redis.get("command", []) + redis.get("args", []))
    assert "requirepass" in script and '"$RECSYS_SECRET_REDIS_PASSWORD"' in script, "Redis does not require it"
    assert "$(RECSYS_SECRET_REDIS_PASSWORD)" not in script, "the password would be on Redis's command line"
    exporter = one(objs, "Deployment", "redis-exporter")["spec"]["template"]["spec"]["containers"][0]
    assert env_of(exporter).get("REDIS_PASSWORD") == from_secret
    # Redis's clients have RECSYS_SECRET_REDIS_PASSWORD from the same Secret.
    for pod in pods(objs):
        if pod.name in REDIS_CLIENTS - {"Deployment/redis-exporter"}:
            refs = [e.get("secretRef", {}).get("name") for c in pod.spec["containers"] for e in c.get("envFrom", [])]
            assert "recsys-secrets" in refs, f"{pod.name} lacks the Secret recsys-secrets"


def check_kafka_security(objs: list[dict]) -> None:
    kafka = one(objs, "Kafka")
    listeners = kafka["spec"]["kafka"]["listeners"]
    assert listeners
    for listener in listeners:
        assert listener["tls"] is True, f"listener {listener['name']} without TLS"
        assert (listener.get("authentication") or {}).get("type") == "scram-sha-512", \
            f"listener {listener['name']} without SCRAM-SHA-512"
    assert kafka["spec"]["kafka"].get("authorization", {}).get("type") == "simple", "no ACLs"
    users = {u["metadata"]["name"]: u for u in every(objs, "KafkaUser")}
    assert users
    for name, user in users.items():
        assert user["spec"]["authentication"]["type"] == "scram-sha-512", f"KafkaUser {name} is not SCRAM"
        assert user["spec"]["authorization"]["acls"], f"KafkaUser {name} has no ACLs"
    settings = settings_data(objs)
    port = int(settings["RECSYS_KAFKA_BOOTSTRAP"].rsplit(":", 1)[1])
    assert settings["RECSYS_KAFKA_BOOTSTRAP"].startswith(f"{kafka['metadata']['name']}-kafka-bootstrap:")
    assert port in {listener["port"] for listener in listeners}
    assert settings["RECSYS_KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL"
    assert settings["RECSYS_KAFKA_SASL_MECHANISM"] == "SCRAM-SHA-512"
    # Each Kafka client names its user and mounts that user's password and the cluster CA.
    ca_secret = f"{kafka['metadata']['name']}-cluster-ca-cert"
    for pod in pods(objs):
        if pod.name not in KAFKA_CLIENTS:
            continue
        for c in pod.spec["containers"]:
            user = env_of(c).get("RECSYS_KAFKA_SASL_USERNAME")
            assert user in users, f"{pod.name}: RECSYS_KAFKA_SASL_USERNAME {user!r} is no KafkaUser"
            mounted = {m["name"]: m["mountPath"] for m in c.get("volumeMounts", [])}
            files = {}
            for volume in pod.spec.get("volumes", []):
                if volume["name"] in mounted:
                    for source in volume.get("projected", {}).get("sources", []):
                        for item in source.get("secret", {}).get("items", []):
                            files[f"{mounted[volume['name']]}/{item['path']}"] = (source["secret"]["name"], item["key"])
            assert files.get(f"{settings['RECSYS_SECRETS_DIR']}/kafka-password") == (user, "password"), \
                f"{pod.name}: no {user}'s password at RECSYS_SECRETS_DIR/kafka-password"
            assert files.get(settings["RECSYS_KAFKA_SSL_CAFILE"]) == (ca_secret, "ca.crt"), f"{pod.name}: no Kafka CA"


def check_topics(objs: list[dict]) -> None:
    from recsys.settings import KafkaSettings
    topics = {t["spec"].get("topicName", t["metadata"]["name"]): t["spec"] for t in every(objs, "KafkaTopic")}
    defaults = KafkaSettings()
    assert {defaults.events_topic, defaults.dlq_topic, defaults.impressions_topic} <= set(topics), f"topics: {sorted(topics)}"
    for name, spec in topics.items():
        assert spec["replicas"] == 3, f"topic {name}: replication factor {spec['replicas']}"
        assert int(spec.get("config", {}).get("min.insync.replicas", 0)) == 2, f"topic {name}: min.insync.replicas"
    assert topics[defaults.events_topic]["partitions"] == int(settings_data(objs)["RECSYS_KAFKA_EVENTS_PARTITIONS"])
    assert topics[defaults.impressions_topic]["partitions"] == topics[defaults.events_topic]["partitions"]
    config = one(objs, "Kafka")["spec"]["kafka"]["config"]
    assert int(config["default.replication.factor"]) == 3 and int(config["min.insync.replicas"]) == 2
    assert int(config["offsets.topic.replication.factor"]) == 3
    assert sum(p["spec"]["replicas"] for p in every(objs, "KafkaNodePool") if "broker" in p["spec"]["roles"]) >= 3


def check_ray_token_auth(objs: list[dict]) -> None:
    rays = every(objs, "RayService") + every(objs, "RayJob")
    assert {o["kind"] for o in rays} == {"RayService", "RayJob"}
    for o in rays:
        auth = ray_cluster(o).get("authOptions") or {}
        assert auth.get("mode") == "token" and auth.get("secretName"), f"{o['kind']}: authOptions {auth}"
    ray_pods = [p for p in pods(objs) if p.name.startswith(("RayService/", "RayJob/")) and p.spec is not None]
    for pod in ray_pods:
        for c in pod.spec["containers"]:
            env = env_of(c)
            assert env.get("RAY_AUTH_MODE") == "token", f"{pod.name}/{c['name']}: RAY_AUTH_MODE {env.get('RAY_AUTH_MODE')}"
            assert not isinstance(env.get("RAY_AUTH_TOKEN"), str), f"{pod.name}: a token in the manifest"


def check_serving_ingress(objs: list[dict]) -> None:
    """The Serve pods' environment is the local stack's (lab.stack.ray_cluster_env) but
    for its machine-local paths and loopback ports."""
    from lab.stack import ray_cluster_env
    from recsys.settings import Settings
    local = ray_cluster_env(Settings().updated(serving={"ingress": "haproxy"}))
    same = {"RAY_worker_niceness", "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S",
            "RAY_SERVE_ENABLE_HA_PROXY", "RAY_SERVE_THROUGHPUT_OPTIMIZED", "RECSYS_HAPROXY_HTTP_REQUEST_TIMEOUT_S",
            "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"}
    # Machine-local on the local stack; Ray's defaults inside a pod. The binary is the pod's shim.
    local_only = {"RECSYS_HAPROXY_REAL_BINARY", "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC", "RAY_SERVE_HAPROXY_SOCKET_PATH",
                  "RAY_SERVE_HAPROXY_SERVER_STATE_BASE", "RAY_SERVE_HAPROXY_SERVER_STATE_FILE",
                  "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH", "RAY_SERVE_HAPROXY_STATS_PORT"}
    own = {"RAY_SERVE_HAPROXY_BINARY_PATH": None, "RAY_SERVE_HAPROXY_METRICS_PORT": "9101"}  # monitoring.yaml's Service
    unsorted = set(local) - same - local_only - set(own)
    assert not unsorted, f"the local stack sets {sorted(unsorted)}: decide what the Serve pods set (this test)"
    service = one(objs, "RayService")
    serve_pods = [p for p in pods(objs) if p.name.startswith("RayService/")]
    assert len(serve_pods) >= 2
    for pod in serve_pods:
        env = env_of(pod.spec["containers"][0])
        for key in same:
            assert env.get(key) == local[key], f"{pod.name}: {key}={env.get(key)!r}, the local stack's: {local[key]!r}"
        assert env.get("RAY_SERVE_HAPROXY_METRICS_PORT") == own["RAY_SERVE_HAPROXY_METRICS_PORT"]
        shim = env.get("RAY_SERVE_HAPROXY_BINARY_PATH", "")
        assert shim.startswith(IMAGE_ROOT) and os.access(ROOT / shim[len(IMAGE_ROOT):], os.X_OK), \
            f"{pod.name}: RAY_SERVE_HAPROXY_BINARY_PATH {shim!r} is not an executable of the image"
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert config["proxy_location"] == "EveryNode" and config["http_options"]["port"] == 8000


def check_pdbs(objs: list[dict]) -> None:
    budgets = every(objs, "PodDisruptionBudget")
    all_pods = pods(objs)
    for pdb in budgets:
        assert any(matches(pdb["spec"]["selector"], p.labels) for p in all_pods), \
            f"PodDisruptionBudget {pdb['metadata']['name']} selects no pod"
    # Stateful and serving components: StatefulSets, Deployments of several replicas, the Serve cluster.
    wanted = {f"StatefulSet/{o['metadata']['name']}" for o in every(objs, "StatefulSet")}
    wanted |= {f"Deployment/{o['metadata']['name']}" for o in every(objs, "Deployment") if o["spec"].get("replicas", 1) > 1}
    wanted |= {p.name for p in all_pods if p.name.startswith("RayService/")}
    assert "RayService/recsys:serve" in wanted and "Deployment/stream-worker" in wanted and "StatefulSet/redis" in wanted
    for pod in all_pods:
        if pod.name in wanted:
            covering = [b for b in budgets if matches(b["spec"]["selector"], pod.labels)]
            assert covering, f"no PodDisruptionBudget for {pod.name}"
    # A budget over several pods lets a drain take one.
    replicas = {f"Deployment/{o['metadata']['name']}": o["spec"].get("replicas", 1) for o in every(objs, "Deployment")}
    for group in ray_cluster(one(objs, "RayService"))["workerGroupSpecs"]:
        replicas[f"RayService/recsys:{group['groupName']}"] = group.get("minReplicas", 0)
    for pod in all_pods:
        if replicas.get(pod.name, 1) > 1:
            for b in budgets:
                if matches(b["spec"]["selector"], pod.labels):
                    spec = b["spec"]
                    allowed = spec["maxUnavailable"] if "maxUnavailable" in spec else replicas[pod.name] - spec["minAvailable"]
                    assert allowed >= 1, f"{b['metadata']['name']} lets no {pod.name} pod go"
    kafka_pdb = one(objs, "Kafka")["spec"]["kafka"].get("template", {}).get("podDisruptionBudget", {})
    assert kafka_pdb.get("maxUnavailable") == 1, "Kafka's brokers: one at a time (Strimzi's PodDisruptionBudget)"


def check_network_policies(objs: list[dict]) -> None:
    policies = _all_policies(objs)
    nps = every(objs, "NetworkPolicy")
    assert any(p["spec"]["podSelector"] == {} and p["spec"].get("policyTypes") == ["Ingress"]
               and not p["spec"].get("ingress") for p in nps), "no default-deny ingress policy"
    for pod in pods(objs):   # every pod in the namespace is under some policy
        assert any(matches(p["spec"]["podSelector"], pod.labels) for p in policies), f"no policy selects {pod.name}"
    sources = _sources(objs)
    redis = _the_pod(objs, "StatefulSet/redis")
    reach_redis = {s.name for s in sources if admitted(policies, redis, s, 6379)}
    assert reach_redis == REDIS_CLIENTS, f"Redis: admitted {sorted(reach_redis ^ REDIS_CLIENTS)} (un)expectedly"
    for kafka_pod in [p for p in pods(objs) if p.name.startswith("KafkaNodePool/")]:
        for listener in one(objs, "Kafka")["spec"]["kafka"]["listeners"]:
            reach = {s.name for s in sources if admitted(policies, kafka_pod, s, listener["port"])}
            assert reach == KAFKA_CLIENTS, f"Kafka {listener['name']}: admitted {sorted(reach ^ KAFKA_CLIENTS)} (un)expectedly"
    # What recsys needs still passes: Prometheus scrapes, Ray's pods and the KubeRay operator talk.
    prometheus, operator = _the_pod(objs, "Deployment/prometheus"), FOREIGN[3]
    for target, port in [("Deployment/stream-worker", 28201), ("Deployment/archiver", 28202),
                         ("Deployment/recsys-scheduler", 28203), ("Deployment/online-consumer", 28204),
                         ("Deployment/redis-exporter", 9121),
                         ("RayService/recsys:head", 8080), ("RayService/recsys:head", 9101)]:
        assert admitted(policies, _the_pod(objs, target), prometheus, port), f"Prometheus cannot scrape {target}:{port}"
        assert not admitted(policies, _the_pod(objs, target), FOREIGN[0], port)
    for head in ("RayService/recsys:head", "RayJob/recsys-train:head"):
        assert admitted(policies, _the_pod(objs, head), operator, 8265), f"KubeRay cannot reach {head}'s dashboard"
    assert admitted(policies, _the_pod(objs, "RayJob/recsys-train:head"), _the_pod(objs, "RayJob/recsys-train:submitter"), 8265)
    assert admitted(policies, _the_pod(objs, "RayJob/recsys-train:head"), _the_pod(objs, "RayJob/recsys-train:gpu"), 6379)
    assert admitted(policies, _the_pod(objs, "RayService/recsys:head"), _the_pod(objs, "RayService/recsys:serve"), 6379)
    # Kafka's clients are the pods with a KafkaUser's credentials, and the other way round.
    users = {u["metadata"]["name"] for u in every(objs, "KafkaUser")}
    with_credentials = {p.name for p in pods(objs) if p.spec and any(
        s.get("secret", {}).get("name") in users for v in p.spec.get("volumes", []) for s in v.get("projected", {}).get("sources", []))}
    assert with_credentials == KAFKA_CLIENTS, f"Kafka credentials: {sorted(with_credentials ^ KAFKA_CLIENTS)}"


def check_gpu_training(objs: list[dict]) -> None:
    job = one(objs, "RayJob")
    groups = ray_cluster(job)["workerGroupSpecs"]
    gpu_groups = []
    for group in groups:
        spec = group["template"]["spec"]
        gpus = [int((c.get("resources", {}).get("limits") or {}).get("nvidia.com/gpu", 0)) for c in spec["containers"]]
        if sum(gpus):
            assert any(t.get("key") == "nvidia.com/gpu" and t.get("effect") in (None, "NoSchedule")
                       for t in spec.get("tolerations", [])), f"GPU group {group['groupName']} tolerates no GPU taint"
            gpu_groups.append((group, sum(gpus)))
    assert gpu_groups, "the training RayJob has no worker group with nvidia.com/gpu limits"
    entry = job["spec"]["entrypoint"].split()
    assert "--use-gpu" in entry, "the entrypoint does not train on GPUs"
    workers = int(entry[entry.index("--workers") + 1]) if "--workers" in entry else 2
    available = sum(g.get("minReplicas", g.get("replicas", 1)) * n for g, n in gpu_groups)
    assert available >= workers, f"{workers} Train workers need {workers} GPUs; the group has {available}"


def check_references(objs: list[dict]) -> None:
    """Every ConfigMap, Secret and volume claim a pod names is in the build, or is one of the
    Secrets made outside it (README.md: recsys-secrets, recsys-ray-auth; Strimzi's)."""
    configmaps = {o["metadata"]["name"] for o in every(objs, "ConfigMap")}
    claims = {o["metadata"]["name"] for o in every(objs, "PersistentVolumeClaim")}
    secrets = {"recsys-secrets", "recsys-ray-auth"} | {u["metadata"]["name"] for u in every(objs, "KafkaUser")}
    secrets |= {f"{k['metadata']['name']}-cluster-ca-cert" for k in every(objs, "Kafka")}
    problems = []

    def need(kind: str, name: str, known: set, where: str) -> None:
        if name not in known:
            problems.append(f"{where}: {kind} {name} is nowhere")

    for pod in pods(objs):
        if pod.spec is None:
            continue
        for c in pod.spec.get("initContainers", []) + pod.spec["containers"]:
            for e in c.get("envFrom", []):
                if "configMapRef" in e:
                    need("ConfigMap", e["configMapRef"]["name"], configmaps, pod.name)
                if "secretRef" in e:
                    need("Secret", e["secretRef"]["name"], secrets, pod.name)
            for e in c.get("env", []):
                source = e.get("valueFrom") or {}
                if "configMapKeyRef" in source:
                    need("ConfigMap", source["configMapKeyRef"]["name"], configmaps, pod.name)
                if "secretKeyRef" in source:
                    need("Secret", source["secretKeyRef"]["name"], secrets, pod.name)
        for v in pod.spec.get("volumes", []):
            for source in [v] + v.get("projected", {}).get("sources", []):
                if "configMap" in source:
                    need("ConfigMap", source["configMap"]["name"], configmaps, pod.name)
                if "secret" in source:
                    need("Secret", source["secret"].get("secretName") or source["secret"].get("name"), secrets, pod.name)
                if "persistentVolumeClaim" in source:
                    need("PersistentVolumeClaim", source["persistentVolumeClaim"]["claimName"], claims, pod.name)
    for o in every(objs, "RayService") + every(objs, "RayJob"):
        need("Secret", (ray_cluster(o).get("authOptions") or {}).get("secretName"), secrets, o["kind"])
    assert not problems, "\n".join(problems)


def check_vendored_schemas() -> None:
    sums = {}
    for line in (SCHEMAS / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        sums[name.lstrip("*")] = digest
    files = {str(p.relative_to(SCHEMAS)) for p in SCHEMAS.rglob("*") if p.is_file()} - {"SHA256SUMS", "README.md"}
    assert files == set(sums), f"deploy/k8s/schemas and its SHA256SUMS disagree: {sorted(files ^ set(sums))}"
    for name, digest in sums.items():
        assert hashlib.sha256((SCHEMAS / name).read_bytes()).hexdigest() == digest, f"{name} changed: see its README"


# ---- the tests -----------------------------------------------------------------------------

def test_vendored_schemas_are_as_recorded():
    check_vendored_schemas()
    kinds = {kind for _, kind in _crds()}
    assert {"RayService", "RayJob", "Kafka", "KafkaNodePool", "KafkaTopic", "KafkaUser"} <= kinds


def test_builds_validate_against_the_kubernetes_and_crd_schemas(capsys):
    objs = objects()
    counts = check_schemas(objs)
    by_source = Counter()
    for (source, kind), n in counts.items():
        by_source[source] += n
    lines = [f"{n} against {source}: " + ", ".join(f"{kind} {m}" for (s, kind), m in sorted(counts.items()) if s == source)
             for source, n in sorted(by_source.items())]
    with capsys.disabled():
        print(f"\nk8s manifests: {len(objs)} objects validated\n  " + "\n  ".join(lines))
    assert sum(counts.values()) == len(objs) >= 30


def test_what_the_pods_name_exists():
    check_references(objects())


def test_redis_password_comes_from_the_secret():
    check_redis_password(objects())


def test_kafka_listeners_are_tls_with_scram_and_users_are_scram():
    check_kafka_security(objects())


def test_topics_have_replication_factor_3_and_min_insync_replicas_2():
    check_topics(objects())


def test_ray_pods_use_token_authentication():
    check_ray_token_auth(objects())


def test_serve_pods_run_the_local_stacks_haproxy_ingress():
    check_serving_ingress(objects())


def test_every_container_has_requests_and_limits():
    assert check_resources(objects()) >= 15


def test_stateful_and_serving_components_have_disruption_budgets():
    check_pdbs(objects())


def test_only_the_named_pods_reach_redis_and_kafka():
    check_network_policies(objects())


def test_the_training_rayjob_has_a_gpu_worker_group():
    check_gpu_training(objects())


def test_the_haproxy_shim_adds_the_request_timeout_and_keeps_the_binds(tmp_path):
    config = tmp_path / "haproxy.cfg"
    config.write_text("global\n    maxconn 100\ndefaults\n    mode http\nfrontend prometheus\n    bind :9101\n"
                      "frontend http\n    bind 0.0.0.0:8000\nlisten stats\n  bind *:8404\n")
    fake = tmp_path / "haproxy"
    fake.write_text('#!/bin/sh\necho "real haproxy $*"\n')
    fake.chmod(0o755)
    env = {**os.environ, "RECSYS_HAPROXY_REAL_BINARY": str(fake), "RECSYS_HAPROXY_HTTP_REQUEST_TIMEOUT_S": "7"}
    done = subprocess.run([str(K8S / "haproxy-request-timeout"), "-db", "-f", str(config)], env=env,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"real haproxy -db -f {config}"
    text = config.read_text()
    assert "defaults\n    option http-buffer-request\n    timeout http-request 7s\n    mode http" in text
    assert "bind :9101" in text and "bind 0.0.0.0:8000" in text and "bind *:8404" in text


# Each check, on a build broken in one place: it must fail.
def _set_env(container: dict, name: str, value: str | None) -> None:
    container["env"] = [e for e in container.get("env", []) if e["name"] != name]
    if value is not None:
        container["env"].append({"name": name, "value": value})


def _serve_worker(objs):
    return ray_cluster(one(objs, "RayService"))["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]


def _container(objs, kind, name):
    return one(objs, kind, name)["spec"]["template"]["spec"]["containers"][0]


def _kafka(objs):
    return one(objs, "Kafka")["spec"]["kafka"]


def _redis_policy(objs):
    return one(objs, "NetworkPolicy", "redis")["spec"]


BREAKS = {
    "schema: unknown field in a Kafka listener": (check_schemas, lambda o: _kafka(o)["listeners"][0].update(sasl=True)),
    "schema: a Deployment's container with a misspelt field": (
        check_schemas, lambda o: _container(o, "Deployment", "stream-worker").update(resource={})),
    "schema: a topic's replicas as a string": (
        check_schemas, lambda o: one(o, "KafkaTopic", "user-events")["spec"].update(replicas="3")),
    "schema: an unknown field in the RayJob's worker group": (
        check_schemas, lambda o: ray_cluster(one(o, "RayJob"))["workerGroupSpecs"][0].update(gpus=1)),
    "schema: a value a CRD's CEL rule refuses": (check_schemas, lambda o: one(o, "RayService")["spec"].update(managedBy="x")),
    "schema: a SCRAM user with certificate validity (CEL)": (
        check_schemas, lambda o: one(o, "KafkaUser", "recsys-api")["spec"]["authentication"].update(validityDays=30)),
    "schema: a kind without a vendored schema": (check_schemas, lambda o: o.append(
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "x"}, "data": {}})),
    "references: the RayService naming recsys-settings without kustomize's hash": (check_references, lambda o: ray_cluster(
        one(o, "RayService"))["headGroupSpec"]["template"]["spec"]["containers"][0]["envFrom"][0].update(
            configMapRef={"name": "recsys-settings"})),
    "references: a pod mounting another Kafka user's Secret": (check_references, lambda o: one(o, "Deployment", "archiver")[
        "spec"]["template"]["spec"]["volumes"][1]["projected"]["sources"][0]["secret"].update(name="recsys-archiver")),
    "redis: a literal password": (check_redis_password, lambda o: _set_env(
        _container(o, "StatefulSet", "redis"), "RECSYS_SECRET_REDIS_PASSWORD", "hunter2")),
    "redis: the password back on the command line": (check_redis_password, lambda o: _container(o, "StatefulSet", "redis").update(
        args=["--requirepass", "$(RECSYS_SECRET_REDIS_PASSWORD)"], command=["redis-server"])),
    "kafka: a listener without TLS": (check_kafka_security, lambda o: _kafka(o)["listeners"][0].update(tls=False)),
    "kafka: a listener with mTLS instead of SCRAM": (
        check_kafka_security, lambda o: _kafka(o)["listeners"][0].update(authentication={"type": "tls"})),
    "kafka: a pod with another user's password": (check_kafka_security, lambda o: _container(o, "Deployment", "archiver").update(
        env=[{"name": "RECSYS_KAFKA_SASL_USERNAME", "value": "recsys-stream"}])),
    "topics: replication factor 2": (check_topics, lambda o: one(o, "KafkaTopic", "user-events.dlq")["spec"].update(replicas=2)),
    "topics: min.insync.replicas 1": (
        check_topics, lambda o: one(o, "KafkaTopic", "user-events")["spec"]["config"].update({"min.insync.replicas": 1})),
    "ray: a worker without RAY_AUTH_MODE": (check_ray_token_auth, lambda o: _set_env(_serve_worker(o), "RAY_AUTH_MODE", None)),
    "ray: the RayJob without authOptions": (check_ray_token_auth, lambda o: ray_cluster(one(o, "RayJob")).pop("authOptions")),
    "ingress: Ray's 5 s proxy ready check": (
        check_serving_ingress, lambda o: _set_env(_serve_worker(o), "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "5")),
    "ingress: no HAProxy on the workers": (
        check_serving_ingress, lambda o: _set_env(_serve_worker(o), "RAY_SERVE_ENABLE_HA_PROXY", None)),
    "resources: a container without limits": (
        check_resources, lambda o: _container(o, "Deployment", "stream-worker")["resources"].pop("limits")),
    "resources: the Kafka brokers without requests": (
        check_resources, lambda o: one(o, "KafkaNodePool")["spec"]["resources"].pop("requests")),
    "resources: a request over its limit": (check_resources, lambda o: _container(o, "Deployment", "archiver")["resources"].update(
        requests={"cpu": "4", "memory": "1Gi"})),
    "pdb: none for the stream workers": (check_pdbs, lambda o: o.remove(one(o, "PodDisruptionBudget", "stream-worker"))),
    "pdb: one that selects nothing": (
        check_pdbs, lambda o: one(o, "PodDisruptionBudget", "redis")["spec"]["selector"].update(matchLabels={"app": "rediss"})),
    "pdb: serve workers that cannot be drained": (
        check_pdbs, lambda o: one(o, "PodDisruptionBudget", "recsys-serve-workers").update(spec={
            "minAvailable": 2, "selector": one(o, "PodDisruptionBudget", "recsys-serve-workers")["spec"]["selector"]})),
    "network: the archiver admitted to Redis": (check_network_policies, lambda o: _redis_policy(o)["ingress"][0]["from"].append(
        {"podSelector": {"matchLabels": {"app": "archiver"}}})),
    "network: Redis open to every namespace": (check_network_policies, lambda o: _redis_policy(o)["ingress"][0]["from"].append(
        {"namespaceSelector": {}})),
    "network: Redis open to every pod": (check_network_policies, lambda o: _redis_policy(o)["ingress"][0].pop("from")),
    "network: no default deny": (check_network_policies, lambda o: o.remove(one(o, "NetworkPolicy", "default-deny-ingress"))),
    "network: Kafka's listener without peers": (check_network_policies, lambda o: _kafka(o)["listeners"][0].pop("networkPolicyPeers")),
    "network: the scheduler admitted to Kafka": (check_network_policies, lambda o: _kafka(o)["listeners"][0]["networkPolicyPeers"].append(
        {"podSelector": {"matchLabels": {"app": "recsys-scheduler"}}})),
    "network: KubeRay shut out of the dashboard": (
        check_network_policies, lambda o: o.remove(one(o, "NetworkPolicy", "ray-dashboard"))),
    "gpu: no nvidia.com/gpu limits": (check_gpu_training, lambda o: [
        r.pop("nvidia.com/gpu") for r in ray_cluster(one(o, "RayJob"))["workerGroupSpecs"][0]["template"]["spec"]["containers"][0][
            "resources"].values()]),
    "gpu: no toleration of the GPU taint": (
        check_gpu_training, lambda o: ray_cluster(one(o, "RayJob"))["workerGroupSpecs"][0]["template"]["spec"].pop("tolerations")),
    "gpu: fewer GPUs than Train workers": (check_gpu_training, lambda o: one(o, "RayJob")["spec"].update(
        entrypoint="recsys train --source archive --workers 8 --use-gpu --json")),
}


@pytest.mark.parametrize("name", sorted(BREAKS))
def test_each_check_fails_on_a_broken_manifest(name):
    check, brake = BREAKS[name]
    objs = objects()
    check(objs)  # passes as built
    brake(objs)
    with pytest.raises(AssertionError):
        check(objs)
