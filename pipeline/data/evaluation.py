"""Evaluation and label-only reads: one deterministic pass over a split, every sample exactly once across ranks."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.data import shards as shardlib
from pipeline.data.batches import Batch, BatchBuilder, missing_samples, sample_problem
from pipeline.data.config import DEFAULT_MAX_IMAGE_PIXELS, DataError
from pipeline.data.shardsets import resolve
from pipeline.data.transforms import EVAL_CROP_FRACTION, eval_transform


@dataclass
class EvalStreams(IterableDataset):
    """One deterministic pass: worker w reads shards w, w + W, ...; rank r keeps sample j of shard k when
    (k + j) % world_size == r, so every sample is evaluated exactly once and ranks differ by at most a few."""

    urls: list[str]
    image_size: int
    batch_size: int
    rank: int
    world_size: int
    crop_fraction: float | None
    strict: bool
    num_classes: int | None
    only_keys: frozenset[str] | None  # decode just these; None: all
    label_field: str | None = None  # labels from this .json field (shards.label_field_of)
    multi_label: bool = False  # labels as multi-hot [B, K]
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    shard_samples: dict[str, int] | None = None  # what each shard holds, from the manifest

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        batch = BatchBuilder(
            batch_size=self.batch_size,
            image_size=self.image_size,
            num_classes=self.num_classes,
            stream=worker,
            where=f"eval rank {self.rank} worker {worker}",
            strict="strict evaluation" if self.strict else None,
            multi_label=self.multi_label,
        )
        resize = partial(
            eval_transform, size=self.image_size, crop_fraction=self.crop_fraction, max_pixels=self.max_pixels
        )
        for k in range(worker, len(self.urls), workers):
            url = self.urls[k]
            read = 0
            for j, sample in enumerate(shardlib.iter_shard(url, self.label_field)):
                read = j + 1
                if (k + j) % self.world_size != self.rank:
                    continue
                if self.only_keys is not None and sample.key not in self.only_keys:
                    continue  # not asked for: not decoded, not judged
                if batch.add(url, sample, resize) and batch.full:
                    yield batch.take()
            missing, why = missing_samples(url, read, self.shard_samples)
            # This rank's share of the missing samples: the positions j it would have kept.
            batch.add_missing(url, _share(k, read, read + missing, self.rank, self.world_size), why)
        if batch.pending:  # bad samples after the last full batch must be counted too (an empty batch carries them)
            yield batch.take()


def _share(shard_index: int, start: int, stop: int, rank: int, world_size: int) -> int:
    """How many sample positions j in [start, stop) of shard ``shard_index`` belong to ``rank``."""
    return sum(1 for j in range(start, stop) if (shard_index + j) % world_size == rank)


class EvalLoader:
    """Iterable of (images uint8 [B, 3, S, S], labels int64 [B]); each iteration is one full deterministic pass.
    ``bad_by_shard`` adds up the bad samples of the passes so far."""

    def __init__(self, dataset: EvalStreams, *, workers: int, manifest: dict[str, Any] | None) -> None:
        self.urls = dataset.urls
        self.num_samples: int | None = manifest["num_samples"] if manifest else None
        self.num_classes = dataset.num_classes
        self.class_names: list[str] | None = manifest["class_names"] if manifest else None
        self.bad_by_shard: dict[str, int] = {}
        self._dataset = dataset
        self._workers = workers

    def batches(self) -> Iterator[Batch]:
        loader = DataLoader(self._dataset, batch_size=None, num_workers=self._workers)
        for batch in loader:
            for url, count in batch.bad_by_shard.items():
                self.bad_by_shard[url] = self.bad_by_shard.get(url, 0) + count
            if batch.keys:
                yield batch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for batch in self.batches():
            yield batch.images, batch.labels


def build_eval_loader(
    url: str,
    *,
    image_size: int,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    workers: int = 0,
    crop_fraction: float | None = EVAL_CROP_FRACTION,
    strict: bool = False,
    only_keys: Iterable[str] | None = None,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> EvalLoader:
    """One pass over ``url`` (pattern or manifest), resize + centre crop, every sample exactly once across ranks.

    ``only_keys``: decode and yield just these samples (e.g. the few shots drawn from a large training split);
    the others are read past without being decoded."""
    if batch_size <= 0 or image_size <= 0:
        raise DataError(f"batch_size and image_size must be positive, got {batch_size} and {image_size}")
    if not 0 <= rank < world_size:
        raise DataError(f"rank must be in [0, world_size={world_size}), got {rank}")
    urls, manifest = resolve(url)
    if not urls:
        raise DataError(f"eval data {url!r} names no shards")
    dataset = EvalStreams(
        urls,
        image_size,
        batch_size,
        rank,
        world_size,
        crop_fraction,
        strict,
        num_classes=manifest["num_classes"] if manifest else None,
        only_keys=None if only_keys is None else frozenset(only_keys),
        label_field=shardlib.label_field_of(manifest),
        multi_label=bool(manifest and manifest.get("multi_label")),
        max_pixels=max_image_pixels,
        shard_samples=_shard_samples(manifest),
    )
    return EvalLoader(dataset, workers=workers, manifest=manifest)


def _shard_samples(manifest: dict[str, Any] | None) -> dict[str, int] | None:
    return dict(zip(manifest["shard_urls"], manifest["shard_samples"], strict=True)) if manifest else None


@dataclass(frozen=True)
class SplitLabels:
    """A split's samples in stored order, read without decoding an image (see `read_labels`)."""

    keys: list[str]
    labels: np.ndarray  # int64, one per key
    shards: list[str]  # the shard URL holding each key
    bad_by_shard: dict[str, int]  # unreadable samples (and labels outside the classes) left out, per shard


def read_labels(url: str) -> SplitLabels:
    """Keys, labels and shards of a split's samples, without decoding an image: what drawing few-shot examples
    needs before any image is touched. Unreadable samples and labels outside the manifest's classes are left out
    and counted; images themselves are only checked when decoded."""
    urls, manifest = resolve(url)
    num_classes = manifest["num_classes"] if manifest else None
    keys, labels, where = [], [], []
    bad: Counter[str] = Counter()
    expected = _shard_samples(manifest)
    for shard in urls:
        read = 0
        for sample in shardlib.iter_shard(shard, shardlib.label_field_of(manifest)):
            read += 1
            if sample_problem(sample, num_classes) is None:
                keys.append(sample.key)
                labels.append(sample.label)
                where.append(shard)
            else:
                bad[shard] += 1
        missing, _ = missing_samples(shard, read, expected)
        if missing:
            bad[shard] += missing
    return SplitLabels(keys, np.asarray(labels, dtype=np.int64), where, dict(bad))
