"""Checkpoint bookkeeping on storage: completion markers, pruning, per-rank files, RNG state, safe loading.

The distributed save/resume itself (DeepSpeed ZeRO-2/3 on 2 Ray workers) is exercised in test_pretrain.py.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import storage
from pipeline.pretrain import checkpoints as ckpt


def _fake_step(checkpoint_dir: str, step: int, *, complete: bool, info: dict | None = None) -> str:
    url = storage.join(checkpoint_dir, ckpt.step_dir_name(step))
    storage.write_bytes(storage.join(url, "mp_rank_00_model_states.pt"), b"weights")
    if complete:
        storage.mark_complete(url, {"step": step, **(info or {})})
    return url


@pytest.fixture(params=["file", "memory"])
def checkpoint_dir(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "file":
        return tmp_path.as_uri() + "/run/checkpoints"
    return f"memory://ckpt-tests/{tmp_path.name}/checkpoints"


def test_latest_complete_skips_incomplete_ones_and_says_so(
    checkpoint_dir: str, caplog: pytest.LogCaptureFixture
) -> None:
    assert ckpt.latest_complete(checkpoint_dir) is None
    _fake_step(checkpoint_dir, 100, complete=True)
    _fake_step(checkpoint_dir, 200, complete=True, info={"world_size": 2})
    _fake_step(checkpoint_dir, 300, complete=False)
    with caplog.at_level("WARNING", logger="pipeline.pretrain.checkpoints"):
        ref = ckpt.latest_complete(checkpoint_dir)
    assert ref is not None and ref.step == 200 and ref.info["world_size"] == 2
    assert ref.url.endswith("/step_00000200")
    assert "skipping incomplete checkpoint" in caplog.text and "step_00000300" in caplog.text


def test_list_ignores_other_entries(checkpoint_dir: str) -> None:
    _fake_step(checkpoint_dir, 5, complete=True)
    storage.write_bytes(storage.join(checkpoint_dir, "notes.txt"), b"x")
    storage.write_bytes(storage.join(checkpoint_dir, "step_12", "x"), b"x")  # not 8 digits
    assert [step for step, _ in ckpt.list_step_dirs(checkpoint_dir)] == [5]


def test_prune_keeps_the_last_k_complete_and_newer_incomplete(checkpoint_dir: str) -> None:
    for step in (10, 20, 30, 40):
        _fake_step(checkpoint_dir, step, complete=True)
    _fake_step(checkpoint_dir, 15, complete=False)  # an interrupted save, older than what is kept
    _fake_step(checkpoint_dir, 50, complete=False)  # being written right now by a later step
    ckpt.prune(checkpoint_dir, keep_last=2)
    assert [step for step, _ in ckpt.list_step_dirs(checkpoint_dir)] == [30, 40, 50]
    assert ckpt.latest_complete(checkpoint_dir, quiet=True).step == 40


def test_each_rank_downloads_only_shared_files_and_its_own() -> None:
    files = [
        "mp_rank_00_model_states.pt",
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
        "zero_pp_rank_10_mp_rank_00_optim_states.pt",
        "rank_00000.pt",
        "rank_00001.pt",
        "zero_to_fp32.py",
    ]
    assert ckpt._files_for_rank(files, 1) == [
        "mp_rank_00_model_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
        "rank_00001.pt",
        "zero_to_fp32.py",
    ]


def test_each_rank_downloads_only_its_own_bf16_optimizer_partition() -> None:
    # A bf16 run's optimizer partitions (the real checkpoint: tests/test_checkpoint_bf16.py).
    files = [
        "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
        "bf16_zero_pp_rank_10_mp_rank_00_optim_states.pt",
        "mp_rank_00_model_states.pt",
        "rank_00000.pt",
        "rank_00001.pt",
    ]
    assert ckpt._files_for_rank(files, 1) == [
        "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
        "mp_rank_00_model_states.pt",
        "rank_00001.pt",
    ]


@pytest.mark.parametrize("name", ["../../escaped.pt", "ABSOLUTE"])
def test_a_marker_listing_a_file_outside_its_checkpoint_is_refused_before_any_rank_downloads(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whoever can write to the checkpoint store writes a marker naming ``../../escaped.pt`` (or an absolute path):
    the lookup a resuming worker makes (``Trainer.find_checkpoint`` -> ``checkpoints.load``) must refuse it, and no
    rank may write a file outside its temporary directory."""
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))  # where each rank makes its download directory
    (tmp_path / "tmp").mkdir()
    escape_target = tmp_path / "tmp" / "escaped.pt"  # what tmp/vitpipe-load-rank0-*/step_00000004/../../ reaches
    if name == "ABSOLUTE":
        escape_target = tmp_path / "written-by-a-marker.pt"
        name = str(escape_target)
    checkpoint_dir = tmp_path.as_uri() + "/run/checkpoints"
    url = _fake_step(checkpoint_dir, 4, complete=False)
    storage.write_bytes(storage.join(url, "rank_00000.pt"), b"state")
    storage.write_bytes(tmp_path.as_uri() + "/run/escaped.pt", b"planted")  # the source the traversal would read
    storage.mark_complete(url, {"step": 4, "files": ["mp_rank_00_model_states.pt", "rank_00000.pt", name]})
    with pytest.raises(ckpt.CheckpointError) as refused:
        ckpt.load(None, ckpt.latest_complete(checkpoint_dir), rank=0)
    assert repr(name) in str(refused.value) and "step_00000004" in str(refused.value)
    assert "not file names inside the checkpoint directory" in str(refused.value)
    assert not escape_target.exists()
    assert not list((tmp_path / "tmp").iterdir())  # nothing was downloaded at all


