"""The GPU step benchmark's CPU-checkable parts: micro-batch search, no-GPU exit, and the --dry-run code path."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load_gpu_step():
    spec = importlib.util.spec_from_file_location("gpu_step", ROOT / "bench" / "gpu_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_step = _load_gpu_step()


def _fits_up_to(limit: int, probes: list[int]):
    def fits(b: int) -> bool:
        probes.append(b)
        return b <= limit

    return fits


@pytest.mark.parametrize("limit", [1, 7, 8, 37, 100, 1000])
def test_micro_batch_search_finds_the_largest_size_that_fits(limit):
    probes: list[int] = []
    assert gpu_step.largest_fitting(_fits_up_to(limit, probes), cap=2048) == limit
    assert len(probes) <= 2 * 12  # doubling then bisecting: logarithmic, not linear


def test_micro_batch_search_stops_at_the_cap():
    probes: list[int] = []
    assert gpu_step.largest_fitting(_fits_up_to(10_000, probes), cap=100) == 100
    assert max(probes) == 100


def test_micro_batch_search_returns_zero_when_nothing_fits():
    assert gpu_step.largest_fitting(lambda b: False, cap=64) == 0


def test_device_names_become_file_name_slugs():
    assert gpu_step.device_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert gpu_step.device_slug("NVIDIA A100-SXM4-40GB") == "nvidia-a100-sxm4-40gb"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the benchmark would measure it")
def test_gpu_step_without_cuda_says_so_and_exits_0():
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_step.py")], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert "no CUDA device: nothing to measure" in result.stdout


@pytest.mark.slow
def test_gpu_step_dry_run_trains_a_tiny_step_on_cpu_and_writes_results(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_step.py"), "--dry-run", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "DS_ACCELERATOR": "cpu"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (js,) = tmp_path.glob("*-cpu-dry-run.json")
    (md,) = tmp_path.glob("*-cpu-dry-run.md")
    report = json.loads(js.read_text())
    (row,) = report["results"]
    assert row["variant"] == "Mi/4" and row["precision"] == "fp32"
    assert row["max_micro_batch"] == 4 and row["max_micro_batch_checkpointed"] == 4  # the dry run's cap
    assert row["images_per_s"] > 0 and row["step_seconds"] > 0
    assert row["mfu"] is None  # a CPU has no bf16 peak in the table
    assert "| Mi/4 | 32 | 1 | fp32 | 4 |" in md.read_text()
