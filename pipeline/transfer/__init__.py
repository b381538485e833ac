"""Transfer a pretrained ViT to downstream benchmarks: one fine-tuning run per benchmark x learning rate (x seed),
plus few-shot linear evaluation, fanned out as Ray tasks and recorded in MLflow.

The flow of ``run_sweep`` (what ``jobs/transfer.py`` runs), every check before any Ray work:

1. ``plan_sweep``: resolve the benchmark names (registry), apply recipe overrides (typed, validated), check that
   every split's manifest exists with the registry's number of classes, and resolve the pretrained model (an
   MLflow run id -> its ``export_uri`` tag; an export directory; or an official ``.npz`` with ``variant``).
2. Connect to Ray and check that the cluster has the CPUs/GPUs one run asks for.
3. MLflow: a parent run per sweep (plus one for the from-scratch baseline with ``scratch=True``), and one child
   run per task, created up front so that a task whose worker dies can still be marked FAILED.
4. Submit every task with its own resource request; collect them with ``ray.wait`` as they finish. A task that
   raises, or whose worker dies, marks its child FAILED (with the error as a tag); its siblings carry on.
5. Choose the best learning rate per benchmark on minival (mean over seeds), report its test accuracy (mean and
   std over seeds) on the parent run, with few-shot accuracies, and the VTAB score when all 19 tasks ran.

``finetune`` and ``fewshot`` are plain functions: they run in-process as well as inside a Ray task.
"""

from __future__ import annotations

import logging
import math
import os
import re
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pydantic
import torch
import torch.nn.functional as F

import model as vit_model
from pipeline import compare as schema
from pipeline import storage
from pipeline.config import ConfigError
from pipeline.transfer import tasks as bench

if TYPE_CHECKING:
    from pipeline.config.transfer import TransferConfig

log = logging.getLogger("pipeline.transfer")

# pipeline.config.transfer imports this package's tasks module, so it is imported lazily here (no import cycle).
_CONFIG_NAMES = {"TransferConfig", "build_config", "apply_sets", "parse_value", "local_data_root"}


