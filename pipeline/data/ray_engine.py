"""The Ray Data engine (``data.engine: "ray"``): the same shards, decode and augmentation, run as Ray Data tasks.

    driver:   TorchTrainer(train_fn, datasets=ray_datasets(cfg), ...)
    worker:   loader = build_train_loader(cfg, batch_size=..., rank=..., world_size=...)   # -> RayTrainLoader
              for images, labels in loader: ...                                          # same contract

One Ray Data task per group of shards (a shard of a usual size is a group of its own) reads the tars with the
in-worker engine's reader and decodes + augments their samples on CPU workers anywhere in the cluster into
channels-first uint8 blocks (``pipeline.data.ray_read``), and Ray Train's default
``streaming_split(world_size, equal=True)`` streams a disjoint share of the blocks to each training worker, which
cuts them into batches with one copy per batch.

Differences from the in-worker engine, all because Ray Data runs epochs in lock-step across ranks (an epoch
starts only when every rank asks for it):
- Every rank gets the same number of rows per epoch (``equal=True``), so ranks never wait on each other inside an
  epoch; the price is that up to world_size - 1 rows of an epoch may be left out. Every row that is read is read
  once per epoch; no row is duplicated.
- A bad sample (undecodable image, missing or invalid label) is counted and logged exactly as in the in-worker
  engine (truncated tars and duplicate keys too: the reader is the same), and replaced by a repeat of the rank's
  previous good sample, which keeps the ranks' row counts equal.
- Augmentation draws fresh randomness (not seeded per sample) and Ray reorders the shard groups every epoch:
  runs are not bit-reproducible. Samples are shuffled inside the read task, in windows of ``data.shuffle_buffer``
  samples of one shard (the in-worker engine's buffer is local to one shard too), before decoding: Ray Data's
  own local shuffle buffer moved decoded images and cost more CPU than decoding them.
- Resume granularity is one epoch: the state holds the epoch of the last batch, and a restored loader starts that
  epoch again from its beginning (samples of it already used are seen again).
- ``memory://`` shards cannot be used: Ray's read tasks run in other processes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from pipeline import storage
from pipeline.data import shards as shardlib
from pipeline.data.batches import BadSampleLog, Batch, TrainLoaderBase
from pipeline.data.config import DataConfig, DataError
from pipeline.data.ray_read import mean_shard_bytes, shard_dataset
from pipeline.data.shardsets import resolve

log = logging.getLogger("pipeline.data")

STATE_VERSION = 1


def build_ray_dataset(cfg: DataConfig, *, url: str | None = None, train: bool = True) -> Any:
    """A ``ray.data.Dataset`` of decoded, augmented rows (image uint8 [3, S, S], label, key, url, error)."""
    url = url or cfg.train
    urls, manifest = resolve(url)
    if not urls:
        raise DataError(f"{url!r} names no shards")
    schemes = {storage.scheme_of(u) for u in urls}
    if schemes == {"memory"}:
        raise DataError("data.engine='ray' cannot read memory:// shards (Ray tasks run in other processes)")
    return shard_dataset(
        urls,
        train=train,
        fn_kwargs=decode_kwargs(cfg, manifest, train=train),
        shard_bytes=mean_shard_bytes(urls, manifest),
        min_tasks=_cluster_cpus(),
    )


def decode_kwargs(cfg: DataConfig, manifest: dict[str, Any] | None, *, train: bool) -> dict[str, Any]:
    """The keyword arguments of the read tasks' ``ray_read.decode_shards``."""
    return {
        "image_size": cfg.image_size,
        "train": train,
        "crop_scale": cfg.crop_scale,
        "flip": cfg.flip,
        "num_classes": manifest["num_classes"] if manifest else None,
        "label_field": shardlib.label_field_of(manifest),
        "multi_label": bool(manifest and manifest.get("multi_label")),
        "transform_kw": {"max_pixels": cfg.max_image_pixels},
        "shuffle_window": cfg.shuffle_buffer,
    }


def _cluster_cpus() -> int:
    """CPUs of the Ray cluster this process is connected to (1 when none): a small set is cut into that many tasks."""
    import ray

    return int(ray.cluster_resources().get("CPU", 1)) if ray.is_initialized() else 1


def ray_datasets(cfg: DataConfig) -> dict[str, Any]:
    """What the driver passes as ``TorchTrainer(datasets=...)`` when ``cfg.engine == "ray"``."""
    return {"train": build_ray_dataset(cfg)}


