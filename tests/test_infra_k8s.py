"""Offline checks of infra/k8s.

- Core Kubernetes objects validate against the Kubernetes OpenAPI schemas shipped with kubernetes-validate.
- RayCluster / RayJob objects validate against the CRD schemas of the released KubeRay v1.7.0 (what the pinned
  chart installs) in ../shared/schemas/kuberay-1.7.0, converted to JSON Schema the way the API server treats
  them (unknown fields rejected, int-or-string allowed). Without ../shared those tests skip, except in CI.
- The properties the design relies on: no exposure outside the cluster, token auth, requests == limits,
  memory-backed /dev/shm, 8 GPUs per worker, image and rayVersion on the project's Ray pin, MLflow with auth.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from fixtures.shared_data import SHARED_DIR_ENV, require_shared
from packaging.specifiers import SpecifierSet

REPO = Path(__file__).resolve().parent.parent
K8S_DIR = REPO / "infra" / "k8s"
# The KubeRay release whose CRDs the manifests are validated against; install.sh pins the same chart.
KUBERAY_SCHEMA_DIR = ("schemas", "kuberay-1.7.0")
# Minimum and newest Kubernetes minor versions the manifests must be valid for (GKE release channels
# move within this range; kubernetes-validate ships schemas for both).
KUBERNETES_VERSIONS = ["1.33.0", "1.35.0"]
RAY_KINDS = {"RayCluster", "RayJob"}
# Custom resources of Kueue and Managed Prometheus: no schema for them ships with kubernetes-validate.
OTHER_CRD_KINDS = {"ResourceFlavor", "ClusterQueue", "LocalQueue", "ProvisioningRequestConfig", "AdmissionCheck"}
OTHER_CRD_KINDS |= {"PodMonitoring"}
NAMESPACES = {"vitpipe", "mlflow"}
AUTH_SECRET = ("ray-auth-token", "auth_token")


# --------------------------------------------------------------------------------------------------------
# loading


def manifest_files() -> list[Path]:
    files = [p for p in sorted(K8S_DIR.rglob("*.yaml")) if "rendered" not in p.parts]
    return [p for p in files if p.parent.name != "kuberay-operator"]


def render_vars() -> list[str]:
    match = re.search(r"VARS=\(([^)]*)\)", (K8S_DIR / "render.sh").read_text())
    assert match, "render.sh defines VARS=(...)"
    return match.group(1).split()


def fill_placeholders(text: str) -> str:
    for name in render_vars():
        text = text.replace("${" + name + "}", f"example-{name.lower().replace('_', '-')}")
    return text


@cache
def documents() -> tuple[tuple[str, dict[str, Any]], ...]:
    out = []
    for path in manifest_files():
        for doc in yaml.safe_load_all(fill_placeholders(path.read_text())):
            if doc:
                out.append((str(path.relative_to(K8S_DIR)), doc))
    return tuple(out)


def docs_of_kind(*kinds: str) -> list[dict[str, Any]]:
    return [doc for _, doc in documents() if doc["kind"] in kinds]


def ray_cluster_specs() -> list[tuple[str, dict[str, Any]]]:
    """(name, RayCluster spec) for the RayCluster and for every RayJob's embedded cluster."""
    out = []
    for doc in docs_of_kind("RayCluster"):
        out.append((doc["metadata"]["name"], doc["spec"]))
    for doc in docs_of_kind("RayJob"):
        out.append((doc["metadata"]["name"], doc["spec"]["rayClusterSpec"]))
    return out


