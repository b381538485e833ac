"""Vision Transformer (Dosovitskiy et al. 2020, "An Image is Worth 16x16 Words").

Pre-norm encoder blocks, learned 1-D position embeddings, class token or global average pooling,
optional tanh representation ("pre-logits") layer. Parameter names follow the common PyTorch ViT
layout (patch_embed.proj, blocks.{i}.attn.qkv, ...) so timm and official JAX weights map 1:1.

Shapes in comments: B batch, C channels, T tokens (prefix + patches), N patches, D width, H heads.
"""

import contextlib
import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from model.pos_embed import resample_pos_embed
from model.variants import grid_problem, parse_variant

POOLS = ("token", "gap")
LN_EPS = 1e-6  # the JAX/Flax LayerNorm default, which the released weights were trained with


@dataclass(frozen=True)
class ViTSpec:
    """Everything needed to rebuild a model's architecture (e.g. from a JSON file next to a checkpoint)."""

    variant: str
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    patch_size: int
    img_size: int = 224
    num_classes: int = 1000
    pool: str = "token"
    representation_size: int | None = None
    dropout: float = 0.0
    attn_dropout: float = 0.0
    in_chans: int = 3

    def __post_init__(self) -> None:
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}.")
        if problem := grid_problem(self.img_size, self.patch_size):
            raise ValueError(problem)
        if self.pool not in POOLS:
            raise ValueError(f"pool={self.pool!r} is not supported: use one of {POOLS}.")
        if self.num_classes < 0:
            raise ValueError(f"num_classes={self.num_classes} must be >= 0 (0 means no head).")
        if self.representation_size is not None and self.representation_size < 1:
            raise ValueError("representation_size must be a positive int, or None for no pre-logits layer.")
        for name in ("dropout", "attn_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name}={getattr(self, name)} must be in [0, 1).")

    @classmethod
    def from_variant(cls, variant: str, **kwargs: Any) -> "ViTSpec":
        shape = parse_variant(variant)
        return cls(
            variant=shape.name,
            width=shape.width,
            depth=shape.depth,
            num_heads=shape.num_heads,
            mlp_dim=shape.mlp_dim,
            patch_size=shape.patch_size,
            **kwargs,
        )

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def num_prefix_tokens(self) -> int:
        return 1 if self.pool == "token" else 0

    @property
    def seq_len(self) -> int:
        return self.num_prefix_tokens + self.num_patches

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def num_features(self) -> int:
        """Size of the pooled features the head sees (after the representation layer, if any)."""
        return self.representation_size or self.width

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ViTSpec":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown ViTSpec field(s) {unknown}; known fields are {sorted(known)}.")
        return cls(**data)


class PatchEmbed(nn.Module):
    """Non-overlapping P x P patches, each linearly projected to D (a strided conv does both at once)."""

    def __init__(self, in_chans: int, width: int, patch_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, width, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # [B, D, H/P, W/P]
        return x.flatten(2).transpose(1, 2)  # [B, N, D], patches in row-major order as in the JAX code


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection."""

    def __init__(self, width: int, num_heads: int, attn_dropout: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = width // num_heads
        self.attn_dropout = attn_dropout
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, cls_only: bool = False) -> torch.Tensor:
        """[B, T, D] -> [B, T, D], or [B, 1, D] with only the first token as query when cls_only."""
        B, T, D = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each [B, H, T, D/H]
        if cls_only:
            q = q[:, :, :1]
        dropout_p = self.attn_dropout if self.training else 0.0
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)  # [B, H, T or 1, D/H]
        x = x.transpose(1, 2).reshape(B, -1, D)
        return self.proj(x)

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, D] -> the softmax attention weights [B, H, T, T] that forward() applies (rows sum to 1).

        forward() uses the fused kernel, which never materialises these; this recomputes them from q and k for
        analysis only (attention dropout, a training-time effect, is left out).
        """
        B, T, D = x.shape
        qk = self.qkv(x)[..., : 2 * D].view(B, T, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = qk.unbind(0)  # each [B, H, T, D/H]
        # the fused kernel's default scale, 1 / sqrt(head dim)
        return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(self.head_dim), dim=-1)


class Mlp(nn.Module):
    def __init__(self, width: int, mlp_dim: int, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, width)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # exact (erf) GELU, as jax.nn.gelu(approximate=False) in the released models
        return self.fc2(self.drop(F.gelu(self.fc1(x))))


class Block(nn.Module):
    """Pre-norm encoder block: x + Attn(LN(x)), then x + MLP(LN(x)); dropout after each branch."""

    def __init__(self, width: int, num_heads: int, mlp_dim: int, dropout: float, attn_dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=LN_EPS)
        self.attn = Attention(width, num_heads, attn_dropout)
        self.norm2 = nn.LayerNorm(width, eps=LN_EPS)
        self.mlp = Mlp(width, mlp_dim, dropout)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, cls_only: bool = False) -> torch.Tensor:
        # cls_only: a class-token classifier reads nothing else from the last block, so only the class
        # token attends and goes through the MLP there (same logits, about 1/depth less compute).
        residual = x[:, :1] if cls_only else x
        x = residual + self.drop(self.attn(self.norm1(x), cls_only))
        return x + self.drop(self.mlp(self.norm2(x)))


