"""The in-worker WebDataset loader: shards -> per-epoch shuffle -> split by rank and worker -> tar -> shuffle buffer
-> decode + augment -> uint8 batches, with exact save/restore of its position.

Determinism is what makes exact resume cheap. Everything is a function of (seed, epoch, rank, stream, shard
position, sample position):
- epoch ``e``'s shard order is a seeded permutation of all shards; rank ``r`` takes ``order[r::world_size]`` and its
  stream ``s`` (one per DataLoader worker) takes every ``streams``-th of those. In resampled mode each stream
  instead draws its shards with replacement, seeded by (seed, epoch, rank, stream).
- samples are shuffled with a buffer that is local to one shard (shards are written in random order, so they
  are already class-mixed); the buffer's generator is seeded by the shard's position in the stream.
- each sample's augmentation draws from a generator seeded by its position.
A stream's position is therefore (epoch, shard position, samples taken from that shard). Each batch comes from one
worker and carries the position after its last sample; the main process keeps the position of every stream from
the batches it has handed to the trainer, and which stream is next (DataLoader takes batches from its workers
round-robin, in order). Restoring replays the current shard's buffer from its start without decoding anything
and drops the samples already taken, so the next batch is exactly the one that would have come next.

Batches never straddle a gap: a stream runs from one epoch into the next, so every batch is full and nothing is
dropped; a batch may hold the last samples of epoch e and the first of epoch e + 1.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline import storage
from pipeline.data import shards as shardlib
from pipeline.data.config import DataConfig, DataError, DataInfo, split_sources
from pipeline.data.transforms import (
    AUG_DRAWS,
    EVAL_CROP_FRACTION,
    DecodeError,
    eval_transform,
    to_chw_batch,
    train_transform,
)

log = logging.getLogger("pipeline.data")

STATE_VERSION = 1
# The bad-sample fraction is only judged once this many samples were seen (a few bad ones early are not a trend).
MIN_SAMPLES_FOR_BAD_FRACTION = 200
LOG_FIRST_BAD = 3
LOG_INTERVAL_S = 30.0


# ---------------------------------------------------------------------------------------------------------------
# Shard lists and pre-flight


def _resolve(url: str) -> tuple[list[str], dict[str, Any] | None]:
    """Shard URLs and the manifest (None for a brace pattern); several ``::``-joined sources are read as one."""
    parts = split_sources(url)
    sources = [_resolve_one(part) for part in parts]
    if len(sources) == 1:
        return sources[0]
    urls = [u for source_urls, _ in sources for u in source_urls]
    manifests = [manifest for _, manifest in sources]
    if any(m is None for m in manifests):
        return urls, None  # a brace pattern among them: nothing is known about the whole
    first = manifests[0]
    for part, m in zip(parts[1:], manifests[1:], strict=True):
        if m["num_classes"] != first["num_classes"] or m.get("class_names") != first.get("class_names"):
            raise DataError(
                f"{part} has other classes ({m['num_classes']}: {m.get('class_names')}) than "
                f"{parts[0]} ({first['num_classes']}: {first.get('class_names')}); only splits of "
                "one dataset can be read as one"
            )
    counts = [m.get("class_counts") for m in manifests]
    merged = {
        **first,
        "shard_urls": urls,
        "num_samples": sum(m["num_samples"] for m in manifests),
        "class_counts": [sum(c) for c in zip(*counts, strict=True)] if all(counts) else None,
    }
    return urls, merged


def _resolve_one(url: str) -> tuple[list[str], dict[str, Any] | None]:
    try:
        if shardlib.is_manifest_url(url):
            manifest = shardlib.read_manifest(url)
            return manifest["shard_urls"], manifest
        return shardlib.expand_urls(url), None
    except storage.UnsupportedURLError as exc:
        raise DataError(str(exc)) from exc


def _check_shards_exist(urls: list[str], field_name: str) -> None:
    """Every shard exists and is non-empty; one listing per directory rather than one request per shard."""
    by_dir: dict[str, list[str]] = {}
    for url in urls:
        by_dir.setdefault(url.rsplit("/", 1)[0], []).append(url)
    problems = []
    for directory, members in by_dir.items():
        fs, path = storage.filesystem(directory)
        fs.invalidate_cache(path)  # a listing cached before the shards were written would hide them
        try:
            entries = fs.ls(path, detail=True)
        except FileNotFoundError:
            entries = []
        listing = {entry["name"].rstrip("/").rsplit("/", 1)[-1]: entry for entry in entries}
        for url in members:
            entry = listing.get(url.rsplit("/", 1)[-1])
            if entry is None:
                problems.append(f"{url} does not exist")
            elif not entry.get("size"):
                problems.append(f"{url} is empty")
    if problems:
        shown = "; ".join(problems[:5]) + (f"; ... ({len(problems)} problems)" if len(problems) > 5 else "")
        raise DataError(f"{field_name}: {shown}. Check the URL pattern, or (re)write the shards with prepare_data.py")


def _require_enough_shards(num_shards: int, world_size: int, workers: int, what: str) -> None:
    streams = world_size * max(1, workers)
    if num_shards < streams:
        raise DataError(
            f"{what} has {num_shards} shards but {world_size} ranks x {max(1, workers)} workers = {streams} readers "
            f"each need at least one shard: write more, smaller shards (prepare_data.py --samples-per-shard), "
            "or lower data.workers"
        )


@contextlib.contextmanager
def _reaching(field_name: str, url: str) -> Iterator[None]:
    """Turn a storage failure (unreachable endpoint, access denied...) into a DataError that names the field."""
    try:
        yield
    except DataError as exc:
        if re.match(rf"{re.escape(field_name)}\b", str(exc)):
            raise
        # e.g. "manifest ... does not exist": say which field pointed there (data.train or data.eval).
        raise DataError(f"{field_name}: {exc}") from None
    except Exception as exc:  # gcsfs, aiohttp and OS errors share no base class; a pre-flight reports them all
        raise DataError(
            f"{field_name}: cannot read {url} ({type(exc).__name__}: {str(exc)[:300]}); check that the storage is "
            "reachable from here and that this job may read it"
        ) from exc


def check_data(cfg: DataConfig, *, world_size: int) -> DataInfo:
    """Pre-flight, before any cluster work: manifests readable, shards present and non-empty, enough shards."""
    if world_size < 1:
        raise DataError(f"world_size must be >= 1, got {world_size}")
    with _reaching("data.train", cfg.train):
        urls, manifest = _resolve(cfg.train)
        if not urls:
            raise DataError(f"data.train: {cfg.train!r} names no shards")
        _check_shards_exist(urls, "data.train")
    _require_enough_shards(len(urls), world_size, cfg.workers, f"data.train ({cfg.train})")
    if cfg.eval is not None:
        with _reaching("data.eval", cfg.eval):
            eval_urls, _ = _resolve(cfg.eval)
            if not eval_urls:
                raise DataError(f"data.eval: {cfg.eval!r} names no shards")
            _check_shards_exist(eval_urls, "data.eval")
    return DataInfo(
        num_shards=len(urls),
        num_samples=manifest["num_samples"] if manifest else None,
        num_classes=manifest["num_classes"] if manifest else None,
        class_names=manifest["class_names"] if manifest else None,
        shard_urls=urls,
    )


# ---------------------------------------------------------------------------------------------------------------
# The worker side


@dataclass
class Batch:
    """One batch and its bookkeeping. ``position`` is the stream's position after the last sample of the batch."""

    images: torch.Tensor  # uint8 [B, 3, S, S]
    labels: torch.Tensor  # int64 [B]
    keys: list[str]
    epochs: list[int]
    stream: int
    position: tuple[int, int, int]
    bad_by_shard: dict[str, int] = field(default_factory=dict)


