"""Matplotlib (Agg) figures of the analyses, laid out as the ViT paper's Figures 6 and 7; each writes one PNG."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on a cluster node

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F

from pipeline.analysis.measures import Components

DPI = 150


def _unit_range(x: np.ndarray) -> np.ndarray:
    low, high = float(x.min()), float(x.max())
    return (x - low) / (high - low) if high > low else np.full_like(x, 0.5)


def plot_components(components: Components, path: Path, *, title: str) -> Path:
    """The principal components as small RGB patches, 7 per row (Figure 7 left), each stretched to [0, 1]."""
    patches = components.patches.numpy()  # [K, C, P, P]
    count = len(patches)
    cols = min(7, count)
    rows = math.ceil(count / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.1 * cols, 1.1 * rows + 0.6), squeeze=False, layout="constrained")
    for i, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if i >= count:
            continue
        patch = patches[i]
        # RGB filters as colour; other channel counts as the mean over channels
        image = patch.transpose(1, 2, 0) if patch.shape[0] == 3 else patch.mean(axis=0)
        ax.imshow(_unit_range(image), cmap=None if image.ndim == 3 else "gray", interpolation="nearest")
        ax.set_title(f"{i + 1}: {100 * float(components.explained[i]):.0f}%", fontsize=6, pad=2)
    fig.suptitle(f"{title}\nRGB embedding filters (first {count} principal components, % of variance)", fontsize=8)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def plot_position_similarity(similarity: torch.Tensor, path: Path, *, title: str) -> Path:
    """Figure 7 centre: tile (r, c) is the cosine similarity of patch (r, c)'s position embedding to all patches."""
    grid = similarity.shape[0]
    # One mosaic with a one-pixel gap between tiles: a single image scales to large grids (24 x 24 at 384 px).
    step = grid + 1
    mosaic = np.full((grid * step - 1, grid * step - 1), np.nan)
    for r in range(grid):
        for c in range(grid):
            mosaic[r * step : r * step + grid, c * step : c * step + grid] = similarity[r, c].numpy()
    size = min(9.0, 3.0 + 0.3 * grid)
    fig, ax = plt.subplots(figsize=(size + 1.2, size), layout="constrained")
    cmap = plt.get_cmap("viridis").copy()
    cmap.set_bad("white")
    image = ax.imshow(mosaic, cmap=cmap, vmin=-1, vmax=1, interpolation="nearest")
    ticks = [i * step + grid / 2 - 0.5 for i in range(grid)]
    ax.set_xticks(ticks, [str(i + 1) for i in range(grid)], fontsize=7)
    ax.set_yticks(ticks, [str(i + 1) for i in range(grid)], fontsize=7)
    ax.tick_params(length=0)
    ax.set_xlabel("Input patch column")
    ax.set_ylabel("Input patch row")
    for spine in ax.spines.values():
        spine.set_visible(False)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.03, label="Cosine similarity")
    ax.set_title(f"{title}\nPosition embedding similarity", fontsize=9)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def plot_attention_distance(
    distances: torch.Tensor, path: Path, *, uniform: float, image_size: int, images: int, title: str
) -> Path:
    """Figure 7 right: one point per head at each depth; the dashed line is what uniform attention would give."""
    layers, heads = distances.shape
    fig, ax = plt.subplots(figsize=(4.6, 3.6), layout="constrained")
    depth = np.arange(1, layers + 1)
    for h in range(heads):
        # small horizontal offsets keep heads with equal distances apart
        offset = (h - (heads - 1) / 2) * min(0.06, 0.5 / heads)
        ax.scatter(depth + offset, distances[:, h].numpy(), s=14, label=f"Head {h + 1}")
    ax.axhline(uniform, color="gray", linestyle="--", linewidth=1, label="uniform attention")
    ax.set_xlabel("Network depth (layer)")
    ax.set_ylabel("Mean attention distance (pixels)")
    ax.set_xticks(depth if layers <= 12 else depth[:: math.ceil(layers / 12)])
    ax.set_ylim(0, max(float(distances.max()), uniform) * 1.1 + 1e-6)
    ax.set_title(f"{title}\n{image_size} px images, {images} images", fontsize=9)
    if heads <= 16:
        ax.legend(fontsize=6, ncol=2 if heads > 6 else 1, loc="lower right")
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def plot_rollout(images: torch.Tensor, maps: torch.Tensor, path: Path, *, title: str) -> Path:
    """Figure 6: each input image above the same image weighted by its attention-rollout map.

    ``images`` are uint8 [n, 3, S, S]; ``maps`` [n, g, g]. Each map is scaled to a maximum of 1 and upsampled to
    the image (bilinear), so the brightest region is what the representation draws on most.
    """
    count = len(images)
    size = images.shape[-1]
    masks = F.interpolate(maps[:, None].float(), size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    peak = masks.flatten(1).max(dim=1).values.clamp_min(1e-12)
    masks = (masks / peak[:, None, None]).clamp(0, 1)
    fig, axes = plt.subplots(2, count, figsize=(1.7 * count, 4.0), squeeze=False, layout="constrained")
    for i in range(count):
        picture = images[i].permute(1, 2, 0).float().numpy() / 255.0
        axes[0, i].imshow(picture, interpolation="nearest")
        axes[1, i].imshow(picture * masks[i, :, :, None].numpy(), interpolation="nearest")
        for ax in axes[:, i]:
            ax.set_axis_off()
    axes[0, 0].set_title("Input", fontsize=8, loc="left")
    axes[1, 0].set_title("Attention rollout", fontsize=8, loc="left")
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path
