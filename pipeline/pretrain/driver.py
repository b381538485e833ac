"""The pretraining driver: everything before and around Ray Train's ``TorchTrainer.fit()``.

``check_before_launch`` (no cluster needed; every problem is a ConfigError naming the field):
    durable storage -> data checked (``check_data``) -> plan derived -> memory fits (``pipeline.planner``) ->
    an existing checkpoint of this run name checked for compatibility (the workers must then resume from it).
``run`` (on the connected cluster):
    an already exported run returns at once -> MLflow run opened -> cluster size checked -> ``TorchTrainer``
    started with ``trainer.train_worker`` on every worker -> its result (or a recorded stop: ``stops``) ->
    MLflow run closed.

Restarts: Ray Train's ``FailureConfig(max_failures)`` restarts the whole worker group after a worker dies; the
restarted workers (like a resubmitted job with the same run name) find the latest complete checkpoint
themselves in ``<run_dir>/checkpoints``. Ray's own checkpoint mechanism (``ray.train.get_checkpoint``) is
not used: the storage module is the single source of truth for checkpoints, and this lookup also covers
the resubmission case Ray knows nothing about. Rank 0 only reports a small pointer checkpoint to Ray, because
Ray Train hands the driver only metrics that come with one.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from pipeline import cluster, faults, storage, tracking
from pipeline.config import ConfigError, PretrainConfig, RunLayout, check_durable_defaults, make_layout
from pipeline.pretrain import checkpoints as ckpt
from pipeline.pretrain import stops
from pipeline.pretrain.evaluation import check_evaluation
from pipeline.pretrain.launch import check_local_world, local_worker
from pipeline.pretrain.preemption import begin_run, run_ending
from pipeline.pretrain.trainer import Trainer, checkpoint_info, train_worker

if TYPE_CHECKING:
    from pipeline.data import DataInfo

log = logging.getLogger(__name__)


def check_before_launch(cfg: PretrainConfig) -> RunLayout:
    """Everything that can be checked without a cluster: data, derived numbers, resumability. Raises ConfigError."""
    storage.set_request_timeout(cfg.run.storage_timeout_s)  # before the first storage call of this process
    problems = check_durable_defaults(cfg) + check_local_world(cfg)
    if problems:
        raise ConfigError(problems)
    plan = make_layout(cfg, _check_data(cfg))
    check_memory(cfg, plan)
    evaluation = check_evaluation(cfg, plan)
    if evaluation:
        log.info(f"[{plan.run_name}] {evaluation}")
    return _with_resume_step(cfg, plan)


def _check_data(cfg: PretrainConfig) -> DataInfo:
    from pipeline.data import DataError, check_data

    try:
        return check_data(cfg.data, world_size=cfg.scale.workers)
    except DataError as exc:
        from pipeline.config.presets import demo_data_command, demo_data_url

        hint = f" To make the demo data run: {demo_data_command()}" if cfg.data.train == demo_data_url() else ""
        # check_data's messages usually name the field; the manifest ones do not.
        field = "" if re.search(r"\bdata\.(train|eval)\b", str(exc)) else "data.train: "
        raise ConfigError([f"{field}{exc}{hint}"]) from None


def _with_resume_step(cfg: PretrainConfig, plan: RunLayout) -> RunLayout:
    """When this run name has a complete checkpoint, check that this config can resume it, and record its step: the
    workers must then resume from it (or a later one), never from scratch."""
    try:
        ref = ckpt.latest_complete(plan.checkpoint_dir)
    except (storage.StorageError, ckpt.CheckpointError) as exc:  # an unreadable or unsafe marker: a person must look
        raise ConfigError([f"run.name={plan.run_name}: {exc}"]) from None
    if ref is None:
        return plan
    problems = ckpt.check_compatible(ref, checkpoint_info(cfg, plan))
    if problems:
        raise ConfigError(
            [
                f"run.name={plan.run_name}: the checkpoint {ref.url} cannot be resumed by this config ("
                + "; ".join(problems)
                + "): restore those settings, or choose a new run.name"
            ]
        )
    return dataclasses.replace(plan, resume_step=ref.step)


# The planner's words for the knobs -> this config's keys, so that a refusal names what to --set.
_PLANNER_KEYS = {
    "zero_stage": "train.zero_stage",
    "micro_batch": "train.micro_batch",
    "grad_checkpointing": "train.activation_checkpointing",
    "global_batch": "train.global_batch",
}


def check_memory(cfg: PretrainConfig, plan: RunLayout) -> None:
    """Refuse a config whose model states + activations cannot fit the workers' memory (``pipeline.planner``).

    GPU workers are checked against ``scale.gpu`` ("auto": the driver's GPU if the planner knows it, else h100,
    which the paper presets are sized for); CPU workers against this host's available memory. ``scale.gpu=null``
    skips the check.
    """
    from pipeline import planner
    from pipeline.planner.hardware import GPUS, detect_gpu

    if cfg.scale.gpu is None:
        return
    gpu, assumed = cfg.scale.gpu, ""
    if gpu == "auto":
        spec = detect_gpu(torch.cuda.get_device_name()) if torch.cuda.is_available() else None
        gpu = spec.key if spec is not None and spec.key in GPUS else "h100"
        assumed = f" (scale.gpu=auto assumed {gpu}: set scale.gpu to the workers' GPU, or null to skip this check)"
    request = planner.request_from_config(cfg, steps=plan.total_steps, num_classes=plan.num_classes, gpu=gpu)
    result = planner.preflight(request)
    if not result.fits:
        reasons = [
            re.sub(
                r"(?<![.\w])(" + "|".join(_PLANNER_KEYS) + r")(?=\s*(<=|=))",
                lambda m: "--set " + _PLANNER_KEYS[m.group(1)],
                reason,
            )
            for reason in result.reasons
        ]
        raise ConfigError([f"train.micro_batch / train.zero_stage: {reason}{assumed}" for reason in reasons])


@dataclass
class RunResult:
    status: str  # "finished" (exported), "stopped" (train.stop_at_step), "preempted" (SIGTERM) or "already-complete"
    step: int
    export_uri: str | None
    mlflow_run_id: str | None
    metrics: dict[str, Any]


def completed_export(plan: RunLayout) -> str | None:
    """The export URL if this run already trained all its steps and exported."""
    from pipeline.export import export_metadata

    if not storage.is_complete(plan.export_dir):
        return None
    if export_metadata(plan.export_dir).get("step") != plan.total_steps:
        return None
    return plan.export_dir


def _warn_if_cluster_too_small(cfg: PretrainConfig) -> None:
    """Ray waits (silently) for resources it does not have; say so up front. An autoscaling cluster may still grow
    (and the driver does not know how it was connected), so this warns rather than fails."""
    import ray

    have = ray.cluster_resources()
    need_cpu = cfg.scale.workers * cfg.scale.cpus_per_worker
    workers = cluster.ResourceNeed(
        f"scale.workers={cfg.scale.workers}",
        cpus=need_cpu,
        gpus=cfg.scale.workers * cfg.scale.gpus_per_worker,
        cpu_fix="lower scale.workers / scale.cpus_per_worker",
        gpu_fix="lower scale.workers / scale.gpus_per_worker",
    )
    short = cluster.check_resources([workers], can_grow=True, total=have)
    if not short and cfg.data.engine == "ray" and have.get("CPU", 0) - need_cpu < 1:
        log.warning(
            "data.engine=ray runs its read/decode tasks on CPUs outside the training workers, but the workers take "
            "%s of the cluster's %s CPUs: lower scale.cpus_per_worker (e.g. 0.5) or data stalls",
            need_cpu,
            have.get("CPU", 0),
        )


# Environment the Ray Train workers need from the driver: the storage endpoint (the GCS emulator in tests and
# local demos) and the tests' fault-injection switches.
FORWARDED_ENV = (storage.EMULATOR_ENV, faults.ENV)


def forwarded_env() -> dict[str, str]:
    return {name: os.environ[name] for name in FORWARDED_ENV if name in os.environ}


def run(cfg: PretrainConfig, plan: RunLayout, fit: Callable[[str | None], dict[str, Any]] | None = None) -> RunResult:
    """Train on the connected Ray cluster (``pipeline.cluster.connect_ray`` first), or as one rank of a local world
    (``scale.launcher=local``, ``run_local``). Call ``check_before_launch`` before: it makes the plan.
    ``fit(mlflow_run_id)`` trains and returns rank 0's metrics; default: Ray Train's workers."""
    if cfg.scale.launcher == "local" and fit is None:
        return run_local(cfg, plan)
    done = completed_export(plan)
    if done:
        log.info(
            "run %s already trained %d steps and exported to %s; nothing to do (choose a new run.name to train again)",
            plan.run_name,
            plan.total_steps,
            done,
        )
        return RunResult("already-complete", plan.total_steps, done, None, {})
    lease = None
    if fit is None:
        check_cluster_storage(cfg)  # before anything is written or tracked
        lease = take_lease(cfg, plan)  # one writer per run; released below, expires if this process dies
    # A new submission is a deliberate retry after a stop (a divergence: e.g. with a lower lr; data no restart could
    # read: once it is fixed): lift it.
    stops.lift_stop(plan.run_dir)

    run_id = None
    if cfg.tracking.enabled:
        params = {**cfg.flat(), **{f"plan.{k}": v for k, v in plan.to_dict().items()}, "export_uri": plan.export_dir}
        tags = {"vitpipe.preset": cfg.preset, "vitpipe.run_dir": plan.run_dir, "vitpipe.variant": cfg.model.variant}
        run_id = tracking.open_run(cfg.tracking.uri, cfg.tracking.experiment, plan.run_name, params, tags)

    status = "FAILED"
    try:
        begin_run(plan.run_dir)  # a SIGTERM to this driver from now on asks the workers to stop
        metrics = fit(run_id) if fit is not None else _fit_on_ray(cfg, plan, run_id)
        status = "FINISHED" if metrics.get("exported") else "KILLED"
        return run_result(metrics, run_id)
    except Exception as exc:
        # Ray Train reports the last attempt's failure: after a recorded stop, the restarts' refusal. Say why instead;
        # after a storage failure, the one line naming the URL and the operation rather than Ray's whole report.
        stopped = stops.recorded_stop(plan.run_dir, exc) or stops.worker_storage_error(exc)
        if stopped is not None:
            raise stopped from exc
        raise
    finally:
        status = run_ending(status)  # KILLED, not FAILED, after a SIGTERM
        if cfg.tracking.enabled:
            tracking.close_run(cfg.tracking.uri, run_id, status)
        if lease is not None:
            lease.release()


def run_result(metrics: dict[str, Any], mlflow_run_id: str | None) -> RunResult:
    """A run's result from the metrics its (rank 0) worker reported."""
    return RunResult(
        "finished" if metrics.get("exported") else "preempted" if metrics.get("preempted") else "stopped",
        int(metrics.get("step", 0)),
        metrics.get("export_uri"),
        mlflow_run_id,
        metrics,
    )


