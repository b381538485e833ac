"""Part-based conversion of large sources into WebDataset shards: planned once, written task by task, resumable.

A split's parts (class folders, per-class tars, Parquet row groups) are shuffled with the split seed and grouped,
``parts_per_task`` at a time, into tasks. A task interleaves its parts' samples in a seeded order (so each shard
mixes classes) and cuts the stream into shards named ``<split>-TTTTT-KKKK.tar`` (task, shard within the task).
The plan depends only on the parts and the options, never on how many processes run the tasks, so the shards are
the same whoever writes them.

Each finished shard is durable on its own: it is uploaded whole, then a small record (``_progress/<shard>.json``:
samples, bytes, hash, how many source samples it consumed) is written. A task started again skips the source
samples of shards that have a record (without loading their images) and writes only the rest. The manifest lists
every shard in plan order and is written last, as for ``pipeline.data.prepare``.

Samples are written as ``<key>.jpg`` + ``<key>.cls`` (the label, or the first of a multi-label sample's labels),
plus ``<key>.json`` when the sample carries all its ``labels`` or ``extra`` metadata (e.g. ImageNet ReaL labels).
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import logging
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from PIL import Image

from pipeline import storage
from pipeline.data import shards
from pipeline.data.prepare import JPEG_QUALITY, encode_image
from pipeline.data.sources import Source, SourcePart, SourceSample, split_parts

log = logging.getLogger(__name__)

PROGRESS_DIR = "_progress"
# One written image in this many is decoded for the manifest's pixel statistics: 4 per shard of 1,000 (the
# default). A rate per image, not a count per shard: small shards would otherwise decode a large share of all
# images (4 per 100-sample shard cost ~0.05 CPU-ms per image, 15% of a conversion's CPU time).
STATS_EVERY = 250


@dataclass(frozen=True)
class IngestOptions:
    out: str
    samples_per_shard: int = 1000
    shard_size: int = 256 * 1000**2
    parts_per_task: int = 16
    split_seed: int = 0

    def __post_init__(self) -> None:
        storage.check_url(self.out, field="--out")
        if self.samples_per_shard <= 0:
            raise ValueError(f"--samples-per-shard must be positive, got {self.samples_per_shard}")
        if self.shard_size <= 0:
            raise ValueError(f"--shard-size must be positive, got {self.shard_size}")
        if self.parts_per_task <= 0:
            raise ValueError(
                f"--parts-per-task must be positive (e.g. 16 class tars per task), got {self.parts_per_task}"
            )


@dataclass(frozen=True)
class Task:
    split: str
    index: int
    parts: tuple[SourcePart, ...]

    @property
    def part_names(self) -> list[str]:
        return [p.name for p in self.parts]


def plan_tasks(source: Source, split: str, opts: IngestOptions) -> list[Task]:
    """The split's parts, in a seeded order, grouped into tasks of ``parts_per_task``."""
    parts = sorted(split_parts(source, split), key=lambda p: p.name)
    if not parts:
        raise ValueError(f"split {split!r} of {source.name} has no samples")
    order = np.random.default_rng([opts.split_seed, 11]).permutation(len(parts))
    shuffled = [parts[i] for i in order]
    step = opts.parts_per_task
    return [Task(split, t, tuple(shuffled[s : s + step])) for t, s in enumerate(range(0, len(shuffled), step))]


def interleave(task: Task, seed: int) -> Iterator[SourceSample]:
    """The task's samples, drawing the next one from a seeded random part among those not yet exhausted."""
    streams = [part.read() for part in task.parts]
    rng = np.random.default_rng([seed, task.index, 13])
    while streams:
        i = int(rng.integers(len(streams)))
        try:
            yield next(streams[i])
        except StopIteration:
            streams.pop(i)


def task_shard_name(task: Task, k: int) -> str:
    return f"{task.split}-{task.index:05d}-{k:04d}.tar"


def _plan_key(task: Task, opts: IngestOptions) -> dict[str, Any]:
    # A record counts only for the same parts cut the same way; other options give other shards.
    return {
        "parts": task.part_names,
        "samples_per_shard": opts.samples_per_shard,
        "shard_size": opts.shard_size,
        "split_seed": opts.split_seed,
    }


def _record_url(out: str, shard_name: str) -> str:
    return storage.join(out, PROGRESS_DIR, shard_name.removesuffix(".tar") + ".json")


