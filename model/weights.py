"""Load ViT weights from official JAX `.npz` files, timm / PyTorch state dicts, or safetensors.

Every source is first translated to this package's parameter names, then checked against the model
as a whole (class token vs. pooling, variant, heads, missing / unexpected keys, shapes) so that a
wrong file fails with one message saying what is wrong and what to do, before any weight is copied.

Official layouts handled (keys may sit under "opt/target/", "params/" or "params/img/"):
- google-research/vision_transformer: `Transformer/posembed_input/pos_embedding` (class-token slot
  included), blocks with `LayerNorm_0`, `MultiHeadDotProductAttention_1`, `LayerNorm_2`, `MlpBlock_3`.
- big_vision: top-level `pos_embedding` (patch grid only: the class token is added after it),
  blocks with `LayerNorm_0`, `MultiHeadDotProductAttention_0`, `LayerNorm_1`, `MlpBlock_0`, and
  scanned encoders (`Transformer/encoderblock/...` with the layer as leading axis).
"""

import math
import os
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from model.pos_embed import resample_pos_embed
from model.variants import SIZES, parse_variant
from model.vit import VisionTransformer

OFFICIAL_PREFIXES = ("", "opt/target/", "params/", "params/img/")
# containers that training scripts commonly wrap a state dict in
WRAPPER_KEYS = ("state_dict", "model", "module", "model_state_dict")
# prefixes added by DDP / DeepSpeed ("module.") and torch.compile ("_orig_mod.")
TORCH_KEY_PREFIXES = ("module.", "_orig_mod.")


class CheckpointMismatchError(ValueError):
    """The checkpoint does not fit the model; the message names the key(s), shapes and the fix."""


@dataclass(frozen=True)
class LoadInfo:
    """What `load_checkpoint` did."""

    source_format: str  # "npz" (official JAX layout) or "torch" (timm / this package)
    skipped: tuple[str, ...]  # checkpoint keys not loaded (the head, with drop_head=True)
    pos_embed_grid: tuple[int, int] | None  # (checkpoint grid, model grid) when resampled


# --------------------------------------------------------------------------------------------------
# Reading


def _read(source: str | os.PathLike | Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    if isinstance(source, Mapping):
        state = _unwrap(dict(source))
        official = any(isinstance(v, np.ndarray) for v in state.values()) or any("/" in k for k in state)
        return state, "npz" if official else "torch"
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint {path} does not exist (load_checkpoint reads local files only).")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}, "npz"
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path, device="cpu"), "torch"
    if suffix in (".pth", ".pt", ".bin"):
        return _unwrap(torch.load(path, map_location="cpu", weights_only=True)), "torch"
    raise ValueError(f"Unknown checkpoint format {path.name!r}: expected .npz, .pth, .pt, .bin or .safetensors.")


def _unwrap(obj: Any) -> dict[str, Any]:
    while isinstance(obj, Mapping):
        inner = [k for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)]
        if not inner:
            return dict(obj)
        obj = obj[inner[0]]
    raise ValueError(f"Checkpoint does not contain a state dict (got {type(obj).__name__}).")


# --------------------------------------------------------------------------------------------------
# Translating key layouts to ours. Each returns (state, origin) where origin maps our key to the
# checkpoint key it came from, so that errors speak the checkpoint's language.


