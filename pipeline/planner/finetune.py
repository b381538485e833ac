"""Memory of a fine-tuning (transfer) run on one GPU, and the largest micro-batch that fits it.

Fine-tuning (``pipeline.transfer``) is plain PyTorch on one GPU: no ZeRO, no DeepSpeed. The model keeps fp32
weights and runs forward under bf16 autocast; SGD with momentum 0.9 updates it (the paper's Table 4), and
micro-batches accumulate their gradients into the recipe's batch (512). Per parameter that is

    weights 4 B (fp32) + gradients 4 B (fp32) + momentum buffer 4 B + autocast's bf16 weight copies 2 B = 14 B.

Autocast casts each weight to bf16 once per forward and keeps the copy until the autocast region ends (the
linear layers also save it for backward), so the copies are counted whole, with or without checkpointing.

Activations follow ``memory.activation_bytes_per_layer`` (Korthikanti et al. 2022, fused attention) with one
difference autocast makes: the residual stream stays fp32 (the fp32 position embedding is added to the bf16 patch
tokens, and every block adds its bf16 branch to it), so the two LayerNorm inputs each block saves are 4 bytes per
value, not 2: s·b·h·(34 + 4) + 4·a·s·b bytes per layer for an MLP of 4h. Checkpointing (``create_vit(
grad_checkpointing=True)``) keeps each block's fp32 input, 4·s·b·h, plus one block rebuilt at a time in backward.

``plan_transfer_memory(variant, resolution, batch, device)`` chooses the largest micro-batch dividing the batch
that fits, with checkpointing only if nothing fits without it, and raises ``PlanError`` naming the fix otherwise.
"""

from dataclasses import dataclass

import model
from pipeline.planner.fit import PlanError, divisors_desc
from pipeline.planner.hardware import GIB, GPUS, GpuSpec, detect_gpu
from pipeline.planner.memory import ModelFacts, activation_bytes_per_layer, format_gib

# The paper's fine-tuning recipe (Table 4): batch 512, SGD momentum 0.9.
FINETUNE_BATCH = 512
FINETUNE_MOMENTUM = 0.9


class DoesNotFitError(PlanError):
    """No micro-batch of the fine-tuning batch fits the GPU (as opposed to an invalid input)."""


@dataclass(frozen=True)
class FinetuneMemory:
    """Bytes one fine-tuning GPU holds at one micro-batch size."""

    micro_batch: int
    grad_checkpointing: bool
    weights: float  # fp32, 4Ψ
    grads: float  # fp32, 4Ψ
    optimizer: float  # SGD momentum buffer, 4Ψ (none at momentum 0)
    weight_copies: float  # bf16 copies autocast makes for the forward, 2Ψ
    activations: float

    @property
    def states(self) -> float:
        return self.weights + self.grads + self.optimizer + self.weight_copies

    @property
    def total(self) -> float:
        return self.states + self.activations


def finetune_activation_bytes_per_layer(facts: ModelFacts, micro_batch: int) -> float:
    """Bytes one encoder block keeps for backward under bf16 autocast: the bf16 formula of
    ``activation_bytes_per_layer`` plus 2 more bytes for each of the two fp32 LayerNorm inputs (4·s·b·h)."""
    s, b, h = facts.seq_len, micro_batch, facts.width
    bf16 = activation_bytes_per_layer(
        seq_len=s, micro_batch=b, width=h, heads=facts.heads, mlp_dim=facts.mlp_dim, flash_attention=True
    )
    return bf16 + 2 * 2.0 * s * b * h


