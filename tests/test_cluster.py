"""The cluster module's resource check, against given cluster totals (no Ray needed)."""

from __future__ import annotations

import pytest

from pipeline.cluster import ResourceNeed, check_resources, joins_existing_cluster, running_as_ray_job
from pipeline.config import ConfigError

TWO_CPUS = {"CPU": 2.0}
GPU_RUN = ResourceNeed("cifar10: a run", cpus=1, gpus=1, gpu_fix="pass --set num_gpus=0")


def test_needs_the_cluster_can_host_pass_silently(caplog) -> None:
    assert check_resources([ResourceNeed("scale.workers=2", cpus=2)], can_grow=False, total=TWO_CPUS) == []
    assert caplog.text == ""


def test_a_need_larger_than_a_cluster_that_cannot_grow_is_a_config_error_naming_the_fix() -> None:
    with pytest.raises(ConfigError, match=r"cifar10: a run asks for 1 GPU\(s\) but the Ray cluster has 0; pass"):
        check_resources([GPU_RUN], can_grow=False, total=TWO_CPUS)


def test_a_cluster_that_may_grow_only_warns_once_per_shortfall(caplog) -> None:
    needs = [GPU_RUN, GPU_RUN, ResourceNeed("scale.workers=4", cpus=8, cpu_fix="lower scale.workers")]
    with caplog.at_level("WARNING", logger="pipeline.cluster"):
        short = check_resources(needs, can_grow=True, total=TWO_CPUS)
    assert short == [
        "cifar10: a run asks for 1 GPU(s) but the Ray cluster has 0; pass --set num_gpus=0",
        "scale.workers=4 asks for 8 CPUs but the Ray cluster has 2; lower scale.workers",
    ]
    assert caplog.text.count("autoscaler") == 2


def test_a_ray_job_entrypoint_joins_an_existing_cluster(monkeypatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert not running_as_ray_job() and not joins_existing_cluster()
    assert joins_existing_cluster("127.0.0.1:6379")
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    assert running_as_ray_job() and joins_existing_cluster()