def _lecun_normal_(weight: torch.Tensor) -> None:
    # Flax's default kernel init (used for the patch embedding and pre-logits in the JAX code):
    # normal truncated at 2 std, rescaled so that the variance is still 1 / fan_in.
    fan_in = weight[0].numel()
    std = math.sqrt(1.0 / fan_in) / 0.87962566103423978
    nn.init.trunc_normal_(weight, std=std, a=-2 * std, b=2 * std)


class VisionTransformer(nn.Module):
    """ViT classifier; build it with `create_vit("B/16", num_classes=...)` or `VisionTransformer(spec)`."""

    def __init__(
        self,
        spec: ViTSpec,
        *,
        head_zero_init: bool = True,
        head_bias_init: float = 0.0,
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.spec = spec
        D = spec.width
        self.patch_embed = PatchEmbed(spec.in_chans, D, spec.patch_size)
        # The class token gets its own position-embedding slot, as in the paper's released weights.
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D)) if spec.pool == "token" else None
        self.pos_embed = nn.Parameter(torch.zeros(1, spec.seq_len, D))
        self.pos_drop = nn.Dropout(spec.dropout)
        self.blocks = nn.ModuleList(
            Block(D, spec.num_heads, spec.mlp_dim, spec.dropout, spec.attn_dropout) for _ in range(spec.depth)
        )
        self.norm = nn.LayerNorm(D, eps=LN_EPS)
        self.representation = nn.Linear(D, spec.representation_size) if spec.representation_size else None
        self.head = nn.Linear(spec.num_features, spec.num_classes) if spec.num_classes else None
        self.grad_checkpointing = grad_checkpointing
        self.init_weights(head_zero_init=head_zero_init, head_bias_init=head_bias_init)

    @property
    def num_features(self) -> int:
        """Size of `pre_logits()` features (the head's input)."""
        return self.spec.num_features

    @torch.no_grad()
    def init_weights(self, *, head_zero_init: bool = True, head_bias_init: float = 0.0) -> None:
        """Initialise as the JAX reference: xavier-uniform dense layers, lecun-normal stem, zero head."""
        _lecun_normal_(self.patch_embed.proj.weight)
        nn.init.zeros_(self.patch_embed.proj.bias)
        if self.cls_token is not None:
            nn.init.zeros_(self.cls_token)
        nn.init.normal_(self.pos_embed, std=0.02)  # "from BERT", as the original JAX code
        for block in self.blocks:
            # q, k and v are separate (D, D) kernels in the reference, so xavier bounds use D -> D,
            # not D -> 3D as the fused matrix would suggest.
            for w in block.attn.qkv.weight.chunk(3, dim=0):
                nn.init.xavier_uniform_(w)
            nn.init.zeros_(block.attn.qkv.bias)
            nn.init.xavier_uniform_(block.attn.proj.weight)
            nn.init.zeros_(block.attn.proj.bias)
            for fc in (block.mlp.fc1, block.mlp.fc2):
                nn.init.xavier_uniform_(fc.weight)
                nn.init.normal_(fc.bias, std=1e-6)
            for norm in (block.norm1, block.norm2):
                nn.init.ones_(norm.weight)
                nn.init.zeros_(norm.bias)
        nn.init.ones_(self.norm.weight)
        nn.init.zeros_(self.norm.bias)
        if self.representation is not None:
            _lecun_normal_(self.representation.weight)
            nn.init.zeros_(self.representation.bias)
        if self.head is not None:
            self._init_head(self.head, zero_init=head_zero_init, bias_init=head_bias_init)

    @staticmethod
    @torch.no_grad()
    def _init_head(head: nn.Linear, *, zero_init: bool, bias_init: float) -> None:
        if zero_init:
            nn.init.zeros_(head.weight)
        else:
            _lecun_normal_(head.weight)
        nn.init.constant_(head.bias, bias_init)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, C, H, W] -> tokens after the final LayerNorm [B, T, D] (class token first, if any)."""
        return self.norm(self._encode(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens [B, T, D] -> pool -> representation (tanh) -> logits [B, classes] (or features)."""
        x = x[:, 0] if self.spec.pool == "token" else x.mean(dim=1)
        if self.representation is not None:
            x = torch.tanh(self.representation(x))
        if pre_logits or self.head is None:
            return x
        return self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> logits; equals forward_head(forward_features(x)), computed with less work."""
        return self.forward_head(self._pooled_tokens(x))

    def pre_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> pooled features [B, num_features] (what few-shot linear evaluation fits on)."""
        return self.forward_head(self._pooled_tokens(x), pre_logits=True)

    def _pooled_tokens(self, x: torch.Tensor) -> torch.Tensor:
        # With class-token pooling only the class token of the last block is read: [B, 1, D].
        if self.spec.pool == "token":
            return self.norm(self._encode(x, last_cls_only=True))
        return self.forward_features(x)

    @torch.no_grad()
    def attention_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Images [B, C, H, W] -> one attention-weight tensor [B, H, T, T] per block, first block first.

        For analysis (attention distance, rollout): every block runs on all tokens, the last one included, and
        each block's weights are recomputed from its q and k; forward() stays on the fused kernel.
        """
        x = self._embed(x)
        maps = []
        for block in self.blocks:
            maps.append(block.attn.probabilities(block.norm1(x)))
            x = block(x)
        return maps

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, C, H, W] -> tokens with position embeddings [B, T, D], the input of the first block."""
        size = self.spec.img_size
        if x.shape[-2:] != (size, size):
            raise ValueError(
                f"Expected {size}x{size} images, got {tuple(x.shape[-2:])}: resize the input, or call "
                "set_img_size() to resample the position embeddings for the new resolution."
            )
        x = self.patch_embed(x)  # [B, N, D]
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # [B, T, D]
        return self.pos_drop(x + self.pos_embed)

    def _encode(self, x: torch.Tensor, last_cls_only: bool = False) -> torch.Tensor:
        x = self._embed(x)
        use_checkpoint = self.grad_checkpointing and torch.is_grad_enabled()
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            cls_only = last_cls_only and i == last
            # Checkpointing recomputes each block in backward: ~1/3 more compute, far less activation memory.
            x = checkpoint(block, x, cls_only, use_reentrant=False) if use_checkpoint else block(x, cls_only)
        return x

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        self.grad_checkpointing = enabled

    def reset_head(self, num_classes: int, *, zero_init: bool = True, bias_init: float = 0.0) -> None:
        """Replace the classifier with a fresh one (zero-initialised as in the paper's fine-tuning).

        Build the optimizer after this call: the old head's parameters are gone.
        """
        self.spec = replace(self.spec, num_classes=num_classes)
        if num_classes == 0:
            self.head = None
            return
        ref = self.pos_embed
        self.head = nn.Linear(self.num_features, num_classes, device=ref.device, dtype=ref.dtype)
        self._init_head(self.head, zero_init=zero_init, bias_init=bias_init)

    def drop_representation(self) -> None:
        """Remove the pre-logits layer (the paper does so before fine-tuning).

        The head is kept when its input size still fits (representation_size == width); otherwise it
        is replaced by a zero-initialised head with the same number of classes.
        """
        if self.representation is None:
            return
        self.representation = None
        self.spec = replace(self.spec, representation_size=None)
        if self.head is not None and self.head.in_features != self.num_features:
            self.reset_head(self.spec.num_classes)

    @torch.no_grad()
    def set_img_size(self, img_size: int, *, mode: str = "bilinear") -> None:
        """Switch to a new input resolution by 2-D interpolation of the position embeddings.

        Build the optimizer after this call: the position embedding becomes a new Parameter.
        """
        new_spec = replace(self.spec, img_size=img_size)  # validates divisibility by the patch size
        if new_spec.grid_size != self.spec.grid_size:
            resampled = resample_pos_embed(
                self.pos_embed.detach(),
                new_spec.grid_size,
                num_prefix_tokens=self.spec.num_prefix_tokens,
                mode=mode,
            )
            self.pos_embed = nn.Parameter(resampled, requires_grad=self.pos_embed.requires_grad)
        self.spec = new_spec


