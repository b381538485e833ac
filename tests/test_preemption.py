"""Preemption with a real SIGTERM: a pretraining job (local launcher, one process) told to stop mid-run checkpoints
the step it is on, exits with EXIT_PREEMPTED, leaves its MLflow run KILLED, and a resubmission resumes there."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
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
