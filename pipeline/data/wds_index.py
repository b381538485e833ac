"""Index-only mode for WebDataset shards that already exist (e.g. ImageNet as published in ``{jpg, cls}`` or
``{jpg, json}`` shards): write the manifest (samples per shard, sizes, hashes, classes) and leave the data as it is.

``index_shards("gs://b/imagenet/train-{0000..1023}.tar", split="train")`` reads each shard once (every byte goes
into its hash; only the small label members are kept) and writes ``<split>.manifest.json`` beside the
shards, where the loader finds them by name. Labels come from ``.cls`` (an integer) or, for ``{jpg, json}``
shards, from a field of the ``.json`` member (``label_field``; an integer or a list of integers, then
multi-label). Class names come from ``class_names`` when given, else ``"0" .. "K-1"``.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import tarfile
from collections import Counter
from typing import Any

import braceexpand

from pipeline import storage
from pipeline.data import shards
from pipeline.data.sources import SourceError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def _shard_urls(pattern: str) -> list[str]:
    if "{" in pattern:
        return [storage.check_url(u, field="--input") for u in braceexpand.braceexpand(pattern)]
    if pattern.endswith(".tar"):
        return [storage.check_url(pattern, field="--input")]
    return storage.glob(storage.join(pattern, "*.tar"))


def check_shards_exist(pattern: str) -> None:
    """Every shard ``pattern`` names exists: one listing per folder, before any shard is read."""
    urls = _shard_urls(pattern)
    if not urls:
        raise SourceError(f"--input {pattern}: no .tar shards found")
    listed: dict[str, set[str]] = {}
    missing = []
    for url in urls:
        folder = url.rsplit("/", 1)[0]
        if folder not in listed:
            listed[folder] = set(storage.glob(storage.join(folder, "*.tar"))) if storage.exists(folder) else set()
        if url not in listed[folder]:
            missing.append(url)
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise SourceError(f"--input {pattern}: {len(missing)} shard(s) do not exist ({shown}); check the pattern")


def _labels_of(members: dict[str, bytes], label_field: str, where: str) -> list[int]:
    if "cls" in members:
        return [int(members["cls"].decode("ascii").strip())]
    if "json" in members:
        value = json.loads(members["json"]).get(label_field)
        if isinstance(value, int):
            return [value]
        if isinstance(value, list) and value and all(isinstance(x, int) for x in value):
            return value
        raise SourceError(f"{where}: the .json member has no integer (or list of integers) field {label_field!r}")
    raise SourceError(f"{where}: no label member (.cls or .json) among {sorted(members)}")


def index_shard(url: str, label_field: str) -> dict[str, Any]:
    """One shard's entry: name, samples, bytes, sha256, and its label counts (multi-label counts each class)."""
    digest = hashlib.sha256()
    counts: Counter[int] = Counter()
    samples = 0
    multi = False
    key: str | None = None
    members: dict[str, bytes] = {}

    def finish() -> None:
        nonlocal samples, multi
        if key is None:
            return
        if not any(ext in members for ext in IMAGE_EXTS):
            raise SourceError(f"{url}: sample {key} has no image member among {sorted(members)}")
        labels = _labels_of(members, label_field, f"{url}: sample {key}")
        multi = multi or len(labels) > 1
        counts.update(labels)
        samples += 1

    # The hash covers every byte, so the stream is read whole; only label members are kept in memory.
    with storage.open_read(url, streaming=True) as raw:

        class Hashing:
            def read(self, n: int = -1) -> bytes:
                data = raw.read(n)
                digest.update(data)
                return data

        with tarfile.open(fileobj=Hashing(), mode="r|") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                directory, base = posixpath.split(info.name)
                stem, _, ext = base.partition(".")
                member_key = posixpath.join(directory, stem)
                if member_key != key:
                    finish()
                    key, members = member_key, {}
                if ext.lower() in ("cls", "json"):
                    extracted = tar.extractfile(info)
                    members[ext.lower()] = extracted.read() if extracted is not None else b""
                else:
                    members[ext.lower()] = b""
            finish()
        while chunk := raw.read(1 << 20):  # the zero padding after the end-of-archive blocks
            digest.update(chunk)
        size = storage.size(url)
    return {
        "name": url.rsplit("/", 1)[-1],
        "samples": samples,
        "bytes": size,
        "sha256": digest.hexdigest(),
        "label_counts": {str(k): v for k, v in sorted(counts.items())},
        "multi_label": multi,
    }


def index_shards(
    pattern: str, *, split: str, class_names: list[str] | None = None, label_field: str = "label"
) -> dict[str, Any]:
    """Write ``<split>.manifest.json`` beside the shards named by ``pattern`` (a brace pattern, one tar, or a
    folder) and return it."""
    urls = _shard_urls(pattern)
    if not urls:
        raise SourceError(f"--input {pattern}: no .tar shards found")
    directories = {u.rsplit("/", 1)[0] for u in urls}
    if len(directories) != 1:
        raise SourceError(f"--input {pattern}: the shards must sit in one folder (found {sorted(directories)})")
    entries = [index_shard(url, label_field) for url in urls]
    totals: Counter[int] = Counter()
    for entry in entries:
        totals.update({int(k): v for k, v in entry.pop("label_counts").items()})
    num_classes = max(totals) + 1 if class_names is None else len(class_names)
    if max(totals) >= num_classes:
        raise SourceError(f"labels go up to {max(totals)} but {num_classes} class names were given")
    multi_label = any(entry.pop("multi_label") for entry in entries)
    manifest = {
        "format": shards.MANIFEST_FORMAT,
        "split": split,
        "num_samples": sum(e["samples"] for e in entries),
        "num_classes": num_classes,
        "class_names": class_names or [str(i) for i in range(num_classes)],
        "class_counts": [totals.get(i, 0) for i in range(num_classes)],
        "multi_label": multi_label,
        "shards": entries,
        "skipped_source_samples": [],
        "source": {"name": "webdataset", "index_only": True, "label_field": label_field, "input": pattern},
    }
    storage.write_json(storage.join(directories.pop(), shards.manifest_name(split)), manifest)
    return manifest
