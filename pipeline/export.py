"""The exported model: the hand-off between pretraining and transfer.

An export is a directory (any storage URL) holding
- ``model.safetensors``: consolidated fp32 weights, independent of the world size that trained them;
- ``model.json``: the architecture (``vit.spec.to_dict()``) plus free-form metadata (run id, step, ...);
- ``_COMPLETE.json``: written last, so a half-uploaded export is never loaded.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

import model as vit_model
from pipeline import storage

WEIGHTS = "model.safetensors"
SPEC = "model.json"


class ExportNotFoundError(FileNotFoundError):
    """The URL holds no complete exported model."""


def save_exported_model(vit: torch.nn.Module, url: str, *, metadata: dict[str, Any] | None = None) -> str:
    """Write ``vit`` as a complete export at ``url``; returns the normalised URL."""
    url = storage.check_url(url, field="export url")
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in vit.state_dict().items()}
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / WEIGHTS
        save_file(state, str(weights))
        # Drop a stale marker first: if this upload dies half way, the old marker must not vouch for it.
        storage.remove(storage.join(url, storage.COMPLETE_MARKER))
        storage.put_file(weights, storage.join(url, WEIGHTS))
    storage.write_json(storage.join(url, SPEC), {"spec": vit.spec.to_dict(), "metadata": metadata or {}})
    storage.mark_complete(url, {"files": [WEIGHTS, SPEC]})
    return url


def read_export_spec(url: str) -> dict[str, Any]:
    url = storage.check_url(url, field="pretrained model url")
    if storage.read_marker(url) is None:
        hint = (
            "it exists but has no completion marker (an interrupted export?)"
            if storage.exists(storage.join(url, WEIGHTS))
            else "nothing is there"
        )
        raise ExportNotFoundError(
            f"no complete exported model at {url}: {hint}. Pass the export directory written by "
            "jobs/pretrain.py (its MLflow run has the URL in the tag 'export_uri')."
        )
    return storage.read_json(storage.join(url, SPEC))


def load_exported_model(url: str, **overrides: Any) -> torch.nn.Module:
    """Rebuild the exported ViT on CPU in fp32. ``overrides`` go to ``model.create_vit`` (e.g. dropout)."""
    info = read_export_spec(url)
    spec = dict(info["spec"])
    kwargs = {k: spec[k] for k in ("num_classes", "img_size", "pool", "representation_size") if k in spec}
    kwargs.update(overrides)
    vit = vit_model.create_vit(spec["variant"], **kwargs)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / WEIGHTS
        storage.get_file(storage.join(storage.check_url(url), WEIGHTS), local)
        state = load_file(str(local))
    vit_model.load_checkpoint(vit, state)
    return vit


def export_metadata(url: str) -> dict[str, Any]:
    return read_export_spec(url).get("metadata", {})


def describe(url: str) -> str:
    return json.dumps(read_export_spec(url), indent=2)
