"""Analytic parameter and FLOP counts (no model needed, so they work for H/14 on a laptop).

FLOPs are 2 x multiply-accumulates of the matrix products; LayerNorm, softmax, GELU and residual adds
are left out (together well under 1 % for the paper's models), as in the usual ViT FLOP tables.

``flops()`` counts the standard forward pass (every token through every block), the number published FLOP
tables and MFU comparisons use. Our ``VisionTransformer.forward`` with class-token pooling runs only the class
token through the last block's attention output, MLP and head (same logits); ``cls_only_last_block=True`` counts
that executed work, about 1/depth less. MFU quoted from ``flops()`` therefore credits the skipped work: it is
model-FLOPs utilisation in the usual sense, slightly above what the hardware executed.
"""

from model.variants import grid_problem, parse_variant


def _num_prefix_tokens(pool: str) -> int:
    if pool not in ("token", "gap"):
        raise ValueError(f"pool={pool!r} is not supported: use 'token' or 'gap'.")
    return 1 if pool == "token" else 0


def _grid(patch_size: int, img_size: int) -> int:
    if problem := grid_problem(img_size, patch_size):
        raise ValueError(problem)
    return (img_size // patch_size) ** 2


def param_count(
    variant: str,
    *,
    num_classes: int,
    img_size: int = 224,
    pool: str = "token",
    representation_size: int | None = None,
    in_chans: int = 3,
) -> int:
    """Number of parameters of `create_vit(variant, ...)` with the same options."""
    s = parse_variant(variant)
    D, M, P = s.width, s.mlp_dim, s.patch_size
    prefix = _num_prefix_tokens(pool)
    n = P * P * in_chans * D + D  # patch embedding conv
    n += prefix * D  # class token
    n += (prefix + _grid(P, img_size)) * D  # position embeddings
    per_block = (
        2 * (2 * D)  # two LayerNorms
        + (D * 3 * D + 3 * D)  # qkv
        + (D * D + D)  # attention output projection
        + (D * M + M)
        + (M * D + D)  # MLP
    )
    n += s.depth * per_block
    n += 2 * D  # final LayerNorm
    features = D
    if representation_size:
        n += D * representation_size + representation_size
        features = representation_size
    if num_classes:
        n += features * num_classes + num_classes
    return n


def flops(
    variant: str,
    img_size: int,
    *,
    num_classes: int = 1000,
    pool: str = "token",
    representation_size: int | None = None,
    in_chans: int = 3,
    cls_only_last_block: bool = False,
) -> int:
    """Forward FLOPs (2 x MACs) for one image; ``cls_only_last_block`` counts what ``forward`` executes."""
    s = parse_variant(variant)
    D, M, P = s.width, s.mlp_dim, s.patch_size
    N = _grid(P, img_size)
    T = N + _num_prefix_tokens(pool)

    def block_macs(queries: int) -> int:
        return (
            T * D * 3 * D  # qkv projection (keys and values of every token are needed)
            + queries * T * D  # attention scores q @ k^T, summed over heads
            + queries * T * D  # attention-weighted sum of values
            + queries * D * D  # output projection
            + 2 * queries * D * M  # MLP
        )

    macs = N * (P * P * in_chans) * D  # patch embedding
    last_queries = 1 if cls_only_last_block and pool == "token" else T
    macs += (s.depth - 1) * block_macs(T) + block_macs(last_queries)
    features = D
    if representation_size:
        macs += D * representation_size
        features = representation_size
    macs += features * num_classes
    return 2 * macs


def train_flops_per_image(
    variant: str,
    img_size: int,
    *,
    num_classes: int = 1000,
    pool: str = "token",
    representation_size: int | None = None,
    in_chans: int = 3,
) -> int:
    """Training FLOPs per image: forward + backward ~= 3 x forward (for MFU)."""
    return 3 * flops(
        variant,
        img_size,
        num_classes=num_classes,
        pool=pool,
        representation_size=representation_size,
        in_chans=in_chans,
    )
