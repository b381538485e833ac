"""Planning a transfer sweep: everything checked before Ray or MLflow is touched.

``plan_sweep`` resolves the benchmark names against the registry (``pipeline.transfer.tasks``), applies the
recipe overrides (per benchmark, per alias) and validates them, resolves the pretrained model, and checks the
data every run will read: each split's manifest and number of classes, enough images per class for the
few-shot counts, train + minival readable as one set for refit runs, ReaL labels matching the test split, and
fine-tuning resolutions that fit the patch size. Every problem is collected into one ``ConfigError``. The
result, a ``SweepPlan``, lists the runs (``RunSpec``) to submit.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import pydantic

from model.variants import resolution_problem
from pipeline import storage
from pipeline.config import ConfigError, format_errors
from pipeline.config.transfer import TransferConfig, local_data_root
from pipeline.transfer import tasks
from pipeline.transfer.finetune import RunSpec
from pipeline.transfer.source import PretrainedSource, resolve_pretrained

log = logging.getLogger(__name__)


@dataclass
class BenchmarkPlan:
    benchmark: tasks.Benchmark
    recipe: tasks.Recipe
    urls: dict[str, str]


@dataclass
class SweepPlan:
    cfg: TransferConfig
    source: PretrainedSource
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
    return SweepPlan(cfg=cfg, source=source, benchmarks=plans, inits=inits)  # type: ignore[arg-type]


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
