"""Scale planner: memory, communication, data rate and wall-clock of a pretraining run, before anything launches.

Everything here is arithmetic on the model's analytic shape (``model.param_count``, ``model.train_flops_per_image``)
and the cluster's size; nothing imports DeepSpeed or touches a GPU. The formulas and their sources:

* Model states per GPU, ZeRO stages 0-3: Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training
  Trillion Parameter Models", §3.1 and §5 (Figure 1) — see ``model_state_bytes``.
* Activations per transformer layer: Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
  Transformer Models", §4.1 (eq. 1), adjusted for fused (flash / memory-efficient) attention — see
  ``activation_bytes_per_layer``.
* Communication per step: ZeRO paper §7 — see ``comm_bytes_per_step``.
* Wall-clock: training FLOPs (≈ 3 × forward, ViT paper / Kaplan et al. 2020) over MFU × peak (Chowdhery et al.
  2022, PaLM, Appendix B) — see ``step_seconds``.

``preflight(request)`` is the hook for ``jobs/pretrain.py``: it returns ``PreflightResult(fits, reasons,
recommendation)``; ``plan(request)`` adds the full report and ``format_plan`` prints it (``jobs/plan.py``).
"""

from dataclasses import dataclass, field
from typing import Any, Literal

import model

# The hardware table lives in hardware.py; its names stay readable as planner.X for existing callers.
from pipeline.planner.hardware import (  # noqa: F401
    CPU_PROCESS_RESERVE_GIB,
    DEFAULT_NET_GBITS_PER_GPU,
    GIB,
    GPUS,
    REPORT_GPUS,
    RESERVE_FIXED_GIB,
    RESERVE_FRACTION,
    TPUV3_CORE_PEAK_FLOPS,
    GpuSpec,
    cpu_device,
    detect_gpu,
    usable_memory_bytes,
)

DAY_S = 86_400.0

# Pretraining cost on JFT-300M, ViT paper Table 2.
PAPER_TPUV3_CORE_DAYS: dict[str, float] = {"H/14": 2500.0, "L/16": 680.0}

# Images/s one CPU core feeds to training. Source: `python bench/loader.py` (the loader of commit f2a3511) on the
# 2-core development machine, 2026-11-25: "loader gcs emulator, 0 workers" 1055 img/s per CPU-second, i.e. tar
# streaming through gcsfs + reduced-scale JPEG decode + Inception crop + flip, on 400x350 q90 photo crops of 36 KB
# (the transform alone: 1377 img/s/core). Photos of ImageNet/JFT size (~110 KB) decode slower: measure on the real
# shards and pass --loader-rate-per-core.
LOADER_IMAGES_PER_SEC_PER_CORE = 1050.0
# Mean JPEG size of ImageNet-1k train (~140 GB / 1.28 M images); JFT images are of the same order.
DEFAULT_IMAGE_BYTES = 110_000
# `jobs/prepare_data.py --shard-size` default (pipeline/data/prepare.py: 256 MB).
DEFAULT_SHARD_BYTES = 256 * 1000**2

Precision = Literal["bf16", "fp32"]
ZERO_STAGES = (0, 1, 2, 3)

