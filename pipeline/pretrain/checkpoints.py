"""Checkpoints of a DeepSpeed run on any storage URL, exact resume, and the consolidated fp32 export.

Layout under ``<run_dir>/checkpoints/``::

    step_00000040/
        mp_rank_00_model_states.pt             DeepSpeed (rank 0; ZeRO-3: zero_pp_rank_<r>_..._model_states.pt)
        zero_pp_rank_<r>_mp_rank_00_optim_states.pt   DeepSpeed, one per rank (bf16: bf16_zero_pp_rank_<r>_...)
        rank_<r>.pt                            this rank's step, RNG states, data-loader position
        _COMPLETE.json                         written by rank 0 last, after every rank has uploaded

Saving: DeepSpeed writes local paths only, so each rank saves into its own temporary directory and uploads
exactly the files it wrote (nothing of another rank's); after a barrier rank 0 writes the marker and deletes
old checkpoints. Loading: a checkpoint without a marker is skipped (and logged); one with a marker that does
not load is an error -- training never silently starts over.

Elastic resume: a checkpoint written by N workers resumes on M != N (ZeRO-1/2/3). Each new rank then fetches rank
0's model-states file, every old rank's state file (a few kB each) and only the optimizer partitions of the old ranks
whose partitions overlap its new one (a few: found from the parameter shapes), and cuts its partition of
the fp32 master weights and Adam moments out of them (``pipeline.pretrain.reshard``); the data loader gets every old
rank's position and takes its share of the work left in the epochs in progress (``pipeline.data.loader``).
"""

from __future__ import annotations

import hashlib
import logging
import random
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from pipeline import faults, storage
from pipeline.pretrain import health

log = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step_(\d{8})$")
RANK_FILE = "rank_{rank:05d}.pt"
# Marker fields that must match for a checkpoint to be resumable by a run: they change the shapes, the optimizer's
# layout or the schedule. The world size and the micro-batch may change (elastic resume, see the module docstring).
RESUME_KEYS = ("zero_stage", "variant", "image_size", "num_classes", "global_batch")


class CheckpointError(RuntimeError):
    """A checkpoint that should load and does not (or does not fit this run)."""


class WeightsNotFiniteError(CheckpointError):
    """The weights hold NaN or infinite values: no checkpoint of them is written."""


@dataclass(frozen=True)
class CheckpointRef:
    url: str
    step: int
    info: dict[str, Any]


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def list_step_dirs(checkpoint_dir: str) -> list[tuple[int, str]]:
    """(step, url) of every ``step_*`` directory, oldest first, complete or not."""
    found = []
    for url in storage.listdir(checkpoint_dir):
        match = STEP_DIR.match(url.rstrip("/").rsplit("/", 1)[-1])
        if match:
            found.append((int(match.group(1)), url.rstrip("/")))
    return sorted(found)


# A file a marker lists: one plain name (DeepSpeed and the rank states are flat files in the step directory).
SAFE_FILE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")


def marker_files(url: str, info: dict[str, Any]) -> list[str]:
    """The file names a checkpoint's marker lists, refused unless each is a plain name inside the directory.

    The names are joined into both the storage URL and each rank's local temporary path: a name such as
    ``../../x`` or ``/etc/x`` would have every rank read from and write to places outside the checkpoint.
    """
    files = info.get("files") or []
    if not isinstance(files, list):
        raise CheckpointError(f"checkpoint {url}: its marker's 'files' is not a list: delete that directory")
    unsafe = [name for name in files if not isinstance(name, str) or not SAFE_FILE_NAME.match(name)]
    if unsafe:
        raise CheckpointError(
            f"checkpoint {url}: its {storage.COMPLETE_MARKER} lists {unsafe!r}, which are not file names inside the "
            "checkpoint directory (only letters, digits, '.', '_' and '-'; no '/', no '..'): refusing to load it. "
            "Whoever can write to the checkpoint store wrote this marker: check it, then delete that directory"
        )
    return files


def latest_complete(checkpoint_dir: str, *, quiet: bool = False) -> CheckpointRef | None:
    """The newest checkpoint with a completion marker; newer incomplete ones are skipped with a log line. A marker
    that lists a file outside its directory raises CheckpointError (``marker_files``)."""
    for step, url in reversed(list_step_dirs(checkpoint_dir)):
        info = storage.read_marker(url)
        if info is None:
            if not quiet:
                log.warning(
                    "skipping incomplete checkpoint %s: no %s marker (interrupted while saving)",
                    url,
                    storage.COMPLETE_MARKER,
                )
            continue
        marker_files(url, info)
        return CheckpointRef(url=url, step=step, info=info)
    return None