def _sample_members(sample: SourceSample, image: bytes) -> dict[str, Any]:
    members: dict[str, Any] = {"__key__": sample.key, "jpg": image, "cls": str(int(sample.label)).encode()}
    meta: dict[str, Any] = dict(sample.extra or {})
    if sample.labels is not None:
        meta["labels"] = [int(x) for x in sample.labels]
    if meta:
        members["json"] = json.dumps(meta, sort_keys=True).encode()
    return members


class _ShardStats:
    """What the manifest says about a shard's images: sizes, pixel sums over one in ``STATS_EVERY``, class counts."""

    def __init__(self, num_classes: int) -> None:
        self.heights: list[int] = []
        self.widths: list[int] = []
        self.sums = np.zeros(3)
        self.sq_sums = np.zeros(3)
        self.pixels = 0
        self.class_counts = [0] * num_classes
        self.skipped: list[dict[str, str]] = []

    def add(self, image: bytes, height: int, width: int, label: int) -> None:
        if len(self.heights) % STATS_EVERY == 0:
            with Image.open(io.BytesIO(image)) as im:
                # Per-channel histograms (computed in C) give the sums and squared sums exactly.
                counts = np.asarray(im.convert("RGB").histogram(), dtype=np.float64).reshape(3, 256)
            values = np.arange(256, dtype=np.float64)
            self.sums += counts @ values
            self.sq_sums += counts @ values**2
            self.pixels += int(counts[0].sum())
        self.heights.append(height)
        self.widths.append(width)
        self.class_counts[label] += 1

    def as_dict(self) -> dict[str, Any]:
        return {
            "height": [min(self.heights), max(self.heights), sum(self.heights)],
            "width": [min(self.widths), max(self.widths), sum(self.widths)],
            "pixel_sums": self.sums.tolist(),
            "pixel_sq_sums": self.sq_sums.tolist(),
            "pixels": self.pixels,
            # [label, count] pairs of the classes present: a dense list would be 21,841 numbers per shard for
            # ImageNet-21k (a 200 KB record, 7 CPU-ms to write, and GBs on the driver, which keeps every record).
            "class_counts": [[label, n] for label, n in enumerate(self.class_counts) if n],
            "skipped": self.skipped,
        }


def _write_shard(
    samples: Iterator[SourceSample], path: Path, opts: IngestOptions, num_classes: int
) -> tuple[int, int, _ShardStats]:
    """Fill one local tar from ``samples`` until a limit is reached; returns (written, consumed, stats)."""
    stats = _ShardStats(num_classes)
    written = consumed = 0
    with open(path, "wb") as f, wds.TarWriter(f, encoder=False, mtime=0, user="", group="", mode=0o644) as tar:
        for sample in samples:
            consumed += 1
            try:
                image, height, width = encode_image(sample.load())
            except (OSError, ValueError) as exc:
                log.warning("skipping %s: unreadable source image (%s)", sample.key, exc)
                stats.skipped.append({"key": sample.key, "reason": str(exc)[:200]})
                continue
            if "." in sample.key or "/" in sample.key:
                raise ValueError(f"sample key {sample.key!r} must not contain '.' or '/'")
            tar.write(_sample_members(sample, image))
            stats.add(image, height, width, sample.label)
            written += 1
            if written >= opts.samples_per_shard or f.tell() >= opts.shard_size:
                break
    return written, consumed, stats


def run_task(task: Task, num_classes: int, opts: IngestOptions) -> list[dict[str, Any]]:
    """Write the task's shards, skipping those already recorded as finished; returns their records in order."""
    return list(iter_task(task, num_classes, opts))


def iter_task(task: Task, num_classes: int, opts: IngestOptions) -> Iterator[dict[str, Any]]:
    """`run_task` one shard at a time: yields each shard's record once the shard is durable."""
    stream = interleave(task, opts.split_seed)
    with tempfile.TemporaryDirectory(prefix="ingest-") as tmp:
        for k in itertools.count():
            name = task_shard_name(task, k)
            record_url = _record_url(opts.out, name)
            record = storage.read_json(record_url) if storage.exists(record_url) else None
            if record is not None and record["plan"] == _plan_key(task, opts):
                # Finished earlier: step over its source samples without loading their images.
                for _ in range(record["consumed"]):
                    next(stream)
                yield record
                continue
            path = Path(tmp) / name
            written, consumed, stats = _write_shard(stream, path, opts, num_classes)
            if consumed == 0:
                break
            data = path.read_bytes()
            record = {
                "name": name,
                "samples": written,
                "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
                "consumed": consumed,
                "plan": _plan_key(task, opts),
                "stats": stats.as_dict(),
            }
            if written:
                storage.put_file(path, storage.join(opts.out, name))  # whole, in one call
            storage.write_json(record_url, record)  # after the shard: the record marks it finished
            path.unlink()
            yield record


