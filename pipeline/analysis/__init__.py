"""Inspect a trained ViT as the paper's section 4.5 does: embedding filters, position embeddings, attention
distance and attention rollout, drawn as PNGs (see `measures` for the quantities, `figures` for the plots).

`check_model` and `check_images` are the cheap checks a job runs before any work (a few small reads);
`load_model`, `read_images`, `analyze` and `write_figures` then do the work.

Models: a pipeline export directory (jobs/pretrain.py), an official JAX ``.npz`` (google-research/vision_transformer
or big_vision layout) or a timm / PyTorch checkpoint (``.pth``, ``.pt``, ``.bin``, ``.safetensors``); the last two
do not name their architecture, so they need the variant (e.g. ``B/16``).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

import model as vit_model
from model.weights import WRAPPER_KEYS
from pipeline import storage
from pipeline.analysis import figures
from pipeline.analysis.measures import (
    Components,
    attention_rollout,
    embedding_components,
    mean_attention_distance,
    patch_distances,
    position_similarity,
    rollout_maps,
)
from pipeline.data import DataError, build_eval_loader, normalize

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
FIGURES = {
    "filters": "embedding_filters.png",
    "position": "position_similarity.png",
    "distance": "attention_distance.png",
    "rollout": "attention_rollout.png",
}
NUMBERS = "analysis.json"
CHUNK = 8  # images per forward pass: bounds the memory of the [B, H, T, T] attention maps of large models


class AnalysisError(ValueError):
    """A problem with the job's inputs that the user must fix; the message names the option and the fix."""


@dataclass(frozen=True)
class ModelSource:
    kind: Literal["export", "npz", "torch"]
    url: str
    variant: str | None  # required for npz and torch checkpoints
    label: str


def check_model(model: str, *, variant: str | None = None) -> ModelSource:
    """Where the model is and what it is, from a few small reads (no weights are loaded)."""
    from pipeline.export import read_export_spec

    try:
        url = storage.check_url(model, field="--model")
    except storage.UnsupportedURLError as exc:
        raise AnalysisError(str(exc)) from None
    name = url.rstrip("/").rsplit("/", 1)[-1]
    if not url.endswith((".npz", *TORCH_SUFFIXES)):
        try:
            info = read_export_spec(url)
        except FileNotFoundError as exc:
            raise AnalysisError(
                f"--model: {exc} An official checkpoint must end in .npz, a timm one in {', '.join(TORCH_SUFFIXES)}."
            ) from None
        variant, metadata = info["spec"]["variant"], info.get("metadata", {})
        if "run_name" in metadata:  # say which pretraining run, and how far it got
            name = metadata["run_name"] + (f", step {metadata['step']}" if "step" in metadata else "")
        return ModelSource("export", url, variant, f"ViT-{variant} ({name})")
    if not storage.exists(url):
        raise AnalysisError(f"--model: {url} does not exist")
    if variant is None:
        raise AnalysisError(f"--variant: the checkpoint {url} does not name its architecture; pass e.g. --variant B/16")
    try:
        variant = vit_model.parse_variant(variant).name
    except ValueError as exc:
        raise AnalysisError(f"--variant: {exc}") from None
    if url.endswith(".npz"):
        try:  # the array headers alone: a wrong variant fails here, before a multi-gigabyte download
            with storage.open_read(url, small_reads=True) as file:
                vit_model.check_npz_architecture(file, variant)
        except ValueError as exc:
            raise AnalysisError(f"--model: {url}: {exc}") from None
        return ModelSource("npz", url, variant, f"ViT-{variant} ({name})")
    return ModelSource("torch", url, variant, f"ViT-{variant} ({name})")


def check_images(url: str) -> str:
    """``url`` back, once its manifest (or the first shard of a pattern) was found."""
    try:
        loader = build_eval_loader(url, image_size=1, batch_size=1)
    except (DataError, storage.UnsupportedURLError) as exc:
        raise AnalysisError(f"--data: {exc}") from None
    if not storage.exists(loader.urls[0]):
        raise AnalysisError(f"--data: the first shard {loader.urls[0]} does not exist; check the URL pattern")
    return url


def load_model(source: ModelSource) -> vit_model.VisionTransformer:
    """The ViT on CPU in fp32, in eval mode, with its pretrained weights (the classifier head is not needed)."""
    from pipeline.export import load_exported_model

    if source.kind == "export":
        vit = load_exported_model(source.url)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / source.url.rsplit("/", 1)[-1]
            storage.get_file(source.url, local)
            try:
                vit = _load_checkpoint(source, local)
            except AnalysisError:
                raise
            except vit_model.CheckpointMismatchError as exc:  # names the keys and the fix
                raise AnalysisError(f"--model: {source.url}: {exc}") from None
            except Exception as exc:  # torch, safetensors and numpy each raise their own errors on a damaged file
                raise AnalysisError(f"--model: cannot read {source.url} ({type(exc).__name__}: {exc})") from None
    return vit.eval()


def _load_checkpoint(source: ModelSource, local: Path) -> vit_model.VisionTransformer:
    assert source.variant is not None
    if source.kind == "npz":
        with local.open("rb") as file:
            arch = vit_model.npz_architecture(file)
        shape = {"img_size": arch.img_size or 224, "pool": arch.pool, "representation_size": arch.representation_size}
        state: Any = local
    else:
        state = _read_torch_state(local)
        shape = _torch_architecture(state, vit_model.parse_variant(source.variant).patch_size)
    vit = vit_model.create_vit(source.variant, num_classes=0, **shape)
    vit_model.load_checkpoint(vit, state, drop_head=True)
    return vit