# ---------------------------------------------------------------------------------------------------------------------
# The model, reduced to the numbers the formulas need
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelFacts:
    variant: str
    img_size: int
    num_classes: int
    width: int
    depth: int
    heads: int
    mlp_dim: int
    patch: int
    seq_len: int
    params: int  # Ψ
    train_flops_per_image: float  # forward + backward ≈ 3 × forward

    @classmethod
    def build(
        cls,
        variant: str,
        *,
        img_size: int,
        num_classes: int,
        representation_size: int | None = None,
        pool: str = "token",
    ) -> "ModelFacts":
        shape = model.parse_variant(variant)
        if img_size % shape.patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of the patch size {shape.patch_size}.")
        prefix = 1 if pool == "token" else 0
        kwargs = {"num_classes": num_classes, "representation_size": representation_size, "pool": pool}
        return cls(
            variant=shape.name,
            img_size=img_size,
            num_classes=num_classes,
            width=shape.width,
            depth=shape.depth,
            heads=shape.num_heads,
            mlp_dim=shape.mlp_dim,
            patch=shape.patch_size,
            seq_len=(img_size // shape.patch_size) ** 2 + prefix,
            params=model.param_count(variant, img_size=img_size, **kwargs),
            train_flops_per_image=float(model.train_flops_per_image(variant, img_size, **kwargs)),
        )


# ---------------------------------------------------------------------------------------------------------------------
# Memory formulas
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelStateBytes:
    """Per-GPU bytes of the three model-state kinds ZeRO partitions."""

    params: float
    grads: float
    optimizer: float  # fp32 master weights (if any) + Adam m + Adam v

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer


def model_state_bytes(
    num_params: int, zero_stage: int, num_gpus: int, precision: Precision = "bf16"
) -> ModelStateBytes:
    """Per-GPU parameter, gradient and optimizer-state bytes (ZeRO paper §3.1, §5, Figure 1).

    Mixed precision (bf16) Adam keeps per parameter 2 bytes of 16-bit weights, 2 bytes of 16-bit gradients and
    K = 12 bytes of optimizer state (fp32 master weight, Adam m, Adam v). With N data-parallel GPUs:

        stage 0 (plain data parallel)   2Ψ + 2Ψ + 12Ψ        = 16Ψ
        stage 1 (P_os)                  2Ψ + 2Ψ + 12Ψ / N
        stage 2 (P_os+g)                2Ψ + (2Ψ + 12Ψ) / N
        stage 3 (P_os+g+p)              (2Ψ + 2Ψ + 12Ψ) / N

    fp32 (the CPU path): 4 bytes of weights and 4 of gradients; Adam m and v are 8 bytes. Stage 0 runs the plain
    torch optimizer (K = 8, no second copy), but DeepSpeed's ZeRO-1/2/3 optimizers keep their own fp32 partition of
    the weights even when the model is fp32 (measured by bench/zero_memory.py), so K = 12 there too.
    """
    if zero_stage not in ZERO_STAGES:
        raise ValueError(f"zero_stage must be one of {ZERO_STAGES}, got {zero_stage}.")
    if num_gpus < 1:
        raise ValueError(f"num_gpus must be >= 1, got {num_gpus}.")
    psi, n = float(num_params), float(num_gpus)
    if precision == "bf16":
        weight, grad, k = 2.0, 2.0, 12.0
    elif precision == "fp32":
        weight, grad, k = 4.0, 4.0, (8.0 if zero_stage == 0 else 12.0)
    else:
        raise ValueError(f"precision must be 'bf16' or 'fp32', got {precision!r}.")
    return ModelStateBytes(
        params=weight * psi / (n if zero_stage >= 3 else 1.0),
        grads=grad * psi / (n if zero_stage >= 2 else 1.0),
        optimizer=k * psi / (n if zero_stage >= 1 else 1.0),
    )


def activation_bytes_per_layer(
    *,
    seq_len: int,
    micro_batch: int,
    width: int,
    heads: int,
    mlp_dim: int,
    flash_attention: bool = True,
    bytes_per_value: int = 2,
) -> float:
    """Bytes one encoder block keeps for backward (Korthikanti et al. 2022, §4.1, eq. 1, no tensor parallelism).

    With s tokens, b images, width h, a heads and 16-bit activations the paper counts per layer

        s·b·h·(34 + 5·a·s/h) bytes
          attention 11·s·b·h (qkv input 2, Q and K 4, V 2, projection input 2, dropout mask 1) + 5·a·s²·b
                    (softmax output 2, its dropout mask 1, dropped-out probabilities 2),
          MLP       19·s·b·h (fc1 input 2, GELU input 8, fc2 input 8, dropout mask 1) for mlp_dim = 4h,
          2 LNs     4·s·b·h.

    For a general MLP width m the 19 becomes 3 + 4·m/h, i.e. s·b·h·(18 + 4·m/h); every ViT in Table 1 has m = 4h
    (34). Fused attention (flash / memory-efficient SDPA, what `model` uses) stores no s×s matrix: it keeps its
    output, which is the projection input already counted (the head transpose + reshape is a view of the kernel's
    [b, s, a, h/a] output), and the fp32 log-sum-exp of each query row, and recomputes the scores in backward, so
    the 5·a·s²·b term becomes 4·a·s·b: s·b·h·34 + 4·a·s·b for m = 4h. The dropout masks are counted even at
    dropout 0, so this is an upper bound: for create_vit("Ti/16") at dropout 0 the tensors autograd saves are
    0.85-0.9 of it (tests/test_planner.py checks the bound on CPU).
    fp32 activations (CPU) double everything (`bytes_per_value=4`).
    """
    s, b, h, a = float(seq_len), float(micro_batch), float(width), float(heads)
    linear_terms = s * b * h * (18.0 + 4.0 * mlp_dim / width)
    attention_scores = 4.0 * a * s * b if flash_attention else 5.0 * a * s * s * b
    return (linear_terms + attention_scores) * bytes_per_value / 2.0


def activation_bytes(
    facts: ModelFacts,
    micro_batch: int,
    *,
    grad_checkpointing: bool,
    flash_attention: bool = True,
    precision: Precision = "bf16",
) -> float:
    """Activation bytes of a whole ViT at one micro-batch.

    Without checkpointing: depth × per-layer bytes (above). With a checkpoint around every block (what
    `create_vit(grad_checkpointing=True)` does) only each block's input survives, 2·s·b·h per layer (Korthikanti
    §4.2, "full recomputation"), plus one block's full activations while it is recomputed in backward.
    Outside the blocks: the input images (2·b·3·H·W), patch tokens and their sum with the position embedding
    (2 × 2·s·b·h), the final LayerNorm input (2·s·b·h) and fp32 logits with their gradient (8·b·classes).
    """
    bytes_per_value = 2 if precision == "bf16" else 4
    scale = bytes_per_value / 2.0
    s, b, h = facts.seq_len, micro_batch, facts.width
    per_layer = activation_bytes_per_layer(
        seq_len=s,
        micro_batch=b,
        width=h,
        heads=facts.heads,
        mlp_dim=facts.mlp_dim,
        flash_attention=flash_attention,
        bytes_per_value=bytes_per_value,
    )
    # checkpointed: each block's input survives, and one block is rebuilt at a time in backward
    kept_per_layer = 2.0 * s * b * h * scale if grad_checkpointing else per_layer
    blocks = facts.depth * kept_per_layer + (per_layer if grad_checkpointing else 0.0)
    outside = (2.0 * b * 3 * facts.img_size**2 + 3 * 2.0 * s * b * h) * scale + 8.0 * b * facts.num_classes
    return blocks + outside


@dataclass(frozen=True)
class MemoryEstimate:
    zero_stage: int
    micro_batch: int
    grad_checkpointing: bool
    states: ModelStateBytes
    activations: float

    @property
    def total(self) -> float:
        return self.states.total + self.activations


def estimate_memory(
    facts: ModelFacts,
    *,
    zero_stage: int,
    micro_batch: int,
    num_gpus: int,
    grad_checkpointing: bool,
    precision: Precision = "bf16",
    flash_attention: bool = True,
) -> MemoryEstimate:
    return MemoryEstimate(
        zero_stage=zero_stage,
        micro_batch=micro_batch,
        grad_checkpointing=grad_checkpointing,
        states=model_state_bytes(facts.params, zero_stage, num_gpus, precision),
        activations=activation_bytes(
            facts,
            micro_batch,
            grad_checkpointing=grad_checkpointing,
            flash_attention=flash_attention,
            precision=precision,
        ),
    )


# ---------------------------------------------------------------------------------------------------------------------
# Communication, time, data
# ---------------------------------------------------------------------------------------------------------------------


def comm_bytes_per_step(
    num_params: int, zero_stage: int, num_gpus: int, grad_accumulation: int = 1, bytes_per_value: int = 2
) -> float:
    """Bytes each GPU sends (and receives) per optimizer step for data parallelism (ZeRO paper §7).

    A ring all-reduce is a reduce-scatter plus an all-gather, each moving Ψ·(N−1)/N elements per GPU:

        stage 0   all-reduce of the gradients                                2Ψ
        stage 1   reduce-scatter of gradients + all-gather of updated weights  2Ψ  (the paper: same as DDP)
        stage 2   the same, but DeepSpeed reduce-scatters gradients in every
                  micro-step's backward, so with A accumulation steps         Ψ·A + Ψ
        stage 3   weights all-gathered for forward and again for backward,
                  gradients reduce-scattered, every micro-step                  3Ψ·A (the paper: 1.5 × DDP)

    times (N−1)/N and the bytes per element on the wire (bf16: 2). Stages 0 and 1 reduce once per step, at the
    gradient-accumulation boundary.
    """
    psi, a = float(num_params), float(grad_accumulation)
    elements = {0: 2.0 * psi, 1: 2.0 * psi, 2: psi * a + psi, 3: 3.0 * psi * a}[zero_stage]
    return elements * bytes_per_value * (num_gpus - 1) / num_gpus


def comm_seconds(volume_bytes: float, *, nodes: int, gpus_per_node: int, net_gbits_per_gpu: float) -> float:
    """Network time of `comm_bytes_per_step` when a node's GPUs share NVLink and each has its own NIC.

    NCCL runs one ring (or tree) per NIC; each crosses the node boundary once, so a node's network egress is
    about one GPU's volume, spread over its gpus_per_node NICs: time ≈ volume / (gpus_per_node × NIC rate).
    NVLink (900 GB/s on H100) is taken as free. On one node nothing crosses the network: 0.
    """
    if nodes == 1:
        return 0.0
    return volume_bytes / (gpus_per_node * net_gbits_per_gpu / 8.0 * 1e9)


def step_seconds(
    *, global_batch: int, train_flops_per_image: float, num_gpus: int, peak_flops: float, mfu: float
) -> float:
    """Seconds per optimizer step: global_batch × training FLOPs per image / (MFU × peak FLOP/s × GPUs)."""
    return global_batch * train_flops_per_image / (mfu * peak_flops * num_gpus)


# ---------------------------------------------------------------------------------------------------------------------
# Request, recommendation, preflight
# ---------------------------------------------------------------------------------------------------------------------


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


def _divisors_desc(n: int) -> list[int]:
    return sorted((d for d in range(1, n + 1) if n % d == 0), reverse=True)


def _facts(req: PlanRequest) -> ModelFacts:
    return ModelFacts.build(
        req.variant,
        img_size=req.img_size,
        num_classes=req.num_classes,
        representation_size=req.representation_size,
        pool=req.pool,
    )


class _Fitter:
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
        return next((m for m in _divisors_desc(per_gpu) if self.fits(stage, m, ckpt)), None)


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
    fitter = _Fitter(req, facts, device)
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


def _gib(x: float) -> str:
    return f"{x / GIB:.1f} GiB"


def preflight(req: PlanRequest) -> PreflightResult:
    """Check a run's configuration against memory before launch; say what to change when it cannot fit.

    `fits` is True when the configured ZeRO stage / micro-batch (or, where unset, the recommended ones) fit the
    device's usable memory (`usable_memory_bytes`) and the batch sizes divide. Each reason names the fixes that
    would work on their own, e.g. "ViT-H/14, ZeRO-0, micro-batch 128 needs 97.3 GiB per GPU, A100 40GB has 33.0 GiB
    usable (40.0 GiB minus reserve): use zero_stage=3 or micro_batch<=32 or grad_checkpointing=true".
    For gpu="cpu" the host's available memory (psutil), shared by gpus_per_node processes, is the limit.
    """
    facts = _facts(req)
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
    fitter = _Fitter(req, facts, device)

    setting: MemoryEstimate | None = None
    ckpt = req.grad_checkpointing
    if req.micro_batch is not None and per_gpu % req.micro_batch:
        reasons.append(
            f"micro_batch {req.micro_batch} does not divide the per-GPU batch {per_gpu} "
            f"(global_batch {req.global_batch} / {n} GPUs): use one of {sorted(_divisors_desc(per_gpu))}"
        )
    elif req.zero_stage is not None or req.micro_batch is not None:
        # Complete a partly given setting the way `recommend` would: largest micro-batch, then smallest stage.
        stages = [req.zero_stage] if req.zero_stage is not None else list(ZERO_STAGES)
        micros = [req.micro_batch] if req.micro_batch is not None else _divisors_desc(per_gpu)
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
            f"grad_checkpointing=true ({_gib(worst.total)} needed, {_gib(device.usable_bytes)} usable): "
            "use a GPU with more memory or more GPUs"
        )
    return PreflightResult(not reasons, reasons, recommendation, setting, device, notes)


