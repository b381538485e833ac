"""The WebDataset training/eval loaders on real tar shards of real JPEGs, locally and through the GCS emulator."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter

import numpy as np
import pytest
import simplejpeg
import torch

from pipeline import storage
from pipeline.data import DataConfig, DataError, build_eval_loader, build_train_loader, check_data, normalize
from pipeline.data import batches as batches_module
from pipeline.data.shards import ShardWriter, manifest_name
from tests.fixtures.gcs import make_bucket

NUM_CLASSES = 4


def _jpeg(i: int, size: int = 16) -> bytes:
    rng = np.random.default_rng(i)
    pixels = np.full((size, size + 4, 3), (i * 37) % 256, np.uint8) + (rng.random((size, size + 4, 3)) * 20).astype(
        np.uint8
    )
    return simplejpeg.encode_jpeg(pixels, quality=90)


def write_set(
    url: str, *, shards: int, per_shard: int, split: str = "train", key_prefix: str = "s", classes: int = NUM_CLASSES
) -> list[str]:
    """A shard set with a manifest, like prepare_data.py writes; returns the keys."""
    writer = ShardWriter(url, split, max_bytes=1 << 30, max_samples=per_shard)
    keys = []
    for i in range(shards * per_shard):
        key = f"{key_prefix}{i:05d}"
        writer.write(key, _jpeg(i), i % classes)
        keys.append(key)
    records = writer.close()
    storage.write_json(
        storage.join(url, manifest_name(split)),
        {
            "format": "vitpipe-webdataset/1",
            "split": split,
            "num_samples": len(keys),
            "num_classes": classes,
            "class_names": [f"c{i}" for i in range(classes)],
            "class_counts": [sum(1 for j in range(len(keys)) if j % classes == c) for c in range(classes)],
            "shards": [{"name": r.name, "samples": r.samples, "bytes": r.bytes, "sha256": r.sha256} for r in records],
        },
    )
    return keys


@pytest.fixture(scope="module")
def gcs_set(gcs_emulator) -> tuple[str, list[str]]:
    url = make_bucket() + "/train"
    return url, write_set(url, shards=8, per_shard=6)


@pytest.fixture(scope="module")
def local_set(tmp_path_factory) -> tuple[str, list[str]]:
    url = f"file://{tmp_path_factory.mktemp('shards')}"
    return url, write_set(url, shards=6, per_shard=7)


def _cfg(url: str, **kw) -> DataConfig:
    defaults = dict(image_size=8, workers=0, shuffle_buffer=4, seed=3)
    return DataConfig(train=f"{url}/train.manifest.json", **{**defaults, **kw})


def _first_epoch_keys(cfg: DataConfig, *, rank: int, world_size: int, batch_size: int) -> list[str]:
    """Keys of epoch 0 seen by one rank: iterate until every stream has moved on to epoch 1."""
    loader = build_train_loader(cfg, batch_size=batch_size, rank=rank, world_size=world_size)
    keys = []
    for batch in loader.batches():
        keys += [k for k, e in zip(batch.keys, batch.epochs, strict=True) if e == 0]
        if all(p[0] >= 1 for p in loader.state_dict()["positions"]):
            return keys
    raise AssertionError("unreachable: the loader is infinite")


def test_every_sample_once_per_epoch_across_ranks_and_workers_from_gcs(gcs_set):
    url, keys = gcs_set
    cfg = _cfg(url, workers=2)
    seen = Counter()
    for rank in range(2):
        seen.update(_first_epoch_keys(cfg, rank=rank, world_size=2, batch_size=4))
    assert seen == Counter(keys)


def test_batches_are_uint8_chw_and_normalize_maps_to_minus_one_one(local_set):
    url, _ = local_set
    loader = build_train_loader(_cfg(url, image_size=12), batch_size=5, rank=0, world_size=1)
    images, labels = next(iter(loader))
    assert images.shape == (5, 3, 12, 12) and images.dtype == torch.uint8 and images.is_contiguous()
    assert labels.dtype == torch.int64 and set(labels.tolist()) <= set(range(NUM_CLASSES))
    x = normalize(images)
    assert x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1
    assert torch.allclose(normalize(torch.tensor([[[[0, 255]]]], dtype=torch.uint8)), torch.tensor([-1.0, 1.0]))
    assert normalize(images, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_epochs_reshuffle_and_runs_are_reproducible(local_set):
    url, _ = local_set
    cfg = _cfg(url)

    def keys_of(n):
        loader = build_train_loader(cfg, batch_size=6, rank=0, world_size=1)
        out = []
        for batch in loader.batches():
            out.append(batch)
            if len(out) == n:
                return out

    a, b = keys_of(14), keys_of(14)
    assert [x.keys for x in a] == [x.keys for x in b]
    assert all(torch.equal(x.images, y.images) for x, y in zip(a, b, strict=True))
    flat = [(k, e) for x in a for k, e in zip(x.keys, x.epochs, strict=True)]  # 14 x 6 = two epochs of 42
    epoch0 = [k for k, e in flat if e == 0]
    epoch1 = [k for k, e in flat if e == 1]
    assert len(epoch0) == 42 and sorted(epoch0) == sorted(epoch1)
    assert epoch0 != epoch1  # a new order each epoch


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_with_exactly_the_next_batch(local_set, workers):
    url, _ = local_set
    cfg = _cfg(url, workers=workers, shuffle_buffer=5)
    first = build_train_loader(cfg, batch_size=5, rank=1, world_size=2)
    it = first.batches()
    for _ in range(7):  # crosses shard and epoch boundaries (rank 1 sees ~21 samples per epoch)
        next(it)
    state = json.loads(json.dumps(first.state_dict()))
    expected = [next(it) for _ in range(9)]

    resumed = build_train_loader(cfg, batch_size=5, rank=1, world_size=2, state=state)
    got = []
    for batch in resumed.batches():
        got.append(batch)
        if len(got) == 9:
            break
    assert [b.keys for b in got] == [b.keys for b in expected]
    assert all(torch.equal(a.images, b.images) for a, b in zip(got, expected, strict=True))
    assert resumed.stats()["samples"] == first.stats()["samples"] == 16 * 5


def test_resume_refuses_a_changed_setup(local_set):
    url, _ = local_set
    loader = build_train_loader(_cfg(url, workers=2), batch_size=4, rank=0, world_size=1)
    state = loader.state_dict()
    with pytest.raises(DataError, match="streams: saved 2 now 1"):
        build_train_loader(_cfg(url, workers=1), batch_size=4, rank=0, world_size=1, state=state)


def test_resampled_mode_is_infinite_and_deterministic(local_set):
    url, keys = local_set
    cfg = _cfg(url, resampled=True)

    def take(n):
        loader = build_train_loader(cfg, batch_size=8, rank=0, world_size=2)
        out = []
        for batch in loader.batches():
            out += batch.keys
            if len(out) >= n:
                return out, loader

    a, loader = take(200)
    b, _ = take(200)
    assert a == b and set(a) <= set(keys)
    assert loader.stats()["epoch"] >= 2


def test_too_few_shards_fail_before_training(local_set):
    url, _ = local_set  # 6 shards
    cfg = _cfg(url, workers=4)
    with pytest.raises(DataError, match=r"6 shards but 2 ranks x 4 workers = 8 readers"):
        check_data(cfg, world_size=2)
    with pytest.raises(DataError, match="--samples-per-shard"):
        build_train_loader(cfg, batch_size=2, rank=0, world_size=2)
    info = check_data(_cfg(url, workers=3), world_size=2)
    assert (info.num_shards, info.num_samples, info.num_classes) == (6, 42, NUM_CLASSES)


def test_check_data_names_missing_shards_and_manifests(tmp_path, local_set):
    url, _ = local_set
    pattern = f"{url}/train-{{000000..000007}}.tar"  # 6 exist
    with pytest.raises(DataError, match=r"train-000006.tar does not exist"):
        check_data(DataConfig(train=pattern, workers=0), world_size=1)
    info = check_data(DataConfig(train=f"{url}/train-{{000000..000005}}.tar", workers=0), world_size=1)
    assert info.num_shards == 6 and info.num_samples is None
    with pytest.raises(DataError, match=r"manifest .* does not exist"):
        check_data(DataConfig(train=f"file://{tmp_path}/none/train.manifest.json"), world_size=1)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match=r"data.train: 'pipe:' URLs"):
        DataConfig(train="pipe:gsutil cat gs://b/x.tar")
    with pytest.raises(ValueError, match=r"data.image_size must be a positive"):
        DataConfig(train="gs://b/x.tar", image_size=0)
    with pytest.raises(ValueError, match=r"data.max_bad_fraction"):
        DataConfig(train="gs://b/x.tar", max_bad_fraction=2)
    with pytest.raises(ValueError, match=r"data.crop_scale"):
        DataConfig(train="gs://b/x.tar", crop_scale=(0.5, 0.1))
    with pytest.raises(ValueError, match="extra"):
        DataConfig(train="gs://b/x.tar", shuffle=True)


# ---------------------------------------------------------------------------------------------------------------
# Corrupt input


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _good(prefix: str, n: int) -> list[tuple[str, bytes]]:
    return [m for i in range(n) for m in ((f"{prefix}{i}.jpg", _jpeg(i)), (f"{prefix}{i}.cls", b"1"))]


@pytest.fixture
def corrupt_set(tmp_path) -> str:
    """Four shards of which three hold one kind of damage each, plus 10 good samples per shard."""
    root = tmp_path / "bad"
    root.mkdir()
    (root / "train-000000.tar").write_bytes(_tar([*_good("a", 10), ("bad.jpg", b"not a jpeg"), ("bad.cls", b"0")]))
    (root / "train-000001.tar").write_bytes(_tar([*_good("b", 10), ("nolabel.jpg", _jpeg(99))]))
    (root / "train-000002.tar").write_bytes(_tar([*_good("c", 10), ("c3.jpg", _jpeg(5)), ("c3.cls", b"2")]))
    truncated = _tar(_good("d", 12))
    (root / "train-000003.tar").write_bytes(truncated[: int(len(truncated) * 0.6)])  # cut inside a member
    return f"file://{root}/train-{{000000..000003}}.tar"


def _drain_epoch0(cfg: DataConfig):
    loader = build_train_loader(cfg, batch_size=3, rank=0, world_size=1)
    keys = []
    for batch in loader.batches():
        keys += [k for k, e in zip(batch.keys, batch.epochs, strict=True) if e == 0]
        if batch.epochs[-1] >= 1:
            return keys, loader.stats()


def test_corrupt_samples_are_skipped_and_counted_per_shard(corrupt_set):
    keys, stats = _drain_epoch0(DataConfig(train=corrupt_set, image_size=8, workers=0, max_bad_fraction=0.5))
    base = corrupt_set.split("train-")[0]
    assert stats["bad_by_shard"] == {
        f"{base}train-000000.tar": 1,  # undecodable JPEG
        f"{base}train-000001.tar": 1,  # missing label
        f"{base}train-000002.tar": 1,  # duplicate key
        f"{base}train-000003.tar": 1,  # truncated tar
    }
    assert stats["bad_samples"] == 4
    assert len(keys) == len(set(keys)) and "bad" not in keys and "nolabel" not in keys
    assert sum(k.startswith("d") for k in keys) >= 4  # samples before the truncation point are kept


def test_strict_mode_raises_on_the_first_bad_sample(corrupt_set):
    with pytest.raises(DataError, match=r"bad sample .* \(data.strict=true\)"):
        _drain_epoch0(DataConfig(train=corrupt_set, image_size=8, workers=0, strict=True))


def test_bad_fraction_over_threshold_raises_naming_the_shards(corrupt_set, monkeypatch):
    monkeypatch.setattr(batches_module, "MIN_SAMPLES_FOR_BAD_FRACTION", 10)
    with pytest.raises(DataError, match=r"data.max_bad_fraction=0.01\); worst shards: file://.*train-00000\d.tar"):
        _drain_epoch0(DataConfig(train=corrupt_set, image_size=8, workers=0, max_bad_fraction=0.01))


def test_a_shard_without_samples_is_an_error(tmp_path):
    (tmp_path / "train-000000.tar").write_bytes(_tar(_good("a", 3)))
    (tmp_path / "train-000001.tar").write_bytes(b"this is not a tar file at all" * 20)
    cfg = DataConfig(train=f"file://{tmp_path}/train-{{000000..000001}}.tar", image_size=8, workers=0)
    with pytest.raises(DataError, match=r"train-000001.tar has no readable samples"):
        _drain_epoch0(cfg)


# ---------------------------------------------------------------------------------------------------------------
# Evaluation


def test_eval_loader_sees_every_sample_once_across_ranks_in_stored_order(gcs_set):
    url, keys = gcs_set
    seen = []
    for rank in range(3):
        loader = build_eval_loader(
            f"{url}/train.manifest.json", image_size=8, batch_size=5, rank=rank, world_size=3, workers=2
        )
        batches = list(loader.batches())
        assert all(b.images.shape[1:] == (3, 8, 8) for b in batches)
        again = [b.keys for b in loader.batches()]
        assert again == [b.keys for b in batches]  # deterministic
        seen += [k for b in batches for k in b.keys]
    assert sorted(seen) == sorted(keys)


def test_splits_joined_with_double_colons_are_read_as_one_set(tmp_path):
    """What the transfer job's final runs train on: a benchmark's train and minival splits together."""
    base = f"file://{tmp_path}"
    train_keys = write_set(f"{base}/bench", shards=2, per_shard=5)
    minival_keys = write_set(f"{base}/bench", shards=1, per_shard=4, split="minival", key_prefix="m")
    both = f"{base}/bench/train.manifest.json :: {base}/bench/minival.manifest.json"
    cfg = DataConfig(train=both, image_size=8, workers=0, shuffle_buffer=4)

    info = check_data(cfg, world_size=1)
    assert (info.num_shards, info.num_samples, info.num_classes) == (3, 14, NUM_CLASSES)
    loader = build_train_loader(cfg, batch_size=2, rank=0, world_size=1)
    assert loader.samples_per_epoch == 14
    assert Counter(_first_epoch_keys(cfg, rank=0, world_size=1, batch_size=2)) == Counter(train_keys + minival_keys)

    write_set(f"{base}/other", shards=1, per_shard=3, classes=3)
    mixed = DataConfig(train=f"{base}/bench/train.manifest.json::{base}/other/train.manifest.json", image_size=8)
    with pytest.raises(DataError, match=r"other/train.manifest.json has other classes .* only splits of one dataset"):
        check_data(mixed, world_size=1)


def test_labels_are_read_without_decoding_and_only_asked_keys_are_decoded(local_set, tmp_path):
    from pipeline.data import read_labels

    url, keys = local_set
    manifest = f"{url}/train.manifest.json"
    split = read_labels(manifest)
    assert split.keys == keys and list(split.labels) == [i % NUM_CLASSES for i in range(len(keys))]
    assert split.bad_by_shard == {} and split.shards[0] == f"{url}/train-000000.tar" and len(set(split.shards)) == 6

    wanted = keys[3:40:9]
    loader = build_eval_loader(manifest, image_size=8, batch_size=4, only_keys=wanted)
    got = [k for batch in loader.batches() for k in batch.keys]
    assert got == wanted and loader.bad_by_shard == {}  # stored order; the rest read past, not judged

    broken = f"file://{tmp_path}"
    write_set(broken, shards=1, per_shard=3)
    (tmp_path / "train-000000.tar").write_bytes(b"garbage" * 100)
    split = read_labels(f"{broken}/train.manifest.json")
    # The manifest records 3 samples: the unreadable one and the 2 never reached are all lost, all counted.
    assert split.keys == [] and len(split.labels) == 0 and split.bad_by_shard == {f"{broken}/train-000000.tar": 3}
