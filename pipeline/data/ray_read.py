"""How the Ray Data engine reads a shard set: one task per group of shards reads the tars and decodes in place.

``ray.data.read_webdataset`` turned every sample into an Arrow row in one operator (Python per member, the JPEG
bytes copied into Arrow and back) and then decoded in a second one: per CPU-second that was about a seventh of
the in-worker engine. Here the dataset is a list of shard groups (one row, one block each) and one
``map_batches`` task per group reads its shards with the in-worker engine's reader (``shards.iter_shard``: the
same label rules, ``.json`` labels and corruption checks), shuffles each shard's samples in windows of
``data.shuffle_buffer`` before decoding (the bytes, not the pixels, are moved), and decodes + augments each
sample straight into a preallocated channels-first uint8 block of about ``BLOCK_BYTES``.

What Ray costs per task and per block, whatever the block holds, is why a task reads a group of shards of at
least ``TASK_MIN_BYTES`` (a large shard is a group of its own) and emits blocks of tens of MB. Measured on 2 busy
cores with tasks that only allocate their blocks (1,536 images of 224 px an epoch, CPU of every Ray process):
~35 CPU-ms per block of 48 images (0.74 ms per image), 0.23 ms per image with blocks of 192, against ~1 ms to
decode one.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from pipeline import storage
from pipeline.data import shards as shardlib
from pipeline.data.batches import multi_hot, sample_problem
from pipeline.data.transforms import AUG_DRAWS, DecodeError, eval_transform, train_transform

# A block's images: ~220 rows at 224 px, ~75 at 384 px (Ray's own limit for a block is 128 MiB).
BLOCK_BYTES = 32 * 1024**2
# A read task's tar bytes at the least: ~0.3 s of decoding on one core, against Ray's ~30 ms per task.
TASK_MIN_BYTES = 16 * 1000**2


def block_rows(image_size: int) -> int:
    """How many decoded images a block holds: ``BLOCK_BYTES`` of uint8 [3, S, S] images, at least one."""
    return max(1, BLOCK_BYTES // (3 * image_size * image_size))


def shard_groups(urls: list[str], *, shard_bytes: float, min_tasks: int) -> list[list[str]]:
    """Consecutive shards grouped so that a group holds at least ``TASK_MIN_BYTES`` of tar (shards of one set are
    written to one size limit, so ``shard_bytes``, their mean size, stands for each), in at least ``min_tasks``
    groups where there are that many shards (so that a small set still spreads over the cluster's CPUs)."""
    per_group = max(1, min(int(TASK_MIN_BYTES // max(shard_bytes, 1.0)), len(urls) // max(min_tasks, 1)))
    groups = math.ceil(len(urls) / per_group)
    return [part.tolist() for part in np.array_split(np.array(urls, dtype=object), groups)]


def decode_shards(
    rows: dict[str, np.ndarray],
    *,
    image_size: int,
    train: bool,
    crop_scale: tuple[float, float],
    flip: bool,
    num_classes: int | None,
    label_field: str | None = None,
    multi_label: bool = False,
    transform_kw: dict[str, Any] | None = None,
    shuffle_window: int = 0,
) -> Iterator[dict[str, np.ndarray]]:
    """``map_batches`` generator over rows ``{"urls": [[shard url, ...], ...]}``: each group's samples as decoded
    numpy blocks of ``block_rows(image_size)`` rows (image uint8 [n, 3, S, S]; label int64 [n], or multi-hot uint8
    [n, K]; key; url; error, "" for a good row). Bad samples are flagged, not dropped (the consumer counts them);
    ``transform_kw`` goes to the transforms. With ``train`` and ``shuffle_window`` > 1, each shard's samples come
    in random order within consecutive windows of that many samples."""
    rng = np.random.default_rng()
    kw = transform_kw or {}
    block = _Block(image_size)
    for group in rows["urls"]:
        for url in group:
            url = str(url)
            samples = shardlib.iter_shard(url, label_field)
            if train and shuffle_window > 1:
                samples = _window_shuffled(samples, shuffle_window, rng)
            for sample in samples:
                error = sample_problem(sample, num_classes) or ""
                image = None
                if not error:
                    try:
                        if train:
                            u = rng.random(AUG_DRAWS)
                            image = train_transform(sample.image, image_size, u, scale=crop_scale, flip=flip, **kw)
                        else:
                            image = eval_transform(sample.image, image_size, **kw)
                    except DecodeError as exc:
                        error = str(exc)
                block.add(url, sample, image, error)
                if block.full:
                    yield block.columns(num_classes, multi_label)
                    block = _Block(image_size)
    if block.samples:
        yield block.columns(num_classes, multi_label)


def _window_shuffled(samples: Iterator[shardlib.RawSample], window: int, rng: np.random.Generator) -> Iterator[Any]:
    """The samples in a random order within each run of ``window`` consecutive ones (encoded bytes are moved)."""
    pending: list[shardlib.RawSample] = []
    for sample in samples:
        pending.append(sample)
        if len(pending) == window:
            yield from (pending[i] for i in rng.permutation(window))
            pending = []
    yield from (pending[i] for i in rng.permutation(len(pending)))


class _Block:
    """Up to ``block_rows`` decoded samples, their images already in the block's array.

    Images are stored channels-first, the layout of the trainers' batches: the transforms hand out [S, S, 3] views
    of a [3, S, S] tensor, so the copy into the block is a plain memory copy and the consumer needs no transpose
    (an HWC block cost two strided transposes per image, about 0.2 ms each on these CPUs).
    """

    def __init__(self, size: int) -> None:
        self.images = torch.from_numpy(np.empty((block_rows(size), 3, size, size), np.uint8))
        self.samples: list[shardlib.RawSample] = []
        self.urls: list[str] = []
        self.errors: list[str] = []

    @property
    def full(self) -> bool:
        return len(self.samples) == len(self.images)

    def add(self, url: str, sample: shardlib.RawSample, image: torch.Tensor | None, error: str) -> None:
        slot = self.images[len(self.samples)]
        if image is None:
            slot.zero_()
        else:
            slot.copy_(image.permute(2, 0, 1))
        self.samples.append(sample)
        self.urls.append(url)
        self.errors.append(error)

    def columns(self, num_classes: int | None, multi_label: bool) -> dict[str, np.ndarray]:
        good = [not error for error in self.errors]
        if multi_label and num_classes is not None:
            label_sets = [(s.labels or (s.label,)) if ok else () for s, ok in zip(self.samples, good, strict=True)]
            labels = multi_hot(label_sets, num_classes).numpy()
        else:
            labels = np.array([s.label if ok else -1 for s, ok in zip(self.samples, good, strict=True)], np.int64)
        return {
            "image": self.images[: len(self.samples)].numpy(),
            "label": labels,
            "key": np.array([s.key for s in self.samples], dtype=object),
            "url": np.array(self.urls, dtype=object),
            "error": np.array(self.errors, dtype=object),
        }


def mean_shard_bytes(urls: list[str], manifest: dict[str, Any] | None) -> float:
    """The shards' mean size: from the manifest, else the first shard's size (one request, not one per shard)."""
    if manifest and manifest.get("shard_bytes"):
        return sum(manifest["shard_bytes"]) / len(manifest["shard_bytes"])
    return float(storage.size(urls[0]))


def shard_dataset(
    urls: list[str], *, train: bool, fn_kwargs: dict[str, Any], shard_bytes: float, min_tasks: int
) -> Any:
    """A ``ray.data.Dataset`` of decoded rows: one read-and-decode task per group of shards (``shard_groups``), the
    groups in a new random order every epoch when ``train``."""
    import ray.data

    groups = shard_groups(urls, shard_bytes=shard_bytes, min_tasks=min_tasks)
    dataset = ray.data.from_items([{"urls": group} for group in groups], override_num_blocks=len(groups))
    if train:
        dataset = dataset.randomize_block_order()
    return dataset.map_batches(decode_shards, fn_kwargs=fn_kwargs, batch_size=1, batch_format="numpy")
