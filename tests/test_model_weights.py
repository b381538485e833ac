"""Checkpoint loading: official JAX .npz layouts, timm / torch / safetensors state dicts, clear errors."""

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from fixtures.official_npz import to_official
from safetensors.torch import save_file
from timm.models.vision_transformer import _load_weights as timm_load_npz

from model import (
    CheckpointMismatchError,
    check_npz_architecture,
    create_vit,
    load_checkpoint,
    npz_shapes,
    resample_pos_embed,
)


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        p.copy_(1.0 + 0.1 * noise if "norm" in name and name.endswith("weight") else 0.02 * noise)


@pytest.fixture(scope="module")
def timm_ti16() -> torch.nn.Module:
    torch.manual_seed(0)
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=1000).eval()
    randomize_(ref)
    return ref


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))


def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


# --------------------------------------------------------------------------------------------------
# Official .npz files


def test_npz_vit_layout_matches_timm_loader(tmp_path: Path, timm_ti16, images) -> None:
    path = tmp_path / "Ti_16.npz"
    np.savez(path, **to_official(timm_ti16.state_dict(), heads=3))

    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=1000)
    timm_load_npz(ref, str(path))
    ours = create_vit("Ti/16", num_classes=1000)
    info = load_checkpoint(ours, path)
    assert info.source_format == "npz" and info.pos_embed_grid is None

    expected = logits(ref, images)
    diff = (logits(ours, images) - expected).abs().max().item()
    print(f"Ti/16 .npz: max |logit diff| ours vs timm loader = {diff:.2e}")
    assert diff < 1e-4
    assert (expected - logits(timm_ti16, images)).abs().max().item() < 1e-4  # the writer is right too


@pytest.mark.parametrize(("scanned", "prefix"), [(False, ""), (True, "params/"), (False, "opt/target/")])
def test_npz_big_vision_layout(tmp_path: Path, timm_ti16, images, scanned: bool, prefix: str) -> None:
    path = tmp_path / "bv.npz"
    arrays = to_official(timm_ti16.state_dict(), heads=3, layout="big_vision", scanned=scanned, prefix=prefix)
    if prefix == "opt/target/":
        arrays["opt/state/step"] = np.zeros(())  # optimizer state next to the weights is ignored
    np.savez(path, **arrays)
    ours = create_vit("Ti/16", num_classes=1000)
    load_checkpoint(ours, path)
    assert (logits(ours, images) - logits(timm_ti16, images)).abs().max().item() < 1e-4


def test_npz_with_representation_layer(tmp_path: Path, timm_ti16, images) -> None:
    # timm dropped the pre-logits layer, so the reference is timm's pooled features + tanh(dense) + head.
    gen = np.random.default_rng(0)
    rep, classes = 96, 21
    pre_w, pre_b = gen.normal(0, 0.1, (192, rep)).astype(np.float32), gen.normal(0, 0.1, rep).astype(np.float32)
    head_w = gen.normal(0, 0.1, (rep, classes)).astype(np.float32)
    head_b = gen.normal(0, 0.1, classes).astype(np.float32)
    arrays = to_official(timm_ti16.state_dict(), heads=3)
    arrays.update({"pre_logits/kernel": pre_w, "pre_logits/bias": pre_b, "head/kernel": head_w, "head/bias": head_b})
    path = tmp_path / "with_pre_logits.npz"
    np.savez(path, **arrays)

    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0).eval()
    timm_load_npz(ref, str(path))  # loads the backbone; no head
    with torch.no_grad():
        features = torch.tanh(ref(images) @ torch.from_numpy(pre_w) + torch.from_numpy(pre_b))
        expected = features @ torch.from_numpy(head_w) + torch.from_numpy(head_b)

    ours = create_vit("Ti/16", num_classes=classes, representation_size=rep).eval()
    load_checkpoint(ours, path)
    with torch.no_grad():
        assert (ours.pre_logits(images) - features).abs().max().item() < 1e-4
        assert (ours(images) - expected).abs().max().item() < 1e-4

    # a model built without the layer is told how to load this file
    with pytest.raises(CheckpointMismatchError, match="representation_size=96"):
        load_checkpoint(create_vit("Ti/16", num_classes=classes), path)


def test_npz_resampled_to_new_resolution(tmp_path: Path, timm_ti16) -> None:
    path = tmp_path / "Ti_16.npz"
    np.savez(path, **to_official(timm_ti16.state_dict(), heads=3))
    ours = create_vit("Ti/16", num_classes=10, img_size=320)
    info = load_checkpoint(ours, path, drop_head=True)  # bilinear, as the official fine-tuning code
    assert info.pos_embed_grid == ((14, 14), (20, 20))
    assert info.skipped == ("head/kernel", "head/bias")
    expected = resample_pos_embed(timm_ti16.pos_embed.detach(), 20, mode="bilinear")
    assert torch.allclose(ours.pos_embed, expected)
    assert not ours.head.weight.any()  # fresh zero head kept
    assert torch.equal(ours.blocks[5].mlp.fc1.weight, timm_ti16.blocks[5].mlp.fc1.weight)


