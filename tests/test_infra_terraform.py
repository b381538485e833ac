"""Offline checks of infra/terraform: every file parses, and the properties the runbook relies on hold.

terraform itself is not installable here, so besides the security and sizing properties these tests also
do the cheapest part of `terraform validate`: every var./local./resource reference points at something
that is declared.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import hcl2
import pytest

REPO = Path(__file__).resolve().parent.parent
TF_DIR = REPO / "infra" / "terraform"
TF_FILES = sorted(TF_DIR.glob("*.tf"))

# One file per concern; more may be added, these must exist.
REQUIRED_FILES = {
    "versions.tf",
    "providers.tf",
    "variables.tf",
    "locals.tf",
    "network.tf",
    "gke.tf",
    "node_pools.tf",
    "storage.tf",
    "cloudsql.tf",
    "iam.tf",
    "outputs.tf",
}

# Bucket roles the stack may grant: object-level only, never bucket or IAM administration.
OBJECT_ROLES = {"roles/storage.objectViewer", "roles/storage.objectCreator", "roles/storage.objectUser"}


# --------------------------------------------------------------------------------------------------------
# parsing helpers


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    return value


def _clean(node: Any) -> Any:
    """Normalise python-hcl2 output across versions: no metadata keys, no quotes around strings."""
    if isinstance(node, dict):
        return {_unquote(k): _clean(v) for k, v in node.items() if not k.startswith("__")}
    if isinstance(node, list):
        return [_clean(v) for v in node]
    if isinstance(node, str):
        return _unquote(node)
    return node


def _load(path: Path) -> dict[str, Any]:
    text = path.read_text()
    try:
        from hcl2 import SerializationOptions

        options = SerializationOptions(with_comments=False, explicit_blocks=False, strip_string_quotes=True)
        return _clean(hcl2.loads(text, serialization_options=options))
    except ImportError:  # python-hcl2 < 8
        return _clean(hcl2.loads(text))


@pytest.fixture(scope="module")
def parsed() -> dict[str, dict[str, Any]]:
    return {path.name: _load(path) for path in TF_FILES}


@pytest.fixture(scope="module")
def resources(parsed) -> dict[tuple[str, str], dict[str, Any]]:
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for doc in parsed.values():
        for entry in doc.get("resource", []):
            for rtype, named in entry.items():
                for name, body in named.items():
                    assert (rtype, name) not in out, f"{rtype}.{name} declared twice"
                    out[(rtype, name)] = body
    return out


@pytest.fixture(scope="module")
def variables(parsed) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for doc in parsed.values():
        for entry in doc.get("variable", []):
            out.update(entry)
    return out


@pytest.fixture(scope="module")
def outputs(parsed) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for doc in parsed.values():
        for entry in doc.get("output", []):
            out.update(entry)
    return out


@pytest.fixture(scope="module")
def locals_(parsed) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for doc in parsed.values():
        for entry in doc.get("locals", []):
            out.update(entry)
    return out


def of_type(resources, rtype: str) -> dict[str, dict[str, Any]]:
    return {name: body for (t, name), body in resources.items() if t == rtype}


def block(body: dict[str, Any], name: str) -> dict[str, Any]:
    """The single nested block `name` of a resource body."""
    value = body.get(name)
    assert value, f"missing block {name!r}"
    return value[0] if isinstance(value, list) else value


def resolve(value: Any, variables: dict[str, dict[str, Any]]) -> Any:
    """A plain `${var.x}` reference becomes the variable's default; anything else is returned as is."""
    if isinstance(value, str):
        match = re.fullmatch(r"\$\{var\.(\w+)\}", value)
        if match:
            assert "default" in variables[match.group(1)], f"var.{match.group(1)} has no default"
            return variables[match.group(1)]["default"]
    return value


def all_text() -> str:
    return "\n".join(path.read_text() for path in TF_FILES)


# --------------------------------------------------------------------------------------------------------
# files, versions, variables


def test_one_file_per_concern():
    names = {path.name for path in TF_FILES}
    assert names >= REQUIRED_FILES, f"missing: {sorted(REQUIRED_FILES - names)}"
    assert (TF_DIR / "example.tfvars").is_file()


@pytest.mark.parametrize("path", TF_FILES, ids=lambda p: p.name)
def test_every_tf_file_parses(path):
    assert isinstance(_load(path), dict)


