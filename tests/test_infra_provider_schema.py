"""Every Terraform resource in infra/terraform checked against the Google provider's own schema.

`terraform validate` is not available offline, but the provider's schema is: PyPI `cdktf-cdktf-provider-google`
16.12.1 (= hashicorp/google 6.x, the range versions.tf allows) ships a jsii assembly that lists every resource,
data source and nested block with its properties (camelCase) and whether each is optional. It is installed into
the infra check environment (.venv-infra, from infra/requirements-check.txt), next to checkov.

Each resource body is walked: an attribute or block name that the schema does not have (a typo such as
`enable_intranode_visiblity`) fails, and so does a required attribute or block that is missing.
"""

from __future__ import annotations

import copy
import json
import os
import re
import tarfile
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from test_infra_terraform import TF_FILES, _load

REPO = Path(__file__).resolve().parent.parent
PACKAGE = "cdktf_cdktf_provider_google"
PROVIDER_VERSION = "16.12.1"
FQN_PREFIX = "@cdktf/provider-google."
# Terraform meta-arguments: valid on every resource, not part of any provider schema.
META_ARGUMENTS = {"count", "for_each", "depends_on", "lifecycle", "provider", "provisioner", "connection"}


def infra_venv() -> Path:
    """The infra check environment: the one $CHECKOV lives in (as `make test` sets it), else .venv-infra."""
    configured = os.environ.get("CHECKOV")
    return Path(configured).resolve().parent.parent if configured else REPO / ".venv-infra"


def assembly_archive() -> Path:
    found = sorted(infra_venv().glob(f"lib/python3*/site-packages/{PACKAGE}/_jsii/provider-google@*.jsii.tgz"))
    if not found:
        pytest.fail(
            f"the Google provider schema ({PACKAGE}=={PROVIDER_VERSION}) is not installed in {infra_venv()}: run "
            "`make setup`, or `.venv-infra/bin/python -m pip install -r infra/requirements-check.txt`"
        )
    return found[-1]


@cache
def schema_types() -> dict[str, dict[str, Any]]:
    """fqn -> jsii type, for the structs that describe resource arguments and nested blocks (~100 MB of JSON)."""
    archive = assembly_archive()
    assert archive.name == f"provider-google@{PROVIDER_VERSION}.jsii.tgz", f"expected {PROVIDER_VERSION}: {archive}"
    with tarfile.open(archive) as tar:
        member = tar.extractfile("package/.jsii")
        assert member is not None
        assembly = json.load(member)
    return {fqn: t for fqn, t in assembly["types"].items() if t.get("datatype")}


def camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def config_fqn(kind: str, rtype: str) -> str:
    """google_container_node_pool -> @cdktf/provider-google.containerNodePool.ContainerNodePoolConfig."""
    base = rtype.removeprefix("google_")
    if kind == "data":
        base = "data_google_" + base
    module = camel(base)
    return f"{FQN_PREFIX}{module}.{module[:1].upper()}{module[1:]}Config"


def struct_of(type_ref: dict[str, Any]) -> str | None:
    """The struct fqn a property's type refers to (a single block, a list of blocks, or either), else None."""
    if "fqn" in type_ref:
        return type_ref["fqn"] if type_ref["fqn"].startswith(FQN_PREFIX) else None
    if "collection" in type_ref:
        return struct_of(type_ref["collection"]["elementtype"])
    if "union" in type_ref:
        for option in type_ref["union"]["types"]:
            found = struct_of(option)
            if found:
                return found
    return None


def properties(fqn: str) -> dict[str, dict[str, Any]]:
    types = schema_types()
    assert fqn in types, f"{fqn} is not in the provider schema"
    return {p["name"]: p for p in types[fqn]["properties"]}


def check_body(body: dict[str, Any], fqn: str, where: str, *, top: bool = False) -> list[str]:
    """Problems in one resource body (top) or nested block against its schema struct."""
    props = properties(fqn)
    problems = []
    seen = set()
    for key, value in body.items():
        if top and key in META_ARGUMENTS:
            continue
        if key == "dynamic":
            # dynamic "name" { for_each = ..., content { ... } } generates blocks called `name`.
            for entry in value if isinstance(value, list) else [value]:
                for name, spec in entry.items():
                    seen.add(camel(name))
                    problems += check_nested(name, [spec.get("content", [{}])[0]], props, fqn, where)
            continue
        seen.add(camel(key))
        problems += check_nested(key, value, props, fqn, where)
    for name, prop in props.items():
        if not prop.get("optional") and name not in seen:
            problems.append(f"{where}: required {name} is missing")
    return problems


