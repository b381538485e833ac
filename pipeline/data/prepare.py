"""Convert a dataset into WebDataset shards + manifest on any storage URL (what ``jobs/prepare_data.py`` runs).

The small sources that fit in memory are written here, in this process (`write_split`); ``pipeline.data.convert``
chooses this path or the Ray-task conversion of the large ones (``pipeline.data.ingest``) for ``prepare_data``.

Idempotent: the same inputs and options give byte-identical shards and manifest; shards that already exist with
the same size and hash are not uploaded again. The manifest is removed first and written last, so a reader never
takes a half-rewritten set for a complete one.
"""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import simplejpeg
from PIL import Image

from pipeline import storage
from pipeline.data import shards
from pipeline.data.config import DEFAULT_MAX_IMAGE_PIXELS
from pipeline.data.sources import SPLITS, Source, SourceSample, load_source
from pipeline.data.transforms import DecodeError, check_pixels, image_size

log = logging.getLogger(__name__)

JPEG_QUALITY = 95
STATS_IMAGES = 1000  # images decoded for the manifest's pixel statistics
_SIZE_UNITS = {"": 1, "B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3}


def parse_size(text: str) -> int:
    """'256MB' -> 256_000_000; '64KiB' -> 65536; '1000' -> 1000."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in _SIZE_UNITS:
        raise ValueError(f"--shard-size: expected a size like 256MB, 64MiB or 1000000, got {text!r}")
    value = int(float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()])
    if value <= 0:
        raise ValueError(f"--shard-size must be positive, got {text!r}")
    return value


def parse_classes(text: str | None, num_classes: int) -> list[int] | None:
    """'0-4' -> [0, 1, 2, 3, 4]; '5,6,7' -> [5, 6, 7]; ranges and lists may be mixed ('0-2,7')."""
    if text is None:
        return None
    keep: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if re.fullmatch(r"\d+-\d+", part):
            low, high = (int(x) for x in part.split("-"))
            keep.extend(range(low, high + 1))
        elif part.isdigit():
            keep.append(int(part))
        else:
            raise ValueError(f"--classes: expected class indices like '0-4' or '5,6,7', got {text!r}")
    bad = [c for c in keep if not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"--classes: indices {bad} are out of range; this dataset has classes 0..{num_classes - 1}")
    if len(set(keep)) != len(keep):
        raise ValueError(f"--classes: {text!r} names a class twice")
    return sorted(keep)


@dataclass
class PrepareOptions:
    source: str
    out: str | None = None  # not for "webdataset": its manifest goes beside the shards
    input: str | None = None
    split: str = "train"  # one of SPLITS, or "all"
    shard_size: int = 256 * 1000**2
    samples_per_shard: int | None = None
    classes: str | None = None
    per_class: int | None = None
    split_seed: int = 0
    image_column: str = "image"  # parquet
    label_column: str = "label"  # parquet
    label_field: str = "label"  # webdataset {jpg, json} shards: the .json field holding the label(s)
    class_names: str | None = None  # a text file (path or URL), one class name per line (parquet, webdataset)
    vtab1k: bool = False
    parts_per_task: int = 16
    address: str | None = None  # Ray cluster; None: $RAY_ADDRESS, the job's cluster, or a local Ray
    num_cpus: int | None = None  # CPUs of a local Ray (default: all)
    local: bool = False  # convert the large sources in this process instead of as Ray tasks


def encode_image(image: bytes | np.ndarray, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> tuple[bytes, int, int]:
    """JPEG bytes (passed through when already a JPEG that decodes to RGB) and (height, width).

    Raises ``DecodeError`` (a ValueError) for what is not an image and for an image over ``max_pixels``, judged
    from its header before any pixel is decoded (a decompression bomb must not take the converter's memory)."""
    if isinstance(image, bytes):
        height, width = image_size(image, max_pixels)
        try:
            _, _, colorspace, _ = simplejpeg.decode_jpeg_header(image)
            if colorspace not in ("CMYK", "YCCK"):
                return image, height, width
        except ValueError:
            pass  # not a JPEG (PNG, GIF...): re-encode below
        try:
            with Image.open(io.BytesIO(image)) as im:
                image = np.asarray(im.convert("RGB"))
        except Exception as exc:  # PIL's DecompressionBombError is no OSError or ValueError
            raise DecodeError(f"undecodable image ({type(exc).__name__}: {exc})") from exc
    check_pixels(image.shape[0], image.shape[1], max_pixels)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    image = np.ascontiguousarray(image, dtype=np.uint8)
    # 4:4:4 keeps colour detail that small images (CIFAR's 32x32) would lose to chroma subsampling.
    data = simplejpeg.encode_jpeg(image, quality=JPEG_QUALITY, colorspace="RGB", colorsubsampling="444")
    return data, image.shape[0], image.shape[1]


def select(
    samples: Sequence[SourceSample], keep: list[int] | None, per_class: int | None, seed: int
) -> list[SourceSample]:
    """Keep the classes in ``keep`` (relabelled 0..k-1 in that order) and at most ``per_class`` samples of each."""
    if keep is not None:
        relabel = {old: new for new, old in enumerate(keep)}
        samples = [SourceSample(s.key, relabel[s.label], s.load) for s in samples if s.label in relabel]
    if per_class is not None:
        chosen: list[SourceSample] = []
        for label in sorted({s.label for s in samples}):
            of_class = [s for s in samples if s.label == label]
            order = np.random.default_rng([seed, label]).permutation(len(of_class))
            chosen += [of_class[i] for i in sorted(order[:per_class])]
        samples = chosen
    return list(samples)


def _image_stats(sizes: list[tuple[int, int]], sums: np.ndarray, sq_sums: np.ndarray, pixels: int) -> dict[str, Any]:
    heights, widths = np.array([s[0] for s in sizes]), np.array([s[1] for s in sizes])
    mean = sums / max(pixels, 1)
    std = np.sqrt(np.maximum(sq_sums / max(pixels, 1) - mean**2, 0))
    return {
        "height": {"min": int(heights.min()), "max": int(heights.max()), "mean": round(float(heights.mean()), 2)},
        "width": {"min": int(widths.min()), "max": int(widths.max()), "mean": round(float(widths.mean()), 2)},
        "mean_rgb": [round(float(x), 3) for x in mean],
        "std_rgb": [round(float(x), 3) for x in std],
        "stats_images": min(len(sizes), STATS_IMAGES),
    }


def write_split(source: Source, split: str, opts: PrepareOptions) -> dict[str, Any]:
    keep = parse_classes(opts.classes, len(source.class_names))
    samples = select(source.splits[split], keep, opts.per_class, opts.split_seed)
    if not samples:
        raise ValueError(f"split {split!r} of {source.name} has no samples after --classes/--per-class")
    class_names = [source.class_names[c] for c in keep] if keep is not None else list(source.class_names)
    # Written in a seeded random order so that every shard mixes classes (the reader only shuffles locally).
    order = np.random.default_rng([opts.split_seed, SPLITS.index(split), 7]).permutation(len(samples))

    out = storage.check_url(opts.out, field="--out")
    manifest_url = storage.join(out, shards.manifest_name(split))
    previous = None
    if storage.exists(manifest_url):
        try:
            previous = storage.read_json(manifest_url)
        except ValueError:
            previous = None
        storage.remove(manifest_url)  # the set is incomplete from here until the new manifest is written

    with shards.ShardWriter(
        out, split, max_bytes=opts.shard_size, max_samples=opts.samples_per_shard, previous=previous
    ) as writer:
        sizes: list[tuple[int, int]] = []
        sums, sq_sums, pixels = np.zeros(3), np.zeros(3), 0
        skipped: list[dict[str, str]] = []
        class_counts = [0] * len(class_names)
        for i in order:
            sample = samples[i]
            try:
                data, height, width = encode_image(sample.load())
            except (OSError, ValueError) as exc:
                log.warning("skipping %s: unreadable source image (%s)", sample.key, exc)
                skipped.append({"key": sample.key, "reason": str(exc)[:200]})
                continue
            if len(sizes) < STATS_IMAGES:
                with Image.open(io.BytesIO(data)) as im:
                    rgb = np.asarray(im.convert("RGB"), dtype=np.float64).reshape(-1, 3)
                sums += rgb.sum(0)
                sq_sums += (rgb**2).sum(0)
                pixels += rgb.shape[0]
            sizes.append((height, width))
            class_counts[sample.label] += 1
            writer.write(sample.key, data, sample.label)
        records = writer.close()
    if not records:
        raise ValueError(f"split {split!r} of {source.name}: every source image was unreadable")

    # Shards of an earlier, larger conversion of this split would otherwise linger beside the new set.
    names = {r.name for r in records}
    for url in storage.glob(storage.join(out, f"{split}-*.tar")):
        if url.rsplit("/", 1)[-1] not in names:
            storage.remove(url)

    manifest = {
        "format": shards.MANIFEST_FORMAT,
        "split": split,
        "num_samples": sum(r.samples for r in records),
        "num_classes": len(class_names),
        "class_names": class_names,
        "class_counts": class_counts,
        "shards": [{"name": r.name, "samples": r.samples, "bytes": r.bytes, "sha256": r.sha256} for r in records],
        "image_stats": _image_stats(sizes, sums, sq_sums, pixels),
        "skipped_source_samples": skipped,
        "source": {
            "name": source.name,
            "split_note": source.split_note,
            "classes": opts.classes,
            "per_class": opts.per_class,
            "split_seed": opts.split_seed,
            "samples_per_shard": opts.samples_per_shard,
            "shard_size": opts.shard_size,
            "jpeg_quality_when_reencoded": JPEG_QUALITY,
        },
    }
    storage.write_json(manifest_url, manifest)  # last: marks the set complete
    log.info(
        "%s: %d samples in %d shards (%d uploaded, %d unchanged) -> %s",
        split,
        manifest["num_samples"],
        len(records),
        writer.uploaded,
        writer.skipped,
        manifest_url,
    )
    return manifest


def prepare(opts: PrepareOptions) -> dict[str, dict[str, Any]]:
    """Write the requested split(s); returns {split: manifest}."""
    if not opts.out:
        raise ValueError("--out is required: the output directory URL (file://, gs:// or memory://)")
    if opts.split != "all" and opts.split not in SPLITS:
        raise ValueError(f"--split must be one of {', '.join(SPLITS)} or 'all', got {opts.split!r}")
    if opts.samples_per_shard is not None and opts.samples_per_shard <= 0:
        raise ValueError(f"--samples-per-shard must be positive, got {opts.samples_per_shard}")
    if opts.per_class is not None and opts.per_class <= 0:
        raise ValueError(f"--per-class must be positive, got {opts.per_class}")
    source = load_source(opts.source, Path(opts.input) if opts.input else None, split_seed=opts.split_seed)
    splits = SPLITS if opts.split == "all" else (opts.split,)
    return {split: write_split(source, split, opts) for split in splits}
