"""A run's numbers are sound, through `jobs/pretrain.py` in a plain process (``scale.launcher=local``, no Ray):
checkpoints hold finite weights, steps DeepSpeed skipped are counted, reported and limited, and the learning rate
logged at every step is the one the schedule gives that step.

Non-finite gradients are injected by ``pipeline/faults.py`` (``inf_grad@backward:<step>:<rank>``: the step's first
micro-batch back-propagates its loss times infinity, as an fp16/bf16 overflow would, while the loss stays finite).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from test_pretrain import _small, digits  # noqa: F401 (digits is a fixture)

from pipeline import faults, storage
from pipeline.pretrain import checkpoints as ckpt
from pipeline.schedules import warmup_linear_decay

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent


def _pretrain(overrides: list[str], fault_spec: str) -> subprocess.CompletedProcess:
    sets = [item for value in overrides for item in ("--set", value)]
    return subprocess.run(
        [sys.executable, "jobs/pretrain.py", "--config", "tiny", *sets],
        cwd=REPO,
        env={**_env(), faults.ENV: fault_spec},
        capture_output=True,
        text=True,
        timeout=600,
    )


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}


def _one_process(digits: str, root: Path, name: str, *extra: str, tracking: str | None = None) -> list[str]:  # noqa: F811
    """6 steps of the tiny ViT in one plain process: global batch 16 = micro 8 x 2 accumulation."""
    return _small(
        digits,
        root,
        name,
        "scale.launcher=local",
        "scale.workers=1",
        "data.workers=0",
        "train.steps=6",
        "train.global_batch=16",
        "train.micro_batch=8",
        "train.log_every=1",
        "checkpoint.every_steps=1",
        *extra,
        tracking=tracking,
    )


def test_a_checkpoint_of_weights_that_are_not_finite_is_never_marked_complete(digits: str, tmp_path: Path) -> None:  # noqa: F811
    """Without ZeRO nothing checks gradients: step 2's infinite gradients make NaN weights while its loss is finite.
    The step-2 checkpoint must not be written, and the run must stop naming step 1's as the last good one."""
    overrides = _one_process(digits, tmp_path, "blowup", "train.zero_stage=0", "tracking.enabled=false")
    done = _pretrain(overrides, "inf_grad@backward:2:0")
    assert done.returncode == 1, (done.stdout + done.stderr)[-3000:]
    assert "the weights are not finite after step 2" in done.stderr, done.stderr[-3000:]
    checkpoint_dir = (tmp_path / "blowup" / "checkpoints").as_uri()
    assert [step for step, _ in ckpt.list_step_dirs(checkpoint_dir)] == [1]
    last_good = ckpt.latest_complete(checkpoint_dir)
    assert last_good is not None and last_good.step == 1 and f"last good checkpoint: {last_good.url}" in done.stderr


def _history(tracking_uri: str, run_name: str, key: str) -> dict[int, float]:
    """step -> value of ``key`` over every MLflow run (submission) of ``run_name``."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("vit-pretrain").experiment_id
    runs = client.search_runs([experiment], f"tags.vitpipe.run_name = '{run_name}'")
    return {m.step: m.value for run in runs for m in client.get_metric_history(run.info.run_id, key)}


# train/skipped_steps at each step: step 2 skipped, step 4's skip undone by the stop (and not redone on resume)
_SKIPPED = {1: 0.0, 2: 1.0, 3: 1.0, 4: 1.0, 5: 1.0, 6: 1.0}


def test_skipped_steps_are_counted_logged_and_stop_the_run_past_the_limit(digits: str, tmp_path: Path) -> None:  # noqa: F811
    """ZeRO-2 in fp32 skips a step whose gradients are not finite. Steps 2 and 4 get infinite gradients with
    train.max_skipped_steps=1: the run stops at step 4 (its checkpoint not written), train/skipped_steps is logged at
    every step, and the learning rate logged at every step is the schedule's for the steps applied before it (a
    skipped step does not move the schedule). Resubmitted with a limit of 5 it resumes from step 3, still counting
    the skip it had, and its summary reports it. (A run that stops this way loses the metrics still queued for
    MLflow, or some of them: the logged values are checked on the steps that arrived, which include the resubmission's
    steps 4-6.)"""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = _one_process(digits, tmp_path, "skips", "train.zero_stage=2", tracking=uri)
    fault_spec = "inf_grad@backward:2:0,inf_grad@backward:4:0"
    stopped = _pretrain([*run, "train.max_skipped_steps=1"], fault_spec)
    assert stopped.returncode == 1, (stopped.stdout + stopped.stderr)[-3000:]
    assert "2 optimizer steps were skipped" in stopped.stderr and "train.max_skipped_steps=1" in stopped.stderr
    assert "step 2 was skipped by DeepSpeed" in stopped.stderr, stopped.stderr[-3000:]
    checkpoint_dir = (tmp_path / "skips" / "checkpoints").as_uri()
    assert ckpt.latest_complete(checkpoint_dir).step == 3

    resumed = _pretrain([*run, "train.max_skipped_steps=5"], fault_spec)  # the faults fired once: none again
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
    assert "finished 6 steps" in resumed.stdout and "1 optimizer steps skipped" in resumed.stdout, resumed.stdout
    skipped = _history(uri, "skips", "train/skipped_steps")
    assert {4, 5, 6} <= set(skipped) and skipped == {k: v for k, v in _SKIPPED.items() if k in skipped}, skipped

    # Step k (1-based) uses the schedule's lr of the steps applied before it: k - 1, less the skipped step 2 (the lr
    # of the next step, logged before the fix, would be one step further on).
    applied_before = {1: 0, 2: 1, 3: 1, 4: 2, 5: 3, 6: 4}
    schedule = {"peak_lr": 1e-3, "warmup_steps": 2, "total_steps": 6}
    expected = {step: warmup_linear_decay(n, **schedule) for step, n in applied_before.items()}
    lrs = _history(uri, "skips", "train/lr")
    assert {4, 5, 6} <= set(lrs) and lrs == {k: v for k, v in expected.items() if k in lrs}, lrs
    assert storage.exists(storage.join(checkpoint_dir, "step_00000006"))