def test_compatibility_check_names_what_differs_and_lets_the_number_of_workers_change_under_zero() -> None:
    info = {"world_size": 4, "zero_stage": 2, "global_batch": 64, "micro_batch": 8}
    ref = ckpt.CheckpointRef(url="file:///x/step_00000010", step=10, info=info)
    assert ckpt.check_compatible(ref, {**info, "variant": "B/16"}) == []
    # elastic resume: another number of workers (and so another micro-batch) under ZeRO
    assert ckpt.check_compatible(ref, {**info, "world_size": 2, "micro_batch": 16}) == []
    problems = ckpt.check_compatible(ref, {"world_size": 2, "zero_stage": 3, "global_batch": 32})
    assert problems == ["zero_stage: checkpoint 2, this run 3", "global_batch: checkpoint 64, this run 32"]
    no_zero = ckpt.CheckpointRef(url="file:///x/step_00000010", step=10, info={**info, "zero_stage": 0})
    [problem] = ckpt.check_compatible(no_zero, {**info, "zero_stage": 0, "world_size": 2})
    assert problem.startswith("world_size: checkpoint 4, this run 2") and "train.zero_stage 1, 2 or 3" in problem


def test_rng_state_survives_a_weights_only_round_trip(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.standard_normal()  # leaves a cached Gaussian in numpy's state
    state = ckpt.capture_rng()
    expected = (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist())
    torch.save({"rng": state}, tmp_path / "rank_00000.pt")
    loaded = torch.load(tmp_path / "rank_00000.pt", weights_only=True)["rng"]
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    ckpt.restore_rng(loaded)
    assert (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist()) == expected


class _NotAllowed:
    def __reduce__(self):  # what a malicious checkpoint would do
        return (print, ("this code ran on load",))


def test_deepspeed_checkpoints_are_loaded_weights_only(tmp_path: Path) -> None:
    from pipeline.pretrain.engine import SafeCheckpointEngine

    engine = SafeCheckpointEngine(None)
    ok = tmp_path / "ok.pt"
    torch.save({"module": {"w": torch.ones(2)}, "global_steps": 3}, ok)
    assert engine.load(str(ok))["global_steps"] == 3
    bad = tmp_path / "bad.pt"
    torch.save({"payload": _NotAllowed()}, bad)
    with pytest.raises(RuntimeError, match=r"bad\.pt does not load with weights_only=True"):
        engine.load(str(bad))
