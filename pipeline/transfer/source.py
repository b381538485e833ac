"""The pretrained model a transfer sweep starts from: where its weights are and which architecture they fit.

``resolve_pretrained`` turns ``--pretrained`` into a ``PretrainedSource`` on the driver, before any run starts: an
MLflow run id (-> the ``export_uri`` tag its pretraining job set), an export directory written by
``pipeline.export``, or an official ``.npz`` checkpoint whose architecture is checked from its array headers
against ``--variant``. ``build_model`` then builds that model inside each run, pretrained or (for the
from-scratch baseline) the same architecture at random.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

import model as vit_model
from pipeline import storage
from pipeline.config import ConfigError

if TYPE_CHECKING:
    from pipeline.config.transfer import TransferConfig

MLFLOW_RUN_ID = re.compile(r"^(runs:/)?([0-9a-f]{32})/?$")
EXPORT_URI_TAG = "export_uri"  # set on the pretraining run by jobs/pretrain.py


@dataclass(frozen=True)
class PretrainedSource:
    """Where the pretrained weights come from and the architecture they fit."""

    kind: Literal["export", "npz"]
    uri: str
    spec: dict[str, Any]  # variant, img_size, pool, representation_size
    label: str
    pretrain_run_id: str | None = None


def resolve_pretrained(cfg: TransferConfig) -> PretrainedSource:
    """``--pretrained`` as an MLflow run id (-> its export), an export directory, or an official .npz."""
    from pipeline.export import read_export_spec

    text = cfg.pretrained.strip()
    run_id = None
    run_label = None
    match = MLFLOW_RUN_ID.fullmatch(text)
    if match:
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        run_id = match.group(2)
        try:
            run = MlflowClient(cfg.tracking_uri).get_run(run_id)
        except MlflowException as exc:
            raise ConfigError(
                [f"pretrained: no MLflow run {run_id} at {cfg.tracking_uri} ({exc.message}); check --tracking-uri"]
            ) from None
        text = run.data.tags.get(EXPORT_URI_TAG, "")
        if not text:
            raise ConfigError(
                [
                    f"pretrained: MLflow run {run_id} has no {EXPORT_URI_TAG!r} tag: it is not a finished pretraining "
                    "run (the tag is set when jobs/pretrain.py exports the model); pass the export URL instead"
                ]
            )
        run_label = run.data.tags.get("model_label") or run.info.run_name
    try:
        url = storage.check_url(text, field="pretrained")
    except storage.UnsupportedURLError as exc:
        raise ConfigError([str(exc)]) from None

    if url.endswith(".npz"):
        if cfg.variant is None:
            raise ConfigError(
                [f"variant: an official checkpoint ({url}) does not name its architecture; pass --variant B/16"]
            )
        if not storage.exists(url):
            raise ConfigError([f"pretrained: {url} does not exist"])
        try:
            variant = vit_model.parse_variant(cfg.variant).name  # "ViT-B/16" -> "B/16"
        except ValueError as exc:
            raise ConfigError([f"variant: {exc}"]) from None
        # From the array headers only (a few small reads, even on gs://): a wrong --variant fails here, once,
        # instead of in every fine-tuning task after its download.
        try:
            with storage.open_read(url, small_reads=True) as file:
                arch = vit_model.check_npz_architecture(file, variant, pool=cfg.checkpoint_pool)
        except (vit_model.CheckpointMismatchError, ValueError) as exc:
            raise ConfigError([f"pretrained: {url}: {exc}"]) from None
        rep = cfg.checkpoint_representation_size
        if rep is not None and rep != arch.representation_size:
            has = f"a {arch.representation_size}-wide" if arch.representation_size else "no"
            raise ConfigError(
                [
                    f"checkpoint_representation_size={rep}: {url} has {has} pre-logits layer; leave the field unset "
                    "to take it from the file"
                ]
            )
        spec = {
            "variant": variant,
            "img_size": cfg.checkpoint_img_size or arch.img_size or 224,
            "pool": arch.pool,
            "representation_size": arch.representation_size,
        }
        label = cfg.model_label or f"ViT-{variant} ({url.rsplit('/', 1)[-1]})"
        return PretrainedSource("npz", url, spec, label, run_id)

    try:
        info = read_export_spec(url)
    except FileNotFoundError as exc:
        raise ConfigError([f"pretrained: {exc}"]) from None
    spec = {k: info["spec"].get(k) for k in ("variant", "img_size", "pool", "representation_size")}
    metadata = info.get("metadata", {})
    run_id = run_id or metadata.get("mlflow_run_id") or metadata.get("run_id")
    label = cfg.model_label or run_label or metadata.get("model_label") or metadata.get("run_name") or spec["variant"]
    return PretrainedSource("export", url, spec, str(label), run_id)


def build_model(source: PretrainedSource, init: str, *, seed: int) -> torch.nn.Module:
    """The pretrained ViT (as exported, with its representation layer), or the same architecture at random."""
    from pipeline.export import load_exported_model

    torch.manual_seed(seed)
    spec = source.spec
    if init == "scratch":
        return vit_model.create_vit(
            spec["variant"],
            num_classes=0,
            img_size=spec["img_size"],
            pool=spec["pool"],
            representation_size=spec["representation_size"],
        )
    if source.kind == "export":
        return load_exported_model(source.uri)
    vit = vit_model.create_vit(
        spec["variant"],
        num_classes=0,
        img_size=spec["img_size"],
        pool=spec["pool"],
        representation_size=spec["representation_size"],
    )
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "checkpoint.npz"
        storage.get_file(source.uri, local)
        vit_model.load_checkpoint(vit, local, drop_head=True)
    return vit
