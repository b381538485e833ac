"""Crash consistency of ``file://`` writes (shards, manifests, checkpoint files and their completion markers).

A power loss after a rename but before the data reached the disk can leave the new name pointing at an empty
file, while a completion marker written after it survives: the bytes and the rename must be made durable
(fsync of the file, then of its directory) before the write returns. A full disk must not leave temp files.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import storage

pytestmark = pytest.mark.reliability

REPO = Path(__file__).resolve().parent.parent


def _record_fsyncs(monkeypatch) -> list[str]:
    """The paths os.fsync is called on (the real fsync still runs)."""
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return synced


def test_a_file_and_its_rename_are_durable_before_the_completion_marker_is_written(tmp_path, monkeypatch):
    synced = _record_fsyncs(monkeypatch)
    local = tmp_path / "model.safetensors"
    local.write_bytes(b"w" * 10_000)
    run = f"file://{tmp_path}/ckpt"
    storage.put_file(local, storage.join(run, "model.safetensors"))  # how shards and checkpoint files are stored
    storage.mark_complete(run, {"files": ["model.safetensors"]})  # write_bytes: manifests and markers

    directory = str(tmp_path / "ckpt")
    temp_of = {name: f"{directory}/.{name}." for name in ("model.safetensors", storage.COMPLETE_MARKER)}
    # Each file: its bytes (under the temp name), then the directory holding the rename; the marker's after the
    # data file's, so that a surviving marker never vouches for a file the disk does not have.
    assert [p.startswith(temp_of["model.safetensors"]) for p in synced[:1]] == [True], synced
    assert synced[1] == directory, synced
    assert synced[2].startswith(temp_of[storage.COMPLETE_MARKER]) and synced[3] == directory, synced
    assert len(synced) == 4, synced
    assert (tmp_path / "ckpt" / "model.safetensors").read_bytes() == b"w" * 10_000
    assert sorted(os.listdir(directory)) == [storage.COMPLETE_MARKER, "model.safetensors"]
    assert oct((tmp_path / "ckpt" / "model.safetensors").stat().st_mode & 0o777) == "0o644"


FULL_DISK = r"""
import errno, json, os, resource, signal, sys
from pipeline import storage
big = sys.argv[2]
with open(big, "wb") as f:
    f.write(b"x" * 300_000)
# Writes past 64 KiB now fail with EFBIG, as a full disk fails them with ENOSPC (SIGXFSZ would kill us instead).
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
errors = {}
for name, write in {
    "put_file": lambda: storage.put_file(big, storage.join(sys.argv[1], "shard.tar")),
    "write_bytes": lambda: storage.write_bytes(storage.join(sys.argv[1], "train.manifest.json"), b"m" * 200_000),
}.items():
    try:
        write()
        errors[name] = None
    except OSError as exc:
        errors[name] = exc.errno
print("RESULT " + json.dumps(errors))
"""


@pytest.mark.timeout(60)
def test_a_write_that_fills_the_disk_raises_and_leaves_no_temp_file(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    result = subprocess.run(
        [sys.executable, "-c", FULL_DISK, f"file://{out}", str(tmp_path / "big.bin")],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    errors = json.loads(result.stdout.rsplit("RESULT ", 1)[1])
    assert errors == {"put_file": errno.EFBIG, "write_bytes": errno.EFBIG}
    assert os.listdir(out) == [], "a failed write left files behind"
