"""Distributed pretraining: the Ray Train driver and the per-worker DeepSpeed training loop.

Driver (``preflight`` then ``run``), all before or around ``TorchTrainer.fit()``:
    config validated -> data checked (``check_data``) -> plan derived -> existing checkpoints checked for
    compatibility -> MLflow run opened -> Ray Train workers started -> MLflow run closed.

Worker (``train_worker``), one per Ray Train worker = one DeepSpeed rank:
    build the ViT -> ``engine.build_engine`` -> resume from the latest complete checkpoint in the run's storage
    (model, optimizer, LR schedule, step, RNG, data-loader position) -> train -> checkpoint every N steps ->
    export the consolidated fp32 model at the end.

Restarts: Ray Train's ``FailureConfig(max_failures)`` restarts the whole worker group after a worker dies; the
restarted workers (like a resubmitted job with the same run name) find the latest complete checkpoint
themselves in ``<run_dir>/checkpoints``. Ray's own checkpoint mechanism (``ray.train.get_checkpoint``) is
not used: the storage module is the single source of truth for checkpoints, and this lookup also covers
the resubmission case Ray knows nothing about.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from pipeline import cluster, faults, storage, tracking
from pipeline.cluster import connect_ray as connect_ray  # re-exported until transfer imports pipeline.cluster
from pipeline.cluster import running_as_ray_job as running_as_ray_job
from pipeline.config import ConfigError, Plan, PretrainConfig, check_durable_defaults, make_plan
from pipeline.pretrain import checkpoints as ckpt
from pipeline.pretrain import ledger

log = logging.getLogger(__name__)

DIVERGED_MARKER = "_DIVERGED.json"

# Dense bf16 tensor-core peak per GPU (vendor datasheets, SXM parts unless named). MFU is reported only on
# these; on CPU there is no meaningful peak to compare with, so no MFU is logged there.
PEAK_BF16_FLOPS = {
    "A100": 312e12,
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H100": 989e12,
    "H200": 989e12,
}


class LossNotFiniteError(RuntimeError):
    """The loss became NaN or infinite; training stops instead of writing a poisoned checkpoint."""


def device_peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):  # "H100 PCIe" before "H100"
        if key in name:
            return PEAK_BF16_FLOPS[key]
    return None


def _format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


# ---------------------------------------------------------------------------------------------------------
# the driver


def preflight(cfg: PretrainConfig) -> Plan:
    """Everything that can be checked without a cluster: data, derived numbers, resumability. Raises ConfigError."""
    from pipeline.data import DataError, check_data

    problems = check_durable_defaults(cfg)
    if problems:
        raise ConfigError(problems)
    try:
        info = check_data(cfg.data, world_size=cfg.scale.workers)
    except DataError as exc:
        from pipeline.config.presets import demo_data_command, demo_data_url

        hint = f" To make the demo data run: {demo_data_command()}" if cfg.data.train == demo_data_url() else ""
        # check_data's messages usually name the field; the manifest ones do not.
        field = "" if re.search(r"\bdata\.(train|eval)\b", str(exc)) else "data.train: "
        raise ConfigError([f"{field}{exc}{hint}"]) from None
    plan = make_plan(cfg, info)
    check_memory(cfg, plan)
    try:
        ref = ckpt.latest_complete(plan.checkpoint_dir)
    except storage.StorageError as exc:  # an unreadable completion marker: a person has to look at it
        raise ConfigError([f"run.name={plan.run_name}: {exc}"]) from None
    if ref is not None:
        problems = ckpt.check_compatible(ref, checkpoint_info(cfg, plan))
        if problems:
            raise ConfigError(
                [
                    f"run.name={plan.run_name}: the checkpoint {ref.url} cannot be resumed by this config ("
                    + "; ".join(problems)
                    + "): restore those settings, or choose a new run.name"
                ]
            )
        # The workers must resume from this checkpoint (or a later one), never from scratch.
        plan = dataclasses.replace(plan, resume_step=ref.step)
    return plan


# The planner's words for the knobs -> this config's keys, so that a refusal names what to --set.
_PLANNER_KEYS = {
    "zero_stage": "train.zero_stage",
    "micro_batch": "train.micro_batch",
    "grad_checkpointing": "train.activation_checkpointing",
    "global_batch": "train.global_batch",
}


def check_memory(cfg: PretrainConfig, plan: Plan) -> None:
    """Refuse a config whose model states + activations cannot fit the workers' memory (``pipeline.planner``).

    GPU workers are checked against ``scale.gpu`` ("auto": the driver's GPU if the planner knows it, else h100,
    which the paper presets are sized for); CPU workers against this host's available memory. ``scale.gpu=null``
    skips the check.
    """
    from pipeline import planner

    if cfg.scale.gpu is None:
        return
    gpu, assumed = cfg.scale.gpu, ""
    if gpu == "auto":
        spec = planner.detect_gpu(torch.cuda.get_device_name()) if torch.cuda.is_available() else None
        gpu = spec.key if spec is not None and spec.key in planner.GPUS else "h100"
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


def checkpoint_info(cfg: PretrainConfig, plan: Plan) -> dict[str, Any]:
    """What a checkpoint's marker records (and ``check_compatible`` compares on resume)."""
    return {
        "run_name": plan.run_name,
        "world_size": plan.world_size,
        "zero_stage": cfg.train.zero_stage,
        "variant": cfg.model.variant,
        "image_size": cfg.data.image_size,
        "num_classes": plan.num_classes,
        "global_batch": plan.global_batch,
        "micro_batch": plan.micro_batch,
        "total_steps": plan.total_steps,
    }


