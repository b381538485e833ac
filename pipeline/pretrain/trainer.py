"""The per-worker side of pretraining: one Ray Train worker is one DeepSpeed rank, from resume to export.

Ray Train runs ``train_worker``, which builds a ``Trainer`` and calls ``Trainer.train``. Its loop reads:

    setup -> resume -> until plan.stop_step: train_step (with its divergence check) -> log_progress ->
    maybe_checkpoint -> ledger line -> fault point; then export (when every step is done) -> report

Exact resume: a checkpoint holds the model, optimizer, LR schedule, step, each rank's RNG state, data-loader
position and the digest of every sample trained on, so a resumed run trains on the same samples in the same order
with the same dropout masks as an uninterrupted one (the reliability tests compare the digests).
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from pipeline import faults, storage, tracking
from pipeline.config import PretrainConfig, RunLayout
from pipeline.pretrain import checkpoints as ckpt
from pipeline.pretrain import health, ledger, stops
from pipeline.pretrain.launch import RayWorkerContext, WorkerContext
from pipeline.pretrain.preemption import Preemption, stop_marker_url

log = logging.getLogger(__name__)


def checkpoint_info(cfg: PretrainConfig, plan: RunLayout) -> dict[str, Any]:
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


def device_peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak of a GPU the hardware table knows; None elsewhere (on CPU no MFU is reported)."""
    from pipeline.planner.hardware import detect_gpu

    if device.type != "cuda":
        return None
    spec = detect_gpu(torch.cuda.get_device_name(device))
    return spec.peak_bf16_flops if spec is not None else None