def create_vit(
    variant: str,
    *,
    num_classes: int,
    img_size: int = 224,
    pool: str = "token",
    representation_size: int | None = None,
    dropout: float = 0.0,
    attn_dropout: float = 0.0,
    head_zero_init: bool = True,
    head_bias_init: float = 0.0,
    grad_checkpointing: bool = False,
    in_chans: int = 3,
    device: torch.device | str | None = None,
) -> VisionTransformer:
    """Build a ViT by variant name ("Ti/16", "B/16", "L/16", "H/14", "Mi/4", ...).

    Args:
        num_classes: classifier outputs; 0 builds no head (forward returns pooled features).
        img_size: square input resolution; must be a multiple of the patch size.
        pool: "token" (class token, as the paper) or "gap" (mean of the patch tokens, no class token).
        representation_size: size of the tanh pre-logits layer used in pretraining, or None.
        dropout: after the position embedding, inside the MLP and after each residual branch.
        attn_dropout: on the attention probabilities.
        head_zero_init / head_bias_init: the head's kernel is zero and its bias constant by default.
        grad_checkpointing: recompute each block in backward to save activation memory.
        device: where parameters are created; "meta" builds a shape-only model without memory.
    """
    spec = ViTSpec.from_variant(
        variant,
        img_size=img_size,
        num_classes=num_classes,
        pool=pool,
        representation_size=representation_size,
        dropout=dropout,
        attn_dropout=attn_dropout,
        in_chans=in_chans,
    )
    with torch.device(device) if device is not None else contextlib.nullcontext():
        return VisionTransformer(
            spec,
            head_zero_init=head_zero_init,
            head_bias_init=head_bias_init,
            grad_checkpointing=grad_checkpointing,
        )