def _unfit_reason(fitter: _Fitter, need: MemoryEstimate, per_gpu: int, recommendation: Recommendation | None) -> str:
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
        f"{' with checkpointing' if ckpt else ''} needs {_gib(need.total)} per GPU, {device.name} has "
        f"{_gib(device.usable_bytes)} usable ({device.memory_gib:.1f} GiB minus reserve): use {advice}"
    )


# ---------------------------------------------------------------------------------------------------------------------
# The full plan
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TimeEstimate:
    step_s: float
    total_s: float
    gpu_hours: float
    images_per_s: float
    train_flops_total: float


@dataclass(frozen=True)
class DataRate:
    images_per_s: float
    images_per_s_per_node: float
    cores_per_node: float
    bytes_per_s: float
    shards_per_s: float


@dataclass(frozen=True)
class PaperComparison:
    paper_core_days: float
    paper_peak_flops: float  # core-days × 86,400 s × 61.5 TFLOP/s
    paper_equivalent_gpu_days: float  # the same peak-FLOP budget on this plan's GPU
    plan_equivalent_core_days: float  # this plan's GPU-hours as TPUv3-core-days of equal peak
    implied_paper_mfu: float  # this schedule's training FLOPs / the paper's peak budget


@dataclass(frozen=True)
class Plan:
    request: PlanRequest
    facts: ModelFacts
    preflight: PreflightResult
    micro_batch: int  # the micro-batch the memory table is for (configured, else recommended)
    memory_table: list[MemoryEstimate]  # stages 0-3 × checkpointing off/on at `micro_batch`
    comm: dict[int, float]  # stage -> bytes per GPU per step
    grad_accumulation: int
    time: TimeEstimate | None  # None on CPU (no peak to assume an MFU of)
    data: DataRate | None
    paper: PaperComparison | None