def _from_torch(raw: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    keys = list(raw)
    for prefix in TORCH_KEY_PREFIXES:
        if keys and all(k.startswith(prefix) for k in keys):
            keys = [k[len(prefix) :] for k in keys]
    state, origin = {}, {}
    for new, old in zip(keys, raw, strict=True):
        # timm (< 0.9) and older ports call the representation layer "pre_logits.fc"
        new = new.replace("pre_logits.fc.", "representation.")
        state[new] = torch.as_tensor(raw[old])
        origin[new] = old
    return state, origin


def _to_tensor(key: str, array: np.ndarray) -> torch.Tensor:
    if array.dtype.kind not in "fiu":
        raise CheckpointMismatchError(
            f"{key}: unsupported array dtype {array.dtype} (bfloat16 saved as raw bytes?): "
            "convert the .npz to float32 first."
        )
    return torch.from_numpy(np.ascontiguousarray(array))


# Where the layouts keep the position embedding; only the first includes a class-token slot.
POS_EMBED_KEYS = ("Transformer/posembed_input/pos_embedding", "pos_embedding", "Transformer/pos_embedding")


def _official_prefix(keys: Mapping[str, Any]) -> str:
    """The prefix the official layout's keys sit under (see OFFICIAL_PREFIXES)."""
    prefix = next((p for p in OFFICIAL_PREFIXES if f"{p}embedding/kernel" in keys), None)
    if prefix is None:
        raise CheckpointMismatchError(
            "No 'embedding/kernel' found: this is not a ViT checkpoint in the official JAX layout "
            f"(first keys: {sorted(keys)[:5]})."
        )
    return prefix


def _from_official(raw: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, str], int | None]:
    """JAX/Flax layout -> our names. Also returns the number of heads stored in the q/k/v kernels."""
    prefix = _official_prefix(raw)
    w: dict[str, np.ndarray] = {}
    for key, value in raw.items():
        if not key.startswith(prefix):
            continue  # e.g. optimizer state next to "opt/target/"
        key = key[len(prefix) :]
        scanned = "Transformer/encoderblock/"
        if key.startswith(scanned):  # big_vision scan: layer index is the leading axis
            for i, layer in enumerate(np.asarray(value)):
                w[f"Transformer/encoderblock_{i}/{key[len(scanned) :]}"] = layer
        else:
            w[key] = np.asarray(value)

    state: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    used: set[str] = set()

    def take(src: str) -> np.ndarray:
        if src not in w:
            raise CheckpointMismatchError(
                f"{prefix}{src}: missing from the checkpoint, which otherwise looks like an official ViT "
                "file. The file may be truncated or from a different architecture; re-export it."
            )
        used.add(src)
        return w[src]

    def put(ours: str, src: str, value: np.ndarray) -> None:
        state[ours] = _to_tensor(prefix + src, value)
        origin[ours] = prefix + src

    def dense(ours: str, src: str) -> None:  # Flax kernels are (in, out); torch Linear is (out, in)
        put(f"{ours}.weight", f"{src}/kernel", take(f"{src}/kernel").T)
        put(f"{ours}.bias", f"{src}/bias", take(f"{src}/bias"))

    def norm(ours: str, src: str) -> None:
        put(f"{ours}.weight", f"{src}/scale", take(f"{src}/scale"))
        put(f"{ours}.bias", f"{src}/bias", take(f"{src}/bias"))

    # HWIO conv kernel -> OIHW
    put("patch_embed.proj.weight", "embedding/kernel", take("embedding/kernel").transpose(3, 2, 0, 1))
    put("patch_embed.proj.bias", "embedding/bias", take("embedding/bias"))
    if "cls" in w:
        put("cls_token", "cls", take("cls"))
    for src in POS_EMBED_KEYS:
        if src in w:
            put("pos_embed", src, take(src))
            break

    heads = None
    i = 0
    while f"Transformer/encoderblock_{i}/LayerNorm_0/scale" in w:
        b = f"Transformer/encoderblock_{i}/"
        # vision_transformer numbers the sub-modules in call order; big_vision per module type
        mha, ln2, mlp = (1, 2, 3) if f"{b}MultiHeadDotProductAttention_1/query/kernel" in w else (0, 1, 0)
        attn = f"{b}MultiHeadDotProductAttention_{mha}"
        norm(f"blocks.{i}.norm1", f"{b}LayerNorm_0")
        kernels = [take(f"{attn}/{n}/kernel") for n in ("query", "key", "value")]  # each (D, H, D/H)
        heads = kernels[0].shape[1] if kernels[0].ndim == 3 else heads
        qkv_w = np.concatenate([k.reshape(k.shape[0], -1).T for k in kernels], axis=0)  # (3D, D)
        qkv_b = np.concatenate([take(f"{attn}/{n}/bias").reshape(-1) for n in ("query", "key", "value")])
        put(f"blocks.{i}.attn.qkv.weight", f"{attn}/{{query,key,value}}/kernel", qkv_w)
        put(f"blocks.{i}.attn.qkv.bias", f"{attn}/{{query,key,value}}/bias", qkv_b)
        out = take(f"{attn}/out/kernel")  # (H, D/H, D)
        put(f"blocks.{i}.attn.proj.weight", f"{attn}/out/kernel", out.reshape(-1, out.shape[-1]).T)
        put(f"blocks.{i}.attn.proj.bias", f"{attn}/out/bias", take(f"{attn}/out/bias"))
        norm(f"blocks.{i}.norm2", f"{b}LayerNorm_{ln2}")
        dense(f"blocks.{i}.mlp.fc1", f"{b}MlpBlock_{mlp}/Dense_0")
        dense(f"blocks.{i}.mlp.fc2", f"{b}MlpBlock_{mlp}/Dense_1")
        i += 1

    norm("norm", "Transformer/encoder_norm")
    if "pre_logits/kernel" in w:
        dense("representation", "pre_logits")
    if "head/kernel" in w:
        dense("head", "head")

    for key in sorted(set(w) - used):
        # keep what we do not understand so that the generic check reports it as unexpected
        state[key] = torch.empty(0)
        origin[key] = prefix + key
    return state, origin, heads


