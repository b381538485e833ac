"""Memory formulas: model states per GPU by ZeRO stage, activations per micro-batch, and the model facts they use.

* Model states, ZeRO stages 0-3: Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion
  Parameter Models", §3.1 and §5 (Figure 1) — ``model_state_bytes``.
* Activations per transformer layer: Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
  Transformer Models", §4.1 (eq. 1), adjusted for fused (flash / memory-efficient) attention —
  ``activation_bytes_per_layer`` and ``activation_bytes``.
"""

from dataclasses import dataclass
from typing import Literal

import model
from model.variants import resolution_problem
from pipeline.planner.hardware import GIB

Precision = Literal["bf16", "fp32"]
ZERO_STAGES = (0, 1, 2, 3)


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
        problem = resolution_problem(img_size, shape)
        if problem:
            raise ValueError(problem)
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


def format_gib(x: float) -> str:
    return f"{x / GIB:.1f} GiB"