def check_compatible(ref: CheckpointRef, expected: dict[str, Any]) -> list[str]:
    """Differences between a checkpoint's marker and what this run would write (empty list: resumable)."""
    problems = []
    for key in RESUME_KEYS:
        if key in ref.info and key in expected and ref.info[key] != expected[key]:
            problems.append(f"{key}: checkpoint {ref.info[key]!r}, this run {expected[key]!r}")
    old_world, world = ref.info.get("world_size"), expected.get("world_size")
    if old_world is not None and world is not None and old_world != world and expected.get("zero_stage") == 0:
        problems.append(
            f"world_size: checkpoint {old_world!r}, this run {world!r} (a change of the number of workers reshards "
            "ZeRO partitions: it needs train.zero_stage 1, 2 or 3)"
        )
    return problems


# ---------------------------------------------------------------------------------------------------------
# per-rank state: RNGs and the data loader's position


def capture_rng() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": list(random.getstate()[1]),
        "python_pos": random.getstate()[0],
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate((state["python_pos"], tuple(state["python"]), None))
    np_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ---------------------------------------------------------------------------------------------------------
# save / load


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def save(
    engine: Any,
    checkpoint_dir: str,
    step: int,
    *,
    rank: int,
    rank_state: dict[str, Any],
    info: dict[str, Any],
    keep_last: int,
) -> str:
    """Save a checkpoint of ``step`` from every rank (collective); returns its URL. Weights that are not finite raise
    WeightsNotFiniteError on every rank before anything is written: a complete checkpoint is always resumable."""
    bad = health.nonfinite_weights(engine)
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise WeightsNotFiniteError(f"the weights are not finite after step {step} ({shown}): not saved")
    tag = step_dir_name(step)
    url = storage.join(checkpoint_dir, tag)
    run_dir = checkpoint_dir.rstrip("/").rsplit("/", 1)[0]  # where the fault-injection hooks keep their records
    if rank == 0:
        # A marker left by an earlier attempt at this step must not vouch for the files about to be replaced.
        # DeepSpeed's save_checkpoint starts with a barrier, so no rank uploads before this removal.
        storage.remove(storage.join(url, storage.COMPLETE_MARKER))
    with tempfile.TemporaryDirectory(prefix=f"vitpipe-ckpt-rank{rank}-") as tmp:
        engine.save_checkpoint(tmp, tag=tag, client_state={"vitpipe_step": step}, save_latest=False)
        local = Path(tmp) / tag
        local.mkdir(parents=True, exist_ok=True)
        torch.save(rank_state, local / RANK_FILE.format(rank=rank))
        # storage.upload_dir, unless the tests' VITPIPE_FAULTS asks for an upload that fails halfway
        files = faults.upload_dir_unless_faulted(local, url, step=step, rank=rank, run_dir=run_dir)
    uploaded = [None] * dist.get_world_size() if dist.is_initialized() else [files]
    if dist.is_initialized():
        dist.all_gather_object(uploaded, files)  # also the barrier before the marker
    if rank == 0:
        faults.fire("before_marker", step=step, rank=rank, run_dir=run_dir)
        all_files = sorted(f for per_rank in uploaded for f in per_rank)
        storage.mark_complete(url, {**info, "step": step, "files": all_files})
        prune(checkpoint_dir, keep_last)
    _barrier()
    return url


def prune(checkpoint_dir: str, keep_last: int) -> None:
    """Keep the newest ``keep_last`` complete checkpoints; drop older ones and incomplete leftovers below them."""
    complete = [(step, url) for step, url in list_step_dirs(checkpoint_dir) if storage.is_complete(url)]
    if not complete:
        return
    keep = {url for _, url in complete[-keep_last:]}
    newest_complete = complete[-1][0]
    for step, url in list_step_dirs(checkpoint_dir):
        if url in keep or step > newest_complete:
            continue
        # The marker goes first: a reader never sees a "complete" checkpoint with files missing.
        storage.remove(storage.join(url, storage.COMPLETE_MARKER))
        storage.remove(url)
        log.info("deleted old checkpoint %s (keeping the last %d)", url, keep_last)


# DeepSpeed's per-rank ZeRO files: ``zero_pp_rank_<r>_...`` in fp32, ``bf16_zero_pp_rank_<r>_...`` for the optimizer
# partitions of a bf16 run. Every rank needs only its own (at 256 GPUs the others' are ~8 GB per rank for H/14).
PER_RANK_PREFIXES = ("zero_pp_rank_", "bf16_zero_pp_rank_", "rank_")