# --------------------------------------------------------------------------------------------------
# Checking


def _variant_name(width: int, depth: int, patch: int, mlp: int) -> str | None:
    size = next((s for s, (w, d, _, m) in SIZES.items() if (w, d, m) == (width, depth, mlp)), None)
    return f"{size}/{patch}" if size else None


def _describe(width: int, depth: int, patch: int, mlp: int, heads: int | None = None) -> str:
    guess = _variant_name(width, depth, patch, mlp) or "of no known size"
    head_text = f", {heads} heads" if heads else ""
    return f"{guess} (width {width}, depth {depth}, MLP {mlp}, patch {patch}{head_text})"


def _checkpoint_shape(state: dict[str, torch.Tensor]) -> tuple[int, int, int, int] | None:
    try:
        w = state["patch_embed.proj.weight"]
        depth = sum(1 for k in state if k.startswith("blocks.") and k.endswith(".norm1.weight"))
        return w.shape[0], depth, w.shape[-1], state["blocks.0.mlp.fc1.weight"].shape[0]
    except (KeyError, IndexError):
        return None


def npz_shapes(file: IO[bytes]) -> dict[str, tuple[int, ...]]:
    """Every array's shape in an .npz, read from the member headers only: no weight is loaded, so a remote
    multi-gigabyte checkpoint can be checked through a seekable file object in a few small reads."""
    shapes = {}
    try:
        with zipfile.ZipFile(file) as archive:
            for name in archive.namelist():
                if not name.endswith(".npy"):
                    continue
                with archive.open(name) as member:
                    version = np.lib.format.read_magic(member)
                    read_header = (
                        np.lib.format.read_array_header_1_0
                        if version == (1, 0)
                        else np.lib.format.read_array_header_2_0
                    )
                    shapes[name[: -len(".npy")]] = tuple(read_header(member)[0])
    except (zipfile.BadZipFile, ValueError) as exc:
        raise CheckpointMismatchError(f"Not a readable .npz archive ({exc}).") from None
    return shapes


