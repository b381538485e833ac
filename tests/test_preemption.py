"""Preemption with a real SIGTERM: a pretraining job told to stop mid-run checkpoints the step it is on, exits with
EXIT_PREEMPTED, leaves its MLflow run KILLED, and a resubmission resumes there.

Two tests: the local launcher (one process), and under Ray (the session's Ray head, 2 Ray Train workers, DeepSpeed
ZeRO-2) one run of four jobs: SIGTERM to a worker process, SIGTERM to the driver before any worker started, SIGTERM
to the driver mid-training, then a job that finishes; the step ledger proves that no step was lost or redone."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_pretrain import _small, digits  # noqa: F401 (digits is a fixture)

from pipeline.pretrain import checkpoints as ckpt
from pipeline.pretrain.preemption import EXIT_PREEMPTED

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
STEP_LINE = re.compile(r"step (\d+)/30 ")


def _command(digits: str, root: Path, uri: str, *extra: str) -> list[str]:  # noqa: F811
    overrides = _small(
        digits,
        root,
        "preempted",
        "scale.launcher=local",
        "scale.workers=1",
        "train.steps=30",
        "checkpoint.every_steps=100",  # no periodic checkpoint: only the preemption writes one
        "train.log_every=1",
        *extra,
        tracking=uri,
    )
    return [sys.executable, "jobs/pretrain.py", "--config", "tiny", *(x for o in overrides for x in ("--set", o))]


@pytest.mark.timeout(600)
def test_sigterm_checkpoints_the_current_step_exits_preempted_and_a_resubmission_resumes_there(
    digits: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    job = subprocess.Popen(
        _command(digits, tmp_path, uri), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    stderr: list[str] = []
    signalled = threading.Event()
    sent_at: list[float] = []

    def read_log() -> None:  # SIGTERM once step 3 is logged, then keep reading
        for line in job.stderr:
            stderr.append(line)
            match = STEP_LINE.search(line)
            if match and int(match.group(1)) >= 3 and not signalled.is_set():
                sent_at.append(time.monotonic())
                job.send_signal(signal.SIGTERM)
                signalled.set()

    reader = threading.Thread(target=read_log, daemon=True)
    reader.start()
    stdout = job.stdout.read()
    job.wait(timeout=300)
    reader.join(timeout=10)
    stop_s = time.monotonic() - sent_at[0]
    log = "".join(stderr)
    assert job.returncode == EXIT_PREEMPTED, (stdout + log)[-4000:]
    steps = [int(m.group(1)) for m in STEP_LINE.finditer(log)]
    last_step = steps[-1]
    print(f"SIGTERM after step 3 was logged; the job stopped after step {last_step}, {stop_s:.1f} s later")
    assert 3 <= last_step < 30 and f"checkpointed step {last_step} of 30" in stdout
    # The checkpoint holds the last step done: nothing is lost, nothing will be redone.
    assert ckpt.latest_complete((tmp_path / "preempted" / "checkpoints").as_uri()).step == last_step
    assert stop_s < 60, stop_s  # at most one step and one checkpoint, on a busy machine

    from mlflow import MlflowClient

    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("vit-pretrain").experiment_id])
    assert run.info.status == "KILLED"

    again = subprocess.run(
        _command(digits, tmp_path, uri, f"train.stop_at_step={last_step + 1}"),
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    assert f"at step {last_step}" in again.stderr and f"stopped at step {last_step + 1} of 30" in again.stdout


# ---------------------------------------------------------------------------------------------------------------
# Under Ray: SIGTERM to a Ray Train worker, then to the driver (jobs/pretrain.py against the session's Ray head)

RAY_STEPS = 24
RAY_STEP_LINE = re.compile(rf"step (\d+)/{RAY_STEPS} ")
WORKER_PID = re.compile(r"pid=(\d+)\) world_rank=(\d+)")


@dataclass
class Job:
    returncode: int
    output: str  # stdout and stderr together: the driver's own lines and the workers' forwarded ones
    signalled_at_step: int | None
    stop_s: float | None  # from the signal to the job's exit
    signalled_pid: int | None
    signalled_wall: float | None  # time.time() of the signal

    def checkpoint_s(self, run_dir: Path, step: int) -> float:
        """Seconds from the signal to the completion marker of the checkpoint of ``step``."""
        from pipeline.storage import COMPLETE_MARKER

        marker = run_dir / "checkpoints" / ckpt.step_dir_name(step) / COMPLETE_MARKER
        return marker.stat().st_mtime - (self.signalled_wall or 0.0)


def _ray_job(
    cluster,
    digits: str,  # noqa: F811
    root: Path,
    uri: str,
    *,
    signal_at_step: int | None = None,
    signal_on_line: str | None = None,
    worker_rank: int | None = None,
) -> Job:
    """jobs/pretrain.py on 2 Ray Train workers (ZeRO-2, no periodic checkpoint, no restart allowed: a worker that dies
    fails the run). Once step ``signal_at_step`` is logged (or a line containing ``signal_on_line`` is printed),
    SIGTERM goes to the worker of ``worker_rank``, or to the job itself when that is None."""
    overrides = _small(
        digits,
        root,
        "preempted-ray",
        f"train.steps={RAY_STEPS}",
        "checkpoint.every_steps=100",
        "train.log_every=1",
        "train.ledger=true",
        "scale.max_failures=0",
        tracking=uri,
    )
    command = [sys.executable, "jobs/pretrain.py", "--address", cluster.address, "--config", "tiny"]
    job = subprocess.Popen(
        command + [x for o in overrides for x in ("--set", o)],
        cwd=REPO,
        env=cluster.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    pids: dict[int, int] = {}
    sent: list[tuple[float, int, int, float]] = []  # (monotonic time, step, pid, wall time)
    for line in job.stdout:
        lines.append(line)
        if match := WORKER_PID.search(line):
            pids[int(match.group(2))] = int(match.group(1))
        match = RAY_STEP_LINE.search(line)
        step = int(match.group(1)) if match else 0
        at_step = signal_at_step is not None and match is not None and step >= signal_at_step
        if not sent and (at_step or (signal_on_line is not None and signal_on_line in line)):
            pid = job.pid if worker_rank is None else pids[worker_rank]
            os.kill(pid, signal.SIGTERM)
            sent.append((time.monotonic(), step, pid, time.time()))
    job.wait(timeout=60)
    ended = time.monotonic()
    return Job(
        job.returncode,
        "".join(lines),
        sent[0][1] if sent else None,
        ended - sent[0][0] if sent else None,
        sent[0][2] if sent else None,
        sent[0][3] if sent else None,
    )


def _last_step(output: str) -> int:
    return [int(m.group(1)) for m in RAY_STEP_LINE.finditer(output)][-1]


@pytest.mark.reliability
@pytest.mark.timeout(900)
def test_sigterm_to_a_ray_worker_or_to_the_ray_driver_checkpoints_the_step_exits_preempted_and_resumes_there(
    ray_cluster,
    digits: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    from mlflow import MlflowClient

    from pipeline.pretrain import ledger
    from pipeline.pretrain.preemption import STOP_MARKER

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_dir = tmp_path / "preempted-ray"
    checkpoints = (run_dir / "checkpoints").as_uri()
    client = MlflowClient(uri)

    def mlflow_status() -> str:
        [run] = client.search_runs([client.get_experiment_by_name("vit-pretrain").experiment_id])
        return run.info.status

    # 1. SIGTERM to rank 1's worker process: the run stops at the next step boundary with a checkpoint of it. Had
    # the worker died (Ray's own handler), the run would have failed: scale.max_failures=0.
    started = time.monotonic()
    worker = _ray_job(ray_cluster, digits, tmp_path, uri, signal_at_step=3, worker_rank=1)
    first_s = time.monotonic() - started
    assert worker.returncode == EXIT_PREEMPTED, worker.output[-4000:]
    stopped_at = _last_step(worker.output)
    assert 3 <= stopped_at < RAY_STEPS and f"checkpointed step {stopped_at} of {RAY_STEPS}" in worker.output
    assert "SIGTERM: checkpointing at the end of this step" in worker.output
    assert ckpt.latest_complete(checkpoints).step == stopped_at
    assert mlflow_status() == "KILLED"
    print(
        f"worker pid {worker.signalled_pid} SIGTERMed once step {worker.signalled_at_step} was logged: the run "
        f"checkpointed step {stopped_at} {worker.checkpoint_s(run_dir, stopped_at):.1f} s after the signal and the "
        f"job exited {worker.stop_s:.1f} s after it ({first_s:.0f} s for the job)"
    )

    # 2. SIGTERM to the driver before any worker started (once its pre-flight is printed, while it connects to Ray or
    # opens the run): no worker starts, no checkpoint is written, the job exits 75 and the MLflow run is KILLED.
    early = _ray_job(ray_cluster, digits, tmp_path, uri, signal_on_line="pretrain: run preempted-ray")
    assert early.returncode == EXIT_PREEMPTED, early.output[-4000:]
    assert "Started training worker group" not in early.output and "preempted (SIGTERM)" in early.output
    assert ckpt.latest_complete(checkpoints).step == stopped_at
    assert mlflow_status() == "KILLED"
    print(f"driver SIGTERMed before training: {early.output.split('preempted (SIGTERM): ')[1].splitlines()[0]}")

    # 3. Resubmitted, then SIGTERM to the driver (what `ray job stop` and a preempted head node send): it asks the
    # workers through the stop request on storage; they checkpoint the step they are at and the job exits 75.
    driver = _ray_job(ray_cluster, digits, tmp_path, uri, signal_at_step=stopped_at + 2)
    assert driver.returncode == EXIT_PREEMPTED, driver.output[-4000:]
    assert f"resumed from {checkpoints}/{ckpt.step_dir_name(stopped_at)} at step {stopped_at}" in driver.output
    second_stop = _last_step(driver.output)
    assert stopped_at + 2 <= second_stop < RAY_STEPS, driver.output[-4000:]
    assert f"checkpointed step {second_stop} of {RAY_STEPS}" in driver.output
    assert ckpt.latest_complete(checkpoints).step == second_stop
    assert (run_dir / STOP_MARKER).exists()
    assert mlflow_status() == "KILLED"
    print(
        f"driver SIGTERMed once step {driver.signalled_at_step} was logged: the run checkpointed step {second_stop} "
        f"{driver.checkpoint_s(run_dir, second_stop):.1f} s after the signal and the job exited {driver.stop_s:.1f} s "
        "after it"
    )

    # 4. Resubmitted again: the stop request is lifted, the run resumes at the preempted step and finishes.
    done = _ray_job(ray_cluster, digits, tmp_path, uri)
    assert done.returncode == 0, done.output[-4000:]
    assert f"at step {second_stop}" in done.output and f"finished {RAY_STEPS} steps" in done.output
    assert not (run_dir / STOP_MARKER).exists()
    assert mlflow_status() == "FINISHED"

    # The ledger: three attempts per rank, each resumed exactly where the previous one stopped (no step redone),
    # every step committed exactly once.
    attempts = ledger.read(run_dir.as_uri())
    assert sorted(attempts) == [0, 1]
    for rank, rank_attempts in attempts.items():
        assert [a.resumed_from_step for a in rank_attempts] == [0, stopped_at, second_stop], rank
        assert ledger.redone(rank_attempts) == [], rank
        assert sorted(ledger.committed(rank_attempts)) == list(range(1, RAY_STEPS + 1)), rank
