"""Pretraining and transfer on a real Ray cluster of three nodes on this machine (tests/fixtures/ray_nodes.py): a head
without CPUs and two worker nodes with 1 CPU each, each worker node in its own mount namespace with a private
``~/ray_results`` and ``~/.vitpipe``, so that what one node keeps on its local disk the others cannot read.

Every run is a ``ray job submit`` of the real entry point; which node each rank ran on comes from Ray Train's own
record of the run (its state API, ``RAY_TRAIN_ENABLE_STATE_TRACKING=1``), each transfer task's node from Ray's
task records. A worker node is lost the way a machine is: SIGKILL of its raylet, which takes its workers with it.
One module-scoped cluster and four training runs in all; docs/reliability.md (section 11) lists the figures.
"""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from pipeline import storage
from pipeline.data.prepare import PrepareOptions, prepare
from pipeline.export import load_exported_model
from pipeline.pretrain import checkpoints as ckpt
from pipeline.pretrain import ledger
from tests.fixtures.ray_cluster import RayCluster
from tests.fixtures.ray_nodes import MultiNodeCluster, multinode_cluster
from tests.test_reliability_training import EVERY, STEPS, _assert_nothing_lost_or_repeated, _overrides

pytestmark = [pytest.mark.slow, pytest.mark.reliability]


@pytest.fixture(scope="module")
def cluster() -> Iterator[MultiNodeCluster]:
    started = time.monotonic()
    with multinode_cluster() as nodes:
        print(f"3 Ray nodes up in {time.monotonic() - started:.0f}s")
        yield nodes


@pytest.fixture(scope="module")
def bucket(gcs_emulator) -> str:
    from tests.fixtures.gcs import make_bucket

    return make_bucket()


@pytest.fixture(scope="module")
def digits(bucket: str) -> tuple[str, list[str]]:
    """80 real digits (0-4) in 7 shards on the GCS emulator: (manifest URL, every sample key)."""
    from pipeline.data.shards import iter_shard

    out = f"{bucket}/digits"
    prepare(PrepareOptions(source="digits", out=out, classes="0-4", per_class=16, samples_per_shard=12))
    keys = [s.key for url in storage.listdir(out) if url.endswith(".tar") for s in iter_shard(url)]
    assert len(keys) == len(set(keys)) == 80
    return f"{out}/train.manifest.json", keys


def _sets(data: str, root: str, name: str, *extra: str) -> list[str]:
    """The reliability tests' 12 steps of the tiny ViT (ZeRO-2, global batch 16 = 2 ranks x micro 4 x 2
    accumulation, dropout on, a checkpoint every 4 steps, the step ledger on), one rank on each worker node."""
    return _overrides(data, root, name, "scale.placement=STRICT_SPREAD", *extra)


def _job_env() -> dict[str, str]:
    # Ray Train's record of each attempt's workers (rank, node) is kept only with state tracking on.
    return {"STORAGE_EMULATOR_HOST": os.environ["STORAGE_EMULATOR_HOST"], "RAY_TRAIN_ENABLE_STATE_TRACKING": "1"}


def _submit_pretrain(head: RayCluster, sets: list[str]):
    args = [item for value in sets for item in ("--set", value)]
    return head.job_submit("python", "jobs/pretrain.py", "--config", "tiny", *args, env_vars=_job_env(), timeout=1500)


