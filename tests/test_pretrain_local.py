"""The local launcher (``scale.launcher=local``): the same Trainer as under Ray Train, in a plain process or under
``torchrun``, on a Python where ``import ray`` fails. Each local run must follow the Ray run's loss trajectory step
by step (losses read back from MLflow, logged every step)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_pretrain import _small, _train, digits  # noqa: F401 (digits is a fixture)

from pipeline.config import ConfigError, load_config
from pipeline.pretrain import check_before_launch

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent

# Installed as sitecustomize, this makes every `import ray` in the process (and in torchrun's children) fail, as on
# a machine where Ray is not installed.
NO_RAY = """
import importlib.abc
import sys


class _NoRay(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "ray" or name.startswith("ray."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
        return None


sys.meta_path.insert(0, _NoRay())
"""


def _without_ray_env(tmp_path: Path) -> dict[str, str]:
    hook = tmp_path / "no_ray"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(NO_RAY)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["PYTHONPATH"] = str(hook)
    return env


def _pretrain_without_ray(tmp_path: Path, overrides: list[str], *, nproc: int = 1) -> subprocess.CompletedProcess:
    sets = [item for value in overrides for item in ("--set", value)]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    command = [*(launcher if nproc > 1 else [sys.executable]), "jobs/pretrain.py", "--config", "tiny", *sets]
    result = subprocess.run(
        command, cwd=REPO, env=_without_ray_env(tmp_path), capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    return result


def _losses(tracking_uri: str, run_name: str) -> list[float]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    [run] = client.search_runs(
        [client.get_experiment_by_name("vit-pretrain").experiment_id], f"tags.vitpipe.run_name = '{run_name}'"
    )
    history = sorted(client.get_metric_history(run.info.run_id, "train/loss"), key=lambda m: m.step)
    return [m.value for m in history]


def _run_overrides(data: str, root: Path, name: str, uri: str, workers: int, *extra: str) -> list[str]:
    return _small(
        data,
        root,
        name,
        f"scale.workers={workers}",
        "train.steps=6",
        "checkpoint.every_steps=3",
        "train.log_every=1",
        *extra,
        tracking=uri,
    )


def test_the_ray_import_blocker_works(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", "import ray"], env=_without_ray_env(tmp_path), capture_output=True, text=True
    )
    assert result.returncode != 0 and "blocked by the test" in result.stderr


def test_local_launcher_refuses_a_world_size_other_than_scale_workers(digits: str, tmp_path: Path) -> None:  # noqa: F811
    cfg = load_config("tiny", _small(digits, tmp_path, "mismatch", "scale.launcher=local", "scale.workers=2"))
    with pytest.raises(ConfigError) as excinfo:
        check_before_launch(cfg)
    assert "--set scale.workers=1" in str(excinfo.value) and "torchrun --nproc-per-node 2" in str(excinfo.value)


def test_local_launcher_refuses_the_ray_data_engine(digits: str, tmp_path: Path) -> None:  # noqa: F811
    with pytest.raises(ConfigError, match=r"data\.engine=ray"):
        load_config("tiny", _small(digits, tmp_path, "x", "scale.launcher=local", "data.engine=ray"))


def test_one_plain_process_without_ray_follows_ray_with_one_worker_and_resumes(
    digits: str,  # noqa: F811
    tmp_path: Path,
    ray_connected,
) -> None:
    """Ray Train with one worker, 6 steps straight; then the same run without Ray in a plain process, stopped at
    step 3 and started again: it resumes from its step-3 checkpoint on storage and follows the same losses."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _, _, on_ray = _train(_run_overrides(digits, tmp_path, "ray-1", uri, 1))
    assert on_ray.status == "finished" and on_ray.step == 6

    local = _run_overrides(digits, tmp_path, "local-1", uri, 1, "scale.launcher=local")
    first = _pretrain_without_ray(tmp_path, [*local, "train.stop_at_step=3"])
    assert "stopped at step 3 of 6" in first.stdout
    second = _pretrain_without_ray(tmp_path, local)
    assert "resumed from" in second.stderr and "finished 6 steps" in second.stdout

    ray_losses, local_losses = _losses(uri, "ray-1"), _losses(uri, "local-1")
    print("ray:", ray_losses, "\nlocal:", local_losses)
    assert len(ray_losses) == len(local_losses) == 6
    assert local_losses == pytest.approx(ray_losses, abs=1e-5)


def test_torchrun_with_two_processes_without_ray_follows_ray_with_two_workers(
    digits: str,  # noqa: F811
    tmp_path: Path,
    ray_connected,
) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _, _, on_ray = _train(_run_overrides(digits, tmp_path, "ray-2", uri, 2))
    assert on_ray.status == "finished"

    result = _pretrain_without_ray(
        tmp_path, _run_overrides(digits, tmp_path, "torchrun-2", uri, 2, "scale.launcher=local"), nproc=2
    )
    assert "finished 6 steps" in result.stdout and "export: file://" in result.stdout

    ray_losses, local_losses = _losses(uri, "ray-2"), _losses(uri, "torchrun-2")
    print("ray:", ray_losses, "\ntorchrun:", local_losses)
    assert len(ray_losses) == len(local_losses) == 6
    assert local_losses == pytest.approx(ray_losses, abs=1e-5)
