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
        for m in re.finditer(r"(?<!data\.)\b((?:google|random)_[a-z0-9_]+\.[a-z0-9_]+)\.", text)
        if not m.group(1).startswith(("google_project_default", "random_password.result"))
    }
    assert referenced - declared == set(), f"undeclared resources: {sorted(referenced - declared)}"
    declared_data = {
        f"{rtype}.{name}"
        for doc in parsed.values()
        for e in doc.get("data", [])
        for rtype, d in e.items()
        for name in d
    }
    used_data = set(re.findall(r"\bdata\.((?:google)_[a-z0-9_]+\.[a-z0-9_]+)", text))
    assert used_data <= declared_data, f"undeclared data sources: {sorted(used_data - declared_data)}"


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
    # MLflow lives in a namespace of its own, out of reach of the job code in the Ray namespace.
    assert locals_["mlflow_ksa_member"] == (
        "serviceAccount:${local.workload_pool}[${var.mlflow_namespace}/${var.mlflow_ksa_name}]"
    )
    assert variables["mlflow_namespace"]["default"] != variables["k8s_namespace"]["default"]


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
    assert management["auto_upgrade"] is True
    # Auto-repair stays on, except for Dynamic Workload Scheduler nodes, which GKE does not repair in place.
    assert management["auto_repair"] is True or (pool == "gpu" and management["auto_repair"] == "${!local.gpu_dws}")


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
    assert resolve(driver["gpu_driver_version"], variables) == "DEFAULT"
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


def test_mlflow_logs_in_to_postgres_with_iam_and_no_password_exists(resources, outputs, locals_):
    instance = of_type(resources, "google_sql_database_instance")["mlflow"]
    flags = {f["name"]: f["value"] for f in block(instance, "settings")["database_flags"]}
    assert flags["cloudsql.iam_authentication"] == "on"
    user = of_type(resources, "google_sql_user")["mlflow"]
    assert user["type"] == "CLOUD_IAM_SERVICE_ACCOUNT" and "password" not in user
    assert user["name"] == "${local.mlflow_db_user}"
    assert locals_["mlflow_db_user"] == '${trimsuffix(google_service_account.mlflow.email, ".gserviceaccount.com")}'
    grants = of_type(resources, "google_project_iam_member").values()
    roles = {body["role"] for body in grants if "mlflow" in body["member"]}
    assert roles == {"roles/cloudsql.client", "roles/cloudsql.instanceUser"}
    for body in of_type(resources, "google_project_iam_member").values():
        if "mlflow" in body["member"]:
            assert "instances/${google_sql_database_instance.mlflow.name}" in block(body, "condition")["expression"]
    assert not of_type(resources, "random_password") and not of_type(resources, "google_secret_manager_secret")
    assert not re.search(r"^\s*(password|secret_data|root_password)\s*=", all_text(), re.M), "no password argument"
    for name, body in outputs.items():
        assert body.get("description"), f"output {name} has no description"
        assert not re.search(r"auth_string|password|private_key", str(body["value"])), f"output {name} leaks a secret"


def test_outputs_cover_what_render_sh_reads(outputs):
    render = (REPO / "infra" / "k8s" / "render.sh").read_text()
    wanted = set(re.findall(r"tf_output (\w+)", render))
    assert wanted, "render.sh reads no terraform outputs?"
    assert wanted <= set(outputs), f"render.sh needs outputs {sorted(wanted - set(outputs))}"


# --------------------------------------------------------------------------------------------------------
# provider range, buckets, networking details


def test_providers_may_move_within_one_major_version_only(parsed):
    for name, spec in parsed["versions.tf"]["terraform"][0]["required_providers"][0].items():
        lower = re.search(r">=\s*(\d+)\.", spec["version"])
        upper = re.search(r"<\s*(\d+)\.0\.0", spec["version"])
        assert lower and upper, f"{name}: {spec['version']!r} needs '>= X.Y.Z, < N.0.0'"
        assert int(upper.group(1)) == int(lower.group(1)) + 1, f"{name}: {spec['version']!r} spans several majors"
    text = (TF_DIR / "versions.tf").read_text()
    assert ".terraform.lock.hcl" in text and "providers lock" in text, "say how the lock file is made and kept"
    ignored = (REPO / "infra" / ".gitignore").read_text().split()
    assert not any(line.endswith(".terraform.lock.hcl") for line in ignored), "the lock file must be committable"


