"""jobs/prepare_data.py with the large sources: converted through the CLI (in this process with --local or a
memory:// output; the Ray path is tested killed and rerun in test_ingest_ray.py), and bad input refused with exit
status 2 before any shard is written."""

from __future__ import annotations

import json

import pyarrow as pa

from jobs import prepare_data
from pipeline import storage
from tests.test_ingest_sources import (
    _digit_pngs,
    _encode,
    _hf_metadata,
    _photo_crops,
    _read_back,
    _tar,
    _write_imagenet,
    _write_parquet,
)


def test_cli_converts_imagenet21k_tars_in_process_with_the_fixture_labels(tmp_path, capsys):
    fixture = _write_imagenet(tmp_path / "in", per_class=6, val=0)
    out = tmp_path / "out"
    argv = ["--source", "imagenet21k", "--input", str(tmp_path / "in" / "train"), "--out", f"file://{out}"]
    assert prepare_data.main([*argv, "--split", "all", "--samples-per-shard", "4", "--local"]) == 0
    printed = capsys.readouterr().out
    assert "train: 15 samples" in printed and "minival: 3 samples" in printed
    _, train = _read_back(out, "train")
    _, minival = _read_back(out, "minival")
    assert {k: v[1] for k, v in (train | minival).items()} == {k: label for k, (_, label) in fixture["train"].items()}


def test_cli_refuses_bad_input_with_the_fix_before_any_work(tmp_path, capsys):
    out = f"file://{tmp_path}/out"

    def refused(*argv: str) -> str:
        assert prepare_data.main(list(argv)) == 2
        return capsys.readouterr().err

    assert "needs --input" in refused("--source", "imagenet", "--out", out)
    assert "does not exist" in refused("--source", "imagenet21k", "--input", str(tmp_path / "nowhere"), "--out", out)
    pngs, labels, _ = _digit_pngs()
    _write_parquet(tmp_path / "s" / "train-00000-of-00001.parquet", pngs[:4], labels[:4], pa.int64(), {})
    error = refused("--source", "parquet", "--input", str(tmp_path / "s"), "--out", out, "--label-column", "fine")
    assert "no column 'fine' (--label-column)" in error
    error = refused("--source", "parquet", "--input", str(tmp_path / "s"), "--out", out, "--class-names", "nope.txt")
    assert "--class-names nope.txt: no such file" in error and "one class name per line" in error
    snapshot = ["--source", "parquet", "--input", str(tmp_path / "s"), "--out", out]
    assert "--per-class" in refused(*snapshot, "--classes", "1")
    assert not (tmp_path / "out").exists()  # nothing was written


def test_cli_indexes_json_labelled_shards_in_place_with_class_names_from_a_file(tmp_path, capsys):
    crops = _photo_crops(6, seed=7)
    members = {}
    for i, pixels in enumerate(crops):
        members[f"s{i}.jpg"] = _encode(pixels)
        members[f"s{i}.json"] = json.dumps({"class_id": i % 3}).encode()
    (tmp_path / "w").mkdir()
    _tar(tmp_path / "w" / "part-0.tar", members)
    (tmp_path / "names.txt").write_text("cat\ndog\nfish\n")
    argv = ["--source", "webdataset", "--input", f"file://{tmp_path}/w/part-{{0..0}}.tar", "--split", "test"]
    assert prepare_data.main([*argv, "--label-field", "class_id", "--class-names", str(tmp_path / "names.txt")]) == 0
    manifest = json.loads((tmp_path / "w" / "test.manifest.json").read_text())
    assert manifest["class_names"] == ["cat", "dog", "fish"] and manifest["class_counts"] == [2, 2, 2]
    assert manifest["source"]["label_field"] == "class_id"
    capsys.readouterr()
    missing = ["--source", "webdataset", "--input", f"file://{tmp_path}/w/part-{{0..1}}.tar", "--split", "test"]
    assert prepare_data.main(missing) == 2
    assert "1 shard(s) do not exist" in capsys.readouterr().err


def test_cli_vtab1k_split_of_a_parquet_snapshot_into_memory(capsys, tmp_path):
    pngs, labels, _ = _digit_pngs()
    root = tmp_path / "snap"
    metadata = _hf_metadata({"_type": "ClassLabel", "names": [str(i) for i in range(10)]})
    _write_parquet(root / "data" / "train-00000-of-00001.parquet", pngs[:1100], labels[:1100], pa.int64(), metadata)
    _write_parquet(root / "data" / "test-00000-of-00001.parquet", pngs[1100:1150], labels[1100:1150], pa.int64(), {})
    argv = ["--source", "parquet", "--input", str(root), "--out", "memory://cli/vtab", "--vtab1k", "--split", "minival"]
    assert prepare_data.main(argv) == 0  # memory:// cannot go through Ray: converted in this process
    assert "minival: 200 samples" in capsys.readouterr().out
    manifest = storage.read_json("memory://cli/vtab/minival.manifest.json")
    assert manifest["source"]["name"] == "parquet-vtab1k" and sum(manifest["class_counts"]) == 200