def finetune_activation_bytes(facts: ModelFacts, micro_batch: int, *, grad_checkpointing: bool) -> float:
    """Activation bytes of a ViT fine-tuned under bf16 autocast at one micro-batch (see the module docstring).

    Blocks: depth × ``finetune_activation_bytes_per_layer``, or with checkpointing each block's fp32 input
    (4·s·b·h) plus one block rebuilt in backward. Outside the blocks: the batch on the GPU as uint8, its fp32
    normalised copy and the bf16 copy the patch projection saves (7·b·3·H·W), three fp32 token tensors (patch
    tokens, their sum with the position embedding, the final LayerNorm input: 3 × 4·s·b·h) and the fp32 logits
    with their gradient (8·b·classes).
    """
    per_layer = finetune_activation_bytes_per_layer(facts, micro_batch)
    residual = 4.0 * facts.seq_len * micro_batch * facts.width  # one fp32 token tensor [b, s, h]
    blocks = facts.depth * residual + per_layer if grad_checkpointing else facts.depth * per_layer
    outside = 7.0 * micro_batch * 3 * facts.img_size**2 + 3 * residual + 8.0 * micro_batch * facts.num_classes
    return blocks + outside


def estimate_finetune_memory(
    facts: ModelFacts, micro_batch: int, *, grad_checkpointing: bool, momentum: float = FINETUNE_MOMENTUM
) -> FinetuneMemory:
    psi = float(facts.params)
    return FinetuneMemory(
        micro_batch=micro_batch,
        grad_checkpointing=grad_checkpointing,
        weights=4.0 * psi,
        grads=4.0 * psi,
        optimizer=4.0 * psi if momentum else 0.0,
        weight_copies=2.0 * psi,
        activations=finetune_activation_bytes(facts, micro_batch, grad_checkpointing=grad_checkpointing),
    )


@dataclass(frozen=True)
class TransferMemoryPlan:
    """The chosen fine-tuning setting for one model, resolution, batch and GPU, and the table it was chosen from."""

    facts: ModelFacts
    batch: int
    device: GpuSpec
    micro_batch: int
    grad_checkpointing: bool
    memory: FinetuneMemory  # at the chosen setting
    table: list[FinetuneMemory]  # every divisor of the batch, largest first, checkpointing off then on

    @property
    def grad_accumulation(self) -> int:
        return self.batch // self.micro_batch

    def fits(self, m: FinetuneMemory) -> bool:
        return m.total <= self.device.usable_bytes


def resolve_device(device: str | GpuSpec) -> GpuSpec:
    """A GpuSpec from a key of GPUS ("h100"), a `torch.cuda.get_device_name()` string, or a GpuSpec."""
    if isinstance(device, GpuSpec):
        return device
    spec = GPUS.get(device) or detect_gpu(device)
    if spec is None:
        raise PlanError(f"device {device!r} is unknown: use one of {sorted(GPUS)} or a CUDA device name")
    return spec


def plan_transfer_memory(
    variant: str,
    resolution: int,
    batch: int = FINETUNE_BATCH,
    device: str | GpuSpec = "h100",
    *,
    num_classes: int = 1000,
    grad_checkpointing: bool | None = None,
    momentum: float = FINETUNE_MOMENTUM,
    pool: str = "token",
) -> TransferMemoryPlan:
    """The largest micro-batch (a divisor of `batch`) whose fine-tuning memory fits one `device`.

    `grad_checkpointing`: None lets the planner turn it on only if no micro-batch fits without it; True plans
    with it; False forbids it. The representation layer is dropped for fine-tuning (as the paper does), so the
    head reads the width directly. Raises DoesNotFitError (a PlanError) naming the fix when nothing fits, and
    PlanError for an invalid input.
    """
    spec = resolve_device(device)
    if batch < 1:
        raise PlanError(f"batch must be >= 1, got {batch}")
    if problem := model.resolution_problem(resolution, variant, field="resolution"):
        raise PlanError(problem)
    facts = ModelFacts.build(variant, img_size=resolution, num_classes=num_classes, pool=pool)
    micros = divisors_desc(batch)
    table = [
        estimate_finetune_memory(facts, m, grad_checkpointing=ckpt, momentum=momentum)
        for m in micros
        for ckpt in (False, True)
    ]
    usable = spec.usable_bytes
    allowed = [grad_checkpointing] if grad_checkpointing is not None else [False, True]
    for ckpt in allowed:
        chosen = next((m for m in table if m.grad_checkpointing == ckpt and m.total <= usable), None)
        if chosen is not None:
            return TransferMemoryPlan(facts, batch, spec, chosen.micro_batch, ckpt, chosen, table)
    raise DoesNotFitError(_unfit_reason(facts, spec, table, grad_checkpointing, momentum))