def plan(req: PlanRequest) -> Plan:
    """Everything `jobs/plan.py` prints. See the module docstring for the formulas' sources."""
    facts = _facts(req)
    check = preflight(req)
    n = req.num_gpus
    per_gpu = max(1, req.global_batch // n)
    rec = check.recommendation
    micro = req.micro_batch or (rec.micro_batch if rec else 1)
    fitter = _Fitter(req, facts, check.device)
    table = [fitter.estimate(stage, micro, ckpt) for stage in ZERO_STAGES for ckpt in (False, True)]
    accumulation = max(1, per_gpu // micro)
    wire_bytes = 4 if fitter.precision == "fp32" else 2
    comm = {stage: comm_bytes_per_step(facts.params, stage, n, accumulation, wire_bytes) for stage in ZERO_STAGES}

    time = data = paper = None
    if req.gpu != "cpu":
        peak = GPUS[req.gpu].peak_bf16_flops
        step = step_seconds(
            global_batch=req.global_batch,
            train_flops_per_image=facts.train_flops_per_image,
            num_gpus=n,
            peak_flops=peak,
            mfu=req.mfu,
        )
        total = step * req.steps
        images_per_s = req.global_batch / step
        flops_total = facts.train_flops_per_image * req.global_batch * req.steps
        time = TimeEstimate(step, total, total / 3600.0 * n, images_per_s, flops_total)
        per_node = images_per_s / req.nodes
        data = DataRate(
            images_per_s=images_per_s,
            images_per_s_per_node=per_node,
            cores_per_node=per_node / req.loader_rate_per_core,
            bytes_per_s=images_per_s * req.image_bytes,
            shards_per_s=images_per_s * req.image_bytes / req.shard_bytes,
        )
        core_days = PAPER_TPUV3_CORE_DAYS.get(facts.variant)
        if core_days is not None:
            budget = core_days * DAY_S * TPUV3_CORE_PEAK_FLOPS
            paper = PaperComparison(
                paper_core_days=core_days,
                paper_peak_flops=budget,
                paper_equivalent_gpu_days=budget / peak / DAY_S,
                plan_equivalent_core_days=time.gpu_hours * 3600.0 * peak / TPUV3_CORE_PEAK_FLOPS / DAY_S,
                implied_paper_mfu=flops_total / budget,
            )
    return Plan(req, facts, check, micro, table, comm, accumulation, time, data, paper)


# ---------------------------------------------------------------------------------------------------------------------
# Text report
# ---------------------------------------------------------------------------------------------------------------------


def _bytes(x: float) -> str:
    return f"{x / 1e9:.2f} GB" if x >= 1e8 else f"{x / 1e6:.2f} MB"


def _duration(seconds: float) -> str:
    if seconds >= 2 * DAY_S:
        return f"{seconds / DAY_S:.1f} days"
    if seconds >= 2 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.1f} min"


def format_plan(p: Plan) -> str:
    req, f, check = p.request, p.facts, p.preflight
    n = req.num_gpus
    device = check.device
    out: list[str] = []
    add = out.append
    precision = "fp32" if req.gpu == "cpu" else req.precision
    attention = "fused (flash) attention" if req.flash_attention else "eager attention"
    wire = 4 if precision == "fp32" else 2

    add(f"== Plan: ViT-{f.variant} at {f.img_size} px, {f.num_classes} classes ==")
    add(
        f"model: Ψ = {f.params / 1e6:.1f} M params, width {f.width}, depth {f.depth}, heads {f.heads}, "
        f"MLP {f.mlp_dim}, {f.seq_len} tokens; {f.train_flops_per_image / 1e12:.3f} TFLOPs per training image "
        "(3 × forward)"
    )
    add(
        f"cluster: {req.nodes} node{'s' if req.nodes > 1 else ''} × {req.gpus_per_node} {device.name} = {n} ranks; "
        f"global batch "
        f"{req.global_batch} ({req.global_batch / n:g} per rank); {req.steps:,} steps"
    )

    add("")
    add(f"-- Memory per GPU at micro-batch {p.micro_batch}, {precision}, {attention} (GiB) --")
    layout = "bf16 2Ψ + 2Ψ + 12Ψ" if precision == "bf16" else "fp32 4Ψ + 4Ψ + 8Ψ (12Ψ with DeepSpeed ZeRO ≥ 1)"
    add(f"   states = params + grads + optimizer (ZeRO paper §5: {layout}, partitioned by stage over N)")
    add("   activations per layer = s·b·h·34 + 4·a·s·b bytes with fused attention, s·b·h·(34 + 5·a·s/h) eager")
    add("   (Korthikanti et al. 2022 eq. 1); checkpointing keeps 2·s·b·h per layer + one layer")
    targets = [device] if req.gpu == "cpu" else [GPUS[k] for k in REPORT_GPUS]
    if device not in targets:
        targets.append(device)
    header = f"{'stage':>5} {'ckpt':>4} {'params':>7} {'grads':>7} {'optim':>7} {'states':>7} {'activ':>7} {'total':>7}"
    add(header + " | " + " ".join(f"{g.key.upper():>9}" for g in targets))
    for m in p.memory_table:
        cells = [m.states.params, m.states.grads, m.states.optimizer, m.states.total, m.activations, m.total]
        row = f"{m.zero_stage:>5} {'on' if m.grad_checkpointing else 'off':>4} " + " ".join(
            f"{c / GIB:>7.1f}" for c in cells
        )
        add(row + " | " + " ".join(f"{'fits' if m.total <= g.usable_bytes else '-':>9}" for g in targets))
    reserve = "1 GiB (the process's runtime)" if req.gpu == "cpu" else "3 GiB (CUDA context, NCCL, DeepSpeed buckets)"
    add(
        f"   usable = capacity × 0.9 (fragmentation, backward temporaries) − {reserve}: "
        + ", ".join(f"{g.name} {g.usable_bytes / GIB:.1f} of {g.memory_gib:.1f}" for g in targets)
    )

    add("")
    add("-- Recommendation --")
    rec = check.recommendation
    if rec is not None:
        add(f"{rec.describe()} on {device.name} ({_gib(device.usable_bytes)} usable)")
    else:
        add("none: nothing fits")
    if check.setting is not None:
        m = check.setting
        state = "fits" if m.total <= device.usable_bytes else "does NOT fit"
        add(
            f"configured zero_stage={m.zero_stage}, micro_batch={m.micro_batch}, grad_checkpointing="
            f"{'on' if m.grad_checkpointing else 'off'}: {_gib(m.total)} per GPU, {state}"
        )
    add(f"preflight: {'OK' if check.fits else 'REFUSED'}")
    for reason in check.reasons:
        add(f"  - {reason}")
    for note in check.notes:
        add(f"  note: {note}")

    add("")
    add(
        f"-- Communication per GPU per optimizer step ({precision} on the wire, N = {n}, accumulation A = "
        f"{p.grad_accumulation}; ZeRO paper §7) --"
    )
    formulas = {0: "2Ψ (all-reduce)", 1: "2Ψ (reduce-scatter + all-gather)", 2: "Ψ·A + Ψ", 3: "3Ψ·A (1.5 × DDP)"}
    for stage, volume in p.comm.items():
        line = f"stage {stage}: {formulas[stage]:<34} × {wire} B × (N−1)/N = {_bytes(volume):>9}"
        if req.nodes > 1:
            seconds = comm_seconds(
                volume, nodes=req.nodes, gpus_per_node=req.gpus_per_node, net_gbits_per_gpu=req.net_gbits_per_gpu
            )
            line += f", network ≈ {seconds * 1e3:.0f} ms"
        add(line)
    if req.nodes > 1:
        add(
            f"   network ≈ volume / ({req.gpus_per_node} NICs × {req.net_gbits_per_gpu:g} Gb/s) per node "
            "(NCCL rings cross each node once per NIC; NVLink taken as free)"
            + (f"; compute per step ≈ {p.time.step_s * 1e3:.0f} ms" if p.time else "")
        )

    if p.data is not None and p.time is not None:
        d = p.data
        add("")
        add(f"-- Data the loader must sustain at MFU {req.mfu:g} --")
        add(
            f"{d.images_per_s:,.0f} images/s in all, {d.images_per_s_per_node:,.0f} per node -> "
            f"{d.cores_per_node:.1f} CPU cores per node at {req.loader_rate_per_core:g} images/s/core "
            f"(shard read + decode + crop + flip)"
        )
        add(
            f"GCS: {d.bytes_per_s / 1e9:.2f} GB/s at {req.image_bytes / 1e3:.0f} KB per image, "
            f"{d.shards_per_s:.1f} shard reads/s of {req.shard_bytes / 1e6:.0f} MB "
            f"({d.bytes_per_s * 8 / 1e9:.0f} Gb/s: compare with the project's GCS egress bandwidth quota per region)"
        )

    if p.time is not None:
        t = p.time
        peak = GPUS[req.gpu].peak_bf16_flops
        add("")
        add(f"-- Time at MFU {req.mfu:g} of {peak / 1e12:.0f} TFLOP/s bf16 peak --")
        add(
            "step = global_batch × train FLOPs/image / (MFU × peak × GPUs) = "
            f"{req.global_batch} × {f.train_flops_per_image / 1e12:.3f}e12 / ({req.mfu:g} × {peak / 1e12:.0f}e12 × {n})"
            f" = {t.step_s:.3f} s"
        )
        add(
            f"{req.steps:,} steps -> {_duration(t.total_s)} wall-clock, {t.gpu_hours:,.0f} GPU-hours "
            f"({t.gpu_hours / 24:,.0f} GPU-days), {t.train_flops_total:.3g} training FLOPs, "
            f"{t.images_per_s:,.0f} images/s"
        )
        if p.request.grad_checkpointing or (rec is not None and rec.grad_checkpointing):
            add("  note: activation checkpointing recomputes the forward; expect a lower MFU (~3/4) than without")
    if p.paper is not None:
        c = p.paper
        add("")
        add(f"-- ViT paper: ViT-{f.variant} on JFT-300M took {c.paper_core_days / 1000:g}k TPUv3-core-days --")
        add(
            f"= {c.paper_core_days:,.0f} × 86,400 s × 61.5 TFLOP/s (123 per chip / 2 cores) = "
            f"{c.paper_peak_flops:.3g} peak FLOPs = {c.paper_equivalent_gpu_days:,.0f} {GPUS[req.gpu].name}-days "
            "at the same utilisation"
        )
        add(
            f"this plan: {p.time.gpu_hours / 24:,.0f} GPU-days = {c.plan_equivalent_core_days / 1000:.2f}k "
            "TPUv3-core-days of equal peak FLOPs; "
            f"if the paper ran this schedule, its MFU was {c.implied_paper_mfu:.2f}"
        )
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------------------------
# From a pretraining config
# ---------------------------------------------------------------------------------------------------------------------


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
    otherwise it is left to the planner. `steps` and `num_classes` come from `make_plan` or the caller (the config
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
