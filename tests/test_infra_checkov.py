"""checkov over everything in infra/ (Terraform, Kubernetes manifests, Dockerfiles, secrets): no failed check.

checkov does not understand KubeRay's custom resources, so the Pods that KubeRay creates from the RayCluster and
RayJob templates (heads, GPU workers, job submitters) are written out as plain Pods, next to the NetworkPolicies,
and scanned as well, with the settings and explained skips of infra/.checkov-ray-pods.yaml.

checkov lives in its own virtual environment (it pins many libraries); `make test` installs it and passes its
path in $CHECKOV. A missing checkov is a failure, not a skip: the security checks must not silently vanish.
Skipping a check needs an entry in infra/.checkov.yaml (global) or an inline `checkov:skip` on one resource,
each with a reason; both lists are pinned here so that a new skip is a visible, reviewed change.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import test_infra_k8s as k8s
import yaml

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "infra" / ".checkov.yaml"
RAY_POD_CONFIG = REPO / "infra" / ".checkov-ray-pods.yaml"
# Skips for the Ray Pods only, each with its reason in infra/.checkov-ray-pods.yaml.
RAY_POD_SKIPS = {"CKV_K8S_43", "CKV_K8S_35", "CKV_K8S_8", "CKV_K8S_9", "CKV_K8S_22", "CKV_K8S_40"}

# Global skips (infra/.checkov.yaml) and single-resource skips, with the reason recorded in the repo.
ALLOWED_GLOBAL_SKIPS = {"CKV_K8S_43", "CKV_K8S_35", "CKV_GCP_84"}
ALLOWED_INLINE_SKIPS = {
    ("CKV_GCP_62", "google_storage_bucket.access_logs"),
    ("CKV_GCP_9", "google_container_node_pool.gpu"),
    ("CKV_DOCKER_2", "/infra/docker/Dockerfile"),
}
# Checks that must have run and passed: the properties the design depends on.
MUST_PASS = {
    "CKV_GCP_25",  # private cluster config
    "CKV_GCP_64",  # private nodes
    "CKV_GCP_69",  # GKE metadata server (Workload Identity)
    "CKV_GCP_12",  # network policy enforcement
    "CKV_GCP_29",  # uniform bucket-level access
    "CKV_GCP_114",  # public access prevention
    "CKV_GCP_78",  # bucket versioning
    "CKV_GCP_60",  # Cloud SQL without public IP
    "CKV_GCP_6",  # Cloud SQL requires TLS
    "CKV_K8S_20",  # no privilege escalation
    "CKV_K8S_23",  # non-root
    "CKV_K8S_37",  # capabilities dropped
    "CKV_K8S_11",  # CPU limits
    "CKV_DOCKER_8",  # last USER is not root
}


def checkov_binary() -> Path:
    configured = os.environ.get("CHECKOV")
    path = Path(configured) if configured else REPO / ".venv-infra" / "bin" / "checkov"
    if not path.is_file():
        pytest.fail(
            f"checkov not found at {path}. Install it with `make setup` (separate venv .venv-infra from "
            "infra/requirements-check.txt) or set CHECKOV=/path/to/checkov."
        )
    return path


def _reports(result: tuple[int, str, str]) -> dict[str, dict[str, Any]]:
    returncode, stdout, stderr = result
    # Exit code 1 means "some check failed"; anything else is checkov itself failing.
    assert returncode in (0, 1), f"checkov exited {returncode}:\n{stderr[-4000:]}"
    parsed = json.loads(stdout)
    reports = parsed if isinstance(parsed, list) else [parsed]
    return {report["check_type"]: report for report in reports}


def ray_pods_as_manifests() -> str:
    """Every Pod template of the RayCluster / RayJobs as a Pod, plus the NetworkPolicies that select them."""
    docs = []
    for where, role, pod in k8s.pod_specs():
        if role.startswith("ray"):
            name = where.replace("/", "-")
            docs.append(
                {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "vitpipe"}, "spec": pod}
            )
    assert len(docs) >= 8
    docs += k8s.docs_of_kind("NetworkPolicy")
    return yaml.safe_dump_all(docs, sort_keys=False)


@pytest.fixture(scope="session")
def checkov_runs(tmp_path_factory) -> dict[str, subprocess.Popen[str]]:
    """Both checkov scans, started together (each takes tens of seconds, mostly waiting on its own start-up)."""
    ray_dir = tmp_path_factory.mktemp("ray-pods")
    (ray_dir / "ray-pods.yaml").write_text(ray_pods_as_manifests())
    env = {**os.environ, "BC_SKIP_MAPPING": "TRUE"}
    common = {"cwd": REPO, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True, "env": env}
    binary = str(checkov_binary())
    return {
        "infra": subprocess.Popen([binary, "--config-file", str(CONFIG), "--output", "json"], **common),
        "ray-pods": subprocess.Popen(
            [binary, "--config-file", str(RAY_POD_CONFIG), "-d", str(ray_dir), "--output", "json"], **common
        ),
    }


def _finish(process: subprocess.Popen[str]) -> tuple[int, str, str]:
    stdout, stderr = process.communicate(timeout=600)
    return process.returncode, stdout, stderr


@pytest.fixture(scope="session")
def checkov_reports(checkov_runs) -> dict[str, dict[str, Any]]:
    """One checkov run over infra/ with the repository's config; reports by framework."""
    return _reports(_finish(checkov_runs["infra"]))