def shard_plan(
    num_shards: int, *, seed: int, epoch: int, rank: int, world_size: int, stream: int, streams: int, resampled: bool
) -> list[int]:
    """Indices of the shards stream ``stream`` of ``rank`` reads in ``epoch``, in order."""
    if resampled:
        count = max(1, num_shards // (world_size * streams))
        return np.random.default_rng([seed, epoch, rank, stream, 1]).integers(0, num_shards, count).tolist()
    order = np.random.default_rng([seed, epoch]).permutation(num_shards)
    return order[rank::world_size][stream::streams].tolist()


def shuffle_buffer(items: Iterable[Any], size: int, rng: np.random.Generator) -> Iterator[Any]:
    """Shuffle with a buffer of ``size`` items: fill it, then emit a random one per item read; drain at the end."""
    if size <= 1:
        yield from items
        return
    buffer: list[Any] = []
    for item in items:
        buffer.append(item)
        if len(buffer) >= size:
            j = int(rng.integers(len(buffer)))
            buffer[j], buffer[-1] = buffer[-1], buffer[j]
            yield buffer.pop()
    while buffer:
        j = int(rng.integers(len(buffer)))
        buffer[j], buffer[-1] = buffer[-1], buffer[j]
        yield buffer.pop()


def _record_problem(sample: shardlib.RawSample, num_classes: int | None) -> str | None:
    """Why a sample is bad before its image is decoded (unreadable, or a label outside the manifest's classes), or
    None. Training, evaluation and label-only reads judge samples alike: an unknown label is bad data, not a class."""
    if sample.error is not None:
        return sample.error
    if num_classes is not None and sample.label >= num_classes:
        return f"label {sample.label} >= num_classes {num_classes}"
    return None


def _decoded(
    sample: shardlib.RawSample, num_classes: int | None, transform: Callable[[Any], torch.Tensor]
) -> tuple[torch.Tensor | None, str | None]:
    """The sample's image through ``transform``, or why the sample is bad (unreadable, label out of range, or not
    an image)."""
    error = _record_problem(sample, num_classes)
    if error is not None:
        return None, error
    try:
        return transform(sample.image), None
    except DecodeError as exc:
        return None, str(exc)


class _BadSampleLog:
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


class TrainStreams(IterableDataset):
    """The per-worker sample streams of one rank; each DataLoader worker runs one stream and yields whole batches."""

    def __init__(
        self,
        urls: list[str],
        cfg: DataConfig,
        *,
        batch_size: int,
        rank: int,
        world_size: int,
        num_classes: int | None,
        positions: list[tuple[int, int, int]],
        first_stream: int,
    ) -> None:
        self.urls = urls
        self.cfg = cfg
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.num_classes = num_classes
        self.positions = positions
        self.first_stream = first_stream

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        # Restored loaders start round-robin at the stream that was next, so worker 0 runs that stream.
        stream = (worker + self.first_stream) % workers
        return self._stream(stream, workers)

    def _stream(self, stream: int, streams: int) -> Iterator[Batch]:
        cfg = self.cfg
        epoch, start_shard, skip = self.positions[stream]
        where = f"rank {self.rank} stream {stream}"
        report = _BadSampleLog(where)
        images: list[torch.Tensor] = []
        labels: list[int] = []
        keys: list[str] = []
        epochs: list[int] = []
        bad: Counter[str] = Counter()
        while True:
            plan = shard_plan(
                len(self.urls),
                seed=cfg.seed,
                epoch=epoch,
                rank=self.rank,
                world_size=self.world_size,
                stream=stream,
                streams=streams,
                resampled=cfg.resampled,
            )
            whole_epoch = start_shard == 0 and skip == 0
            good_in_epoch = 0
            for shard_pos in range(start_shard, len(plan)):
                url = self.urls[plan[shard_pos]]
                readable = 0
                rng = np.random.default_rng([cfg.seed, epoch, self.rank, stream, shard_pos, 2])
                aug_rng = np.random.default_rng([cfg.seed, epoch, self.rank, stream, shard_pos, 3])
                for i, sample in enumerate(shuffle_buffer(shardlib.iter_shard(url), cfg.shuffle_buffer, rng)):
                    readable += sample.error is None
                    # Every sample takes its draws, skipped or bad: later samples' augmentations stay the same.
                    uniforms = aug_rng.random(AUG_DRAWS)
                    if i < skip:
                        continue  # taken before the restore: not decoded, not counted again
                    image, error = _decoded(
                        sample,
                        self.num_classes,
                        partial(train_transform, size=cfg.image_size, u=uniforms, scale=cfg.crop_scale, flip=cfg.flip),
                    )
                    if error is not None:
                        if cfg.strict:
                            raise DataError(f"{where}: bad sample {sample.key} in {url}: {error} (data.strict=true)")
                        bad[url] += 1
                        report(url, sample.key, error)
                        continue
                    good_in_epoch += 1
                    images.append(image)
                    labels.append(sample.label)
                    keys.append(sample.key)
                    epochs.append(epoch)
                    if len(images) == self.batch_size:
                        yield Batch(
                            images=to_chw_batch(images),
                            labels=torch.tensor(labels, dtype=torch.int64),
                            keys=keys,
                            epochs=epochs,
                            stream=stream,
                            position=(epoch, shard_pos, i + 1),
                            bad_by_shard=dict(bad),
                        )
                        images, labels, keys, epochs, bad = [], [], [], [], Counter()
                if readable == 0:
                    raise DataError(f"{where}: shard {url} has no readable samples (empty, truncated or not a tar)")
                skip = 0
            if whole_epoch and good_in_epoch == 0:
                raise DataError(f"{where}: epoch {epoch} yielded no samples from shards {[self.urls[i] for i in plan]}")
            epoch, start_shard = epoch + 1, 0


# ---------------------------------------------------------------------------------------------------------------
# The main-process side


def _fingerprint(urls: list[str]) -> str:
    return hashlib.sha256("\n".join(urls).encode()).hexdigest()[:16]


class TrainLoader:
    """Iterating yields (images uint8 [B, 3, S, S], labels int64 [B]) forever, epoch after epoch.

    ``state_dict()`` after any batch, passed back as ``state=`` (or to ``load_state_dict``), makes a new loader
    continue with exactly the next batch. ``stats()`` counts since the start of the run (restored with the state).
    """

    def __init__(
        self, cfg: DataConfig, *, batch_size: int, rank: int, world_size: int, state: dict[str, Any] | None = None
    ) -> None:
        if batch_size <= 0:
            raise DataError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= rank < world_size:
            raise DataError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.cfg = cfg
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.urls, manifest = _resolve(cfg.train)
        if not self.urls:
            raise DataError(f"data.train: {cfg.train!r} names no shards")
        _require_enough_shards(len(self.urls), world_size, cfg.workers, f"data.train ({cfg.train})")
        self.num_classes: int | None = manifest["num_classes"] if manifest else None
        self.class_names: list[str] | None = manifest["class_names"] if manifest else None
        # Average per rank; a rank's exact share varies by epoch with the shards it draws.
        self.samples_per_epoch: int | None = manifest["num_samples"] // world_size if manifest else None
        self.streams = max(1, cfg.workers)
        self._positions: list[tuple[int, int, int]] = [(0, 0, 0)] * self.streams
        self._next_stream = 0
        self._stats: dict[str, Any] = {"samples": 0, "bad_samples": 0, "bad_by_shard": {}, "epoch": 0, "batches": 0}
        if state is not None:
            self.load_state_dict(state)

    # -- state ----------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "engine": "webdataset",
            "version": STATE_VERSION,
            "seed": self.cfg.seed,
            "resampled": self.cfg.resampled,
            "rank": self.rank,
            "world_size": self.world_size,
            "streams": self.streams,
            "batch_size": self.batch_size,
            "num_shards": len(self.urls),
            "shards_fingerprint": _fingerprint(self.urls),
            "positions": [list(p) for p in self._positions],  # per stream: [epoch, shards done, samples taken]
            "next_stream": self._next_stream,
            "stats": {**self._stats, "bad_by_shard": dict(self._stats["bad_by_shard"])},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("engine") != "webdataset" or state.get("version") != STATE_VERSION:
            raise DataError(
                f"loader state is not a webdataset-engine state of version {STATE_VERSION}: "
                f"engine={state.get('engine')!r} version={state.get('version')!r}"
            )
        expected = {
            "seed": self.cfg.seed,
            "resampled": self.cfg.resampled,
            "rank": self.rank,
            "world_size": self.world_size,
            "streams": self.streams,
            "batch_size": self.batch_size,
            "num_shards": len(self.urls),
            "shards_fingerprint": _fingerprint(self.urls),
        }
        changed = {k: (state.get(k), v) for k, v in expected.items() if state.get(k) != v}
        if changed:
            detail = ", ".join(f"{k}: saved {old!r} now {new!r}" for k, (old, new) in changed.items())
            raise DataError(
                f"cannot resume the data loader exactly: {detail}. The sample order depends on these; resume with "
                "the same data config, world size, workers and batch size (or start the data stream afresh)"
            )
        self._positions = [tuple(p) for p in state["positions"]]  # type: ignore[misc]
        self._next_stream = int(state["next_stream"])
        stats = state.get("stats", {})
        self._stats = {**self._stats, **stats, "bad_by_shard": dict(stats.get("bad_by_shard", {}))}

    # -- iteration ------------------------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        return {**self._stats, "bad_by_shard": dict(self._stats["bad_by_shard"])}

    def batches(self) -> Iterator[Batch]:
        """Batches with their keys and epochs (what ``__iter__`` yields, plus bookkeeping)."""
        dataset = TrainStreams(
            self.urls,
            self.cfg,
            batch_size=self.batch_size,
            rank=self.rank,
            world_size=self.world_size,
            num_classes=self.num_classes,
            positions=list(self._positions),
            first_stream=self._next_stream,
        )
        loader = DataLoader(
            dataset,
            batch_size=None,  # the workers batch: a batch then comes from exactly one worker
            num_workers=self.cfg.workers,
            prefetch_factor=2 if self.cfg.workers else None,
            persistent_workers=False,
        )
        for batch in loader:
            if batch.stream != self._next_stream:
                raise RuntimeError(f"batch from stream {batch.stream}, expected stream {self._next_stream}")
            self._positions[batch.stream] = batch.position
            self._next_stream = (batch.stream + 1) % self.streams
            self._account(batch)
            yield batch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for batch in self.batches():
            yield batch.images, batch.labels

    def _account(self, batch: Batch) -> None:
        account_batch(self._stats, batch, self.cfg.max_bad_fraction)


def account_batch(stats: dict[str, Any], batch: Batch, max_bad_fraction: float) -> None:
    """Add a delivered batch to the run's counters; raise once the bad fraction is over the threshold."""
    stats["samples"] += len(batch.keys)
    stats["batches"] += 1
    stats["epoch"] = batch.epochs[-1]
    for url, count in batch.bad_by_shard.items():
        stats["bad_samples"] += count
        stats["bad_by_shard"][url] = stats["bad_by_shard"].get(url, 0) + count
    seen = stats["samples"] + stats["bad_samples"]
    if seen >= MIN_SAMPLES_FOR_BAD_FRACTION and stats["bad_samples"] > max_bad_fraction * seen:
        worst = sorted(stats["bad_by_shard"].items(), key=lambda kv: -kv[1])[:10]
        raise DataError(
            f"{stats['bad_samples']} of {seen} samples were bad ({stats['bad_samples'] / seen:.1%} > "
            f"data.max_bad_fraction={max_bad_fraction}); worst shards: "
            + ", ".join(f"{url} ({n})" for url, n in worst)
            + ". Rewrite or drop those shards, or raise data.max_bad_fraction"
        )


def build_train_loader(
    cfg: DataConfig, *, batch_size: int, rank: int, world_size: int, state: dict[str, Any] | None = None
) -> Any:
    """The training loader of this rank: a ``TrainLoader`` (engine "webdataset") or a ``RayTrainLoader`` ("ray")."""
    if cfg.engine == "ray":
        from pipeline.data.ray_engine import RayTrainLoader

        return RayTrainLoader(cfg, batch_size=batch_size, rank=rank, world_size=world_size, state=state)
    return TrainLoader(cfg, batch_size=batch_size, rank=rank, world_size=world_size, state=state)


# ---------------------------------------------------------------------------------------------------------------
# Evaluation


class EvalStreams(IterableDataset):
    """One deterministic pass: worker w reads shards w, w + W, ...; rank r keeps sample j of shard k when
    (k + j) % world_size == r, so every sample is evaluated exactly once and ranks differ by at most a few."""

    def __init__(
        self,
        urls: list[str],
        *,
        image_size: int,
        batch_size: int,
        rank: int,
        world_size: int,
        crop_fraction: float | None,
        strict: bool,
        num_classes: int | None = None,
        only_keys: frozenset[str] | None = None,
    ) -> None:
        self.urls = urls
        self.num_classes = num_classes
        self.only_keys = only_keys
        self.image_size = image_size
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.crop_fraction = crop_fraction
        self.strict = strict

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        report = _BadSampleLog(f"eval rank {self.rank} worker {worker}")
        images: list[torch.Tensor] = []
        labels: list[int] = []
        keys: list[str] = []
        bad: Counter[str] = Counter()

        def emit() -> Batch:
            # An empty batch only carries the bad-sample counts of the pass's tail (EvalLoader does not yield it).
            pixels = (
                to_chw_batch(images)
                if images
                else torch.empty((0, 3, self.image_size, self.image_size), dtype=torch.uint8)
            )
            return Batch(
                pixels,
                torch.tensor(labels, dtype=torch.int64),
                keys,
                [0] * len(keys),
                worker,
                (0, 0, 0),
                dict(bad),
            )

        for k in range(worker, len(self.urls), workers):
            url = self.urls[k]
            for j, sample in enumerate(shardlib.iter_shard(url)):
                if (k + j) % self.world_size != self.rank:
                    continue
                if self.only_keys is not None and sample.key not in self.only_keys:
                    continue  # not asked for: not decoded, not judged
                image, error = _decoded(
                    sample,
                    self.num_classes,
                    lambda data: eval_transform(data, self.image_size, crop_fraction=self.crop_fraction),
                )
                if error is not None:
                    if self.strict:
                        raise DataError(f"eval: bad sample {sample.key} in {url}: {error}")
                    bad[url] += 1
                    report(url, sample.key, error)
                    continue
                images.append(image)
                labels.append(sample.label)
                keys.append(sample.key)
                if len(images) == self.batch_size:
                    yield emit()
                    images, labels, keys, bad = [], [], [], Counter()
        if images or bad:  # bad samples after the last full batch must be counted too
            yield emit()


class EvalLoader:
    """Iterable of (images uint8 [B, 3, S, S], labels int64 [B]); each iteration is one full deterministic pass."""

    def __init__(
        self,
        url: str,
        *,
        image_size: int,
        batch_size: int,
        rank: int,
        world_size: int,
        workers: int,
        crop_fraction: float | None,
        strict: bool,
        only_keys: frozenset[str] | None = None,
    ) -> None:
        if batch_size <= 0 or image_size <= 0:
            raise DataError(f"batch_size and image_size must be positive, got {batch_size} and {image_size}")
        if not 0 <= rank < world_size:
            raise DataError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.urls, manifest = _resolve(url)
        if not self.urls:
            raise DataError(f"eval data {url!r} names no shards")
        self.num_samples: int | None = manifest["num_samples"] if manifest else None
        self.num_classes: int | None = manifest["num_classes"] if manifest else None
        self.class_names: list[str] | None = manifest["class_names"] if manifest else None
        self.bad_by_shard: dict[str, int] = {}
        self._dataset = EvalStreams(
            self.urls,
            image_size=image_size,
            batch_size=batch_size,
            rank=rank,
            world_size=world_size,
            crop_fraction=crop_fraction,
            strict=strict,
            num_classes=self.num_classes,
            only_keys=only_keys,
        )
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
) -> EvalLoader:
    """One pass over ``url`` (pattern or manifest), resize + centre crop, every sample exactly once across ranks.

    ``only_keys``: decode and yield just these samples (e.g. the few shots drawn from a large training split);
    the others are read past without being decoded."""
    return EvalLoader(
        url,
        image_size=image_size,
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        workers=workers,
        crop_fraction=crop_fraction,
        strict=strict,
        only_keys=None if only_keys is None else frozenset(only_keys),
    )


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
    urls, manifest = _resolve(url)
    num_classes = manifest["num_classes"] if manifest else None
    keys, labels, where = [], [], []
    bad: Counter[str] = Counter()
    for shard in urls:
        for sample in shardlib.iter_shard(shard):
            if _record_problem(sample, num_classes) is None:
                keys.append(sample.key)
                labels.append(sample.label)
                where.append(shard)
            else:
                bad[shard] += 1
    return SplitLabels(keys, np.asarray(labels, dtype=np.int64), where, dict(bad))
