"""A transfer fan-out that loses two of its benchmarks, one to bad data and one to SIGKILL, and says so everywhere.

One sweep on the real local Ray head and MLflow server (fixtures) fine-tunes a tiny pretrained ViT on:
- ``digits_heldout``: healthy;
- a test-only benchmark added through the public registry API, whose training shards are valid tars with a valid
  manifest (so planning accepts it) but whose every JPEG is cut in half: its runs crash for real inside the task;
- ``lfw``, long enough to be running when the test SIGKILLs its Ray worker process (the transfer code has no
  hook to make a task kill itself, so the signal comes from the test, as from an OOM killer or a lost node).
  MLflow goes down (HTTP 503 from ``tests/fixtures/faulty_proxy.py``) just before the kill and comes back 6 s
  later, so the driver's writes for the dead run meet the outage.

Afterwards: the two broken runs are FAILED in MLflow with an error that says why (the shard's URL, the dead
worker), the healthy ones FINISHED, the parent sweep FINISHED with ``failed`` status rows, and the comparison
printed by ``jobs/compare.py`` shows ``failed`` for both broken benchmarks and ``—`` for benchmarks never run,
instead of dropping any row. (tests/test_transfer.py covers a non-tar shard and a kill in separate sweeps.)
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from ray.exceptions import WorkerCrashedError

import model as vit_model
from pipeline import results as schema
from pipeline.data.prepare import PrepareOptions, prepare
from pipeline.export import save_exported_model
from pipeline.transfer import orchestrate, tasks
from pipeline.transfer.orchestrate import run_sweep
from pipeline.transfer.summary import ERROR_TAG
from tests.fixtures.faulty_proxy import FaultyProxy

pytestmark = [pytest.mark.reliability, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
UNDECODABLE = "reliability_undecodable"
LABEL = "tiny-reliability"
FAST = ["resolution=24", "steps=4", "warmup_steps=1", "batch_size=8", "eval_every=0", "seeds=1", "lrs=0.01"]


def _halve_every_jpeg(shard: Path) -> None:
    """Rewrite a shard with each image cut to its first half: the header parses, the pixels never decode."""
    out = io.BytesIO()
    with tarfile.open(shard) as src, tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as dst:
        for info in src:
            data = src.extractfile(info).read()
            if info.name.endswith(".jpg"):
                data = data[: len(data) // 2]
            info.size = len(data)
            dst.addfile(info, io.BytesIO(data))
    shard.write_bytes(out.getvalue())


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("benchmarks")
    url = f"file://{root}"
    prepare(PrepareOptions(source="digits", out=f"{url}/digits_heldout", split="train", classes="5-9", per_class=4))
    for split in ("minival", "test"):
        prepare(PrepareOptions(source="digits", out=f"{url}/digits_heldout", split=split, classes="5-9"))
    prepare(PrepareOptions(source="lfw", out=f"{url}/lfw", split="all"))
    shutil.copytree(root / "digits_heldout", root / UNDECODABLE)
    for shard in sorted((root / UNDECODABLE).glob("train-*.tar")):
        _halve_every_jpeg(shard)
    return url


@pytest.fixture(scope="module")
def undecodable_benchmark():
    benchmark = tasks.REGISTRY["digits_heldout"].model_copy(update={"name": UNDECODABLE, "prepare_args": ()})
    tasks.register_benchmark(benchmark, replace=True)
    yield benchmark
    del tasks.REGISTRY[UNDECODABLE]


@pytest.fixture(scope="module")
def export_url(tmp_path_factory) -> str:
    vit = vit_model.create_vit("Mi/4", num_classes=5, img_size=16, representation_size=128)
    return save_exported_model(vit, f"file://{tmp_path_factory.mktemp('export')}/tiny", metadata={"run_name": LABEL})


def _kill_when_running(
    cluster, task_prefix: str, sweep: threading.Thread, timeout: float = 300, just_before=lambda: None
) -> int:
    """SIGKILL the Ray worker process running the first task named ``task_prefix...`` (calling ``just_before()``
    first); returns its pid."""
    from ray.util.state import list_tasks

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and sweep.is_alive():
        # The cluster's own address: other Ray instances may run on this machine.
        running = list_tasks(
            address=cluster.dashboard_url,
            filters=[("state", "=", "RUNNING")],
            detail=True,
            raise_on_missing_output=False,
        )
        victim = next((t for t in running if t.name.startswith(task_prefix) and t.worker_pid), None)
        if victim is not None:
            time.sleep(2)  # into its training loop, past model building
            just_before()
            os.kill(victim.worker_pid, signal.SIGKILL)
            return victim.worker_pid
        time.sleep(0.5)
    raise AssertionError(f"no task {task_prefix!r} was seen running within {timeout}s")


def _markdown_rows(table: str) -> dict[str, dict[str, str]]:
    lines = [line.strip().strip("|").split("|") for line in table.splitlines() if line.startswith("|")]
    header = [h.strip() for h in lines[0]]
    return {cells[0].strip(): dict(zip(header[1:], (c.strip() for c in cells[1:]), strict=True)) for cells in lines[2:]}


@pytest.mark.timeout(900)
def test_a_sweep_that_loses_one_benchmark_to_bad_data_and_one_to_sigkill_reports_both_and_finishes_the_rest(
    ray_connected, mlflow_server, data_root, undecodable_benchmark, export_url, tmp_path, monkeypatch, caplog
):
    box: dict = {}
    # The driver's MLflow calls go through a proxy that fails them for 6 s around the kill. MLflow's own
    # per-request retries (~13 s) are turned off in this process, so that 6 s stand for an outage longer than
    # they cover; the driver retries a write for 4 s, then sets it aside until the sweep ends.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setattr(orchestrate, "TRACKING_RETRY_S", 4.0)
    proxy = FaultyProxy(mlflow_server.url)

    def sweep() -> None:
        try:
            box["result"] = run_sweep(
                pretrained=export_url,
                benchmarks=["digits_heldout", UNDECODABLE, "lfw"],
                data_root=data_root,
                tracking_uri=proxy.url,
                experiment="transfer-reliability",
                sets=[*FAST, "lfw.steps=100000"],  # lfw trains until it is killed
            )
        except BaseException as exc:  # surfaced by the assertions below, not lost in the thread
            box["error"] = exc

    thread = threading.Thread(target=sweep, daemon=True)
    thread.start()
    with caplog.at_level("WARNING"):
        _kill_when_running(ray_connected, "lfw ", thread, just_before=lambda: proxy.outage("503", seconds=6))
        thread.join(timeout=600)
    proxy.close()
    assert not thread.is_alive(), "the sweep did not finish after its lfw run was killed"
    assert "error" not in box, f"the sweep itself failed: {box.get('error')!r}"
    result = box["result"]
    # The driver met the outage when it recorded the killed run, rode it out, and lost no write.
    assert proxy.counts["503"] >= 1
    met = [r.getMessage() for r in caplog.records if "lfw lr=0.01 seed=0 [pretrained]" in r.getMessage()]
    assert any("MLflow" in m and ("failed" in m or "could not record" in m) for m in met), met
    assert result.untracked == []

    client = MlflowClient(mlflow_server.url)
    parent = client.get_run(result.run_id)
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{result.run_id}'", max_results=100
    )
    by_benchmark = {c.data.tags["benchmark"]: c for c in children}
    assert sorted(by_benchmark) == sorted(["digits_heldout", UNDECODABLE, "lfw"]) and len(children) == 3

    crashed = by_benchmark[UNDECODABLE]
    assert crashed.info.status == "FAILED"
    error = crashed.data.tags[ERROR_TAG]
    assert error.startswith("DataError") and f"{UNDECODABLE}/train-000000.tar" in error, error

    killed = by_benchmark["lfw"]
    assert killed.info.status == "FAILED"
    # The death of its worker process, as Ray reports a SIGKILL: not any error that mentions a worker.
    assert killed.data.tags[ERROR_TAG] == f"WorkerCrashedError: {WorkerCrashedError()}", killed.data.tags

    healthy = by_benchmark["digits_heldout"]
    assert healthy.info.status == "FINISHED"
    # What MLflow holds is exactly what the run returned.
    (returned,) = [o.metrics for o in result.outcomes if o.spec.benchmark == "digits_heldout"]
    assert healthy.data.metrics["test_accuracy"] == returned["test_accuracy"]
    assert parent.data.metrics["digits_heldout/test_accuracy"] == returned["test_accuracy"]  # one seed, one lr

    # The sweep as a whole completed, and its summary keeps the failures as rows.
    assert parent.info.status == "FINISHED"
    assert parent.data.tags[schema.status_tag(UNDECODABLE)] == schema.STATUS_FAILED
    assert parent.data.tags[schema.status_tag("lfw")] == schema.STATUS_FAILED
    assert parent.data.tags[schema.status_tag("digits_heldout")] == schema.STATUS_OK
    assert sorted(o.spec.benchmark for o in result.failed) == sorted([UNDECODABLE, "lfw"])

    # What a user reads: jobs/compare.py's table, with the paper's benchmarks listed too.
    compare = subprocess.run(
        [
            sys.executable,
            str(REPO / "jobs" / "compare.py"),
            "--runs",
            result.run_id,
            "--tracking-uri",
            mlflow_server.url,
            "--out",
            str(tmp_path / "compare"),
            "--no-log",
            "--paper-rows",
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert compare.returncode == 0, compare.stderr[-3000:]
    rows = _markdown_rows(compare.stdout)
    assert rows[UNDECODABLE][LABEL] == "failed"
    assert rows["lfw"][LABEL] == "failed"
    assert rows["digits_heldout"][LABEL] == f"{100 * parent.data.metrics['digits_heldout/test_accuracy']:.2f}"
    assert rows["cifar10"][LABEL] == "—"  # a paper benchmark this sweep never ran: a visible gap, not a dropped row
