"""The quantities behind the ViT paper's section 4.5 ("Inspecting Vision Transformer"), as plain tensor functions.

- `embedding_components`: principal components of the patch-embedding filters (Figure 7 left);
- `position_similarity`: cosine similarity of every patch's position embedding to every other's (Figure 7 centre);
- `mean_attention_distance`: per head, the pixel distance between query and key patches weighted by attention
  (Figure 7 right);
- `attention_rollout`: Abnar & Zuidema (2020), the attention flow from the input tokens to each token (Figure 6).

Every function takes tensors, so each can be checked on constructed inputs with a known answer.
Tokens are laid out as the model's: ``num_prefix`` class tokens first, then the patches in row-major order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Components:
    """Principal components of the patch-embedding filters, strongest first."""

    patches: torch.Tensor  # [K, C, P, P]: each component as a filter (unit norm, sign arbitrary)
    explained: torch.Tensor  # [K]: the fraction of the filters' variance each component explains


def embedding_components(weight: torch.Tensor, count: int) -> Components:
    """The first ``count`` principal components of the D patch-embedding filters ``weight`` [D, C, P, P].

    Each filter is one sample in C*P*P dimensions; the mean filter is removed first, as in PCA.
    """
    if weight.ndim != 4:
        raise ValueError(f"expected patch-embedding weights [D, C, P, P], got shape {tuple(weight.shape)}")
    filters = weight.detach().double().flatten(1)  # [D, C*P*P]
    centred = filters - filters.mean(dim=0, keepdim=True)
    _, singular, basis = torch.linalg.svd(centred, full_matrices=False)  # basis: [min(D, CPP), CPP]
    variance = singular**2
    count = min(count, basis.shape[0])
    explained = variance[:count] / variance.sum().clamp_min(1e-30)
    return Components(basis[:count].reshape(count, *weight.shape[1:]).float(), explained.float())


def position_similarity(pos_embed: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """Cosine similarity of the patches' position embeddings: [g, g, g, g], where [r, c] is the g x g map of
    patch (r, c)'s similarity to every patch (the layout of the paper's Figure 7 centre).

    ``pos_embed`` is [1, T, D] or [T, D]; the first ``num_prefix`` rows (the class token's slot) are left out.
    """
    table = pos_embed.detach().reshape(-1, pos_embed.shape[-1])[num_prefix:].double()  # [N, D]
    grid = _grid_side(table.shape[0])
    unit = table / table.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return (unit @ unit.T).reshape(grid, grid, grid, grid).float()


def patch_distances(grid: int, patch_size: int) -> torch.Tensor:
    """[N, N] Euclidean distances in pixels between the centres of the patches of a ``grid`` x ``grid`` image."""
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    centres = torch.stack([rows.flatten(), cols.flatten()], dim=-1).double() * patch_size  # [N, 2]
    return torch.cdist(centres, centres)


def mean_attention_distance(maps: list[torch.Tensor], num_prefix: int, patch_size: int) -> torch.Tensor:
    """[layers, heads]: per head, the attention-weighted pixel distance from each query patch to the key patches,
    averaged over images and query patches.

    ``maps`` holds one attention tensor [B, H, T, T] per layer (rows sum to 1). The class token has no position
    in the image: it is left out as a query, and each patch's weights over the other patches are renormalised to
    sum to 1, so the result is a distance in the image whatever share of attention went to the class token.
    """
    out = []
    distances = None
    for attn in maps:
        patches = attn.detach().double()[:, :, num_prefix:, num_prefix:]  # [B, H, N, N]
        if distances is None:
            distances = patch_distances(_grid_side(patches.shape[-1]), patch_size)
        weights = patches / patches.sum(dim=-1, keepdim=True).clamp_min(1e-30)
        per_query = (weights * distances).sum(dim=-1)  # [B, H, N]
        out.append(per_query.mean(dim=(0, 2)))
    return torch.stack(out).float()


def attention_rollout(maps: list[torch.Tensor]) -> torch.Tensor:
    """[B, T, T] attention rollout (Abnar & Zuidema 2020): how much of each input token reaches each token.

    Per layer: average the heads, add the identity for the residual connection and renormalise the rows
    (0.5 A + 0.5 I), then multiply through the layers: R = A_L ... A_2 A_1. Row t of R is a distribution over
    the input tokens (row-stochastic matrices stay row-stochastic under products).
    """
    rollout = None
    for attn in maps:
        mixed = attn.detach().double().mean(dim=1)  # [B, T, T]
        eye = torch.eye(mixed.shape[-1], dtype=mixed.dtype)
        mixed = mixed + eye
        mixed = mixed / mixed.sum(dim=-1, keepdim=True)
        rollout = mixed if rollout is None else mixed @ rollout
    if rollout is None:
        raise ValueError("attention_rollout needs the attention maps of at least one layer")
    return rollout.float()


def rollout_maps(rollout: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """[B, g, g]: what the pooled representation draws from each patch, read off the rollout [B, T, T].

    With a class token that is its row of the rollout; without one (global average pooling) the mean of the
    patch rows. The values are the share of the input that each patch contributes (not rescaled).
    """
    rows = rollout[:, 0] if num_prefix else rollout.mean(dim=1)  # [B, T]
    patches = rows[:, num_prefix:]
    grid = _grid_side(patches.shape[-1])
    return patches.reshape(-1, grid, grid)


def _grid_side(num_patches: int) -> int:
    side = round(num_patches**0.5)
    if side * side != num_patches:
        raise ValueError(f"{num_patches} patch tokens do not form a square grid")
    return side
