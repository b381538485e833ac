"""Resuming a ZeRO checkpoint on another number of workers: each parameter's fp32 master weights and Adam moments are
rebuilt whole from every saved partition, then cut into the partitions of this engine.

DeepSpeed itself refuses a change of the data-parallel world size except through its universal checkpoint, whose
conversion (``ds_to_universal``) and loader unpickle every file with ``weights_only=False``: code planted on the
checkpoint store would run on every rank. Here the files are read with ``weights_only=True`` (the same allow-list as
``engine.SafeCheckpointEngine``) and the resharding uses the layouts DeepSpeed records in its own files:

- ZeRO-1/2 (``zero_pp_rank_<r>_..._optim_states.pt``): one flat fp32 partition per param group and rank; the file's
  ``param_slice_mappings`` say which slice of it holds which parameter's fragment. A parameter is its fragments in
  rank order.
- ZeRO-3: every parameter is split on its own into ``ceil(numel / world)`` elements per rank (the last one padded);
  a rank's flat group is its pieces of the parameters in the order of ``param_shapes`` (what DeepSpeed's own
  ``zero_to_fp32`` relies on).

Adam's moments (``exp_avg``, ``exp_avg_sq``) are laid out exactly as the fp32 partition they belong to. The result
is exact: the resharded master weights and moments equal the saved ones bit for bit
(``tests/test_elastic_resume.py``); only the training after it differs from an unchanged world (see
docs/reliability.md, "Elastic resume").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

MOMENTS = ("exp_avg", "exp_avg_sq")


class ReshardError(RuntimeError):
    """The saved partitions cannot be put together (an unknown layout, or one that does not fit this model)."""


@dataclass
class FullOptimizerState:
    """The whole of a ZeRO optimizer's state, independent of how many ranks held it."""

    params: dict[str, dict[str, torch.Tensor]]  # parameter name -> {"fp32", "exp_avg", "exp_avg_sq"}, full shapes
    step: torch.Tensor  # Adam's step counter (one value: every group steps together)
    param_groups: list[dict[str, Any]]  # the base optimizer's group settings (lr, betas, ...), without "params"


def load_deepspeed_file(path: Path) -> dict[str, Any]:
    """A DeepSpeed checkpoint file, unpickled with ``weights_only=True`` (the classes DeepSpeed puts in allowed)."""
    from pipeline.pretrain.engine import DEEPSPEED_CHECKPOINT_GLOBALS

    with torch.serialization.safe_globals(DEEPSPEED_CHECKPOINT_GLOBALS):
        return torch.load(path, map_location="cpu", weights_only=True)


def full_optimizer_state(model_states: dict[str, Any], optim_files: list[dict[str, Any]]) -> FullOptimizerState:
    """Put the partitions of every rank (``optim_files`` in rank order) back together, parameter by parameter."""
    parts = [f["optimizer_state_dict"] for f in optim_files]
    shapes = {name: list(shape) for group in model_states["param_shapes"] for name, shape in group.items()}
    if all("single_partition_of_fp32_groups" in p for p in parts):
        params, states, groups = _zero12_params(parts, shapes)
    elif all("fp32_flat_groups" in p for p in parts):
        params, states, groups = _zero3_params(parts, model_states["param_shapes"])
    else:
        raise ReshardError(
            "these optimizer files are not ZeRO-1/2/3 partitions (bf16 without ZeRO keeps another layout): a change "
            "of the number of workers cannot be resumed from them; resume with the checkpoint's scale.workers"
        )
    steps = {float(state["step"]) for state in states}
    if len(steps) != 1:
        raise ReshardError(f"the saved partitions disagree on Adam's step count: {sorted(steps)}")
    groups = [{k: v for k, v in group.items() if k != "params"} for group in groups]
    return FullOptimizerState(params=params, step=states[0]["step"].clone(), param_groups=groups)


def _zero12_params(parts: list[dict], shapes: dict[str, list[int]]) -> tuple[dict, list[dict], list[dict]]:
    pieces: dict[str, dict[str, list[torch.Tensor]]] = {}
    states = []
    for part in parts:
        base = part["base_optimizer_state"]
        for group, (flat, mapping) in enumerate(
            zip(part["single_partition_of_fp32_groups"], part["param_slice_mappings"], strict=True)
        ):
            state = base["state"][group]
            states.append(state)
            sources = {"fp32": flat, **{key: state[key] for key in MOMENTS}}
            for name, address in mapping.items():
                for key, source in sources.items():
                    pieces.setdefault(name, {}).setdefault(key, []).append(
                        source.narrow(0, address.start, address.numel)
                    )
    params = {}
    for name, by_key in pieces.items():
        if name not in shapes:
            raise ReshardError(f"the optimizer partitions hold {name!r}, which the model states do not list")
        params[name] = {key: torch.cat(chunks).view(shapes[name]) for key, chunks in by_key.items()}
    missing = sorted(set(shapes) - set(params))
    if missing:
        raise ReshardError(f"no optimizer partition holds {missing}")
    return params, states, parts[0]["base_optimizer_state"]["param_groups"]