@dataclass(frozen=True)
class NpzArchitecture:
    """What an official .npz says about its network, read from its array headers (see `npz_architecture`)."""

    width: int
    depth: int
    patch_size: int
    mlp_dim: int
    num_heads: int | None
    pool: str  # "token" when it has a class token, else "gap"
    representation_size: int | None  # the pre-logits layer's width, None without one
    grid: int | None  # patches per side of its position embedding (its pre-training resolution / patch size)

    @property
    def img_size(self) -> int | None:
        return None if self.grid is None else self.grid * self.patch_size


def npz_architecture(file: IO[bytes]) -> NpzArchitecture:
    """The network an official .npz holds, from its array headers only: a job checks a remote multi-gigabyte
    checkpoint against the requested variant with a few small reads, before it fans out work that loads it."""
    shapes = npz_shapes(file)
    prefix = _official_prefix(shapes)
    ours = {k[len(prefix) :]: v for k, v in shapes.items() if k.startswith(prefix)}
    patch, width = ours["embedding/kernel"][0], ours["embedding/kernel"][-1]
    scanned = "Transformer/encoderblock/"
    blocks = {int(m.group(1)) for k in ours if (m := re.match(r"Transformer/encoderblock_(\d+)/", k))}
    depth, mlp, heads = len(blocks), None, None
    for key, shape in ours.items():
        if not key.startswith((scanned, "Transformer/encoderblock_0/")):
            continue
        inner = shape[1:] if key.startswith(scanned) else shape
        if key.startswith(scanned):
            depth = shape[0]
        if re.search(r"/MlpBlock_\d+/Dense_0/kernel$", key):
            mlp = inner[-1]
        elif key.endswith("/query/kernel"):
            heads = inner[-2]
    if mlp is None:
        raise CheckpointMismatchError("No MLP kernel found in the first encoder block: not a plain ViT checkpoint.")
    has_cls = "cls" in ours
    grid = None
    for key in POS_EMBED_KEYS:
        if key in ours:
            tokens = ours[key][-2] - (1 if has_cls and key == POS_EMBED_KEYS[0] else 0)
            side = math.isqrt(tokens)
            grid = side if side * side == tokens else None
            break
    rep = ours["pre_logits/kernel"][-1] if "pre_logits/kernel" in ours else None
    return NpzArchitecture(width, depth, patch, mlp, heads, "token" if has_cls else "gap", rep, grid)


def check_npz_architecture(file: IO[bytes], variant: str, *, pool: str | None = None) -> NpzArchitecture:
    """The checkpoint's `NpzArchitecture`, after checking it holds ViT-``variant`` (and ``pool``, if given): the same
    checks as `load_checkpoint`'s first ones (network shape, heads, class token); CheckpointMismatchError with the
    fix if not.
    """
    want = parse_variant(variant)
    arch = npz_architecture(file)
    found = (arch.width, arch.depth, arch.patch_size, arch.mlp_dim)
    if found != (want.width, want.depth, want.patch_size, want.mlp_dim) or arch.num_heads not in (
        None,
        want.num_heads,
    ):
        name = _variant_name(*found)
        fix = f"use variant {name!r}" if name else "use the checkpoint's width, depth, MLP size and patch size"
        raise CheckpointMismatchError(
            f"Checkpoint is a ViT-{_describe(*found, arch.num_heads)}, not ViT-"
            f"{_describe(want.width, want.depth, want.patch_size, want.mlp_dim, want.num_heads)}: {fix}."
        )
    if pool is not None and arch.pool != pool:
        has = "has a" if arch.pool == "token" else "has no"
        raise CheckpointMismatchError(
            f"The checkpoint {has} class token, but pool={pool!r} was asked for: use pool={arch.pool!r}."
        )
    return arch


