"""The run's storage is the one truth of a run: Ray Train's own state follows ``run.root`` (``gs://`` included), a
node-local ``file://`` root is refused on a cluster of several nodes, and every rank resumes from rank 0's choice.

The several-node cases with private local disks are in tests/test_multinode.py.
"""

from __future__ import annotations

import multiprocessing
import socket
from pathlib import Path

import pytest

from pipeline import storage
from pipeline.config import load_config
from pipeline.data.prepare import PrepareOptions, prepare
from pipeline.pretrain import check_before_launch, run
from pipeline.pretrain import checkpoints as ckpt
from pipeline.pretrain.shared_storage import agreed_checkpoint, check_shared_root, check_shared_tracking


def _node(port: int, cpus: float) -> dict:
    return {"Alive": True, "NodeManagerAddress": "10.0.0.1", "NodeManagerPort": port, "Resources": {"CPU": cpus}}


def test_a_local_run_root_is_refused_on_several_nodes_unless_declared_shared() -> None:
    head_without_cpus, worker_a, worker_b = _node(1, 0), _node(2, 1), _node(3, 1)
    dead = {**_node(4, 1), "Alive": False}
    two = [head_without_cpus, worker_a, worker_b]
    (problem,) = check_shared_root("file:///srv/runs", False, two)
    assert problem.startswith("run.root: file:///srv/runs") and "2 nodes" in problem
    assert "run.shared_filesystem=true" in problem and "gs://" in problem
    assert check_shared_root("file:///srv/runs", True, two) == []
    assert check_shared_root("gs://bucket/runs", False, two) == []
    assert check_shared_root("file:///srv/runs", False, [head_without_cpus, worker_a, dead]) == []


def test_a_local_mlflow_store_is_refused_on_several_nodes_unless_declared_shared() -> None:
    head_without_cpus, worker_a, worker_b = _node(1, 0), _node(2, 1), _node(3, 1)
    two, one = [head_without_cpus, worker_a, worker_b], [head_without_cpus, worker_a]
    default = load_config("tiny").tracking.uri
    assert default.startswith("sqlite:///")
    (problem,) = check_shared_tracking(default, True, False, two)
    assert problem.startswith(f"tracking.uri: {default} is a local MLflow store") and "2 nodes" in problem
    assert "tracking.uri=http://" in problem and "tracking.enabled=false" in problem
    assert len(check_shared_tracking("file:///srv/mlruns", True, False, two)) == 1
    assert check_shared_tracking(default, True, True, two) == []
    assert check_shared_tracking(default, False, False, two) == []
    assert check_shared_tracking("http://127.0.0.1:5000", True, False, two) == []
    assert check_shared_tracking(default, True, False, one) == []


def test_the_refusal_is_on_the_config_the_driver_sees() -> None:
    cfg = load_config("tiny", ["run.shared_filesystem=true"])
    assert cfg.run.shared_filesystem is True
    assert load_config("tiny").run.shared_filesystem is False


# ---------------------------------------------------------------------------------------------------------------
# rank 0 chooses the checkpoint


def _complete_checkpoint(checkpoint_dir: Path, step: int) -> None:
    url = storage.join(checkpoint_dir.as_uri(), ckpt.step_dir_name(step))
    storage.write_bytes(storage.join(url, "rank_00000.pt"), b"x")
    storage.mark_complete(url, {"step": step, "files": ["rank_00000.pt"]})


def _choose(rank: int, port: int, checkpoint_dir: str, out: multiprocessing.Queue) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        ref = agreed_checkpoint(checkpoint_dir, rank=rank)
        out.put((rank, ref.step if ref else None, ref.url if ref else None))
    finally:
        dist.destroy_process_group()


def test_every_rank_resumes_from_the_checkpoint_rank_0_chose(tmp_path: Path) -> None:
    """Two real gloo ranks, each looking at its own directory (node-local leftovers): rank 1's holds a newer complete
    checkpoint, yet both ranks get rank 0's (step 4)."""
    dirs = [tmp_path / "rank0", tmp_path / "rank1"]
    _complete_checkpoint(dirs[0], 4)
    _complete_checkpoint(dirs[1], 4)
    _complete_checkpoint(dirs[1], 8)
    assert ckpt.latest_complete(dirs[1].as_uri()).step == 8  # what rank 1 would pick on its own
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_choose, args=(rank, port, dirs[rank].as_uri(), out)) for rank in (0, 1)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)
        assert proc.exitcode == 0
    chosen = sorted(out.get(timeout=5) for _ in procs)
    expected_url = storage.join(dirs[0].as_uri(), ckpt.step_dir_name(4))
    assert chosen == [(0, 4, expected_url), (1, 4, expected_url)]


# ---------------------------------------------------------------------------------------------------------------
# Ray Train's own state on the run's storage


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ray_train_keeps_its_run_state_under_a_gs_run_root(tmp_path: Path, gcs_bucket: str, ray_connected) -> None:
    """A 4-step tiny run with run.root on the GCS emulator: Ray Train's storage marker and the reported pointer
    checkpoint are written under gs://<bucket>/runs/<name>/ray, not in a node's ~/ray_results."""
    data = tmp_path / "data"
    prepare(PrepareOptions(source="digits", out=data.as_uri(), classes="0-4", per_class=8, samples_per_shard=10))
    root = f"{gcs_bucket}/runs"
    cfg = load_config(
        "tiny",
        [
            f"data.train={(data / 'train.manifest.json').as_uri()}",
            "data.eval=null",
            "eval.every_steps=0",
            f"run.root={root}",
            "run.name=gs-state",
            "train.steps=4",
            "train.global_batch=16",
            "train.micro_batch=8",
            "optim.warmup_steps=1",
            "checkpoint.every_steps=4",
            "tracking.enabled=false",
        ],
    )
    result = run(cfg, check_before_launch(cfg))
    assert result.status == "finished" and result.step == 4
    ray_dir = f"{root}/gs-state/ray/gs-state"
    fs, path = storage.filesystem(ray_dir)
    fs.invalidate_cache()
    found = [p[len(path) :].lstrip("/") for p in fs.find(path)]
    assert ".validate_storage_marker" in found, found
    assert any(p.startswith("checkpoint_") for p in found), found  # rank 0's pointer, reported to Ray Train
