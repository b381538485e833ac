"""bench/gpu_check.py --dry-run: the GPU check's code (pretraining Trainer steps, JPEG shards through the loader,
one fine-tuning step) runs on CPU with a tiny model and writes its result files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_the_gpu_check_dry_run_writes_its_results(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "bench/gpu_check.py", "--dry-run", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    [md] = tmp_path.glob("*-gpu-check-cpu-dry-run.md")
    [js] = tmp_path.glob("*-gpu-check-cpu-dry-run.json")
    report = json.loads(js.read_text())
    [step] = report["results"]
    assert step["variant"] == "Mi/4" and step["max_micro_batch"] >= 1 and step["images_per_s"] > 0
    assert report["loader"]["steps"] == 3 and report["loader"]["images_per_s"] > 0
    assert 0 <= report["loader"]["data_wait_fraction"] < 1
    assert report["finetune"]["micro_batch"] * report["finetune"]["grad_accumulation"] == report["finetune"]["batch"]
    text = md.read_text()
    assert "Training from JPEG shards" in text and "fine-tuning step" in text and "| Mi/4 | 32 |" in text