def _fit_on_ray(cfg: PretrainConfig, plan: RunLayout, mlflow_run_id: str | None) -> dict[str, Any]:
    _warn_if_cluster_too_small(cfg)
    result = _torch_trainer(cfg, plan, mlflow_run_id).fit()
    return dict(result.metrics or {})


def take_lease(cfg: PretrainConfig, plan: RunLayout) -> Any:
    """The run's lease (``pipeline.pretrain.lease``), renewed in the background; ConfigError while another job
    holds it."""
    from pipeline.pretrain import lease

    try:
        held = lease.acquire(plan.run_dir, ttl_s=cfg.run.lease_ttl_s, run_name=plan.run_name)
    except lease.LeaseHeldError as exc:
        raise ConfigError([str(exc)]) from None
    held.start_heartbeat()
    return held


def check_cluster_storage(cfg: PretrainConfig) -> None:
    """Refuse a node-local ``file://`` run root or MLflow store on a cluster of several nodes
    (``shared_storage.check_shared_root`` / ``check_shared_tracking``), before any worker starts. Raises ConfigError."""
    import ray

    from pipeline.pretrain.shared_storage import check_shared_root, check_shared_tracking

    nodes = ray.nodes()
    problems = check_shared_root(cfg.run.root, cfg.run.shared_filesystem, nodes)
    problems += check_shared_tracking(cfg.tracking.uri, cfg.tracking.enabled, cfg.run.shared_filesystem, nodes)
    if problems:
        raise ConfigError(problems)