@dataclass
class RunResult:
    status: str  # "finished" (exported), "stopped" (train.stop_at_step) or "already-complete"
    step: int
    export_uri: str | None
    mlflow_run_id: str | None
    metrics: dict[str, Any]


def completed_export(plan: Plan) -> str | None:
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


def run(cfg: PretrainConfig, plan: Plan) -> RunResult:
    """Train on the connected Ray cluster (``connect_ray`` first). Call ``preflight`` before: it makes the plan."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    done = completed_export(plan)
    if done:
        log.info(
            "run %s already trained %d steps and exported to %s; nothing to do (choose a new run.name to train again)",
            plan.run_name,
            plan.total_steps,
            done,
        )
        return RunResult("already-complete", plan.total_steps, done, None, {})
    # A new submission is a deliberate retry after a divergence (e.g. with a lower lr): lift the stop.
    storage.remove(storage.join(plan.run_dir, DIVERGED_MARKER))

    run_id = None
    if cfg.tracking.enabled:
        params = {**cfg.flat(), **{f"plan.{k}": v for k, v in plan.to_dict().items()}, "export_uri": plan.export_dir}
        tags = {"vitpipe.preset": cfg.preset, "vitpipe.run_dir": plan.run_dir, "vitpipe.variant": cfg.model.variant}
        run_id = tracking.open_run(cfg.tracking.uri, cfg.tracking.experiment, plan.run_name, params, tags)

    _warn_if_cluster_too_small(cfg)
    use_gpu = cfg.on_gpu
    resources = {"CPU": cfg.scale.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = cfg.scale.gpus_per_worker
    local_root = storage.local_path(cfg.run.root)
    datasets = None
    if cfg.data.engine == "ray":
        from pipeline.data import ray_datasets

        datasets = ray_datasets(cfg.data)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"config": cfg.model_dump(mode="json"), "plan": plan.to_dict(), "mlflow_run_id": run_id},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.scale.workers,
            use_gpu=use_gpu,
            resources_per_worker=resources,
            placement_strategy=cfg.scale.placement,
        ),
        run_config=ray.train.RunConfig(
            name=plan.run_name,
            # Ray keeps only its bookkeeping here (no checkpoints are reported to it).
            storage_path=str(local_root / plan.run_name / "ray") if local_root else None,
            failure_config=ray.train.FailureConfig(max_failures=cfg.scale.max_failures),
            # Ray workers inherit the environment of the node's raylet, not the driver's: without this, workers
            # would read and write another storage than the one the driver checked.
            worker_runtime_env={"env_vars": forwarded_env()},
        ),
        datasets=datasets,
    )
    status = "FAILED"
    try:
        result = trainer.fit()
        metrics = dict(result.metrics or {})
        status = "FINISHED" if metrics.get("exported") else "KILLED"
        return RunResult(
            "finished" if metrics.get("exported") else "stopped",
            int(metrics.get("step", 0)),
            metrics.get("export_uri"),
            run_id,
            metrics,
        )
    except Exception as exc:
        # Only a divergence leaves the marker. Looking for it after any other failure would add the storage client's
        # whole retry budget (~30 s) to a failure that a storage outage caused, and then report the wrong error.
        if LossNotFiniteError.__name__ in str(exc):
            diverged = storage.join(plan.run_dir, DIVERGED_MARKER)
            if storage.exists(diverged):
                raise LossNotFiniteError(storage.read_json(diverged)["message"]) from exc
        raise
    finally:
        if cfg.tracking.enabled:
            tracking.close_run(cfg.tracking.uri, run_id, status)


# ---------------------------------------------------------------------------------------------------------
# the worker


def _loss_fn(kind: str, num_classes: int):
    if kind == "softmax":
        return lambda logits, labels: F.cross_entropy(logits, labels)

    def sigmoid_xent(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # Sum over classes, mean over images, as the paper's (big_vision's) sigmoid cross-entropy.
        targets = F.one_hot(labels, num_classes).to(logits.dtype)
        return F.binary_cross_entropy_with_logits(logits, targets, reduction="none").sum(-1).mean()

    return sigmoid_xent


def _update_digest(digest: str, images: torch.Tensor, labels: torch.Tensor) -> str:
    """A running fingerprint of every sample this rank trained on (labels + per-image pixel sums), cheap
    enough for every step; equal digests after a resume mean the same data in the same order."""
    h = hashlib.sha256(digest.encode())
    h.update(labels.numpy().tobytes())
    h.update(images.sum(dim=(1, 2, 3), dtype=torch.int64).numpy().tobytes())
    return h.hexdigest()


def train_worker(payload: dict[str, Any]) -> None:
    """The Ray Train per-worker function: one DeepSpeed rank from resume to export."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    import model as vit_model
    from pipeline.data import build_train_loader, normalize
    from pipeline.export import save_exported_model
    from pipeline.pretrain.engine import build_engine

    worker_start = time.perf_counter()
    cfg = PretrainConfig.model_validate(payload["config"])
    plan = Plan(**payload["plan"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    if world != plan.world_size:
        raise RuntimeError(f"Ray started {world} workers, the plan expects {plan.world_size}")
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        # One intra-op thread per reserved CPU: more would oversubscribe cores shared with the other workers.
        torch.set_num_threads(max(1, int(cfg.scale.cpus_per_worker)))
    diverged_url = storage.join(plan.run_dir, DIVERGED_MARKER)
    if storage.exists(diverged_url):
        # A Ray restart after a divergence would only diverge again from the same checkpoint.
        raise LossNotFiniteError(storage.read_json(diverged_url)["message"])
    # Before the (slow) engine set-up, so that a resume that cannot happen fails fast.
    ref = ckpt.latest_complete(plan.checkpoint_dir, quiet=rank != 0)
    if plan.resume_step is not None and (ref is None or ref.step < plan.resume_step):
        found = f"only the one of step {ref.step}" if ref is not None else "no complete checkpoint"
        raise ckpt.CheckpointError(
            f"run {plan.run_name} was launched to resume from the checkpoint of step {plan.resume_step}, but rank "
            f"{rank} finds {found} in {plan.checkpoint_dir}: refusing to start over. Check that the workers reach "
            "the same storage as the driver and that the checkpoint was not deleted"
        )

    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
    model_kwargs = {
        "num_classes": plan.num_classes,
        "img_size": cfg.data.image_size,
        "pool": cfg.model.pool,
        "representation_size": plan.representation_size,
        "dropout": cfg.model.dropout,
        "attn_dropout": cfg.model.attn_dropout,
        "head_zero_init": True,
        "head_bias_init": plan.head_bias_init,
    }
    vit = vit_model.create_vit(cfg.model.variant, **model_kwargs)
    engine = build_engine(vit, cfg, plan)
    dtype = torch.bfloat16 if plan.bf16 else torch.float32
    loss_fn = _loss_fn(cfg.train.loss, plan.num_classes)
    # Different dropout masks per rank; the generators are saved and restored with each checkpoint.
    torch.manual_seed(cfg.train.seed * 100_003 + rank)

    step, digest, loader_state = 0, "", None
    if ref is not None:
        state = ckpt.load(engine, ref, rank=rank)
        step, digest, loader_state = ref.step, state["digest"], state["loader"]
        ckpt.restore_rng(state["rng"])
        if rank == 0:
            log.info(f"[{plan.run_name}] resumed from {ref.url} at step {step}")
    loader = build_train_loader(cfg.data, batch_size=plan.micro_batch, rank=rank, world_size=world, state=loader_state)
    batches = loader.batches()
    steps_ledger = None
    if cfg.train.ledger:
        steps_ledger = ledger.StepLedger(
            plan.run_dir, rank, resumed_from_step=step, checkpoint=ref.url if ref is not None else None
        )
    logger = None
    if rank == 0 and cfg.tracking.enabled:
        logger = tracking.MetricLogger(
            cfg.tracking.uri, payload.get("mlflow_run_id"), max_queue=cfg.tracking.queue_size
        )

    flops_per_image = vit_model.train_flops_per_image(
        cfg.model.variant,
        cfg.data.image_size,
        num_classes=plan.num_classes,
        pool=cfg.model.pool,
        representation_size=plan.representation_size,
    )
    peak = device_peak_flops(device)
    info = checkpoint_info(cfg, plan)

    def save_checkpoint(at: int) -> str:
        rank_state = {"step": at, "digest": digest, "loader": loader.state_dict(), "rng": ckpt.capture_rng()}
        return ckpt.save(
            engine,
            plan.checkpoint_dir,
            at,
            rank=rank,
            rank_state=rank_state,
            info=info,
            keep_last=cfg.checkpoint.keep_last,
        )

    last_good = ref.url if ref is not None else None
    first_loss = last_loss = None
    # Single-step losses are noisy; the start and end of a run are compared as means over 10 steps.
    head_losses: list[float] = []
    tail_losses: collections.deque[float] = collections.deque(maxlen=10)
    window_start, window_steps, window_wait = time.perf_counter(), 0, 0.0
    run_start, run_start_step = time.perf_counter(), step
    engine.train()
    while step < plan.stop_step:
        loss_sum = torch.zeros((), device=device)
        step_keys: list[str] = []
        step_epochs: list[int] = []
        for micro in range(plan.grad_accum):
            wait_start = time.perf_counter()
            # The loader must not draw from the training RNG (torch's DataLoader takes a base seed from it when
            # an iterator starts), or a resumed run's dropout masks would differ from an uninterrupted run's.
            with torch.random.fork_rng(devices=[]):
                batch = next(batches)
            images, labels = batch.images, batch.labels
            step_keys += batch.keys
            step_epochs += batch.epochs
            window_wait += time.perf_counter() - wait_start
            digest = _update_digest(digest, images, labels)
            x = normalize(images.to(device, non_blocking=True), dtype=dtype)
            logits = engine(x)
            loss = loss_fn(logits.float(), labels.to(device, non_blocking=True))
            engine.backward(loss)
            loss_sum += loss.detach()
            if micro < plan.grad_accum - 1:
                engine.step()  # inside the accumulation window DeepSpeed only accumulates
        # Check every rank's loss before the optimizer step applies it, so no poisoned weights are ever saved.
        dist.all_reduce(loss_sum)
        step_loss = loss_sum.item() / (plan.grad_accum * world)
        if not math.isfinite(step_loss):
            message = (
                f"loss is {step_loss} at step {step + 1} of run {plan.run_name}; last good checkpoint: "
                f"{last_good or 'none (the run diverged before its first checkpoint)'}. Resubmitting the same "
                "run.name resumes from it: lower optim.lr or raise optim.warmup_steps first"
            )
            if rank == 0:
                storage.write_json(
                    diverged_url,
                    {"step": step + 1, "loss": str(step_loss), "message": message, "last_good_checkpoint": last_good},
                )
            raise LossNotFiniteError(message)
        engine.step()
        step += 1
        window_steps += 1
        last_loss = step_loss
        if first_loss is None:
            first_loss = step_loss
        if len(head_losses) < 10:
            head_losses.append(step_loss)
        tail_losses.append(step_loss)

        if step % cfg.train.log_every == 0 or step == plan.stop_step:
            stats = loader.stats()
            counts = torch.tensor([stats["bad_samples"], stats["samples"]], dtype=torch.float64, device=device)
            dist.all_reduce(counts)
            elapsed = time.perf_counter() - window_start
            images_per_s = window_steps * plan.global_batch / elapsed
            seconds_per_step = (time.perf_counter() - run_start) / (step - run_start_step)
            lr = engine.get_lr()[0]
            grad_norm = engine.get_global_grad_norm()
            grad_norm = float(grad_norm) if grad_norm is not None else None
            metrics = {
                "train/loss": step_loss,
                "train/lr": lr,
                "train/grad_norm": grad_norm,
                "perf/images_per_s": images_per_s,
                "perf/data_wait_fraction": window_wait / elapsed,
                "data/samples": float(counts[1]),
                "data/skipped_samples": float(counts[0]),
                "data/epoch": float(stats["epoch"]),
            }
            if peak:
                metrics["perf/mfu"] = images_per_s * flops_per_image / (peak * world)
            if rank == 0:
                log.info(
                    f"[{plan.run_name}] step {step}/{plan.total_steps} | loss {step_loss:.4f} | lr {lr:.2e} | "
                    f"{images_per_s:,.0f} img/s | data wait {window_wait / elapsed:.0%} | "
                    f"ETA {_format_eta(seconds_per_step * (plan.stop_step - step))}"
                )
                if logger:
                    logger.log_metrics(metrics, step)
            window_start, window_steps, window_wait = time.perf_counter(), 0, 0.0

        if step % cfg.checkpoint.every_steps == 0 or step == plan.stop_step:
            last_good = save_checkpoint(step)
            if rank == 0:
                log.info(f"[{plan.run_name}] checkpoint {last_good}")
        if steps_ledger is not None:
            steps_ledger.record(step, step_keys, step_epochs)
        faults.fire("after_step", step=step, rank=rank, run_dir=plan.run_dir)  # tests only: see pipeline/faults.py

    exported = step >= plan.total_steps
    export_uri = None
    if exported:
        if last_good is None or not last_good.endswith(ckpt.step_dir_name(step)):
            last_good = save_checkpoint(step)  # resumed at the very end: make sure the final state is on storage
        state = ckpt.consolidated_state_dict(engine, rank=rank)
        if rank == 0:
            final = vit_model.create_vit(cfg.model.variant, **model_kwargs)
            final.load_state_dict(state)
            metadata = {
                "run_name": plan.run_name,
                "step": step,
                "mlflow_run_id": payload.get("mlflow_run_id"),
                "checkpoint": last_good,
                "preset": cfg.preset,
                "loss": cfg.train.loss,
                "class_names": plan.class_names,
            }
            export_uri = save_exported_model(final, plan.export_dir, metadata=metadata)
            log.info(f"[{plan.run_name}] exported the fp32 model to {export_uri}")
            if logger:
                logger.set_tags({tracking.EXPORT_TAG: export_uri})
                logger.log_text(json.dumps({"export_uri": export_uri, **metadata}, indent=2), "export.json")
        dist.barrier()

    report = logger.close(cfg.tracking.flush_timeout_s) if logger else None
    result = {
        "step": step,
        "steps_this_attempt": step - run_start_step,
        "exported": exported,
        "export_uri": export_uri,
        "first_loss": first_loss,
        "last_loss": last_loss,
        "loss_start": sum(head_losses) / len(head_losses) if head_losses else None,
        "loss_end": sum(tail_losses) / len(tail_losses) if tail_losses else None,
        "digest": digest,
        "images_per_s": (step - run_start_step) * plan.global_batch / max(1e-9, time.perf_counter() - run_start),
        "wall_s": time.perf_counter() - run_start,
        "setup_s": run_start - worker_start,
        "mlflow_undelivered": report.undelivered if report else 0,
    }
    if rank == 0 and report and report.undelivered:
        log.info(f"[{plan.run_name}] {report}")
    # Ray Train hands the driver only metrics that come with a checkpoint: rank 0 reports a small one that
    # points at the real checkpoint and export on storage.
    with tempfile.TemporaryDirectory(prefix="vitpipe-pointer-") as tmp:
        pointer = None
        if rank == 0:
            pointer_info = {"run_dir": plan.run_dir, "checkpoint": last_good, "export_uri": export_uri, "step": step}
            (Path(tmp) / "pointer.json").write_text(json.dumps(pointer_info))
            pointer = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(result, checkpoint=pointer)
