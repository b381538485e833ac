"""Few-shot linear evaluation: regularised least squares on frozen pre-logits features (ViT paper, section 4.1).

For k shots, k training images per class are drawn and a ridge regression maps their features to {-1, 1}^K
targets in closed form. Nothing is trained by gradient descent, so it is cheap enough to run on every benchmark
next to fine-tuning; and only the drawn training images are embedded (`drawn_features`), not the whole training
split. The arithmetic and its choices (big_vision's ``evaluators/fewshot_lsr.py``, the regulariser picked on
minival) are in ``pipeline.linear_probe``, which pretraining's evaluation uses too; import them from there.

``run_fewshot`` is the run a sweep submits (one per benchmark and init): it embeds the drawn shots and the
evaluation splits with the pretrained model and reports ``fewshot_metrics``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import numpy as np
import torch

from pipeline.linear_probe import drawn_features, fewshot_eval, fewshot_metrics
from pipeline.transfer.finetune import MetricSink, RunSpec, device_for
from pipeline.transfer.source import build_model


@torch.no_grad()
def embed(vit: torch.nn.Module, images: torch.Tensor, *, device: torch.device | str = "cpu") -> np.ndarray:
    """Pre-logits features [B, D] of uint8 images [B, 3, S, S] with a frozen model (in eval mode)."""
    from pipeline.data import normalize  # imported late: the data module is only needed where images are read

    return vit.pre_logits(normalize(images.to(device))).float().cpu().numpy()


def extract_features(
    vit: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], *, device: torch.device | str = "cpu"
) -> tuple[np.ndarray, np.ndarray]:
    """Pre-logits features of every image in ``batches`` (uint8 [B, 3, S, S], labels [B]) with a frozen model."""
    vit.eval()
    feats, labels = [], []
    for images, targets in batches:
        feats.append(embed(vit, images, device=device))
        labels.append(targets.cpu().numpy())
    if not feats:
        raise ValueError("no images to extract features from: the split is empty")
    return np.concatenate(feats), np.concatenate(labels).astype(np.int64)


def run_fewshot(spec: RunSpec, log_metrics: MetricSink | None = None) -> dict[str, float]:
    """Few-shot linear accuracy on frozen pre-logits features (regulariser chosen on minival).

    Of the training split only the drawn examples are decoded and embedded (their keys and labels are read first):
    at most 25 shots x classes x seeds, however large the split (ImageNet: 75k of 1.28M images)."""
    from pipeline.data import DataError, build_eval_loader, read_labels
    from pipeline.data.config import join_sources

    device = device_for(spec.num_gpus)
    start = time.perf_counter()
    vit = build_model(spec.source, spec.init, seed=spec.seed).to(device).eval()
    size = vit.spec.img_size  # the features as pretrained: no resampling, no fine-tuning

    def loader(split: str, only_keys: list[str] | None = None, url: str | None = None):
        return build_eval_loader(
            url or spec.urls[split],
            image_size=size,
            batch_size=256,
            crop_fraction=spec.recipe.eval_crop_fraction,
            only_keys=only_keys,
        )

    def split_features(split: str) -> tuple[np.ndarray, np.ndarray]:
        batches = loader(split)
        try:
            return extract_features(vit, batches, device=device)
        except ValueError as exc:  # nothing readable: say which shards were bad
            raise DataError(f"{split} split {spec.urls[split]}: {exc} (bad samples: {batches.bad_by_shard})") from None

    def features_of(keys: list[str]) -> dict[str, np.ndarray]:
        # Only the shards holding these keys are read again (in stored order).
        wanted = set(keys)
        pairs = zip(train_split.keys, train_split.shards, strict=True)
        shards = list(dict.fromkeys(shard for key, shard in pairs if key in wanted))
        out = {}
        for batch in loader("train", only_keys=keys, url=join_sources(shards)).batches():
            out.update(zip(batch.keys, embed(vit, batch.images, device=device), strict=True))
        return out

    train_split = read_labels(spec.urls["train"])
    draws = None
    if len(set(train_split.keys)) == len(train_split.keys):
        try:
            train, draws = drawn_features(
                train_split.keys,
                train_split.labels,
                shots=spec.shots,
                num_classes=spec.num_classes,
                seeds=spec.fewshot_seeds,
                extract=features_of,
            )
        except ValueError as exc:
            raise DataError(
                f"train split {spec.urls['train']}: {exc} (bad samples: {train_split.bad_by_shard})"
            ) from None
    else:  # keys repeat across shards: samples can only be told apart by position, so embed them all
        train = split_features("train")
    result = fewshot_eval(
        train,
        split_features("test"),
        val=split_features("minival"),
        num_classes=spec.num_classes,
        shots=spec.shots,
        seeds=spec.fewshot_seeds,
        draws=draws,
    )
    metrics = fewshot_metrics(result)
    metrics["train_images_embedded"] = float(len(train[1]))
    metrics["seconds"] = time.perf_counter() - start
    (log_metrics or (lambda m, s: None))(metrics, 0)
    return metrics
