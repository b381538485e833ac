"""ViT architecture: shapes, parameter counts and FLOPs against timm, numerics against timm, features."""

import ast
import dataclasses
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from timm.models.vision_transformer import checkpoint_filter_fn

from model import (
    VisionTransformer,
    ViTSpec,
    create_vit,
    flops,
    load_checkpoint,
    param_count,
    parse_variant,
    resample_pos_embed,
    train_flops_per_image,
)

REPO = Path(__file__).resolve().parents[1]
TIMM_NAMES = {
    "Ti/16": "vit_tiny_patch16_224",
    "S/16": "vit_small_patch16_224",
    "B/16": "vit_base_patch16_224",
    "B/32": "vit_base_patch32_224",
    "L/16": "vit_large_patch16_224",
    "H/14": "vit_huge_patch14_224",
}


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int = 0) -> None:
    """Random values everywhere (LayerNorm scales, biases, head too) so no mapping hides behind a 0 or 1."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        if "norm" in name and name.endswith("weight"):
            p.copy_(1.0 + 0.1 * noise)
        else:
            p.copy_(0.02 * noise)


def numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --------------------------------------------------------------------------------------------------
# Variants, parameter counts, FLOPs


def test_parse_variant() -> None:
    s = parse_variant("H/14")
    assert (s.width, s.depth, s.num_heads, s.mlp_dim, s.patch_size) == (1280, 32, 16, 5120, 14)
    assert parse_variant("ViT-B/8").patch_size == 8
    assert parse_variant("Mi/4").width == 128
    with pytest.raises(ValueError, match=r"Ti, S, B, L, H"):
        parse_variant("X/16")
    with pytest.raises(ValueError, match="size"):
        parse_variant("B16")
    with pytest.raises(ValueError, match="patch"):
        parse_variant("B/x")


@pytest.mark.parametrize("variant", list(TIMM_NAMES))
def test_param_count_matches_timm(variant: str) -> None:
    with torch.device("meta"):
        ref = timm.create_model(TIMM_NAMES[variant], pretrained=False, num_classes=1000)
    ours = create_vit(variant, num_classes=1000, device="meta")
    assert numel(ours) == numel(ref) == param_count(variant, num_classes=1000)
    if variant == "H/14":
        assert round(numel(ours) / 1e6, 1) == 632.0  # the paper's 632M


@pytest.mark.parametrize(
    ("variant", "kwargs"),
    [
        ("B/16", {"num_classes": 0}),
        ("B/16", {"num_classes": 10, "pool": "gap"}),
        ("B/16", {"num_classes": 21843, "representation_size": 768}),
        ("B/16", {"num_classes": 10, "img_size": 384}),
        ("Mi/4", {"num_classes": 10, "img_size": 32, "in_chans": 1}),
    ],
)
def test_param_count_options(variant: str, kwargs: dict) -> None:
    assert numel(create_vit(variant, device="meta", **kwargs)) == param_count(variant, **kwargs)


# timm's published forward GMACs at 224 px; FLOPs = 2 x MACs
@pytest.mark.parametrize(("variant", "gmacs"), [("B/16", 17.58), ("L/16", 61.6), ("H/14", 167.4)])
def test_flops_match_timm_tables(variant: str, gmacs: float) -> None:
    ours = flops(variant, 224, num_classes=1000)
    assert abs(ours / (2e9 * gmacs) - 1) < 0.01
    assert train_flops_per_image(variant, 224) == 3 * ours


def test_flops_small_terms() -> None:
    base = flops("B/16", 224, num_classes=0)
    assert flops("B/16", 224, num_classes=10) - base == 2 * 768 * 10
    assert flops("B/16", 224, num_classes=0, representation_size=768) - base == 2 * 768 * 768
    # gap has one token fewer than token pooling
    assert flops("B/16", 224, num_classes=0, pool="gap") < base


# --------------------------------------------------------------------------------------------------
# Numerics against timm


def _timm_and_ours(variant: str, **timm_kwargs) -> tuple[torch.nn.Module, VisionTransformer]:
    torch.manual_seed(0)
    ref = timm.create_model(TIMM_NAMES[variant], pretrained=False, num_classes=1000, **timm_kwargs).eval()
    randomize_(ref)
    ours = create_vit(variant, num_classes=1000).eval()
    load_checkpoint(ours, ref.state_dict())
    return ref, ours


def test_logits_match_timm_b16_224_and_384() -> None:
    ref, ours = _timm_and_ours("B/16")
    torch.manual_seed(1)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        diff = (ours(x) - ref(x)).abs().max().item()
    print(f"B/16@224 max |logit diff| = {diff:.2e}")
    assert diff < 1e-4

    # 384 px: timm resamples the 224 checkpoint's position embeddings (bicubic) in its checkpoint filter
    ref384 = timm.create_model(TIMM_NAMES["B/16"], pretrained=False, num_classes=1000, img_size=384).eval()
    ref384.load_state_dict(checkpoint_filter_fn(ref.state_dict(), ref384))
    ours384 = create_vit("B/16", num_classes=1000, img_size=384).eval()
    info = load_checkpoint(ours384, ref.state_dict(), resample_mode="bicubic")
    assert info.pos_embed_grid == ((14, 14), (24, 24))
    x = torch.randn(2, 3, 384, 384)
    with torch.no_grad():
        expected = ref384(x)
        diff = (ours384(x) - expected).abs().max().item()
        # the same resampling on a live model
        ours.set_img_size(384, mode="bicubic")
        live_diff = (ours(x) - expected).abs().max().item()
    print(f"B/16@384 max |logit diff| = {diff:.2e} (load), {live_diff:.2e} (set_img_size)")
    assert diff < 1e-4
    assert live_diff < 1e-4
    assert ours.spec.img_size == 384 and ours.pos_embed.shape == (1, 577, 768)


def test_gap_pooling_matches_timm() -> None:
    torch.manual_seed(0)
    # the paper's GAP: final LayerNorm on all tokens, then the mean (timm's fc_norm=False)
    ref = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=10, class_token=False, global_pool="avg", fc_norm=False
    ).eval()
    randomize_(ref)
    ours = create_vit("Ti/16", num_classes=10, pool="gap").eval()
    assert ours.cls_token is None and ours.pos_embed.shape == (1, 196, 192)
    load_checkpoint(ours, ref.state_dict())
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert (ours(x) - ref(x)).abs().max().item() < 1e-4
        tokens = ours.forward_features(x)
        assert tokens.shape == (2, 196, 192)
        torch.testing.assert_close(ours.pre_logits(x), tokens.mean(1), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# Resampling


@pytest.mark.parametrize(("old", "new"), [(7, 12), (24, 14), (14, 24)])
def test_bilinear_resample_matches_official_scipy_zoom(old: int, new: int) -> None:
    # The official JAX code resamples with scipy.ndimage.zoom(order=1) on the [h, w, D] grid.
    scipy_ndimage = pytest.importorskip("scipy.ndimage")
    torch.manual_seed(0)
    pos = torch.randn(1, 1 + old * old, 16)
    ours = resample_pos_embed(pos, new, num_prefix_tokens=1, mode="bilinear")
    grid = pos[0, 1:].reshape(old, old, 16).numpy().astype(np.float64)
    ref = scipy_ndimage.zoom(grid, (new / old, new / old, 1), order=1).reshape(new * new, 16)
    assert ours.shape == (1, 1 + new * new, 16)
    assert torch.equal(ours[:, :1], pos[:, :1])  # class-token embedding kept
    np.testing.assert_allclose(ours[0, 1:].numpy(), ref, atol=1e-5)


def test_resample_errors_and_identity() -> None:
    pos = torch.randn(1, 1 + 49, 8)
    assert resample_pos_embed(pos, 7) is pos
    with pytest.raises(ValueError, match="not a square"):
        resample_pos_embed(pos, 8, num_prefix_tokens=0)
    with pytest.raises(ValueError, match="mode"):
        resample_pos_embed(pos, 8, mode="nearest")


def test_set_img_size_live_model() -> None:
    model = create_vit("Mi/4", num_classes=10, img_size=32).eval()
    randomize_(model)
    cls_pos = model.pos_embed[:, :1].clone()
    model.set_img_size(48)
    assert model.spec.img_size == 48 and model.spec.grid_size == 12
    assert model.pos_embed.shape == (1, 1 + 144, 128)
    assert torch.equal(model.pos_embed[:, :1], cls_pos)
    assert model(torch.randn(2, 3, 48, 48)).shape == (2, 10)
    with pytest.raises(ValueError, match="set_img_size"):
        model(torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match=r"img_size=\d+ is not a multiple of the patch size"):
        model.set_img_size(50)


# --------------------------------------------------------------------------------------------------
# Features used by the training and transfer code


def test_activation_checkpointing_same_outputs_and_grads() -> None:
    x = torch.randn(4, 3, 32, 32)
    y = torch.randint(0, 10, (4,))
    results = []
    for enabled in (False, True):
        torch.manual_seed(0)
        model = create_vit("Mi/4", num_classes=10, img_size=32, dropout=0.1, attn_dropout=0.1, head_zero_init=False)
        model.set_grad_checkpointing(enabled)
        model.train()
        torch.manual_seed(1)  # same dropout masks in both runs
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.allclose(loss_a, loss_b, atol=1e-6)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("pool", ["token", "gap"])
def test_forward_equals_head_of_features(pool: str) -> None:
    # forward() runs only the class token through the last block; it must be the same function.
    model = create_vit("Mi/4", num_classes=10, img_size=32, pool=pool, representation_size=32, head_zero_init=False)
    randomize_(model)
    x = torch.randn(4, 3, 32, 32)
    y = torch.randint(0, 10, (4,))
    grads = []
    for fast in (True, False):
        model.zero_grad()
        logits = model(x) if fast else model.forward_head(model.forward_features(x))
        torch.nn.functional.cross_entropy(logits, y).backward()
        grads.append((logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (fast_logits, fast_grads), (ref_logits, ref_grads) = grads
    torch.testing.assert_close(fast_logits, ref_logits, atol=1e-5, rtol=1e-5)
    for name in ref_grads:
        torch.testing.assert_close(fast_grads[name], ref_grads[name], atol=1e-6, rtol=1e-4, msg=name)
    with torch.no_grad():
        features = model.forward_head(model.forward_features(x), pre_logits=True)
        torch.testing.assert_close(model.pre_logits(x), features, atol=1e-5, rtol=1e-5)


def test_forward_shapes_and_no_head() -> None:
    model = create_vit("Mi/4", num_classes=0, img_size=32, in_chans=1).eval()
    assert model.head is None and model.num_features == 128
    x = torch.randn(3, 1, 32, 32)
    assert model.forward_features(x).shape == (3, 65, 128)
    assert model(x).shape == (3, 128)


def test_representation_and_drop_representation() -> None:
    model = create_vit("Mi/4", num_classes=10, img_size=32, representation_size=64, head_zero_init=False).eval()
    randomize_(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = model.forward_features(x)
        feats = model.pre_logits(x)
        assert model.num_features == 64 and feats.shape == (2, 64)
        expected = torch.tanh(model.representation(tokens[:, 0]))
        torch.testing.assert_close(feats, expected, atol=1e-5, rtol=1e-5)
        assert torch.allclose(model(x), model.head(feats))

    model.drop_representation()
    assert model.representation is None and model.spec.representation_size is None
    assert "representation.weight" not in model.state_dict()
    # head input shrinks from 64 to the width 128, so the head is rebuilt zero-initialised
    assert model.head.in_features == 128 and not model.head.weight.any()
    with torch.no_grad():
        torch.testing.assert_close(model.pre_logits(x), model.forward_features(x)[:, 0], atol=1e-5, rtol=1e-5)
    assert numel(model) == param_count("Mi/4", num_classes=10, img_size=32)

    same_width = create_vit("Mi/4", num_classes=10, img_size=32, representation_size=128, head_zero_init=False)
    head = same_width.head.weight.clone()
    same_width.drop_representation()
    assert torch.equal(same_width.head.weight, head)  # head kept when its input size still fits


def test_reset_head_zero_init() -> None:
    model = create_vit("Mi/4", num_classes=1000, img_size=32, head_zero_init=False)
    assert model.head.weight.abs().sum() > 0
    model.reset_head(37, bias_init=-2.0)
    assert model.head.weight.shape == (37, 128) and model.spec.num_classes == 37
    assert not model.head.weight.any() and torch.all(model.head.bias == -2.0)
    model.reset_head(0)
    assert model.head is None and model(torch.randn(1, 3, 32, 32)).shape == (1, 128)
    # default construction: zero head, constant bias
    fresh = create_vit("Mi/4", num_classes=5, img_size=32, head_bias_init=-10.0)
    assert not fresh.head.weight.any() and torch.all(fresh.head.bias == -10.0)


def test_init_is_sensible() -> None:
    model = create_vit("B/16", num_classes=10)
    qkv = model.blocks[0].attn.qkv.weight
    bound = (6 / (768 + 768)) ** 0.5  # xavier per q/k/v kernel
    assert qkv.abs().max() <= bound and qkv.abs().max() > 0.9 * bound
    assert abs(model.pos_embed.std().item() - 0.02) < 0.002
    assert not model.cls_token.any()
    assert torch.all(model.norm.weight == 1)


def test_spec_roundtrip_and_validation(tmp_path: Path) -> None:
    model = create_vit("S/16", num_classes=10, img_size=384, pool="gap", representation_size=384, device="meta")
    spec = model.spec
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec.to_dict()))
    again = ViTSpec.from_dict(json.loads(path.read_text()))
    assert again == spec
    assert (spec.width, spec.depth, spec.num_heads, spec.mlp_dim, spec.patch_size) == (384, 12, 6, 1536, 16)
    rebuilt = VisionTransformer(again).to("meta")
    assert numel(rebuilt) == numel(model)
    with pytest.raises(ValueError, match="Unknown ViTSpec field"):
        ViTSpec.from_dict({**spec.to_dict(), "widht": 3})
    with pytest.raises(ValueError, match=r"img_size=\d+ is not a multiple of the patch size"):
        create_vit("B/16", num_classes=10, img_size=230)
    with pytest.raises(ValueError, match="pool"):
        create_vit("B/16", num_classes=10, pool="mean")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.width = 3  # type: ignore[misc]


# --------------------------------------------------------------------------------------------------
# Import isolation: the model package must stay free of IO / distributed dependencies.

FORBIDDEN = ("deepspeed", "ray", "fsspec", "gcsfs", "mlflow", "torch.distributed")


def _forbidden(module: str) -> bool:
    return any(module == f or module.startswith(f + ".") for f in FORBIDDEN)


def test_model_source_imports_nothing_forbidden() -> None:
    files = sorted((REPO / "model").rglob("*.py"))
    assert files
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            bad = [n for n in names if _forbidden(n)]
            assert not bad, f"{path.relative_to(REPO)}:{node.lineno} imports {bad}"
        assert "import_module" not in path.read_text(), f"{path}: no dynamic imports in model/"


def test_importing_model_loads_nothing_forbidden() -> None:
    # `import torch` itself loads parts of torch.distributed, so compare against a torch-only baseline.
    code = textwrap.dedent(
        """
        import json, sys
        import numpy, torch, torch.utils.checkpoint, safetensors.torch
        before = set(sys.modules)
        import model
        model.create_vit("Mi/4", num_classes=10, img_size=32)
        print(json.dumps({"before": sorted(before), "after": sorted(sys.modules)}))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True, timeout=120
    )
    mods = json.loads(out.stdout.strip().splitlines()[-1])
    new = set(mods["after"]) - set(mods["before"])
    assert "model.vit" in new
    assert not [m for m in new if _forbidden(m)]
    assert not [m for m in mods["after"] if _forbidden(m) and not m.startswith("torch.")]
