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

Another world size (elastic resume): the loader is given the states of every rank of the old world. Each shard's
sample order and augmentation draws depend only on its RNG key (epoch, rank, stream, shard position) under the
world that planned it, so the work left can be read by any rank: every new rank lists the same work items --
(epoch, shard, samples already taken, the key) for what is left of the epochs in progress, oldest epoch first
(``remaining_work``) -- and its streams take every (world size x streams)-th of them (``redistribute``). A partly
read shard continues with the same shuffle and draws, unstarted ones keep theirs, and no sample of those epochs is
lost or read twice. The streams then go on with the first epoch no old stream had started, planned for the new
world. Items not yet read are part of the state (``pending``), so a further change during the catch-up works alike.
The same world size never has pending items: its order is the one above.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.data import shards as shardlib
from pipeline.data.batches import Batch, BatchBuilder, TrainLoaderBase, merged_counts, missing_samples
from pipeline.data.config import DataConfig, DataError
from pipeline.data.ray_engine import RayTrainLoader
from pipeline.data.transforms import AUG_DRAWS, train_transform

STATE_VERSION = 1


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


@dataclass
class TrainStreams(IterableDataset):
    """The per-worker sample streams of one rank's loader; each DataLoader worker runs one stream, from its
    position in ``positions``, and yields whole batches."""

    loader: TrainLoader  # what the streams read: its shards, config, rank and batch size (not changed by reading)
    positions: list[tuple[int, int, int]]
    first_stream: int
    pending: list[list[list[int]]]  # per stream: work items to read before its position (see the module docstring)

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        # Restored loaders start round-robin at the stream that was next, so worker 0 runs that stream.
        stream = (worker + self.first_stream) % workers
        return self._stream(stream, workers)

    def _stream(self, stream: int, streams: int) -> Iterator[Batch]:
        loader, cfg = self.loader, self.loader.cfg
        epoch, start_shard, skip = self.positions[stream]
        where = f"rank {loader.rank} stream {stream}"
        batch = BatchBuilder(
            batch_size=loader.batch_size,
            image_size=cfg.image_size,
            num_classes=loader.num_classes,
            stream=stream,
            where=where,
            strict="data.strict=true" if cfg.strict else None,
            multi_label=loader.multi_label,
        )
        pending = [list(item) for item in self.pending[stream]]
        while pending:  # work left by another world size, read with the RNG keys it was planned with
            item_epoch, shard, item_skip, *key = pending[0]
            for taken in self._read_shard(batch, shard, item_epoch, key, item_skip, where):
                if batch.full:
                    left = [[item_epoch, shard, taken, *key], *pending[1:]]
                    yield batch.take(position=(epoch, start_shard, skip), pending=left)
            pending.pop(0)
        while True:
            plan = shard_plan(
                len(loader.urls),
                seed=cfg.seed,
                epoch=epoch,
                rank=loader.rank,
                world_size=loader.world_size,
                stream=stream,
                streams=streams,
                resampled=cfg.resampled,
            )
            whole_epoch = start_shard == 0 and skip == 0
            good_in_epoch = 0
            for shard_pos in range(start_shard, len(plan)):
                for taken in self._read_shard(
                    batch, plan[shard_pos], epoch, [loader.rank, stream, shard_pos], skip, where
                ):
                    good_in_epoch += 1
                    if batch.full:
                        yield batch.take(position=(epoch, shard_pos, taken))
                skip = 0
            if whole_epoch and good_in_epoch == 0:
                raise DataError(
                    f"{where}: epoch {epoch} yielded no samples from shards {[loader.urls[i] for i in plan]}"
                )
            epoch, start_shard = epoch + 1, 0

    def _read_shard(
        self, batch: BatchBuilder, shard: int, epoch: int, key: list[int], skip: int, where: str
    ) -> Iterator[int]:
        """Read shard ``shard`` of ``epoch`` into ``batch`` in the order its RNG ``key`` (rank, stream, shard position
        of the world that planned it) gives, leaving out the first ``skip`` samples; yields the count of samples
        taken from the shard after each good one."""
        loader, cfg = self.loader, self.loader.cfg
        url = loader.urls[shard]
        readable = read = 0
        rng = np.random.default_rng([cfg.seed, epoch, *key, 2])
        aug_rng = np.random.default_rng([cfg.seed, epoch, *key, 3])
        samples = shardlib.iter_shard(url, loader.label_field)
        for i, sample in enumerate(shuffle_buffer(samples, cfg.shuffle_buffer, rng)):
            readable += sample.error is None
            read += 1
            # Every sample takes its draws, skipped or bad: later samples' augmentations stay the same.
            uniforms = aug_rng.random(AUG_DRAWS)
            if i < skip:
                continue  # taken before the restore: not decoded, not counted again
            augment = partial(
                train_transform,
                size=cfg.image_size,
                u=uniforms,
                scale=cfg.crop_scale,
                flip=cfg.flip,
                max_pixels=cfg.max_image_pixels,
            )
            if batch.add(url, sample, augment, epoch):
                yield i + 1
        if readable == 0:
            raise DataError(f"{where}: shard {url} has no readable samples (empty, truncated or not a tar)")
        batch.add_missing(url, *missing_samples(url, read, loader.shard_samples))


