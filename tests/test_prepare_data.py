"""jobs/prepare_data.py and pipeline/data/prepare.py: each source from its publisher's on-disk layout, to shards."""

from __future__ import annotations

import io
import pickle
import tarfile

import numpy as np
import pytest
import scipy.io
import simplejpeg
import webdataset as wds
from PIL import Image

from jobs import prepare_data
from pipeline import storage
from pipeline.data import read_manifest
from pipeline.data.prepare import PrepareOptions, parse_classes, parse_size, prepare
from pipeline.data.shards import iter_shard


def _jpeg(seed: int, size=(20, 24)) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = (rng.random((*size, 3)) * 255).astype(np.uint8)
    return simplejpeg.encode_jpeg(pixels, quality=90)


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((10, 12, 3), seed % 255, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _samples(url: str) -> dict[str, tuple[bytes, int]]:
    out = {}
    for shard in read_manifest(url)["shard_urls"]:
        for sample in iter_shard(shard):
            assert sample.error is None, sample.error
            out[sample.key] = (sample.image, sample.label)
    return out


def test_imagefolder_passes_jpeg_through_reencodes_png_and_splits_70_10_20(tmp_path):
    root = tmp_path / "folder"
    originals = {}
    for c, name in enumerate(["cat", "dog"]):
        (root / name).mkdir(parents=True)
        for i in range(10):
            data = _jpeg(c * 100 + i)
            (root / name / f"img{i}.jpg").write_bytes(data)
            originals[f"{name}_img{i}"] = data
    (root / "dog" / "extra.png").write_bytes(_png(3))
    out = f"file://{tmp_path}/shards"
    manifests = prepare(PrepareOptions(source="imagefolder", input=str(root), out=out, split="all"))

    assert {s: m["num_samples"] for s, m in manifests.items()} == {"train": 15, "minival": 2, "test": 4}
    assert manifests["train"]["class_names"] == ["cat", "dog"]
    keys = {s: set(_samples(f"{out}/{s}.manifest.json")) for s in manifests}
    assert not (keys["train"] & keys["test"]) and not (keys["train"] & keys["minival"])
    assert len(keys["train"] | keys["minival"] | keys["test"]) == 21
    everything = {k: v for s in manifests for k, v in _samples(f"{out}/{s}.manifest.json").items()}
    for key, data in originals.items():
        assert everything[key] == (data, 0 if key.startswith("cat") else 1)  # JPEG bytes untouched
    png_bytes, label = everything["dog_extra"]
    assert label == 1 and png_bytes[:2] == b"\xff\xd8"  # re-encoded as JPEG


def _write_cifar10(root, per_batch=6):
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)], b"num_cases_per_batch": per_batch}, f)
    names = [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]
    for b, name in enumerate(names):
        batch = {
            b"data": (rng.random((per_batch, 3072)) * 255).astype(np.uint8),
            b"labels": [(b + i) % 10 for i in range(per_batch)],
            b"filenames": [f"img_{b}_{i}.png".encode() for i in range(per_batch)],
            b"batch_label": name.encode(),
        }
        with open(root / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)


def test_cifar10_python_batches_become_train_minival_test(tmp_path):
    _write_cifar10(tmp_path / "cifar-10-batches-py", per_batch=50)
    out = f"file://{tmp_path}/out"
    manifests = prepare(PrepareOptions(source="cifar10", input=str(tmp_path), out=out, split="all"))
    counts = {s: m["num_samples"] for s, m in manifests.items()}
    assert counts == {"train": 240, "minival": 10, "test": 50}  # minival: 2% of the 250 official train images
    assert manifests["test"]["class_names"] == [f"c{i}" for i in range(10)]
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    image, label = _samples(f"{out}/test.manifest.json")["test_img_5_3"]
    assert label == raw[b"labels"][3]
    decoded = simplejpeg.decode_jpeg(image).astype(int)
    expected = raw[b"data"][3].reshape(3, 32, 32).transpose(1, 2, 0).astype(int)
    assert decoded.shape == (32, 32, 3) and np.abs(decoded - expected).mean() < 12  # JPEG q95 of noise


def test_cifar100_uses_fine_labels_and_names(tmp_path):
    root = tmp_path / "cifar-100-python"
    root.mkdir()
    rng = np.random.default_rng(1)
    with open(root / "meta", "wb") as f:
        pickle.dump(
            {
                b"fine_label_names": [f"f{i}".encode() for i in range(100)],
                b"coarse_label_names": [f"k{i}".encode() for i in range(20)],
            },
            f,
        )
    for name, n in (("train", 200), ("test", 20)):
        with open(root / name, "wb") as f:
            pickle.dump(
                {
                    b"data": (rng.random((n, 3072)) * 255).astype(np.uint8),
                    b"fine_labels": [i % 100 for i in range(n)],
                    b"coarse_labels": [i % 20 for i in range(n)],
                    b"filenames": [f"{name}{i}.png".encode() for i in range(n)],
                },
                f,
            )
    out = f"file://{tmp_path}/out"
    manifest = prepare(PrepareOptions(source="cifar100", input=str(root), out=out, split="test"))["test"]
    assert manifest["num_classes"] == 100 and manifest["class_names"][7] == "f7"
    assert _samples(f"{out}/test.manifest.json")["test_test17"][1] == 17