def _longest_match(pattern: str) -> int:
    """Longest string a `^[class]{a,b}[class]$`-style validation regex accepts."""
    body = pattern.strip("^$")
    total = 0
    for item in re.finditer(r"\[[^\]]+\](\{(\d+),(\d+)\})?", body):
        total += int(item.group(3)) if item.group(1) else 1
    return total


def test_bucket_names_can_never_exceed_63_characters(resources, variables, locals_):
    limits = {}
    for name in ("project_id", "cluster_name"):
        condition = block(variables[name], "validation")["condition"]
        limits[name] = _longest_match(re.search(r'regex\("([^"]+)"', condition).group(1).replace("\\\\", "\\"))
    assert limits == {"project_id": 30, "cluster_name": 19}
    prefix = locals_["bucket_prefix"]
    assert prefix == "${var.project_id}-${var.cluster_name}"
    buckets = of_type(resources, "google_storage_bucket")
    for name, bucket in buckets.items():
        assert bucket["name"] == f"${{local.bucket_names.{name}}}", name
        suffix = locals_["bucket_names"][name].removeprefix("${local.bucket_prefix}")
        longest = limits["project_id"] + 1 + limits["cluster_name"] + len(suffix)
        assert longest <= 63, f"{name}: up to {longest} characters"
        (precondition,) = block(bucket, "lifecycle")["precondition"]
        assert precondition["condition"] == f"${{length(local.bucket_names.{name}) <= 63}}", name


def test_service_networking_connection_is_abandoned_on_destroy(resources):
    connection = of_type(resources, "google_service_networking_connection")["private_services"]
    assert connection["deletion_policy"] == "ABANDON"


def test_cluster_autoscaling_states_node_auto_provisioning_off(resources):
    autoscaling = block(of_type(resources, "google_container_cluster")["main"], "cluster_autoscaling")
    assert autoscaling["enabled"] is False, "only the pools of node_pools.tf may create machines"
    assert autoscaling["autoscaling_profile"] == "OPTIMIZE_UTILIZATION"


def test_google_apis_resolve_to_the_private_vip(resources, locals_):
    zone = of_type(resources, "google_dns_managed_zone")["googleapis"]
    assert zone["dns_name"] == "googleapis.com." and zone["visibility"] == "private"
    records = {body["name"]: body for body in of_type(resources, "google_dns_record_set").values()}
    assert records["*.googleapis.com."]["rrdatas"] == ["private.googleapis.com."]
    assert records["private.googleapis.com."]["rrdatas"] == "${local.private_googleapis_ips}"
    assert locals_["private_googleapis_ips"] == [f"199.36.153.{i}" for i in range(8, 12)]


# --------------------------------------------------------------------------------------------------------
# GPU capacity, driver, long runs


def test_gpu_driver_is_pinned_through_the_gke_version_never_latest(resources, variables):
    cluster = of_type(resources, "google_container_cluster")["main"]
    assert cluster["min_master_version"] == "${var.gke_min_version}"
    minor = int(variables["gke_min_version"]["default"].split(".")[1])
    assert minor >= 34, "GKE before 1.34 defaults to drivers older than R580 (CUDA 13 needs R580)"
    validation = block(variables["gpu_driver_version"], "validation")["condition"]
    assert "LATEST" not in validation, "LATEST moves the driver branch under a running pool"
    assert variables["gpu_driver_version"]["default"] == "DEFAULT"


def test_capacity_choices_map_to_node_pool_settings(resources, variables, locals_):
    gpu = of_type(resources, "google_container_node_pool")["gpu"]
    config = block(gpu, "node_config")
    choices = set(re.findall(r'"([A-Z_]+)"', block(variables["gpu_provisioning"], "validation")["condition"]))
    assert choices == {"ON_DEMAND", "SPOT", "RESERVATION", "FLEX_START", "QUEUED_PROVISIONING"}
    assert config["spot"] == '${var.gpu_provisioning == "SPOT"}'
    assert config["flex_start"] == '${var.gpu_provisioning == "FLEX_START"}'
    affinity = block(config, "reservation_affinity")
    assert affinity["consume_reservation_type"] == "${local.gpu_reservation_type}"
    assert "compute.googleapis.com/reservation-name" in affinity["key"]
    assert "var.gpu_reservation_name" in affinity["values"]
    queued = gpu["dynamic"]
    names = {name for entry in queued for name in entry}
    assert {"queued_provisioning", "placement_policy"} <= names
    for entry in queued:
        if "placement_policy" in entry:
            assert entry["placement_policy"]["for_each"] == "${var.gpu_compact_placement ? [1] : []}"
            assert entry["placement_policy"]["content"][0]["type"] == "COMPACT"
        if "queued_provisioning" in entry:
            assert "QUEUED_PROVISIONING" in entry["queued_provisioning"]["for_each"]
    conditions = " ".join(p["condition"] for p in block(gpu, "lifecycle")["precondition"])
    assert "gpu_reservation_name != null" in conditions and "length(var.gpu_node_locations) == 1" in conditions
    assert "ON_DEMAND" in locals_["gpu_reservation_type"] and "SPECIFIC_RESERVATION" in locals_["gpu_reservation_type"]


