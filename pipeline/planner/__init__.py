"""Scale planner: memory, communication, data rate and wall-clock of a run, before anything launches.

Everything here is arithmetic on the model's analytic shape (``model.param_count``, ``model.train_flops_per_image``)
and the cluster's size; nothing imports DeepSpeed or touches a GPU. The modules, in reading order:

* ``hardware`` — the one table of GPU facts (memory, peak FLOP/s, interconnect) and the memory reserve.
* ``memory``   — model states by ZeRO stage (ZeRO paper) and activations (Korthikanti et al. 2022).
* ``costs``    — communication, step time and the loader's data rate.
* ``fit``      — ``PlanRequest``, the recommended setting, and ``preflight`` (the hook ``jobs/pretrain.py`` calls).
* ``report``   — ``plan(request)`` gathers a ``ScalePlan``; ``format_plan`` prints it (``jobs/plan.py``).
* ``finetune`` — memory of a fine-tuning (transfer) run on one GPU and the largest micro-batch that fits
  (``plan_transfer_memory``; ``jobs/plan.py --transfer``).

The names callers use are re-exported here, so ``from pipeline import planner; planner.preflight(...)`` works.
"""

from pipeline.planner.costs import (
    DEFAULT_IMAGE_BYTES,
    DEFAULT_SHARD_BYTES,
    LOADER_IMAGES_PER_SEC_PER_CORE,
    comm_bytes_per_step,
    step_seconds,
)
from pipeline.planner.finetune import (
    FINETUNE_BATCH,
    FINETUNE_MOMENTUM,
    DoesNotFitError,
    FinetuneMemory,
    TransferMemoryPlan,
    estimate_finetune_memory,
    finetune_activation_bytes,
    finetune_activation_bytes_per_layer,
    format_transfer_memory,
    plan_transfer_memory,
)
from pipeline.planner.fit import (
    PlanError,
    PlanRequest,
    PreflightResult,
    Recommendation,
    preflight,
    recommend,
    request_from_config,
)
from pipeline.planner.hardware import (
    DEFAULT_NET_GBITS_PER_GPU,
    GIB,
    GPUS,
    TPUV3_CORE_PEAK_FLOPS,
    GpuSpec,
    cpu_device,
    detect_gpu,
    usable_memory_bytes,
)
from pipeline.planner.memory import (
    ZERO_STAGES,
    MemoryEstimate,
    ModelFacts,
    ModelStateBytes,
    Precision,
    activation_bytes,
    activation_bytes_per_layer,
    estimate_memory,
    model_state_bytes,
)
from pipeline.planner.report import ScalePlan, format_plan, plan

__all__ = [
    "DEFAULT_IMAGE_BYTES",
    "DEFAULT_NET_GBITS_PER_GPU",
    "DEFAULT_SHARD_BYTES",
    "FINETUNE_BATCH",
    "FINETUNE_MOMENTUM",
    "GIB",
    "GPUS",
    "LOADER_IMAGES_PER_SEC_PER_CORE",
    "TPUV3_CORE_PEAK_FLOPS",
    "ZERO_STAGES",
    "DoesNotFitError",
    "FinetuneMemory",
    "GpuSpec",
    "MemoryEstimate",
    "ModelFacts",
    "ModelStateBytes",
    "PlanError",
    "PlanRequest",
    "Precision",
    "PreflightResult",
    "Recommendation",
    "ScalePlan",
    "TransferMemoryPlan",
    "activation_bytes",
    "activation_bytes_per_layer",
    "comm_bytes_per_step",
    "cpu_device",
    "detect_gpu",
    "estimate_finetune_memory",
    "estimate_memory",
    "finetune_activation_bytes",
    "finetune_activation_bytes_per_layer",
    "format_plan",
    "format_transfer_memory",
    "model_state_bytes",
    "plan",
    "plan_transfer_memory",
    "preflight",
    "recommend",
    "request_from_config",
    "step_seconds",
    "usable_memory_bytes",
]