def pod_specs() -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(where, role, pod spec) for every Pod this folder can create."""
    for name, spec in ray_cluster_specs():
        yield f"{name}/head", "ray-head", spec["headGroupSpec"]["template"]["spec"]
        for group in spec["workerGroupSpecs"]:
            yield f"{name}/{group['groupName']}", "ray-worker", group["template"]["spec"]
    for doc in docs_of_kind("RayJob"):
        yield f"{doc['metadata']['name']}/submitter", "ray-submitter", doc["spec"]["submitterPodTemplate"]["spec"]
    for doc in docs_of_kind("Deployment", "StatefulSet", "DaemonSet", "Job"):
        yield doc["metadata"]["name"], "app", doc["spec"]["template"]["spec"]


def containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return pod.get("initContainers", []) + pod["containers"]


def env_map(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def pyproject() -> dict[str, Any]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def requirement_spec(name: str) -> SpecifierSet:
    for dep in pyproject()["project"]["dependencies"]:
        match = re.match(r"^([A-Za-z0-9_.-]+)(\[[^\]]*\])?\s*(.*)$", dep)
        if match and match.group(1).lower() == name:
            return SpecifierSet(match.group(3))
    raise AssertionError(f"{name} is not a dependency in pyproject.toml")


def walk(node: Any, path: str = "") -> Iterator[tuple[str, str, Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield path, key, value
            yield from walk(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from walk(value, f"{path}[{i}]")


def terraform_default(variable: str) -> Any:
    text = (REPO / "infra" / "terraform" / "variables.tf").read_text()
    match = re.search(rf'variable "{variable}" \{{(.*?)\n\}}', text, re.S)
    assert match, f"variable {variable} not found"
    default = re.search(r"^\s*default\s*=\s*(.+)$", match.group(1), re.M)
    assert default, f"variable {variable} has no default"
    return yaml.safe_load(default.group(1))


# --------------------------------------------------------------------------------------------------------
# schemas


def test_manifests_present():
    kinds = {doc["kind"] for _, doc in documents()}
    assert {"Namespace", "ServiceAccount", "NetworkPolicy", "Deployment", "Service", "ConfigMap"} <= kinds
    assert {"ResourceFlavor", "ClusterQueue", "LocalQueue", "PodDisruptionBudget", "PodMonitoring"} <= kinds
    assert len(docs_of_kind("RayCluster")) == 1
    assert {doc["metadata"]["name"] for doc in docs_of_kind("RayJob")} == {"pretrain-vit-h14", "transfer-vit-h14"}


def test_render_sh_fills_every_placeholder():
    for path in manifest_files():
        left = re.findall(r"\$\{[A-Z_]+\}", fill_placeholders(path.read_text()))
        assert not left, f"{path.name}: render.sh does not fill {sorted(set(left))}"


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_core_objects_pass_kubernetes_validate(version):
    checked = 0
    for where, doc in documents():
        if doc["kind"] in RAY_KINDS | OTHER_CRD_KINDS:
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{where} {doc['kind']}/{doc['metadata']['name']} (Kubernetes {version}): {exc}")
        checked += 1
    assert checked >= 8


def _to_json_schema(node: Any) -> Any:
    """OpenAPI v3 (structural CRD schema) -> JSON Schema, with the API server's semantics.

    - x-kubernetes-int-or-string: integer or string (resource quantities, ports).
    - objects with `properties` and no x-kubernetes-preserve-unknown-fields reject unknown fields, as the API
      server does with strict field validation (kubectl's default), so a typo fails here too.
    - other x-kubernetes-* keys (CEL validations, list types) have no JSON Schema meaning and are dropped.
    """
    if isinstance(node, list):
        return [_to_json_schema(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: _to_json_schema(v) for k, v in node.items() if not k.startswith("x-kubernetes-")}
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    out.pop("nullable", None)
    if (
        "properties" in node
        and "additionalProperties" not in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@cache
def crd_schema(kind: str) -> dict[str, Any]:
    path = require_shared(*KUBERAY_SCHEMA_DIR) / f"ray.io_{kind.lower()}s.yaml"
    assert path.is_file(), f"{path} is missing from the KubeRay v1.7.0 CRD schemas"
    # The CRDs are megabytes of YAML: the C loader reads them ~10x faster when PyYAML has it.
    crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    assert crd["spec"]["names"]["kind"] == kind
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    schema = _to_json_schema(version["schema"]["openAPIV3Schema"])
    jsonschema.Draft7Validator.check_schema(schema)
    return schema


def crd_errors(doc: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft7Validator(crd_schema(doc["kind"]))
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


@pytest.mark.parametrize("kind", sorted(RAY_KINDS))
def test_ray_objects_validate_against_kuberay_crds(kind):
    docs = docs_of_kind(kind)
    assert docs
    for doc in docs:
        assert doc["apiVersion"] == "ray.io/v1"
        errors = crd_errors(doc)
        assert not errors, f"{kind}/{doc['metadata']['name']}:\n" + "\n".join(errors[:20])


def test_crd_conversion_rejects_typos_and_wrong_types():
    """The converted schema must be able to fail, or the test above proves nothing."""
    good = copy.deepcopy(docs_of_kind("RayCluster")[0])
    assert not crd_errors(good)
    typo = copy.deepcopy(good)
    typo["spec"]["headGroupSpec"]["serviceTyp"] = typo["spec"]["headGroupSpec"].pop("serviceType")
    assert any("serviceTyp" in e for e in crd_errors(typo))
    wrong = copy.deepcopy(good)
    wrong["spec"]["workerGroupSpecs"][0]["maxReplicas"] = "two"
    assert crd_errors(wrong)
    quantity = copy.deepcopy(good)
    quantity["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] = 8
    assert not crd_errors(quantity), "int-or-string quantities must accept integers"


# --------------------------------------------------------------------------------------------------------
# exposure


def test_no_loadbalancer_nodeport_or_ingress_anywhere():
    for where, doc in documents():
        assert doc["kind"] not in {"Ingress", "Gateway", "HTTPRoute", "Route"}, where
        for path, key, value in walk(doc):
            if key in {"type", "serviceType"} and value in {"LoadBalancer", "NodePort"}:
                pytest.fail(f"{where}{path}.{key} = {value}")
            assert key not in {"hostPort", "hostNetwork", "hostPID", "hostIPC"} or not value, f"{where}{path}.{key}"
            if key == "enableIngress":
                assert value is False, f"{where}{path}"


def test_ray_head_services_are_cluster_ip():
    for name, spec in ray_cluster_specs():
        head = spec["headGroupSpec"]
        assert head.get("serviceType") == "ClusterIP", name
        head_service = head.get("headService", {}).get("spec", {})
        assert head_service.get("type", "ClusterIP") == "ClusterIP", name
    for doc in docs_of_kind("Service"):
        assert doc["spec"].get("type", "ClusterIP") == "ClusterIP", doc["metadata"]["name"]


def test_networkpolicies_deny_by_default_and_open_only_what_is_needed():
    policies = {
        (doc["metadata"]["namespace"], doc["metadata"]["name"]): doc["spec"] for doc in docs_of_kind("NetworkPolicy")
    }
    for namespace in NAMESPACES:
        deny = [
            p for (ns, _), p in policies.items() if ns == namespace and p["podSelector"] == {} and "ingress" not in p
        ]
        assert deny, f"{namespace}: a default-deny policy"
        assert set(deny[0]["policyTypes"]) == {"Ingress", "Egress"} and "egress" not in deny[0], namespace
    mlflow = policies[("mlflow", "mlflow")]
    assert mlflow["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "mlflow"}
    assert [p["port"] for rule in mlflow["ingress"] for p in rule["ports"]] == [5000]
    (source,) = mlflow["ingress"][0]["from"]
    assert source["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "vitpipe"}
    assert source["podSelector"]["matchLabels"] == {"vitpipe/component": "ray"}
    # Every Ray Pod carries the label the policies select on.
    for where, role, _ in pod_specs():
        if role in {"ray-head", "ray-worker"}:
            labels = _template_labels(where)
            assert labels.get("vitpipe/component") == "ray", where


def _egress_destinations(spec: dict[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    out = []
    for rule in spec.get("egress", []):
        ports = tuple(sorted(p["port"] for p in rule.get("ports", [])))
        for peer in rule["to"]:
            if "ipBlock" in peer:
                out.append((peer["ipBlock"]["cidr"], ports))
            else:
                out.append((yaml.safe_dump(peer, sort_keys=True), ports))
    return out


def test_egress_reaches_google_apis_privately_and_never_the_internet():
    policies = {
        (doc["metadata"]["namespace"], doc["metadata"]["name"]): doc["spec"] for doc in docs_of_kind("NetworkPolicy")
    }
    allowed_ip_blocks = {
        "199.36.153.8/30": (443,),  # private.googleapis.com (infra/terraform/network.tf)
        "169.254.169.254/32": (80,),  # GKE metadata server (Workload Identity)
        "169.254.169.252/32": (988,),
        "example-private-services-cidr": (3307,),  # Cloud SQL private IP
    }
    for (namespace, name), spec in policies.items():
        for cidr, ports in _egress_destinations(spec):
            if cidr.startswith("{") or cidr.startswith("namespaceSelector") or cidr.startswith("podSelector"):
                continue
            assert "0.0.0.0/0" not in cidr and not cidr.endswith("/0"), f"{namespace}/{name}: egress to the internet"
            assert ports, f"{namespace}/{name}: egress to {cidr} on every port"
            if cidr == "example-private-services-cidr":
                assert ports in {(3307,), (6378,)}, f"{namespace}/{name}: {ports}"
            else:
                assert allowed_ip_blocks.get(cidr) == ports, f"{namespace}/{name}: egress to {cidr} {ports}"
    ray = _egress_destinations(policies[("vitpipe", "ray-cluster")])
    assert ("199.36.153.8/30", (443,)) in ray and ("example-private-services-cidr", (6378,)) in ray
    submitter = policies[("vitpipe", "ray-submitter")]
    assert {p["port"] for rule in submitter["egress"] for p in rule["ports"]} == {8265, 53}
    mlflow = _egress_destinations(policies[("mlflow", "mlflow")])
    assert ("example-private-services-cidr", (3307,)) in mlflow and ("199.36.153.8/30", (443,)) in mlflow


def test_prometheus_scrapes_ray_metrics_and_the_policy_lets_it():
    (monitor,) = docs_of_kind("PodMonitoring")
    assert monitor["metadata"]["namespace"] == "vitpipe"
    assert monitor["spec"]["selector"]["matchLabels"] == {"vitpipe/component": "ray"}
    (endpoint,) = monitor["spec"]["endpoints"]
    for where, role, pod in pod_specs():
        if role in {"ray-head", "ray-worker"}:
            ports = {p["name"]: p["containerPort"] for c in pod["containers"] for p in c.get("ports", [])}
            assert ports.get(endpoint["port"]) == 8080, f"{where}: Ray's metrics port is named {endpoint['port']}"
    policy = next(doc["spec"] for doc in docs_of_kind("NetworkPolicy") if doc["metadata"]["name"] == "ray-cluster")
    scrape = [
        r
        for r in policy["ingress"]
        if r["from"][0].get("namespaceSelector", {}).get("matchLabels") == {"kubernetes.io/metadata.name": "gmp-system"}
    ]
    assert scrape and [p["port"] for p in scrape[0]["ports"]] == [8080]


def _template_labels(where: str) -> dict[str, str]:
    name, group = where.split("/")
    for spec_name, spec in ray_cluster_specs():
        if spec_name != name:
            continue
        if group == "head":
            return spec["headGroupSpec"]["template"]["metadata"]["labels"]
        for worker in spec["workerGroupSpecs"]:
            if worker["groupName"] == group:
                return worker["template"]["metadata"]["labels"]
    raise AssertionError(where)


# --------------------------------------------------------------------------------------------------------
# resources, shared memory, GPUs


def test_requests_equal_limits_for_every_container():
    seen = 0
    for where, _, pod in pod_specs():
        for container in containers(pod):
            resources = container.get("resources", {})
            requests, limits = resources.get("requests"), resources.get("limits")
            assert requests and limits, f"{where}/{container['name']} has no requests/limits"
            assert {"cpu", "memory"} <= set(limits), f"{where}/{container['name']}"
            assert requests == limits, f"{where}/{container['name']}: requests {requests} != limits {limits}"
            seen += 1
    for name, spec in ray_cluster_specs():
        autoscaler = spec.get("autoscalerOptions")
        if autoscaler:
            assert autoscaler["resources"]["requests"] == autoscaler["resources"]["limits"], name
    assert seen >= 10


def test_dev_shm_is_memory_backed_in_every_ray_pod():
    for where, role, pod in pod_specs():
        if role not in {"ray-head", "ray-worker"}:
            continue
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        mounts = [m for c in pod["containers"] for m in c.get("volumeMounts", []) if m["mountPath"] == "/dev/shm"]
        assert mounts, f"{where}: no /dev/shm mount"
        for mount in mounts:
            assert volumes[mount["name"]]["emptyDir"]["medium"] == "Memory", where


def test_gpu_workers_take_a_whole_8_gpu_node_and_tolerate_its_taint():
    gpus_per_node = terraform_default("gpu_accelerator_count")
    max_nodes = terraform_default("gpu_max_nodes")
    assert gpus_per_node == 8
    for name, spec in ray_cluster_specs():
        assert spec["workerGroupSpecs"], name
        for group in spec["workerGroupSpecs"]:
            pod = group["template"]["spec"]
            for container in pod["containers"]:
                resources = container["resources"]
                assert resources["limits"]["nvidia.com/gpu"] == str(gpus_per_node) == "8", name
                assert resources["requests"]["nvidia.com/gpu"] == "8", name
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
            assert pod["nodeSelector"] == {"vitpipe/pool": "gpu"}
            assert group["maxReplicas"] <= max_nodes, f"{name}: more workers than GPU nodes (gpu_max_nodes)"
            assert group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"]
        head = spec["headGroupSpec"]["template"]["spec"]
        assert head["nodeSelector"] == {"vitpipe/pool": "cpu"}
        assert "tolerations" not in head, f"{name}: the head must never hold a GPU node"


def test_gpu_clusters_are_fixed_gangs_that_kueue_admits_and_jobs_release_their_gpus():
    """Kueue admits a workload's declared Pods; an autoscaler growing the cluster afterwards would bypass it."""
    for name, spec in ray_cluster_specs():
        assert not spec.get("enableInTreeAutoscaling"), f"{name}: the Ray autoscaler would grow past Kueue's admission"
        assert "autoscalerOptions" not in spec, name
        for group in spec["workerGroupSpecs"]:
            assert group["minReplicas"] == group["replicas"] == group["maxReplicas"] >= 1, name
    for doc in docs_of_kind("RayCluster", "RayJob"):
        assert doc["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "vitpipe", doc["metadata"]["name"]
    (queue,) = docs_of_kind("LocalQueue")
    assert queue["metadata"]["name"] == "vitpipe" and queue["metadata"]["namespace"] == "vitpipe"
    for job in docs_of_kind("RayJob"):
        assert job["spec"]["shutdownAfterJobFinishes"] is True, job["metadata"]["name"]


def test_long_runs_survive_routine_operations():
    for job in docs_of_kind("RayJob"):
        assert job["spec"]["backoffLimit"] >= 1, f"{job['metadata']['name']}: a failed attempt is retried"
    (budget,) = docs_of_kind("PodDisruptionBudget")
    assert budget["spec"]["maxUnavailable"] == 0
    assert budget["spec"]["selector"]["matchLabels"] == {"vitpipe/component": "ray", "ray.io/node-type": "head"}
    for name, spec in ray_cluster_specs():
        annotations = spec["headGroupSpec"]["template"]["metadata"]["annotations"]
        assert annotations["cluster-autoscaler.kubernetes.io/safe-to-evict"] == "false", name
        options = spec["gcsFaultToleranceOptions"]
        assert options["redisAddress"] == "rediss://example-redis-address", f"{name}: GCS FT over TLS"
        assert _secret_ref(options["redisPassword"]) == ("ray-redis", "auth_string"), name
        head = spec["headGroupSpec"]["template"]["spec"]
        (container,) = head["containers"]
        ca = env_map(container)["RAY_REDIS_CA_CERT"]["value"]
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in head["volumes"]}
        assert volumes[mounts[str(Path(ca).parent)]]["configMap"]["name"] == "ray-redis-ca", name


def test_ray_logs_leave_the_pod():
    """Ray's log files sit in an emptyDir that goes with the Pod (120 s after a RayJob ends): send them to stderr."""
    for where, role, pod in pod_specs():
        if role in {"ray-head", "ray-worker"}:
            for container in pod["containers"]:
                assert env_map(container)["RAY_LOG_TO_STDERR"]["value"] == "1", where


# --------------------------------------------------------------------------------------------------------
# images and versions


def test_ray_images_and_ray_version_match_the_pyproject_pin():
    ray_spec = requirement_spec("ray")
    project_version = pyproject()["project"]["version"]
    for name, spec in ray_cluster_specs():
        assert spec["rayVersion"] in ray_spec, f"{name}: rayVersion {spec['rayVersion']} vs pyproject {ray_spec}"
    images = set()
    for where, role, pod in pod_specs():
        if role.startswith("ray"):
            images.update((where, c["image"]) for c in pod["containers"])
    assert images
    for where, image in images:
        repository, _, tag = image.rpartition(":")
        assert repository.endswith("/vitpipe"), f"{where}: {image}"
        match = re.fullmatch(r"(\d+\.\d+\.\d+)-ray(\d+\.\d+\.\d+)", tag)
        assert match, f"{where}: tag {tag!r} should be <project version>-ray<ray version>"
        assert match.group(1) == project_version, f"{where}: {tag} vs project {project_version}"
        assert match.group(2) in ray_spec, f"{where}: {tag} vs pyproject ray{ray_spec}"
    rays = {spec["rayVersion"] for _, spec in ray_cluster_specs()}
    tags = {image.rpartition("-ray")[2] for _, image in images}
    assert rays == tags, "one Ray version everywhere"


def test_no_latest_tags_or_untagged_images():
    for where, _, pod in pod_specs():
        for container in containers(pod):
            image = container["image"]
            tag = image.rpartition(":")[2] if ":" in image.rsplit("/", 1)[-1] else ""
            assert tag and tag != "latest", f"{where}/{container['name']}: pin a tag ({image})"


# --------------------------------------------------------------------------------------------------------
# authentication and identity


def _secret_ref(env: dict[str, Any]) -> tuple[str, str]:
    ref = env["valueFrom"]["secretKeyRef"]
    return ref["name"], ref["key"]


def test_ray_token_auth_on_every_ray_container():
    checked = 0
    for where, role, pod in pod_specs():
        if not role.startswith("ray"):
            continue
        for container in pod["containers"]:
            env = env_map(container)
            assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", f"{where}/{container['name']}"
            assert "value" not in env["RAY_AUTH_TOKEN"], f"{where}: never put the token in a manifest"
            assert _secret_ref(env["RAY_AUTH_TOKEN"]) == AUTH_SECRET, where
            checked += 1
    for name, spec in ray_cluster_specs():
        assert spec["authOptions"] == {"mode": "token", "secretName": AUTH_SECRET[0]}, name
        if spec.get("enableInTreeAutoscaling"):
            env = {e["name"]: e for e in spec["autoscalerOptions"]["env"]}
            assert env["RAY_AUTH_MODE"]["value"] == "token" and _secret_ref(env["RAY_AUTH_TOKEN"]) == AUTH_SECRET
    assert checked >= 7


def test_no_secret_values_in_manifests():
    assert not docs_of_kind("Secret"), "Secrets are created by hand (infra/README.md), never committed"
    for where, doc in documents():
        for path, key, value in walk(doc):
            if key == "env":
                for env in value:
                    if re.search(r"PASSWORD|TOKEN|SECRET", env["name"]):
                        assert "valueFrom" in env and "value" not in env, f"{where}{path}: {env['name']}"


def test_mlflow_tracking_uri_points_at_the_in_cluster_service():
    (service,) = docs_of_kind("Service")
    port = service["spec"]["ports"][0]["port"]
    expected = f"http://{service['metadata']['name']}.{service['metadata']['namespace']}.svc.cluster.local:{port}"
    for where, role, pod in pod_specs():
        if role in {"ray-head", "ray-worker"}:
            for container in pod["containers"]:
                env = env_map(container)
                assert env["MLFLOW_TRACKING_URI"]["value"] == expected, where
                assert _secret_ref(env["MLFLOW_TRACKING_USERNAME"])[0] == "mlflow-ray-client", where
                assert _secret_ref(env["MLFLOW_TRACKING_PASSWORD"])[0] == "mlflow-ray-client", where


def test_namespace_and_service_accounts_match_terraform():
    namespace, mlflow_namespace = terraform_default("k8s_namespace"), terraform_default("mlflow_namespace")
    assert sorted(d["metadata"]["name"] for d in docs_of_kind("Namespace")) == sorted([namespace, mlflow_namespace])
    cluster_scoped = {"Namespace", "ResourceFlavor", "ClusterQueue", "ProvisioningRequestConfig", "AdmissionCheck"}
    for where, doc in documents():
        if doc["kind"] in cluster_scoped:
            assert "namespace" not in doc["metadata"], f"{where} {doc['kind']} is cluster-scoped"
            continue
        expected = mlflow_namespace if where.startswith("mlflow/") else namespace
        if doc["kind"] in {"NetworkPolicy", "ServiceAccount"}:
            expected = doc["metadata"]["namespace"]
            assert expected in {namespace, mlflow_namespace}, where
        assert doc["metadata"].get("namespace") == expected, f"{where} {doc['kind']}"
    accounts = {d["metadata"]["name"]: d for d in docs_of_kind("ServiceAccount")}
    assert accounts[terraform_default("mlflow_ksa_name")]["metadata"]["namespace"] == mlflow_namespace
    ray_ksa, mlflow_ksa = terraform_default("ray_ksa_name"), terraform_default("mlflow_ksa_name")
    assert set(accounts) == {ray_ksa, mlflow_ksa}
    for account in accounts.values():
        assert account["metadata"]["annotations"]["iam.gke.io/gcp-service-account"].startswith("example-")
        assert account["automountServiceAccountToken"] is False
    for where, role, pod in pod_specs():
        if role in {"ray-head", "ray-worker"}:
            assert pod["serviceAccountName"] == ray_ksa, where
        if role == "ray-submitter":
            assert "serviceAccountName" not in pod, f"{where}: the submitter needs no Google identity"
            assert pod["automountServiceAccountToken"] is False, where
        if role == "app":
            assert pod["serviceAccountName"] == mlflow_ksa, where


def test_pod_security_hardening():
    for ns in docs_of_kind("Namespace"):
        assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted", ns["metadata"]["name"]
    for where, _, pod in pod_specs():
        pod_ctx = pod.get("securityContext", {})
        assert pod_ctx.get("runAsNonRoot") is True, where
        assert pod_ctx.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
        for container in containers(pod):
            ctx = container.get("securityContext", {})
            name = f"{where}/{container['name']}"
            assert ctx.get("allowPrivilegeEscalation") is False, name
            assert ctx.get("capabilities", {}).get("drop") == ["ALL"], name
            assert not ctx.get("privileged"), name
            assert ctx.get("runAsUser", pod_ctx.get("runAsUser", 0)) > 0, f"{name}: numeric non-root user"
    for name, spec in ray_cluster_specs():
        if spec.get("autoscalerOptions"):
            ctx = spec["autoscalerOptions"]["securityContext"]
            assert ctx["allowPrivilegeEscalation"] is False and ctx["capabilities"]["drop"] == ["ALL"], name


# --------------------------------------------------------------------------------------------------------
# jobs


def test_rayjob_entrypoints():
    jobs = {doc["metadata"]["name"]: doc["spec"] for doc in docs_of_kind("RayJob")}
    pretrain = " ".join(jobs["pretrain-vit-h14"]["entrypoint"].split())
    assert pretrain.startswith("python jobs/pretrain.py --config vit_h14_jft ")
    assert "--set data.train=gs://example-shards-bucket/" in pretrain
    assert "--set run.root=gs://example-checkpoints-bucket/" in pretrain
    transfer = " ".join(jobs["transfer-vit-h14"]["entrypoint"].split())
    assert transfer.startswith("python jobs/transfer.py --pretrained ")
    assert "--benchmarks cifar10,cifar100,pets,flowers102,imagenet,vtab" in transfer
    for name, spec in jobs.items():
        assert spec.get("submissionMode", "K8sJobMode") == "K8sJobMode", name
        runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
        assert runtime_env["working_dir"] == "/home/ray/app", name


# --------------------------------------------------------------------------------------------------------
# MLflow


def _mlflow_pod() -> dict[str, Any]:
    (deployment,) = docs_of_kind("Deployment")
    assert deployment["metadata"]["name"] == "mlflow"
    return deployment["spec"]["template"]["spec"]


def test_mlflow_server_auth_backend_and_artifacts():
    pod = _mlflow_pod()
    (server,) = pod["containers"]
    args = server["command"] + server.get("args", [])
    assert args[:2] == ["mlflow", "server"]
    assert "--app-name=basic-auth" in args
    assert "--serve-artifacts" in args
    assert any(a.startswith("--artifacts-destination=gs://") for a in args)
    backend = next(a for a in args if a.startswith("--backend-store-uri="))
    # The user is the service account's IAM database user (render.sh URL-encodes it); no password anywhere.
    assert backend == "--backend-store-uri=postgresql://example-mlflow-db-user-uri@127.0.0.1:5432/mlflow"
    env = env_map(server)
    assert not {name for name in env if name.startswith("PG")}, "IAM database authentication: no PGPASSWORD"
    for name in ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert _secret_ref(env[name])[0] == "mlflow-server", name
    allowed = env["MLFLOW_SERVER_ALLOWED_HOSTS"]["value"].split(",")
    assert "mlflow.mlflow.svc.cluster.local:*" in allowed and "localhost:*" in allowed
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert server[probe]["httpGet"]["path"] == "/health", probe


def test_mlflow_uses_cloud_sql_auth_proxy_over_private_ip():
    pod = _mlflow_pod()
    (proxy,) = pod["initContainers"]
    assert proxy["restartPolicy"] == "Always", "native sidecar: starts before MLflow, runs beside it"
    assert proxy["image"].startswith("gcr.io/cloud-sql-connectors/cloud-sql-proxy:2.")
    assert "--private-ip" in proxy["args"]
    assert "--auto-iam-authn" in proxy["args"], "the proxy logs in with the service account's IAM token"
    assert "--port=5432" in proxy["args"]
    assert "livenessProbe" in proxy and "startupProbe" in proxy


def test_mlflow_image_is_a_pinned_3x_that_clients_accept():
    (server,) = _mlflow_pod()["containers"]
    version = server["image"].rpartition(":")[2]
    assert re.fullmatch(r"3\.\d+\.\d+", version), server["image"]
    assert version in requirement_spec("mlflow")
    dockerfile = (REPO / "infra" / "docker" / "mlflow.Dockerfile").read_text()
    assert f'"mlflow[auth]=={version}"' in dockerfile, "image tag and Dockerfile pin must agree"


def test_mlflow_auth_config_holds_no_secret():
    (config,) = docs_of_kind("ConfigMap")
    ini = config["data"]["basic_auth.ini"]
    assert "admin_password" not in ini
    assert "database_uri = postgresql://example-mlflow-db-user-uri@127.0.0.1:5432/mlflow_auth" in ini


# --------------------------------------------------------------------------------------------------------
# KubeRay operator


def test_kuberay_chart_version_matches_the_crd_schemas():
    install = (K8S_DIR / "kuberay-operator" / "install.sh").read_text()
    pinned = re.search(r'^CHART_VERSION="([^"]+)"', install, re.M)
    assert pinned and pinned.group(1) == "1.7.0" == KUBERAY_SCHEMA_DIR[1].removeprefix("kuberay-")
    assert '--version "${CHART_VERSION}"' in install
    assert "kuberay-1.7.0" in install and "schemas/kuberay/" not in install and "schemas/kuberay " not in install
    values = yaml.safe_load((K8S_DIR / "kuberay-operator" / "values.yaml").read_text())
    assert values["image"]["tag"] == f"v{pinned.group(1)}", "operator image and chart from the same release"
    readme = (require_shared(*KUBERAY_SCHEMA_DIR) / "README.md").read_text()
    match = re.search(r"`kuberay-operator`\s+(\d+\.\d+\.\d+)", readme)
    assert match, "the schema README names the chart version"
    assert pinned.group(1) == match.group(1)


def test_kuberay_operator_values():
    values = yaml.safe_load((K8S_DIR / "kuberay-operator" / "values.yaml").read_text())
    assert values["resources"]["requests"] == values["resources"]["limits"]
    assert values["watchNamespace"] == [terraform_default("k8s_namespace")]
    assert values["securityContext"]["allowPrivilegeEscalation"] is False
    assert values["service"]["type"] == "ClusterIP"


@pytest.mark.skipif(shutil.which("bash") is None, reason="render.sh is a bash script")
def test_render_sh_writes_filled_manifests(tmp_path):
    copy_dir = tmp_path / "k8s"
    shutil.copytree(K8S_DIR, copy_dir, ignore=shutil.ignore_patterns("rendered"))
    env = {**os.environ, "TF_DIR": str(tmp_path / "no-terraform")}
    env.update({name: f"value-{name.lower()}" for name in render_vars()})
    result = subprocess.run(
        ["bash", str(copy_dir / "render.sh")], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    rendered = sorted(p.relative_to(copy_dir / "rendered") for p in (copy_dir / "rendered").rglob("*.yaml"))
    assert rendered == sorted(p.relative_to(K8S_DIR) for p in manifest_files())
    for path in (copy_dir / "rendered").rglob("*.yaml"):
        text = path.read_text()
        assert "${" not in text, path
        assert list(yaml.safe_load_all(text))
    # A placeholder nobody fills is an error, not a silently broken manifest.
    (copy_dir / "extra.yaml").write_text("kind: ConfigMap\ndata: {x: ${NOT_A_VARIABLE}}\n")
    result = subprocess.run(
        ["bash", str(copy_dir / "render.sh")], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode != 0 and "NOT_A_VARIABLE" in result.stderr


# --------------------------------------------------------------------------------------------------------
# a clone without ../shared


def _run_shared_tests(tmp_path: Path, ci: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env[SHARED_DIR_ENV] = str(tmp_path / "no-shared-here")
    if ci is not None:
        env["CI"] = ci
    selection = "ray_objects_validate_against_kuberay_crds or kuberay_chart_version"
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-k", selection, __file__],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_without_shared_dir_tests_skip_with_a_reason_outside_ci_and_fail_in_ci(tmp_path):
    local = _run_shared_tests(tmp_path, ci=None)
    assert local.returncode == 0, local.stdout[-3000:]
    assert re.search(r"\b3 skipped\b", local.stdout), local.stdout[-3000:]
    # One line says why (pytest groups identical reasons): the missing path and how to point elsewhere.
    (reason,) = [line for line in local.stdout.splitlines() if line.startswith("SKIPPED")]
    assert reason.startswith("SKIPPED [3]") and "no-shared-here" in reason and SHARED_DIR_ENV in reason, reason
    ci = _run_shared_tests(tmp_path, ci="true")
    assert ci.returncode == 1, ci.stdout[-3000:]
    assert re.search(r"\b3 failed\b", ci.stdout) and "CI=true" in ci.stdout, ci.stdout[-3000:]