def check_nested(key: str, value: Any, props: dict[str, dict[str, Any]], fqn: str, where: str) -> list[str]:
    prop = props.get(camel(key))
    if prop is None:
        return [f"{where}: {key!r} is not an argument or block of {fqn.rpartition('.')[2]}"]
    nested = struct_of(prop["type"])
    blocks = value if isinstance(value, list) else [value]
    if nested is None or not all(isinstance(b, dict) for b in blocks):
        return []  # a plain attribute (string, number, list, map)
    return [problem for i, b in enumerate(blocks) for problem in check_body(b, nested, f"{where}.{key}[{i}]")]


@cache
def terraform_objects(only: Path | None = None) -> tuple[tuple[str, str, str, dict[str, Any]], ...]:
    """(kind, type, name, body) for every resource and data source of the google provider (in one file)."""
    out = []
    for path in [only] if only else TF_FILES:
        doc = _load(path)
        for kind in ("resource", "data"):
            for entry in doc.get(kind, []):
                for rtype, named in entry.items():
                    for name, body in named.items():
                        if rtype.startswith("google_"):
                            out.append((kind, rtype, name, body))
    return tuple(out)


def schema_problems(kind: str, rtype: str, name: str, body: dict[str, Any]) -> list[str]:
    fqn = config_fqn(kind, rtype)
    if fqn not in schema_types():
        return [f"{kind} {rtype}: no such {kind} type in provider {PROVIDER_VERSION}"]
    return check_body(body, fqn, f"{rtype}.{name}", top=True)


@pytest.mark.parametrize("path", TF_FILES, ids=lambda p: p.name)
def test_every_google_resource_matches_the_provider_schema(path):
    problems = []
    for kind, rtype, name, body in terraform_objects(path):
        problems += schema_problems(kind, rtype, name, body)
    assert not problems, "\n".join(problems)


def test_provider_block_matches_the_provider_schema():
    providers = [p["google"] for path in TF_FILES for p in _load(path).get("provider", []) if "google" in p]
    assert providers
    for body in providers:
        problems = check_body(body, f"{FQN_PREFIX}provider.GoogleProviderConfig", "provider.google", top=True)
        assert not problems, "\n".join(problems)


def test_schema_check_catches_misspelled_unknown_and_missing_names():
    """The checker must be able to fail, on attributes and on nested blocks, or the test above proves nothing."""
    objects = {(rtype, name): body for _, rtype, name, body in terraform_objects()}
    cluster = copy.deepcopy(objects[("google_container_cluster", "main")])
    assert not schema_problems("resource", "google_container_cluster", "main", cluster)
    cluster["enable_intranode_visiblity"] = cluster.pop("enable_intranode_visibility")
    problems = schema_problems("resource", "google_container_cluster", "x", cluster)
    assert any("enable_intranode_visiblity" in p for p in problems), problems

    pool = copy.deepcopy(objects[("google_container_node_pool", "gpu")])
    pool["node_config"][0]["guest_accelerator"][0]["gpu_driver_installation_config"][0]["gpu_driver_vrsion"] = "X"
    problems = schema_problems("resource", "google_container_node_pool", "gpu", pool)
    assert any("gpu_driver_vrsion" in p and "node_config[0].guest_accelerator[0]" in p for p in problems), problems

    pool = copy.deepcopy(objects[("google_container_node_pool", "gpu")])
    del pool["cluster"]
    assert any("required cluster" in p for p in schema_problems("resource", "google_container_node_pool", "y", pool))

    bucket = copy.deepcopy(objects[("google_storage_bucket", "shards")])
    del bucket["lifecycle_rule"][0]["action"][0]["type"]
    assert any("required type" in p for p in schema_problems("resource", "google_storage_bucket", "z", bucket))

    assert schema_problems("resource", "google_container_nodepool", "n", {})


def test_every_resource_type_in_the_stack_is_known_to_the_schema():
    types = {rtype for _, rtype, _, _ in terraform_objects()}
    assert len(types) >= 20
    unknown = sorted(t for t in types if config_fqn("resource", t) not in schema_types())
    assert not unknown, unknown
    # random_* resources come from hashicorp/random, whose schema this package does not carry; keep them few.
    others = set(re.findall(r'resource "((?!google_)\w+)"', "\n".join(p.read_text() for p in TF_FILES)))
    assert others <= {"random_id"}, others
