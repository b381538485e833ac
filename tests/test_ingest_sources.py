"""Published layouts (ImageNet-1k/21k, Parquet snapshots, existing WebDataset shards) converted or indexed, then
read back with plain tarfile + PIL and compared with the fixture's own images and labels."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import scipy.io
from PIL import Image
from skimage import data as photos
from sklearn.datasets import load_digits

from pipeline import storage
from pipeline.data import build_eval_loader
from pipeline.data.imagenet import imagenet1k, imagenet21k
from pipeline.data.ingest import IngestOptions, convert_split
from pipeline.data.parquet import parquet_source
from pipeline.data.sources import SourceError, iter_split
from pipeline.data.vtab import vtab1k
from pipeline.data.wds_index import index_shards

WNIDS = ["n01440764", "n01443537", "n01484850"]  # sorted, as ImageNet's class index


def _photo_crops(count: int, seed: int) -> list[np.ndarray]:
    """Small RGB crops of scikit-image's sample photos, of varied sizes."""
    rng = np.random.default_rng(seed)
    sources = [photos.astronaut(), photos.chelsea(), photos.coffee()]
    crops = []
    for _ in range(count):
        photo = sources[int(rng.integers(len(sources)))]
        h, w = int(rng.integers(28, 48)), int(rng.integers(28, 48))
        y, x = int(rng.integers(photo.shape[0] - h)), int(rng.integers(photo.shape[1] - w))
        crops.append(photo[y : y + h, x : x + w])
    return crops


