"""Evaluation during pretraining: held-out loss and top-1, and few-shot linear probes, every ``eval.every_steps``.

What the Trainer calls: ``Evaluator.maybe_evaluate(step)`` after each step (and once after resuming). At an
evaluation step (``is_due``) every rank takes part:

- held-out (``data.eval``): loss (the training loss, summed over images) and top-1, or multi-label precision@1 when
  the run trains with the sigmoid loss (the top-scoring class is one of the image's labels);
- few-shot (``eval.fewshot``): k shots per class from the benchmark's train split, the ridge regulariser chosen on
  minival, accuracy on test (``pipeline.linear_probe``, the protocol of ``jobs/transfer.py --fewshot``), on the
  pre-logits features of the model being trained (read at the head's input).

Sharding: rank r reads its own disjoint, deterministic part of every split (``pipeline.data.build_eval_loader``);
sums are all-reduced, few-shot features all-gathered in rank order. The parts differ by a few images, so ranks go
through their batches in lock step (``lockstep``): under ZeRO-3 every forward is a collective, and a rank that ran
out runs a one-image forward whose result it drops. Nothing draws from the training RNG (the data loader would), so
evaluating changes no training step, and the same weights give the same numbers.

Once per step: rank 0 writes ``<run_dir>/eval/step_<N>.json`` (the metrics) after logging them to MLflow, and an
evaluation step that has this record is not evaluated again, e.g. when a killed run resumes from an earlier
checkpoint and trains through that step a second time.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from pipeline import linear_probe, storage
from pipeline.config import ConfigError, PretrainConfig, RunLayout
from pipeline.config.evaluation import FewShotSet

log = logging.getLogger(__name__)

EVAL_DIR = "eval"
SPLITS = ("train", "minival", "test")


def is_due(step: int, every_steps: int, total_steps: int) -> bool:
    """Whether ``step`` is an evaluation step: every ``every_steps`` and at the last step (0: never)."""
    return every_steps > 0 and step > 0 and (step % every_steps == 0 or step == total_steps)


def eval_record_url(run_dir: str, step: int) -> str:
    return storage.join(run_dir, EVAL_DIR, f"step_{step:08d}.json")


def precision_at_1(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """1.0 per image whose top-scoring class is one of its labels, else 0.0. ``labels``: class ids [B] (then
    this is top-1 accuracy) or multi-hot [B, K] (multi-label data, as JFT's)."""
    top = logits.argmax(dim=-1)
    if labels.ndim == 2:
        return (labels.gather(1, top[:, None]).squeeze(1) > 0).double()
    return (top == labels).double()


def lockstep(batches: Iterable[Any], device: torch.device) -> Iterator[Any | None]:
    """This rank's batches, then None until every rank has run out (see the module docstring)."""
    it = iter(batches)
    while True:
        batch = next(it, None)
        more = torch.tensor([0.0 if batch is None else 1.0], device=device)
        dist.all_reduce(more, op=dist.ReduceOp.MAX)
        if not more.item():
            return
        yield batch


def features_and_logits(
    engine: Any, images: torch.Tensor, *, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-logits features [B, D] (the head's input) and logits [B, K] of uint8 images, in one forward pass."""
    from pipeline.data import normalize

    seen: list[torch.Tensor] = []
    hook = engine.module.head.register_forward_pre_hook(lambda _module, args: seen.append(args[0]))
    try:
        logits = engine(normalize(images.to(device), dtype=dtype))
    finally:
        hook.remove()
    return seen[0].float(), logits.float()


def gather_in_rank_order(local: Any) -> list[Any]:
    """Every rank's ``local`` object, in rank order (the same list on every rank)."""
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    return gathered


class Evaluator:
    """The evaluation of one pretraining rank. ``maybe_evaluate`` is collective: every rank calls it at every step."""

    def __init__(
        self,
        cfg: PretrainConfig,
        plan: RunLayout,
        *,
        engine: Any,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        rank: int,
        world: int,
        device: torch.device,
        dtype: torch.dtype,
        metric_logger: Any | None,
    ) -> None:
        self.cfg, self.plan, self.engine, self.loss_fn = cfg, plan, engine, loss_fn
        self.rank, self.world, self.device, self.dtype = rank, world, device, dtype
        self.metric_logger = metric_logger
        self.batch_size = cfg.eval.batch_size or cfg.train.micro_batch
        self.sets = [FewShotSet.from_dict(d) for d in plan.fewshot_sets]
        self._train_labels: dict[str, Any] = {}  # per benchmark: its train split's keys and labels, read once

    def maybe_evaluate(self, step: int) -> float:
        """Evaluate when ``step`` is an evaluation step that has no record yet; returns the seconds it took."""
        if not is_due(step, self.cfg.eval.every_steps, self.plan.total_steps):
            return 0.0
        url = eval_record_url(self.plan.run_dir, step)
        done = torch.tensor([1.0 if self.rank == 0 and storage.exists(url) else 0.0], device=self.device)
        dist.broadcast(done, src=0)  # one decision for all ranks: they must all evaluate, or none
        if done.item():
            return 0.0
        start = time.perf_counter()
        metrics = self.evaluate()
        seconds = time.perf_counter() - start
        metrics["eval/seconds"] = seconds
        if self.rank == 0:
            shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "eval/seconds")
            log.info(f"[{self.plan.run_name}] eval at step {step} ({seconds:.1f} s): {shown}")
            if self.metric_logger:
                self.metric_logger.log_metrics(metrics, step)
            storage.write_json(url, {"step": step, "metrics": metrics})
        return seconds

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Every metric of one evaluation (collective). The model is in eval mode meanwhile (no dropout), and the
        training RNG is left as it was."""
        self.engine.eval()
        try:
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                metrics = self.held_out() if self.cfg.data.eval else {}
                for fewshot_set in self.sets:
                    metrics.update(self.fewshot(fewshot_set))
        finally:
            self.engine.train()
        return metrics

    # -- held-out loss and top-1 ---------------------------------------------------------------------------

    def held_out(self) -> dict[str, float]:
        assert self.cfg.data.eval is not None
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss, correct, images
        for images, labels in self._pass(self.cfg.data.eval, crop_fraction=None, default_crop=True):
            _, logits = self._forward(images)
            if labels is None:
                continue
            labels = labels.to(self.device)
            sums[0] += self.loss_fn(logits, labels).double() * len(labels)  # the loss is a mean over images
            sums[1] += precision_at_1(logits, labels).sum()
            sums[2] += len(labels)
        dist.all_reduce(sums)
        loss, correct, count = sums.tolist()
        if count == 0:
            raise RuntimeError(f"data.eval {self.cfg.data.eval} yielded no readable image to evaluate")
        top1 = "eval/prec@1" if self.cfg.train.loss == "sigmoid" else "eval/top1"
        return {"eval/loss": loss / count, top1: correct / count, "eval/images": count}

    # -- few-shot linear probes ----------------------------------------------------------------------------

    def fewshot(self, fewshot_set: FewShotSet) -> dict[str, float]:
        from pipeline.data import read_labels

        name, shots, seeds = fewshot_set.name, self.cfg.eval.shots, self.cfg.eval.seeds
        if name not in self._train_labels:
            self._train_labels[name] = read_labels(fewshot_set.train)
        split = self._train_labels[name]
        if len(set(split.keys)) == len(split.keys):

            def extract(keys: list[str]) -> dict[str, np.ndarray]:
                return self._features_of(fewshot_set, split, keys)

            train, draws = linear_probe.drawn_features(
                split.keys, split.labels, shots=shots, num_classes=fewshot_set.num_classes, seeds=seeds, extract=extract
            )
        else:  # keys repeat across shards: samples are told apart by position only, so embed the whole split
            train, draws = self._split_features(fewshot_set, fewshot_set.train), None
        minival = self._split_features(fewshot_set, fewshot_set.minival)
        test = self._split_features(fewshot_set, fewshot_set.test)
        result = linear_probe.fewshot_eval(
            train, test, val=minival, num_classes=fewshot_set.num_classes, shots=shots, seeds=seeds, draws=draws
        )
        return {f"fewshot/{name}/{k}shot": result.mean(k) for k in result.accuracies}

    def _features_of(self, fewshot_set: FewShotSet, split: Any, keys: list[str]) -> dict[str, np.ndarray]:
        """Features of these train keys, each rank embedding its part; every rank gets all of them."""
        from pipeline.data.config import join_sources

        wanted = set(keys)
        shards = list(dict.fromkeys(s for k, s in zip(split.keys, split.shards, strict=True) if k in wanted))
        local: dict[str, np.ndarray] = {}
        for batch in self._pass(join_sources(shards), crop_fraction=fewshot_set.crop_fraction, only_keys=keys):
            features, _ = self._forward(batch.images if batch is not None else None)
            if batch is not None:
                local.update(zip(batch.keys, features.cpu().numpy(), strict=True))
        merged: dict[str, np.ndarray] = {}
        for part in gather_in_rank_order(local):
            merged.update(part)
        return merged

    def _split_features(self, fewshot_set: FewShotSet, url: str) -> tuple[np.ndarray, np.ndarray]:
        features, labels = [], []
        for images, targets in self._pass(url, crop_fraction=fewshot_set.crop_fraction):
            x, _ = self._forward(images)
            if targets is not None:
                features.append(x.cpu().numpy())
                labels.append(targets.numpy())
        parts = gather_in_rank_order((features, labels))
        x = [f for rank_features, _ in parts for f in rank_features]
        y = [t for _, rank_labels in parts for t in rank_labels]
        if not x:
            raise RuntimeError(f"few-shot benchmark {fewshot_set.name}: {url} yielded no readable image")
        return np.concatenate(x), np.concatenate(y).astype(np.int64)

    # -- reading and running -------------------------------------------------------------------------------

    def _pass(
        self,
        url: str,
        *,
        crop_fraction: float | None,
        default_crop: bool = False,
        only_keys: list[str] | None = None,
    ) -> Iterator[Any]:
        """This rank's part of ``url`` in lock step with the other ranks: (images, labels), or the batches when
        ``only_keys`` is given; (None, None) / None once this rank's part is done and others' are not."""
        from pipeline.data import build_eval_loader

        extra = {} if default_crop else {"crop_fraction": crop_fraction}
        loader = build_eval_loader(
            url,
            image_size=self.cfg.data.image_size,
            batch_size=self.batch_size,
            rank=self.rank,
            world_size=self.world,
            workers=self.cfg.data.workers,
            only_keys=only_keys,
            **extra,
        )
        source = loader.batches() if only_keys is not None else iter(loader)
        for item in lockstep(source, self.device):
            if only_keys is not None:
                yield item
            else:
                yield item if item is not None else (None, None)

    def _forward(self, images: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if images is None:  # this rank is done; the others still run forwards (collectives under ZeRO-3)
            size = self.cfg.data.image_size
            images = torch.zeros((1, 3, size, size), dtype=torch.uint8)
        return features_and_logits(self.engine, images, device=self.device, dtype=self.dtype)


# ---------------------------------------------------------------------------------------------------------
# pre-flight: what the evaluation will read, and what it costs


def check_evaluation(cfg: PretrainConfig, plan: RunLayout) -> str | None:
    """Check the few-shot benchmarks' splits (present, enough examples per class for the shots) and describe the
    evaluation with its cost as a fraction of training compute; None when the run does not evaluate. Raises
    ConfigError naming the field."""
    import model as vit_model
    from pipeline.data import DataError
    from pipeline.data.shardsets import resolve

    every = cfg.eval.every_steps
    if not every:
        return None
    problems = []
    images: float | None = 0.0
    parts = []
    if cfg.data.eval:
        _, manifest = resolve(cfg.data.eval)  # check_data has checked that it exists
        held_out = manifest["num_samples"] if manifest else None
        images = None if held_out is None else images + held_out
        parts.append(f"data.eval {held_out if held_out is not None else '? (no manifest)'} images")
    for fewshot_set in (FewShotSet.from_dict(d) for d in plan.fewshot_sets):
        sizes = {}
        for split in SPLITS:
            url = getattr(fewshot_set, split)
            try:
                _, manifest = resolve(url)
            except (DataError, storage.StorageError, FileNotFoundError) as exc:
                problems.append(
                    f"eval.fewshot: {fewshot_set.name}'s {split} split cannot be read ({exc}); write it with "
                    "jobs/prepare_data.py (see jobs/transfer.py --help), set eval.data_root, or drop the benchmark"
                )
                continue
            sizes[split] = manifest["num_samples"] if manifest else None
            counts = manifest.get("class_counts") if manifest and split == "train" else None
            if counts and min(counts) < max(cfg.eval.shots):
                problems.append(
                    f"eval.shots={cfg.eval.shots}: {fewshot_set.name}'s train split has only {min(counts)} images of "
                    f"its smallest class: lower eval.shots to at most {min(counts)}"
                )
        if len(sizes) == len(SPLITS):
            drawn = max(cfg.eval.shots) * fewshot_set.num_classes * cfg.eval.seeds
            if None in sizes.values() or images is None:
                images = None
            else:
                images += min(drawn, sizes["train"]) + sizes["minival"] + sizes["test"]
            parts.append(f"{fewshot_set.name} few-shot {'+'.join(str(sizes[s]) for s in SPLITS[1:])} + shots")
    if problems:
        raise ConfigError(problems)
    shape = {"num_classes": plan.num_classes, "pool": cfg.model.pool, "representation_size": plan.representation_size}
    forward = vit_model.flops(cfg.model.variant, cfg.data.image_size, **shape)
    train = vit_model.train_flops_per_image(cfg.model.variant, cfg.data.image_size, **shape)
    evaluations = math.ceil(plan.total_steps / every)
    what = f"eval every {every} steps ({evaluations} in all): {', '.join(parts)}"
    if images is None:
        return f"{what}; cost unknown (a split without a manifest has no known size)"
    per_eval_steps = images * forward / (plan.global_batch * train)
    return (
        f"{what}: {images:,.0f} images per evaluation = {per_eval_steps:.2f} training steps of compute, "
        f"{per_eval_steps / every:.1%} of step time (from model FLOPs: forward only, vs forward + backward)"
    )