def _image_stats(records: list[dict[str, Any]], num_samples: int) -> dict[str, Any]:
    stats = [r["stats"] for r in records if r["samples"]]
    sums = np.sum([s["pixel_sums"] for s in stats], axis=0)
    sq_sums = np.sum([s["pixel_sq_sums"] for s in stats], axis=0)
    pixels = max(sum(s["pixels"] for s in stats), 1)
    mean = sums / pixels
    std = np.sqrt(np.maximum(sq_sums / pixels - mean**2, 0))

    def extent(field: str) -> dict[str, Any]:
        values = [s[field] for s in stats]
        total = sum(v[2] for v in values)
        return {
            "min": min(v[0] for v in values),
            "max": max(v[1] for v in values),
            "mean": round(total / num_samples, 2),
        }

    return {
        "height": extent("height"),
        "width": extent("width"),
        "mean_rgb": [round(float(x), 3) for x in mean],
        "std_rgb": [round(float(x), 3) for x in std],
        "stats_images": sum(-(-r["samples"] // STATS_EVERY) for r in records),
    }


def _class_count_pairs(counts: list[Any]) -> list[Any]:
    # Records written before the [label, count] pairs hold one count per class; a conversion resumed across that
    # change reads both.
    if counts and not isinstance(counts[0], list):
        return [[label, n] for label, n in enumerate(counts) if n]
    return counts


def manifest_for(source: Source, split: str, records: list[dict[str, Any]], opts: IngestOptions) -> dict[str, Any]:
    written = [r for r in records if r["samples"]]
    num_samples = sum(r["samples"] for r in written)
    if not num_samples:
        raise ValueError(f"split {split!r} of {source.name}: every source image was unreadable")
    class_counts = [0] * len(source.class_names)
    for r in written:
        for label, n in _class_count_pairs(r["stats"]["class_counts"]):
            class_counts[label] += n
    return {
        "format": shards.MANIFEST_FORMAT,
        "split": split,
        "num_samples": num_samples,
        "num_classes": len(source.class_names),
        "class_names": list(source.class_names),
        "class_counts": class_counts,
        "multi_label": source.multi_label,
        "shards": [
            {"name": r["name"], "samples": r["samples"], "bytes": r["bytes"], "sha256": r["sha256"]} for r in written
        ],
        "image_stats": _image_stats(written, num_samples),
        "skipped_source_samples": [s for r in records for s in r["stats"]["skipped"]],
        "source": {
            "name": source.name,
            "split_note": source.split_note,
            "split_seed": opts.split_seed,
            "samples_per_shard": opts.samples_per_shard,
            "shard_size": opts.shard_size,
            "parts_per_task": opts.parts_per_task,
            "jpeg_quality_when_reencoded": JPEG_QUALITY,
        },
    }


def start_split(split: str, opts: IngestOptions) -> None:
    """Remove the split's manifest: the set is incomplete from here until `finish_split` writes the new one."""
    manifest_url = storage.join(opts.out, shards.manifest_name(split))
    if storage.exists(manifest_url):
        storage.remove(manifest_url)


def finish_split(source: Source, split: str, records: list[dict[str, Any]], opts: IngestOptions) -> dict[str, Any]:
    """Write the manifest (last: it marks the set complete), after removing shards and records of an earlier
    conversion with other options, which the new plan does not produce."""
    manifest = manifest_for(source, split, records, opts)
    keep = {r["name"] for r in records}
    for url in storage.glob(storage.join(opts.out, f"{split}-*-*.tar")):
        if url.rsplit("/", 1)[-1] not in keep:
            storage.remove(url)
    for url in storage.glob(storage.join(opts.out, PROGRESS_DIR, f"{split}-*-*.json")):
        if url.rsplit("/", 1)[-1].removesuffix(".json") + ".tar" not in keep:
            storage.remove(url)
    manifest_url = storage.join(opts.out, shards.manifest_name(split))
    storage.write_json(manifest_url, manifest)
    log.info("%s: %d samples in %d shards -> %s", split, manifest["num_samples"], len(manifest["shards"]), manifest_url)
    return manifest


def convert_split(source: Source, split: str, opts: IngestOptions) -> dict[str, Any]:
    """Convert one split in this process, task after task (the Ray driver runs the same tasks in parallel)."""
    start_split(split, opts)
    records: list[dict[str, Any]] = []
    for task in plan_tasks(source, split, opts):
        records += run_task(task, len(source.class_names), opts)
    return finish_split(source, split, records, opts)