def test_pets_uses_official_trainval_test_lists(tmp_path):
    root = tmp_path / "pets"
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    header = "#Image CLASS-ID SPECIES BREED ID\n#ID: 1:37 Class ids\n"
    breeds = [("Abyssinian", 1, 1), ("american_bulldog", 2, 2), ("Bengal", 1, 3)]
    rows, trainval, test = [], [], []
    for class_id, (breed, species, breed_id) in enumerate(breeds, start=1):
        for i in range(1, 11):
            name = f"{breed}_{i}"
            (root / "images" / f"{name}.jpg").write_bytes(_jpeg(class_id * 50 + i))
            line = f"{name} {class_id} {species} {breed_id}"
            rows.append(line)
            (test if i > 8 else trainval).append(line)
    (root / "annotations" / "list.txt").write_text(header + "\n".join(rows) + "\n")
    (root / "annotations" / "trainval.txt").write_text("\n".join(trainval) + "\n")
    (root / "annotations" / "test.txt").write_text("\n".join(test) + "\n")
    out = f"file://{tmp_path}/out"
    manifests = prepare(PrepareOptions(source="pets", input=str(root), out=out, split="all"))
    assert manifests["train"]["class_names"] == ["Abyssinian", "american_bulldog", "Bengal"]
    assert {s: m["num_samples"] for s, m in manifests.items()} == {"train": 21, "minival": 3, "test": 6}
    test_samples = _samples(f"{out}/test.manifest.json")
    assert test_samples["Bengal_9"][1] == 2 and test_samples["Abyssinian_10"][1] == 0


def test_flowers102_uses_setid_and_one_based_labels(tmp_path):
    root = tmp_path / "flowers"
    (root / "jpg").mkdir(parents=True)
    labels = np.array([[1, 2, 3, 1, 2, 3, 1, 2, 3]], dtype=np.uint8)  # 1-based, one per image_0000N.jpg
    for i in range(1, 10):
        (root / "jpg" / f"image_{i:05d}.jpg").write_bytes(_jpeg(i))
    scipy.io.savemat(root / "imagelabels.mat", {"labels": labels})
    scipy.io.savemat(
        root / "setid.mat",
        {"trnid": np.array([[1, 2, 3]]), "valid": np.array([[4, 5, 6]]), "tstid": np.array([[7, 8, 9]])},
    )
    out = f"file://{tmp_path}/out"
    manifests = prepare(PrepareOptions(source="flowers102", input=str(root), out=out, split="all"))
    assert manifests["minival"]["num_classes"] == 3
    assert {k: v[1] for k, v in _samples(f"{out}/minival.manifest.json").items()} == {
        "image_00004": 0,
        "image_00005": 1,
        "image_00006": 2,
    }


def test_digits_class_subset_is_relabelled_and_per_class_is_capped(tmp_path):
    out = f"file://{tmp_path}/digits"
    manifest = prepare(PrepareOptions(source="digits", out=out, split="train", classes="5-9", per_class=10))["train"]
    assert manifest["class_names"] == ["5", "6", "7", "8", "9"]
    assert manifest["class_counts"] == [10] * 5
    samples = _samples(f"{out}/train.manifest.json")
    # Each sample's label is exactly its digit's new index (5 -> 0 ... 9 -> 4), not merely some permutation.
    from sklearn.datasets import load_digits

    digit = load_digits().target
    assert {key: label for key, (_, label) in samples.items()} == {
        key: int(digit[int(key.split("_")[1])]) - 5 for key in samples
    }
    image = simplejpeg.decode_jpeg(next(iter(samples.values()))[0])
    assert image.shape == (32, 32, 3)  # 8x8 upscaled


def test_lfw_first_hundred_are_faces(tmp_path):
    out = f"file://{tmp_path}/lfw"
    manifests = prepare(PrepareOptions(source="lfw", out=out, split="all", samples_per_shard=16))
    assert sum(m["num_samples"] for m in manifests.values()) == 200
    assert manifests["train"]["class_names"] == ["face", "non_face"]
    assert manifests["train"]["class_counts"] == [70, 70]
    assert all(s["samples"] <= 16 for s in manifests["train"]["shards"])
    for key, (_, label) in _samples(f"{out}/test.manifest.json").items():
        assert label == (0 if int(key.split("_")[1]) < 100 else 1)