def model_flops_utilization(images_per_s: float, flops_per_image: float, peak_flops: float, workers: int) -> float:
    """The share of the workers' peak the model's own training FLOPs use (PaLM's MFU): what every image costs
    (forward + backward, ``model.train_flops_per_image``) times the images per second, over the peak of all workers."""
    return images_per_s * flops_per_image / (peak_flops * workers)


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def loss_function(kind: str, num_classes: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if kind == "softmax":
        return lambda logits, labels: F.cross_entropy(logits, labels)

    def sigmoid_xent(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # Sum over classes, mean over images, as the paper's (big_vision's) sigmoid cross-entropy.
        # Multi-label data (JFT, ImageNet-21k's multi-label variant) arrives as multi-hot targets [B, K].
        multi_hot = labels if labels.ndim == 2 else F.one_hot(labels, num_classes)
        targets = multi_hot.to(logits.dtype)
        return F.binary_cross_entropy_with_logits(logits, targets, reduction="none").sum(-1).mean()

    return sigmoid_xent


def update_digest(digest: str, images: torch.Tensor, labels: torch.Tensor) -> str:
    """A running fingerprint of every sample this rank trained on (labels + per-image pixel sums), cheap
    enough for every step; equal digests after a resume mean the same data in the same order."""
    h = hashlib.sha256(digest.encode())
    h.update(labels.numpy().tobytes())
    h.update(images.sum(dim=(1, 2, 3), dtype=torch.int64).numpy().tobytes())
    return h.hexdigest()


@dataclass
class LossTrace:
    """The losses a worker reports at the end. Single-step losses are noisy, so the start and the end of a run are
    also given as means over 10 steps."""

    first: float | None = None
    last: float | None = None
    head: list[float] = field(default_factory=list)
    tail: collections.deque[float] = field(default_factory=lambda: collections.deque(maxlen=10))

    def add(self, loss: float) -> None:
        self.last = loss
        if self.first is None:
            self.first = loss
        if len(self.head) < 10:
            self.head.append(loss)
        self.tail.append(loss)

    def summary(self) -> dict[str, float | None]:
        return {
            "first_loss": self.first,
            "last_loss": self.last,
            "loss_start": sum(self.head) / len(self.head) if self.head else None,
            "loss_end": sum(self.tail) / len(self.tail) if self.tail else None,
        }


@dataclass
class Window:
    """Steps and data-loader waiting time since the last progress line (throughput is reported per window)."""

    start: float = field(default_factory=time.perf_counter)
    steps: int = 0
    data_wait_s: float = 0.0


class Trainer:
    """One DeepSpeed rank of a pretraining run. ``train()`` is the whole life of the worker; the other methods are
    its named steps, called in this order."""

    def __init__(self, cfg: PretrainConfig, plan: RunLayout, mlflow_run_id: str | None, context: WorkerContext) -> None:
        self.cfg, self.plan, self.mlflow_run_id, self.context = cfg, plan, mlflow_run_id, context
        self.worker_start = time.perf_counter()
        self.info = checkpoint_info(cfg, plan)
        self.step = 0
        self.digest = ""  # see update_digest
        self.last_good: str | None = None  # the latest checkpoint on storage
        self.losses = LossTrace()
        self.evaluator: Any = None  # built at the first evaluation step (see evaluate)

    def train(self) -> None:
        """Set up, resume, train to ``plan.stop_step`` (checkpointing on the way), export when done, report."""
        plan = self.plan
        # From set-up to export, SIGTERM to this worker, or the driver's stop request (rank 0 looks for it), stops the
        # run at the next step boundary with a checkpoint (pipeline.pretrain.preemption).
        stop_marker = stop_marker_url(plan.run_dir) if self.context.rank == 0 else None
        with Preemption(stop_marker) as preemption:
            self.setup()
            self.resume()
            self.window = Window()
            self.run_start, self.run_start_step = time.perf_counter(), self.step
            self.engine.train()
            self.evaluate()  # resumed at an evaluation step whose evaluation never ran: run it now
            while self.step < plan.stop_step and not preemption.agreed(self.device):
                self.one_step()
            preempted = self.step < plan.stop_step
            done = self.last_good is not None and self.last_good.endswith(ckpt.step_dir_name(self.step))
            if preempted and self.step > 0 and not done:
                self.save_checkpoint()  # the step just done goes to storage before the process ends
            exported = self.step >= plan.total_steps
            export_uri = self.export() if exported else None
        self.report(exported, export_uri, preempted=preempted)

    def one_step(self) -> None:
        """A training step and what follows it: progress line, evaluation, checkpoint, ledger line."""
        cfg, plan = self.cfg, self.plan
        loss, keys, epochs = self.train_step()
        self.losses.add(loss)
        if self.step % cfg.train.log_every == 0 or self.step == plan.stop_step:
            self.log_progress(loss)
        self.evaluate()
        self.maybe_checkpoint()
        if self.ledger is not None:
            with stops.storage_access("writing the step ledger", self.ledger.url):
                self.ledger.record(self.step, keys, epochs, loss)
        faults.fire("after_step", step=self.step, rank=self.rank, run_dir=plan.run_dir)  # tests only: see faults.py

    # -- set up and resume ---------------------------------------------------------------------------------

    def setup(self) -> None:
        """Rank and device, the refusals that must come before the slow engine set-up, then the model and engine."""
        import model as vit_model
        from pipeline.pretrain.engine import build_engine, engine_modes

        cfg, plan = self.cfg, self.plan
        storage.set_request_timeout(cfg.run.storage_timeout_s)  # a Ray worker is a process of its own
        self.rank, self.world, self.device = self.context.rank, self.context.world_size, self.context.device
        if self.world != plan.world_size:
            raise RuntimeError(f"the launcher started {self.world} workers, the plan expects {plan.world_size}")
        if self.device.type == "cpu":
            # One intra-op thread per reserved CPU: more would oversubscribe cores shared with the other workers.
            torch.set_num_threads(max(1, int(cfg.scale.cpus_per_worker)))
        # A Ray restart after a divergence or bad data would only meet it again (pipeline.pretrain.stops).
        stops.check_not_stopped(plan.run_dir)
        self.ref = self.find_checkpoint()

        torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
        self.model_kwargs = {
            "num_classes": plan.num_classes,
            "img_size": cfg.data.image_size,
            "pool": cfg.model.pool,
            "representation_size": plan.representation_size,
            "dropout": cfg.model.dropout,
            "attn_dropout": cfg.model.attn_dropout,
            "head_zero_init": True,
            "head_bias_init": plan.head_bias_init,
        }
        self.engine = build_engine(vit_model.create_vit(cfg.model.variant, **self.model_kwargs), cfg, plan)
        self.modes = engine_modes(self.engine)
        if self.rank == 0:
            log.info(f"[{plan.run_name}] engine: {self.modes}, data.workers={cfg.data.workers}")
        self.dtype = torch.bfloat16 if plan.bf16 else torch.float32
        self.loss_fn = loss_function(cfg.train.loss, plan.num_classes)
        # Different dropout masks per rank; the generators are saved and restored with each checkpoint.
        torch.manual_seed(cfg.train.seed * 100_003 + self.rank)
        self.flops_per_image = vit_model.train_flops_per_image(
            cfg.model.variant,
            cfg.data.image_size,
            num_classes=plan.num_classes,
            pool=cfg.model.pool,
            representation_size=plan.representation_size,
        )
        self.peak_flops = device_peak_flops(self.device)

    def find_checkpoint(self) -> ckpt.CheckpointRef | None:
        """The latest complete checkpoint (rank 0's choice, on every rank); refuses to start over when the driver saw
        one this rank cannot find."""
        from pipeline.pretrain.shared_storage import agreed_checkpoint

        plan = self.plan
        with stops.storage_access("looking for checkpoints in", plan.checkpoint_dir):
            ref = agreed_checkpoint(plan.checkpoint_dir, rank=self.rank)
        if plan.resume_step is not None and (ref is None or ref.step < plan.resume_step):
            found = f"only the one of step {ref.step}" if ref is not None else "no complete checkpoint"
            raise ckpt.CheckpointError(
                f"run {plan.run_name} was launched to resume from the checkpoint of step {plan.resume_step}, but rank "
                f"{self.rank} finds {found} in {plan.checkpoint_dir}: refusing to start over. Check that the workers "
                "reach the same storage as the driver and that the checkpoint was not deleted"
            )
        return ref

    def resume(self) -> None:
        """Load the checkpoint ``setup`` found (model, optimizer, schedule, step, RNG, data position), then open the
        data loader at that position, the step ledger and (rank 0) the MLflow logger."""
        from pipeline.data import build_train_loader

        cfg, plan, ref = self.cfg, self.plan, self.ref
        loader_state = None
        if ref is not None:
            with stops.storage_access("loading checkpoint", ref.url):
                state = ckpt.load(self.engine, ref, rank=self.rank)
            self.step, self.digest, loader_state = ref.step, state["digest"], state["loader"]
            ckpt.restore_rng(state["rng"])
            self.last_good = ref.url
            if self.rank == 0:
                log.info(f"[{plan.run_name}] resumed from {ref.url} at step {self.step}")
        self.loader = build_train_loader(
            cfg.data, batch_size=plan.micro_batch, rank=self.rank, world_size=self.world, state=loader_state
        )
        self.batches = self.loader.batches()
        self.ledger = None
        if cfg.train.ledger:
            with stops.storage_access("writing the step ledger", ledger.rank_dir(plan.run_dir, self.rank)):
                self.ledger = ledger.StepLedger(
                    plan.run_dir, self.rank, resumed_from_step=self.step, checkpoint=self.last_good
                )
        self.skipped = health.SkippedSteps(self.engine, cfg.train.max_skipped_steps)  # counts on from the checkpoint
        self.metric_logger = None
        if self.rank == 0 and cfg.tracking.enabled:
            self.metric_logger = tracking.MetricLogger(
                cfg.tracking.uri, self.mlflow_run_id, max_queue=cfg.tracking.queue_size
            )

    # -- one step ------------------------------------------------------------------------------------------

    def train_step(self) -> tuple[float, list[str], list[int]]:
        """One optimizer step over ``plan.grad_accum`` micro-batches. Returns the loss (mean over micro-batches and
        ranks) and the keys and epochs of the samples it trained on."""
        from pipeline.data import normalize

        plan, engine = self.plan, self.engine
        loss_sum = torch.zeros((), device=self.device)
        keys: list[str] = []
        epochs: list[int] = []
        for micro in range(plan.grad_accum):
            wait_start = time.perf_counter()
            # The loader must not draw from the training RNG (torch's DataLoader takes a base seed from it when
            # an iterator starts), or a resumed run's dropout masks would differ from an uninterrupted run's.
            with torch.random.fork_rng(devices=[]):
                batch = next(self.batches)
            keys += batch.keys
            epochs += batch.epochs
            self.window.data_wait_s += time.perf_counter() - wait_start
            self.digest = update_digest(self.digest, batch.images, batch.labels)
            x = normalize(batch.images.to(self.device, non_blocking=True), dtype=self.dtype)
            loss = self.loss_fn(engine(x).float(), batch.labels.to(self.device, non_blocking=True))
            engine.backward(faults.loss_to_backward(loss, step=self.step + 1, rank=self.rank, run_dir=plan.run_dir))
            loss_sum += loss.detach()
            if micro < plan.grad_accum - 1:
                engine.step()  # inside the accumulation window DeepSpeed only accumulates
        # Every rank's loss is checked before the optimizer step applies it, so no poisoned weights are ever saved.
        dist.all_reduce(loss_sum)
        step_loss = loss_sum.item() / (plan.grad_accum * self.world)
        self.check_divergence(step_loss)
        self.step_lr = engine.get_lr()[0]  # the lr this step uses (the schedule moves on inside engine.step)
        engine.step()
        self.step += 1
        self.window.steps += 1
        if self.skipped.after_step():
            self.on_skipped_step()
        return step_loss, keys, epochs

    def check_divergence(self, loss: float) -> None:
        """Stop on a NaN or infinite loss, leaving a marker that keeps restarts of this run from training on."""
        if not math.isfinite(loss):
            self.stop_diverged(f"loss is {loss} at step {self.step + 1}")

    def on_skipped_step(self) -> None:
        """DeepSpeed skipped the step just taken (its gradients were not finite): say so; past
        train.max_skipped_steps, stop as a divergence does."""
        skipped, limit = self.skipped.count, self.cfg.train.max_skipped_steps
        if self.rank == 0:
            log.warning(
                f"[{self.plan.run_name}] step {self.step} was skipped by DeepSpeed: its gradients were not finite "
                f"({skipped} skipped so far, train.max_skipped_steps={limit})"
            )
        if self.skipped.over_limit:
            self.stop_diverged(
                f"{skipped} optimizer steps were skipped (non-finite gradients), more than train.max_skipped_steps="
                f"{limit}, at step {self.step}"
            )

    def stop_diverged(self, what: str) -> None:
        """Raise LossNotFiniteError saying ``what`` and where to resume, leaving the record that keeps restarts of this
        run from training on (``pipeline.pretrain.stops``)."""
        plan, step = self.plan, self.step + 1
        message = (
            f"{what} of run {plan.run_name}; last good checkpoint: "
            f"{self.last_good or 'none (the run diverged before its first checkpoint)'}. Resubmitting the same "
            "run.name resumes from it: lower optim.lr or raise optim.warmup_steps first"
        )
        if self.rank == 0:
            stops.record_stop(
                plan.run_dir, "diverged", message, step=step, cause=what, last_good_checkpoint=self.last_good
            )
        raise stops.LossNotFiniteError(message)

    def log_progress(self, loss: float) -> None:
        """Metrics of the window since the last progress line (data counts summed over ranks); rank 0 prints them
        and sends them to MLflow."""
        plan, step, window = self.plan, self.step, self.window
        stats = self.loader.stats()
        counts = torch.tensor([stats["bad_samples"], stats["samples"]], dtype=torch.float64, device=self.device)
        dist.all_reduce(counts)
        elapsed = time.perf_counter() - window.start
        images_per_s = window.steps * plan.global_batch / elapsed
        seconds_per_step = (time.perf_counter() - self.run_start) / (step - self.run_start_step)
        lr = self.step_lr
        grad_norm = self.engine.get_global_grad_norm()
        metrics = {
            "train/loss": loss,
            "train/lr": lr,
            "train/grad_norm": float(grad_norm) if grad_norm is not None else None,
            "perf/images_per_s": images_per_s,
            "perf/data_wait_fraction": window.data_wait_s / elapsed,
            "data/samples": float(counts[1]),
            "data/skipped_samples": float(counts[0]),
            "data/epoch": float(stats["epoch"]),
            "train/skipped_steps": float(self.skipped.count),
        }
        if self.peak_flops:
            mfu = model_flops_utilization(images_per_s, self.flops_per_image, self.peak_flops, self.world)
            metrics["perf/mfu"] = mfu
        if self.rank == 0:
            log.info(
                f"[{plan.run_name}] step {step}/{plan.total_steps} | loss {loss:.4f} | lr {lr:.2e} | "
                f"{images_per_s:,.0f} img/s | data wait {window.data_wait_s / elapsed:.0%} | "
                f"ETA {format_eta(seconds_per_step * (plan.stop_step - step))}"
            )
            if self.metric_logger:
                self.metric_logger.log_metrics(metrics, step)
        self.window = Window()

    def evaluate(self) -> None:
        """Held-out and few-shot metrics at evaluation steps (``pipeline.pretrain.evaluation``, collective); the
        time it takes is kept out of the throughput window."""
        from pipeline.pretrain.evaluation import Evaluator

        if self.cfg.eval.every_steps == 0:
            return
        if self.evaluator is None:
            self.evaluator = Evaluator(
                self.cfg,
                self.plan,
                engine=self.engine,
                loss_fn=self.loss_fn,
                rank=self.rank,
                world=self.world,
                device=self.device,
                dtype=self.dtype,
                metric_logger=self.metric_logger,
            )
        self.window.start += self.evaluator.maybe_evaluate(self.step)

    # -- checkpoint and export -----------------------------------------------------------------------------

    def maybe_checkpoint(self) -> None:
        if self.step % self.cfg.checkpoint.every_steps == 0 or self.step == self.plan.stop_step:
            self.save_checkpoint()
            if self.rank == 0:
                log.info(f"[{self.plan.run_name}] checkpoint {self.last_good}")

    def save_checkpoint(self) -> None:
        rank_state = {
            "step": self.step,
            "digest": self.digest,
            "loader": self.loader.state_dict(),
            "rng": ckpt.capture_rng(),
        }
        url = storage.join(self.plan.checkpoint_dir, ckpt.step_dir_name(self.step))
        try:
            with stops.storage_access("saving checkpoint", url):
                self.last_good = ckpt.save(
                    self.engine,
                    self.plan.checkpoint_dir,
                    self.step,
                    rank=self.rank,
                    rank_state=rank_state,
                    info=self.info,
                    keep_last=self.cfg.checkpoint.keep_last,
                )
        except ckpt.WeightsNotFiniteError as exc:
            self.stop_diverged(str(exc).removesuffix(": not saved"))

    def export(self) -> str | None:
        """Save the consolidated fp32 model (rank 0 writes it; every rank takes part in gathering the weights).
        Returns its URL on rank 0, None on the others."""
        import model as vit_model
        from pipeline.export import save_exported_model

        cfg, plan = self.cfg, self.plan
        if self.last_good is None or not self.last_good.endswith(ckpt.step_dir_name(self.step)):
            self.save_checkpoint()  # resumed at the very end: make sure the final state is on storage
        state = ckpt.consolidated_state_dict(self.engine, rank=self.rank)
        export_uri = None
        if self.rank == 0:
            final = vit_model.create_vit(cfg.model.variant, **self.model_kwargs)
            final.load_state_dict(state)
            metadata = {
                "run_name": plan.run_name,
                "step": self.step,
                "mlflow_run_id": self.mlflow_run_id,
                "checkpoint": self.last_good,
                "preset": cfg.preset,
                "loss": cfg.train.loss,
                "class_names": plan.class_names,
            }
            export_uri = save_exported_model(final, plan.export_dir, metadata=metadata)
            log.info(f"[{plan.run_name}] exported the fp32 model to {export_uri}")
            if self.metric_logger:
                self.metric_logger.set_tags({tracking.EXPORT_TAG: export_uri})
                self.metric_logger.log_text(json.dumps({"export_uri": export_uri, **metadata}, indent=2), "export.json")
        dist.barrier()
        return export_uri

    def report(self, exported: bool, export_uri: str | None, *, preempted: bool = False) -> None:
        """Close the MLflow logger and hand the launcher this attempt's results (``launch.WorkerContext.report``)."""
        plan, step = self.plan, self.step
        delivery = self.metric_logger.close(self.cfg.tracking.flush_timeout_s) if self.metric_logger else None
        wall_s = time.perf_counter() - self.run_start
        result = {
            "step": step,
            "steps_this_attempt": step - self.run_start_step,
            "exported": exported,
            "preempted": preempted,
            "export_uri": export_uri,
            **self.losses.summary(),
            "digest": self.digest,
            "images_per_s": (step - self.run_start_step) * plan.global_batch / max(1e-9, wall_s),
            "wall_s": wall_s,
            "setup_s": self.run_start - self.worker_start,
            "modes": self.modes,
            "mlflow_undelivered": delivery.undelivered if delivery else 0,
            "skipped_steps": self.skipped.count,
        }
        if self.rank == 0 and delivery and delivery.undelivered:
            log.info(f"[{plan.run_name}] {delivery}")
        pointer = None
        if self.rank == 0:
            pointer = {"run_dir": plan.run_dir, "checkpoint": self.last_good, "export_uri": export_uri, "step": step}
        self.context.report(result, pointer)


def train_worker(payload: dict[str, Any]) -> None:
    """The Ray Train per-worker function: one DeepSpeed rank from resume to export."""
    cfg, plan = PretrainConfig.model_validate(payload["config"]), RunLayout(**payload["plan"])
    with stops.stopping_on_bad_data(plan.run_dir, plan.run_name):  # fail once, not at every Ray restart
        Trainer(cfg, plan, payload.get("mlflow_run_id"), RayWorkerContext.current()).train()
