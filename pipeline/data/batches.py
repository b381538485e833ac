"""What both training engines and the evaluation loader share: the batch they hand out, how a stream turns samples
into batches while counting the bad ones, the run's counters with the bad-fraction threshold, and the base of the
training loaders."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from pipeline.data.config import DataConfig, DataError
from pipeline.data.shards import RawSample, label_field_of
from pipeline.data.shardsets import training_shards
from pipeline.data.transforms import DecodeError, to_chw_batch

log = logging.getLogger("pipeline.data")

# The bad-sample fraction is only judged once this many samples were seen (a few bad ones early are not a trend).
MIN_SAMPLES_FOR_BAD_FRACTION = 200
LOG_FIRST_BAD = 3
LOG_INTERVAL_S = 30.0


@dataclass
class Batch:
    """One batch and its bookkeeping. ``position`` is the stream's position after the last sample of the batch."""

    images: torch.Tensor  # uint8 [B, 3, S, S]
    labels: torch.Tensor  # int64 [B], or multi-hot uint8 [B, K] for multi-label data
    keys: list[str]
    epochs: list[int]
    stream: int
    position: tuple[int, int, int]
    bad_by_shard: dict[str, int] = field(default_factory=dict)
    # Work items the stream still has to read before its position (after a change of world size; see
    # pipeline.data.loader): [epoch, shard index, samples taken, rank, stream, shard position of the RNG key].
    pending: list[list[int]] = field(default_factory=list)


def missing_samples(url: str, read: int, expected: dict[str, int] | None) -> tuple[int, str]:
    """How many samples of the shard ``url`` its manifest promises beyond the ``read`` ones, and why that is;
    raises ``DataError`` for a shard holding more samples than its manifest says (another shard's manifest)."""
    promised = None if expected is None else expected.get(url)
    if promised is None:
        return 0, ""
    if read > promised:
        raise DataError(
            f"shard {url} holds more samples ({read}) than its manifest records ({promised}): the manifest does not "
            "describe this shard; rewrite it with jobs/prepare_data.py"
        )
    return promised - read, f"the shard ended after {read} of the {promised} samples its manifest records"


def sample_problem(sample: RawSample, num_classes: int | None) -> str | None:
    """Why a sample is bad before its image is decoded (unreadable, or a label outside the manifest's classes), or
    None. Training, evaluation and label-only reads judge samples alike: an unknown label is bad data, not a class."""
    if sample.error is not None:
        return sample.error
    largest = max(sample.labels) if sample.labels else sample.label
    if num_classes is not None and largest >= num_classes:
        return f"label {largest} >= num_classes {num_classes}"
    return None


def multi_hot(labels: list[tuple[int, ...]], num_classes: int) -> torch.Tensor:
    """uint8 [B, K]: 1 where a class is one of the sample's labels (what the sigmoid loss takes as targets)."""
    targets = torch.zeros((len(labels), num_classes), dtype=torch.uint8)
    for i, classes in enumerate(labels):
        targets[i, list(classes)] = 1
    return targets