def _encode(pixels: np.ndarray, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


def _tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _read_back(out_dir: Path, split: str) -> tuple[dict, dict[str, tuple[np.ndarray, int, dict | None]]]:
    """The manifest and {key: (pixels, label, json member)} of a split, read with tarfile + PIL only."""
    manifest = json.loads((out_dir / f"{split}.manifest.json").read_text())
    samples: dict[str, dict[str, bytes]] = {}
    for shard in manifest["shards"]:
        with tarfile.open(out_dir / shard["name"]) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    assert sum(s["samples"] for s in manifest["shards"]) == manifest["num_samples"] == len(samples)
    return manifest, {
        key: (_decode(m["jpg"]), int(m["cls"]), json.loads(m["json"]) if "json" in m else None)
        for key, m in samples.items()
    }


def _convert(source, split: str, out_dir: Path, **options) -> tuple[dict, dict]:
    convert_split(source, split, IngestOptions(out=f"file://{out_dir}", **options))
    return _read_back(out_dir, split)


# ---------------------------------------------------------------------------------------------------------------
# ImageNet-1k


def _write_imagenet(root: Path, *, per_class: int = 12, val: int = 9, train_as_tars: bool = True) -> dict:
    """ILSVRC-2012 as unpacked from image-net.org: train/<wnid>.tar (or folders), flat val/, labels, real.json."""
    fixture: dict = {"train": {}, "val": {}}
    crops = iter(_photo_crops(len(WNIDS) * per_class + val, seed=1))
    (root / "train").mkdir(parents=True)
    for label, wnid in enumerate(WNIDS):
        members = {}
        for i in range(per_class):
            pixels = next(crops)
            # ImageNet's train set really holds a PNG named .JPEG (n02105855_2933); the converter re-encodes it.
            data = _encode(pixels, "PNG" if (label, i) == (1, 3) else "JPEG")
            members[f"{wnid}_{1000 + i}.JPEG"] = data
            fixture["train"][f"{wnid}_{1000 + i}"] = (data, label)
        if train_as_tars:
            _tar(root / "train" / f"{wnid}.tar", members)
        else:
            (root / "train" / wnid).mkdir()
            for name, data in members.items():
                (root / "train" / wnid / name).write_bytes(data)
    (root / "val").mkdir()
    rng = np.random.default_rng(2)
    for i in range(1, val + 1):
        data = _encode(next(crops))
        (root / "val" / f"ILSVRC2012_val_{i:08d}.JPEG").write_bytes(data)
        fixture["val"][f"ILSVRC2012_val_{i:08d}"] = (data, int(rng.integers(len(WNIDS))))
    fixture["real"] = [[], [0, 2], [1], [2], [0], [1, 2], [], [0], [2]][:val]
    (root / "real.json").write_text(json.dumps(fixture["real"]))
    (root / "LOC_synset_mapping.txt").write_text("".join(f"{w} some fish\n" for w in WNIDS))
    return fixture


def test_imagenet1k_tars_flat_val_solution_csv_and_real_labels_by_file_name(tmp_path):
    fixture = _write_imagenet(tmp_path / "in")
    with open(tmp_path / "in" / "LOC_val_solution.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["ImageId", "PredictionString"])
        for key, (_, label) in reversed(fixture["val"].items()):  # the CSV's row order is not the files'
            writer.writerow([key, f"{WNIDS[label]} 10 12 40 44 {WNIDS[label]} 1 2 30 31"])
    source = imagenet1k(str(tmp_path / "in"))
    assert source.class_names == WNIDS

    manifest, test = _convert(source, "test", tmp_path / "out", samples_per_shard=4)
    assert manifest["num_samples"] == 9 and len(manifest["shards"]) == 3
    for key, (data, label) in fixture["val"].items():
        pixels, stored_label, meta = test[key]
        assert np.array_equal(pixels, _decode(data)) and stored_label == label
        assert meta == {"real": fixture["real"][int(key[-8:]) - 1]}  # ReaL labels of this very file

    _, train = _convert(source, "train", tmp_path / "out", samples_per_shard=8, parts_per_task=2)
    _, minival = _convert(source, "minival", tmp_path / "out", samples_per_shard=8, parts_per_task=2)
    # 1% of 12 rounds to 0: at least one image per class is held out; the rest trains.
    assert sorted(minival[k][1] for k in minival) == [0, 1, 2]
    assert not set(train) & set(minival) and set(train) | set(minival) == set(fixture["train"])
    for key, (data, label) in fixture["train"].items():
        pixels, stored_label, _ = (train | minival)[key]
        assert stored_label == label
        if data[:4] == b"\x89PNG":
            assert np.abs(pixels - _decode(data)).mean() < 3  # re-encoded at JPEG quality 95
        else:
            assert np.array_equal(pixels, _decode(data))  # JPEG bytes passed through


def _write_devkit(data_dir: Path, val_labels: list[int]) -> None:
    """The devkit's meta.mat numbers synsets in its own order (here reversed) and the ground truth uses those ids."""
    data_dir.mkdir(parents=True)
    ids = {wnid: len(WNIDS) - i for i, wnid in enumerate(WNIDS)}
    synsets = np.array(
        [(ids[w], w, "fish", 0) for w in WNIDS],
        dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")],
    )
    scipy.io.savemat(data_dir / "meta.mat", {"synsets": synsets})
    lines = "".join(f"{ids[WNIDS[label]]}\n" for label in val_labels)
    (data_dir / "ILSVRC2012_validation_ground_truth.txt").write_text(lines)


def test_imagenet1k_class_folders_and_devkit_ground_truth(tmp_path):
    fixture = _write_imagenet(tmp_path / "in", per_class=4, val=5, train_as_tars=False)
    _write_devkit(tmp_path / "in" / "ILSVRC2012_devkit_t12" / "data", [label for _, label in fixture["val"].values()])
    source = imagenet1k(str(tmp_path / "in"))
    _, test = _convert(source, "test", tmp_path / "out")
    assert {k: v[1] for k, v in test.items()} == {k: label for k, (_, label) in fixture["val"].items()}
    _, train = _convert(source, "train", tmp_path / "out")
    assert {k: v[1] for k, v in train.items()} == {
        k: label for k, (_, label) in fixture["train"].items() if k in train
    } and len(train) == 9


def test_imagenet1k_without_validation_labels_says_which_files_are_missing(tmp_path):
    _write_imagenet(tmp_path / "in", per_class=2, val=2)
    with pytest.raises(SourceError, match=r"LOC_val_solution\.csv"):
        imagenet1k(str(tmp_path / "in"))


# ---------------------------------------------------------------------------------------------------------------
# ImageNet-21k


def test_imagenet21k_tar_per_synset_is_streamed_from_gcs(gcs_bucket, tmp_path):
    synsets = ["n00004475", "n00005787", "n00006024", "n00007846"]
    fixture = {}
    crops = iter(_photo_crops(len(synsets) * 5, seed=3))
    local = tmp_path / "fall11"
    local.mkdir()
    for label, wnid in enumerate(synsets):
        members = {}
        for i in range(5):
            members[f"{wnid}_{i + 17}.JPEG"] = data = _encode(next(crops))
            fixture[f"{wnid}_{i + 17}"] = (data, label)
        _tar(local / f"{wnid}.tar", members)
    storage.upload_dir(local, f"{gcs_bucket}/fall11")

    source = imagenet21k(f"{gcs_bucket}/fall11")
    assert source.class_names == synsets
    manifest, train = _convert(source, "train", tmp_path / "out", samples_per_shard=6, parts_per_task=2)
    _, minival = _convert(source, "minival", tmp_path / "out")
    assert manifest["class_counts"] == [4, 4, 4, 4] and len(minival) == 4
    for key, (data, label) in fixture.items():
        pixels, stored_label, meta = (train | minival)[key]
        assert np.array_equal(pixels, _decode(data)) and stored_label == label and meta is None
    # Shards interleave their task's two synsets, so a shard is not one class.
    assert any(len(_shard_labels(tmp_path / "out", s["name"])) > 1 for s in manifest["shards"])


def _shard_labels(out_dir: Path, name: str) -> set[int]:
    with tarfile.open(out_dir / name) as tar:
        return {int(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".cls")}


# ---------------------------------------------------------------------------------------------------------------
# Parquet / Hugging Face snapshots


def _digit_pngs() -> tuple[list[bytes], list[int], list[np.ndarray]]:
    digits = load_digits()
    pixels = [np.repeat(np.repeat(np.round(im * 255 / 16).astype(np.uint8), 4, 0), 4, 1) for im in digits.images]
    return [_encode(p, "PNG") for p in pixels], [int(t) for t in digits.target], pixels


def _hf_metadata(label_feature: dict) -> dict[bytes, bytes]:
    # What `datasets` writes into each Parquet file's schema metadata (Dataset.to_parquet / push_to_hub).
    info = {"info": {"features": {"image": {"_type": "Image"}, "label": label_feature}}}
    return {b"huggingface": json.dumps(info).encode()}


def _write_parquet(path: Path, images: list[bytes], labels: list, label_type: pa.DataType, metadata: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table(
        {
            "image": pa.array([{"bytes": b, "path": None} for b in images], type=image_type),
            "label": pa.array(labels, type=label_type),
        }
    ).replace_schema_metadata(metadata)
    pq.write_table(table, path, row_group_size=20)


def test_parquet_snapshot_with_classlabel_names_from_the_hub_metadata(tmp_path):
    pngs, labels, pixels = _digit_pngs()
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    metadata = _hf_metadata({"_type": "ClassLabel", "names": names})
    root = tmp_path / "snapshot"
    _write_parquet(root / "data" / "train-00000-of-00002.parquet", pngs[:30], labels[:30], pa.int64(), metadata)
    _write_parquet(root / "data" / "train-00001-of-00002.parquet", pngs[30:50], labels[30:50], pa.int64(), metadata)
    _write_parquet(root / "data" / "test-00000-of-00001.parquet", pngs[50:60], labels[50:60], pa.int64(), metadata)

    source = parquet_source(str(root))
    assert source.class_names == names and not source.multi_label
    manifest, train = _convert(source, "train", tmp_path / "out", samples_per_shard=16)
    assert manifest["num_samples"] == 50 and manifest["class_names"] == names
    expected = {f"train-00000-of-00002_{i:08d}": i for i in range(30)}
    expected |= {f"train-00001-of-00002_{i:08d}": 30 + i for i in range(20)}
    assert set(train) == set(expected)
    for key, index in expected.items():
        stored, label, _ = train[key]
        assert label == labels[index]
        assert np.abs(stored - pixels[index][:, :, None]).mean() < 3  # PNG re-encoded at JPEG quality 95
    _, test = _convert(source, "test", tmp_path / "out")
    assert sorted(v[1] for v in test.values()) == sorted(labels[50:60])


def test_parquet_multi_label_rows_are_carried_in_the_shards(tmp_path):
    pngs, _, _ = _digit_pngs()
    label_lists = [[i % 4, (i + 1) % 4] if i % 3 else [i % 4] for i in range(12)]
    feature = {"_type": "Sequence", "feature": {"_type": "ClassLabel", "names": ["a", "b", "c", "d"]}}
    _write_parquet(
        tmp_path / "s" / "train" / "0000.parquet", pngs[:12], label_lists, pa.list_(pa.int64()), _hf_metadata(feature)
    )
    source = parquet_source(f"file://{tmp_path}/s")
    assert source.multi_label and source.class_names == ["a", "b", "c", "d"]
    manifest, train = _convert(source, "train", tmp_path / "out")
    assert manifest["multi_label"] is True
    for i, labels in enumerate(label_lists):
        _, label, meta = train[f"0000_{i:08d}"]
        assert label == labels[0] and meta == {"labels": labels}


def test_vtab1k_draws_800_train_and_200_minival_from_the_official_train_split(tmp_path):
    pngs, labels, _ = _digit_pngs()
    root = tmp_path / "snap"
    metadata = _hf_metadata({"_type": "ClassLabel", "names": [str(i) for i in range(10)]})
    _write_parquet(root / "data" / "train-00000-of-00001.parquet", pngs[:1500], labels[:1500], pa.int64(), metadata)
    _write_parquet(root / "data" / "test-00000-of-00001.parquet", pngs[1500:], labels[1500:], pa.int64(), metadata)
    source = vtab1k(parquet_source(str(root)), seed=0)
    train_keys = [s.key for s in iter_split(source, "train")]
    minival_keys = [s.key for s in iter_split(source, "minival")]
    assert len(train_keys) == 800 and len(minival_keys) == 200 and not set(train_keys) & set(minival_keys)
    assert all(k.startswith("train-") for k in train_keys + minival_keys)
    assert len(list(iter_split(source, "test"))) == 297
    assert [s.key for s in iter_split(vtab1k(parquet_source(str(root)), seed=0), "train")] == train_keys
    assert set(train_keys) != {s.key for s in iter_split(vtab1k(parquet_source(str(root)), seed=1), "train")}
    manifest, minival = _convert(source, "minival", tmp_path / "out", samples_per_shard=64)
    assert manifest["num_samples"] == 200
    for key, (_, label, _) in minival.items():
        assert label == labels[int(key.rsplit("_", 1)[1])]


# ---------------------------------------------------------------------------------------------------------------
# Existing WebDataset shards


def test_foreign_jpg_cls_shards_are_indexed_in_place_and_the_loader_reads_them(tmp_path):
    crops = _photo_crops(20, seed=4)
    fixture = {}
    (tmp_path / "wds").mkdir()
    for shard in range(2):
        members = {}
        for i in range(10):
            key, label = f"n0144_{shard}_{i:04d}", (shard * 10 + i) % 3
            members[f"{key}.jpg"] = data = _encode(crops[shard * 10 + i])
            members[f"{key}.cls"] = str(label).encode()
            fixture[key] = (data, label)
        _tar(tmp_path / "wds" / f"imagenet-train-{shard:06d}.tar", members)
    before = {p.name: p.read_bytes() for p in (tmp_path / "wds").iterdir()}

    manifest = index_shards(
        f"file://{tmp_path}/wds/imagenet-train-{{000000..000001}}.tar", split="train", class_names=["x", "y", "z"]
    )
    assert {p.name: p.read_bytes() for p in (tmp_path / "wds").iterdir() if p.suffix == ".tar"} == before
    assert [(s["name"], s["samples"]) for s in manifest["shards"]] == [
        ("imagenet-train-000000.tar", 10),
        ("imagenet-train-000001.tar", 10),
    ]
    for entry in manifest["shards"]:
        assert entry["sha256"] == hashlib.sha256(before[entry["name"]]).hexdigest()
        assert entry["bytes"] == len(before[entry["name"]])
    assert manifest["class_counts"] == [7, 7, 6] and manifest["class_names"] == ["x", "y", "z"]

    loader = build_eval_loader(
        f"file://{tmp_path}/wds/train.manifest.json", image_size=16, batch_size=8, crop_fraction=None
    )
    seen = {}
    for batch in loader.batches():
        seen.update(zip(batch.keys, batch.labels.tolist(), strict=True))
    assert seen == {key: label for key, (_, label) in fixture.items()}


def test_foreign_jpg_json_shards_take_labels_from_the_named_json_field(tmp_path):
    crops = _photo_crops(6, seed=5)
    members = {}
    for i, pixels in enumerate(crops):
        members[f"s{i}.jpg"] = _encode(pixels)
        members[f"s{i}.json"] = json.dumps({"class_id": [i % 2, 2] if i == 5 else i % 3, "caption": "x"}).encode()
    (tmp_path / "w").mkdir()
    _tar(tmp_path / "w" / "part-0.tar", members)
    manifest = index_shards(f"file://{tmp_path}/w", split="test", label_field="class_id")
    assert manifest["num_samples"] == 6 and manifest["num_classes"] == 3 and manifest["multi_label"] is True
    assert manifest["class_counts"] == [2, 3, 2]  # s5 counts for classes 1 and 2
    with pytest.raises(SourceError, match="no integer"):
        index_shards(f"file://{tmp_path}/w", split="test", label_field="label")


# ---------------------------------------------------------------------------------------------------------------
# Resuming


def test_a_rerun_keeps_finished_shards_and_redoes_only_the_unfinished_ones(tmp_path):
    _write_imagenet(tmp_path / "in", per_class=10, val=0)
    source = imagenet21k(str(tmp_path / "in" / "train"))
    out = tmp_path / "out"
    opts = dict(samples_per_shard=5, parts_per_task=2)
    manifest, samples = _convert(source, "train", out, **opts)
    # Interrupted state: the manifest and the last shards of each task gone, one shard left without its record.
    (out / "train.manifest.json").unlink()
    shard_names = [s["name"] for s in manifest["shards"]]
    (out / shard_names[-1]).unlink()
    (out / "_progress" / shard_names[-1].replace(".tar", ".json")).unlink()
    (out / "_progress" / shard_names[2].replace(".tar", ".json")).unlink()
    kept = {name: (out / name).stat().st_mtime_ns for name in shard_names[:2]}
    # A record from before class counts were [label, count] pairs holds one count per class; it still counts.
    first = out / "_progress" / shard_names[0].replace(".tar", ".json")
    record = json.loads(first.read_text())
    dense = [0] * len(WNIDS)
    for label, n in record["stats"]["class_counts"]:
        dense[label] = n
    record["stats"]["class_counts"] = dense
    first.write_text(json.dumps(record))
    again, samples_again = _convert(source, "train", out, **opts)
    assert again == manifest and samples_again.keys() == samples.keys()
    assert {name: (out / name).stat().st_mtime_ns for name in shard_names[:2]} == kept  # not rewritten


# ---------------------------------------------------------------------------------------------------------------
# Multi-label training


def test_multi_hot_targets_train_with_the_sigmoid_loss_summed_over_classes():
    import torch
    import torch.nn.functional as F

    from pipeline.pretrain.trainer import loss_function

    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 1.0, -3.0]])
    multi_hot = torch.tensor([[1, 0, 1], [0, 1, 1]])  # image 0: classes 0 and 2; image 1: classes 1 and 2
    expected = sum(
        F.binary_cross_entropy_with_logits(logits[i], multi_hot[i].float(), reduction="sum") for i in range(2)
    )
    assert loss_function("sigmoid", 3)(logits, multi_hot).item() == pytest.approx(expected.item() / 2)
    single = loss_function("sigmoid", 3)(logits, torch.tensor([0, 1]))
    assert single.item() != pytest.approx(expected.item() / 2)  # the second class of each image counts