def _bounded(constraint: str) -> bool:
    """True when a version constraint has both a lower and an upper bound (or is ~> / exact)."""
    constraint = constraint.replace(" ", "")
    if constraint.startswith("~>") or re.fullmatch(r"=?\d+\.\d+\.\d+", constraint):
        return True
    return ">=" in constraint and "<" in constraint.replace("<=", "<")


def test_terraform_and_provider_versions_are_pinned(parsed):
    terraform = parsed["versions.tf"]["terraform"][0]
    assert _bounded(terraform["required_version"]), terraform["required_version"]
    providers = terraform["required_providers"][0]
    assert {"google", "random"} <= set(providers)
    for name, spec in providers.items():
        assert spec["source"].startswith("hashicorp/"), name
        assert _bounded(spec["version"]), f"{name}: {spec['version']!r} needs a lower and an upper bound"
    # Nothing outside versions.tf declares providers or versions.
    for file, doc in parsed.items():
        if file != "versions.tf":
            assert "terraform" not in doc, f"{file} has a terraform block"


def test_every_variable_is_typed_and_described(variables):
    assert variables
    for name, body in variables.items():
        assert body.get("type"), f"variable {name} has no type"
        description = body.get("description", "")
        assert len(description) >= 15, f"variable {name} needs a real description"


def test_references_point_at_declared_things(resources, variables, locals_, parsed):
    """The cheap half of `terraform validate`: no dangling var., local. or resource references."""
    text = all_text()
    used_vars = set(re.findall(r"\bvar\.(\w+)", text))
    assert used_vars - set(variables) == set(), f"undeclared variables: {sorted(used_vars - set(variables))}"
    assert set(variables) - used_vars == set(), f"unused variables: {sorted(set(variables) - used_vars)}"
    used_locals = set(re.findall(r"\blocal\.(\w+)", text))
    assert used_locals <= set(locals_), f"undeclared locals: {sorted(used_locals - set(locals_))}"
    declared = {f"{t}.{n}" for t, n in resources}
    referenced = {
        m.group(1)
        for m in re.finditer(r"\b((?:google|random)_[a-z0-9_]+\.[a-z0-9_]+)\.", text)
        if not m.group(1).startswith(("google_project_default", "random_password.result"))
    }
    assert referenced - declared == set(), f"undeclared resources: {sorted(referenced - declared)}"


def test_example_tfvars_sets_required_variables_only_with_declared_names(variables):
    example = _load(TF_DIR / "example.tfvars")
    assert set(example) <= set(variables), f"unknown variables in example.tfvars: {set(example) - set(variables)}"
    required = {name for name, body in variables.items() if "default" not in body}
    assert required <= set(example), f"example.tfvars misses required {sorted(required - set(example))}"
    for network in example["master_authorized_networks"]:
        assert not network["cidr_block"].endswith("/0")


# --------------------------------------------------------------------------------------------------------
# identity


def test_no_service_account_keys_anywhere(resources, parsed):
    assert not of_type(resources, "google_service_account_key")
    assert "google_service_account_key" not in all_text()
    for doc in parsed.values():
        for provider in doc.get("provider", []):
            for body in provider.values():
                assert "credentials" not in body, "providers take credentials from the environment"


def test_no_project_wide_storage_or_basic_roles(resources):
    for rtype in ("google_project_iam_member", "google_project_iam_binding"):
        for name, body in of_type(resources, rtype).items():
            role = body["role"]
            assert not role.startswith("roles/storage."), f"{rtype}.{name}: bucket roles go on buckets"
            assert role not in {"roles/owner", "roles/editor", "roles/viewer"}, f"{rtype}.{name}: basic role"
    assert not of_type(resources, "google_project_iam_policy")


def test_bucket_roles_are_object_level_and_per_bucket(resources):
    members = of_type(resources, "google_storage_bucket_iam_member")
    assert members
    for name, body in members.items():
        assert body["role"] in OBJECT_ROLES, f"{name}: {body['role']}"
        assert body["bucket"].startswith("${google_storage_bucket."), f"{name}: grant on a bucket of this stack"
        assert "allUsers" not in body["member"] and "allAuthenticatedUsers" not in body["member"]


def test_ray_service_account_reaches_only_shards_and_checkpoints(resources):
    ray_grants = {
        body["bucket"]
        for body in of_type(resources, "google_storage_bucket_iam_member").values()
        if "google_service_account.ray." in body["member"]
    }
    assert ray_grants == {"${google_storage_bucket.shards.name}", "${google_storage_bucket.checkpoints.name}"}


