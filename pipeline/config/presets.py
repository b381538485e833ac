"""Named pretraining presets: the paper's runs and their tiny CPU siblings.

A preset is a nested dict of the fields that differ from ``PretrainConfig``'s defaults (which are the paper's
recipe: Adam (0.9, 0.999), weight decay 0.1, 10k warmup steps then linear decay, batch 4096, sigmoid
cross-entropy, representation layer, 224 px). ``--set a.b=value`` then overrides single fields.

Paper presets (Dosovitskiy et al. 2020, Table 3 and Appendix B.1), run on a GPU Ray cluster::

    ray job submit --address http://<head>:8265 --working-dir . -- \\
        python jobs/pretrain.py --config vit_h14_jft \\
        --set data.train=gs://<bucket>/jft/train.manifest.json --set run.root=gs://<bucket>/runs

The paper trained on TPUv3; the worker counts here are GPU equivalents (one H100/H200 per worker, 8 per node)
chosen so that the paper's batch of 4096 splits into micro-batches that fit in 80 GB at bf16 without
activation checkpointing. Steps come from epochs x dataset size (``check_data`` reads the size), e.g.
ViT-H/14: 14 epochs of JFT-300M (303M images) at batch 4096 = 1.04M steps.

Tiny siblings (``<name>_tiny``) keep the recipe's shape -- loss, optimizer, learning rate, weight decay,
dropout, ZeRO stage, representation layer, warmup as a fraction of the run -- and shrink everything else to
what 2 CPU cores can train in minutes: ViT "Mi/4" at 32 px on the scikit-learn digits 0-4, 2 Ray workers.
``tiny`` itself (the default preset) is the CPU demo with a softmax head and ZeRO-2.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from pipeline import config as C


def demo_data_url() -> str:
    """Where ``jobs/prepare_data.py --source digits --classes 0-4 --split train`` is expected to have written."""
    return C.default_runs_root() + "/data/digits-0-4/train.manifest.json"


def demo_data_command() -> str:
    out = C.default_runs_root() + "/data/digits-0-4"
    return (
        f"python jobs/prepare_data.py --source digits --classes 0-4 --split train --out {out} --samples-per-shard 128"
    )


def tiny() -> dict[str, Any]:
    """The CPU demo: ViT-Mi/4 at 32 px on digits 0-4, 2 Ray workers with ZeRO-2, ~6 minutes on 2 free cores."""
    return {
        "model": {"variant": "Mi/4", "representation_size": "width", "dropout": 0.0},
        "data": {
            "train": demo_data_url(),
            "image_size": 32,
            "workers": 0,  # in-process decoding: the 2 cores are already taken by the 2 trainers
            "shuffle_buffer": 256,
            # 8x8 digits upsampled: smaller crops zoom into strokes and the features stop transferring to whole
            # digits (measured: digits 5-9 fine-tuned 22.9 % with 0.6-1.0 crops, 43.0 % with 0.9-1.0 at 600 steps).
            "crop_scale": (0.9, 1.0),
            "flip": False,  # a mirrored digit is another glyph
        },
        "optim": {"lr": 1e-3, "weight_decay": 0.03, "warmup_steps": 10},
        "train": {
            "global_batch": 64,
            "micro_batch": 32,
            "steps": 600,  # ~38k images: fewer leave features no better than random init on digits 5-9
            "epochs": None,
            "loss": "softmax",
            "zero_stage": 2,
            "log_every": 10,
        },
        "scale": {"workers": 2, "gpus_per_worker": 0, "cpus_per_worker": 1, "max_failures": 1},
        "checkpoint": {"every_steps": 200, "keep_last": 2},
    }


def _paper(
    variant: str, *, lr: float, weight_decay: float, epochs: float, workers: int, zero_stage: int, dropout: float
) -> dict[str, Any]:
    width = {"B": 768, "L": 1024, "H": 1280}[variant[0]]
    return {
        "model": {"variant": variant, "representation_size": width, "dropout": dropout},
        # No default shards: the run must be told where its data is (check_data then verifies it).
        "data": {"image_size": 224, "workers": 8, "shuffle_buffer": 10_000},
        "optim": {"lr": lr, "weight_decay": weight_decay, "warmup_steps": 10_000},
        "train": {
            "global_batch": 4096,
            "micro_batch": 4096 // workers,
            "epochs": epochs,
            "steps": None,
            "loss": "sigmoid",
            "zero_stage": zero_stage,
            "log_every": 50,
        },
        "scale": {"workers": workers, "gpus_per_worker": 1, "cpus_per_worker": 8, "max_failures": 3},
        "checkpoint": {"every_steps": 2000, "keep_last": 3},
    }


def vit_b16_i21k() -> dict[str, Any]:
    """ViT-B/16 on ImageNet-21k (14M images, 21,843 classes): 90 epochs, lr 1e-3, wd 0.03, dropout 0.1."""
    return _paper("B/16", lr=1e-3, weight_decay=0.03, epochs=90, workers=32, zero_stage=1, dropout=0.1)


def vit_l16_jft() -> dict[str, Any]:
    """ViT-L/16 on JFT-300M: 14 epochs (the paper's 7-epoch run: --set train.epochs=7), lr 4e-4, wd 0.1."""
    return _paper("L/16", lr=4e-4, weight_decay=0.1, epochs=14, workers=64, zero_stage=2, dropout=0.0)


def vit_h14_jft() -> dict[str, Any]:
    """ViT-H/14 on JFT-300M: 14 epochs at batch 4096, lr 3e-4, wd 0.1, warmup 10k (2.5k TPUv3-core-days)."""
    return _paper("H/14", lr=3e-4, weight_decay=0.1, epochs=14, workers=128, zero_stage=2, dropout=0.0)


def tiny_sibling(parent: Callable[[], dict[str, Any]]) -> Callable[[], dict[str, Any]]:
    """The parent's recipe on the tiny demo's scale (model, data, workers, steps)."""

    def preset() -> dict[str, Any]:
        full, small = parent(), tiny()
        out = copy.deepcopy(small)
        out["model"]["dropout"] = full["model"]["dropout"]
        for key in ("lr", "weight_decay"):
            out["optim"][key] = full["optim"][key]
        out["train"]["loss"] = full["train"]["loss"]
        out["train"]["zero_stage"] = full["train"]["zero_stage"]
        # Keep warmup the same fraction of the run as the paper's 10k of ~300k-1M steps: a few percent.
        out["optim"]["warmup_steps"] = max(2, small["train"]["steps"] // 12)
        return out

    preset.__doc__ = f"Tiny CPU sibling of {parent.__name__}: its recipe on ViT-Mi/4, 32 px digits, 2 CPU workers."
    return preset


PRESETS: dict[str, Callable[[], dict[str, Any]]] = {
    "tiny": tiny,
    "vit_b16_i21k": vit_b16_i21k,
    "vit_l16_jft": vit_l16_jft,
    "vit_h14_jft": vit_h14_jft,
    "vit_b16_i21k_tiny": tiny_sibling(vit_b16_i21k),
    "vit_l16_jft_tiny": tiny_sibling(vit_l16_jft),
    "vit_h14_jft_tiny": tiny_sibling(vit_h14_jft),
}
DEFAULT_PRESET = "tiny"


def get_preset(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise C.ConfigError(
            [f"--config {name}: no such preset; choose one of {', '.join(PRESETS)} (and adjust with --set key=value)"]
        )
    return copy.deepcopy(PRESETS[name]())