def _zero3_params(parts: list[dict], param_shapes: list[dict[str, list[int]]]) -> tuple[dict, list[dict], list[dict]]:
    world = len(parts)
    flats = []
    states = []
    for part in parts:
        base = part["optimizer_state_dict"]
        groups = [base["state"][i] for i in range(len(part["fp32_flat_groups"]))]
        states += groups
        flats.append(
            {
                "fp32": torch.cat(part["fp32_flat_groups"]),
                **{key: torch.cat([group[key] for group in groups]) for key in MOMENTS},
            }
        )
    params = {}
    offset = 0
    for name, shape in ((name, shape) for group in param_shapes for name, shape in group.items()):
        numel = math.prod(shape)
        per_rank = math.ceil(numel / world)
        if offset + per_rank > flats[0]["fp32"].numel():
            raise ReshardError(f"the ZeRO-3 partitions end before parameter {name!r}: they are not of this model")
        params[name] = {
            key: torch.cat([flat[key].narrow(0, offset, per_rank) for flat in flats]).narrow(0, 0, numel).view(shape)
            for key in ("fp32", *MOMENTS)
        }
        offset += per_rank
    return params, states, parts[0]["optimizer_state_dict"]["param_groups"]


def load_into_engine(engine: Any, full: FullOptimizerState, model_states: dict[str, Any]) -> None:
    """Give ``engine`` (ZeRO-1/2/3, any world size) the saved weights, moments, step, learning-rate schedule and
    step counters. Every rank calls it with the same ``full``; nothing is communicated."""
    from deepspeed.utils import (
        safe_set_full_fp32_param,
        safe_set_full_optimizer_state,
        safe_set_local_fp32_param,
        safe_set_local_optimizer_state,
    )

    stage = int(engine.zero_optimization_stage())
    optimizer = engine.optimizer
    flats = optimizer.fp32_partitioned_groups_flat if stage == 3 else optimizer.single_partition_of_fp32_groups
    base = optimizer.optimizer
    if len(base.param_groups) != len(full.param_groups):
        raise ReshardError(
            f"the checkpoint's optimizer has {len(full.param_groups)} param groups, this engine "
            f"{len(base.param_groups)}: it is not of this model"
        )
    # Adam creates its state at the first step; the resumed state is written into state made here of the same shape.
    for flat in flats:
        base.state[flat] = {"step": full.step.clone(), **{key: torch.zeros_like(flat) for key in MOMENTS}}
    for group, saved in zip(base.param_groups, full.param_groups, strict=True):
        group.update(saved)
    if stage < 3:
        optimizer._lazy_init_hp_params_optimizer_state()  # links each parameter's fragment to the state just made
    names = {name for name, _ in engine.module.named_parameters()}
    if names != set(full.params):
        raise ReshardError(
            f"parameters differ: checkpoint only {sorted(set(full.params) - names)}, "
            f"model only {sorted(names - set(full.params))}"
        )
    rank, world = dist.get_rank(), dist.get_world_size()
    for name, param in engine.module.named_parameters():
        saved = full.params[name]
        if stage == 3:
            size = param.ds_tensor.numel()

            def local(tensor: torch.Tensor, size: int = size) -> torch.Tensor:
                padded = F.pad(tensor.flatten(), (0, size * world - tensor.numel()))
                return padded.narrow(0, size * rank, size)

            safe_set_local_fp32_param(param, local(saved["fp32"]))
            for key in MOMENTS:
                safe_set_local_optimizer_state(param, local(saved[key]), key)
            param.ds_tensor.data.copy_(local(saved["fp32"]).to(param.ds_tensor.dtype))  # the forward's weights
        else:
            safe_set_full_fp32_param(param, saved["fp32"])
            for key in MOMENTS:
                safe_set_full_optimizer_state(param, saved[key], key)
            param.data.copy_(saved["fp32"].to(param.dtype))  # the forward's weights
    if engine.lr_scheduler is not None and model_states.get("lr_scheduler") is not None:
        engine.lr_scheduler.load_state_dict(model_states["lr_scheduler"])
    engine.global_steps = model_states["global_steps"]
    engine.global_samples = model_states.get("global_samples", engine.global_steps * engine.train_batch_size())
    engine.skipped_steps = model_states["skipped_steps"]
