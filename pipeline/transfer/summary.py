"""From the outcomes of a sweep's runs to the rows of its MLflow parent run.

``choose_lr`` picks each benchmark's learning rate on minival (mean over seeds; test accuracy plays no part);
``summarise`` reports the chosen runs' test accuracy (mean and sample std over seeds), ReaL and few-shot rows,
failed-run counts and the VTAB score when all 19 tasks ran, in the result schema of ``pipeline.results`` that
``pipeline.compare`` reads. A benchmark without a number still gets its row, with a status saying why.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from pipeline import results
from pipeline.transfer import tasks
from pipeline.transfer.finetune import RunSpec
from pipeline.transfer.sweep import SweepPlan

ERROR_TAG = "error"
MAX_TAG_CHARS = 5000  # MLflow keeps tag values up to 8000 characters


@dataclass
class RunOutcome:
    spec: RunSpec
    status: Literal["FINISHED", "FAILED"]
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None


def _std(values: list[float]) -> float | None:
    # Sample std over seeds; none for one seed (a single run shows no spread).
    return statistics.stdev(values) if len(values) > 1 else None


def choose_lr(outcomes: list[RunOutcome], lrs: Sequence[float]) -> float | None:
    """The learning rate with the best mean minival accuracy over its finished selection runs (ties: the first in
    the sweep's order); None when none finished. Test accuracy plays no part."""
    by_lr: dict[float, list[float]] = {}
    for o in outcomes:
        if o.status == "FINISHED" and o.spec.kind == "finetune" and o.spec.stage == "select":
            by_lr.setdefault(o.spec.lr, []).append(o.metrics["minival_accuracy"])
    tried = [lr for lr in lrs if lr in by_lr]
    return max(tried, key=lambda lr: statistics.mean(by_lr[lr])) if tried else None


def summarise(outcomes: list[RunOutcome], plan: SweepPlan, init: str) -> tuple[dict[str, float], dict[str, str]]:
    """Parent metrics and tags of one sweep (one init) from its children's outcomes."""
    metrics: dict[str, float] = {}
    tags: dict[str, str] = {}
    rows: list[str] = []
    test_acc: dict[str, float] = {}

    def put(row: str, mean: float | None, std: float | None, status: str) -> None:
        rows.append(row)
        tags[results.status_tag(row)] = status
        if mean is not None:
            metrics[results.value_key(row)] = mean
        if std is not None:
            metrics[results.std_key(row)] = std

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
            put(name, statistics.mean(tests), _std(tests), results.STATUS_OK)
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
                    put(f"{name}_real", statistics.mean(reals), _std(reals), results.STATUS_OK)
                else:
                    put(f"{name}_real", None, None, "unreadable test images")
        else:
            put(name, None, None, results.STATUS_FAILED)
            errors = [o.error for o in tuned if o.error]
            if errors:
                tags[f"{ERROR_TAG}/{name}"] = errors[0][:MAX_TAG_CHARS]
            if "real_labels" in p.urls:
                put(f"{name}_real", None, None, results.STATUS_FAILED)
        # The compare note ("N runs failed") counts the runs the number could have stood on: the final ones under
        # refit, else every selection run (any of them might have won). Refit selection failures are logged apart.
        counted = [o for o in tuned if o.spec.stage == "final"] if p.recipe.refit else tuned
        failed = sum(o.status == "FAILED" for o in counted)
        if failed:
            metrics[results.failed_runs_key(name)] = failed
        if p.recipe.refit and (lost := sum(o.status == "FAILED" and o.spec.stage == "select" for o in tuned)):
            metrics[f"{name}/failed_selection_runs"] = lost
        for o in (o for o in mine if o.spec.kind == "fewshot"):
            for k in o.spec.shots:
                row = results.fewshot_row(name, k)
                if o.status == "FINISHED":
                    put(row, o.metrics[f"fewshot_{k}shot"], o.metrics.get(f"fewshot_{k}shot_std"), results.STATUS_OK)
                else:
                    put(row, None, None, results.STATUS_FAILED)
            if o.error:
                tags[f"{ERROR_TAG}/{name}/fewshot"] = o.error[:MAX_TAG_CHARS]

    # The VTAB score needs all 19 tasks; a partial VTAB sweep gets no aggregate rows at all.
    vtab_names = {f"vtab/{t}" for t in tasks.VTAB_TASKS}
    if vtab_names <= {p.benchmark.name for p in plan.benchmarks}:
        score, groups = tasks.vtab_score(test_acc)
        status = results.STATUS_OK if score is not None else "incomplete"
        put("vtab", score, None, status)
        for group, value in groups.items():
            put(f"vtab/{group}", value, None, results.STATUS_OK if value is not None else "incomplete")
    tags[results.ROWS_TAG] = ",".join(rows)
    return metrics, tags
