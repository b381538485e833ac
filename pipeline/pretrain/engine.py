"""The one function that wraps a built model for distributed training: DeepSpeed config + ``deepspeed.initialize``.

ZeRO stage 0-3, bf16 on GPU / fp32 on CPU, micro-batch x gradient accumulation x world size = global batch,
gradient clipping, AdamW with the paper's betas and decoupled weight decay on weight matrices only, the
warmup + linear-decay schedule, optional activation checkpointing. The process group must already exist
(Ray Train creates it: gloo on CPU, NCCL on GPU); DeepSpeed adopts it.
"""

from __future__ import annotations

import hashlib
import os
import sys
from typing import Any

import torch

# DeepSpeed picks its accelerator when first imported; on a machine without CUDA it must be told to use the
# CPU one (which then runs collectives over gloo). GPU machines keep DeepSpeed's own detection.
if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
# DeepSpeed JIT-builds small ops (on CPU: its shared-memory allreduce) into torch's extension cache. Other DeepSpeed
# users on the same machine were seen to build the same op with different flags, which makes every second process
# rebuild it (about a minute each); a cache of our own keeps one build. The build also embeds the Python
# environment's include paths, so two checkouts with their own virtualenv (e.g. a CI copy next to a working tree)
# rebuilt it in turn (seen: 80 s per Ray worker start): one directory per environment.
os.environ.setdefault(
    "TORCH_EXTENSIONS_DIR",
    os.path.expanduser("~/.cache/vitpipe/torch_extensions/" + hashlib.sha256(sys.prefix.encode()).hexdigest()[:10]),
)

import deepspeed
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

from pipeline.config import PretrainConfig, RunLayout
from pipeline.schedules import WarmupLinearDecay


def _use_plain_gloo_on_cpu() -> None:
    """Keep DeepSpeed from JIT-compiling its shared-memory CPU allreduce (``deepspeed_shm_comm``).

    Every process that initialises DeepSpeed's CPU backend loads that op, and g++-builds it whenever the cached
    build's flags differ from its own. On a machine shared by several DeepSpeed users the cache was rebuilt in
    turn (seen: 60-330 s per Ray worker start, even in a per-environment cache), and Ray workers were seen to die
    or hang at start while it was being rebuilt. The op only speeds up
    allreduce between processes of one CPU host; gloo does the same job, so DeepSpeed is told the op is
    unavailable, as it concludes itself on platforms that cannot build it.
    """
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False


if not torch.cuda.is_available():
    _use_plain_gloo_on_cpu()

# The non-tensor objects DeepSpeed 0.19 pickles into its checkpoints (found by loading ZeRO-1/2/3 checkpoints
# with weights_only=True). Anything else in a checkpoint file makes the load fail loudly.
DEEPSPEED_CHECKPOINT_GLOBALS = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


class SafeCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine, but loading with ``weights_only=True``.

    DeepSpeed itself calls ``torch.load(..., weights_only=False)``, which would run arbitrary pickled code
    from whatever sits at the checkpoint URL.
    """

    def load(self, path: str, map_location: Any = None) -> Any:
        with torch.serialization.safe_globals(DEEPSPEED_CHECKPOINT_GLOBALS):
            try:
                return torch.load(path, map_location=map_location, weights_only=True)
            except Exception as exc:
                hint = (
                    " (if it names a DeepSpeed class, add that to DEEPSPEED_CHECKPOINT_GLOBALS)"
                    if "Unsupported global" in str(exc)
                    else ""
                )
                raise RuntimeError(
                    f"{os.path.basename(path)} does not load with weights_only=True{hint}: {exc}"
                ) from exc


def deepspeed_config(cfg: PretrainConfig, plan: RunLayout) -> dict[str, Any]:
    on_gpu = cfg.on_gpu
    optimizer_params: dict[str, Any] = {
        "lr": cfg.optim.lr,
        "betas": list(cfg.optim.betas),
        "eps": cfg.optim.eps,
        "weight_decay": cfg.optim.weight_decay,
        # torch's AdamW: no extension to JIT-compile on either device; its fused CUDA kernel on GPU.
        "torch_adam": True,
    }
    if on_gpu:
        optimizer_params["fused"] = True
    zero: dict[str, Any] = {"stage": cfg.train.zero_stage}
    if cfg.train.zero_stage == 3:
        # The export gathers fp32 weights itself (pipeline.pretrain.checkpoints.consolidated_state_dict).
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    return {
        "train_batch_size": plan.global_batch,
        "train_micro_batch_size_per_gpu": plan.micro_batch,
        "gradient_accumulation_steps": plan.grad_accum,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": plan.bf16},
        "optimizer": {"type": "AdamW", "params": optimizer_params},
        "checkpoint": {"tag_validation": "FAIL"},
        "steps_per_print": 1 << 60,  # progress is printed by pipeline.pretrain
        "wall_clock_breakdown": False,
    }


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on weight matrices and kernels only; biases, norms, class token and position embedding free."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        exempt = param.ndim <= 1 or name in ("cls_token", "pos_embed")
        (no_decay if exempt else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]


def build_engine(model: torch.nn.Module, cfg: PretrainConfig, plan: RunLayout) -> deepspeed.DeepSpeedEngine:
    """Wrap ``model`` (built on CPU, fp32) in a DeepSpeed engine with optimizer and LR schedule."""
    if cfg.train.activation_checkpointing:
        model.set_grad_checkpointing(True)

    def schedule(optimizer: Any) -> WarmupLinearDecay:
        return WarmupLinearDecay(
            optimizer,
            peak_lr=cfg.optim.lr,
            warmup_steps=plan.warmup_steps,
            total_steps=plan.total_steps,
            end_lr=cfg.optim.end_lr,
        )

    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(model, cfg.optim.weight_decay),
        lr_scheduler=schedule,
        config=deepspeed_config(cfg, plan),
    )
    engine.checkpoint_engine = SafeCheckpointEngine(engine._config)
    return engine


def engine_modes(engine: deepspeed.DeepSpeedEngine) -> dict[str, Any]:
    """The training modes the engine runs, read off the engine and its model rather than the config (printed at the
    start of a run and reported with its results, so that a mode the config asked for is seen to be in effect)."""
    return {
        "zero_stage": int(engine.zero_optimization_stage()),
        "bf16": bool(engine.bfloat16_enabled()),
        "param_dtype": str(next(engine.module.parameters()).dtype).removeprefix("torch."),
        "activation_checkpointing": bool(getattr(engine.module, "grad_checkpointing", False)),
        "grad_accum": int(engine.gradient_accumulation_steps()),
    }
