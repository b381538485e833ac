"""2-D resampling of learned position embeddings ("high-res fine-tuning", ViT paper section 3.2)."""

import math

import torch
import torch.nn.functional as F

RESAMPLE_MODES = ("bilinear", "bicubic")


def resample_pos_embed(
    pos_embed: torch.Tensor,
    new_grid: int | tuple[int, int],
    *,
    num_prefix_tokens: int = 1,
    mode: str = "bilinear",
    old_grid: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Resize the patch-grid part of a [1, prefix + h*w, D] position embedding to a new grid.

    The prefix (class token) embeddings are kept as they are. `old_grid` defaults to a square grid.

    mode="bilinear" reproduces the official JAX code (`scipy.ndimage.zoom(order=1)`, which maps the
    corner patches onto each other, i.e. `align_corners=True`). mode="bicubic" reproduces timm
    (`F.interpolate(mode="bicubic", antialias=True)`, pixel-centre aligned).
    """
    if mode not in RESAMPLE_MODES:
        raise ValueError(f"Unknown resample mode {mode!r}: use one of {RESAMPLE_MODES}.")
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"Expected a position embedding of shape [1, tokens, dim], got {tuple(pos_embed.shape)}.")
    new_h, new_w = (new_grid, new_grid) if isinstance(new_grid, int) else new_grid
    num_grid = pos_embed.shape[1] - num_prefix_tokens
    if old_grid is None:
        side = math.isqrt(num_grid)
        if side * side != num_grid:
            raise ValueError(
                f"Position embedding has {num_grid} grid tokens after {num_prefix_tokens} prefix token(s), "
                "which is not a square grid: pass old_grid=(h, w) or check num_prefix_tokens."
            )
        old_grid = (side, side)
    if old_grid[0] * old_grid[1] != num_grid:
        raise ValueError(f"old_grid {old_grid} does not hold the {num_grid} grid tokens of the embedding.")
    if tuple(old_grid) == (new_h, new_w):
        return pos_embed

    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    dim = grid.shape[-1]
    # interpolate works on [N, C, H, W]; do it in float32 so bf16 checkpoints resample accurately
    grid = grid.float().reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2)
    if mode == "bilinear":
        grid = F.interpolate(grid, size=(new_h, new_w), mode="bilinear", align_corners=True)
    else:
        grid = F.interpolate(grid, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_h * new_w, dim).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)