def test_workload_identity_bindings(resources, locals_, variables):
    bindings = {
        body["service_account_id"]: body["member"]
        for body in of_type(resources, "google_service_account_iam_member").values()
        if body["role"] == "roles/iam.workloadIdentityUser"
    }
    assert bindings == {
        "${google_service_account.ray.name}": "${local.ray_ksa_member}",
        "${google_service_account.mlflow.name}": "${local.mlflow_ksa_member}",
    }
    assert locals_["workload_pool"] == "${var.project_id}.svc.id.goog"
    assert locals_["ray_ksa_member"] == (
        "serviceAccount:${local.workload_pool}[${var.k8s_namespace}/${var.ray_ksa_name}]"
    )
    assert locals_["mlflow_ksa_member"] == (
        "serviceAccount:${local.workload_pool}[${var.k8s_namespace}/${var.mlflow_ksa_name}]"
    )


# --------------------------------------------------------------------------------------------------------
# cluster and node pools


def test_cluster_private_nodes_and_workload_identity(resources):
    cluster = of_type(resources, "google_container_cluster")["main"]
    private = block(cluster, "private_cluster_config")
    assert private["enable_private_nodes"] is True
    assert block(cluster, "workload_identity_config")["workload_pool"] == "${local.workload_pool}"
    assert cluster["remove_default_node_pool"] is True
    assert cluster["networking_mode"] == "VPC_NATIVE"
    ip_policy = block(cluster, "ip_allocation_policy")
    assert ip_policy["cluster_secondary_range_name"] == "pods"
    assert ip_policy["services_secondary_range_name"] == "services"
    assert block(cluster, "master_authorized_networks_config")["gcp_public_cidrs_access_enabled"] is False
    assert cluster["datapath_provider"] == "ADVANCED_DATAPATH", "NetworkPolicies in infra/k8s need enforcement"
    assert block(block(cluster, "master_auth"), "client_certificate_config")["issue_client_certificate"] is False
    assert cluster.get("enable_legacy_abac") is False


def test_master_authorized_networks_reject_the_internet(variables):
    validation = block(variables["master_authorized_networks"], "validation")
    assert "/0" in validation["condition"]


@pytest.mark.parametrize("pool", ["cpu", "gpu"])
def test_node_pools_are_hardened(resources, pool):
    body = of_type(resources, "google_container_node_pool")[pool]
    config = block(body, "node_config")
    assert block(config, "workload_metadata_config")["mode"] == "GKE_METADATA"
    assert config["service_account"] == "${google_service_account.nodes.email}"
    assert config["image_type"] == "COS_CONTAINERD"
    shielded = block(config, "shielded_instance_config")
    assert shielded["enable_secure_boot"] is True and shielded["enable_integrity_monitoring"] is True
    management = block(body, "management")
    assert management["auto_repair"] is True and management["auto_upgrade"] is True


def test_gpu_pool_defaults_h100_8gpu_scale_to_zero_with_driver_and_taint(resources, variables):
    gpu = of_type(resources, "google_container_node_pool")["gpu"]
    autoscaling = block(gpu, "autoscaling")
    assert resolve(autoscaling["total_min_node_count"], variables) == 0
    assert resolve(autoscaling["total_max_node_count"], variables) >= 1
    config = block(gpu, "node_config")
    assert resolve(config["machine_type"], variables) == "a3-highgpu-8g"
    accelerator = block(config, "guest_accelerator")
    assert resolve(accelerator["type"], variables) == "nvidia-h100-80gb"
    assert resolve(accelerator["count"], variables) == 8
    driver = block(accelerator, "gpu_driver_installation_config")
    assert resolve(driver["gpu_driver_version"], variables) in {"DEFAULT", "LATEST"}
    taint = block(config, "taint")
    assert (taint["key"], taint["value"], taint["effect"]) == ("nvidia.com/gpu", "present", "NO_SCHEDULE")
    # Type and count are variables, so another GPU type needs no code change.
    assert accelerator["type"].startswith("${var.") and accelerator["count"].startswith("${var.")
    assert variables["gpu_min_nodes"]["default"] == 0


