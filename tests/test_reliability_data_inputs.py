"""Bad inputs an attacker or an unlucky operator hands the data stage, fed through the entry points users take:
``jobs/pretrain.py`` (its pre-flight), ``jobs/prepare_data.py`` and the training loader.

- a manifest whose shard names leave the shard set's directory (``../``, absolute paths);
- decompression bombs: a few hundred bytes declaring a 60000 x 60000 image;
- a manifest that lies: a shard cut short, a ``num_samples`` that is not the shards' sum.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
from PIL import Image

from pipeline import storage
from pipeline.data import DataConfig, DataError, build_train_loader, check_data
from pipeline.data.shards import read_manifest
from tests.test_reliability_data import _good, _sample, _tar, assert_images_carry_their_labels, write_shard_set

pytestmark = pytest.mark.reliability

REPO = Path(__file__).resolve().parent.parent
CONFIG_ERROR_EXIT = 2
PREPARE_DATA = [sys.executable, str(REPO / "jobs" / "prepare_data.py")]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pretrain_preflight(tmp_path: Path, *sets: str) -> subprocess.CompletedProcess:
    """``jobs/pretrain.py --set ...`` as a user runs it; Ray is unreachable, so only the pre-flight can run."""
    env = {
        **os.environ,
        "RAY_ADDRESS": f"127.0.0.1:{_closed_port()}",
        "VITPIPE_HOME": str(tmp_path / "home"),
        "PYTHONPATH": str(REPO),
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    args = [a for s in sets for a in ("--set", s)]
    return subprocess.run(
        [sys.executable, str(REPO / "jobs" / "pretrain.py"), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=150,
    )


def _cfg(train: str, **kw) -> DataConfig:
    return DataConfig(train=train, **{"image_size": 8, "workers": 0, "shuffle_buffer": 0, "seed": 3, **kw})


def _drain(loader, batches: int) -> None:
    it = loader.batches()
    for _ in range(batches):
        assert_images_carry_their_labels(next(it))


# ---------------------------------------------------------------------------------------------------------------
# Shard names that leave the shard set


@pytest.mark.timeout(180)
def test_a_manifest_shard_name_outside_its_directory_is_refused_naming_the_manifest_and_the_entry(tmp_path):
    # A readable tar outside the data set, which a traversing name would otherwise train on.
    outside = tmp_path / "private.tar"
    outside.write_bytes(_tar(_good("p", range(4)))[0])
    names = {"dotdot": "../private.tar", "absolute": str(outside), "nested": "x/../../private.tar"}
    manifests = {}
    for case, name in names.items():
        base = tmp_path / case / "set"
        manifest, _ = write_shard_set(f"file://{base}", [_tar(_good(f"{case[0]}{i}", range(4)))[0] for i in range(2)])
        doc = storage.read_json(manifest)
        doc["shards"][1]["name"] = name
        storage.write_json(manifest, doc)
        manifests[case] = manifest

    for case, manifest in manifests.items():
        expected = rf"manifest {manifest}: shard entry 1 \('{names[case]}'\) is not a plain file name"
        with pytest.raises(DataError, match=expected):
            build_train_loader(_cfg(manifest), batch_size=2, rank=0, world_size=1)

    # The pre-flight of jobs/pretrain.py refuses it as a configuration error, before any cluster work.
    result = _pretrain_preflight(tmp_path, f"data.train={manifests['dotdot']}", "data.workers=0")
    assert result.returncode == CONFIG_ERROR_EXIT, result.stderr[-2000:]
    assert f"manifest {manifests['dotdot']}: shard entry 1 ('../private.tar')" in result.stderr


# ---------------------------------------------------------------------------------------------------------------
# Decompression bombs


def jpeg_bomb(height: int, width: int) -> bytes:
    """A 16 x 16 JPEG whose frame header declares ``height`` x ``width``: a few hundred bytes that a decoder
    without a limit sizes its buffers by."""
    data = bytearray(simplejpeg.encode_jpeg(np.full((16, 16, 3), 128, np.uint8), quality=90))
    sof = data.find(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def png_bomb(height: int, width: int) -> bytes:
    """A 16 x 16 PNG whose IHDR declares ``height`` x ``width`` (with a valid checksum)."""
    from io import BytesIO

    buf = BytesIO()
    Image.new("RGB", (16, 16), (90, 90, 90)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = data.find(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr : ihdr + 17])))
    return bytes(data)


BOMB_LOADER = r"""
import json, resource, sys
from pipeline.data import DataConfig, build_train_loader
def epoch(url):
    loader = build_train_loader(
        DataConfig(train=url, image_size=8, workers=0, shuffle_buffer=0, max_bad_fraction=1.0),
        batch_size=2, rank=0, world_size=1,
    )
    for batch in loader.batches():
        if batch.epochs[-1] >= 1:
            return loader.stats()
