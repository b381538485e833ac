"""A real bf16 ZeRO-2 checkpoint of two gloo ranks: each rank fetches only its own optimizer partition on resume.

DeepSpeed names the optimizer partitions of a bf16 run ``bf16_zero_pp_rank_<r>_...`` (fp32: ``zero_pp_rank_<r>_...``).
"""

from __future__ import annotations

import multiprocessing
import os
import socket
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

STEPS = 2


def _config() -> dict:
    return {
        "train_batch_size": 4,
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 2},
        "bf16": {"enabled": True},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
        "steps_per_print": 1 << 60,
    }


def _engine(torch_module):
    import deepspeed

    from pipeline.pretrain.engine import SafeCheckpointEngine

    torch_module.manual_seed(0)
    model = torch_module.nn.Sequential(torch_module.nn.Linear(8, 16), torch_module.nn.Linear(16, 4))
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=_config())
    engine.checkpoint_engine = SafeCheckpointEngine(engine._config)  # loads with weights_only=True, as a run does
    return engine


def _master_weights(engine) -> list:
    from deepspeed.utils import safe_get_full_fp32_param

    return [safe_get_full_fp32_param(p).clone() for p in engine.module.parameters()]


def _save_and_resume(rank: int, port: int, checkpoint_dir: str, out: multiprocessing.Queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK="0")
    import torch
    import torch.distributed as dist

    from pipeline import storage
    from pipeline.pretrain import checkpoints as ckpt

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    engine = _engine(torch)
    generator = torch.Generator().manual_seed(rank)
    for _ in range(STEPS):
        x = torch.randn(2, 8, generator=generator).to(torch.bfloat16)
        engine.backward(engine(x).float().pow(2).mean())
        engine.step()
    saved = _master_weights(engine)
    ckpt.save(engine, checkpoint_dir, STEPS, rank=rank, rank_state={"step": STEPS}, info={"world_size": 2}, keep_last=1)

    fresh = _engine(torch)
    fetched: list[str] = []
    real_get_file = storage.get_file

    def recording_get_file(url: str, local) -> None:  # the real download, with a note of what it fetched
        fetched.append(url.rsplit("/", 1)[-1])
        real_get_file(url, local)

    storage.get_file = recording_get_file
    try:
        state = ckpt.load(fresh, ckpt.latest_complete(checkpoint_dir), rank=rank)
    finally:
        storage.get_file = real_get_file
    restored = _master_weights(fresh)
    same = all(torch.equal(a, b) for a, b in zip(saved, restored, strict=True))
    marker_files = ckpt.latest_complete(checkpoint_dir).info["files"]
    dist.destroy_process_group()
    out.put((rank, sorted(fetched), marker_files, same, state["step"], bool(fresh.bfloat16_enabled())))


def test_each_rank_fetches_only_its_own_bf16_zero2_partition_on_resume(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    checkpoint_dir = (tmp_path / "checkpoints").as_uri()
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_save_and_resume, args=(rank, port, checkpoint_dir, out)) for rank in (0, 1)]
    for proc in procs:
        proc.start()
    results = sorted(out.get(timeout=300) for _ in procs)
    for proc in procs:
        proc.join(timeout=60)
        assert proc.exitcode == 0
    optim = "bf16_zero_pp_rank_{}_mp_rank_00_optim_states.pt"
    for rank, fetched, files, same, step, bf16 in results:
        # The checkpoint really is a bf16 one: both partitions carry DeepSpeed's bf16 name.
        assert bf16 and {optim.format(0), optim.format(1)} <= set(files), files
        assert fetched == sorted(["mp_rank_00_model_states.pt", optim.format(rank), f"rank_{rank:05d}.pt"]), fetched
        assert same and step == STEPS  # and it resumed: the fp32 master weights are those saved