def test_cpu_pool_has_no_gpu_and_no_taint(resources, variables):
    cpu = of_type(resources, "google_container_node_pool")["cpu"]
    config = block(cpu, "node_config")
    assert "guest_accelerator" not in config and "taint" not in config
    assert resolve(block(cpu, "autoscaling")["total_min_node_count"], variables) >= 1


# --------------------------------------------------------------------------------------------------------
# network


def test_network_subnet_nat_and_firewall(resources, variables):
    network = of_type(resources, "google_compute_network")["main"]
    assert network["auto_create_subnetworks"] is False
    subnet = of_type(resources, "google_compute_subnetwork")["nodes"]
    assert subnet["private_ip_google_access"] is True
    ranges = {r["range_name"] for r in subnet["secondary_ip_range"]}
    assert ranges == {"pods", "services"}
    nat = of_type(resources, "google_compute_router_nat")["nat"]
    assert nat["router"] == "${google_compute_router.nat.name}"
    firewalls = of_type(resources, "google_compute_firewall")
    assert firewalls
    for name, rule in firewalls.items():
        if "0.0.0.0/0" in rule.get("source_ranges", []):
            assert "allow" not in rule, f"firewall {name} allows traffic from the internet"
            assert "deny" in rule


# --------------------------------------------------------------------------------------------------------
# storage


def test_buckets_are_private_versioned_and_have_lifecycle_rules(resources):
    buckets = of_type(resources, "google_storage_bucket")
    assert {"shards", "checkpoints", "mlflow_artifacts"} <= set(buckets)
    for name, bucket in buckets.items():
        assert bucket["uniform_bucket_level_access"] is True, name
        assert bucket["public_access_prevention"] == "enforced", name
        assert bucket.get("lifecycle_rule"), f"{name} has no lifecycle rule"
        assert block(bucket, "versioning")["enabled"] is True, name


def test_checkpoint_bucket_keeps_versions_for_a_while_then_drops_them(resources):
    checkpoints = of_type(resources, "google_storage_bucket")["checkpoints"]
    assert block(checkpoints, "versioning")["enabled"] is True
    conditions = [rule["condition"][0] for rule in checkpoints["lifecycle_rule"]]
    assert any("days_since_noncurrent_time" in c or "num_newer_versions" in c for c in conditions)


def test_data_buckets_log_access(resources):
    buckets = of_type(resources, "google_storage_bucket")
    for name in ("shards", "checkpoints", "mlflow_artifacts"):
        assert block(buckets[name], "logging")["log_bucket"] == "${google_storage_bucket.access_logs.name}"


# --------------------------------------------------------------------------------------------------------
# Cloud SQL and secrets


def test_cloudsql_private_ip_only_tls_and_backups(resources, variables):
    instance = of_type(resources, "google_sql_database_instance")["mlflow"]
    assert resolve(instance["database_version"], variables).startswith("POSTGRES_")
    settings = block(instance, "settings")
    ip = block(settings, "ip_configuration")
    assert ip["ipv4_enabled"] is False, "Cloud SQL must have no public IP"
    assert ip["private_network"] == "${google_compute_network.main.id}"
    assert not ip.get("authorized_networks")
    assert ip["ssl_mode"] in {"ENCRYPTED_ONLY", "TRUSTED_CLIENT_CERTIFICATE_REQUIRED"}
    assert block(settings, "backup_configuration")["enabled"] is True
    assert "${google_service_networking_connection.private_services}" in instance["depends_on"]


def test_database_password_is_generated_kept_in_secret_manager_and_never_output(resources, outputs):
    assert of_type(resources, "random_password")["mlflow_db"]
    assert of_type(resources, "google_sql_user")["mlflow"]["password"] == "${random_password.mlflow_db.result}"
    version = of_type(resources, "google_secret_manager_secret_version")["mlflow_db_password"]
    assert version["secret_data"] == "${random_password.mlflow_db.result}"
    for name, body in outputs.items():
        value = str(body["value"])
        assert "random_password" not in value and ".password" not in value, f"output {name} leaks a password"
        assert body.get("description"), f"output {name} has no description"


def test_outputs_cover_what_render_sh_reads(outputs):
    render = (REPO / "infra" / "k8s" / "render.sh").read_text()
    wanted = set(re.findall(r"tf_output (\w+)", render))
    assert wanted, "render.sh reads no terraform outputs?"
    assert wanted <= set(outputs), f"render.sh needs outputs {sorted(wanted - set(outputs))}"
