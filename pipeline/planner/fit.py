"""Fitting a pretraining run into memory: the request, the recommended setting, and the preflight verdict.

``preflight(request)`` is the hook for ``jobs/pretrain.py``: it returns ``PreflightResult(fits, reasons,
recommendation)``, each reason naming the change that would make the run fit.
"""

from dataclasses import dataclass, field
from typing import Any

import model
from pipeline.planner.costs import (
    DEFAULT_IMAGE_BYTES,
    DEFAULT_SHARD_BYTES,
    LOADER_IMAGES_PER_SEC_PER_CORE,
)
from pipeline.planner.hardware import DEFAULT_NET_GBITS_PER_GPU, GIB, GPUS, GpuSpec, cpu_device
from pipeline.planner.memory import (
    ZERO_STAGES,
    MemoryEstimate,
    ModelFacts,
    Precision,
    estimate_memory,
    format_gib,
)


class PlanError(ValueError):
    """A configuration that cannot run as given; the message says what to change."""


@dataclass(frozen=True)
class PlanRequest:
    """What the planner needs from a run's config, as plain values (jobs/pretrain.py maps its config onto this).

    `zero_stage` / `micro_batch` left as None let the planner choose. `gpu` is a key of GPUS, or "cpu" to check
    host memory instead (fp32, one process per "GPU").
    """

    variant: str
    global_batch: int
    steps: int
    img_size: int = 224
    num_classes: int = 1000
    representation_size: int | None = None
    pool: str = "token"
    zero_stage: int | None = None
    micro_batch: int | None = None
    grad_checkpointing: bool = False
    precision: Precision = "bf16"
    flash_attention: bool = True
    nodes: int = 1
    gpus_per_node: int = 8
    gpu: str = "h100"
    mfu: float = 0.45
    loader_rate_per_core: float = LOADER_IMAGES_PER_SEC_PER_CORE
    image_bytes: int = DEFAULT_IMAGE_BYTES
    shard_bytes: int = DEFAULT_SHARD_BYTES
    net_gbits_per_gpu: float = DEFAULT_NET_GBITS_PER_GPU

    def __post_init__(self) -> None:
        checks = [
            (self.global_batch >= 1, f"global_batch must be >= 1, got {self.global_batch}"),
            (self.steps >= 1, f"steps must be >= 1, got {self.steps}"),
            (self.nodes >= 1, f"nodes must be >= 1, got {self.nodes}"),
            (self.gpus_per_node >= 1, f"gpus_per_node must be >= 1, got {self.gpus_per_node}"),
            (0.0 < self.mfu <= 1.0, f"mfu must be in (0, 1], got {self.mfu}"),
            (self.loader_rate_per_core > 0, "loader_rate_per_core must be > 0 images/s"),
            (self.micro_batch is None or self.micro_batch >= 1, f"micro_batch must be >= 1, got {self.micro_batch}"),
            (
                self.zero_stage is None or self.zero_stage in ZERO_STAGES,
                f"zero_stage must be one of {ZERO_STAGES}, got {self.zero_stage}",
            ),
            (self.precision in ("bf16", "fp32"), f"precision must be 'bf16' or 'fp32', got {self.precision!r}"),
            (self.gpu == "cpu" or self.gpu in GPUS, f"gpu must be 'cpu' or one of {sorted(GPUS)}, got {self.gpu!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise PlanError(message)

    @property
    def num_gpus(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass(frozen=True)
class Recommendation:
    zero_stage: int
    micro_batch: int
    grad_accumulation: int
    grad_checkpointing: bool
    memory: MemoryEstimate

    def describe(self) -> str:
        ckpt = "on" if self.grad_checkpointing else "off"
        return (
            f"zero_stage={self.zero_stage}, micro_batch={self.micro_batch}, "
            f"grad_accumulation={self.grad_accumulation}, grad_checkpointing={ckpt} "
            f"({self.memory.total / GIB:.1f} GiB per GPU)"
        )


@dataclass(frozen=True)
class PreflightResult:
    fits: bool
    reasons: list[str]
    recommendation: Recommendation | None
    setting: MemoryEstimate | None  # the configured stage/micro-batch (completed where one is unset), if any set
    device: GpuSpec  # the GPU, or the host's memory share per process for gpu="cpu"
    notes: list[str] = field(default_factory=list)

    def raise_if_unfit(self) -> None:
        if not self.fits:
            raise PlanError("; ".join(self.reasons))


def _device(req: PlanRequest) -> GpuSpec:
    return cpu_device(req.gpus_per_node) if req.gpu == "cpu" else GPUS[req.gpu]


def divisors_desc(n: int) -> list[int]:
    return sorted((d for d in range(1, n + 1) if n % d == 0), reverse=True)


def request_facts(req: PlanRequest) -> ModelFacts:
    return ModelFacts.build(
        req.variant,
        img_size=req.img_size,
        num_classes=req.num_classes,
        representation_size=req.representation_size,
        pool=req.pool,
    )


class Fitter:
    """Memory estimates for one request and device, keyed by (stage, micro-batch, checkpointing)."""

    def __init__(self, req: PlanRequest, facts: ModelFacts, device: GpuSpec) -> None:
        self.req, self.facts, self.device = req, facts, device
        self.precision: Precision = "fp32" if req.gpu == "cpu" else req.precision

    def estimate(self, stage: int, micro: int, ckpt: bool) -> MemoryEstimate:
        return estimate_memory(
            self.facts,
            zero_stage=stage,
            micro_batch=micro,
            num_gpus=self.req.num_gpus,
            grad_checkpointing=ckpt,
            precision=self.precision,
            # torch's SDPA on CPU is a fused kernel too: no s×s matrix is kept there either
            flash_attention=self.req.flash_attention,
        )

    def fits(self, stage: int, micro: int, ckpt: bool) -> bool:
        return self.estimate(stage, micro, ckpt).total <= self.device.usable_bytes

    def largest_micro(self, stage: int, ckpt: bool, per_gpu: int) -> int | None:
        return next((m for m in divisors_desc(per_gpu) if self.fits(stage, m, ckpt)), None)


def recommend(req: PlanRequest, facts: ModelFacts, device: GpuSpec) -> Recommendation | None:
    """The setting to run: largest micro-batch first, then the smallest ZeRO stage, checkpointing only if needed.

    Micro-batches are divisors of the per-GPU batch (global_batch / GPUs), so accumulation is a whole number.
    A larger micro-batch means fewer, fuller kernels per step. Among stages the smallest that fits wins: stages
    1 and 2 cost no more communication than plain data parallelism but stage 3 costs 1.5× (ZeRO paper §7), and
    lower stages have less machinery. Activation checkpointing recomputes the forward (~1/3 more FLOPs), so it
    is used only if the config asks for it or nothing fits without it.
    """
    if req.global_batch % req.num_gpus:
        return None
    per_gpu = req.global_batch // req.num_gpus
    fitter = Fitter(req, facts, device)
    for ckpt in [req.grad_checkpointing] if req.grad_checkpointing else [False, True]:
        best: tuple[int, int] | None = None  # (micro, stage)
        for stage in ZERO_STAGES:
            micro = fitter.largest_micro(stage, ckpt, per_gpu)
            if micro is not None and (best is None or micro > best[0]):
                best = (micro, stage)
        if best is not None:
            micro, stage = best
            return Recommendation(stage, micro, per_gpu // micro, ckpt, fitter.estimate(stage, micro, ckpt))
    return None


def preflight(req: PlanRequest) -> PreflightResult:
    """Check a run's configuration against memory before launch; say what to change when it cannot fit.

    `fits` is True when the configured ZeRO stage / micro-batch (or, where unset, the recommended ones) fit the
    device's usable memory (`usable_memory_bytes`) and the batch sizes divide. Each reason names the fixes that
    would work on their own, e.g. "ViT-H/14, ZeRO-0, micro-batch 128 needs 97.3 GiB per GPU, A100 40GB has 33.0 GiB
    usable (40.0 GiB minus reserve): use zero_stage=3 or micro_batch<=32 or grad_checkpointing=true".
    For gpu="cpu" the host's available memory (psutil), shared by gpus_per_node processes, is the limit.
    """
    facts = request_facts(req)
    device = _device(req)
    reasons: list[str] = []
    notes: list[str] = []
    if req.gpu == "cpu":
        notes.append(
            f"CPU run: checked against the host's available memory (psutil) shared by {req.gpus_per_node} "
            "processes, fp32"
        )
    n = req.num_gpus
    if req.global_batch % n:
        lower, upper = req.global_batch // n * n, -(-req.global_batch // n) * n
        reasons.append(
            f"global_batch {req.global_batch} is not divisible by {n} GPUs ({req.nodes} nodes × {req.gpus_per_node}): "
            f"use global_batch={lower or upper} or {upper}, or a GPU count that divides {req.global_batch}"
        )
        return PreflightResult(False, reasons, None, None, device, notes)
    per_gpu = req.global_batch // n
    recommendation = recommend(req, facts, device)
    fitter = Fitter(req, facts, device)

    setting: MemoryEstimate | None = None
    ckpt = req.grad_checkpointing
    if req.micro_batch is not None and per_gpu % req.micro_batch:
        reasons.append(
            f"micro_batch {req.micro_batch} does not divide the per-GPU batch {per_gpu} "
            f"(global_batch {req.global_batch} / {n} GPUs): use one of {sorted(divisors_desc(per_gpu))}"
        )
    elif req.zero_stage is not None or req.micro_batch is not None:
        # Complete a partly given setting the way `recommend` would: largest micro-batch, then smallest stage.
        stages = [req.zero_stage] if req.zero_stage is not None else list(ZERO_STAGES)
        micros = [req.micro_batch] if req.micro_batch is not None else divisors_desc(per_gpu)
        chosen = next(((s, m) for m in micros for s in stages if fitter.fits(s, m, ckpt)), None)
        setting = fitter.estimate(*(chosen or (stages[-1], micros[-1])), ckpt)
        if chosen is None:
            reasons.append(_unfit_reason(fitter, setting, per_gpu, recommendation))
    elif recommendation is not None and recommendation.grad_checkpointing and not ckpt:
        reasons.append(
            f"ViT-{facts.variant} fits on {device.name} only with activation checkpointing: "
            f"use grad_checkpointing=true ({recommendation.describe()})"
        )

    if recommendation is None and not reasons:
        worst = fitter.estimate(3, 1, True)
        reasons.append(
            f"ViT-{facts.variant} does not fit on {device.name} even at zero_stage=3, micro_batch=1 and "
            f"grad_checkpointing=true ({format_gib(worst.total)} needed, {format_gib(device.usable_bytes)} usable): "
            "use a GPU with more memory or more GPUs"
        )
    return PreflightResult(not reasons, reasons, recommendation, setting, device, notes)


def _unfit_reason(fitter: Fitter, need: MemoryEstimate, per_gpu: int, recommendation: Recommendation | None) -> str:
    stage, micro, ckpt = need.zero_stage, need.micro_batch, need.grad_checkpointing
    device = fitter.device
    fixes: list[str] = []
    stage_fix = next((s for s in ZERO_STAGES if s > stage and fitter.fits(s, micro, ckpt)), None)
    if stage_fix is not None:
        fixes.append(f"zero_stage={stage_fix}")
    micro_fix = fitter.largest_micro(stage, ckpt, per_gpu)
    if micro_fix is not None:
        fixes.append(f"micro_batch<={micro_fix}")
    if not ckpt and fitter.fits(stage, micro, True):
        fixes.append("grad_checkpointing=true")
    if not fixes and recommendation is not None:
        r = recommendation
        fixes.append(
            f"zero_stage={r.zero_stage}, micro_batch={r.micro_batch} and "
            f"grad_checkpointing={'true' if r.grad_checkpointing else 'false'} together"
        )
    advice = " or ".join(fixes) if fixes else "a GPU with more memory (nothing fits on this one)"
    return (
        f"ViT-{fitter.facts.variant}, ZeRO-{stage}, micro-batch {micro}"
        f"{' with checkpointing' if ckpt else ''} needs {format_gib(need.total)} per GPU, {device.name} has "
        f"{format_gib(device.usable_bytes)} usable ({device.memory_gib:.1f} GiB minus reserve): use {advice}"
    )


def request_from_config(
    cfg: Any,
    *,
    steps: int,
    num_classes: int,
    nodes: int | None = None,
    gpus_per_node: int | None = None,
    gpu: str = "h100",
    **options: Any,
) -> PlanRequest:
    """A PlanRequest from a `pipeline.config.PretrainConfig` (read by attribute; this module does not import it).

    The config says how many workers (one GPU each, or CPU processes) but not how they are packed into nodes nor
    which GPU: `nodes` × `gpus_per_node` default to the config's workers on 8-GPU nodes (one node on CPU). When
    they give a different world size, the config's micro-batch is kept only if it still divides the per-GPU batch;
    otherwise it is left to the planner. `steps` and `num_classes` come from `make_layout` or the caller (the config
    may leave them to the dataset). `options` are further PlanRequest fields (mfu, loader_rate_per_core, ...).
    """
    on_gpu = cfg.scale.gpus_per_worker > 0
    workers = cfg.scale.workers
    if gpus_per_node is None:
        gpus_per_node = min(8, workers) if on_gpu else workers
    if nodes is None:
        nodes = max(1, workers // gpus_per_node)
    world = nodes * gpus_per_node
    micro: int | None = cfg.train.micro_batch
    if cfg.train.global_batch % world or (cfg.train.global_batch // world) % micro:
        micro = None
    representation = cfg.model.representation_size
    if representation == "width":
        representation = model.parse_variant(cfg.model.variant).width
    fields = {
        "variant": cfg.model.variant,
        "global_batch": cfg.train.global_batch,
        "steps": steps,
        "img_size": cfg.data.image_size,
        "num_classes": num_classes,
        "representation_size": representation,
        "pool": cfg.model.pool,
        "zero_stage": cfg.train.zero_stage,
        "micro_batch": micro,
        "grad_checkpointing": cfg.train.activation_checkpointing,
        "precision": "fp32" if cfg.train.precision == "fp32" or not on_gpu else "bf16",
        "nodes": nodes,
        "gpus_per_node": gpus_per_node,
        "gpu": gpu if on_gpu else "cpu",
    }
    fields.update(options)
    return PlanRequest(**fields)
