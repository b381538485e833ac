"""Named pretraining presets: the paper's runs and their tiny CPU siblings, each a function returning a config.

A preset sets what differs from ``PretrainConfig``'s defaults (which are the paper's recipe: Adam (0.9, 0.999),
weight decay 0.1, 10k warmup steps then linear decay, batch 4096, sigmoid cross-entropy, representation layer,
224 px). ``load_config(name, overrides)`` takes the fields a preset set, applies ``--set a.b=value`` overrides and
validates the result; the defaults it left alone (such as run.root) are decided then.

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

A new preset is a function decorated with ``@register`` (its name is the preset's name); give it a tiny sibling.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

from pipeline.config.evaluation import EvalSection
from pipeline.config.overrides import ConfigError, apply_overrides
from pipeline.config.paths import default_runs_root
from pipeline.config.pretrain import (
    CheckpointSection,
    ModelSection,
    OptimSection,
    PretrainConfig,
    ScaleSection,
    TrainSection,
)
from pipeline.data import DataConfig

Preset = Callable[[], PretrainConfig]
PRESETS: dict[str, Preset] = {}
DEFAULT_PRESET = "tiny"


def register(preset: Preset) -> Preset:
    """Make ``preset`` available as ``--config <its function name>``."""
    if preset.__name__ in PRESETS:
        raise ValueError(f"a preset named {preset.__name__!r} is already registered")
    PRESETS[preset.__name__] = preset
    return preset


def get_preset(name: str) -> PretrainConfig:
    if name not in PRESETS:
        raise ConfigError(
            [f"--config {name}: no such preset; choose one of {', '.join(PRESETS)} (and adjust with --set key=value)"]
        )
    return PRESETS[name]()


def load_config(preset: str, overrides: Sequence[str] | None = None) -> PretrainConfig:
    """Preset by name + ``--set`` overrides -> validated config, or ConfigError with every problem found."""
    # Only the fields the preset set: the defaults it left alone are decided at validation, after the overrides
    # (run.root follows $VITPIPE_HOME, and a paper preset's missing data.train is reported with its fix).
    tree = get_preset(preset).model_dump(mode="json", exclude_unset=True)
    tree["preset"] = preset
    keys = {text.partition("=")[0].strip() for text in overrides or []}
    if "data.train" in keys and "data.eval" not in keys:
        # A preset's held-out set belongs to its training set (other data would have other classes): training on
        # other data drops it, and with it the preset's evaluation schedule unless that is set too.
        tree.get("data", {}).pop("eval", None)
        evaluation = tree.get("eval", {})
        if "eval.every_steps" not in keys and not evaluation.get("fewshot"):
            evaluation.pop("every_steps", None)
    return PretrainConfig.from_tree(apply_overrides(tree, overrides or [], PretrainConfig))


# ---------------------------------------------------------------------------------------------------------
# the CPU demo


def demo_data_url() -> str:
    """Where ``jobs/prepare_data.py --source digits --classes 0-4 --split train`` is expected to have written."""
    return default_runs_root() + "/data/digits-0-4/train.manifest.json"


def demo_eval_url() -> str:
    """The demo's held-out set: the minival split of the same digits 0-4, written by ``demo_data_command``."""
    return default_runs_root() + "/data/digits-0-4/minival.manifest.json"


def demo_data_command() -> str:
    out = default_runs_root() + "/data/digits-0-4"
    return f"python jobs/prepare_data.py --source digits --classes 0-4 --split all --out {out} --samples-per-shard 128"


@register
def tiny() -> PretrainConfig:
    """The CPU demo: ViT-Mi/4 at 32 px on digits 0-4, 2 Ray workers with ZeRO-2, ~6 minutes on 2 free cores.
    Evaluated every 100 steps on the held-out digits 0-4 (minival); ``--set data.train=...`` without
    ``data.eval`` trains on other data and drops that evaluation."""
    return PretrainConfig(
        model=ModelSection(variant="Mi/4", representation_size="width", dropout=0.0),
        data=DataConfig(
            train=demo_data_url(),
            eval=demo_eval_url(),
            image_size=32,
            workers=0,  # in-process decoding: the 2 cores are already taken by the 2 trainers
            shuffle_buffer=256,
            # 8x8 digits upsampled: smaller crops zoom into strokes and the features stop transferring to whole
            # digits (measured: digits 5-9 fine-tuned 22.9 % with 0.6-1.0 crops, 43.0 % with 0.9-1.0 at 600 steps).
            crop_scale=(0.9, 1.0),
            flip=False,  # a mirrored digit is another glyph
        ),
        optim=OptimSection(lr=1e-3, weight_decay=0.03, warmup_steps=10),
        train=TrainSection(
            global_batch=64,
            micro_batch=32,
            steps=600,  # ~38k images: fewer leave features no better than random init on digits 5-9
            epochs=None,
            loss="softmax",
            zero_stage=2,
            log_every=10,
        ),
        scale=ScaleSection(workers=2, gpus_per_worker=0, cpus_per_worker=1, max_failures=1),
        checkpoint=CheckpointSection(every_steps=200, keep_last=2),
        eval=EvalSection(every_steps=100),
    )