def test_pixel_statistics_decode_one_image_in_250_and_at_least_one_per_shard(tmp_path):
    _write_imagenet(tmp_path / "in", per_class=4, val=0, train_as_tars=False)
    source = imagenet21k(str(tmp_path / "in" / "train"))
    manifest, samples = _convert(source, "train", tmp_path / "out", samples_per_shard=3)
    firsts = []
    for shard in manifest["shards"]:
        with tarfile.open(tmp_path / "out" / shard["name"]) as tar:
            firsts.append(tar.getnames()[0].split(".", 1)[0])
    pixels = np.concatenate([samples[key][0].reshape(-1, 3) for key in firsts]).astype(np.float64)
    assert manifest["image_stats"]["stats_images"] == len(manifest["shards"]) == 3  # 9 train images
    assert manifest["image_stats"]["mean_rgb"] == pytest.approx(pixels.mean(axis=0), abs=1e-3)
    assert manifest["image_stats"]["std_rgb"] == pytest.approx(pixels.std(axis=0), abs=1e-3)


def test_converting_again_with_other_options_removes_the_earlier_shards(tmp_path):
    _write_imagenet(tmp_path / "in", per_class=6, val=0)
    source = imagenet21k(str(tmp_path / "in" / "train"))
    _convert(source, "train", tmp_path / "out", samples_per_shard=4)
    manifest, _ = _convert(source, "train", tmp_path / "out", samples_per_shard=50)
    assert sorted(p.name for p in (tmp_path / "out").glob("*.tar")) == [s["name"] for s in manifest["shards"]]
    assert len(list((tmp_path / "out" / "_progress").iterdir())) == len(manifest["shards"]) == 1


def test_a_parquet_snapshot_without_the_named_label_column_says_which_flag_to_change(tmp_path):
    pngs, labels, _ = _digit_pngs()
    _write_parquet(tmp_path / "s" / "train-00000-of-00001.parquet", pngs[:4], labels[:4], pa.int64(), {})
    with pytest.raises(SourceError, match="no column 'fine_label' \\(--label-column\\)"):
        parquet_source(str(tmp_path / "s"), label_column="fine_label")
    source = parquet_source(str(tmp_path / "s"))  # no metadata: classes 0..max label
    assert source.class_names == [str(i) for i in range(max(labels[:4]) + 1)]