def _torch_trainer(cfg: PretrainConfig, plan: RunLayout, mlflow_run_id: str | None) -> Any:
    """Ray Train's trainer: ``scale.workers`` workers, each running ``trainer.train_worker``."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    use_gpu = cfg.on_gpu
    resources = {"CPU": cfg.scale.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = cfg.scale.gpus_per_worker
    from pipeline.pretrain.shared_storage import ray_storage

    datasets = None
    if cfg.data.engine == "ray":
        from pipeline.data import ray_datasets

        datasets = ray_datasets(cfg.data)
    payload = {"config": cfg.model_dump(mode="json"), "plan": plan.to_dict(), "mlflow_run_id": mlflow_run_id}
    ray_path, ray_filesystem = ray_storage(plan.run_dir)
    return TorchTrainer(
        train_worker,
        train_loop_config=payload,
        # A dead or partitioned peer fails the attempt within this (Ray Train then restarts the group), not 30 min.
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo", timeout_s=int(cfg.scale.collective_timeout_s)),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.scale.workers,
            use_gpu=use_gpu,
            resources_per_worker=resources,
            placement_strategy=cfg.scale.placement,
        ),
        run_config=ray.train.RunConfig(
            name=plan.run_name,
            # Ray keeps only its bookkeeping here (no checkpoints are reported to it), on the run's storage: a
            # node's own ~/ray_results is not readable from the others.
            storage_path=ray_path,
            storage_filesystem=ray_filesystem,
            failure_config=ray.train.FailureConfig(max_failures=cfg.scale.max_failures),
            # Ray workers inherit the environment of the node's raylet, not the driver's: without this, workers
            # would read and write another storage than the one the driver checked.
            worker_runtime_env={"env_vars": forwarded_env()},
        ),
        datasets=datasets,
    )


def run_local(cfg: PretrainConfig, plan: RunLayout) -> RunResult:
    """Train as one rank of a local world (``scale.launcher=local``). Rank 0 does what the Ray driver does around
    the workers (``run``: export check, MLflow run); every rank returns its own result, with the export URL
    on rank 0."""
    with local_worker(cfg.on_gpu, cfg.scale.collective_timeout_s) as context:

        def train_here(mlflow_run_id: str | None) -> dict[str, Any]:
            dist.barrier()  # the other ranks wait until rank 0 has lifted a stop (driver.run)
            with stops.stopping_on_bad_data(plan.run_dir, plan.run_name):
                Trainer(cfg, plan, mlflow_run_id, context).train()
            return context.result

        if context.rank == 0:
            return run(cfg, plan, fit=train_here)
        done = completed_export(plan)
        if done:
            return RunResult("already-complete", plan.total_steps, None, None, {})
        return run_result(train_here(None), None)
