"""Conversion as Ray tasks through jobs/prepare_data.py: killed mid-split (a real process, a real SIGKILL) and run
again with the same command, it gives the manifest and shards of an uninterrupted conversion, which are also those of
a one-process conversion."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data as photos

from pipeline.data.imagenet import imagenet21k
from pipeline.data.ingest import IngestOptions, convert_split

REPO = Path(__file__).resolve().parent.parent
OPTIONS = {"samples_per_shard": 5, "parts_per_task": 2}


def _write_synset_tars(root: Path, synsets: int = 12, per_synset: int = 30) -> None:
    """One tar per synset of PNG photo crops: re-encoded to JPEG, so each sample costs real work."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    sources = [photos.astronaut(), photos.chelsea(), photos.coffee(), photos.rocket()]
    for s in range(synsets):
        with tarfile.open(root / f"n{s:08d}.tar", "w") as tar:
            for i in range(per_synset):
                photo = sources[int(rng.integers(len(sources)))]
                y, x = int(rng.integers(photo.shape[0] - 240)), int(rng.integers(photo.shape[1] - 240))
                buf = io.BytesIO()
                Image.fromarray(photo[y : y + 240, x : x + 240]).save(buf, "PNG")
                info = tarfile.TarInfo(f"n{s:08d}_{i}.png")
                info.size = buf.tell()
                buf.seek(0)
                tar.addfile(info, buf)


def _run(src: Path, out: Path) -> subprocess.Popen:
    """The CLI, as a user runs it: the default path converts as tasks on a local Ray (here of 2 CPUs)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "jobs/prepare_data.py", "--source", "imagenet21k", "--input", str(src)]
    command += ["--out", f"file://{out}", "--split", "train", "--samples-per-shard", "5", "--parts-per-task", "2"]
    return subprocess.Popen(
        [*command, "--num-cpus", "2"],
        cwd=REPO,
        env=env,
        start_new_session=True,  # its own process group: the kill reaches the driver and what it started
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


@pytest.mark.slow
@pytest.mark.reliability
def test_a_conversion_killed_mid_split_and_rerun_equals_an_uninterrupted_one(tmp_path):
    src = tmp_path / "fall11"
    _write_synset_tars(src)
    reference = convert_split(imagenet21k(str(src)), "train", IngestOptions(out=f"file://{tmp_path}/one", **OPTIONS))

    out = tmp_path / "killed"
    proc = _run(src, out)
    deadline = time.monotonic() + 240
    while not (out / "_progress").is_dir() or not any((out / "_progress").iterdir()):
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        assert time.monotonic() < deadline, "no shard was finished in 240 s"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = len(list((out / "_progress").iterdir()))
    assert not (out / "train.manifest.json").exists()
    assert 0 < finished < len(reference["shards"]), "the kill came after the split was done"

    rerun = _run(src, out)
    output = rerun.communicate(timeout=600)[0].decode()
    assert rerun.returncode == 0, output[-3000:]
    assert "img/s" in output  # the progress bar
    assert f"train: {reference['num_samples']} samples" in output
    manifest = json.loads((out / "train.manifest.json").read_text())
    assert manifest == reference  # Ray with 2 CPUs, interrupted, gives the one-process conversion's manifest
    for shard in reference["shards"]:
        assert (out / shard["name"]).read_bytes() == (tmp_path / "one" / shard["name"]).read_bytes()