class BadSampleLog:
    """Logs the first few bad samples of a stream, then one summary line per interval."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.count = 0
        self.last = 0.0
        self.since_last = 0

    def __call__(self, url: str, key: str, reason: str) -> None:
        self.count += 1
        self.since_last += 1
        now = time.monotonic()
        if self.count <= LOG_FIRST_BAD:
            log.warning("%s: skipping bad sample %s in %s: %s", self.where, key, url, reason)
            self.last, self.since_last = now, 0
        elif now - self.last >= LOG_INTERVAL_S:
            log.warning(
                "%s: %d more bad samples skipped (%d in total); latest %s in %s: %s",
                self.where,
                self.since_last,
                self.count,
                key,
                url,
                reason,
            )
            self.last, self.since_last = now, 0


@dataclass
class BatchBuilder:
    """Turns the samples one stream reads into batches: decodes each good sample, counts each bad one against its
    shard (or stops at the first, when ``strict`` names the setting that asked for that), and hands out a batch
    once ``batch_size`` good samples are in. Bad samples are reported with the next batch the stream hands out."""

    batch_size: int
    image_size: int
    num_classes: int | None
    stream: int
    where: str  # names the stream in logs and errors
    strict: str | None
    multi_label: bool = False  # labels as multi-hot [B, num_classes] rows (num_classes from the manifest)

    def __post_init__(self) -> None:
        self.report = BadSampleLog(self.where)
        self._start()

    def _start(self) -> None:
        self.images: list[torch.Tensor] = []
        self.labels: list[Any] = []  # class ids, or tuples of them when multi-label
        self.keys: list[str] = []
        self.epochs: list[int] = []
        self.bad: Counter[str] = Counter()

    def add(self, url: str, sample: RawSample, transform: Callable[[bytes], torch.Tensor], epoch: int = 0) -> bool:
        """Put ``transform(sample.image)`` into the batch; False (the sample counted as bad) when it cannot be."""
        error = sample_problem(sample, self.num_classes)
        if error is None:
            try:
                image = transform(sample.image)
            except DecodeError as exc:
                error = str(exc)
        if error is not None:
            if self.strict:
                raise DataError(f"{self.where}: bad sample {sample.key} in {url}: {error} ({self.strict})")
            self.bad[url] += 1
            self.report(url, sample.key, error)
            return False
        self.images.append(image)
        self.labels.append((sample.labels or (sample.label,)) if self.multi_label else sample.label)
        self.keys.append(sample.key)
        self.epochs.append(epoch)
        return True

    def add_missing(self, url: str, count: int, why: str) -> None:
        """Count ``count`` samples the manifest promises for ``url`` but the shard did not give as bad."""
        if count <= 0:
            return
        if self.strict:
            raise DataError(f"{self.where}: {url} is missing {count} samples: {why} ({self.strict})")
        self.bad[url] += count
        self.report(url, f"<{count} missing samples>", why)

    @property
    def full(self) -> bool:
        return len(self.images) == self.batch_size

    @property
    def pending(self) -> bool:
        """Whether there is anything to hand out: samples of a last, short batch or bad-sample counts."""
        return bool(self.images or self.bad)

    def take(self, position: tuple[int, int, int] = (0, 0, 0), pending: list[list[int]] | None = None) -> Batch:
        """The batch so far (possibly short, even empty: then it only carries bad-sample counts); starts the next."""
        size = self.image_size
        images = to_chw_batch(self.images) if self.images else torch.empty((0, 3, size, size), dtype=torch.uint8)
        batch = Batch(
            images=images,
            labels=self._label_tensor(),
            keys=self.keys,
            epochs=self.epochs,
            stream=self.stream,
            position=position,
            bad_by_shard=dict(self.bad),
            pending=pending or [],
        )
        self._start()
        return batch

    def _label_tensor(self) -> torch.Tensor:
        if not self.multi_label:
            return torch.tensor(self.labels, dtype=torch.int64)
        if self.num_classes is None:
            raise DataError(f"{self.where}: multi-label batches need the manifest's num_classes (read via a manifest)")
        return multi_hot(self.labels, self.num_classes)


class RunCounters:
    """A training loader's counts since the start of the run, saved and restored with its state."""

    def __init__(self, max_bad_fraction: float) -> None:
        self.max_bad_fraction = max_bad_fraction
        self.values: dict[str, Any] = {"samples": 0, "bad_samples": 0, "bad_by_shard": {}, "epoch": 0, "batches": 0}

    def snapshot(self) -> dict[str, Any]:
        return {**self.values, "bad_by_shard": dict(self.values["bad_by_shard"])}

    def restore(self, saved: dict[str, Any]) -> None:
        self.values = {**self.values, **saved, "bad_by_shard": dict(saved.get("bad_by_shard", {}))}

    def add(self, batch: Batch) -> None:
        """Count a delivered batch; raise once the bad fraction is over the threshold."""
        values = self.values
        values["samples"] += len(batch.keys)
        values["batches"] += 1
        values["epoch"] = batch.epochs[-1]
        for url, count in batch.bad_by_shard.items():
            values["bad_samples"] += count
            values["bad_by_shard"][url] = values["bad_by_shard"].get(url, 0) + count
        bad = values["bad_samples"]
        seen = values["samples"] + bad
        if seen >= MIN_SAMPLES_FOR_BAD_FRACTION and bad > self.max_bad_fraction * seen:
            worst = sorted(values["bad_by_shard"].items(), key=lambda kv: -kv[1])[:10]
            raise DataError(
                f"{bad} of {seen} samples were bad ({bad / seen:.1%} > "
                f"data.max_bad_fraction={self.max_bad_fraction}); worst shards: "
                + ", ".join(f"{url} ({n})" for url, n in worst)
                + ". Rewrite or drop those shards, or raise data.max_bad_fraction"
            )


def merged_counts(saved: list[dict[str, Any]]) -> dict[str, Any]:
    """The run's counters of several ranks as one (sums; the latest epoch): a rank of a new world size takes over
    its share of the old ranks' counts, so that the counts summed over ranks stay the run's."""
    merged: dict[str, Any] = {"samples": 0, "bad_samples": 0, "bad_by_shard": {}, "epoch": 0, "batches": 0}
    for counts in saved:
        for key in ("samples", "bad_samples", "batches"):
            merged[key] += int(counts.get(key, 0))
        merged["epoch"] = max(merged["epoch"], int(counts.get("epoch", 0)))
        for url, count in counts.get("bad_by_shard", {}).items():
            merged["bad_by_shard"][url] = merged["bad_by_shard"].get(url, 0) + count
    return merged


class TrainLoaderBase:
    """What the training loaders of both engines share: the rank's shards checked on construction, the run's
    counters, and iteration as (images uint8 [B, 3, S, S], labels int64 [B]) over ``batches()``."""

    def __init__(self, cfg: DataConfig, *, batch_size: int, rank: int, world_size: int, readers: int) -> None:
        self.urls, manifest = training_shards(
            cfg, batch_size=batch_size, rank=rank, world_size=world_size, workers=readers
        )
        self.cfg = cfg
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.num_classes: int | None = manifest["num_classes"] if manifest else None
        self.class_names: list[str] | None = manifest["class_names"] if manifest else None
        # Average per rank; a rank's exact share varies by epoch with the shards it draws.
        self.samples_per_epoch: int | None = manifest["num_samples"] // world_size if manifest else None
        # {jpg, json} shards and multi-label data: where the labels are, and whether batches carry multi-hot rows.
        self.label_field = label_field_of(manifest)
        self.multi_label = bool(manifest and manifest.get("multi_label"))
        # What each shard holds according to its manifest: samples a shard does not give are counted as bad.
        self.shard_samples: dict[str, int] | None = (
            dict(zip(manifest["shard_urls"], manifest["shard_samples"], strict=True)) if manifest else None
        )
        self._counters = RunCounters(cfg.max_bad_fraction)

    def batches(self) -> Iterator[Batch]:
        """Batches with their keys and epochs (what ``__iter__`` yields, plus bookkeeping)."""
        raise NotImplementedError

    def stats(self) -> dict[str, Any]:
        """Counts since the start of the run (restored with the loader's state)."""
        return self._counters.snapshot()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for batch in self.batches():
            yield batch.images, batch.labels
