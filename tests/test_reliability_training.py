"""Pretraining under faults: worker death, interrupted checkpoints, storage outages, configs that cannot fit.

Everything is real and on loopback: the session's Ray head (tests/fixtures/ray_cluster.py), 2 Ray Train workers
running DeepSpeed ZeRO-2 over gloo, checkpoints on ``file://`` or on the GCS emulator through the faulty proxy
(tests/fixtures/faulty_proxy.py), and the real digits as WebDataset shards.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.data.prepare import PrepareOptions, prepare
from tests.test_reliability_config import CONFIG_ERROR_EXIT, PROBE, REPO, _closed_port

pytestmark = pytest.mark.reliability


# ---------------------------------------------------------------------------------------------------------------
# A config that cannot fit is refused before Ray starts


@pytest.mark.timeout(180)
def test_a_config_that_cannot_fit_in_gpu_memory_is_refused_before_ray_naming_the_fix(tmp_path: Path) -> None:
    """ViT-H/14 without ZeRO at micro-batch 512 needs ~180 GiB per GPU: jobs/pretrain.py exits 2 with the planner's
    reason and the --set that fixes it, without importing Ray or DeepSpeed."""
    data = tmp_path / "data"
    # 10 one-sample shards: enough readers' shards for 8 workers, so that the data check passes and the
    # memory check is what refuses.
    prepare(PrepareOptions(source="digits", out=data.as_uri(), classes="0-4", per_class=2, samples_per_shard=1))
    sets = [
        f"data.train={(data / 'train.manifest.json').as_uri()}",
        "data.workers=0",
        "scale.workers=8",
        "train.zero_stage=0",
        "train.micro_batch=512",
        "train.steps=100000",  # the 10-shard stand-in has no JFT's size to turn epochs into steps
        "train.epochs=null",
        f"run.root={(tmp_path / 'runs').as_uri()}",
        "tracking.enabled=false",
    ]
    args = [item for value in sets for item in ("--set", value)]
    env = {
        "RAY_ADDRESS": f"127.0.0.1:{_closed_port()}",  # a connection attempt would fail loudly
        "VITPIPE_HOME": str(tmp_path / "home"),
        "PYTHONPATH": str(REPO),
    }
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, str(REPO / "jobs/pretrain.py"), "--config", "vit_h14_jft", *args],
        cwd=tmp_path,
        env={**_base_env(), **env},
        capture_output=True,
        text=True,
        timeout=150,
    )
    seconds = time.monotonic() - started
    err = proc.stderr
    assert proc.returncode == CONFIG_ERROR_EXIT, err[-2000:]
    assert "ZeRO-0, micro-batch 512 needs" in err and "H100" in err, err[-2000:]
    assert "--set train.micro_batch<=" in err and "scale.gpu=auto assumed h100" in err, err[-2000:]
    probe = json.loads(err.rsplit("PROBE ", 1)[1])
    assert not probe["ray_initialized"] and not {"ray", "deepspeed"} & set(probe["imported"]), probe
    print(f"refused in {seconds:.1f}s: {err.strip().splitlines()[1]}")


def _base_env() -> dict[str, str]:
    import os

    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    return env