def remaining_work(states: list[dict[str, Any]], *, num_shards: int) -> tuple[list[list[int]], int]:
    """What the streams of the ranks whose loader ``states`` are given (one world, in rank order) have left to read of
    the epochs in progress, as work items [epoch, shard, samples taken, rank, stream, shard position] oldest epoch
    first, and the first epoch none of their streams has started."""
    end = 0
    for state in states:
        for epoch, shard_pos, taken in state["positions"]:
            end = max(end, epoch + 1 if (shard_pos, taken) != (0, 0) else epoch)
    items = []
    for state in states:
        rank, streams = state["rank"], state["streams"]
        for stream, (epoch, shard_pos, taken) in enumerate(state["positions"]):
            items += [list(item) for item in (state.get("pending") or [[]] * streams)[stream]]
            for e in range(epoch, end):
                plan = shard_plan(
                    num_shards,
                    seed=state["seed"],
                    epoch=e,
                    rank=rank,
                    world_size=state["world_size"],
                    stream=stream,
                    streams=streams,
                    resampled=state["resampled"],
                )
                first = shard_pos if e == epoch else 0
                items += [
                    [e, plan[pos], taken if (e, pos) == (epoch, shard_pos) else 0, rank, stream, pos]
                    for pos in range(first, len(plan))
                ]
    items.sort(key=lambda item: item[0])  # stable: older epochs first, then the old ranks' and streams' order
    return items, end


def redistribute(
    states: list[dict[str, Any]], *, rank: int, world_size: int, streams: int, num_shards: int
) -> tuple[list[list[list[int]]], int]:
    """This rank's share of ``remaining_work``: per stream, every (world_size x streams)-th item; and the epoch the
    streams go on with afterwards."""
    items, end = remaining_work(states, num_shards=num_shards)
    pending: list[list[list[int]]] = [[] for _ in range(streams)]
    for j, item in enumerate(items):
        owner = j % (world_size * streams)
        if owner // streams == rank:
            pending[owner % streams].append(item)
    return pending, end


# ---------------------------------------------------------------------------------------------------------------
# The main-process side