def __getattr__(name: str) -> Any:
    if name in _CONFIG_NAMES:
        from pipeline.config import transfer as config

        return getattr(config, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


MLFLOW_RUN_ID = re.compile(r"^(runs:/)?([0-9a-f]{32})/?$")
EXPORT_URI_TAG = "export_uri"  # set on the pretraining run by jobs/pretrain.py
ERROR_TAG = "error"
MAX_TAG_CHARS = 5000  # MLflow keeps tag values up to 8000 characters


# --------------------------------------------------------------------------------------------------------------
# The pretrained model


@dataclass(frozen=True)
class ModelSource:
    """Where the pretrained weights come from and the architecture they fit."""

    kind: Literal["export", "npz"]
    uri: str
    spec: dict[str, Any]  # variant, img_size, pool, representation_size
    label: str
    pretrain_run_id: str | None = None


def resolve_pretrained(cfg: TransferConfig) -> ModelSource:
    """``--pretrained`` as an MLflow run id (-> its export), an export directory, or an official .npz."""
    from pipeline.export import read_export_spec

    text = cfg.pretrained.strip()
    run_id = None
    run_label = None
    match = MLFLOW_RUN_ID.fullmatch(text)
    if match:
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        run_id = match.group(2)
        try:
            run = MlflowClient(cfg.tracking_uri).get_run(run_id)
        except MlflowException as exc:
            raise ConfigError(
                [f"pretrained: no MLflow run {run_id} at {cfg.tracking_uri} ({exc.message}); check --tracking-uri"]
            ) from None
        text = run.data.tags.get(EXPORT_URI_TAG, "")
        if not text:
            raise ConfigError(
                [
                    f"pretrained: MLflow run {run_id} has no {EXPORT_URI_TAG!r} tag: it is not a finished pretraining "
                    "run (the tag is set when jobs/pretrain.py exports the model); pass the export URL instead"
                ]
            )
        run_label = run.data.tags.get("model_label") or run.info.run_name
    try:
        url = storage.check_url(text, field="pretrained")
    except storage.UnsupportedURLError as exc:
        raise ConfigError([str(exc)]) from None

    if url.endswith(".npz"):
        if cfg.variant is None:
            raise ConfigError(
                [f"variant: an official checkpoint ({url}) does not name its architecture; pass --variant B/16"]
            )
        if not storage.exists(url):
            raise ConfigError([f"pretrained: {url} does not exist"])
        try:
            variant = vit_model.parse_variant(cfg.variant).name  # "ViT-B/16" -> "B/16"
        except ValueError as exc:
            raise ConfigError([f"variant: {exc}"]) from None
        # From the array headers only (a few small reads, even on gs://): a wrong --variant fails here, once,
        # instead of in every fine-tuning task after its download.
        try:
            with storage.open_read(url, small_reads=True) as file:
                arch = vit_model.check_npz_architecture(file, variant, pool=cfg.checkpoint_pool)
        except (vit_model.CheckpointMismatchError, ValueError) as exc:
            raise ConfigError([f"pretrained: {url}: {exc}"]) from None
        rep = cfg.checkpoint_representation_size
        if rep is not None and rep != arch.representation_size:
            has = f"a {arch.representation_size}-wide" if arch.representation_size else "no"
            raise ConfigError(
                [
                    f"checkpoint_representation_size={rep}: {url} has {has} pre-logits layer; leave the field unset "
                    "to take it from the file"
                ]
            )
        spec = {
            "variant": variant,
            "img_size": cfg.checkpoint_img_size or arch.img_size or 224,
            "pool": arch.pool,
            "representation_size": arch.representation_size,
        }
        label = cfg.model_label or f"ViT-{variant} ({url.rsplit('/', 1)[-1]})"
        return ModelSource("npz", url, spec, label, run_id)

    try:
        info = read_export_spec(url)
    except FileNotFoundError as exc:
        raise ConfigError([f"pretrained: {exc}"]) from None
    spec = {k: info["spec"].get(k) for k in ("variant", "img_size", "pool", "representation_size")}
    metadata = info.get("metadata", {})
    run_id = run_id or metadata.get("mlflow_run_id") or metadata.get("run_id")
    label = cfg.model_label or run_label or metadata.get("model_label") or metadata.get("run_name") or spec["variant"]
    return ModelSource("export", url, spec, str(label), run_id)


def build_model(source: ModelSource, init: str, *, seed: int) -> torch.nn.Module:
    """The pretrained ViT (as exported, with its representation layer), or the same architecture at random."""
    from pipeline.export import load_exported_model

    torch.manual_seed(seed)
    spec = source.spec
    if init == "scratch":
        return vit_model.create_vit(
            spec["variant"],
            num_classes=0,
            img_size=spec["img_size"],
            pool=spec["pool"],
            representation_size=spec["representation_size"],
        )
    if source.kind == "export":
        return load_exported_model(source.uri)
    vit = vit_model.create_vit(
        spec["variant"],
        num_classes=0,
        img_size=spec["img_size"],
        pool=spec["pool"],
        representation_size=spec["representation_size"],
    )
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "checkpoint.npz"
        storage.get_file(source.uri, local)
        vit_model.load_checkpoint(vit, local, drop_head=True)
    return vit


# --------------------------------------------------------------------------------------------------------------
# One run (fine-tuning or few-shot), runnable in-process or as a Ray task


@dataclass(frozen=True)
class RunSpec:
    kind: Literal["finetune", "fewshot"]
    benchmark: str
    num_classes: int
    recipe: bench.Recipe
    init: Literal["pretrained", "scratch"]
    source: ModelSource
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


def warmup_cosine(step: int, *, peak_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup, then cosine decay to 0."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * peak_lr * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _device(num_gpus: float) -> torch.device:
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


def finetune(spec: RunSpec, log_metrics: MetricSink | None = None) -> dict[str, float]:
    """Fine-tune as the paper's Table 4 and return the final minival/test (and ReaL) accuracy.

    New zero-initialised head, representation layer dropped, position embeddings resampled to the recipe's
    resolution; SGD with momentum, no weight decay, global-norm clipping, warmup + cosine; micro-batches
    accumulate to the recipe's batch.
    """
    from pipeline.data import DataConfig, build_train_loader, normalize
    from pipeline.data.config import join_sources

    sink = log_metrics or (lambda metrics, step: None)
    recipe = spec.recipe
    device = _device(spec.num_gpus)
    torch.manual_seed(spec.seed)
    vit = build_model(spec.source, spec.init, seed=spec.seed)
    vit.drop_representation()
    vit.reset_head(spec.num_classes, zero_init=True)
    vit.set_img_size(recipe.resolution)
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
        loss_sum = 0.0
        for _ in range(recipe.accumulation):
            images, labels = next(batches)
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = vit(normalize(images))
            loss = F.cross_entropy(logits.float(), labels) / recipe.accumulation
            loss.backward()
            loss_sum += float(loss.detach())
        grad_norm = torch.nn.utils.clip_grad_norm_(vit.parameters(), recipe.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
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


def fewshot(spec: RunSpec, log_metrics: MetricSink | None = None) -> dict[str, float]:
    """Few-shot linear accuracy on frozen pre-logits features (regulariser chosen on minival).

    Of the training split only the drawn examples are decoded and embedded (their keys and labels are read first):
    at most 25 shots x classes x seeds, however large the split (ImageNet: 75k of 1.28M images)."""
    from pipeline.data import DataError, build_eval_loader, read_labels
    from pipeline.data.config import join_sources
    from pipeline.transfer.fewshot import drawn_features, embed, extract_features, fewshot_eval, fewshot_metrics

    device = _device(spec.num_gpus)
    start = time.perf_counter()
    vit = build_model(spec.source, spec.init, seed=spec.seed).to(device).eval()
    size = vit.spec.img_size  # the features as pretrained: no resampling, no fine-tuning

    def loader(split: str, only_keys: list[str] | None = None, url: str | None = None):
        return build_eval_loader(
            url or spec.urls[split],
            image_size=size,
            batch_size=256,
            crop_fraction=spec.recipe.eval_crop_fraction,
            only_keys=only_keys,
        )

    def split_features(split: str) -> tuple[np.ndarray, np.ndarray]:
        batches = loader(split)
        try:
            return extract_features(vit, batches, device=device)
        except ValueError as exc:  # nothing readable: say which shards were bad
            raise DataError(f"{split} split {spec.urls[split]}: {exc} (bad samples: {batches.bad_by_shard})") from None

    def features_of(keys: list[str]) -> dict[str, np.ndarray]:
        # Only the shards holding these keys are read again (in stored order).
        wanted = set(keys)
        pairs = zip(train_split.keys, train_split.shards, strict=True)
        shards = list(dict.fromkeys(shard for key, shard in pairs if key in wanted))
        out = {}
        for batch in loader("train", only_keys=keys, url=join_sources(shards)).batches():
            out.update(zip(batch.keys, embed(vit, batch.images, device=device), strict=True))
        return out

    train_split = read_labels(spec.urls["train"])
    draws = None
    if len(set(train_split.keys)) == len(train_split.keys):
        try:
            train, draws = drawn_features(
                train_split.keys,
                train_split.labels,
                shots=spec.shots,
                num_classes=spec.num_classes,
                seeds=spec.fewshot_seeds,
                extract=features_of,
            )
        except ValueError as exc:
            raise DataError(
                f"train split {spec.urls['train']}: {exc} (bad samples: {train_split.bad_by_shard})"
            ) from None
    else:  # keys repeat across shards: samples can only be told apart by position, so embed them all
        train = split_features("train")
    result = fewshot_eval(
        train,
        split_features("test"),
        val=split_features("minival"),
        num_classes=spec.num_classes,
        shots=spec.shots,
        seeds=spec.fewshot_seeds,
        draws=draws,
    )
    metrics = fewshot_metrics(result)
    metrics["train_images_embedded"] = float(len(train[1]))
    metrics["seconds"] = time.perf_counter() - start
    (log_metrics or (lambda m, s: None))(metrics, 0)
    return metrics


def execute(spec: RunSpec) -> dict[str, float]:
    """Run one spec, streaming its metrics to its MLflow child run (if any). Used in-process and by Ray tasks."""
    from pipeline.tracking import MetricLogger

    logger = MetricLogger(spec.tracking_uri, spec.run_id) if spec.tracking_uri and spec.run_id else None
    try:
        run = finetune if spec.kind == "finetune" else fewshot
        return run(spec, logger.log_metrics if logger else None)
    finally:
        if logger is not None:
            logger.close(timeout_s=60)


def _ray_task(spec: RunSpec) -> dict[str, float]:
    # One thread per CPU the task asked for: on a shared box, more threads than CPUs only fight each other.
    torch.set_num_threads(max(1, int(spec.recipe.num_cpus)))
    return execute(spec)


# --------------------------------------------------------------------------------------------------------------
# Planning: everything checked before Ray or MLflow is touched


@dataclass
class BenchmarkPlan:
    benchmark: bench.Benchmark
    recipe: bench.Recipe
    urls: dict[str, str]


@dataclass
class SweepPlan:
    cfg: TransferConfig
    source: ModelSource
    benchmarks: list[BenchmarkPlan]
    inits: list[str]

    def _run(self, p: BenchmarkPlan, init: str, **fields: Any) -> RunSpec:
        cfg = self.cfg
        return RunSpec(
            benchmark=p.benchmark.name,
            num_classes=p.benchmark.num_classes,
            recipe=p.recipe,
            init=init,  # type: ignore[arg-type]
            source=self.source,
            urls=p.urls,
            num_gpus=p.recipe.num_gpus if cfg.num_gpus is None else cfg.num_gpus,
            loader_workers=cfg.loader_workers,
            tracking_uri=cfg.tracking_uri,
            **fields,
        )

    def benchmark(self, name: str) -> BenchmarkPlan:
        return next(p for p in self.benchmarks if p.benchmark.name == name)

    def specs(self) -> list[RunSpec]:
        """The runs that can start at once. A refit benchmark with several learning rates gets its final runs
        (`final_specs`) only when its selection runs are done; with one learning rate they are all it gets."""
        out = []
        for init in self.inits:
            for p in self.benchmarks:
                if self.cfg.fewshot:
                    out.append(
                        self._run(p, init, kind="fewshot", shots=self.cfg.fewshot, fewshot_seeds=self.cfg.fewshot_seeds)
                    )
                if not p.recipe.selects_lr:
                    out += self.final_specs(p.benchmark.name, init, p.recipe.lrs[0])
                    continue
                for lr in p.recipe.lrs:
                    for seed in range(p.recipe.seeds):
                        out.append(self._run(p, init, kind="finetune", lr=lr, seed=seed))
        return out

    def final_specs(self, benchmark: str, init: str, lr: float) -> list[RunSpec]:
        p = self.benchmark(benchmark)
        return [self._run(p, init, kind="finetune", lr=lr, seed=seed, stage="final") for seed in range(p.recipe.seeds)]

    def selection_runs(self, benchmark: str) -> int:
        """Selection runs per init (0 when there is only one learning rate to refit with)."""
        recipe = self.benchmark(benchmark).recipe
        return len(recipe.lrs) * recipe.seeds if recipe.selects_lr else 0


def choose_lr(outcomes: list[RunOutcome], lrs: Sequence[float]) -> float | None:
    """The learning rate with the best mean minival accuracy over its finished selection runs (ties: the first in
    the sweep's order); None when none finished. Test accuracy plays no part."""
    by_lr: dict[float, list[float]] = {}
    for o in outcomes:
        if o.status == "FINISHED" and o.spec.kind == "finetune" and o.spec.stage == "select":
            by_lr.setdefault(o.spec.lr, []).append(o.metrics["minival_accuracy"])
    tried = [lr for lr in lrs if lr in by_lr]
    return max(tried, key=lambda lr: statistics.mean(by_lr[lr])) if tried else None


def plan_sweep(cfg: TransferConfig) -> SweepPlan:
    """Validate benchmarks, recipes, data and the pretrained model; raise ConfigError listing every problem."""
    from pipeline.config.transfer import _messages, local_data_root

    try:
        chosen = bench.resolve(cfg.benchmarks)
    except ValueError as exc:
        raise ConfigError([f"benchmarks: {exc}"]) from None
    names = {b.name for b in chosen}
    problems = []
    # Per-benchmark overrides; an alias (e.g. vtab.steps=...) sets every member, a member's own setting wins.
    overrides: dict[str, dict[str, Any]] = {}
    for name in sorted(cfg.benchmark_recipes, key=lambda n: n in names):
        members = [m.name for m in bench.resolve([name])] if name in bench.ALIASES else [name]
        if not set(members) <= names:
            problems.append(
                f"benchmark_recipes.{name}: {name!r} is not among the benchmarks of this sweep "
                f"({', '.join(sorted(names))})"
            )
            continue
        for member in members:
            overrides.setdefault(member, {}).update(cfg.benchmark_recipes[name])
    try:
        source = resolve_pretrained(cfg)
    except ConfigError as exc:
        problems += exc.problems
        source = None
    plans: list[BenchmarkPlan] = []
    for b in chosen:
        changes = {**cfg.recipe, **overrides.get(b.name, {})}
        if source is not None and "resolution" not in changes:
            changes["resolution"] = bench.finetune_resolution(b, source.spec["variant"])
        try:
            recipe = bench.Recipe.model_validate({**b.recipe.model_dump(), **changes})
        except pydantic.ValidationError as exc:
            problems += [f"{b.name}: {m}" for m in _messages(exc, prefix="recipe.")]
            continue
        root = cfg.data_root or (local_data_root() if b.suite == "embedded" else None)
        if root is None:
            problems.append(
                f"data_root: benchmark {b.name!r} has no default data location; pass "
                "--set data_root=gs://<bucket>/<path> holding <benchmark>/{train,minival,test}.manifest.json"
            )
            continue
        urls = {split: b.split_url(root, split) for split in bench.SPLITS}
        data_problems = _check_benchmark_data(b, urls, root, min_per_class=max(cfg.fewshot, default=0))
        if recipe.refit and not data_problems:
            data_problems = _check_refit_data(b, urls)
        problems += data_problems
        if b.real_labels:
            real = b.real_labels_url(root)
            if storage.exists(real):  # optional: without it there is no ReaL row
                urls["real_labels"] = real
                problems += _check_real_labels(b, real, urls["test"])
        plans.append(BenchmarkPlan(b, recipe, urls))
    if source is not None:
        problems += _check_resolutions(source, plans)
    if problems:
        raise ConfigError(problems)
    inits = ["pretrained", "scratch"] if cfg.scratch else ["pretrained"]
    return SweepPlan(cfg=cfg, source=source, benchmarks=plans, inits=inits)  # type: ignore[arg-type]


def _check_benchmark_data(b: bench.Benchmark, urls: dict[str, str], root: str, *, min_per_class: int) -> list[str]:
    from pipeline.data import DataError, read_manifest

    problems = []
    for split, url in urls.items():
        try:
            manifest = read_manifest(url)
        except (DataError, storage.StorageError, OSError) as exc:
            fix = "; ".join(b.prepare_commands(root)) or "write its shards with jobs/prepare_data.py"
            problems.append(
                f"benchmark {b.name!r}: split {split} is missing or unreadable at {url} ({exc}). Fix: {fix}"
            )
            continue
        if manifest["num_classes"] != b.num_classes:
            problems.append(
                f"benchmark {b.name!r}: {url} has {manifest['num_classes']} classes, the registry says "
                f"{b.num_classes}: point data_root at this benchmark's shards"
            )
        if split == "train" and min_per_class:
            counts = manifest.get("class_counts") or []
            if counts and min(counts) < min_per_class:
                problems.append(
                    f"fewshot: benchmark {b.name!r} has only {min(counts)} training images in its smallest class, "
                    f"fewer than {min_per_class} shots; lower the shot counts"
                )
            elif counts and max(counts) <= min_per_class:
                log.warning(
                    "fewshot: benchmark %r has at most %d training images per class: %d-shot draws all of them, "
                    "so its seeds do not differ (its std over seeds is 0 by construction)",
                    b.name,
                    max(counts),
                    min_per_class,
                )
    return problems


def _check_refit_data(b: bench.Benchmark, urls: dict[str, str]) -> list[str]:
    """Final runs read train and minival as one set, after every selection run: check now that they can."""
    from pipeline.data import DataConfig, DataError, check_data
    from pipeline.data.config import join_sources

    try:
        check_data(DataConfig(train=join_sources([urls["train"], urls["minival"]]), workers=0), world_size=1)
    except DataError as exc:
        return [f"benchmark {b.name!r}: its final runs train on train + minival, which cannot be read as one: {exc}"]
    return []


def _check_real_labels(b: bench.Benchmark, real_url: str, test_url: str) -> list[str]:
    """ReaL labels are matched to test images by position: a list of another length would fail every run at its
    first evaluation, after training."""
    from pipeline.data import DataError, read_manifest

    try:
        real = storage.read_json(real_url)
        expected = read_manifest(test_url).get("num_samples")
    except (DataError, storage.StorageError, OSError, ValueError) as exc:
        return [f"benchmark {b.name!r}: {real_url} is unreadable ({exc}); rewrite it or remove it (no ReaL row)"]
    if not isinstance(real, list) or not all(isinstance(labels, list) for labels in real):
        return [f"benchmark {b.name!r}: {real_url} must be a JSON list with one list of labels per test image"]
    if expected is not None and len(real) != expected:
        return [
            f"benchmark {b.name!r}: {real_url} lists {len(real)} images but the test split has {expected}; "
            "the labels must be in test-split order, one list per image"
        ]
    return []


def _check_resolutions(source: ModelSource, plans: list[BenchmarkPlan]) -> list[str]:
    patch = vit_model.parse_variant(source.spec["variant"]).patch_size
    return [
        f"{p.benchmark.name}: recipe.resolution={p.recipe.resolution} is not a multiple of the patch size {patch} of "
        f"{source.spec['variant']}; use e.g. {max(patch, p.recipe.resolution // patch * patch)}"
        for p in plans
        if p.recipe.resolution % patch
    ]


# --------------------------------------------------------------------------------------------------------------
# Summaries: from child results to the parent run's rows


@dataclass
class RunOutcome:
    spec: RunSpec
    status: Literal["FINISHED", "FAILED"]
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None


def _std(values: list[float]) -> float | None:
    # Sample std over seeds; none for one seed (a single run shows no spread).
    return statistics.stdev(values) if len(values) > 1 else None


def summarise(outcomes: list[RunOutcome], plan: SweepPlan, init: str) -> tuple[dict[str, float], dict[str, str]]:
    """Parent metrics and tags of one sweep (one init) from its children's outcomes."""
    metrics: dict[str, float] = {}
    tags: dict[str, str] = {}
    rows: list[str] = []
    test_acc: dict[str, float] = {}

    def put(row: str, mean: float | None, std: float | None, status: str) -> None:
        rows.append(row)
        tags[schema.status_tag(row)] = status
        if mean is not None:
            metrics[schema.value_key(row)] = mean
        if std is not None:
            metrics[schema.std_key(row)] = std

    for p in plan.benchmarks:
        name = p.benchmark.name
        mine = [o for o in outcomes if o.spec.benchmark == name and o.spec.init == init]
        tuned = [o for o in mine if o.spec.kind == "finetune"]
        selected = [o for o in tuned if o.status == "FINISHED" and o.spec.stage == "select"]
        by_lr: dict[float, list[RunOutcome]] = {}
        for o in selected:
            by_lr.setdefault(o.spec.lr, []).append(o)
        best_lr = choose_lr(selected, p.recipe.lrs)
        if p.recipe.refit:
            # The paper's protocol: the chosen learning rate retrained on train + minival; with a single learning
            # rate there was nothing to choose and only those runs exist.
            reported = [o for o in tuned if o.status == "FINISHED" and o.spec.stage == "final"]
            if not p.recipe.selects_lr:
                best_lr = p.recipe.lrs[0]
        else:
            reported = by_lr.get(best_lr, []) if best_lr is not None else []
        if reported:
            tests = [o.metrics["test_accuracy"] for o in reported]
            put(name, statistics.mean(tests), _std(tests), schema.STATUS_OK)
            test_acc[name] = statistics.mean(tests)
            metrics[f"{name}/seeds"] = len(reported)
            if best_lr is not None:
                metrics[f"{name}/best_lr"] = best_lr
            if best_lr in by_lr:
                metrics[f"{name}/minival_accuracy"] = statistics.mean(
                    o.metrics["minival_accuracy"] for o in by_lr[best_lr]
                )
            for lr, runs in by_lr.items():
                metrics[f"{name}/lr_{lr:g}/minival_accuracy"] = statistics.mean(
                    o.metrics["minival_accuracy"] for o in runs
                )
            if "real_labels" in p.urls:
                reals = [o.metrics["real_accuracy"] for o in reported if "real_accuracy" in o.metrics]
                if reals:
                    put(f"{name}_real", statistics.mean(reals), _std(reals), schema.STATUS_OK)
                else:
                    put(f"{name}_real", None, None, "unreadable test images")
        else:
            put(name, None, None, schema.STATUS_FAILED)
            errors = [o.error for o in tuned if o.error]
            if errors:
                tags[f"{ERROR_TAG}/{name}"] = errors[0][:MAX_TAG_CHARS]
            if "real_labels" in p.urls:
                put(f"{name}_real", None, None, schema.STATUS_FAILED)
        # The compare note ("N runs failed") counts the runs the number could have stood on: the final ones under
        # refit, else every selection run (any of them might have won). Refit selection failures are logged apart.
        counted = [o for o in tuned if o.spec.stage == "final"] if p.recipe.refit else tuned
        failed = sum(o.status == "FAILED" for o in counted)
        if failed:
            metrics[schema.failed_runs_key(name)] = failed
        if p.recipe.refit and (lost := sum(o.status == "FAILED" and o.spec.stage == "select" for o in tuned)):
            metrics[f"{name}/failed_selection_runs"] = lost
        for o in (o for o in mine if o.spec.kind == "fewshot"):
            for k in o.spec.shots:
                row = schema.fewshot_row(name, k)
                if o.status == "FINISHED":
                    put(row, o.metrics[f"fewshot_{k}shot"], o.metrics.get(f"fewshot_{k}shot_std"), schema.STATUS_OK)
                else:
                    put(row, None, None, schema.STATUS_FAILED)
            if o.error:
                tags[f"{ERROR_TAG}/{name}/fewshot"] = o.error[:MAX_TAG_CHARS]

    # The VTAB score needs all 19 tasks; a partial VTAB sweep gets no aggregate rows at all.
    vtab_names = {f"vtab/{t}" for t in bench.VTAB_TASKS}
    if vtab_names <= {p.benchmark.name for p in plan.benchmarks}:
        score, groups = bench.vtab_score(test_acc)
        status = schema.STATUS_OK if score is not None else "incomplete"
        put("vtab", score, None, status)
        for group, value in groups.items():
            put(f"vtab/{group}", value, None, schema.STATUS_OK if value is not None else "incomplete")
    tags[schema.ROWS_TAG] = ",".join(rows)
    return metrics, tags


# --------------------------------------------------------------------------------------------------------------
# The sweep: MLflow parent/child runs and the Ray fan-out


@dataclass
class SweepResult:
    run_id: str  # the parent run of the pretrained model's sweep
    scratch_run_id: str | None
    outcomes: list[RunOutcome]
    metrics: dict[str, dict[str, float]]  # init -> parent metrics

    @property
    def failed(self) -> list[RunOutcome]:
        return [o for o in self.outcomes if o.status == "FAILED"]


def _error_text(exc: BaseException) -> str:
    import ray.exceptions

    cause = exc.cause if isinstance(exc, ray.exceptions.RayTaskError) and exc.cause is not None else exc
    return f"{type(cause).__name__}: {cause}"


# How often a sweep whose runs all stay pending says so.
WAIT_REPORT_S = 600


def _joined_a_cluster(cfg: TransferConfig) -> bool:
    """True when the sweep runs on a Ray cluster that existed before it (a job, an address), not a local one."""
    from pipeline.pretrain import running_as_ray_job

    return bool(cfg.ray_address or os.environ.get("RAY_ADDRESS") or running_as_ray_job())


def _connect_ray(cfg: TransferConfig) -> None:
    # The same connection as pretraining: the job's cluster (RAY_ADDRESS), the given address, or a local Ray; outside
    # `ray job submit` the repository is shipped to the workers as their working dir.
    from pipeline.pretrain import connect_ray

    connect_ray(cfg.ray_address)


def check_resources(specs: list[RunSpec], *, can_grow: bool) -> None:
    """Runs that ask for more than the whole Ray cluster has would wait forever. A local Ray cannot grow, so that
    fails here; a cluster we joined may have an autoscaler (infra's GPU worker group starts at 0 replicas), so
    there it is only a warning."""
    import ray

    total = ray.cluster_resources()
    problems = set()
    for s in specs:
        if s.recipe.num_cpus > total.get("CPU", 0):
            problems.add(
                f"{s.benchmark}: a run asks for {s.recipe.num_cpus:g} CPUs but the Ray cluster has "
                f"{total.get('CPU', 0):g}; lower --set {s.benchmark}.num_cpus"
            )
        if s.num_gpus > total.get("GPU", 0):
            problems.add(
                f"{s.benchmark}: a run asks for {s.num_gpus:g} GPU(s) but the Ray cluster has {total.get('GPU', 0):g}; "
                "run on a GPU cluster or pass --set num_gpus=0 (CPU fine-tuning)"
            )
    if problems and not can_grow:
        raise ConfigError(sorted(problems))
    for problem in sorted(problems):
        log.warning("%s (for now: the runs wait until the cluster's autoscaler adds the resources)", problem)


def _parent_tags(plan: SweepPlan, init: str, label: str) -> dict[str, str]:
    src = plan.source
    return {
        schema.ROLE_TAG: schema.SWEEP_ROLE,
        schema.INIT_TAG: init,
        schema.MODEL_LABEL_TAG: label,
        schema.PRETRAINED_URI_TAG: src.uri,
        schema.PRETRAIN_RUN_TAG: src.pretrain_run_id or "",
        "variant": str(src.spec["variant"]),
        "benchmarks": ",".join(p.benchmark.name for p in plan.benchmarks),
    }


def run_sweep(
    cfg: TransferConfig | None = None, *, plan: SweepPlan | None = None, sets: Sequence[str] = (), **fields: Any
) -> SweepResult:
    """Fine-tune (and few-shot evaluate) one pretrained model on the configured benchmarks; returns the run ids.

    Either pass a TransferConfig or its fields as keywords (plus ``sets``, the ``--set key=value`` strings).
    """
    import ray
    from mlflow.tracking import MlflowClient

    from pipeline.config.transfer import build_config
    from pipeline.tracking import experiment_id_for

    if cfg is None:
        cfg = plan.cfg if plan is not None else build_config(fields, sets)
    plan = plan if plan is not None else plan_sweep(cfg)  # a caller that printed the plan passes it: checked once
    specs = plan.specs()
    _connect_ray(cfg)
    check_resources(specs, can_grow=_joined_a_cluster(cfg))

    client = MlflowClient(cfg.tracking_uri)
    exp_id = experiment_id_for(client, cfg.tracking_uri, cfg.experiment)
    parents: dict[str, str] = {}
    for init in plan.inits:
        label = plan.source.label if init == "pretrained" else f"{plan.source.label} (scratch)"
        run = client.create_run(exp_id, run_name=f"transfer {label}", tags=_parent_tags(plan, init, label))
        parents[init] = run.info.run_id
        client.log_param(run.info.run_id, "config", cfg.model_dump_json()[:6000])
    if "scratch" in parents:
        client.set_tag(parents["pretrained"], schema.SCRATCH_RUN_TAG, parents["scratch"])
        client.set_tag(parents["scratch"], schema.BASELINE_FOR_TAG, parents["pretrained"])

    outcomes: list[RunOutcome] = []
    remote = ray.remote(_ray_task)
    pending: dict[Any, RunSpec] = {}
    submitted: list[RunSpec] = []  # with their MLflow child run ids

    def submit(new: list[RunSpec]) -> None:
        created = [_create_child(client, exp_id, parents[s.init], s) for s in new]
        submitted.extend(created)
        for s in created:
            options = dict(num_cpus=s.recipe.num_cpus, num_gpus=s.num_gpus, max_retries=cfg.max_retries, name=s.name)
            pending[remote.options(**options).remote(s)] = s

    try:
        submit(specs)
        log.info("submitted %d transfer runs to Ray", len(pending))
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=WAIT_REPORT_S)
            if not done:  # e.g. runs waiting for GPUs a fixed-size cluster will never have: keep saying so
                log.warning(
                    "%d transfer runs pending, none finished in the last %d s; the cluster has %s",
                    len(pending),
                    WAIT_REPORT_S,
                    ray.available_resources(),
                )
                continue
            spec = pending.pop(done[0])
            try:
                metrics = ray.get(done[0])
            except Exception as exc:  # the task raised, or its worker died: this run failed, the others go on
                outcome = RunOutcome(spec, "FAILED", error=_error_text(exc))
                client.set_tag(spec.run_id, ERROR_TAG, outcome.error[:MAX_TAG_CHARS])
                client.set_tag(spec.run_id, "error_detail", str(exc)[-MAX_TAG_CHARS:])
                client.set_terminated(spec.run_id, "FAILED")
                log.warning("FAILED %s: %s", spec.name, outcome.error)
            else:
                outcome = RunOutcome(spec, "FINISHED", metrics=metrics)
                client.set_terminated(spec.run_id, "FINISHED")
                log.info("finished %s: %s", spec.name, _short(metrics))
            outcomes.append(outcome)
            due = _final_runs_due(plan, outcomes, spec)
            try:
                submit(due)
            except Exception as exc:  # e.g. MLflow briefly unreachable: those runs fail, the finished ones count
                for s in due:
                    outcomes.append(RunOutcome(s, "FAILED", error=f"could not start: {_error_text(exc)}"))
                log.warning("could not start the final runs of %s: %s", spec.benchmark, _error_text(exc))
    except BaseException:
        # Interrupted driver: what did not finish is recorded as killed, not left RUNNING forever.
        finished = {o.spec.run_id for o in outcomes}
        for s in submitted:
            if s.run_id and s.run_id not in finished:
                client.set_terminated(s.run_id, "KILLED")
        for run_id in parents.values():
            client.set_terminated(run_id, "KILLED")
        raise

    summaries = {}
    for init, run_id in parents.items():
        metrics, tags = summarise(outcomes, plan, init)
        for key, value in tags.items():
            client.set_tag(run_id, key, value)
        for key, value in metrics.items():
            client.log_metric(run_id, key, value)
        mine = [o for o in outcomes if o.spec.init == init]
        all_failed = bool(mine) and all(o.status == "FAILED" for o in mine)
        client.set_terminated(run_id, "FAILED" if all_failed else "FINISHED")
        summaries[init] = metrics
    return SweepResult(parents["pretrained"], parents.get("scratch"), outcomes, summaries)


def _final_runs_due(plan: SweepPlan, outcomes: list[RunOutcome], last: RunSpec) -> list[RunSpec]:
    """The final runs of ``last``'s benchmark once its last selection run is in (none if every one failed)."""
    if last.kind != "finetune" or last.stage != "select" or not last.recipe.refit:
        return []
    mine = [
        o
        for o in outcomes
        if o.spec.benchmark == last.benchmark and o.spec.init == last.init and o.spec.kind == "finetune"
    ]
    if sum(o.spec.stage == "select" for o in mine) < plan.selection_runs(last.benchmark):
        return []
    lr = choose_lr(mine, last.recipe.lrs)
    if lr is None:
        return []
    log.info(
        "%s [%s]: learning rate %g chosen on minival; final runs on train + minival", last.benchmark, last.init, lr
    )
    return plan.final_specs(last.benchmark, last.init, lr)


def _create_child(client: Any, exp_id: str, parent_id: str, spec: RunSpec) -> RunSpec:
    from mlflow.entities import Param

    tags = {
        "mlflow.parentRunId": parent_id,
        "benchmark": spec.benchmark,
        "init": spec.init,
        "kind": spec.kind,
    }
    run = client.create_run(exp_id, run_name=spec.name, tags=tags)
    params = [Param(k, str(v)) for k, v in spec.params().items()]
    client.log_batch(run.info.run_id, params=params)
    return replace(spec, run_id=run.info.run_id)


def _short(metrics: dict[str, float]) -> str:
    keys = [k for k in ("minival_accuracy", "test_accuracy", "seconds") if k in metrics]
    keys += [k for k in metrics if k.startswith("fewshot_") and k.endswith("shot")]
    return ", ".join(f"{k}={metrics[k]:.4g}" for k in keys)


def describe_plan(plan: SweepPlan) -> str:
    """A human-readable list of what the sweep will run (printed by the job before submitting)."""
    lines = [f"pretrained: {plan.source.label} ({plan.source.kind}: {plan.source.uri})"]
    for p in plan.benchmarks:
        r = p.recipe
        selection = plan.selection_runs(p.benchmark.name)
        finals = r.seeds if r.refit else 0
        how = f"{selection} + {finals} on train+minival" if selection and finals else str(selection or finals)
        lines.append(
            f"  {p.benchmark.name}: {p.benchmark.num_classes} classes, {r.resolution}px, {r.steps} steps, "
            f"batch {r.batch_size}, lrs {list(r.lrs)}, seeds {r.seeds} -> {how} runs"
            + (" (x2 with scratch)" if "scratch" in plan.inits else "")
        )
    return "\n".join(lines)
