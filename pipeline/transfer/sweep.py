"""Planning a transfer sweep: everything checked before Ray or MLflow is touched.

``plan_sweep`` resolves the benchmark names against the registry (``pipeline.transfer.tasks``), applies the
recipe overrides (per benchmark, per alias) and validates them, resolves the pretrained model, and checks the
data every run will read: each split's manifest and number of classes, enough images per class for the
few-shot counts, train + minival readable as one set for refit runs, ReaL labels matching the test split, and
fine-tuning resolutions that fit the patch size. Every problem is collected into one ``ConfigError``. The
result, a ``SweepPlan``, lists the runs (``RunSpec``) to submit.

``fit_memory`` then sizes every GPU benchmark for the GPU its runs get (``planning_gpu``): a recipe without
``micro_batch_size`` gets the largest micro-batch that fits (``pipeline.planner.plan_transfer_memory``), with
activation checkpointing only where nothing fits without it; a given micro-batch is checked. What cannot fit even
at micro-batch 1 with checkpointing is refused with the fix. CPU runs keep the whole batch (no memory limit is
applied there). ``orchestrate.run_sweep`` sizes again if the Ray cluster turns out to have another GPU.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

import pydantic
import torch

from model.variants import resolution_problem
from pipeline import planner, storage
from pipeline.config import ConfigError, format_errors
from pipeline.config.transfer import TransferConfig, local_data_root
from pipeline.planner.memory import format_gib
from pipeline.transfer import tasks
from pipeline.transfer.finetune import RunSpec
from pipeline.transfer.source import PretrainedSource, resolve_pretrained

log = logging.getLogger(__name__)


@dataclass
class BenchmarkPlan:
    benchmark: tasks.Benchmark
    recipe: tasks.Recipe  # as the runs get it: fit_memory fills in micro_batch_size and grad_checkpointing
    urls: dict[str, str]
    # As configured (what fit_memory starts from, also when it sizes again for another GPU); default: recipe.
    requested: tasks.Recipe | None = None
    memory: str = ""  # what fit_memory chose and for which device, for the printed plan

    def __post_init__(self) -> None:
        if self.requested is None:
            self.requested = self.recipe


@dataclass
class SweepPlan:
    cfg: TransferConfig
    source: PretrainedSource
    benchmarks: list[BenchmarkPlan]
    inits: list[str]
    gpu: planner.GpuSpec | None = None  # the GPU the GPU runs are sized for (None: gpu=null, not sized)

    def num_gpus(self, p: BenchmarkPlan) -> float:
        return p.recipe.num_gpus if self.cfg.num_gpus is None else self.cfg.num_gpus

    def _run(self, p: BenchmarkPlan, init: str, **fields: Any) -> RunSpec:
        cfg = self.cfg
        return RunSpec(
            benchmark=p.benchmark.name,
            num_classes=p.benchmark.num_classes,
            recipe=p.recipe,
            init=init,  # type: ignore[arg-type]
            source=self.source,
            urls=p.urls,
            num_gpus=self.num_gpus(p),
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


def plan_sweep(cfg: TransferConfig) -> SweepPlan:
    """Validate benchmarks, recipes, data and the pretrained model; raise ConfigError listing every problem."""
    try:
        chosen = tasks.resolve_benchmarks(cfg.benchmarks)
    except ValueError as exc:
        raise ConfigError([f"benchmarks: {exc}"]) from None
    names = {b.name for b in chosen}
    problems = []
    # Per-benchmark overrides; an alias (e.g. vtab.steps=...) sets every member, a member's own setting wins.
    overrides: dict[str, dict[str, Any]] = {}
    for name in sorted(cfg.benchmark_recipes, key=lambda n: n in names):
        members = [m.name for m in tasks.resolve_benchmarks([name])] if name in tasks.ALIASES else [name]
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
            changes["resolution"] = tasks.finetune_resolution(b, source.spec["variant"])
        try:
            recipe = tasks.Recipe.model_validate({**b.recipe.model_dump(), **changes})
        except pydantic.ValidationError as exc:
            problems += [f"{b.name}: {m}" for m in format_errors(exc, prefix="recipe.")]
            continue
        root = cfg.data_root or (local_data_root() if b.suite == "embedded" else None)
        if root is None:
            problems.append(
                f"data_root: benchmark {b.name!r} has no default data location; pass "
                "--set data_root=gs://<bucket>/<path> holding <benchmark>/{train,minival,test}.manifest.json"
            )
            continue
        urls = {split: b.split_url(root, split) for split in tasks.SPLITS}
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
    plan = SweepPlan(cfg=cfg, source=source, benchmarks=plans, inits=inits)  # type: ignore[arg-type]
    return fit_memory(plan, *planning_gpu(cfg))


# ---------------------------------------------------------------------------------------------------------------
# memory: the micro-batch and activation checkpointing each benchmark's runs use


def planning_gpu(cfg: TransferConfig, cluster_gpu: planner.GpuSpec | None = None) -> tuple[planner.GpuSpec | None, str]:
    """The GPU the runs are sized for, and how it was decided (said in the printed plan)."""
    if cfg.gpu is None:
        return None, "gpu=null"
    if cfg.gpu != "auto":
        return planner.GPUS[cfg.gpu], f"gpu={cfg.gpu}"
    if cluster_gpu is not None:
        return cluster_gpu, "the Ray cluster's GPUs"
    if torch.cuda.is_available():
        here = planner.detect_gpu(torch.cuda.get_device_name())
        if here is not None:
            return here, "this machine's GPU"
    return planner.GPUS["h100"], "gpu=auto assumed h100: --set gpu=<the runs' GPU>, or gpu=null to skip this"


def fit_memory(plan: SweepPlan, gpu: planner.GpuSpec | None, how: str) -> SweepPlan:
    """``plan`` with each benchmark's micro-batch and activation checkpointing chosen (or checked) for the device
    its runs get; ConfigError naming the fix for every benchmark that cannot fit."""
    problems, fitted = [], []
    for p in plan.benchmarks:
        try:
            recipe, note = _fit_recipe(p, plan, gpu, how)
        except ConfigError as exc:
            problems += exc.problems
            continue
        fitted.append(replace(p, recipe=recipe, memory=note))
    if problems:
        raise ConfigError(problems)
    return replace(plan, benchmarks=fitted, gpu=gpu)


def _fit_recipe(p: BenchmarkPlan, plan: SweepPlan, gpu: planner.GpuSpec | None, how: str) -> tuple[tasks.Recipe, str]:
    r, name = p.requested or p.recipe, p.benchmark.name
    if plan.num_gpus(p) == 0 or gpu is None:
        micro, ckpt = r.micro_batch_size or r.batch_size, bool(r.grad_checkpointing)
        why = "CPU runs: no memory limit applied" if plan.num_gpus(p) == 0 else f"{how}: not sized or checked"
        return r.model_copy(update={"micro_batch_size": micro, "grad_checkpointing": ckpt}), (
            f"{why}; micro-batch {micro} x {r.batch_size // micro} accumulated, activation checkpointing "
            f"{'on' if ckpt else 'off'}"
        )
    variant, pool = plan.source.spec["variant"], plan.source.spec.get("pool") or "token"
    facts_args = {"img_size": r.resolution, "num_classes": p.benchmark.num_classes, "pool": pool}
    try:
        best = planner.plan_transfer_memory(
            variant,
            r.resolution,
            r.batch_size,
            gpu,
            num_classes=p.benchmark.num_classes,
            grad_checkpointing=r.grad_checkpointing,
            momentum=r.momentum,
            pool=pool,
        )
    except planner.DoesNotFitError as exc:
        with_ckpt = planner.estimate_finetune_memory(
            planner.ModelFacts.build(variant, **facts_args), 1, grad_checkpointing=True, momentum=r.momentum
        )
        if r.grad_checkpointing is False and with_ckpt.total <= gpu.usable_bytes:
            fix = f"drop --set {name}.grad_checkpointing=false (the planning turns it on where needed)"
        else:
            fix = f"run it on GPUs with more memory (--set gpu=<their kind>) or lower --set {name}.resolution"
        raise ConfigError([f"{name}: {exc} [GPU: {how}]. Fix: {fix}"]) from None
    except planner.PlanError:
        return r, ""  # a resolution the patch size does not divide: _check_resolutions reported it
    chosen, given = best.memory, r.micro_batch_size is not None
    if given:
        options = [r.grad_checkpointing] if r.grad_checkpointing is not None else [False, True]
        estimates = [
            planner.estimate_finetune_memory(best.facts, r.micro_batch_size, grad_checkpointing=c, momentum=r.momentum)
            for c in options
        ]
        fitting = [m for m in estimates if m.total <= gpu.usable_bytes]
        if not fitting:
            ckpt_words = " even with activation checkpointing" if options[-1] else " without activation checkpointing"
            raise ConfigError(
                [
                    f"{name}.micro_batch_size={r.micro_batch_size} needs {format_gib(estimates[-1].total)}"
                    f" on one {gpu.name}{ckpt_words} ({format_gib(gpu.usable_bytes)} usable) "
                    f"[GPU: {how}]: lower it to {best.micro_batch} (the largest that fits"
                    f"{', with checkpointing' if best.grad_checkpointing else ''}) or drop it to have it chosen"
                ]
            )
        chosen = fitting[0]
    recipe = r.model_copy(
        update={"micro_batch_size": chosen.micro_batch, "grad_checkpointing": chosen.grad_checkpointing}
    )
    return recipe, (
        f"{gpu.name} ({how}): micro-batch {chosen.micro_batch} x {r.batch_size // chosen.micro_batch} accumulated, "
        f"activation checkpointing {'on' if chosen.grad_checkpointing else 'off'}, "
        f"{format_gib(chosen.total)} of {format_gib(gpu.usable_bytes)} usable"
        f"{' (micro-batch as set)' if given else ''}"
    )


def _check_benchmark_data(b: tasks.Benchmark, urls: dict[str, str], root: str, *, min_per_class: int) -> list[str]:
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


def _check_refit_data(b: tasks.Benchmark, urls: dict[str, str]) -> list[str]:
    """Final runs read train and minival as one set, after every selection run: check now that they can."""
    from pipeline.data import DataConfig, DataError, check_data
    from pipeline.data.config import join_sources

    try:
        check_data(DataConfig(train=join_sources([urls["train"], urls["minival"]]), workers=0), world_size=1)
    except DataError as exc:
        return [f"benchmark {b.name!r}: its final runs train on train + minival, which cannot be read as one: {exc}"]
    return []


def _check_real_labels(b: tasks.Benchmark, real_url: str, test_url: str) -> list[str]:
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


def _check_resolutions(source: PretrainedSource, plans: list[BenchmarkPlan]) -> list[str]:
    found = [
        (p.benchmark.name, resolution_problem(p.recipe.resolution, source.spec["variant"], field="recipe.resolution"))
        for p in plans
    ]
    return [f"{name}: {problem}" for name, problem in found if problem]