def _fail(lines: list[str]) -> None:
    raise CheckpointMismatchError("\n  ".join(lines))


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def load_checkpoint(
    vit: VisionTransformer,
    source: str | os.PathLike | Mapping[str, Any],
    *,
    drop_head: bool = False,
    resample_mode: str = "bilinear",
) -> LoadInfo:
    """Load weights into `vit` in place.

    Args:
        source: a local `.npz` (official JAX layout), `.pth`/`.pt`/`.bin` (loaded with
            weights_only=True) or `.safetensors` file, or an in-memory state dict with timm's or
            this package's key names (or official `/`-separated keys with numpy values).
        drop_head: keep the model's freshly initialised head instead of the checkpoint's
            (fine-tuning on a new label set).
        resample_mode: how to interpolate position embeddings when the patch grids differ
            ("bilinear" as the official JAX code, "bicubic" as timm).

    Raises:
        CheckpointMismatchError (a ValueError) naming the key(s), both shapes and what to do.
    """
    raw, fmt = _read(source)
    heads = None
    if fmt == "npz":
        state, origin, heads = _from_official(raw)
    else:
        state, origin = _from_torch(raw)
    spec = vit.spec
    model_state = vit.state_dict()
    name = f"model {spec.variant} at {spec.img_size}px"

    def where(key: str) -> str:
        src = origin.get(key, key)
        return key if src == key else f"{key} (checkpoint key {src})"

    # 1. Same network? Compare the overall shape first: one clear message beats a list of 150 keys.
    found = _checkpoint_shape(state)
    if found is not None:
        model_desc = _describe(spec.width, spec.depth, spec.patch_size, spec.mlp_dim, spec.num_heads)
        ckpt_desc = _describe(*found, heads)
        if found != (spec.width, spec.depth, spec.patch_size, spec.mlp_dim):
            lines = [f"Checkpoint is a ViT-{ckpt_desc}, but the {name} is a ViT-{model_desc}."]
            for key in ("patch_embed.proj.weight", "blocks.0.mlp.fc1.weight"):
                if _shape(state[key]) != _shape(model_state[key]):
                    lines.append(
                        f"{where(key)}: checkpoint shape {_shape(state[key])}, model shape {_shape(model_state[key])}."
                    )
                    break
            else:  # only the depth differs
                key = f"blocks.{min(found[1], spec.depth)}.norm1.weight"
                side = "checkpoint" if found[1] > spec.depth else "model"
                lines.append(f"{key} exists in the {side} only (checkpoint depth {found[1]}, model {spec.depth}).")
            variant = _variant_name(*found)
            lines.append(
                f"Build the model with create_vit({variant!r}, ...) to load this checkpoint."
                if variant
                else "Build the model with the checkpoint's width, depth, MLP size and patch size."
            )
            _fail(lines)
        if heads is not None and heads != spec.num_heads:
            key = "blocks.0.attn.qkv.weight"
            _fail(
                [
                    f"{where(key)}: checkpoint has {heads} attention heads (query kernel shape "
                    f"{(found[0], heads, found[0] // heads)}), the {name} has {spec.num_heads} "
                    f"(shape {(spec.width, spec.num_heads, spec.head_dim)}).",
                    "The same weights compute a different function with another head split: build the model "
                    "with the checkpoint's variant.",
                ]
            )

    # 2. Class token must agree with the pooling.
    if ("cls_token" in state) != ("cls_token" in model_state):
        has = "has" if "cls_token" in state else "has no"
        want = "token" if "cls_token" in state else "gap"
        _fail(
            [
                f"cls_token: the checkpoint {has} a class token but the {name} uses pool={spec.pool!r}.",
                f"Build the model with pool={want!r} to load this checkpoint.",
            ]
        )

    # 3. Head: drop, or keep and check.
    skipped = []
    if drop_head:
        for key in ("head.weight", "head.bias"):
            if key in state:
                skipped.append(origin.get(key, key))
                del state[key]
            if key in model_state:
                state[key] = model_state[key]
    elif "head.weight" in state and "head.weight" in model_state:
        ckpt_head, model_head = _shape(state["head.weight"]), _shape(model_state["head.weight"])
        if ckpt_head[0] != model_head[0]:
            _fail(
                [
                    f"{where('head.weight')}: checkpoint shape {ckpt_head}, model shape {model_head} "
                    f"(checkpoint has {ckpt_head[0]} classes, the model {model_head[0]}).",
                    "Pass drop_head=True to fine-tune with a new zero-initialised head, or build the model "
                    f"with num_classes={ckpt_head[0]}.",
                ]
            )

    # 4. Position embeddings: add the class-token slot if the checkpoint has none, then resample.
    grids = None
    if "pos_embed" in state and "pos_embed" in model_state:
        pe, target = state["pos_embed"], model_state["pos_embed"]
        if pe.ndim == 2:
            pe = pe.unsqueeze(0)
        prefix = spec.num_prefix_tokens
        if prefix and pe.ndim == 3 and math.isqrt(pe.shape[1]) ** 2 == pe.shape[1] and pe.shape[1] > 1:
            # big_vision (and timm no_embed_class) add the class token after the position
            # embedding: a zero slot for it gives the same function in our layout.
            pe = torch.cat([pe.new_zeros(1, 1, pe.shape[-1]), pe], dim=1)
        if pe.ndim == 3 and pe.shape[-1] == target.shape[-1] and pe.shape[1] != target.shape[1]:
            old = math.isqrt(pe.shape[1] - prefix)
            if old * old != pe.shape[1] - prefix:
                _fail(
                    [
                        f"{where('pos_embed')}: checkpoint shape {_shape(pe)} is not {prefix} prefix token(s) "
                        f"plus a square patch grid; model shape {_shape(target)}.",
                        "Check that the checkpoint is a plain ViT with the same pooling.",
                    ]
                )
            pe = resample_pos_embed(pe, spec.grid_size, num_prefix_tokens=prefix, mode=resample_mode)
            grids = ((old, old), (spec.grid_size, spec.grid_size))
        state["pos_embed"] = pe

    # 5. Key sets must match.
    missing = sorted(set(model_state) - set(state))
    unexpected = sorted(set(state) - set(model_state))
    if missing or unexpected:
        lines = [f"Checkpoint keys do not match the {name}."]
        if missing:
            lines.append(f"Missing from the checkpoint ({len(missing)}): {missing[:8]}")
        if unexpected:
            shown = [origin.get(k, k) for k in unexpected[:8]]
            lines.append(f"Unexpected in the checkpoint ({len(unexpected)}): {shown}")
        if "head.weight" in missing:
            lines.append("The checkpoint has no classifier head: pass drop_head=True to keep the new one.")
        if "head.weight" in unexpected:
            lines.append("The model has no head (num_classes=0): pass drop_head=True to ignore the checkpoint's.")
        if "representation.weight" in unexpected:
            size = _shape(state["representation.weight"])[0]
            lines.append(
                f"The checkpoint has a pre-logits layer: build with representation_size={size} "
                "(and call drop_representation() after loading to remove it for fine-tuning)."
            )
        if "representation.weight" in missing:
            lines.append("The checkpoint has no pre-logits layer: build with representation_size=None.")
        if any(k.startswith(("fc_norm.", "norm_pre.", "attn_pool.", "reg_token", "MAPHead")) for k in unexpected):
            lines.append(
                "This checkpoint uses a ViT variation this package does not implement (norm after pooling, "
                "pre-norm stem, attention pooling or register tokens)."
            )
        _fail(lines)

    # 6. Every remaining shape must match.
    bad = [k for k in model_state if _shape(state[k]) != _shape(model_state[k])]
    if bad:
        lines = [f"Checkpoint shapes do not match the {name}:"]
        lines += [
            f"{where(k)}: checkpoint shape {_shape(state[k])}, model shape {_shape(model_state[k])}" for k in bad[:8]
        ]
        lines.append("Build the model with the checkpoint's variant, img_size, pool and representation_size.")
        _fail(lines)

    vit.load_state_dict(state, strict=True)
    return LoadInfo(source_format=fmt, skipped=tuple(skipped), pos_embed_grid=grids)