def _dashboard_get(head: RayCluster, path: str) -> dict:
    token = os.environ.get("RAY_AUTH_TOKEN") or (Path.home() / ".ray" / "auth_token").read_text().strip()
    request = urllib.request.Request(head.dashboard_url + path, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def _ranks_by_attempt(cluster: MultiNodeCluster, run_name: str) -> list[dict[int, str]]:
    """Ray Train's record of the run: per attempt, world rank -> the worker node it ran on (by name)."""
    names = cluster.node_names()
    runs = _dashboard_get(cluster.head, "/api/train/v2/runs/v1")["train_runs"]
    [run] = [r for r in runs if r["name"] == run_name]
    attempts = sorted(run["attempts"], key=lambda a: a["start_time_ns"])
    return [{w["world_rank"]: names.get(w["node_id"], "head") for w in a["workers"]} for a in attempts]


@dataclass
class Finished:
    run_dir: str
    seconds: float
    output: str
    attempts: dict[int, list[ledger.Attempt]]
    placements: list[dict[int, str]]

    def committed(self) -> dict[int, dict[int, dict]]:
        return {rank: ledger.committed(attempts) for rank, attempts in self.attempts.items()}


def _forget_listings() -> None:
    """gcsfs keeps directory listings of this process for ever: others are writing."""
    storage.filesystem("gs://any")[0].invalidate_cache()


def _finished(cluster: MultiNodeCluster, run_dir: str, name: str, started: float, proc) -> Finished:
    seconds = time.monotonic() - started
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "succeeded" in output, output[-5000:]
    _forget_listings()
    return Finished(run_dir, seconds, output, ledger.read(run_dir), _ranks_by_attempt(cluster, name))


def _weights(export_url: str) -> dict[str, torch.Tensor]:
    return load_exported_model(export_url).state_dict()


def _local_leftovers(cluster: MultiNodeCluster, name: str) -> list[Path]:
    """Anything of run ``name`` on a worker node's private disk (Ray Train's ~/ray_results, the run home)."""
    return [
        path
        for node in cluster.nodes.values()
        for private in ("ray_results", "vitpipe")
        for path in (node.disk / private).rglob("*")
        if name in str(path)
    ]


@pytest.fixture(scope="module")
def zero2_gs(cluster: MultiNodeCluster, digits, bucket: str) -> Finished:
    """The unfailed ZeRO-2 run, run.root on the GCS emulator."""
    data, _ = digits
    root = f"{bucket}/runs"
    started = time.monotonic()
    proc = _submit_pretrain(cluster.head, _sets(data, root, "zero2"))
    done = _finished(cluster, f"{root}/zero2", "zero2", started, proc)
    print(f"ZeRO-2 on 2 nodes, run.root on gs://: {done.seconds:.0f}s (job submit to SUCCEEDED)")
    return done


@pytest.mark.timeout(1500)
def test_zero2_on_two_nodes_with_a_gs_run_root_trains_one_rank_per_node_and_exports(
    cluster: MultiNodeCluster, zero2_gs: Finished, digits
) -> None:
    """ray job submit of tiny, ZeRO-2, one rank per worker node, every byte of the run on gs://: the job succeeds,
    the export and the checkpoints are on gs://, Ray Train kept its own state there too (not in a node's
    ~/ray_results), and the ledger shows every step once."""
    _, keys = digits
    assert len(zero2_gs.placements) == 1
    [placement] = zero2_gs.placements
    assert sorted(placement.values()) == ["node_a", "node_b"], placement
    assert f"[zero2] step {STEPS}/{STEPS}" in zero2_gs.output
    vit = load_exported_model(f"{zero2_gs.run_dir}/export")
    assert vit.spec.variant == "Mi/4" and vit.spec.num_classes == 5
    steps = [step for step, _ in ckpt.list_step_dirs(f"{zero2_gs.run_dir}/checkpoints")]
    assert steps == [4, 8, 12]
    fs, path = storage.filesystem(f"{zero2_gs.run_dir}/ray")
    fs.invalidate_cache()
    assert any(p.endswith(".validate_storage_marker") for p in fs.find(path))
    assert _local_leftovers(cluster, "zero2") == []
    assert _assert_nothing_lost_or_repeated(zero2_gs, zero2_gs, keys) == 2 * STEPS * 8


@pytest.mark.timeout(900)
def test_transfer_fan_out_runs_on_both_worker_nodes(
    cluster: MultiNodeCluster, zero2_gs: Finished, bucket, mlflow_server
):
    """jobs/transfer.py from the gs:// export of the ZeRO-2 run, lfw at two learning rates on gs://: the two runs are
    Ray tasks of 1 CPU each; each worker node has 1, so they run on both nodes, and both finish."""
    from mlflow import MlflowClient
    from ray.util.state import list_tasks

    data_root = f"{bucket}/benchmarks"
    prepare(PrepareOptions(source="lfw", out=f"{data_root}/lfw", split="all"))
    sets = ["resolution=24", "steps=4", "warmup_steps=1", "batch_size=8", "eval_every=2", "seeds=1", "lrs=0.01,0.03"]
    started = time.monotonic()
    proc = cluster.head.job_submit(
        "python",
        "jobs/transfer.py",
        "--pretrained",
        f"{zero2_gs.run_dir}/export",
        "--benchmarks",
        "lfw",
        "--tracking-uri",
        mlflow_server.url,
        "--experiment",
        "multinode-transfer",
        *[arg for s in [f"data_root={data_root}", *sets] for arg in ("--set", s)],
        env_vars={"STORAGE_EMULATOR_HOST": os.environ["STORAGE_EMULATOR_HOST"]},
        timeout=800,
    )
    seconds = time.monotonic() - started
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    tasks = list_tasks(
        address=cluster.head.dashboard_url, filters=[("func_or_class_name", "=", "_ray_task")], detail=True
    )
    names = cluster.node_names()
    finished = [t for t in tasks if t.state == "FINISHED"]
    assert len(finished) == 2, [(t.name, t.state) for t in tasks]
    assert sorted(names[t.node_id] for t in finished) == ["node_a", "node_b"]
    client = MlflowClient(mlflow_server.url)
    experiment = client.get_experiment_by_name("multinode-transfer")
    children = client.search_runs([experiment.experiment_id], filter_string="attributes.status = 'FINISHED'")
    assert len(children) == 3  # the sweep and its two runs
    print(f"transfer: 2 runs on node_a and node_b in {seconds:.0f}s (job submit to SUCCEEDED)")


@pytest.mark.timeout(1500)
def test_a_local_run_root_is_refused_on_two_nodes_and_a_declared_shared_one_trains_zero3(
    cluster: MultiNodeCluster, digits, tmp_path: Path
) -> None:
    """run.root=file://<a directory every node of this machine mounts> and a local SQLite MLflow store: both refused
    at preflight (exit 2, the documented messages, nothing written or tracked); with run.shared_filesystem=true a
    ZeRO-3 run trains one rank per node and exports."""
    data, _ = digits
    root = (tmp_path / "runs").as_uri()
    sets = _sets(data, root, "zero3", "train.zero_stage=3", "train.steps=8")
    local_store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    started = time.monotonic()
    refused = _submit_pretrain(cluster.head, [*sets, "tracking.enabled=true", f"tracking.uri={local_store}"])
    refused_s = time.monotonic() - started
    output = refused.stdout + refused.stderr
    assert refused.returncode != 0, output[-3000:]
    assert (
        f"run.root: {root} is a local path and the Ray cluster has 2 nodes that can run workers: each node would "
        "write and resume its own checkpoints" in output
    ), output[-3000:]
    assert "--set run.shared_filesystem=true" in output and "exit code 2" in output, output[-3000:]
    assert f"tracking.uri: {local_store} is a local MLflow store and the Ray cluster has 2 nodes" in output
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()

    started = time.monotonic()
    proc = _submit_pretrain(cluster.head, [*sets, "run.shared_filesystem=true"])
    seconds = time.monotonic() - started
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "succeeded" in output, output[-5000:]
    [placement] = _ranks_by_attempt(cluster, "zero3")
    assert sorted(placement.values()) == ["node_a", "node_b"], placement
    assert load_exported_model(f"{root}/zero3/export").spec.variant == "Mi/4"
    assert [step for step, _ in ckpt.list_step_dirs(f"{root}/zero3/checkpoints")] == [4, 8]
    committed = {rank: ledger.committed(a) for rank, a in ledger.read(f"{root}/zero3").items()}
    assert {rank: sorted(steps) for rank, steps in committed.items()} == {0: list(range(1, 9)), 1: list(range(1, 9))}
    print(f"file:// root refused in {refused_s:.0f}s (job submit to FAILED); ZeRO-3 on 2 nodes: {seconds:.0f}s")


@pytest.mark.timeout(1800)
def test_a_worker_node_lost_mid_run_is_replaced_and_the_run_resumes_from_the_last_checkpoint(
    cluster: MultiNodeCluster, zero2_gs: Finished, digits, bucket: str
) -> None:
    """The ZeRO-2 run again, with scale.max_failures=2: once a checkpoint is complete and rank 1 has trained past it,
    node_b's raylet is SIGKILLed (its workers die with it) and node_b is started again with the same resources and
    disk. Ray Train restarts the worker group on the two nodes; the restart resumes from the newest complete
    checkpoint, every step is committed exactly once with exactly the unfailed run's samples, and the final
    weights equal the unfailed run's bit for bit."""
    data, keys = digits
    root = f"{bucket}/runs"
    run_dir = f"{root}/killed"
    checkpoints = f"{run_dir}/checkpoints"
    rank1 = f"{ledger.rank_dir(run_dir, 1)}/attempt-000.jsonl"
    results: list = []
    started = time.monotonic()
    job = threading.Thread(
        target=lambda: results.append(
            _submit_pretrain(cluster.head, _sets(data, root, "killed", "scale.max_failures=2"))
        )
    )
    job.start()
    try:
        # Rank 1 writes a step's ledger line after that step's checkpoint is complete: its line of step EVERY + 1
        # means a checkpoint exists and a step past it was trained.
        deadline = time.monotonic() + 900
        while max(_steps_in(rank1), default=0) <= EVERY:
            assert job.is_alive() and time.monotonic() < deadline, "the run ended before the kill"
            time.sleep(0.2)
        node = cluster.nodes["node_b"]
        worker = _worker_pids(cluster, "killed")["node_b"]
        raylet = node.kill_raylet()
        killed_at = time.monotonic()
        worker_gone_s = _wait_gone(worker, killed_at)
        _forget_listings()
        complete_at_kill = ckpt.latest_complete(checkpoints, quiet=True)
        trained_at_kill = max(_steps_in(rank1))
        node.start()
        node_back_s = time.monotonic() - killed_at
        restart_s = resumed_s = None
        attempt1 = [f"{ledger.rank_dir(run_dir, r)}/attempt-001.jsonl" for r in (0, 1)]
        while job.is_alive() and resumed_s is None:
            _forget_listings()
            if restart_s is None and all(storage.exists(url) for url in attempt1):
                restart_s = time.monotonic() - killed_at
            if restart_s is not None and all(_steps_in(url) for url in attempt1):
                resumed_s = time.monotonic() - killed_at
            time.sleep(0.3)
    finally:
        job.join(timeout=1500)
    killed = _finished(cluster, run_dir, "killed", started, results[0])

    assert len(killed.placements) == 2, killed.placements
    for placement in killed.placements:
        assert sorted(placement.values()) == ["node_a", "node_b"], killed.placements
    starts = {rank: [a.resumed_from_step for a in attempts] for rank, attempts in killed.attempts.items()}
    assert starts == {0: [0, complete_at_kill.step], 1: [0, complete_at_kill.step]}, (starts, complete_at_kill)
    assert complete_at_kill.step >= EVERY and trained_at_kill > complete_at_kill.step
    # The steps rank 1 trained past the checkpoint before it died (read once its process was gone: a worker lives
    # on for a moment after its raylet) were lost and done again.
    lost = [step for _, step in ledger.redone(killed.attempts[1])]
    assert lost == list(range(complete_at_kill.step + 1, trained_at_kill + 1)), (lost, trained_at_kill)
    samples = _assert_nothing_lost_or_repeated(killed, zero2_gs, keys)  # and each step's samples are the unfailed run's
    baseline, after = _weights(f"{zero2_gs.run_dir}/export"), _weights(f"{run_dir}/export")
    assert after.keys() == baseline.keys()
    assert all(torch.equal(after[k], baseline[k]) for k in after), "weights differ from the unfailed run's"
    assert _local_leftovers(cluster, "killed") == []
    print(
        f"node_b's raylet (pid {raylet}) SIGKILLed after step {trained_at_kill} (checkpoint {complete_at_kill.step}); "
        f"its Ray Train worker gone {worker_gone_s:.1f}s later; node back in {node_back_s:.0f}s; worker group "
        f"restarted {restart_s:.0f}s and training resumed {resumed_s:.0f}s after the kill; steps {lost} redone; "
        f"{samples} samples committed, none lost or repeated; run {killed.seconds:.0f}s "
        f"(unfailed: {zero2_gs.seconds:.0f}s)"
    )


def _worker_pids(cluster: MultiNodeCluster, run_name: str) -> dict[str, int]:
    """node name -> pid of the run's Ray Train worker there (its latest attempt), from Ray Train's record."""
    names = cluster.node_names()
    runs = _dashboard_get(cluster.head, "/api/train/v2/runs/v1")["train_runs"]
    [run] = [r for r in runs if r["name"] == run_name]
    latest = max(run["attempts"], key=lambda a: a["start_time_ns"])
    return {names[w["node_id"]]: w["pid"] for w in latest["workers"]}


def _wait_gone(pid: int, since: float, timeout: float = 120) -> float:
    """Seconds from ``since`` until process ``pid`` no longer exists; fails after ``timeout``."""
    import psutil

    while True:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.NoSuchProcess:
            break
        assert time.monotonic() - since < timeout, f"process {pid} outlived its raylet by {timeout}s"
        time.sleep(0.1)
    return time.monotonic() - since


def _steps_in(url: str) -> list[int]:
    """Steps recorded so far in one rank's ledger object of one attempt ([] until it exists)."""
    try:
        lines = storage.read_bytes(url).decode().splitlines()
    except FileNotFoundError:  # not written yet
        return []
    return [json.loads(line)["step"] for line in lines[1:] if line.strip()]