def _read_torch_state(local: Path) -> dict[str, torch.Tensor]:
    if local.suffix == ".safetensors":
        from safetensors.torch import load_file

        state: Any = load_file(str(local))
    else:
        state = torch.load(local, map_location="cpu", weights_only=True)
    while isinstance(state, dict) and any(isinstance(state.get(k), dict) for k in WRAPPER_KEYS):
        state = next(state[k] for k in WRAPPER_KEYS if isinstance(state.get(k), dict))
    if not isinstance(state, dict):
        raise AnalysisError(f"--model: {local.name} holds a {type(state).__name__}, not a state dict")
    return state


def _torch_architecture(state: dict[str, torch.Tensor], patch_size: int) -> dict[str, Any]:
    """Resolution, pooling and pre-logits width of a timm-style state dict, from its tensors' shapes."""

    def find(suffix: str) -> torch.Tensor | None:
        return next((v for k, v in state.items() if k.endswith(suffix)), None)

    pos_embed, cls_token = find("pos_embed"), find("cls_token")
    representation = find("pre_logits.fc.weight")
    if representation is None:
        representation = find("representation.weight")
    if pos_embed is None:
        raise AnalysisError("--model: the checkpoint has no 'pos_embed': not a ViT state dict")
    tokens = pos_embed.shape[-2]
    # timm's no_embed_class models keep the class token out of the position table; load_checkpoint adds its slot
    patches = tokens - 1 if cls_token is not None and int(tokens**0.5) ** 2 != tokens else tokens
    return {
        "img_size": round(patches**0.5) * patch_size,
        "pool": "token" if cls_token is not None else "gap",
        "representation_size": None if representation is None else representation.shape[0],
    }


def read_images(url: str, image_size: int, count: int) -> torch.Tensor:
    """The first ``count`` readable images of a shard set (stored order), resized and centre-cropped as in
    evaluation: uint8 [n, 3, S, S]."""
    loader = build_eval_loader(url, image_size=image_size, batch_size=count)
    for images, _ in loader:
        return images
    raise AnalysisError(f"--data: {url} holds no readable image")


@dataclass(frozen=True)
class Analysis:
    components: Components
    similarity: torch.Tensor  # [g, g, g, g]
    distances: torch.Tensor  # [layers, heads], pixels
    uniform_distance: float  # what attention spread evenly over the patches would give, pixels
    rollout: torch.Tensor  # [n, g, g] for the first rollout images
    num_images: int


def analyze(
    vit: vit_model.VisionTransformer, images: torch.Tensor, *, components: int, rollout_images: int
) -> Analysis:
    """All four analyses of ``vit`` on uint8 ``images`` [n, 3, S, S] (the same images for distance and rollout)."""
    spec = vit.spec
    prefix = spec.num_prefix_tokens
    total = torch.zeros(spec.depth, spec.num_heads)
    rollouts = []
    for start in range(0, len(images), CHUNK):
        chunk = images[start : start + CHUNK]
        maps = vit.attention_maps(normalize(chunk))
        total += mean_attention_distance(maps, prefix, spec.patch_size) * len(chunk)
        if start < rollout_images:
            rollouts.append(rollout_maps(attention_rollout(maps), prefix)[: rollout_images - start])
    return Analysis(
        components=embedding_components(vit.patch_embed.proj.weight, components),
        similarity=position_similarity(vit.pos_embed, prefix),
        distances=total / len(images),
        uniform_distance=float(patch_distances(spec.grid_size, spec.patch_size).mean()),
        rollout=torch.cat(rollouts),
        num_images=len(images),
    )


def write_figures(
    result: Analysis, images: torch.Tensor, out_url: str, *, label: str, image_size: int, local_dir: Path
) -> dict[str, Path]:
    """Draw the figures into ``local_dir``, upload them (and analysis.json) to ``out_url``; the local files."""
    files = {
        "filters": figures.plot_components(result.components, local_dir / FIGURES["filters"], title=label),
        "distance": figures.plot_attention_distance(
            result.distances,
            local_dir / FIGURES["distance"],
            uniform=result.uniform_distance,
            image_size=image_size,
            images=result.num_images,
            title=label,
        ),
        "position": figures.plot_position_similarity(result.similarity, local_dir / FIGURES["position"], title=label),
        "rollout": figures.plot_rollout(
            images[: len(result.rollout)], result.rollout, local_dir / FIGURES["rollout"], title=label
        ),
    }
    numbers = {
        "model": label,
        "images": result.num_images,
        "image_size": image_size,
        "embedding_explained_variance": [round(float(v), 5) for v in result.components.explained],
        "mean_attention_distance_px": [[round(float(v), 3) for v in layer] for layer in result.distances],
        "uniform_attention_distance_px": round(result.uniform_distance, 3),
    }
    files["numbers"] = local_dir / NUMBERS
    files["numbers"].write_text(json.dumps(numbers, indent=2) + "\n")
    for path in files.values():
        storage.put_file(path, storage.join(out_url, path.name))
    return files


def check_run(tracking_uri: str, run_id: str) -> None:
    """Fail early when the MLflow run the figures should go to does not exist (or MLflow cannot be reached)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient(tracking_uri).get_run(run_id)
    except MlflowException as exc:
        raise AnalysisError(f"--run-id: no MLflow run {run_id} at {tracking_uri} ({exc.message})") from None


def log_artifacts(tracking_uri: str, run_id: str, files: dict[str, Path], *, artifact_path: str = "analysis") -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    for path in files.values():
        client.log_artifact(run_id, str(path), artifact_path=artifact_path)
