"""What ``jobs/prepare_data.py`` runs: the source's input checked, then converted (or indexed) by the right path.

- ``imagenet``, ``imagenet21k``, ``parquet`` (and any source with ``vtab1k``) are read from any storage URL and
  converted as Ray tasks (``pipeline.data.ingest_ray``): a local Ray by default, the cluster at ``address`` (or the
  one ``ray job submit`` runs in) otherwise; resumable shard by shard. ``local`` runs the same tasks in this
  process, and so does a ``memory://`` output, which Ray's worker processes cannot see.
- digits, lfw, CIFAR, Pets, Flowers and image folders fit in memory and are written in this process
  (``pipeline.data.prepare``), where ``classes`` / ``per_class`` select from them.
- ``webdataset``: shards that already exist are indexed in place (``pipeline.data.wds_index``); the manifest is
  written beside them.
Every problem with the input (missing, a Parquet without the named column, an unreadable class-names file) is a
``SourceError`` or ``ValueError`` raised before any shard is written.
"""

from __future__ import annotations

import logging
from typing import Any

from pipeline import storage
from pipeline.data.imagenet import as_url, imagenet1k, imagenet21k
from pipeline.data.ingest import IngestOptions, convert_split
from pipeline.data.parquet import parquet_source
from pipeline.data.prepare import PrepareOptions, prepare
from pipeline.data.sources import SOURCES, SPLITS, Source, SourceError, load_source
from pipeline.data.vtab import vtab1k
from pipeline.data.wds_index import check_shards_exist, index_shards

log = logging.getLogger(__name__)

LARGE_SOURCES = ("imagenet", "imagenet21k", "parquet")
ALL_SOURCES = (*SOURCES, *LARGE_SOURCES, "webdataset")
DEFAULT_SAMPLES_PER_SHARD = 1000


def read_class_names(text: str) -> list[str]:
    """Class names from a text file (local path or URL), one per line: line i names class i."""
    url = as_url(text)
    if not storage.exists(url):
        raise SourceError(
            f"--class-names {text}: no such file; give a text file with one class name per line (line i = class i)"
        )
    names = [line.strip() for line in storage.read_bytes(url).decode().splitlines() if line.strip()]
    if not names:
        raise SourceError(f"--class-names {text} holds no class names (expected one per line)")
    if len(set(names)) != len(names):
        raise SourceError(f"--class-names {text} names a class twice")
    return names


def _need_input(opts: PrepareOptions) -> str:
    if not opts.input:
        raise SourceError(f"--source {opts.source} needs --input <directory or URL> (local path, file:// or gs://)")
    url = as_url(opts.input)
    if "{" not in url and not storage.exists(url):  # a brace pattern of shards is checked shard by shard
        raise SourceError(f"--input {opts.input} does not exist; check the path or URL (and access to the bucket)")
    return url


def _large_source(opts: PrepareOptions) -> Source:
    url = _need_input(opts) if opts.source in LARGE_SOURCES else opts.input
    if opts.source == "imagenet":
        source = imagenet1k(url, seed=opts.split_seed)
    elif opts.source == "imagenet21k":
        source = imagenet21k(url, seed=opts.split_seed)
    elif opts.source == "parquet":
        source = parquet_source(url, image_column=opts.image_column, label_column=opts.label_column)
    else:
        source = load_source(opts.source, opts.input, split_seed=opts.split_seed)
    if opts.class_names is not None:
        names = read_class_names(opts.class_names)
        if len(names) < len(source.class_names):
            raise SourceError(
                f"--class-names {opts.class_names} names {len(names)} classes but {source.name} has "
                f"{len(source.class_names)}; give one name per class"
            )
        source.class_names = names
    return vtab1k(source, seed=opts.split_seed) if opts.vtab1k else source


def _check_common(opts: PrepareOptions) -> None:
    if opts.source not in ALL_SOURCES:
        raise SourceError(f"--source {opts.source!r} is not known; use one of {', '.join(ALL_SOURCES)}")
    if opts.split != "all" and opts.split not in SPLITS:
        raise ValueError(f"--split must be one of {', '.join(SPLITS)} or 'all', got {opts.split!r}")
    if opts.num_cpus is not None and opts.num_cpus <= 0:
        raise ValueError(f"--num-cpus must be positive, got {opts.num_cpus}")


def _index(opts: PrepareOptions) -> dict[str, dict[str, Any]]:
    if opts.out:
        raise ValueError("--out is not used with --source webdataset: the manifest is written beside the shards")
    if opts.split == "all":
        raise ValueError("--source webdataset indexes one split per run: name it with --split train|minival|test")
    pattern = _need_input(opts)
    class_names = read_class_names(opts.class_names) if opts.class_names else None
    check_shards_exist(pattern)
    return {opts.split: index_shards(pattern, split=opts.split, class_names=class_names, label_field=opts.label_field)}


def convert(opts: PrepareOptions) -> dict[str, dict[str, Any]]:
    """Write (or index) the requested split(s); returns {split: manifest}."""
    _check_common(opts)
    if opts.source == "webdataset":
        return _index(opts)
    if opts.source not in LARGE_SOURCES and not opts.vtab1k:
        if opts.class_names is not None:
            raise ValueError(f"--class-names is for parquet and webdataset sources; {opts.source} has its own")
        return prepare(opts)
    if opts.classes is not None or opts.per_class is not None:
        raise ValueError(
            f"--classes / --per-class select from the small in-memory sources; not with --source {opts.source}"
            + (" --vtab1k" if opts.vtab1k else "")
        )
    if not opts.out:
        raise ValueError("--out is required: the output directory URL (file:// or gs://)")
    ingest_opts = IngestOptions(
        out=opts.out,
        samples_per_shard=opts.samples_per_shard or DEFAULT_SAMPLES_PER_SHARD,
        shard_size=opts.shard_size,
        parts_per_task=opts.parts_per_task,
        split_seed=opts.split_seed,
    )
    source = _large_source(opts)
    splits = source.split_names() if opts.split == "all" else [opts.split]
    if opts.split not in ("all", *source.split_names()):
        raise SourceError(f"{source.name} has no {opts.split!r} split; it has {', '.join(source.split_names())}")
    in_process = opts.local or storage.scheme_of(opts.out) == "memory"
    if in_process:
        return {split: convert_split(source, split, ingest_opts) for split in splits}
    from pipeline.data.ingest_ray import convert_split_ray  # Ray is imported only for this path

    return {
        split: convert_split_ray(source, split, ingest_opts, address=opts.address, num_cpus=opts.num_cpus)
        for split in splits
    }