@pytest.fixture(scope="session")
def ray_pod_report(checkov_runs) -> dict[str, Any]:
    return _reports(_finish(checkov_runs["ray-pods"]))["kubernetes"]


def test_ray_pods_pass_checkov(ray_pod_report):
    summary = ray_pod_report["summary"]
    assert summary["parsing_errors"] == 0 and summary["resource_count"] >= 8, summary
    failed = [
        f"{c['check_id']} {c['check_name']} -- {c['resource']}" for c in ray_pod_report["results"]["failed_checks"]
    ]
    assert not failed, "checkov failures in Ray Pods:\n" + "\n".join(failed)
    passed = {check["check_id"] for check in ray_pod_report["results"]["passed_checks"]}
    # The properties the Ray Pods depend on, now checked by checkov too (not only by test_infra_k8s.py).
    assert passed >= {"CKV_K8S_20", "CKV_K8S_23", "CKV_K8S_37", "CKV_K8S_11", "CKV_K8S_15", "CKV2_K8S_6"}, passed
    resources = {check["resource"] for check in ray_pod_report["results"]["passed_checks"]}
    assert any("pretrain-vit-h14-gpu-h100" in r for r in resources) and any("submitter" in r for r in resources)


def test_ray_pod_skips_are_listed_and_explained():
    config = yaml.safe_load(RAY_POD_CONFIG.read_text())
    assert set(config["skip-check"]) == RAY_POD_SKIPS
    text = RAY_POD_CONFIG.read_text()
    for check_id in RAY_POD_SKIPS:
        assert re.search(rf"\n  # [^\n]+\n(  # [^\n]*\n|  - CKV_K8S_\d+\n)*  - {check_id}\n", text), check_id
    # Everything skipped for the whole project is skipped here too, nothing more from the project list.
    project = yaml.safe_load(CONFIG.read_text())["skip-check"]
    assert {c for c in project if c.startswith("CKV_K8S")} <= RAY_POD_SKIPS


def test_all_frameworks_scanned_without_parse_errors(checkov_reports):
    for framework in ("terraform", "kubernetes", "dockerfile"):
        assert framework in checkov_reports, f"checkov did not scan {framework}"
        summary = checkov_reports[framework]["summary"]
        assert summary["parsing_errors"] == 0, f"{framework}: {summary}"
        assert summary["passed"] > 0, f"{framework}: nothing checked"


def test_no_failed_checks(checkov_reports):
    failed = [
        f"{framework}: {check['check_id']} {check['check_name']} -- {check['resource']} ({check['file_path']})"
        for framework, report in checkov_reports.items()
        for check in report["results"]["failed_checks"]
    ]
    assert not failed, "checkov failures:\n" + "\n".join(failed)


def test_skips_are_few_listed_and_explained(checkov_reports):
    config = yaml.safe_load(CONFIG.read_text())
    assert set(config.get("skip-check", [])) == ALLOWED_GLOBAL_SKIPS
    text = CONFIG.read_text()
    for check_id in ALLOWED_GLOBAL_SKIPS:
        # The reason is the comment block right above the id.
        assert re.search(rf"\n  # [^\n]+\n(  # [^\n]*\n)*  - {check_id}\n", text), f"{check_id} needs a reason"
    inline = set()
    for report in checkov_reports.values():
        for check in report["results"]["skipped_checks"]:
            reason = check["check_result"].get("suppress_comment") or ""
            assert len(reason) > 20, f"{check['check_id']} skipped without a reason"
            key = check["resource"] if check["check_class"].startswith("checkov.terraform") else check["repo_file_path"]
            inline.add((check["check_id"], key))
    assert inline <= ALLOWED_INLINE_SKIPS, f"unexpected skips: {sorted(inline - ALLOWED_INLINE_SKIPS)}"
    assert len(ALLOWED_GLOBAL_SKIPS) + len(ALLOWED_INLINE_SKIPS) <= 6, "keep the skip list short"


def test_design_critical_checks_ran_and_passed(checkov_reports):
    passed = {check["check_id"] for report in checkov_reports.values() for check in report["results"]["passed_checks"]}
    assert passed >= MUST_PASS, f"not run or not passed: {sorted(MUST_PASS - passed)}"