def _files_for_rank(files: list[str], rank: int) -> list[str]:
    """The files rank ``rank`` needs: shared ones plus its own ZeRO partition (fp32 or bf16 name) and rank state."""
    own = (f"zero_pp_rank_{rank}_", f"bf16_zero_pp_rank_{rank}_", RANK_FILE.format(rank=rank))
    return [f for f in files if not f.startswith(PER_RANK_PREFIXES) or f.startswith(own)]


def _fetch(url: str, names: list[str], local: Path) -> None:
    """Download the files ``names`` of checkpoint ``url`` into ``local``; a missing one is a CheckpointError."""
    try:
        for name in names:
            storage.get_file(storage.join(url, name), local / name)
    except (OSError, storage.StorageError) as exc:
        raise CheckpointError(f"checkpoint {url} is marked complete but {exc}") from exc


def load(engine: Any, ref: CheckpointRef, *, rank: int) -> dict[str, Any]:
    """Load model, optimizer, LR schedule and step into ``engine``; returns this rank's saved state. A checkpoint of
    another world size is resharded (``load_resharded``)."""
    old_world = ref.info.get("world_size")
    world = dist.get_world_size() if dist.is_initialized() else 1
    if old_world is not None and old_world != world:
        return load_resharded(engine, ref, rank=rank, world=world)
    tag = ref.url.rstrip("/").rsplit("/", 1)[-1]
    needed = _files_for_rank(marker_files(ref.url, ref.info), rank)
    if RANK_FILE.format(rank=rank) not in needed:
        raise CheckpointError(
            f"checkpoint {ref.url} has no state for rank {rank} (it was written by {ref.info.get('world_size')} "
            "workers): resume with the same scale.workers, or start a new run.name"
        )
    with tempfile.TemporaryDirectory(prefix=f"vitpipe-load-rank{rank}-") as tmp:
        local = Path(tmp) / tag
        _fetch(ref.url, needed, local)
        try:
            load_path, client_state = engine.load_checkpoint(
                tmp, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
            )
        except Exception as exc:
            # The URL last: Ray shows the head and the tail of a worker's error.
            raise CheckpointError(
                f"{exc}\nrank {rank} cannot load checkpoint {ref.url}, although it is marked complete: fix or delete "
                "that directory to resume from the one before it"
            ) from exc
        # DeepSpeed returns (None, None) with only a warning when it finds nothing to load.
        if load_path is None:
            raise CheckpointError(
                f"DeepSpeed loaded nothing from {ref.url} (files present: {sorted(needed)}); refusing to start "
                "from scratch. Delete that checkpoint directory to resume from the one before it."
            )
        if client_state is not None and client_state.get("vitpipe_step") not in (None, ref.step):
            raise CheckpointError(
                f"{ref.url} holds step {client_state.get('vitpipe_step')}, not {ref.step}: delete the directory"
            )
        state = torch.load(local / RANK_FILE.format(rank=rank), map_location="cpu", weights_only=True)
    if state.get("step") != ref.step:
        raise CheckpointError(f"{ref.url}: rank {rank} state is for step {state.get('step')}, expected {ref.step}")
    return state


# A ZeRO optimizer partition, fp32 or bf16 name: (rank, file name).
OPTIM_FILE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")
MODEL_STATES_FILES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")  # ZeRO-1/2, ZeRO-3


def files_for_resharding(files: list[str], old_world: int) -> tuple[str, list[str], list[str]]:
    """The files to resume a checkpoint of ``old_world`` ranks on another world size: rank 0's model-states file
    (schedule, step counters, parameter shapes), every old rank's optimizer partition (in rank order: a new rank
    fetches those ``reshard.old_ranks_needed`` picks) and every old rank's state file (in rank order)."""
    model_states = next((name for name in MODEL_STATES_FILES if name in files), None)
    optim = {int(m.group(1)): name for name in files if (m := OPTIM_FILE.match(name))}
    rank_files = [RANK_FILE.format(rank=r) for r in range(old_world)]
    missing = [RANK_FILE.format(rank=r) for r in range(old_world) if RANK_FILE.format(rank=r) not in files]
    if model_states is None or sorted(optim) != list(range(old_world)) or missing:
        raise CheckpointError(
            f"a checkpoint of {old_world} workers needs a model-states file and, for each of its ranks, a ZeRO "
            f"optimizer partition and a rank state to be resumed on another number of workers; its marker lists "
            f"{sorted(files)}"
        )
    return model_states, [optim[r] for r in range(old_world)], rank_files