class TrainLoader(TrainLoaderBase):
    """Iterating yields (images uint8 [B, 3, S, S], labels int64 [B]) forever, epoch after epoch.

    ``state_dict()`` after any batch, passed back as ``state=`` (or to ``load_state_dict``), makes a new loader
    continue with exactly the next batch. ``stats()`` counts since the start of the run (restored with the state).
    """

    def __init__(
        self, cfg: DataConfig, *, batch_size: int, rank: int, world_size: int, state: dict[str, Any] | None = None
    ) -> None:
        super().__init__(cfg, batch_size=batch_size, rank=rank, world_size=world_size, readers=cfg.workers)
        self.streams = max(1, cfg.workers)
        self._positions: list[tuple[int, int, int]] = [(0, 0, 0)] * self.streams
        self._pending: list[list[list[int]]] = [[] for _ in range(self.streams)]
        self._next_stream = 0
        if state is not None:
            self.load_state_dict(state)

    # -- state ----------------------------------------------------------------------------------------------------

    def _setup(self) -> dict[str, Any]:
        """What the sample order depends on: a saved position holds only under the same setup."""
        return {
            "seed": self.cfg.seed,
            "resampled": self.cfg.resampled,
            "rank": self.rank,
            "world_size": self.world_size,
            "streams": self.streams,
            "batch_size": self.batch_size,
            "num_shards": len(self.urls),
            "shards_fingerprint": hashlib.sha256("\n".join(self.urls).encode()).hexdigest()[:16],
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "engine": "webdataset",
            "version": STATE_VERSION,
            **self._setup(),
            "positions": [list(p) for p in self._positions],  # per stream: [epoch, shards done, samples taken]
            "next_stream": self._next_stream,
            "pending": [[list(item) for item in items] for items in self._pending],  # per stream, see the docstring
            "stats": self._counters.snapshot(),
        }

    def load_state_dict(self, state: dict[str, Any] | list[dict[str, Any]]) -> None:
        """Continue from this rank's saved ``state``, or from the states of every rank of another world size (a list,
        in rank order): then this rank takes its share of the work they left (see the module docstring)."""
        if isinstance(state, list):
            self._take_over(state)
            return
        _check_version(state)
        changed = {k: (state.get(k), v) for k, v in self._setup().items() if state.get(k) != v}
        if changed:
            detail = ", ".join(f"{k}: saved {old!r} now {new!r}" for k, (old, new) in changed.items())
            raise DataError(
                f"cannot resume the data loader exactly: {detail}. The sample order depends on these; resume with "
                "the same data config, world size, workers and batch size (or start the data stream afresh)"
            )
        self._positions = [tuple(p) for p in state["positions"]]  # type: ignore[misc]
        self._pending = [[list(item) for item in items] for items in state.get("pending") or [[]] * self.streams]
        self._next_stream = int(state["next_stream"])
        self._counters.restore(state.get("stats", {}))

    def _take_over(self, states: list[dict[str, Any]]) -> None:
        """Start from the states of every rank of another world: this rank's share of their remaining work first, then
        the first epoch none of them had started; the counts of old ranks ``k`` with ``k % world_size == rank``."""
        for state in states:
            _check_version(state)
        ranks = [(state.get("rank"), state.get("world_size")) for state in states]
        if ranks != [(r, len(states)) for r in range(len(states))]:
            raise DataError(
                f"the loader states handed over are not those of every rank of one world, in rank order: (rank, "
                f"world_size) = {ranks}"
            )
        ours = self._setup()
        for key in ("seed", "resampled", "num_shards", "shards_fingerprint"):
            saved = {state.get(key) for state in states}
            if saved != {ours[key]}:
                raise DataError(
                    f"cannot hand the data position over to another world size: {key}: saved {sorted(map(str, saved))}"
                    f" now {ours[key]!r}. The sample order depends on it; resume with the same data config"
                )
        self._pending, end = redistribute(
            states, rank=self.rank, world_size=self.world_size, streams=self.streams, num_shards=len(self.urls)
        )
        self._positions = [(end, 0, 0)] * self.streams
        self._next_stream = 0
        share = [state.get("stats", {}) for k, state in enumerate(states) if k % self.world_size == self.rank]
        self._counters.restore(merged_counts(share))

    # -- iteration ------------------------------------------------------------------------------------------------

    def batches(self) -> Iterator[Batch]:
        streams = TrainStreams(
            self, positions=list(self._positions), first_stream=self._next_stream, pending=list(self._pending)
        )
        loader = DataLoader(
            streams,
            batch_size=None,  # the workers batch: a batch then comes from exactly one worker
            num_workers=self.cfg.workers,
            prefetch_factor=2 if self.cfg.workers else None,
            persistent_workers=False,
        )
        for batch in loader:
            if batch.stream != self._next_stream:
                raise RuntimeError(f"batch from stream {batch.stream}, expected stream {self._next_stream}")
            self._positions[batch.stream] = batch.position
            self._pending[batch.stream] = batch.pending
            self._next_stream = (batch.stream + 1) % self.streams
            self._counters.add(batch)
            yield batch


def _check_version(state: dict[str, Any]) -> None:
    if state.get("engine") != "webdataset" or state.get("version") != STATE_VERSION:
        raise DataError(
            f"loader state is not a webdataset-engine state of version {STATE_VERSION}: "
            f"engine={state.get('engine')!r} version={state.get('version')!r}"
        )


def build_train_loader(
    cfg: DataConfig,
    *,
    batch_size: int,
    rank: int,
    world_size: int,
    state: dict[str, Any] | list[dict[str, Any]] | None = None,
) -> TrainLoader | RayTrainLoader:
    """The training loader of this rank: a ``TrainLoader`` (engine "webdataset") or a ``RayTrainLoader`` ("ray").
    ``state``: this rank's saved state, or the states of every rank of another world size (a list)."""
    if cfg.engine == "ray":
        if isinstance(state, list):
            # The Ray engine resumes whole epochs: the oldest epoch any old rank was in starts again.
            share = [saved.get("stats", {}) for k, saved in enumerate(state) if k % world_size == rank]
            oldest = min(state, key=lambda saved: int(saved.get("epoch", 0)))
            state = {**oldest, "stats": merged_counts(share)}
        return RayTrainLoader(cfg, batch_size=batch_size, rank=rank, world_size=world_size, state=state)
    return TrainLoader(cfg, batch_size=batch_size, rank=rank, world_size=world_size, state=state)
