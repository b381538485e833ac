"""The Ray Data engine (``data.engine: "ray"``): the same shards, decode and augmentation, run as Ray Data tasks.

    driver:   TorchTrainer(train_fn, datasets=ray_datasets(cfg), ...)
    worker:   loader = build_train_loader(cfg, batch_size=..., rank=..., world_size=...)   # -> RayTrainLoader
              for images, labels in loader: ...                                          # same contract

One Ray Data task per shard reads the tar with the in-worker engine's reader and decodes + augments its samples
on CPU workers anywhere in the cluster (uint8 out; ``pipeline.data.ray_read``), and Ray Train's default
``streaming_split(world_size, equal=True)`` streams a disjoint share to each training worker.

Differences from the in-worker engine, all because Ray Data runs epochs in lock-step across ranks (an epoch
starts only when every rank asks for it):
- Every rank gets the same number of rows per epoch (``equal=True``), so ranks never wait on each other inside an
  epoch; the price is that up to world_size - 1 rows of an epoch may be left out. Every row that is read is read
  once per epoch; no row is duplicated.
- A bad sample (undecodable image, missing or invalid label) is counted and logged exactly as in the in-worker
  engine (truncated tars and duplicate keys too: the reader is the same), and replaced by a repeat of the rank's
  previous good sample, which keeps the ranks' row counts equal.
- Augmentation draws fresh randomness (not seeded per sample) and the file order is reshuffled by Ray each epoch:
  runs are not bit-reproducible.
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
from pipeline.data.ray_read import shard_dataset
from pipeline.data.shardsets import resolve

log = logging.getLogger("pipeline.data")

STATE_VERSION = 1


def build_ray_dataset(cfg: DataConfig, *, url: str | None = None, train: bool = True) -> Any:
    """A ``ray.data.Dataset`` of decoded, augmented rows (image uint8 [S, S, 3], label, key, url, error)."""
    url = url or cfg.train
    urls, manifest = resolve(url)
    if not urls:
        raise DataError(f"{url!r} names no shards")
    schemes = {storage.scheme_of(u) for u in urls}
    if schemes == {"memory"}:
        raise DataError("data.engine='ray' cannot read memory:// shards (Ray tasks run in other processes)")
    num_classes = manifest["num_classes"] if manifest else None
    multi_label = bool(manifest and manifest.get("multi_label"))
    fn_kwargs = {
        "image_size": cfg.image_size,
        "train": train,
        "crop_scale": cfg.crop_scale,
        "flip": cfg.flip,
        "num_classes": num_classes,
        "label_field": shardlib.label_field_of(manifest),
        "multi_label": multi_label,
        "transform_kw": {"max_pixels": cfg.max_image_pixels},
    }
    return shard_dataset(urls, train=train, fn_kwargs=fn_kwargs)


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
        images: list[np.ndarray] = []
        labels: list[int] = []
        keys: list[str] = []
        epochs: list[int] = []
        bad: dict[str, int] = {}
        while True:
            epoch = self._epoch
            good_in_epoch = 0
            previous: tuple[np.ndarray, int, str] | None = None
            for rows in shard.iter_batches(
                batch_size=self.batch_size,
                batch_format="numpy",
                local_shuffle_buffer_size=self.cfg.shuffle_buffer or None,
            ):
                for i in range(len(rows["key"])):
                    error = rows["error"][i]
                    if error:
                        url = str(rows["url"][i])
                        if self.cfg.strict:
                            raise DataError(f"bad sample {rows['key'][i]} in {url}: {error} (data.strict=true)")
                        bad[url] = bad.get(url, 0) + 1
                        report(url, str(rows["key"][i]), error)
                        if previous is None:
                            continue
                        sample = previous  # keeps this rank's row count equal to the others' (see module doc)
                    else:
                        label = rows["label"][i] if self.multi_label else int(rows["label"][i])
                        sample = (rows["image"][i], label, str(rows["key"][i]))
                        previous = sample
                        good_in_epoch += 1
                    images.append(sample[0])
                    labels.append(sample[1])
                    keys.append(sample[2])
                    epochs.append(epoch)  # a batch may run on from one epoch into the next
                    if len(images) == self.batch_size:
                        batch = Batch(
                            images=torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(),
                            labels=torch.from_numpy(np.stack(labels))
                            if self.multi_label
                            else torch.tensor(labels, dtype=torch.int64),
                            keys=keys,
                            epochs=epochs,
                            stream=0,
                            position=(epoch, 0, 0),
                            bad_by_shard=bad,
                        )
                        images, labels, keys, epochs, bad = [], [], [], [], {}
                        self._counters.add(batch)
                        yield batch
            if good_in_epoch == 0:
                raise DataError(f"rank {self.rank}: epoch {epoch} of the Ray dataset yielded no samples")
            self._epoch = epoch + 1