def resharded_rng(old_digests: list[str], step: int, rank: int) -> dict[str, Any]:
    """RNG states for a rank of the new world: seeded from the old ranks' sample digests, the step and the rank, so
    a resumed run is reproducible and no two ranks share dropout masks."""
    seed_text = f"{step}:{rank}:" + ",".join(old_digests)
    seed = int.from_bytes(hashlib.sha256(seed_text.encode()).digest()[:8], "little")
    before = capture_rng()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    state = capture_rng()
    restore_rng(before)
    return state


def load_resharded(engine: Any, ref: CheckpointRef, *, rank: int, world: int) -> dict[str, Any]:
    """Resume a checkpoint written by another number of workers (ZeRO-1/2/3): each rank fetches the optimizer
    partitions of the old ranks that overlap its new partition, and only those, and cuts its partition of the fp32
    master weights and Adam moments out of them (``pipeline.pretrain.reshard``). The returned state holds the step, a
    digest and RNG state for this rank, and under "loader" the list of every old rank's loader state (the loader
    redistributes the remaining work)."""
    from pipeline.pretrain import reshard

    old_world = int(ref.info["world_size"])
    stage = int(engine.zero_optimization_stage())
    model_states_name, optim_names, rank_names = files_for_resharding(marker_files(ref.url, ref.info), old_world)
    with tempfile.TemporaryDirectory(prefix=f"vitpipe-reshard-rank{rank}-") as tmp:
        local = Path(tmp)
        # The model states first: their parameter shapes say which old optimizer partitions this rank needs.
        _fetch(ref.url, [model_states_name, *rank_names], local)
        try:
            model_states = reshard.load_deepspeed_file(local / model_states_name)
            needed = reshard.old_ranks_needed(model_states, stage=stage, old_world=old_world, rank=rank, world=world)
            _fetch(ref.url, [optim_names[r] for r in needed], local)

            # Loaded as they are cut, one at a time: one old partition in memory besides this rank's share.
            optim_files = ((r, reshard.load_deepspeed_file(local / optim_names[r])) for r in needed)
            own = reshard.local_optimizer_state(
                model_states, optim_files, stage=stage, old_world=old_world, rank=rank, world=world
            )
            reshard.load_into_engine(engine, own, model_states)
            old_states = [torch.load(local / name, map_location="cpu", weights_only=True) for name in rank_names]
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(
                f"{exc}\nrank {rank} cannot reshard checkpoint {ref.url} (written by {old_world} workers) onto "
                f"{world} workers, although it is marked complete: resume with scale.workers={old_world}, or fix or "
                "delete that directory to resume from the one before it"
            ) from exc
    wrong = [r for r, state in enumerate(old_states) if state.get("step") != ref.step]
    if wrong:
        raise CheckpointError(f"{ref.url}: the states of ranks {wrong} are not of step {ref.step}")
    digests = [str(state.get("digest", "")) for state in old_states]
    if rank == 0:
        log.info("resharded checkpoint %s from %d to %d workers", ref.url, old_world, world)
    return {
        "step": ref.step,
        "digest": hashlib.sha256(
            f"resharded {old_world}->{world} rank {rank}:{','.join(digests)}".encode()
        ).hexdigest(),
        "loader": [state.get("loader") for state in old_states],
        "rng": resharded_rng(digests, ref.step, rank),
        "resharded_from": old_world,
    }


# ---------------------------------------------------------------------------------------------------------
# the consolidated fp32 model


def consolidated_state_dict(engine: Any, *, rank: int) -> dict[str, torch.Tensor] | None:
    """Full fp32 weights on rank 0 (None elsewhere), whatever the ZeRO stage and world size. Collective.

    Under ZeRO-1/2/3 (and bf16) the fp32 master weights live partitioned in the optimizer;
    ``safe_get_full_fp32_param`` gathers one parameter at a time (so peak memory is one full model on CPU
    at rank 0, not one per rank). Without ZeRO and in fp32 the module's own parameters are the master weights.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    module = engine.module
    state: dict[str, torch.Tensor] = {}
    for name, param in module.named_parameters():
        full = safe_get_full_fp32_param(param)
        if full is None:
            full = param
        if rank == 0:
            state[name] = full.detach().to("cpu", torch.float32).clone()
    if rank != 0:
        return None
    for name, buf in module.named_buffers():
        state[name] = buf.detach().to("cpu", torch.float32).clone()
    return state
