"""Parquet datasets and Hugging Face ``datasets`` snapshots (the hub's Parquet layout), on disk or any storage URL.

``parquet_source(root, image_column="image", label_column="label")`` reads every ``*.parquet`` file below
``root``. A file's split comes from its name as the hub writes it (``data/train-00000-of-00004.parquet``,
``test-00000-of-00001-<hash>.parquet``) or else from its folder (``train/0000.parquet``):
``train``/``train800`` -> train; ``validation``/``val``/``val200``/``minival`` -> minival; ``test`` -> test.
Other splits (``train800val200``...) are left out and named in the split note.

- image column: a struct with ``bytes`` (and/or ``path``, resolved beside the file), as ``datasets.Image`` stores
  it, or plain binary;
- label column: an integer (single label) or a list of integers (multi-label);
- class names: the ``ClassLabel`` names from the Parquet schema's ``huggingface`` metadata, else from a
  ``dataset_info.json`` next to the data, else ``"0" .. "K-1"`` (K from the largest label).
Each Parquet row group is one part, read on its own with ``pyarrow`` through the storage client.
"""

from __future__ import annotations

import json
import posixpath
import re
from collections.abc import Iterator
from typing import Any

import pyarrow.parquet as pq

from pipeline import storage
from pipeline.data.imagenet import as_url
from pipeline.data.sources import Source, SourceError, SourcePart, SourceSample

SPLIT_NAMES = {
    "train": "train",
    "train800": "train",
    "validation": "minival",
    "valid": "minival",
    "val": "minival",
    "val200": "minival",
    "minival": "minival",
    "test": "test",
}
_HUB_FILE = re.compile(r"(?P<split>[A-Za-z0-9_]+)-\d{5}-of-\d{5}")


def split_of(url: str) -> str:
    """The publisher's split name of a Parquet file: from a hub file name, else its folder."""
    name = url.rsplit("/", 1)[-1]
    match = _HUB_FILE.match(name)
    return match.group("split") if match else url.rsplit("/", 2)[-2]


def _class_label_names(feature: Any) -> list[str] | None:
    """ClassLabel names of a feature as ``datasets`` serialises it, also inside Sequence/List (multi-label)."""
    if not isinstance(feature, dict):
        return None
    if feature.get("_type") == "ClassLabel":
        return [str(n) for n in feature["names"]]
    if feature.get("_type") in ("Sequence", "List", "LargeList"):
        return _class_label_names(feature.get("feature"))
    return None


def class_names_from_metadata(schema_metadata: dict[bytes, bytes] | None, label_column: str) -> list[str] | None:
    raw = (schema_metadata or {}).get(b"huggingface")
    if raw is None:
        return None
    features = json.loads(raw).get("info", {}).get("features", {})
    return _class_label_names(features.get(label_column))


def _dataset_info_names(root: str, label_column: str) -> list[str] | None:
    for candidate in ("dataset_info.json", "train/dataset_info.json"):
        url = storage.join(root, candidate)
        if storage.exists(url):
            return _class_label_names(storage.read_json(url).get("features", {}).get(label_column))
    return None


def _image_bytes(value: Any, file_url: str) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return value["bytes"]
        if value.get("path"):
            return storage.read_bytes(storage.join(file_url.rsplit("/", 1)[0], value["path"]))
    raise ValueError(f"image value is neither bytes nor a struct with bytes/path: {str(value)[:80]}")


def _labels(value: Any, column: str) -> tuple[int, tuple[int, ...] | None]:
    if isinstance(value, list):
        if not value:
            raise ValueError(f"column {column!r}: a multi-label row has no label")
        labels = tuple(int(x) for x in value)
        return labels[0], labels
    if value is None:
        raise ValueError(f"column {column!r}: a row has no label")
    return int(value), None


def _row_group_part(file_url: str, group: int, rows: int, image_column: str, label_column: str) -> SourcePart:
    stem = posixpath.splitext(file_url.rsplit("/", 1)[-1])[0]
    prefix = re.sub(r"[^A-Za-z0-9_-]+", "_", stem)

    def read() -> Iterator[SourceSample]:
        with storage.open_read(file_url) as f:
            parquet = pq.ParquetFile(f)
            offset = sum(parquet.metadata.row_group(g).num_rows for g in range(group))
            table = parquet.read_row_group(group, columns=[image_column, label_column])
        images = table.column(image_column).to_pylist()
        labels = table.column(label_column).to_pylist()
        for i, (image, raw_label) in enumerate(zip(images, labels, strict=True)):
            label, all_labels = _labels(raw_label, label_column)
            yield SourceSample(
                f"{prefix}_{offset + i:08d}",
                label,
                lambda image=image: _image_bytes(image, file_url),
                labels=all_labels,
            )

    return SourcePart(f"{stem}-rg{group:05d}", read, rows)


def parquet_source(root_text: str, *, image_column: str = "image", label_column: str = "label") -> Source:
    root = as_url(root_text)
    files = storage.glob(storage.join(root, "**", "*.parquet"))
    if not files:
        raise SourceError(f"{root}: no *.parquet files below it (expected e.g. data/train-00000-of-00001.parquet)")
    parts: dict[str, list[SourcePart]] = {}
    ignored: set[str] = set()
    names: list[str] | None = None
    multi_label = False
    largest = -1
    for url in files:
        split = SPLIT_NAMES.get(split_of(url))
        if split is None:
            ignored.add(split_of(url))
            continue
        with storage.open_read(url, small_reads=True) as f:
            parquet = pq.ParquetFile(f)
            schema = parquet.schema_arrow
            for column, flag in ((image_column, "--image-column"), (label_column, "--label-column")):
                if column not in schema.names:
                    raise SourceError(f"{url} has no column {column!r} ({flag}); its columns: {schema.names}")
            names = names or class_names_from_metadata(schema.metadata, label_column)
            multi_label = multi_label or str(schema.field(label_column).type).startswith(("list", "large_list"))
            if names is None:
                # No class names published: count classes from the label column alone (no image is read).
                labels = parquet.read(columns=[label_column]).column(label_column).to_pylist()
                flat = [x for v in labels for x in (v if isinstance(v, list) else [v]) if x is not None]
                largest = max([largest, *flat])
            rows = [parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)]
        parts.setdefault(split, []).extend(
            _row_group_part(url, g, n, image_column, label_column) for g, n in enumerate(rows)
        )
    if not parts:
        raise SourceError(
            f"{root}: no Parquet file of a known split (train, validation, test); found {sorted(ignored)}"
        )
    names = names or _dataset_info_names(root, label_column) or [str(i) for i in range(largest + 1)]
    note = "the publisher's splits (train; validation -> minival; test)"
    if ignored:
        note += f"; left out: {', '.join(sorted(ignored))}"
    return Source("parquet", names, {}, note, parts=parts, multi_label=multi_label)