def test_rerun_is_byte_identical_and_removes_stale_shards(tmp_path):
    out = f"file://{tmp_path}/d"
    opts = PrepareOptions(source="digits", out=out, split="test", classes="0-1", samples_per_shard=10)
    first = prepare(opts)["test"]
    blobs = {p.name: p.read_bytes() for p in (tmp_path / "d").iterdir()}
    assert prepare(opts)["test"] == first
    assert {p.name: p.read_bytes() for p in (tmp_path / "d").iterdir()} == blobs
    prepare(PrepareOptions(source="digits", out=out, split="test", classes="0-1", samples_per_shard=100))
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["test-000000.tar", "test.manifest.json"]


def test_failed_conversion_leaves_no_manifest_and_no_partial_shard(gcs_bucket, monkeypatch):
    out = f"{gcs_bucket}/broken"
    from pipeline.data import prepare as prepare_module

    real_encode = prepare_module.encode_image
    calls = {"n": 0}

    def encode_then_crash(image):
        calls["n"] += 1
        if calls["n"] == 25:
            raise KeyboardInterrupt  # an interruption, not a bad image: the conversion must stop
        return real_encode(image)

    monkeypatch.setattr(prepare_module, "encode_image", encode_then_crash)
    with pytest.raises(KeyboardInterrupt):
        prepare(PrepareOptions(source="digits", out=out, split="train", samples_per_shard=10))
    objects = storage.listdir(out)
    assert objects == [f"{out}/train-000000.tar", f"{out}/train-000001.tar"]  # the third shard was never uploaded
    for url in objects:
        with tarfile.open(fileobj=io.BytesIO(storage.read_bytes(url))) as tar:
            assert len(tar.getmembers()) == 20  # whole: 10 samples x (.jpg + .cls)


def test_shards_on_gcs_are_plain_webdataset(gcs_bucket, tmp_path):
    out = f"{gcs_bucket}/lfw"
    manifest = prepare(PrepareOptions(source="lfw", out=out, split="minival"))["minival"]
    assert storage.exists(f"{out}/minival.manifest.json")
    local = tmp_path / "copy"
    storage.download_dir(out, local)
    dataset = wds.WebDataset(str(local / "minival-000000.tar"), shardshuffle=False).decode("rgb8")
    rows = [(s["__key__"], s["cls"], s["jpg"].shape) for s in dataset]
    assert len(rows) == manifest["num_samples"] == 20
    assert all(shape == (25, 25, 3) for _, _, shape in rows)


def test_cli_writes_to_memory_url_and_reports_bad_options(capsys):
    assert prepare_data.main(["--source", "lfw", "--out", "memory://cli/lfw", "--split", "minival"]) == 0
    assert "minival: 20 samples" in capsys.readouterr().out
    assert prepare_data.main(["--source", "digits", "--out", "memory://cli/d", "--classes", "3-12"]) == 2
    assert "out of range" in capsys.readouterr().err
    assert prepare_data.main(["--source", "pets", "--out", "memory://cli/p"]) == 2
    assert "needs --input" in capsys.readouterr().err


def test_option_parsers():
    assert parse_size("256MB") == 256_000_000 and parse_size("64KiB") == 65536 and parse_size("1000") == 1000
    assert parse_classes("0-4", 10) == [0, 1, 2, 3, 4] and parse_classes("5,6,7", 10) == [5, 6, 7]
    with pytest.raises(ValueError, match="--shard-size"):
        parse_size("lots")


def test_shard_writer_cuts_shards_by_bytes_and_writes_no_empty_shard(tmp_path):
    from pipeline.data.shards import ShardWriter

    images = [_jpeg(i) for i in range(9)]
    writer = ShardWriter(f"file://{tmp_path}/cut", "train", max_bytes=3 * len(images[0]))
    for i, image in enumerate(images):
        writer.write(f"k{i}", image, i % 3)
    records = writer.close()
    # A shard closes once its samples hold max_bytes: about three of these nearly equal-sized JPEGs each.
    assert [r.name for r in records] == [f"train-00000{i}.tar" for i in range(len(records))]
    assert 2 <= len(records) <= 4 and sum(r.samples for r in records) == 9
    read = [(s.key, s.image, s.label) for r in records for s in iter_shard(f"file://{tmp_path}/cut/{r.name}")]
    assert read == [(f"k{i}", image, i % 3) for i, image in enumerate(images)]

    assert ShardWriter(f"file://{tmp_path}/none", "train", max_bytes=1000).close() == []
    assert not (tmp_path / "none").exists()


def test_shard_writer_left_by_an_exception_uploads_nothing_of_its_last_shard(tmp_path):
    from pipeline.data.shards import ShardWriter

    with (
        pytest.raises(KeyboardInterrupt),
        ShardWriter(f"file://{tmp_path}/out", "train", max_bytes=1 << 30, max_samples=2) as writer,
    ):
        for i in range(3):
            writer.write(f"k{i}", _jpeg(i), 0)
        raise KeyboardInterrupt
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["train-000000.tar"]
    assert [s.key for s in iter_shard(f"file://{tmp_path}/out/train-000000.tar")] == ["k0", "k1"]