class RayTrainLoader(TrainLoaderBase):
    """Iterates this rank's Ray Data shard: (images uint8 [B, 3, S, S], labels int64 [B]) forever, epoch after epoch.

    ``dataset_shard`` defaults to ``ray.train.get_dataset_shard("train")`` (inside a Ray Train worker).
    """

    def __init__(
        self,
        cfg: DataConfig,
        *,
        batch_size: int,
        rank: int,
        world_size: int,
        state: dict[str, Any] | None = None,
        dataset_shard: Any = None,
    ) -> None:
        # Ray Data's read tasks, not this rank's workers, read the shards: one share of them per rank.
        super().__init__(cfg, batch_size=batch_size, rank=rank, world_size=world_size, readers=1)
        self._shard = dataset_shard
        self._epoch = 0
        if state is not None:
            self.load_state_dict(state)

    def state_dict(self) -> dict[str, Any]:
        return {
            "engine": "ray",
            "version": STATE_VERSION,
            "epoch": self._counters.values["epoch"],
            "stats": self._counters.snapshot(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("engine") != "ray" or state.get("version") != STATE_VERSION:
            raise DataError(
                f"loader state is not a ray-engine state of version {STATE_VERSION}: {state.get('engine')!r}"
            )
        self._epoch = int(state["epoch"])
        self._counters.restore(state.get("stats", {}))

    def _dataset_shard(self) -> Any:
        if self._shard is None:
            import ray.train

            self._shard = ray.train.get_dataset_shard("train")
            if self._shard is None:
                raise DataError("no 'train' dataset in this Ray Train worker: pass datasets=ray_datasets(cfg)")
        return self._shard

    def batches(self) -> Iterator[Batch]:
        shard = self._dataset_shard()
        report = BadSampleLog(f"rank {self.rank} (ray)")
        pending = _PendingRows()
        while True:
            epoch = self._epoch
            good_in_epoch = 0
            previous: tuple[np.ndarray, np.ndarray, list[str]] | None = None  # the last good row, as 1-row slices
            # Whole blocks, as the read tasks wrote them (no copy here): the samples were shuffled in the tasks.
            for rows in shard.iter_batches(batch_size=None, batch_format="numpy"):
                images, labels, keys = rows["image"], rows["label"], rows["key"].tolist()
                # Good rows go on as slices of the chunk (usually the whole chunk); each bad one is counted.
                start = 0
                for i in np.flatnonzero(rows["error"] != "").tolist():
                    if i > start:  # the good rows before this bad one
                        pending.add(images[start:i], labels[start:i], keys[start:i], epoch)
                        good_in_epoch += i - start
                        previous = (images[i - 1 : i], labels[i - 1 : i], keys[i - 1 : i])
                    start = i + 1
                    url, error = str(rows["url"][i]), rows["error"][i]
                    if self.cfg.strict:
                        raise DataError(f"bad sample {keys[i]} in {url}: {error} (data.strict=true)")
                    pending.bad[url] = pending.bad.get(url, 0) + 1
                    report(url, keys[i], error)
                    if previous is not None:  # keeps this rank's row count equal to the others' (see module doc)
                        pending.add(*previous, epoch)
                if start < len(keys):
                    pending.add(images[start:], labels[start:], keys[start:], epoch)
                    good_in_epoch += len(keys) - start
                    previous = (images[-1:], labels[-1:], keys[-1:])
                while pending.count >= self.batch_size:
                    batch = pending.take(self.batch_size, epoch)
                    self._counters.add(batch)
                    yield batch
            if good_in_epoch == 0:
                raise DataError(f"rank {self.rank}: epoch {epoch} of the Ray dataset yielded no samples")
            self._epoch = epoch + 1


class _PendingRows:
    """Rows waiting for a batch, kept as the slices of the chunks Ray hands out: one copy per batch (a
    concatenation), no per-row Python work. A batch may run on from one epoch into the next."""

    def __init__(self) -> None:
        self.parts: list[tuple[np.ndarray, np.ndarray, list[str], int]] = []
        self.count = 0
        self.bad: dict[str, int] = {}  # bad rows by shard since the last batch, reported with the next one

    def add(self, images: np.ndarray, labels: np.ndarray, keys: list[str], epoch: int) -> None:
        self.parts.append((images, labels, keys, epoch))
        self.count += len(keys)

    def take(self, size: int, epoch: int) -> Batch:
        """The first ``size`` rows as a batch (images uint8 [size, 3, S, S], a fresh writable copy)."""
        parts, rest, need = [], [], size
        for images, labels, keys, part_epoch in self.parts:
            if need >= len(keys):
                parts.append((images, labels, keys, part_epoch))
                need -= len(keys)
            elif need > 0:
                parts.append((images[:need], labels[:need], keys[:need], part_epoch))
                rest.append((images[need:], labels[need:], keys[need:], part_epoch))
                need = 0
            else:
                rest.append((images, labels, keys, part_epoch))
        batch = Batch(
            images=torch.from_numpy(np.concatenate([p[0] for p in parts])),
            labels=torch.from_numpy(np.concatenate([p[1] for p in parts])),
            keys=[key for p in parts for key in p[2]],
            epochs=[p[3] for p in parts for _ in p[2]],
            stream=0,
            position=(epoch, 0, 0),
            bad_by_shard=self.bad,
        )
        self.parts, self.count, self.bad = rest, self.count - size, {}
        return batch