def test_gpu_pool_upgrades_without_a_surge_node(resources):
    upgrade = block(of_type(resources, "google_container_node_pool")["gpu"], "upgrade_settings")
    assert (upgrade["strategy"], upgrade["max_surge"], upgrade["max_unavailable"]) == ("SURGE", 0, 1)


def test_maintenance_window_and_exclusions(resources, variables):
    policy = block(of_type(resources, "google_container_cluster")["main"], "maintenance_policy")
    window = block(policy, "recurring_window")
    assert window["recurrence"] == "${var.maintenance_recurring_window.recurrence}"
    assert "BYDAY" in variables["maintenance_recurring_window"]["default"]["recurrence"]
    (dynamic,) = policy["dynamic"]
    exclusion = dynamic["maintenance_exclusion"]
    assert exclusion["for_each"] == "${var.maintenance_exclusions}"
    assert block(exclusion["content"][0], "exclusion_options")["scope"] == "${maintenance_exclusion.value.scope}"


def test_ray_gcs_redis_is_private_authenticated_and_encrypted(resources):
    redis = of_type(resources, "google_redis_instance")["ray_gcs"]
    assert redis["connect_mode"] == "PRIVATE_SERVICE_ACCESS"
    assert redis["authorized_network"] == "${google_compute_network.main.id}"
    assert redis["auth_enabled"] is True and redis["transit_encryption_mode"] == "SERVER_AUTHENTICATION"


# --------------------------------------------------------------------------------------------------------
# operations and image admission


def test_gpu_metrics_alerts_budget_and_image_streaming(resources, variables):
    cluster = of_type(resources, "google_container_cluster")["main"]
    monitoring = block(cluster, "monitoring_config")
    assert "DCGM" in monitoring["enable_components"] and block(monitoring, "managed_prometheus")["enabled"] is True
    assert "WORKLOADS" in block(cluster, "logging_config")["enable_components"], "Ray logs go to Cloud Logging"
    alerts = of_type(resources, "google_monitoring_alert_policy")
    queries = " ".join(
        block(alert["conditions"][0], "condition_prometheus_query_language")["query"] for alert in alerts.values()
    )
    assert "DCGM_FI_DEV_GPU_UTIL" in queries and "DCGM_FI_DEV_XID_ERRORS" in queries and "up{" in queries
    for alert in alerts.values():
        assert alert["notification_channels"] == "${local.notification_channels}"
    budget = of_type(resources, "google_billing_budget")["project"]
    assert budget["count"] == "${var.billing_account_id == null ? 0 : 1}"
    assert {r["threshold_percent"] for r in budget["threshold_rules"]} == {0.5, 0.9, 1.0}
    for pool in ("cpu", "gpu"):
        config = block(of_type(resources, "google_container_node_pool")[pool], "node_config")
        assert block(config, "gcfs_config")["enabled"] is True, f"{pool}: image streaming"


def test_binary_authorization_admits_only_the_registry_and_pinned_images(resources, locals_):
    policy = of_type(resources, "google_binary_authorization_policy")["images"]
    assert block(policy, "default_admission_rule")["evaluation_mode"] == "ALWAYS_DENY"
    assert block(policy, "default_admission_rule")["enforcement_mode"] == "ENFORCED_BLOCK_AND_AUDIT_LOG"
    assert block(policy, "admission_whitelist_patterns")["name_pattern"] == "${local.image_registry}/**"
    for image in locals_["external_images"]:
        assert re.fullmatch(r"[a-z0-9.-]+/[a-z0-9/_-]+:v?\d+\.\d+\.\d+", image), f"{image}: exact tag, no wildcard"
    cluster = of_type(resources, "google_container_cluster")["main"]
    assert block(cluster, "binary_authorization")["evaluation_mode"] == "PROJECT_SINGLETON_POLICY_ENFORCE"