def tiny_sibling(paper: PretrainConfig) -> PretrainConfig:
    """A paper preset's recipe on the tiny demo's scale (model, data, workers, steps)."""
    small = tiny()
    return small.model_copy(
        update={
            "model": small.model.model_copy(update={"dropout": paper.model.dropout}),
            "optim": small.optim.model_copy(
                update={
                    "lr": paper.optim.lr,
                    "weight_decay": paper.optim.weight_decay,
                    # The same fraction of the run as the paper's 10k of ~300k-1M steps: a few percent.
                    "warmup_steps": max(2, small.train.steps // 12),
                }
            ),
            "train": small.train.model_copy(update={"loss": paper.train.loss, "zero_stage": paper.train.zero_stage}),
        }
    )


# ---------------------------------------------------------------------------------------------------------
# the paper's runs


def _paper(
    variant: str,
    *,
    lr: float,
    weight_decay: float,
    epochs: float,
    workers: int,
    zero_stage: Literal[0, 1, 2, 3],
    dropout: float,
) -> PretrainConfig:
    width = {"B": 768, "L": 1024, "H": 1280}[variant[0]]
    return PretrainConfig(
        model=ModelSection(variant=variant, representation_size=width, dropout=dropout),
        # No training shards: the run must be told where its data is, so the data section is left unvalidated
        # here and load_config refuses it until --set data.train names them (check_data then verifies them).
        data=DataConfig.model_construct(image_size=224, workers=8, shuffle_buffer=10_000),
        optim=OptimSection(lr=lr, weight_decay=weight_decay, warmup_steps=10_000),
        train=TrainSection(
            global_batch=4096,
            micro_batch=4096 // workers,
            epochs=epochs,
            steps=None,
            loss="sigmoid",
            zero_stage=zero_stage,
            log_every=50,
        ),
        scale=ScaleSection(workers=workers, gpus_per_worker=1, cpus_per_worker=8, max_failures=3),
        checkpoint=CheckpointSection(every_steps=2000, keep_last=3),
    )


@register
def vit_b16_i21k() -> PretrainConfig:
    """ViT-B/16 on ImageNet-21k (14M images, 21,843 classes): 90 epochs, lr 1e-3, wd 0.03, dropout 0.1."""
    return _paper("B/16", lr=1e-3, weight_decay=0.03, epochs=90, workers=32, zero_stage=1, dropout=0.1)


@register
def vit_l16_jft() -> PretrainConfig:
    """ViT-L/16 on JFT-300M: 14 epochs (the paper's 7-epoch run: --set train.epochs=7), lr 4e-4, wd 0.1."""
    return _paper("L/16", lr=4e-4, weight_decay=0.1, epochs=14, workers=64, zero_stage=2, dropout=0.0)


@register
def vit_h14_jft() -> PretrainConfig:
    """ViT-H/14 on JFT-300M: 14 epochs at batch 4096, lr 3e-4, wd 0.1, warmup 10k (2.5k TPUv3-core-days)."""
    return _paper("H/14", lr=3e-4, weight_decay=0.1, epochs=14, workers=128, zero_stage=2, dropout=0.0)


@register
def vit_b16_i21k_tiny() -> PretrainConfig:
    """Tiny CPU sibling of vit_b16_i21k: its recipe on ViT-Mi/4, 32 px digits, 2 CPU workers."""
    return tiny_sibling(vit_b16_i21k())


@register
def vit_l16_jft_tiny() -> PretrainConfig:
    """Tiny CPU sibling of vit_l16_jft: its recipe on ViT-Mi/4, 32 px digits, 2 CPU workers."""
    return tiny_sibling(vit_l16_jft())


@register
def vit_h14_jft_tiny() -> PretrainConfig:
    """Tiny CPU sibling of vit_h14_jft: its recipe on ViT-Mi/4, 32 px digits, 2 CPU workers."""
    return tiny_sibling(vit_h14_jft())