def _unfit_reason(
    facts: ModelFacts, spec: GpuSpec, table: list[FinetuneMemory], ckpt: bool | None, momentum: float
) -> str:
    what = f"fine-tuning ViT-{facts.variant} at {facts.img_size} px"
    smallest = {m.grad_checkpointing: m for m in table if m.micro_batch == 1}
    if ckpt is False and smallest[True].total <= spec.usable_bytes:
        fits_with = next(m for m in table if m.grad_checkpointing and m.total <= spec.usable_bytes)
        return (
            f"{what} does not fit on {spec.name} ({format_gib(spec.usable_bytes)} usable) without activation "
            f"checkpointing, even at micro-batch 1 ({format_gib(smallest[False].total)}): turn it on "
            f"(grad_checkpointing=True fits micro-batch {fits_with.micro_batch})"
        )
    bigger = [
        g.key
        for g in GPUS.values()
        if g.memory_gib > spec.memory_gib
        and estimate_finetune_memory(facts, 1, grad_checkpointing=True, momentum=momentum).total <= g.usable_bytes
    ]
    gpus = f"a GPU with more memory ({', '.join(bigger)})" if bigger else "a GPU with more memory"
    return (
        f"{what} does not fit on {spec.name} even at micro-batch 1 with activation checkpointing "
        f"({format_gib(smallest[True].total)} needed, {format_gib(spec.usable_bytes)} usable): use {gpus} or a "
        "lower resolution"
    )


def format_transfer_memory(plans: list[TransferMemoryPlan]) -> str:
    """The tables `jobs/plan.py --transfer` prints, one per resolution: memory per micro-batch size, activation
    checkpointing off and on, and the chosen setting."""
    out: list[str] = []
    add = out.append
    first = plans[0]
    f, spec = first.facts, first.device
    add(
        f"== Fine-tuning memory: ViT-{f.variant}, batch {first.batch}, {f.num_classes} classes, one {spec.name} "
        f"({format_gib(spec.usable_bytes)} usable) =="
    )
    add("states: fp32 weights 4Ψ + fp32 grads 4Ψ + SGD momentum 4Ψ + bf16 autocast copies 2Ψ (plain PyTorch, no ZeRO)")
    add(
        "activations per layer = s·b·h·38 + 4·a·s·b bytes (Korthikanti et al. 2022 eq. 1, fused attention, fp32 "
        "LayerNorm inputs under autocast); checkpointing keeps 4·s·b·h per layer + one layer"
    )
    for p in plans:
        add("")
        add(
            f"-- {p.facts.img_size} px ({p.facts.seq_len} tokens): Ψ = {p.facts.params / 1e6:.1f} M, states "
            f"{format_gib(p.memory.states)}; memory per GPU (GiB) --"
        )
        add(f"{'micro':>5} {'accum':>5} | {'checkpointing off':^20} | {'checkpointing on':^20}")
        add(f"{'':>5} {'':>5} | {'activ':>7} {'total':>7} {'':>4} | {'activ':>7} {'total':>7} {'':>4}")
        by_micro: dict[int, dict[bool, FinetuneMemory]] = {}
        for m in p.table:
            by_micro.setdefault(m.micro_batch, {})[m.grad_checkpointing] = m
        for micro, pair in by_micro.items():
            cells = [
                f"{m.activations / GIB:>7.1f} {m.total / GIB:>7.1f} {'fits' if p.fits(m) else '-':>4}"
                for m in (pair[False], pair[True])
            ]
            add(f"{micro:>5} {p.batch // micro:>5} | " + " | ".join(cells))
        add(
            f"chosen: micro_batch={p.micro_batch}, grad_accumulation={p.grad_accumulation}, grad_checkpointing="
            f"{'on' if p.grad_checkpointing else 'off'} ({format_gib(p.memory.total)} per GPU)"
        )
    return "\n".join(out)