clean = epoch(sys.argv[1])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
bombs = epoch(sys.argv[2])
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print("RESULT " + json.dumps({"extra_peak_mib": (after - before) / 1024, "clean": clean, "bombs": bombs}))
"""


@pytest.mark.timeout(180)
def test_a_decompression_bomb_is_a_counted_bad_sample_refused_from_its_header_by_the_loader(tmp_path):
    clean_tar = _tar(_good("c", range(8)))[0]
    bomb_tar = _tar(
        [*_good("b", range(4)), *_sample("bjpeg", 1, image=jpeg_bomb(60000, 60000)), *_good("b", range(4, 8))]
    )[0]
    clean, _ = write_shard_set(f"file://{tmp_path}/clean", [clean_tar])
    bombs, bomb_urls = write_shard_set(f"file://{tmp_path}/bombs", [bomb_tar])
    result = subprocess.run(
        [sys.executable, "-c", BOMB_LOADER, clean, bombs],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    measured = json.loads(result.stdout.rsplit("RESULT ", 1)[1])
    assert measured["clean"]["bad_samples"] == 0
    assert measured["bombs"]["bad_by_shard"] == {bomb_urls[0]: 1}
    assert "60000 x 60000 = 3,600,000,000 pixels is over the limit of 89,478,485" in result.stderr
    # Refused from the header: the bomb costs no memory (before the limit, decoding it at 1/8 scale took ~160 MiB
    # more peak RSS and 5.6 s; a crop decoded at full scale would ask for 10 GiB).
    assert measured["extra_peak_mib"] < 64, measured

    # The limit is one setting, checked up front, and applies to every image: here a 12 x 16 one is too large.
    with pytest.raises(ValueError, match=r"data\.max_image_pixels is the largest image"):
        _cfg(clean, max_image_pixels=0)
    loader = build_train_loader(
        _cfg(clean, max_image_pixels=100, max_bad_fraction=1.0), batch_size=2, rank=0, world_size=1
    )
    it = loader.batches()
    with pytest.raises(DataError, match="yielded no samples"):
        next(it)


@pytest.mark.timeout(120)
def test_prepare_data_skips_decompression_bombs_and_records_why(tmp_path):
    root = tmp_path / "folder"
    for c, name in enumerate(["a", "b"]):
        (root / name).mkdir(parents=True)
        for i in range(6):
            grey = np.full((20, 24, 3), 40 + 100 * c, np.uint8)
            (root / name / f"img{i}.jpg").write_bytes(simplejpeg.encode_jpeg(grey, quality=90))
    (root / "a" / "bomb.jpg").write_bytes(jpeg_bomb(60000, 60000))  # passed through unchecked before
    (root / "b" / "bomb.png").write_bytes(png_bomb(20000, 20000))  # PIL's DecompressionBombError crashed the job
    out = f"file://{tmp_path}/out"
    result = subprocess.run(
        [*PREPARE_DATA, "--source", "imagefolder", "--input", str(root), "--out", out, "--split", "all"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    skipped = {}
    for split in ("train", "minival", "test"):
        manifest = read_manifest(f"{out}/{split}.manifest.json")
        skipped.update({s["key"]: s["reason"] for s in manifest["skipped_source_samples"]})
    assert len(skipped) == 2 and all("bomb" in key for key in skipped), skipped
    assert all("over the limit of 89,478,485" in reason for reason in skipped.values()), skipped


# ---------------------------------------------------------------------------------------------------------------
# A manifest that lies


def _digits_set(tmp_path: Path) -> str:
    out = f"file://{tmp_path}/digits"
    result = subprocess.run(
        [*PREPARE_DATA, "--source", "digits", "--classes", "0-4", "--out", out, "--samples-per-shard", "32"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return f"{out}/train.manifest.json"


def _cut_to_half(path: Path, samples: int) -> None:
    """Keep the first half of the shard's samples (each a .cls and a .jpg member), cut at a member boundary."""
    import tarfile

    with tarfile.open(path) as tar:
        members = tar.getmembers()
    path.write_bytes(path.read_bytes()[: members[2 * (samples // 2)].offset])


@pytest.mark.timeout(240)
def test_a_shard_cut_to_half_its_samples_is_refused_at_preflight_and_its_loss_counted_by_the_loader(tmp_path):
    manifest = _digits_set(tmp_path)
    doc = storage.read_json(manifest)
    total, first = doc["num_samples"], doc["shards"][0]
    shard = tmp_path / "digits" / first["name"]
    _cut_to_half(shard, first["samples"])
    # Cut at a member boundary, the last whole sample may be incomplete as far as the reader can know: it is lost
    # too. Every sample but the first half less one is lost.
    lost = first["samples"] - (first["samples"] // 2 - 1)
    assert lost / total >= 0.02  # well past max_bad_fraction=0.01

    # jobs/pretrain.py's pre-flight sees the size the store reports differ from the manifest's.
    result = _pretrain_preflight(tmp_path, f"data.train={manifest}", "data.workers=0")
    assert result.returncode == CONFIG_ERROR_EXIT, result.stderr[-2000:]
    assert f"{manifest.rsplit('/', 1)[0]}/{first['name']} has {shard.stat().st_size} bytes" in result.stderr

    # Cut after the pre-flight (or a manifest without sizes): every lost sample is counted as bad, so the default
    # max_bad_fraction stops the run instead of it training on 1 bad sample per epoch.
    cfg = _cfg(manifest, max_bad_fraction=0.01)
    loader = build_train_loader(cfg, batch_size=8, rank=0, world_size=1)
    it = loader.batches()
    with pytest.raises(DataError, match=r"samples were bad .* > data\.max_bad_fraction=0\.01\)") as raised:
        for _ in range(4 * total // 8):
            next(it)
    assert f"{manifest.rsplit('/', 1)[0]}/{first['name']} ({lost})" in str(raised.value)


@pytest.mark.timeout(60)
def test_a_manifest_whose_counts_disagree_with_its_shards_is_refused(tmp_path):
    tars = [_tar(_good(f"m{i}", range(6)))[0] for i in range(3)]
    manifest, _urls = write_shard_set(f"file://{tmp_path}/lies", tars)
    doc = storage.read_json(manifest)
    doc["num_samples"] = 6  # the step count would be derived from a third of the data
    storage.write_json(manifest, doc)
    with pytest.raises(DataError, match=r"num_samples is 6 but its shards hold 18 samples"):
        check_data(_cfg(manifest), world_size=1)

    # A shard holding more samples than its entry says belongs to another manifest: refused when read.
    doc["num_samples"], doc["shards"][0]["samples"] = 14, 2
    storage.write_json(manifest, doc)
    loader = build_train_loader(_cfg(manifest), batch_size=2, rank=0, world_size=1)
    with pytest.raises(DataError, match=r"holds more samples \(6\) than its manifest records \(2\)"):
        _drain(loader, 40)
