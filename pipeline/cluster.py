"""The Ray cluster both stages run on: joining it, and whether it can host what a stage is about to ask for.

- ``connect_ray``: join the cluster at an address / $RAY_ADDRESS, or start a local Ray, with this repository as
  the workers' code.
- ``running_as_ray_job`` / ``joins_existing_cluster``: whether this process is a ``ray job submit`` entrypoint, or
  joins a cluster that existed before it (which may have an autoscaler) rather than a local Ray it started.
- ``check_resources``: Ray waits silently for resources it does not have; say so before submitting the work.

Ray is imported inside the functions, so that importing this module (e.g. to report a configuration error) stays
cheap.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from pipeline.config import REPO_ROOT, ConfigError

log = logging.getLogger(__name__)


def running_as_ray_job() -> bool:
    """True in the entrypoint of a `ray job submit`, which gives it the job's runtime env in this variable."""
    return "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ


def joins_existing_cluster(address: str | None = None) -> bool:
    """True when ``connect_ray(address)`` joins a cluster that existed before (a job's, an address), not a local one."""
    return bool(address or os.environ.get("RAY_ADDRESS") or running_as_ray_job())


def connect_ray(address: str | None = None) -> None:
    """Join the Ray cluster at ``address`` / $RAY_ADDRESS, or start a local one, shipping this code to the workers.

    Under ``ray job submit --working-dir .`` the job's working dir already reaches every worker; otherwise the
    repository is sent as the working dir (git-ignored files such as runs/ and .venv stay behind).
    """
    import ray

    if ray.is_initialized():
        return
    # Ray refuses a second working_dir for a job's entrypoint.
    runtime_env = None if running_as_ray_job() else {"working_dir": str(REPO_ROOT)}
    ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)


@dataclass(frozen=True)
class ResourceNeed:
    """What one piece of work must get from the cluster at once: all workers of a training run (Ray Train starts
    them together), or one fine-tuning run.

    ``asker`` names it in messages ("scale.workers=4", "cifar10: a run"); ``cpu_fix`` / ``gpu_fix`` say what to
    change when the cluster has too few CPUs / GPUs.
    """

    asker: str
    cpus: float
    gpus: float = 0.0
    cpu_fix: str = ""
    gpu_fix: str = ""


def check_resources(
    needs: Iterable[ResourceNeed], *, can_grow: bool, total: Mapping[str, float] | None = None
) -> list[str]:
    """Compare each need with the cluster's total CPUs and GPUs (``total``: default ``ray.cluster_resources()``).

    A need larger than the whole cluster would wait forever on a cluster that cannot grow (a local Ray): that
    raises ConfigError. A cluster we joined may have an autoscaler (infra's GPU worker group starts at 0 replicas),
    so there each shortfall is only logged as a warning. Returns the shortfalls, sorted, one line each.
    """
    if total is None:
        import ray

        total = ray.cluster_resources()
    have_cpus, have_gpus = total.get("CPU", 0), total.get("GPU", 0)
    problems = set()
    for need in needs:
        if need.cpus > have_cpus:
            problems.add(
                f"{need.asker} asks for {need.cpus:g} CPUs but the Ray cluster has {have_cpus:g}; {need.cpu_fix}"
            )
        if need.gpus > have_gpus:
            problems.add(
                f"{need.asker} asks for {need.gpus:g} GPU(s) but the Ray cluster has {have_gpus:g}; {need.gpu_fix}"
            )
    shortfalls = sorted(problems)
    if shortfalls and not can_grow:
        raise ConfigError(shortfalls)
    for problem in shortfalls:
        log.warning("%s (for now: the work waits until the cluster grows, e.g. by its autoscaler)", problem)
    return shortfalls
