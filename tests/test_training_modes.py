"""Every training mode the presets use, run for real: `tiny` on 2 Ray Train workers with DeepSpeed over gloo (CPU).

ZeRO-0 and ZeRO-1 (vit_b16_i21k), ZeRO-2 (the others), activation checkpointing (what the planner turns on when a
micro-batch does not fit), DataLoader worker processes inside the Ray workers (the paper presets' data.workers=8),
and bf16 (every GPU run). Each mode is checked where it shows: the engine reports what it runs (``engine_modes``),
the checkpoint files hold the ZeRO partitions and bf16 weights, the loader's saved position has one stream per
worker process; the step ledger gives each step's samples and loss, so trajectories compare step by step.

Five short runs (4 steps, global batch 16 = 2 workers x micro 4 x 2 accumulation, dropout on) share the session's
Ray head; two of them resume from another run's step-2 checkpoint, as a resubmitted run does. Each Ray Train start
costs more than its steps, so ZeRO-1 runs with activation checkpointing on and is compared with ZeRO-0 without it:
the two differ only in the order of float sums.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from pipeline import storage
from pipeline.config import RunLayout, load_config
from pipeline.export import load_exported_model
from pipeline.pretrain import RunResult, check_before_launch, ledger, run
from pipeline.pretrain import checkpoints as ckpt

pytestmark = pytest.mark.slow

STEPS = 4
HALF = 2  # the checkpoint the resumed runs start from
WORLD = 2
LR = 2e-3
# Runs that differ only in the order of float sums: Adam divides each update by the gradient's running RMS, so a
# parameter whose gradient is near zero turns a float-level difference into one of up to ~lr per step (seen:
# 1.7e-5 between ZeRO-1 and ZeRO-0). A real difference in what was trained moves weights by ~lr = 2e-3.
WEIGHT_TOLERANCE = 0.05 * LR


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> str:
    """80 real digits (0-4) in 7 shards: enough shards for 2 ranks x 2 loader processes."""
    from pipeline.data.prepare import PrepareOptions, prepare

    out = tmp_path_factory.mktemp("digits")
    prepare(PrepareOptions(source="digits", out=out.as_uri(), classes="0-4", per_class=16, samples_per_shard=12))
    return (out / "train.manifest.json").as_uri()


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("runs")


@dataclass
class Done:
    plan: RunLayout
    result: RunResult
    seconds: float
    weights: dict[str, torch.Tensor]
    attempt: ledger.Attempt  # rank 0's (the only) attempt: each step's samples and loss

    @property
    def modes(self) -> dict:
        return self.result.metrics["modes"]

    def losses(self) -> list[float]:
        return [self.attempt.losses[step] for step in sorted(self.attempt.losses)]

    def rank_state(self, step: int, rank: int) -> dict:
        local = Path(storage.local_path(self.plan.checkpoint_dir)) / ckpt.step_dir_name(step)
        return torch.load(local / ckpt.RANK_FILE.format(rank=rank), weights_only=True)

    def checkpoint_files(self, step: int) -> list[str]:
        return storage.read_marker(storage.join(self.plan.checkpoint_dir, ckpt.step_dir_name(step)))["files"]


def _train(digits: str, root: Path, name: str, *extra: str, resume_from: Done | None = None) -> Done:
    overrides = [
        f"data.train={digits}",
        f"run.root={root.as_uri()}",
        f"run.name={name}",
        "train.global_batch=16",
        "train.micro_batch=4",
        f"train.steps={STEPS}",
        "optim.warmup_steps=1",
        f"optim.lr={LR}",
        "model.dropout=0.1",
        f"checkpoint.every_steps={HALF}",
        "checkpoint.keep_last=2",
        "train.log_every=1",
        "train.ledger=true",
        "scale.max_failures=0",
        "tracking.enabled=false",
        *extra,
    ]
    cfg = load_config("tiny", overrides)
    if resume_from is not None:
        # As if this run had stopped at step 2: the other run's complete step-2 checkpoint is this run's latest.
        source = Path(storage.local_path(resume_from.plan.checkpoint_dir)) / ckpt.step_dir_name(HALF)
        shutil.copytree(source, root / name / "checkpoints" / ckpt.step_dir_name(HALF))
    plan = check_before_launch(cfg)
    assert plan.resume_step == (HALF if resume_from else None)
    started = time.monotonic()
    result = run(cfg, plan)
    seconds = time.monotonic() - started
    assert result.status == "finished" and result.step == STEPS, result
    (attempt,) = ledger.read(plan.run_dir)[0]
    print(f"{name}: {result.metrics['steps_this_attempt']} steps in {seconds:.1f}s, losses {attempt.losses}")
    return Done(plan, result, seconds, load_exported_model(result.export_uri).state_dict(), attempt)


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _head_moved(done: Done) -> bool:
    """The classifier head starts at zero (head_zero_init): non-zero weights mean optimizer steps were applied."""
    return done.weights["head.weight"].abs().max().item() > 0


# ---------------------------------------------------------------------------------------------------------------
# the runs (module-scoped: several tests read each)


@pytest.fixture(scope="module")
def zero0(digits, runs_root, ray_connected) -> Done:
    """ZeRO-0 (plain data parallel), 2 DataLoader worker processes per rank."""
    return _train(digits, runs_root, "zero0", "train.zero_stage=0", "data.workers=2")


ZERO1 = ("train.zero_stage=1", "train.activation_checkpointing=true", "data.workers=2")


@pytest.fixture(scope="module")
def zero1(digits, runs_root, ray_connected) -> Done:
    """ZeRO-1 with activation checkpointing, 2 DataLoader worker processes per rank."""
    return _train(digits, runs_root, "zero1", *ZERO1)


@pytest.fixture(scope="module")
def zero1_resumed(digits, runs_root, zero1, ray_connected) -> Done:
    return _train(digits, runs_root, "zero1-resumed", *ZERO1, resume_from=zero1)


BF16 = ("train.precision=bf16", "train.zero_stage=2", "data.workers=0")


@pytest.fixture(scope="module")
def bf16(digits, runs_root, ray_connected) -> Done:
    with pytest.warns(UserWarning, match="bf16 matrix math is emulated on CPU"):
        return _train(digits, runs_root, "bf16", *BF16)


@pytest.fixture(scope="module")
def bf16_resumed(digits, runs_root, bf16, ray_connected) -> Done:
    with pytest.warns(UserWarning, match="bf16"):
        return _train(digits, runs_root, "bf16-resumed", *BF16, resume_from=bf16)


# ---------------------------------------------------------------------------------------------------------------
# ZeRO-0, ZeRO-1 and activation checkpointing


def test_zero0_trains_with_whole_optimizer_states_on_every_rank(zero0: Done) -> None:
    assert zero0.modes == {
        "zero_stage": 0,
        "bf16": False,
        "param_dtype": "float32",
        "activation_checkpointing": False,
        "grad_accum": 2,
    }
    assert len(zero0.losses()) == STEPS and all(torch.isfinite(torch.tensor(zero0.losses())))
    assert _head_moved(zero0)
    # Without ZeRO, DeepSpeed keeps the optimizer in the model-states file: no per-rank optimizer partitions.
    files = zero0.checkpoint_files(STEPS)
    assert "mp_rank_00_model_states.pt" in files and not [f for f in files if f.endswith("optim_states.pt")], files


def test_zero1_with_activation_checkpointing_follows_the_loss_trajectory_of_zero0_without_it(
    zero1: Done, zero0: Done
) -> None:
    assert zero1.modes["zero_stage"] == 1 and zero1.modes["activation_checkpointing"]
    files = zero1.checkpoint_files(STEPS)
    assert sorted(f for f in files if f.endswith("optim_states.pt")) == [
        f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" for rank in range(WORLD)
    ], files
    # The same samples; in fp32 the same arithmetic up to the order of the gradient reduction; recomputed blocks
    # replay the dropout masks of their forward pass (the RNG state is kept per block).
    assert zero1.attempt.steps == zero0.attempt.steps
    assert zero1.losses() == pytest.approx(zero0.losses(), abs=1e-5)
    diff = _max_diff(zero1.weights, zero0.weights)
    print(f"ZeRO-1 + checkpointing vs ZeRO-0: losses {zero1.losses()} vs {zero0.losses()}, max |dw| = {diff:.1e}")
    assert diff <= WEIGHT_TOLERANCE


# ---------------------------------------------------------------------------------------------------------------
# DataLoader worker processes


def test_loader_worker_processes_feed_training_and_a_resume_continues_at_the_next_sample(
    zero1_resumed: Done, zero1: Done
) -> None:
    for rank in range(WORLD):
        loader = zero1.rank_state(HALF, rank)["loader"]
        # One stream per worker process; by step 2 (4 micro-batches) each has handed over batches.
        assert loader["streams"] == 2 and all(position != [0, 0, 0] for position in loader["positions"]), loader
    assert zero1_resumed.attempt.resumed_from_step == HALF
    assert sorted(zero1_resumed.attempt.steps) == [3, 4]
    # Steps 3 and 4 trained on exactly the samples of the run that did not stop, with the same losses and weights.
    assert zero1_resumed.attempt.steps == {s: zero1.attempt.steps[s] for s in (3, 4)}
    assert zero1_resumed.losses() == pytest.approx([zero1.attempt.losses[s] for s in (3, 4)], abs=1e-6)
    for rank in range(WORLD):
        assert zero1_resumed.rank_state(STEPS, rank)["loader"] == zero1.rank_state(STEPS, rank)["loader"]
    assert _max_diff(zero1_resumed.weights, zero1.weights) <= 1e-6


# ---------------------------------------------------------------------------------------------------------------
# bf16


def test_bf16_trains_with_bf16_weights_and_fp32_master_weights(bf16: Done) -> None:
    assert bf16.modes["bf16"] and bf16.modes["param_dtype"] == "bfloat16" and bf16.modes["zero_stage"] == 2
    assert len(bf16.losses()) == STEPS and all(torch.isfinite(torch.tensor(bf16.losses())))
    assert _head_moved(bf16)
    # The module DeepSpeed checkpoints holds bf16 weights; the export is the fp32 master copy.
    local = Path(storage.local_path(bf16.plan.checkpoint_dir)) / ckpt.step_dir_name(STEPS)
    from pipeline.pretrain.engine import DEEPSPEED_CHECKPOINT_GLOBALS

    with torch.serialization.safe_globals(DEEPSPEED_CHECKPOINT_GLOBALS):
        module = torch.load(local / "mp_rank_00_model_states.pt", weights_only=True)["module"]
    assert {t.dtype for t in module.values() if t.is_floating_point()} == {torch.bfloat16}
    assert {t.dtype for t in bf16.weights.values()} == {torch.float32}
    # fp32 master weights moved by updates smaller than bf16 can represent at those magnitudes: the export is
    # not just the bf16 weights widened.
    widened = {k: v.float() for k, v in module.items() if k in bf16.weights}
    assert _max_diff(widened, {k: bf16.weights[k] for k in widened}) > 0


def test_bf16_resumes_exactly_from_a_checkpoint(bf16_resumed: Done, bf16: Done) -> None:
    assert bf16_resumed.attempt.resumed_from_step == HALF and bf16_resumed.modes["bf16"]
    assert bf16_resumed.attempt.steps == {s: bf16.attempt.steps[s] for s in (3, 4)}
    assert bf16_resumed.losses() == pytest.approx([bf16.attempt.losses[s] for s in (3, 4)], abs=1e-6)
    diff = _max_diff(bf16_resumed.weights, bf16.weights)
    print(f"bf16: max |straight - resumed| = {diff:.1e}")
    assert diff <= 1e-6