def test_npz_errors(tmp_path: Path, timm_ti16) -> None:
    # wrong number of heads in the q/k/v kernels: same tensors, different function
    path = tmp_path / "heads.npz"
    np.savez(path, **to_official(timm_ti16.state_dict(), heads=6))
    with pytest.raises(CheckpointMismatchError, match=r"(?s)6 attention heads.*has 3") as err:
        load_checkpoint(create_vit("Ti/16", num_classes=1000), path)
    assert "(192, 6, 32)" in str(err.value) and "(192, 3, 64)" in str(err.value)

    # a missing array names the official key
    arrays = to_official(timm_ti16.state_dict(), heads=3)
    del arrays["Transformer/encoderblock_2/MlpBlock_3/Dense_1/bias"]
    path = tmp_path / "missing.npz"
    np.savez(path, **arrays)
    with pytest.raises(CheckpointMismatchError, match="encoderblock_2/MlpBlock_3/Dense_1/bias"):
        load_checkpoint(create_vit("Ti/16", num_classes=1000), path)

    # an array we do not understand is reported, not ignored
    arrays = to_official(timm_ti16.state_dict(), heads=3)
    arrays["MAPHead_0/probe"] = np.zeros((1, 1, 192), np.float32)
    path = tmp_path / "map.npz"
    np.savez(path, **arrays)
    with pytest.raises(CheckpointMismatchError, match="MAPHead_0/probe"):
        load_checkpoint(create_vit("Ti/16", num_classes=1000), path)

    path = tmp_path / "not_vit.npz"
    np.savez(path, weights=np.zeros(3))
    with pytest.raises(CheckpointMismatchError, match="embedding/kernel"):
        load_checkpoint(create_vit("Ti/16", num_classes=1000), path)


# --------------------------------------------------------------------------------------------------
# torch state dicts and files


def test_torch_and_safetensors_files(tmp_path: Path, timm_ti16, images) -> None:
    expected = logits(timm_ti16, images)
    sd = {k: v.clone() for k, v in timm_ti16.state_dict().items()}

    pth = tmp_path / "ckpt.pth"  # DeepSpeed/DDP style: wrapped and prefixed with "module."
    torch.save({"model": {f"module.{k}": v for k, v in sd.items()}, "step": 3}, pth)
    st = tmp_path / "ckpt.safetensors"
    save_file(sd, st)
    for path in (pth, st):
        ours = create_vit("Ti/16", num_classes=1000)
        assert load_checkpoint(ours, path).source_format == "torch"
        assert (logits(ours, images) - expected).abs().max().item() < 1e-4

    # our own state dict round-trips, including the representation layer
    src = create_vit("Mi/4", num_classes=10, img_size=32, representation_size=64, head_zero_init=False)
    dst = create_vit("Mi/4", num_classes=10, img_size=32, representation_size=64)
    load_checkpoint(dst, src.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values(), strict=True))
    # older timm / ports name the representation layer "pre_logits.fc"; loaded into a fresh model, so the
    # weights can only come from the renamed keys
    old_names = {k.replace("representation.", "pre_logits.fc."): v for k, v in src.state_dict().items()}
    assert any(k.startswith("pre_logits.fc.") for k in old_names)
    fresh = create_vit("Mi/4", num_classes=10, img_size=32, representation_size=64)
    assert not torch.equal(fresh.representation.weight, src.representation.weight)
    load_checkpoint(fresh, old_names)
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), fresh.state_dict().values(), strict=True))

    with pytest.raises(ValueError, match="Unknown checkpoint format"):
        (tmp_path / "x.ckpt").write_bytes(b"")
        load_checkpoint(dst, tmp_path / "x.ckpt")
    with pytest.raises(FileNotFoundError):
        load_checkpoint(dst, tmp_path / "nope.pth")


def test_error_wrong_variant(tmp_path: Path) -> None:
    s16 = create_vit("S/16", num_classes=1000)
    path = tmp_path / "s16.pth"
    torch.save(s16.state_dict(), path)
    with pytest.raises(CheckpointMismatchError) as err:
        load_checkpoint(create_vit("Ti/16", num_classes=1000), path)
    msg = str(err.value)
    print(msg)
    assert "S/16" in msg and "Ti/16" in msg
    assert "patch_embed.proj.weight" in msg and "(384, 3, 16, 16)" in msg and "(192, 3, 16, 16)" in msg
    assert isinstance(err.value, ValueError)

    # same width, different depth (B/16 weights into a 24-layer 768-wide model does not exist, so
    # fake it: a Ti/16 state dict with one extra block)
    sd = create_vit("Ti/16", num_classes=1000).state_dict()
    sd.update({k.replace("blocks.11.", "blocks.12."): v for k, v in sd.items() if k.startswith("blocks.11.")})
    with pytest.raises(CheckpointMismatchError, match=r"blocks\.12\.norm1\.weight exists in the checkpoint only"):
        load_checkpoint(create_vit("Ti/16", num_classes=1000), sd)

    # wrong patch size
    with pytest.raises(CheckpointMismatchError, match=r"\(192, 3, 16, 16\).*\(192, 3, 32, 32\)"):
        load_checkpoint(create_vit("Ti/32", num_classes=1000), sd)


