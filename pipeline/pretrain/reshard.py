"""Resuming a ZeRO checkpoint on another number of workers: each new rank reads only the saved optimizer partitions
that overlap its own new partition and cuts its slice of the fp32 master weights and Adam moments out of them.

DeepSpeed itself refuses a change of the data-parallel world size except through its universal checkpoint, whose
conversion (``ds_to_universal``) and loader unpickle every file with ``weights_only=False``: code planted on the
checkpoint store would run on every rank. Here the files are read with ``weights_only=True`` (the same allow-list as
``engine.SafeCheckpointEngine``) and the resharding follows the layouts DeepSpeed uses, which depend only on element
counts, so each rank can tell from the parameter shapes in the model-states file which old partitions it needs:

- ZeRO-1/2: each param group is one flat fp32 vector of its parameters in ``param_shapes`` order, padded at its end to
  a multiple of 2 x world size (``nccl_start_alignment_factor``) and cut into ``world`` equal contiguous partitions;
  rank r's file (``zero_pp_rank_<r>_..._optim_states.pt``) holds partition r of every group.
- ZeRO-3: every parameter is split on its own into ``ceil(numel / world)`` elements per rank (the last one padded);
  a rank's flat group is its pieces of the parameters in ``param_shapes`` order (what DeepSpeed's own
  ``zero_to_fp32`` relies on).

In both cases a "unit" (a param group under ZeRO-1/2, a parameter under ZeRO-3) of ``numel`` elements is split into
equal pieces of ``size(numel, world)`` elements, piece r on rank r. New rank q needs elements
``[q * new_size, (q + 1) * new_size)`` of each unit; the old ranks whose pieces intersect that range are about
N / M + 1 of them (ZeRO-3: a few more over all parameters, as small ones round differently: 7 at most for ViT-H/14
from 256 to 224 ranks). DeepSpeed saves the ZeRO-1/2 partitions without their padding. Adam's moments
(``exp_avg``, ``exp_avg_sq``) are laid out exactly as the fp32 partition they belong to. The result is exact: the
resharded master weights and moments equal the saved ones bit for bit (``tests/test_elastic_resume.py``); only the
training after it differs from an unchanged world (see docs/reliability.md, "Elastic resume").
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

MOMENTS = ("exp_avg", "exp_avg_sq")
KEYS = ("fp32", *MOMENTS)
# DeepSpeed's ZeRO-1/2 pads each flat group to a multiple of this times the world size (4-byte alignment of fp16).
ZERO12_ALIGNMENT = 2


class ReshardError(RuntimeError):
    """The saved partitions cannot be put together (an unknown layout, or one that does not fit this model)."""


def zero12_partition_size(numel: int, world: int) -> int:
    """Elements per rank of a ZeRO-1/2 flat group of ``numel`` elements (DeepSpeed's padding included)."""
    return math.ceil(numel / (ZERO12_ALIGNMENT * world)) * ZERO12_ALIGNMENT


def zero3_partition_size(numel: int, world: int) -> int:
    """Elements per rank of a ZeRO-3 parameter of ``numel`` elements (the last rank's piece is padded)."""
    return math.ceil(numel / world)


def _units(model_states: dict[str, Any], stage: int) -> tuple[list[str], list[int], Callable[[int, int], int]]:
    """Names and element counts of the units each rank holds one piece of, in saved order, and their piece size."""
    groups = model_states["param_shapes"]
    if stage == 3:
        names = [name for group in groups for name in group]
        numels = [math.prod(shape) for group in groups for shape in group.values()]
        return names, numels, zero3_partition_size
    numels = [sum(math.prod(shape) for shape in group.values()) for group in groups]
    return [f"param group {g}" for g in range(len(groups))], numels, zero12_partition_size


def _wanted(numel: int, piece: int, rank: int) -> tuple[int, int]:
    """The elements [start, stop) of a unit that ``rank`` holds (empty where its piece is all padding)."""
    start = min(rank * piece, numel)
    return start, min(start + piece, numel)


def old_ranks_needed(model_states: dict[str, Any], *, stage: int, old_world: int, rank: int, world: int) -> list[int]:
    """The old ranks whose optimizer partitions overlap ``rank``'s partition in a world of ``world`` ranks: the only
    optimizer files this rank must fetch. Never empty: a rank whose pieces are all padding still needs Adam's step
    and the group settings, which every file holds."""
    _, numels, size = _units(model_states, stage)
    needed: set[int] = set()
    for numel in numels:
        old_piece = size(numel, old_world)
        start, stop = _wanted(numel, size(numel, world), rank)
        if start < stop:
            needed.update(range(start // old_piece, (stop - 1) // old_piece + 1))
    return sorted(needed) or [0]


@dataclass
class LocalOptimizerState:
    """One rank's share of a ZeRO optimizer's state in a new world, as the engine keeps it."""

    # unit name -> {"fp32", "exp_avg", "exp_avg_sq"}: this rank's piece (padding included) of each param group
    # (ZeRO-1/2) or of each parameter (ZeRO-3)
    pieces: dict[str, dict[str, torch.Tensor]]
    step: torch.Tensor  # Adam's step counter (one value: every group steps together)
    param_groups: list[dict[str, Any]]  # the base optimizer's group settings (lr, betas, ...), without "params"
    stage: int


def load_deepspeed_file(path: Path) -> dict[str, Any]:
    """A DeepSpeed checkpoint file, unpickled with ``weights_only=True`` (the classes DeepSpeed puts in allowed).

    Memory-mapped: only the tensors read are paged in. The ZeRO-1/2 model-states file also holds the module's
    weights (2 bytes per parameter in bf16), which resharding never reads."""
    from pipeline.pretrain.engine import DEEPSPEED_CHECKPOINT_GLOBALS

    with torch.serialization.safe_globals(DEEPSPEED_CHECKPOINT_GLOBALS):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def _saved_pieces(
    optim_file: dict[str, Any], old_rank: int, stage: int, names: list[str], numels: list[int], old_pieces: list[int]
) -> tuple[dict[str, dict[str, torch.Tensor]], list[dict[str, Any]], list[dict[str, Any]]]:
    """One old rank's pieces of every unit (unit name -> {key: piece}), its Adam states and group settings."""
    part = optim_file["optimizer_state_dict"]
    if stage < 3 and "single_partition_of_fp32_groups" in part:
        base = part["base_optimizer_state"]
        flats = part["single_partition_of_fp32_groups"]
        states = [base["state"][g] for g in range(len(flats))]
        # DeepSpeed saves the partitions without their padding: the last ranks' are shorter (or empty).
        sizes = [flat.numel() for flat in flats]
        spans = [_wanted(numel, piece, old_rank) for numel, piece in zip(numels, old_pieces, strict=True)]
        expected = [stop - start for start, stop in spans]
        if sizes != expected:
            raise ReshardError(
                f"old rank {old_rank}'s ZeRO-1/2 partitions hold {sizes} elements per param group where the model "
                f"states' shapes give {expected}: they are not of this model, or of a layout this resharding does not "
                "know (zero_optimization.round_robin_gradients or parameter_alignment)"
            )
        pieces = {
            name: {"fp32": flat, **{key: state[key] for key in MOMENTS}}
            for name, flat, state in zip(names, flats, states, strict=True)
        }
        return pieces, states, base["param_groups"]
    if stage == 3 and "fp32_flat_groups" in part:
        base = part["optimizer_state_dict"]
        states = [base["state"][g] for g in range(len(part["fp32_flat_groups"]))]
        # A rank's pieces of all parameters, one after the other across its groups (see the module docstring).
        flat = {"fp32": torch.cat(part["fp32_flat_groups"]), **{k: torch.cat([s[k] for s in states]) for k in MOMENTS}}
        if sum(old_pieces) > flat["fp32"].numel():
            raise ReshardError("the ZeRO-3 partitions end before the last parameter: they are not of this model")
        offsets = itertools.accumulate(old_pieces, initial=0)
        pieces = {
            name: {key: flat[key].narrow(0, offset, piece) for key in KEYS}
            for name, offset, piece in zip(names, offsets, old_pieces, strict=False)
        }
        return pieces, states, base["param_groups"]
    raise ReshardError(
        f"these optimizer files are not ZeRO-{'3' if stage == 3 else '1/2'} partitions (bf16 without ZeRO keeps "
        "another layout): a change of the number of workers cannot be resumed from them; resume with the checkpoint's "
        "scale.workers"
    )


def local_optimizer_state(
    model_states: dict[str, Any],
    optim_files: Iterable[tuple[int, dict[str, Any]]],
    *,
    stage: int,
    old_world: int,
    rank: int,
    world: int,
) -> LocalOptimizerState:
    """``rank``'s share of the saved optimizer state in a world of ``world`` ranks, cut from the files of the old
    ranks ``old_ranks_needed`` lists. ``optim_files`` yields (old rank, file) pairs; it may load each file as it is
    asked for, so that only one old partition is held in memory besides this rank's share."""
    names, numels, size = _units(model_states, stage)
    old_pieces = [size(numel, old_world) for numel in numels]
    new_pieces = [size(numel, world) for numel in numels]
    wanted = [_wanted(numel, piece, rank) for numel, piece in zip(numels, new_pieces, strict=True)]
    # Padding stays zero, as DeepSpeed makes it.
    pieces = {name: {key: torch.zeros(piece) for key in KEYS} for name, piece in zip(names, new_pieces, strict=True)}
    filled = dict.fromkeys(names, 0)
    steps: set[float] = set()
    step, param_groups = None, None
    for old_rank, optim_file in optim_files:
        saved, states, groups = _saved_pieces(optim_file, old_rank, stage, names, numels, old_pieces)
        steps.update(float(state["step"]) for state in states)
        if step is None:
            step, param_groups = states[0]["step"].clone(), groups
        for name, (start, stop), old_piece in zip(names, wanted, old_pieces, strict=True):
            # the part of this rank's range that the old rank held
            low, high = max(start, old_rank * old_piece), min(stop, (old_rank + 1) * old_piece)
            if low < high:
                for key in KEYS:
                    source = saved[name][key].narrow(0, low - old_rank * old_piece, high - low)
                    pieces[name][key].narrow(0, low - start, high - low).copy_(source)
                filled[name] += high - low
    if step is None or param_groups is None:
        raise ReshardError("no optimizer partition was given: every rank needs at least one (old_ranks_needed)")
    if len(steps) != 1:
        raise ReshardError(f"the saved partitions disagree on Adam's step count: {sorted(steps)}")
    # Each element of this rank's range comes from exactly one old rank: a count that differs means that the files
    # given are not those old_ranks_needed lists.
    unfilled = [name for name, (start, stop) in zip(names, wanted, strict=True) if filled[name] != stop - start]
    if unfilled:
        raise ReshardError(f"the optimizer partitions given do not cover rank {rank}'s part of {unfilled[:5]}")
    groups = [{k: v for k, v in group.items() if k != "params"} for group in param_groups]
    return LocalOptimizerState(pieces=pieces, step=step, param_groups=groups, stage=stage)


def load_into_engine(engine: Any, local: LocalOptimizerState, model_states: dict[str, Any]) -> None:
    """Give ``engine`` (ZeRO-1/2/3) its share of the saved master weights and moments, Adam's step, the group
    settings, the learning-rate schedule and the step counters. Collective: every rank calls it (under ZeRO-1/2 the
    forward's weights are all-gathered from the new partitions, as after every optimizer step)."""
    from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state

    stage = int(engine.zero_optimization_stage())
    optimizer = engine.optimizer
    base = optimizer.optimizer
    if stage != local.stage:
        raise ReshardError(f"the state was cut for ZeRO-{local.stage}, this engine runs ZeRO-{stage}")
    if len(base.param_groups) != len(local.param_groups):
        raise ReshardError(
            f"the checkpoint's optimizer has {len(local.param_groups)} param groups, this engine "
            f"{len(base.param_groups)}: it is not of this model"
        )

    # The saved flat layout is only valid here if this engine puts the same parameters in the same order.
    def layout(shapes: list[dict[str, Any]]) -> list[list[tuple[str, list[int]]]]:
        return [[(name, list(shape)) for name, shape in group.items()] for group in shapes]

    if layout(engine._get_zero_param_shapes()) != layout(model_states["param_shapes"]):
        raise ReshardError("the checkpoint's parameters (names, shapes or order) differ from this model's")
    if stage < 3 and (optimizer.round_robin_gradients or any(map(any, optimizer.round_robin_bit16_padding))):
        raise ReshardError(
            "zero_optimization.round_robin_gradients and parameter_alignment change the ZeRO-1/2 layout with the "
            "world size: resume with the checkpoint's scale.workers"
        )
    flats = optimizer.fp32_partitioned_groups_flat if stage == 3 else optimizer.single_partition_of_fp32_groups
    # Adam creates its state at the first step; the resumed state is written into state made here of the same shape.
    for flat in flats:
        base.state[flat] = {"step": local.step.clone(), **{key: torch.zeros_like(flat) for key in MOMENTS}}
    for group, saved in zip(base.param_groups, local.param_groups, strict=True):
        group.update(saved)
    if stage < 3:
        for g, flat in enumerate(flats):
            piece = local.pieces[f"param group {g}"]
            if flat.numel() != piece["fp32"].numel():
                raise ReshardError(
                    f"param group {g}: this engine's partition holds {flat.numel()} elements, the arithmetic "
                    f"{piece['fp32'].numel()}: DeepSpeed's ZeRO-1/2 padding is not what this module assumes"
                )
            flat.data.copy_(piece["fp32"])
            for key in MOMENTS:
                base.state[flat][key].copy_(piece[key])
        optimizer._lazy_init_hp_params_optimizer_state()  # links each parameter's fragment to the state just made
        optimizer.update_lp_params()  # the forward's weights, all-gathered from the master weights just written
    else:
        for name, param in engine.module.named_parameters():
            piece = local.pieces[name]
            if param.ds_tensor.numel() != piece["fp32"].numel():
                raise ReshardError(
                    f"{name}: this engine's piece holds {param.ds_tensor.numel()} elements, the "
                    f"arithmetic {piece['fp32'].numel()}"
                )
            safe_set_local_fp32_param(param, piece["fp32"])
            for key in MOMENTS:
                safe_set_local_optimizer_state(param, piece[key], key)
            param.ds_tensor.data.copy_(piece["fp32"].to(param.ds_tensor.dtype))  # the forward's weights
    if engine.lr_scheduler is not None and model_states.get("lr_scheduler") is not None:
        engine.lr_scheduler.load_state_dict(model_states["lr_scheduler"])
    engine.global_steps = model_states["global_steps"]
    engine.global_samples = model_states.get("global_samples", engine.global_steps * engine.train_batch_size())
    engine.skipped_steps = model_states["skipped_steps"]
