"""The paper's analyses (section 4.5) checked on constructions with a known answer, and jobs/analyze.py end to end."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
import torch
from PIL import Image

from model import create_vit
from pipeline import analysis
from pipeline.analysis.measures import (
    attention_rollout,
    embedding_components,
    mean_attention_distance,
    position_similarity,
    rollout_maps,
)
from pipeline.data.shards import ShardWriter
from pipeline.export import save_exported_model
from tests.fixtures.official_npz import to_official

ROOT = Path(__file__).resolve().parents[1]
# Mi/4 at 16 px: a 4 x 4 patch grid, 17 tokens, 6 blocks of 4 heads; small enough for exact constructions.
VARIANT, IMG, PATCH, GRID = "Mi/4", 16, 4, 4


def tiny_vit(**kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_vit(VARIANT, num_classes=5, img_size=IMG, **kwargs).eval()


def images(n: int) -> torch.Tensor:
    return torch.rand(n, 3, IMG, IMG, generator=torch.Generator().manual_seed(1)) * 2 - 1


# --------------------------------------------------------------------------------------------------------------
# Attention weights: exposed on request, never computed by forward()


def test_recomputed_attention_weights_reproduce_the_fused_attention():
    vit = tiny_vit()
    attn = vit.blocks[0].attn
    x = torch.randn(2, 17, vit.spec.width)
    probs = attn.probabilities(x)  # [B, H, T, T]
    v = attn.qkv(x)[..., 2 * vit.spec.width :].view(2, 17, attn.num_heads, attn.head_dim).transpose(1, 2)
    by_hand = attn.proj((probs @ v).transpose(1, 2).reshape(2, 17, -1))
    torch.testing.assert_close(by_hand, attn(x), atol=1e-5, rtol=1e-5)


def test_attention_maps_cover_all_tokens_of_every_block_and_forward_never_computes_them(monkeypatch):
    vit = tiny_vit()
    x = images(3)
    maps = vit.attention_maps(x)
    assert len(maps) == vit.spec.depth
    for attn in maps:  # the last block too: all 17 query tokens, not only the class token
        assert attn.shape == (3, vit.spec.num_heads, 17, 17)
        torch.testing.assert_close(attn.sum(-1), torch.ones(3, vit.spec.num_heads, 17))

    def refuse(*args, **kwargs):
        raise AssertionError("forward() must not materialise attention weights")

    monkeypatch.setattr(type(vit.blocks[0].attn), "probabilities", refuse)
    logits = vit(x)
    assert logits.shape == (3, 5)
    torch.testing.assert_close(vit.forward_head(vit.forward_features(x)), logits, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------------------------
# Mean attention distance


def grid_mean_distance_numpy(grid: int, patch: int) -> float:
    """Mean Euclidean distance in pixels between two patch centres drawn uniformly and independently."""
    rows, cols = np.divmod(np.arange(grid * grid), grid)
    dr = rows[:, None] - rows[None, :]
    dc = cols[:, None] - cols[None, :]
    return float(np.mean(np.hypot(dr, dc)) * patch)


@torch.no_grad()
def local_attention_vit() -> torch.nn.Module:
    """Every block attends each token to itself only: one-hot token embeddings, q = k = a large multiple of the
    token, and blocks whose branches add nothing (so every block sees the same one-hot tokens)."""
    vit = tiny_vit()
    D, T = vit.spec.width, vit.spec.seq_len
    vit.patch_embed.proj.weight.zero_()
    vit.patch_embed.proj.bias.zero_()
    vit.cls_token.zero_()
    vit.pos_embed.copy_(torch.eye(T, D)[None])
    for block in vit.blocks:
        qkv = block.attn.qkv
        qkv.weight.zero_()
        qkv.bias.zero_()
        for h in range(vit.spec.num_heads):  # every head reads the first T features (where the one-hots are)
            rows = torch.arange(T) + h * vit.spec.head_dim
            qkv.weight[rows, torch.arange(T)] = 4.0  # query
            qkv.weight[D + rows, torch.arange(T)] = 4.0  # key
        for layer in (block.attn.proj, block.mlp.fc2):
            layer.weight.zero_()
            layer.bias.zero_()
    return vit


def test_attention_forced_local_has_zero_mean_distance():
    vit = local_attention_vit()
    maps = vit.attention_maps(images(2))
    eye = torch.eye(vit.spec.seq_len).expand_as(maps[0])
    for attn in maps:
        torch.testing.assert_close(attn, eye, atol=1e-6, rtol=0)  # the construction does what it claims
    distances = mean_attention_distance(maps, num_prefix=1, patch_size=PATCH)
    assert distances.shape == (vit.spec.depth, vit.spec.num_heads)
    assert distances.abs().max() < 1e-4


@torch.no_grad()
def test_uniform_attention_has_the_grids_mean_pairwise_distance():
    vit = tiny_vit()
    for block in vit.blocks:  # zero queries: every score is 0, every token attends to all 17 equally
        block.attn.qkv.weight[: vit.spec.width].zero_()
        block.attn.qkv.bias[: vit.spec.width].zero_()
    maps = vit.attention_maps(images(2))
    torch.testing.assert_close(maps[-1], torch.full_like(maps[-1], 1 / 17))
    distances = mean_attention_distance(maps, num_prefix=1, patch_size=PATCH)
    expected = grid_mean_distance_numpy(GRID, PATCH)  # 2.19 patches = 8.77 px on a 4 x 4 grid
    torch.testing.assert_close(distances, torch.full_like(distances, expected), atol=1e-4, rtol=0)


def test_attention_distance_of_a_known_offset_is_that_offset():
    # Each patch attends only to the patch one to its right (wrapping around): 1 patch = 4 px, except at the
    # last column where the wrap goes back 3 patches (12 px): mean = (3 * 4 + 12) / 4 = 6 px.
    N = GRID * GRID
    attn = torch.zeros(1, 1, N + 1, N + 1)
    for i in range(N):
        r, c = divmod(i, GRID)
        attn[0, 0, 1 + i, 1 + r * GRID + (c + 1) % GRID] = 1.0
    attn[0, 0, 0, 0] = 1.0
    assert mean_attention_distance([attn], num_prefix=1, patch_size=PATCH).item() == pytest.approx(6.0)


# --------------------------------------------------------------------------------------------------------------
# Position-embedding similarity


def sinusoid_2d(grid: int, freqs: np.ndarray) -> np.ndarray:
    """[grid * grid, 4K]: sin and cos of each frequency times the row, then times the column (row-major patches)."""
    rows, cols = np.divmod(np.arange(grid * grid), grid)
    parts = [np.sin(np.outer(rows, freqs)), np.cos(np.outer(rows, freqs))]
    parts += [np.sin(np.outer(cols, freqs)), np.cos(np.outer(cols, freqs))]
    return np.concatenate(parts, axis=1)


def test_similarity_of_a_2d_sinusoid_is_maximal_at_self_symmetric_and_falls_with_distance():
    grid = 6
    # all frequencies below pi / (grid - 1): cos(w * d) strictly decreases over every distance d on the grid
    freqs = np.linspace(0.1, 1.0, 32) * math.pi / (grid - 1)
    table = sinusoid_2d(grid, freqs)
    class_slot = np.random.default_rng(0).normal(size=(1, table.shape[1]))  # must be left out
    pos_embed = torch.tensor(np.concatenate([class_slot, table])[None], dtype=torch.float32)

    sim = position_similarity(pos_embed, num_prefix=1).numpy()  # [g, g, g, g]
    assert sim.shape == (grid,) * 4

    # Exact: |e|^2 = 2K and e(p) . e(p') = sum_k cos(w_k dr) + sum_k cos(w_k dc).
    dr = np.arange(grid)[:, None, None, None] - np.arange(grid)[None, None, :, None]
    dc = np.arange(grid)[None, :, None, None] - np.arange(grid)[None, None, None, :]
    expected = (np.cos(dr[..., None] * freqs).sum(-1) + np.cos(dc[..., None] * freqs).sum(-1)) / (2 * len(freqs))
    np.testing.assert_allclose(sim, expected, atol=1e-5)

    for r in range(grid):
        for c in range(grid):
            tile = sim[r, c]
            assert tile[r, c] == pytest.approx(1.0, abs=1e-5)
            assert tile.argmax() == r * grid + c
            # moving away from the patch along its row and along its column, in both directions
            for line, centre in ((tile[r], c), (tile[:, c], r)):
                assert np.all(np.diff(line[centre:]) < 0) and np.all(np.diff(line[: centre + 1]) > 0)
    np.testing.assert_allclose(sim, sim.transpose(2, 3, 0, 1), atol=1e-6)  # sim(p, p') = sim(p', p)


# --------------------------------------------------------------------------------------------------------------
# Principal components of the embedding filters


def test_principal_components_recover_the_filters_known_subspace():
    D, C, P = 64, 3, 4
    u = torch.zeros(C * P * P)
    u[: P * P] = 1 / P  # a red-channel blob, unit norm
    v = torch.zeros(C * P * P)
    v[P * P :: 2] = 1 / math.sqrt(C * P * P / 2 - P * P / 2)  # every other value of green and blue, unit norm
    assert abs(float(u @ v)) < 1e-7
    angle = 2 * math.pi * torch.arange(D) / D
    a, b = 3 * torch.cos(angle), torch.sin(angle)  # zero-mean, uncorrelated, variances 9/2 and 1/2
    mean = torch.full((C * P * P,), 0.3)
    weight = (mean + a[:, None] * u + b[:, None] * v).reshape(D, C, P, P)

    comps = embedding_components(weight, count=28)
    assert comps.patches.shape == (28, C, P, P)
    first, second = comps.patches[0].flatten(), comps.patches[1].flatten()
    assert abs(float(first @ u)) == pytest.approx(1.0, abs=1e-5)
    assert abs(float(second @ v)) == pytest.approx(1.0, abs=1e-5)
    torch.testing.assert_close(comps.explained[:2], torch.tensor([0.9, 0.1]), atol=1e-5, rtol=0)
    assert comps.explained[2:].abs().max() < 1e-6


# --------------------------------------------------------------------------------------------------------------
# Attention rollout


def test_rollout_of_identity_attention_returns_the_input_distribution():
    T, layers = 17, 6
    maps = [torch.eye(T).expand(2, 4, T, T) for _ in range(layers)]
    rollout = attention_rollout(maps)
    torch.testing.assert_close(rollout, torch.eye(T).expand(2, T, T))
    inputs = torch.distributions.Dirichlet(torch.ones(T)).sample((5,))  # any distributions over the tokens
    torch.testing.assert_close(inputs @ rollout[0], inputs)
    # So the class token, one-hot on itself at the input, stays one-hot on itself: it draws nothing from the
    # patches. A pooled model without class token averages the patch rows: uniform over the patches.
    assert rollout_maps(rollout, num_prefix=1).abs().max() == 0
    patch_only = attention_rollout([torch.eye(16).expand(2, 4, 16, 16)])
    torch.testing.assert_close(rollout_maps(patch_only, num_prefix=0), torch.full((2, 4, 4), 1 / 16))


def test_rollout_of_uniform_attention_matches_the_closed_form():
    # 0.5 U + 0.5 I with U idempotent: its L-th power is 0.5^L I + (1 - 0.5^L) U.
    T, layers = 17, 3
    maps = [torch.full((1, 4, T, T), 1 / T) for _ in range(layers)]
    rollout = attention_rollout(maps)[0]
    expected = 0.5**layers * torch.eye(T) + (1 - 0.5**layers) / T
    torch.testing.assert_close(rollout, expected)
    torch.testing.assert_close(rollout_maps(rollout[None], 1), torch.full((1, 4, 4), (1 - 0.5**layers) / T))


def test_rollout_rows_stay_distributions_for_real_attention():
    maps = tiny_vit().attention_maps(images(2))
    rollout = attention_rollout(maps)
    assert rollout.min() >= 0
    torch.testing.assert_close(rollout.sum(-1), torch.ones(2, 17))


# --------------------------------------------------------------------------------------------------------------
# Loading foreign checkpoints


def test_timm_and_official_checkpoints_load_with_their_variant(tmp_path):
    vit = tiny_vit(representation_size=128)
    torch.save({"state_dict": vit.state_dict()}, tmp_path / "timm.pth")
    np.savez(tmp_path / "official.npz", **to_official(vit.state_dict(), heads=vit.spec.num_heads))
    for name in ("timm.pth", "official.npz"):
        url = str(tmp_path / name)
        with pytest.raises(analysis.AnalysisError, match="--variant"):
            analysis.check_model(url)
        loaded = analysis.load_model(analysis.check_model(url, variant=VARIANT))
        assert (loaded.spec.img_size, loaded.spec.pool, loaded.spec.representation_size) == (IMG, "token", 128)
        torch.testing.assert_close(loaded.pos_embed, vit.pos_embed)
        torch.testing.assert_close(loaded.blocks[-1].attn.qkv.weight, vit.blocks[-1].attn.qkv.weight)
    with pytest.raises(analysis.AnalysisError, match="Ti/4"):  # from the array headers, nothing loaded
        analysis.check_model(str(tmp_path / "official.npz"), variant="Ti/4")


def test_a_timm_model_saved_as_safetensors_loads_and_computes_what_timm_computes(tmp_path):
    from safetensors.torch import save_file
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    torch.manual_seed(0)
    timm_vit = TimmViT(img_size=IMG, patch_size=PATCH, embed_dim=128, depth=6, num_heads=4, num_classes=7).eval()
    save_file(timm_vit.state_dict(), str(tmp_path / "timm.safetensors"))
    ours = analysis.load_model(analysis.check_model(str(tmp_path / "timm.safetensors"), variant=VARIANT))
    x = images(2)
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_features(x), timm_vit.forward_features(x), atol=1e-4, rtol=1e-4)


def test_all_analyses_run_on_a_model_without_class_token():
    vit = tiny_vit(pool="gap")
    pixels = (torch.rand(3, 3, IMG, IMG, generator=torch.Generator().manual_seed(2)) * 255).to(torch.uint8)
    result = analysis.analyze(vit, pixels, components=5, rollout_images=2)
    assert result.distances.shape == (vit.spec.depth, vit.spec.num_heads)
    assert result.similarity.shape == (GRID,) * 4 and result.rollout.shape == (2, GRID, GRID)
    # without a class token the map is the patches' mean rollout row: a distribution over the patches
    torch.testing.assert_close(result.rollout.sum(dim=(1, 2)), torch.ones(2))


# --------------------------------------------------------------------------------------------------------------
# The job


def write_shards(url: str, count: int) -> str:
    writer = ShardWriter(url, "val", max_bytes=1 << 30, max_samples=4)
    rng = np.random.default_rng(0)
    for i in range(count):
        pixels = (rng.random((20, 24, 3)) * 255).astype(np.uint8)
        writer.write(f"img{i:03d}", simplejpeg.encode_jpeg(pixels, quality=90), i % 3)
    shards = writer.close()
    return f"{url}/val-{{000000..{len(shards) - 1:06d}}}.tar"


def run_job(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_ENABLE_TELEMETRY": "false"}
    return subprocess.run(
        [sys.executable, "jobs/analyze.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def test_analyze_job_writes_the_figures_and_logs_them_to_the_run(tmp_path):
    from mlflow.tracking import MlflowClient

    from pipeline import tracking

    export = save_exported_model(tiny_vit(), f"file://{tmp_path}/export")
    data = write_shards(f"file://{tmp_path}/shards", 10)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_id = tracking.open_run(uri, "analysis-tests", "pretrain", {}, {})
    assert run_id is not None

    out = tmp_path / "figures"
    result = run_job(
        "--model", export, "--data", data, "--out", str(out), "--images", "6", "--rollout-images", "3",
        "--run-id", run_id, "--tracking-uri", uri,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "6 images at 16 px" in result.stdout
    for name in analysis.FIGURES.values():
        with Image.open(out / name) as image:
            image.verify()  # a complete, decodable PNG
            assert image.format == "PNG" and min(image.size) > 100
    numbers = json.loads((out / analysis.NUMBERS).read_text())
    assert numbers["images"] == 6 and len(numbers["mean_attention_distance_px"]) == 6
    logged = {f.path for f in MlflowClient(uri).list_artifacts(run_id, "analysis")}
    assert logged == {f"analysis/{name}" for name in [*analysis.FIGURES.values(), analysis.NUMBERS]}


def test_analyze_job_refuses_a_bad_model_before_any_work(tmp_path):
    out = tmp_path / "figures"
    missing_data = f"file://{tmp_path}/nowhere/val-{{000000..000001}}.tar"
    result = run_job("--model", str(tmp_path / "no-export"), "--data", missing_data, "--out", str(out))
    assert result.returncode == 2
    assert "analyze: --model: no complete exported model at" in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()

    (tmp_path / "weights.pth").write_bytes(b"not a checkpoint")
    result = run_job("--model", str(tmp_path / "weights.pth"), "--data", missing_data, "--out", str(out))
    assert result.returncode == 2
    assert "--variant" in result.stderr and not out.exists()


def test_a_damaged_checkpoint_is_reported_as_a_bad_model(tmp_path):
    (tmp_path / "weights.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(analysis.AnalysisError, match=r"--model: cannot read .*weights\.pth"):
        analysis.load_model(analysis.check_model(str(tmp_path / "weights.pth"), variant=VARIANT))
