"""One fine-tuning run, as the paper's Table 4: a ``RunSpec`` in, minival / test (and ReaL) accuracies out.

``RunSpec`` is everything one run (fine-tuning or few-shot) needs, frozen and small enough to ship to a Ray
task; ``run_finetune`` trains a new zero-initialised head on the pretrained ViT with SGD, warmup + cosine and
gradient clipping, and evaluates it with ``predict``. It is a plain function: it runs in-process as well as
inside a Ray task (``pipeline.transfer.orchestrate``). ``real_accuracy`` scores ImageNet against the ReaL labels.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from pipeline import storage
from pipeline.schedules import warmup_cosine
from pipeline.transfer import tasks
from pipeline.transfer.source import PretrainedSource, build_model

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunSpec:
    kind: Literal["finetune", "fewshot"]
    benchmark: str
    num_classes: int
    recipe: tasks.Recipe
    init: Literal["pretrained", "scratch"]
    source: PretrainedSource
    urls: dict[str, str]  # train / minival / test manifests, and real_labels when the benchmark has them
    lr: float = 0.0
    seed: int = 0
    # "select": trained on train, evaluated on minival (to choose the learning rate) and test. "final": the chosen
    # learning rate trained again on train + minival, evaluated on test (recipe.refit, the paper's protocol).
    stage: Literal["select", "final"] = "select"
    shots: tuple[int, ...] = ()
    fewshot_seeds: int = 3
    num_gpus: float = 0.0
    loader_workers: int = 0
    tracking_uri: str | None = None
    run_id: str | None = None  # the MLflow child run this run logs to

    @property
    def name(self) -> str:
        if self.kind == "fewshot":
            return f"{self.benchmark} fewshot [{self.init}]"
        final = " final" if self.stage == "final" else ""
        return f"{self.benchmark} lr={self.lr:g} seed={self.seed}{final} [{self.init}]"

    def params(self) -> dict[str, Any]:
        recipe = self.recipe.model_dump(mode="json")
        out: dict[str, Any] = {"benchmark": self.benchmark, "init": self.init, "kind": self.kind}
        out["pretrained_uri"] = self.source.uri
        out["num_classes"] = self.num_classes
        if self.kind == "finetune":
            out |= {"lr": self.lr, "seed": self.seed, "stage": self.stage}
            out |= {k: v for k, v in recipe.items() if k != "lrs"}
        else:
            out |= {"shots": ",".join(map(str, self.shots)), "fewshot_seeds": self.fewshot_seeds}
        return out


def device_for(num_gpus: float) -> torch.device:
    """The device a run computes on: a GPU when it asked for one and one is visible, else the CPU."""
    return torch.device("cuda") if num_gpus > 0 and torch.cuda.is_available() else torch.device("cpu")


@torch.no_grad()
def predict(
    vit: torch.nn.Module,
    url: str,
    *,
    image_size: int,
    batch_size: int,
    device: torch.device,
    crop_fraction: float | None = None,
):
    """Predicted classes and labels of one full pass over a split (the recipe's eval transform), and how many of
    its samples were unreadable and left out (the loader skips and counts them)."""
    from pipeline.data import build_eval_loader, normalize

    vit.eval()
    preds, labels = [], []
    loader = build_eval_loader(url, image_size=image_size, batch_size=batch_size, crop_fraction=crop_fraction)
    for images, targets in loader:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = vit(normalize(images.to(device, non_blocking=True)))
        preds.append(logits.argmax(dim=1).cpu())
        labels.append(targets)
    if not preds:
        raise ValueError(f"{url}: the split holds no readable images")
    return torch.cat(preds).numpy(), torch.cat(labels).numpy(), sum(loader.bad_by_shard.values())


def real_accuracy(predictions: np.ndarray, real_labels: list[list[int]]) -> float:
    """ImageNet ReaL accuracy: a prediction is right when it is among the image's valid labels; images without any
    valid label are left out (Beyer et al. 2020)."""
    if len(real_labels) != len(predictions):
        raise ValueError(
            f"ReaL labels list {len(real_labels)} images but the test split has {len(predictions)}: the labels must "
            "be in test-split order, one list per image"
        )
    scored = [(int(p) in set(valid)) for p, valid in zip(predictions, real_labels, strict=True) if valid]
    if not scored:
        raise ValueError("no test image has a ReaL label")
    return float(np.mean(scored))


MetricSink = Callable[[dict[str, float], int], None]


def train_step(
    vit: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    *,
    accumulation: int,
    grad_clip: float,
    device: torch.device,
) -> tuple[float, float]:
    """One optimizer step over ``accumulation`` micro-batches of (uint8 images, labels); returns the loss and the
    gradient norm before clipping. Each micro-batch's mean loss is divided by their number, so the accumulated
    gradient is the mean over the whole batch: the same update as one pass over it (a ViT has no batch statistics).
    """
    from pipeline.data import normalize

    loss_sum = 0.0
    for _ in range(accumulation):
        images, labels = next(batches)
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = vit(normalize(images))
        loss = F.cross_entropy(logits.float(), labels) / accumulation
        loss.backward()
        loss_sum += float(loss.detach())
    grad_norm = torch.nn.utils.clip_grad_norm_(vit.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, float(grad_norm)


def run_finetune(spec: RunSpec, log_metrics: MetricSink | None = None) -> dict[str, float]:
    """Fine-tune as the paper's Table 4 and return the final minival/test (and ReaL) accuracy.

    New zero-initialised head, representation layer dropped, position embeddings resampled to the recipe's
    resolution; SGD with momentum, no weight decay, global-norm clipping, warmup + cosine; micro-batches
    accumulate to the recipe's batch.
    """
    from pipeline.data import DataConfig, build_train_loader
    from pipeline.data.config import join_sources

    sink = log_metrics or (lambda metrics, step: None)
    recipe = spec.recipe
    device = device_for(spec.num_gpus)
    torch.manual_seed(spec.seed)
    vit = build_model(spec.source, spec.init, seed=spec.seed)
    vit.drop_representation()
    vit.reset_head(spec.num_classes, zero_init=True)
    vit.set_img_size(recipe.resolution)
    # Planned by the sweep (pipeline.transfer.sweep.fit_memory) where the micro-batch would not fit without it.
    vit.set_grad_checkpointing(bool(recipe.grad_checkpointing))
    vit.to(device)

    # Built after the head and position-embedding changes: those replace parameters.
    optimizer = torch.optim.SGD(vit.parameters(), lr=0.0, momentum=recipe.momentum, weight_decay=recipe.weight_decay)
    micro = recipe.micro_batch_size or recipe.batch_size
    refit = spec.stage == "final"  # trains on train + minival, so it is evaluated on test only
    data = DataConfig(
        train=join_sources([spec.urls["train"], spec.urls["minival"]]) if refit else spec.urls["train"],
        image_size=recipe.resolution,
        workers=spec.loader_workers,
        crop_scale=recipe.crop_scale,
        flip=recipe.flip,
        seed=spec.seed,
        shuffle_buffer=1000,
    )
    batches = iter(build_train_loader(data, batch_size=micro, rank=0, world_size=1))
    eval_batch = min(256, max(micro, 64))
    real = storage.read_json(spec.urls["real_labels"]) if "real_labels" in spec.urls else None

    def evaluate(step: int) -> dict[str, float]:
        out = {}
        for split in ("test",) if refit else ("minival", "test"):
            preds, labels, bad = predict(
                vit,
                spec.urls[split],
                image_size=recipe.resolution,
                batch_size=eval_batch,
                device=device,
                crop_fraction=recipe.eval_crop_fraction,
            )
            out[f"{split}_accuracy"] = float((preds == labels).mean())
            if bad:
                # The accuracy is over the readable images only: say so next to it rather than fail 20k steps late.
                out[f"{split}_bad_samples"] = float(bad)
                log.warning("%s: %d unreadable %s images left out of its accuracy", spec.name, bad, split)
            if split == "test" and real is not None:
                if bad:  # ReaL labels are matched by position: with images missing they would be misaligned
                    log.warning("%s: no ReaL accuracy, %d test images were unreadable", spec.name, bad)
                else:
                    out["real_accuracy"] = real_accuracy(preds, real)
        sink(out, step)
        vit.train()
        return out

    log_every = max(1, recipe.steps // 20)
    eval_every = recipe.eval_every or recipe.steps
    start = time.perf_counter()
    final: dict[str, float] = {}
    running_loss = 0.0
    vit.train()
    for step in range(recipe.steps):
        lr = warmup_cosine(step, peak_lr=spec.lr, warmup_steps=recipe.warmup_steps, total_steps=recipe.steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum, grad_norm = train_step(
            vit, optimizer, batches, accumulation=recipe.accumulation, grad_clip=recipe.grad_clip, device=device
        )
        if not math.isfinite(loss_sum):
            raise FloatingPointError(f"{spec.name}: loss became {loss_sum} at step {step + 1}; lower the learning rate")
        running_loss += loss_sum
        done = step + 1
        if done % log_every == 0:
            sink({"train_loss": running_loss / log_every, "lr": lr, "grad_norm": float(grad_norm)}, done)
            running_loss = 0.0
        if done % eval_every == 0 or done == recipe.steps:
            final = evaluate(done)
    final["seconds"] = time.perf_counter() - start
    sink({"seconds": final["seconds"]}, recipe.steps)
    return final
