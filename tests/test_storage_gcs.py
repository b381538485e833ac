"""pipeline/storage.py against a real GCS JSON API (the emulator) and local files."""

from __future__ import annotations

import pytest

from pipeline import storage


def test_urls_are_checked_and_pipe_is_refused(tmp_path):
    assert storage.check_url(str(tmp_path)) == f"file://{tmp_path}"
    with pytest.raises(storage.UnsupportedURLError, match="pipe"):
        storage.check_url("pipe:gsutil cat gs://b/x.tar")
    with pytest.raises(storage.UnsupportedURLError, match="unsupported URL scheme"):
        storage.check_url("s3://bucket/x")
    with pytest.raises(storage.UnsupportedURLError, match="names no bucket"):
        storage.check_url("gs:///x")


def test_gcs_roundtrip_bytes_json_listing_and_removal(gcs_bucket):
    storage.write_bytes(storage.join(gcs_bucket, "a/one.bin"), b"\x00\x01")
    storage.write_json(storage.join(gcs_bucket, "a/two.json"), {"k": [1, 2]})
    assert storage.read_bytes(f"{gcs_bucket}/a/one.bin") == b"\x00\x01"
    assert storage.read_json(f"{gcs_bucket}/a/two.json") == {"k": [1, 2]}
    assert storage.listdir(f"{gcs_bucket}/a") == [f"{gcs_bucket}/a/one.bin", f"{gcs_bucket}/a/two.json"]
    assert storage.glob(f"{gcs_bucket}/a/*.json") == [f"{gcs_bucket}/a/two.json"]
    storage.remove(f"{gcs_bucket}/a/one.bin")
    storage.filesystem(gcs_bucket)[0].invalidate_cache()
    assert not storage.exists(f"{gcs_bucket}/a/one.bin")


def test_gcs_put_and_get_file_and_directories(gcs_bucket, tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "x.txt").write_text("x")
    (src / "sub" / "y.txt").write_text("yy")
    assert storage.upload_dir(src, f"{gcs_bucket}/dir") == ["sub/y.txt", "x.txt"]
    assert storage.size(f"{gcs_bucket}/dir/sub/y.txt") == 2
    assert sorted(storage.download_dir(f"{gcs_bucket}/dir", tmp_path / "back")) == ["sub/y.txt", "x.txt"]
    assert (tmp_path / "back" / "sub" / "y.txt").read_text() == "yy"


def test_completion_marker_is_what_makes_a_directory_complete(gcs_bucket):
    url = f"{gcs_bucket}/ckpt"
    storage.write_bytes(f"{url}/part", b"p")
    assert not storage.is_complete(url)
    assert storage.read_marker(url) is None
    storage.mark_complete(url, {"step": 3})
    assert storage.is_complete(url)
    assert storage.read_marker(url) == {"step": 3}


def test_local_writes_replace_whole_objects(tmp_path):
    url = f"file://{tmp_path}/d/obj"
    storage.write_bytes(url, b"first")
    storage.write_bytes(url, b"second")
    assert storage.read_bytes(url) == b"second"
    assert [p.name for p in (tmp_path / "d").iterdir()] == ["obj"]  # no temp files left behind
    assert storage.local_path(url) == tmp_path / "d" / "obj"
