"""How a sweep's runs become the parent's rows: best learning rate on minival, seeds, ReaL, VTAB, failures.

Pure functions on synthetic run outcomes (no Ray, no MLflow): the sweep test covers the same path end to end.
"""

import itertools
import statistics

import numpy as np
import pytest

from pipeline import results as schema
from pipeline.config.transfer import TransferConfig, apply_sets
from pipeline.schedules import warmup_cosine
from pipeline.transfer import tasks
from pipeline.transfer.finetune import RunSpec, real_accuracy
from pipeline.transfer.orchestrate import _final_runs_due
from pipeline.transfer.source import PretrainedSource
from pipeline.transfer.summary import ERROR_TAG, RunOutcome, summarise
from pipeline.transfer.sweep import BenchmarkPlan, SweepPlan


def _plan(names, *, real=False):
    source = PretrainedSource("export", "file:///x", {"variant": "Mi/4"}, "m")
    plans = []
    for name in names:
        b = tasks.REGISTRY[name]
        urls = {s: f"file:///d/{name}/{s}.manifest.json" for s in tasks.SPLITS}
        if real:
            urls["real_labels"] = f"file:///d/{name}/real_labels.json"
        plans.append(BenchmarkPlan(b, b.recipe, urls))
    cfg = TransferConfig(pretrained="file:///x", benchmarks=list(names))
    return SweepPlan(cfg=cfg, source=source, benchmarks=plans, inits=["pretrained"])


def _outcome(plan, name, lr, seed, minival, test, *, status="FINISHED", stage="select", **extra):
    p = next(p for p in plan.benchmarks if p.benchmark.name == name)
    spec = RunSpec(
        kind="finetune",
        benchmark=name,
        num_classes=p.benchmark.num_classes,
        recipe=p.recipe,
        init="pretrained",
        source=plan.source,
        urls=p.urls,
        lr=lr,
        seed=seed,
        stage=stage,
    )
    metrics = {} if status == "FAILED" else {"test_accuracy": test, **extra}
    if status != "FAILED" and stage == "select":  # a final run trained on minival: it is not evaluated there
        metrics["minival_accuracy"] = minival
    return RunOutcome(spec, status, metrics, error="boom" if status == "FAILED" else None)


def test_best_lr_is_chosen_on_minival_and_test_is_averaged_over_its_seeds():
    plan = _plan(["digits_heldout"])
    lo, hi = tasks.REGISTRY["digits_heldout"].recipe.lrs
    outcomes = [
        # The higher lr wins on test but loses on minival: minival decides.
        *(_outcome(plan, "digits_heldout", lo, s, 0.80, t) for s, t in enumerate([0.70, 0.74, 0.72])),
        *(_outcome(plan, "digits_heldout", hi, s, 0.60, t) for s, t in enumerate([0.90, 0.91, 0.92])),
    ]
    metrics, tags = summarise(outcomes, plan, "pretrained")
    assert metrics["digits_heldout/best_lr"] == lo
    assert metrics["digits_heldout/test_accuracy"] == pytest.approx(0.72)
    assert metrics["digits_heldout/test_accuracy_std"] == pytest.approx(statistics.stdev([0.70, 0.74, 0.72]))
    assert metrics["digits_heldout/seeds"] == 3
    assert tags[schema.status_tag("digits_heldout")] == schema.STATUS_OK
    assert tags[schema.ROWS_TAG] == "digits_heldout"


def test_failed_seeds_are_left_out_and_an_all_failed_benchmark_is_a_failed_row():
    plan = _plan(["digits_heldout", "lfw"])
    lo, hi = tasks.REGISTRY["digits_heldout"].recipe.lrs
    outcomes = [
        _outcome(plan, "digits_heldout", lo, 0, 0.5, 0.6),
        _outcome(plan, "digits_heldout", lo, 1, 0, 0, status="FAILED"),
        _outcome(plan, "digits_heldout", hi, 0, 0, 0, status="FAILED"),
        *(_outcome(plan, "lfw", lr, 0, 0, 0, status="FAILED") for lr in tasks.REGISTRY["lfw"].recipe.lrs),
    ]
    metrics, tags = summarise(outcomes, plan, "pretrained")
    assert metrics["digits_heldout/test_accuracy"] == 0.6 and "digits_heldout/test_accuracy_std" not in metrics
    assert metrics["digits_heldout/failed_runs"] == 2
    assert tags[schema.status_tag("lfw")] == schema.STATUS_FAILED and "lfw/test_accuracy" not in metrics
    assert tags[f"{ERROR_TAG}/lfw"] == "boom"


def test_real_labels_give_their_own_row():
    plan = _plan(["cifar10"], real=True)
    outcomes = [
        *(_outcome(plan, "cifar10", lr, 0, 0.5 + lr, 0.6, real_accuracy=0.5) for lr in plan.benchmarks[0].recipe.lrs),
        _outcome(plan, "cifar10", 0.03, 0, None, 0.6, stage="final", real_accuracy=0.7),
    ]
    metrics, tags = summarise(outcomes, plan, "pretrained")
    assert tags[schema.ROWS_TAG] == "cifar10,cifar10_real"
    assert metrics[schema.value_key("cifar10_real")] == 0.7  # from the final run


def test_real_accuracy_counts_any_valid_label_and_skips_unlabelled_images():
    predictions = np.array([3, 1, 2, 0])
    real = [[3, 5], [2], [], [0]]  # right, wrong, no valid label (left out), right
    assert real_accuracy(predictions, real) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="test-split order"):
        real_accuracy(predictions, real[:3])


