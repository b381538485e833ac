"""The ViT paper's published transfer results (Dosovitskiy et al. 2020, Table 2), used as reference columns.

Top-1 accuracy in percent, mean over three fine-tuning runs as published. Keys are the row names the transfer
sweep writes (``pipeline.transfer.tasks`` names; ``imagenet_real`` is ImageNet evaluated with the ReaL labels and
``vtab`` the mean over the 19 VTAB-1k tasks).
"""

from __future__ import annotations

PAPER_MODELS: tuple[str, ...] = ("ViT-H/14 JFT", "ViT-L/16 JFT", "ViT-L/16 I21k")

PAPER_ACCURACY: dict[str, tuple[float, float, float]] = {
    "imagenet": (88.55, 87.76, 85.30),
    "imagenet_real": (90.72, 90.54, 88.62),
    "cifar10": (99.50, 99.42, 99.15),
    "cifar100": (94.55, 93.90, 93.25),
    "pets": (97.56, 97.32, 94.67),
    "flowers102": (99.68, 99.74, 99.61),
    "vtab": (77.63, 76.28, 72.72),
}

# Pretraining compute of the same three models, in TPUv3-core-days.
PAPER_TPU_CORE_DAYS: tuple[float, float, float] = (2500.0, 680.0, 230.0)


def paper_column(model: str) -> str:
    """Column header of a paper model in comparison tables."""
    return f"{model} (paper)"


def paper_value(row: str, model: str) -> float | None:
    """The published accuracy (percent) of ``model`` on ``row``, or None when the paper has none."""
    values = PAPER_ACCURACY.get(row)
    if values is None:
        return None
    return values[PAPER_MODELS.index(model)]
