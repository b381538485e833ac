"""Checks across files: what Terraform creates and what the manifests, scripts and the runbook expect of it.

Each test reads both sides from the files themselves (Terraform through python-hcl2, manifests through the
loaders of test_infra_k8s), so changing one side alone fails here.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_infra_k8s import K8S_DIR, docs_of_kind, pod_specs, ray_cluster_specs
from test_infra_terraform import TF_DIR, _load

REPO = Path(__file__).resolve().parent.parent
README = REPO / "infra" / "README.md"
TAINT_EFFECTS = {"NO_SCHEDULE": "NoSchedule", "PREFER_NO_SCHEDULE": "PreferNoSchedule", "NO_EXECUTE": "NoExecute"}


@pytest.fixture(scope="module")
def terraform() -> dict[str, Any]:
    resources: dict[tuple[str, str], Any] = {}
    variables: dict[str, Any] = {}
    locals_: dict[str, Any] = {}
    for path in sorted(TF_DIR.glob("*.tf")):
        doc = _load(path)
        for entry in doc.get("resource", []):
            for rtype, named in entry.items():
                for name, body in named.items():
                    resources[(rtype, name)] = body
        for entry in doc.get("variable", []):
            variables.update(entry)
        for entry in doc.get("locals", []):
            locals_.update(entry)
    return {"resources": resources, "variables": variables, "locals": locals_}


def _default(terraform: dict[str, Any], value: Any) -> Any:
    match = re.fullmatch(r"\$\{var\.(\w+)\}", str(value))
    return terraform["variables"][match.group(1)]["default"] if match else value


def node_pools(terraform: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """pool name -> {labels, taints (as Kubernetes tolerations would name them)}."""
    out = {}
    for (rtype, name), body in terraform["resources"].items():
        if rtype == "google_container_node_pool":
            config = body["node_config"][0]
            taints = [
                {"key": t["key"], "value": t["value"], "effect": TAINT_EFFECTS[t["effect"]]}
                for t in config.get("taint", [])
            ]
            out[name] = {"labels": config["labels"], "taints": taints}
    return out


def _tolerates(tolerations: list[dict[str, Any]], taint: dict[str, str]) -> bool:
    return any(
        t.get("key") == taint["key"]
        and t.get("effect", taint["effect"]) == taint["effect"]
        and (t.get("operator") == "Exists" or t.get("value") == taint["value"])
        for t in tolerations
    )


def _pool_of(node_selector: dict[str, str], pools: dict[str, dict[str, Any]]) -> str:
    matching = [name for name, pool in pools.items() if node_selector.items() <= pool["labels"].items()]
    assert len(matching) == 1, f"nodeSelector {node_selector} matches pools {matching}"
    return matching[0]


# --------------------------------------------------------------------------------------------------------
# node pools <-> selectors, tolerations, Kueue flavors


def test_every_pod_lands_on_a_pool_and_tolerates_exactly_that_pools_taints(terraform):
    pools = node_pools(terraform)
    assert pools["gpu"]["taints"] and not pools["cpu"]["taints"]
    for where, _, pod in pod_specs():
        pool = _pool_of(pod["nodeSelector"], pools)
        tolerations = pod.get("tolerations", [])
        for taint in pools[pool]["taints"]:
            assert _tolerates(tolerations, taint), f"{where}: does not tolerate {taint} of pool {pool}"
        for name, other in pools.items():
            if name != pool:
                assert not any(_tolerates(tolerations, t) for t in other["taints"]), f"{where} tolerates pool {name}"
        gpus = sum(int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) for c in pod["containers"])
        assert (pool == "gpu") == (gpus > 0), f"{where}: GPUs {gpus} on pool {pool}"


def test_operator_and_mlflow_run_on_the_cpu_pool(terraform):
    pools = node_pools(terraform)
    values = yaml.safe_load((K8S_DIR / "kuberay-operator" / "values.yaml").read_text())
    assert _pool_of(values["nodeSelector"], pools) == "cpu"
    (mlflow,) = docs_of_kind("Deployment")
    assert _pool_of(mlflow["spec"]["template"]["spec"]["nodeSelector"], pools) == "cpu"


def test_kueue_flavors_describe_the_node_pools(terraform):
    pools = node_pools(terraform)
    flavors = {doc["metadata"]["name"]: doc["spec"] for doc in docs_of_kind("ResourceFlavor")}
    assert set(flavors) == {"cpu-pool", "h100"}
    for flavor, pool in (("cpu-pool", "cpu"), ("h100", "gpu")):
        assert _pool_of(flavors[flavor]["nodeLabels"], pools) == pool
        assert flavors[flavor].get("nodeTaints", []) == pools[pool]["taints"], flavor


# --------------------------------------------------------------------------------------------------------
# NetworkPolicies <-> the Pods and namespaces they name


def _policy(namespace: str, name: str) -> dict[str, Any]:
    (doc,) = [
        d
        for d in docs_of_kind("NetworkPolicy")
        if d["metadata"]["namespace"] == namespace and d["metadata"]["name"] == name
    ]
    return doc["spec"]


def test_submitter_pods_carry_the_labels_the_policies_select():
    ray = _policy("vitpipe", "ray-cluster")
    allowed_sources = [
        peer["podSelector"]["matchLabels"] for rule in ray["ingress"] for peer in rule["from"] if "podSelector" in peer
    ]
    submitter_policy = _policy("vitpipe", "ray-submitter")["podSelector"]["matchLabels"]
    submitters = [doc["spec"]["submitterPodTemplate"] for doc in docs_of_kind("RayJob")]
    assert submitters
    for template in submitters:
        labels = template["metadata"]["labels"]
        assert any(selector.items() <= labels.items() for selector in allowed_sources), labels
        assert submitter_policy.items() <= labels.items(), labels
        assert "vitpipe/component" in labels and labels["vitpipe/component"] != "ray", "submitters are not Ray Pods"


def test_operator_namespace_in_install_sh_matches_the_policy():
    install = (K8S_DIR / "kuberay-operator" / "install.sh").read_text()
    namespace = re.search(r'^NAMESPACE="([^"]+)"', install, re.M).group(1)
    assert '--namespace "${NAMESPACE}"' in install
    ray = _policy("vitpipe", "ray-cluster")
    operator_rules = [
        rule
        for rule in ray["ingress"]
        for peer in rule["from"]
        if peer.get("namespaceSelector", {}).get("matchLabels", {}).get("kubernetes.io/metadata.name") == namespace
    ]
    assert operator_rules, f"no ingress from the operator's namespace {namespace}"
    dashboard = next(
        p["containerPort"]
        for _, spec in ray_cluster_specs()
        for c in spec["headGroupSpec"]["template"]["spec"]["containers"]
        for p in c["ports"]
        if p["name"] == "dashboard"
    )
    assert [p["port"] for p in operator_rules[0]["ports"]] == [dashboard]


def test_mlflow_policy_and_tracking_uri_name_the_same_namespace_and_port(terraform):
    (service,) = docs_of_kind("Service")
    namespace = service["metadata"]["namespace"]
    assert namespace == terraform["variables"]["mlflow_namespace"]["default"]
    ray = _policy("vitpipe", "ray-cluster")
    to_mlflow = [
        rule
        for rule in ray["egress"]
        for peer in rule["to"]
        if peer.get("namespaceSelector", {}).get("matchLabels") == {"kubernetes.io/metadata.name": namespace}
    ]
    assert to_mlflow and [p["port"] for p in to_mlflow[0]["ports"]] == [service["spec"]["ports"][0]["port"]]


# --------------------------------------------------------------------------------------------------------
# GPU demand of everything that can run at once <-> the GPU pool


def _gpu_nodes(spec: dict[str, Any], gpus_per_node: int) -> tuple[int, int]:
    """(GPUs, GPU nodes) a Ray cluster holds at its largest."""
    gpus = nodes = 0
    for group in spec["workerGroupSpecs"]:
        per_pod = sum(
            int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) for c in group["template"]["spec"]["containers"]
        )
        gpus += group["maxReplicas"] * per_pod
        nodes += group["maxReplicas"] * -(-per_pod // gpus_per_node)
    return gpus, nodes


def test_all_workloads_kueue_can_admit_together_fit_the_gpu_pool(terraform):
    gpus_per_node = terraform["variables"]["gpu_accelerator_count"]["default"]
    pool_nodes = terraform["variables"]["gpu_max_nodes"]["default"]
    (queue,) = docs_of_kind("ClusterQueue")
    assert "cohort" not in queue["spec"], "no borrowing: the quota is the pool"
    quota = {
        flavor["name"]: {r["name"]: r["nominalQuota"] for r in flavor["resources"]}
        for group in queue["spec"]["resourceGroups"]
        for flavor in group["flavors"]
    }
    gpu_quota = sum(int(resources.get("nvidia.com/gpu", 0)) for resources in quota.values())
    assert gpu_quota == pool_nodes * gpus_per_node, f"GPU quota {gpu_quota} vs pool {pool_nodes} x {gpus_per_node}"

    workloads = {}
    for doc in docs_of_kind("RayCluster", "RayJob"):
        spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
        assert doc["metadata"]["labels"].get("kueue.x-k8s.io/queue-name") == "vitpipe", "every GPU user is queued"
        workloads[doc["metadata"]["name"]] = _gpu_nodes(spec, gpus_per_node)
    assert len(workloads) == 3
    for name, (gpus, _) in workloads.items():
        assert 0 < gpus <= gpu_quota, f"{name} needs {gpus} GPUs, the queue has {gpu_quota}: never admitted"

    # Kueue admits any set whose GPUs fit the quota; each such set must fit the pool in whole nodes.
    admissible = 0
    for size in range(1, len(workloads) + 1):
        for combination in itertools.combinations(workloads, size):
            gpus = sum(workloads[name][0] for name in combination)
            nodes = sum(workloads[name][1] for name in combination)
            if gpus <= gpu_quota:
                admissible += 1
                assert nodes <= pool_nodes, f"{combination}: {nodes} GPU nodes > gpu_max_nodes {pool_nodes}"
    assert admissible >= len(workloads)


def test_cpu_quota_fits_the_cpu_pool(terraform):
    (queue,) = docs_of_kind("ClusterQueue")
    (cpu_flavor,) = [f for g in queue["spec"]["resourceGroups"] for f in g["flavors"] if f["name"] == "cpu-pool"]
    cpus = next(r["nominalQuota"] for r in cpu_flavor["resources"] if r["name"] == "cpu")
    machine = terraform["variables"]["cpu_machine_type"]["default"]
    per_node = int(machine.rsplit("-", 1)[1])
    assert cpus < terraform["variables"]["cpu_max_nodes"]["default"] * per_node, "room for MLflow, operators, GKE"


# --------------------------------------------------------------------------------------------------------
# Binary Authorization <-> every image the cluster runs


def _images_run_by_the_cluster() -> set[str]:
    images = {c["image"] for _, _, pod in pod_specs() for c in pod.get("initContainers", []) + pod["containers"]}
    values = yaml.safe_load((K8S_DIR / "kuberay-operator" / "values.yaml").read_text())
    images.add(f"{values['image']['repository']}:{values['image']['tag']}")
    kueue = re.search(r'^KUEUE_VERSION="([^"]+)"', (K8S_DIR / "kueue" / "install.sh").read_text(), re.M).group(1)
    images.add(f"registry.k8s.io/kueue/kueue:v{kueue}")
    return images


def test_binary_authorization_admits_exactly_the_images_in_use(terraform):
    external = set(terraform["locals"]["external_images"])
    in_use = _images_run_by_the_cluster()
    own = {image for image in in_use if image.startswith("example-registry/")}
    assert own, "the project's images come from its registry (REGISTRY in render.sh)"
    assert in_use - own == external, f"admitted {sorted(external)}, used {sorted(in_use - own)}"


# --------------------------------------------------------------------------------------------------------
# the runbook <-> the numbers elsewhere


def test_runbook_states_the_bandwidth_the_planner_assumes():
    hardware = (REPO / "pipeline" / "planner" / "hardware.py").read_text()
    assumed = float(re.search(r"^DEFAULT_NET_GBITS_PER_GPU\s*=\s*([\d.]+)", hardware, re.M).group(1))
    readme = README.read_text()
    section = readme[readme.index("## GPUDirect") :]
    assert f"DEFAULT_NET_GBITS_PER_GPU = {assumed:g}" in section
    assert "--net-gbps" in section, "say how to plan with the bandwidth this setup really has"


def test_runbook_names_the_pinned_versions_and_idle_cost():
    readme = README.read_text()
    chart = re.search(r'^CHART_VERSION="([^"]+)"', (K8S_DIR / "kuberay-operator" / "install.sh").read_text(), re.M)
    kueue = re.search(r'^KUEUE_VERSION="([^"]+)"', (K8S_DIR / "kueue" / "install.sh").read_text(), re.M)
    assert f"kuberay-operator` {chart.group(1)}" in readme and f"Kueue {kueue.group(1)}" in readme
    assert "schemas/kuberay/" not in readme, "the old, unreleased CRD schemas are gone"
    assert re.search(r"Idle[^\n]*US\$[\d.,]+[^\n]*per month", readme), "name the cost of an idle cluster"
    for step in ("terraform", "render.sh", "kuberay-operator/install.sh", "kueue/install.sh", "rayjob-pretrain.yaml"):
        assert step in readme, step
