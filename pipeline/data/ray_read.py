"""How the Ray Data engine reads a shard set: one task per shard reads the tar and decodes its samples in place.

``ray.data.read_webdataset`` turned every sample into an Arrow row in one operator (Python per member, the JPEG
bytes copied into Arrow and back) and then decoded in a second one: per CPU-second that was about a seventh of
the in-worker engine. Here the dataset is the list of shard URLs (one row, one block each) and one ``map_batches``
task per shard reads it with the in-worker engine's reader (``shards.iter_shard``: the same label rules,
``.json`` labels and corruption checks) and decodes + augments each sample straight into a preallocated uint8
array, handing out numpy batches of ``DECODE_BATCH_ROWS`` rows (no per-row Arrow conversion on the way).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from pipeline.data import shards as shardlib
from pipeline.data.batches import multi_hot, sample_problem
from pipeline.data.transforms import AUG_DRAWS, DecodeError, eval_transform, train_transform

DECODE_BATCH_ROWS = 64


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
) -> Iterator[dict[str, np.ndarray]]:
    """``map_batches`` generator over rows ``{"url": [...]}``: each shard's samples as decoded numpy batches (image
    uint8 [n, S, S, 3]; label int64 [n], or multi-hot uint8 [n, K]; key; url; error, "" for a good row). Bad samples
    are flagged, not dropped (the consumer counts them); ``transform_kw`` goes to the transforms."""
    rng = np.random.default_rng()
    kw = transform_kw or {}
    for url in rows["url"]:
        url = str(url)
        batch: list[tuple[shardlib.RawSample, np.ndarray | None, str]] = []
        for sample in shardlib.iter_shard(url, label_field):
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
            batch.append((sample, image, error))
            if len(batch) == DECODE_BATCH_ROWS:
                yield _columns(batch, url, image_size, num_classes, multi_label)
                batch = []
        if batch:
            yield _columns(batch, url, image_size, num_classes, multi_label)


def _columns(
    batch: list[tuple[shardlib.RawSample, Any, str]], url: str, size: int, num_classes: int | None, multi_label: bool
) -> dict[str, np.ndarray]:
    n = len(batch)
    images = np.zeros((n, size, size, 3), np.uint8)
    for i, (_, image, _) in enumerate(batch):
        if image is not None:
            images[i] = image.numpy()
    good = [not error for _, _, error in batch]
    if multi_label and num_classes is not None:
        label_sets = [(s.labels or (s.label,)) if ok else () for (s, _, _), ok in zip(batch, good, strict=True)]
        labels = multi_hot(label_sets, num_classes).numpy()
    else:
        labels = np.array([s.label if ok else -1 for (s, _, _), ok in zip(batch, good, strict=True)], np.int64)
    return {
        "image": images,
        "label": labels,
        "key": np.array([s.key for s, _, _ in batch], dtype=object),
        "url": np.array([url] * n, dtype=object),
        "error": np.array([error for _, _, error in batch], dtype=object),
    }


def shard_dataset(urls: list[str], *, train: bool, fn_kwargs: dict[str, Any]) -> Any:
    """A ``ray.data.Dataset`` of decoded rows: one block (one read-and-decode task) per shard, in a new random
    shard order every epoch when ``train``."""
    import ray.data

    dataset = ray.data.from_items([{"url": url} for url in urls], override_num_blocks=len(urls))
    if train:
        dataset = dataset.randomize_block_order()
    return dataset.map_batches(decode_shards, fn_kwargs=fn_kwargs, batch_size=1, batch_format="numpy")