def test_vtab_score_rows_appear_only_for_the_full_nineteen_tasks():
    names = [f"vtab/{t}" for t in tasks.VTAB_TASKS]
    plan = _plan(names)
    # One learning rate: the runs are the final ones straight away, on train + minival.
    outcomes = [_outcome(plan, n, 0.01, 0, None, (i + 1) / 100, stage="final") for i, n in enumerate(names)]
    metrics, tags = summarise(outcomes, plan, "pretrained")
    assert metrics["vtab/test_accuracy"] == pytest.approx(statistics.mean((i + 1) / 100 for i in range(19)))
    assert tags[schema.status_tag("vtab/structured")] == schema.STATUS_OK
    # One task failed: the score is withheld, visibly.
    outcomes[0] = _outcome(plan, names[0], 0.01, 0, 0, 0, status="FAILED", stage="final")
    metrics, tags = summarise(outcomes, plan, "pretrained")
    assert "vtab/test_accuracy" not in metrics and tags[schema.status_tag("vtab")] == "incomplete"
    assert tags[schema.status_tag("vtab/specialized")] == schema.STATUS_OK
    # A few tasks only: no aggregate rows at all.
    small = _plan(names[:2])
    _, tags = summarise(outcomes[1:2], small, "pretrained")
    assert "vtab" not in tags[schema.ROWS_TAG].split(",")


def test_warmup_then_cosine_schedule():
    lrs = [warmup_cosine(s, peak_lr=0.1, warmup_steps=4, total_steps=20) for s in range(20)]
    assert lrs[:4] == pytest.approx([0.025, 0.05, 0.075, 0.1])
    assert lrs[4] == pytest.approx(0.1) and lrs[12] == pytest.approx(0.05)
    assert all(a >= b for a, b in itertools.pairwise(lrs[4:])) and lrs[-1] > 0


def test_set_values_are_typed_and_route_to_config_recipe_or_one_benchmark():
    fields = apply_sets(
        {}, ["steps=50", "lrs=0.01", "pets.lrs=0.003,0.01", "data_root=gs://b/r", "scratch=true", "fewshot=5"]
    )
    assert fields["recipe"] == {"steps": 50, "lrs": [0.01]}
    assert fields["benchmark_recipes"] == {"pets": {"lrs": [0.003, 0.01]}}
    assert fields["data_root"] == "gs://b/r" and fields["scratch"] is True and fields["fewshot"] == [5]


def test_runs_without_real_accuracy_leave_a_marked_real_row_and_keep_the_plain_one():
    plan = _plan(["cifar10"], real=True)
    outcomes = [_outcome(plan, "cifar10", lr, 0, 0.5 + lr, 0.6) for lr in plan.benchmarks[0].recipe.lrs]
    outcomes.append(_outcome(plan, "cifar10", 0.03, 0, None, 0.6, stage="final"))
    metrics, tags = summarise(outcomes, plan, "pretrained")
    assert metrics[schema.value_key("cifar10")] == 0.6
    assert tags[schema.status_tag("cifar10")] == schema.STATUS_OK
    assert tags[schema.status_tag("cifar10_real")] == "unreadable test images"
    assert schema.value_key("cifar10_real") not in metrics


def test_refit_reports_the_final_runs_on_train_plus_minival_at_the_lr_chosen_on_minival():
    plan = _plan(["pets"])  # a paper benchmark: 4 learning rates, refit on
    lrs = tasks.REGISTRY["pets"].recipe.lrs
    selection = [
        _outcome(plan, "pets", lr, 0, minival, 0.99) for lr, minival in zip(lrs, [0.5, 0.8, 0.7, 0.6], strict=True)
    ]

    # The final runs start only once every selection run is in, at the minival winner.
    assert _final_runs_due(plan, selection[:3], selection[2].spec) == []
    finals = _final_runs_due(plan, selection, selection[3].spec)
    assert [(f.lr, f.seed, f.stage) for f in finals] == [(lrs[1], 0, "final")]
    assert finals[0].name == f"pets lr={lrs[1]:g} seed=0 final [pretrained]"

    # Reported: the final run's test accuracy, not the selection runs' (0.99).
    outcomes = [*selection, _outcome(plan, "pets", lrs[1], 0, None, 0.81, stage="final")]
    metrics, tags = summarise(outcomes, plan, "pretrained")
    assert metrics["pets/test_accuracy"] == 0.81 and metrics["pets/best_lr"] == lrs[1]
    assert metrics["pets/minival_accuracy"] == 0.8
    # The final run failed: a failed row, even though selection runs have test numbers.
    outcomes[-1] = _outcome(plan, "pets", lrs[1], 0, None, 0, status="FAILED", stage="final")
    metrics, tags = summarise(outcomes, plan, "pretrained")
    assert tags[schema.status_tag("pets")] == schema.STATUS_FAILED and metrics["pets/failed_runs"] == 1


def test_no_final_runs_when_every_selection_run_failed_and_none_planned_for_one_lr_benchmarks():
    plan = _plan(["pets", "vtab/dtd"])
    lrs = tasks.REGISTRY["pets"].recipe.lrs
    failed = [_outcome(plan, "pets", lr, 0, 0, 0, status="FAILED") for lr in lrs]
    assert _final_runs_due(plan, failed, failed[-1].spec) == []
    specs = [s for s in plan.specs() if s.kind == "finetune"]
    assert {(s.benchmark, s.stage) for s in specs} == {("pets", "select"), ("vtab/dtd", "final")}
    assert plan.selection_runs("pets") == len(lrs) and plan.selection_runs("vtab/dtd") == 0
