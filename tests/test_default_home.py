"""The headline command on a laptop: after `make demo`, `ray job submit --working-dir . -- python jobs/pretrain.py`
on a local `ray start --head` succeeds with no runtime-env flags, reads the demo's data and writes where the README
says (``~/.vitpipe/runs``, which `make demo` links to the checkout's runs/)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from fixtures.ray_cluster import REPO_ROOT, VENV_BIN, client_env, ray_head

from pipeline import storage
from pipeline.config import HOME_ENV, default_runs_root
from pipeline.config.paths import link_home_runs
from pipeline.config.presets import demo_data_command
from pipeline.export import export_metadata


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_ray_job_submit_of_the_default_pretraining_needs_no_flags_after_make_demo(tmp_path: Path) -> None:
    user_home, checkout_runs = tmp_path / "user", tmp_path / "checkout" / "runs"
    user_home.mkdir()
    # What `make demo` does first (the Makefile's link), then its data step, for a user whose home is user_home.
    link_home_runs(checkout_runs, user_home / ".vitpipe")
    env = client_env(HOME=str(user_home))
    env.pop(HOME_ENV, None)
    env.pop("MLFLOW_TRACKING_URI", None)
    prepare = demo_data_command().replace(default_runs_root(), checkout_runs.as_uri()).split()[1:]
    subprocess.run([sys.executable, *prepare], env=env, cwd=REPO_ROOT, check=True, capture_output=True)
    # The head runs as this user (HOME): its jobs' home is ~/.vitpipe of that user, its token in ~/.ray of that user.
    subprocess.run([str(VENV_BIN / "ray"), "get-auth-token", "--generate"], env=env, check=True, capture_output=True)
    with ray_head(env) as head:
        short = ["train.steps=6", "optim.warmup_steps=2", "checkpoint.every_steps=6", "train.log_every=3"]
        cmd = [str(VENV_BIN / "ray"), "job", "submit", "--address", head.dashboard_url, "--working-dir", "."]
        cmd += ["--", "python", "jobs/pretrain.py", *[arg for s in short for arg in ("--set", s)]]
        result = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=800)
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "succeeded" in output, output[-4000:]
    stable = user_home / ".vitpipe" / "runs"
    assert f"storage {stable.as_uri()}/tiny" in output, output[-4000:]
    # Through the link: the outputs are in the checkout's runs/, next to the demo's data and MLflow store.
    export = (checkout_runs / "tiny" / "export").as_uri()
    assert storage.is_complete(export) and export_metadata(export)["step"] == 6
    assert (checkout_runs / "mlflow.db").exists()