def test_error_missing_unexpected_and_shape(timm_ti16) -> None:
    model = create_vit("Ti/16", num_classes=1000)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sd = dict(timm_ti16.state_dict())

    missing = {k: v for k, v in sd.items() if k != "blocks.3.mlp.fc2.bias"}
    with pytest.raises(CheckpointMismatchError, match=r"(?s)Missing.*blocks\.3\.mlp\.fc2\.bias"):
        load_checkpoint(model, missing)

    extra = {**sd, "fc_norm.weight": torch.ones(192), "fc_norm.bias": torch.zeros(192)}
    with pytest.raises(CheckpointMismatchError, match=r"(?s)Unexpected.*fc_norm\.bias.*norm after pooling"):
        load_checkpoint(model, extra)

    bad = {**sd, "blocks.0.norm1.weight": torch.ones(100)}
    with pytest.raises(
        CheckpointMismatchError, match=r"blocks\.0\.norm1\.weight: checkpoint shape \(100,\), model shape \(192,\)"
    ):
        load_checkpoint(model, bad)

    with pytest.raises(CheckpointMismatchError, match=r"(?s)head\.weight.*\(1000, 192\).*\(10, 192\).*drop_head=True"):
        load_checkpoint(create_vit("Ti/16", num_classes=10), sd)

    with pytest.raises(CheckpointMismatchError, match=r"(?s)no head.*drop_head=True"):
        load_checkpoint(create_vit("Ti/16", num_classes=0), sd)
    features_only = create_vit("Ti/16", num_classes=0)
    assert load_checkpoint(features_only, sd, drop_head=True).skipped == ("head.weight", "head.bias")

    with pytest.raises(CheckpointMismatchError, match="pool='token'"):
        load_checkpoint(create_vit("Ti/16", num_classes=1000, pool="gap"), sd)

    # the failed attempts copied nothing: checks run before any weight is written
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize(("layout", "scanned", "prefix"), [("vit", False, ""), ("big_vision", True, "params/")])
def test_npz_architecture_is_read_from_headers_for_every_layout(tmp_path: Path, layout, scanned, prefix) -> None:
    vit = create_vit("Mi/4", num_classes=3, img_size=16)
    path = tmp_path / "ckpt.npz"
    np.savez(path, **to_official(vit.state_dict(), heads=4, layout=layout, scanned=scanned, prefix=prefix))
    with path.open("rb") as f:
        assert npz_shapes(f)[f"{prefix}embedding/kernel"] == (4, 4, 3, 128)
    with path.open("rb") as f:
        arch = check_npz_architecture(f, "Mi/4")  # fits
    # 16 px / patch 4: a 4x4 grid, whether or not the layout keeps a class-token slot in the position embedding.
    assert (arch.grid, arch.img_size, arch.pool, arch.representation_size, arch.num_heads) == (4, 16, "token", None, 4)
    for variant, message in [("Ti/4", r"ViT-Mi/4 .*use variant 'Mi/4'"), ("Mi/8", r"patch 4, 4 heads\), not ViT-Mi/8")]:
        with path.open("rb") as f, pytest.raises(CheckpointMismatchError, match=message):
            check_npz_architecture(f, variant)


def test_npz_check_refuses_the_wrong_pooling_and_a_file_that_is_not_an_npz(tmp_path: Path) -> None:
    gap = create_vit("Mi/4", num_classes=3, img_size=16, pool="gap")
    path = tmp_path / "gap.npz"
    np.savez(path, **to_official(gap.state_dict(), heads=4))
    with (
        path.open("rb") as f,
        pytest.raises(CheckpointMismatchError, match=r"has no class token, but pool='token'.*use pool='gap'"),
    ):
        check_npz_architecture(f, "Mi/4", pool="token")
    with path.open("rb") as f:
        check_npz_architecture(f, "Mi/4", pool="gap")
    bogus = tmp_path / "bogus.npz"
    bogus.write_bytes(b"not a zip archive" * 10)
    with bogus.open("rb") as f, pytest.raises(CheckpointMismatchError, match=r"Not a readable \.npz"):
        check_npz_architecture(f, "Mi/4")
