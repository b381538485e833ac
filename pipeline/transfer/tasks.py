"""The downstream benchmarks a pretrained ViT is transferred to, and their fine-tuning recipes.

Each entry names a benchmark, its number of classes, where its shards live under a data root, and the recipe of
the ViT paper's Table 4: SGD with momentum 0.9, no weight decay, gradient clipping at 1, batch 512, cosine decay
after a short warmup, 384 px (position embeddings resampled), a new zero-initialised head and the representation
layer dropped. The learning rate is swept; the best one on the minival split is chosen and its test accuracy
reported.

Data layout under a root (``--set data_root=gs://bucket/benchmarks``)::

    <root>/<benchmark>/train.manifest.json     (or train-{000000..000099}.tar without a manifest)
    <root>/<benchmark>/minival.manifest.json   held out from train, used to pick the learning rate
    <root>/<benchmark>/test.manifest.json
    <root>/imagenet/real_labels.json           ImageNet ReaL labels of the test split (optional)

VTAB-1k tasks are ``vtab/<task>`` (so ``<root>/vtab/<task>/...``): 800 training + 200 minival examples each,
scored on the full test split; ``vtab`` selects all 19 and their mean accuracy is the VTAB score.

The embedded benchmarks (``digits_heldout``, ``lfw``) are small real datasets that ship with scikit-learn and
scikit-image, with CPU-sized recipes, so the whole transfer study runs on a laptop; their shards default to
``file://<repo>/runs/data/<benchmark>`` (``$VITPIPE_HOME/runs/data`` when set) and are written by
``jobs/prepare_data.py`` (see ``prepare_commands``).
"""

from __future__ import annotations

from typing import Literal

import pydantic

from pipeline import storage
from pipeline.data.sources import SPLITS  # a benchmark's shards are the splits prepare_data writes

REAL_LABELS_FILE = "real_labels.json"

# The paper's fine-tuning sweep (Table 4) for everything but ImageNet and VTAB.
PAPER_LRS = (0.001, 0.003, 0.01, 0.03)


class Recipe(pydantic.BaseModel, extra="forbid", frozen=True):
    """How one benchmark is fine-tuned. One run per learning rate (and per seed)."""

    resolution: int  # fine-tuning image size; position embeddings are resampled when it differs from pretraining
    steps: int
    warmup_steps: int  # linear warmup, then cosine decay to 0
    batch_size: int  # global batch per optimizer step
    lrs: tuple[float, ...]  # the sweep; the best on minival is reported
    momentum: float = 0.9
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # global gradient-norm clip
    seeds: int = 1  # runs per learning rate; >1 for low-data benchmarks, where the spread matters
    # The paper's protocol (appendix B.1.1): the learning rate is chosen on minival, then trained again on
    # train + minival (one run per seed) and those runs' test accuracy is reported. With one learning rate there
    # is nothing to choose and only those runs are made. False: report the selection runs' test accuracy.
    refit: bool = True
    eval_every: int = 0  # evaluate minival/test every this many steps (0: only at the end)
    # Split each batch into micro-batches whose gradients accumulate, to fit memory. None: on a GPU run the sweep's
    # planning picks the largest that fits the GPU (pipeline.planner.plan_transfer_memory); a CPU run takes the
    # whole batch at once.
    micro_batch_size: int | None = None
    # Recompute each block in backward instead of keeping its activations (~1/3 more compute, far less memory).
    # None: turned on by the planning only for a GPU run where no micro-batch fits without it.
    grad_checkpointing: bool | None = None
    # Training augmentation: Inception crop covering this fraction of the image area, and horizontal flips.
    crop_scale: tuple[float, float] = (0.08, 1.0)
    flip: bool = True
    # Evaluation (and few-shot features): resize the whole image (None, as the paper's fine-tuning evaluation), or
    # resize so that the centre crop of this fraction fills the image (the Inception convention, e.g. 0.875).
    eval_crop_fraction: float | None = None
    # Resources one run asks Ray for.
    num_cpus: float = 1.0
    num_gpus: float = 0.0

    @pydantic.model_validator(mode="after")
    def _check(self) -> Recipe:
        def bad(field: str, what: str) -> ValueError:
            return ValueError(f"recipe.{field}: {what} (got {getattr(self, field)!r})")

        for field in ("resolution", "steps", "batch_size", "seeds"):
            if getattr(self, field) < 1:
                raise bad(field, "must be a positive integer")
        if not 0 <= self.warmup_steps < self.steps:
            raise bad("warmup_steps", f"must be >= 0 and below steps={self.steps}")
        if not self.lrs or any(lr <= 0 for lr in self.lrs):
            raise bad("lrs", "give one or more positive learning rates, e.g. lrs=0.003,0.01")
        if len(set(self.lrs)) != len(self.lrs):
            raise bad("lrs", "learning rates must be distinct")
        if not 0 <= self.momentum < 1:
            raise bad("momentum", "must be in [0, 1)")
        if self.weight_decay < 0:
            raise bad("weight_decay", "must be >= 0 (the paper fine-tunes with 0)")
        if self.grad_clip <= 0:
            raise bad("grad_clip", "must be a positive gradient-norm bound (the paper uses 1.0)")
        if self.eval_every < 0:
            raise bad("eval_every", "use 0 (evaluate at the end only) or a positive number of steps")
        if self.micro_batch_size is not None and (self.micro_batch_size < 1 or self.batch_size % self.micro_batch_size):
            raise bad("micro_batch_size", f"must divide batch_size={self.batch_size}")
        if self.eval_crop_fraction is not None and not 0 < self.eval_crop_fraction <= 1:
            raise bad("eval_crop_fraction", "use None (whole image) or a fraction in (0, 1], e.g. 0.875")
        low, high = self.crop_scale
        if not 0 < low <= high <= 1:
            raise bad("crop_scale", "is the (min, max) image-area fraction of a training crop: 0 < min <= max <= 1")
        if self.num_cpus <= 0:
            raise bad("num_cpus", "each run needs a positive number of CPUs")
        if self.num_gpus < 0:
            raise bad("num_gpus", "use 0 for CPU runs or the GPUs one run needs")
        return self

    @property
    def selects_lr(self) -> bool:
        """Whether selection runs (trained on train, judged on minival) are made: always without refit; with refit
        only when there is more than one learning rate to choose from."""
        return not self.refit or len(self.lrs) > 1

    @property
    def accumulation(self) -> int:
        return self.batch_size // (self.micro_batch_size or self.batch_size)


class Benchmark(pydantic.BaseModel, extra="forbid", frozen=True):
    """One downstream task."""

    name: str  # also the directory under the data root
    num_classes: int
    recipe: Recipe
    suite: Literal["paper", "vtab", "embedded"]
    group: Literal["natural", "specialized", "structured"] | None = None  # VTAB task group
    # ImageNet ReaL: a relabelled evaluation of the same fine-tuned model, reported as its own row
    # ("<name>_real"). The file is a JSON list with one list of valid labels per test example, in test order.
    real_labels: bool = False
    # How to create the shards of an embedded benchmark: argument lists of jobs/prepare_data.py (without --out).
    prepare_args: tuple[tuple[str, ...], ...] = ()
    description: str = ""

    def dir_url(self, data_root: str) -> str:
        return storage.join(storage.check_url(data_root, field="data_root"), self.name)

    def split_url(self, data_root: str, split: str) -> str:
        """The manifest URL of one split (the data module also accepts brace-pattern shard URLs)."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}: use one of {SPLITS}")
        return storage.join(self.dir_url(data_root), f"{split}.manifest.json")

    def real_labels_url(self, data_root: str) -> str | None:
        return storage.join(self.dir_url(data_root), REAL_LABELS_FILE) if self.real_labels else None

    def prepare_commands(self, data_root: str) -> list[str]:
        """The commands that write this benchmark's shards under ``data_root`` (embedded benchmarks only)."""
        out = self.dir_url(data_root)
        return [" ".join(["python jobs/prepare_data.py", *args, "--out", out]) for args in self.prepare_args]


# Table 2's largest models were fine-tuned at a higher resolution than Table 4's 384 px (paper, section 4.2).
HIGH_RES_FINETUNE = {"L/16": 512, "H/14": 518}


def finetune_resolution(b: Benchmark, variant: str) -> int:
    """A benchmark's default fine-tuning resolution for a model: its recipe's (Table 4's 384 px for the paper's
    benchmarks and VTAB), except the paper's higher one for ViT-L/16 and H/14 there (384 is not even a multiple of
    14). Embedded benchmarks keep their own small size."""
    from model.variants import parse_variant

    if b.suite == "embedded":
        return b.recipe.resolution
    return HIGH_RES_FINETUNE.get(parse_variant(variant).name, b.recipe.resolution)  # "ViT-L/16" is L/16 too


def _paper(name: str, classes: int, steps: int, lrs: tuple[float, ...], warmup: int, **extra) -> Benchmark:
    # 384 px, batch 512, SGD 0.9, clip 1 (Table 4). The paper gives no warmup length ("short warmup"); ours is
    # our choice. One GPU per run; the micro-batch (and activation checkpointing) that fits it is planned per model.
    recipe = Recipe(resolution=384, steps=steps, warmup_steps=warmup, batch_size=512, lrs=lrs, num_gpus=1.0)
    return Benchmark(name=name, num_classes=classes, recipe=recipe, suite="paper", **extra)


# VTAB-1k (Zhai et al. 2019): task -> (classes, group). Names follow the VTAB/TFDS task names.
VTAB_TASKS: dict[str, tuple[int, str]] = {
    # natural
    "caltech101": (102, "natural"),
    "cifar100": (100, "natural"),
    "dtd": (47, "natural"),
    "oxford_flowers102": (102, "natural"),
    "oxford_iiit_pet": (37, "natural"),
    "sun397": (397, "natural"),
    "svhn": (10, "natural"),
    # specialized
    "patch_camelyon": (2, "specialized"),
    "eurosat": (10, "specialized"),
    "resisc45": (45, "specialized"),
    "diabetic_retinopathy": (5, "specialized"),
    # structured
    "clevr_count": (8, "structured"),
    "clevr_distance": (6, "structured"),
    "dmlab": (6, "structured"),
    "kitti_distance": (4, "structured"),
    "dsprites_location": (16, "structured"),
    "dsprites_orientation": (16, "structured"),
    "smallnorb_azimuth": (18, "structured"),
    "smallnorb_elevation": (9, "structured"),
}
VTAB_GROUPS = ("natural", "specialized", "structured")


def _vtab(task: str) -> Benchmark:
    classes, group = VTAB_TASKS[task]
    # One setting for all 19 tasks (paper, appendix B.1.1): lr 0.01, 2500 steps, chosen on the 200-example
    # minival splits, so the runs train on all 1000 examples (800 train + 200 minival). Warmup is our choice.
    recipe = Recipe(resolution=384, steps=2500, warmup_steps=200, batch_size=512, lrs=(0.01,), num_gpus=1.0)
    return Benchmark(name=f"vtab/{task}", num_classes=classes, recipe=recipe, suite="vtab", group=group)


def _embedded() -> list[Benchmark]:
    # CPU recipes sized so that a whole demo sweep (both benchmarks, pretrained and from scratch) takes a few
    # minutes on 2 cores: a 100-step run of Mi/4 takes ~12 s of one core at 32 px, ~20 s at 40 px.
    # digits_heldout is the low-data benchmark: 3 seeds per learning rate, so the table shows mean +- std. Digits
    # are not flipped (a mirrored digit is another glyph) and are cropped mildly: evaluation sees the whole image,
    # and with 10 images per class a zoomed-in training view is a different task. Same 32 px as the demo's
    # pretraining. lfw is fine-tuned at 40 px while the demo pretrains at 32 px, so position-embedding resampling
    # is exercised as in the paper's 224 -> 384.
    # No refit: digits_heldout's minival is larger than its 10-per-class training set, and folding it in would
    # change what the low-data benchmark measures; lfw follows, which keeps the demo short.
    digits = Recipe(
        resolution=32,
        steps=100,
        warmup_steps=10,
        batch_size=16,
        lrs=(0.01, 0.03),
        seeds=3,
        eval_every=50,
        crop_scale=(0.8, 1.0),
        flip=False,
        refit=False,
    )
    faces = Recipe(
        resolution=40, steps=100, warmup_steps=10, batch_size=16, lrs=(0.01, 0.03), eval_every=50, refit=False
    )
    # The low-data protocol: 10 labelled training images per class, but the full held-out minival and test splits.
    digits_prepare = ("--source", "digits", "--classes", "5-9")
    return [
        Benchmark(
            name="digits_heldout",
            num_classes=5,
            recipe=digits,
            suite="embedded",
            prepare_args=(
                (*digits_prepare, "--split", "train", "--per-class", "10"),
                (*digits_prepare, "--split", "minival"),
                (*digits_prepare, "--split", "test"),
            ),
            description="scikit-learn digits 5-9 (unseen by the demo's pretraining on 0-4), 10 labels per class",
        ),
        Benchmark(
            name="lfw",
            num_classes=2,
            recipe=faces,
            suite="embedded",
            prepare_args=(("--source", "lfw", "--split", "all"),),
            description="scikit-image lfw_subset: 25x25 face vs non-face patches (200 images)",
        ),
    ]


def _build_registry() -> dict[str, Benchmark]:
    entries = [
        _paper("imagenet", 1000, 20_000, (0.003, 0.01, 0.03, 0.06), warmup=500, real_labels=True),
        _paper("cifar10", 10, 10_000, PAPER_LRS, warmup=500),
        _paper("cifar100", 100, 10_000, PAPER_LRS, warmup=500),
        _paper("pets", 37, 500, PAPER_LRS, warmup=50, description="Oxford-IIIT Pets"),
        _paper("flowers102", 102, 500, PAPER_LRS, warmup=50, description="Oxford Flowers-102"),
        *(_vtab(task) for task in VTAB_TASKS),
        *_embedded(),
    ]
    return {b.name: b for b in entries}


REGISTRY: dict[str, Benchmark] = _build_registry()

# Names that expand to several benchmarks.
ALIASES: dict[str, tuple[str, ...]] = {
    "vtab": tuple(f"vtab/{task}" for task in VTAB_TASKS),
    "paper": ("imagenet", "cifar10", "cifar100", "pets", "flowers102", *(f"vtab/{task}" for task in VTAB_TASKS)),
    "embedded": ("digits_heldout", "lfw"),
}


def register_benchmark(benchmark: Benchmark, *, replace: bool = False) -> None:
    """Add a benchmark (e.g. your own dataset) to the registry of this process."""
    if benchmark.name in REGISTRY and not replace:
        raise ValueError(f"benchmark {benchmark.name!r} is already registered; pass replace=True to redefine it")
    REGISTRY[benchmark.name] = benchmark


def known_names() -> list[str]:
    return sorted(ALIASES) + sorted(REGISTRY)


def get(name: str) -> Benchmark:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(known_names())}") from None


def resolve_benchmarks(names: str | list[str] | tuple[str, ...]) -> list[Benchmark]:
    """Benchmarks named by a comma-separated string or a list, aliases expanded, order kept, duplicates dropped."""
    if isinstance(names, str):
        names = [n for n in (part.strip() for part in names.split(",")) if n]
    if not names:
        raise ValueError(f"no benchmarks given; choose from: {', '.join(known_names())}")
    unknown = [n for n in names if n not in ALIASES and n not in REGISTRY]
    if unknown:
        raise ValueError(f"unknown benchmark(s) {', '.join(map(repr, unknown))}; known: {', '.join(known_names())}")
    expanded: list[str] = []
    for name in names:
        for member in ALIASES.get(name, (name,)):
            if member not in expanded:
                expanded.append(member)
    return [REGISTRY[n] for n in expanded]


def vtab_score(accuracies: dict[str, float]) -> tuple[float | None, dict[str, float | None]]:
    """VTAB score = mean accuracy over the 19 tasks, plus the mean per group; None where any task is missing.

    ``accuracies`` maps benchmark names (``vtab/<task>``) to accuracy; a partial VTAB run gets no score rather
    than a mean over whatever finished, which would not be comparable to the paper's.
    """

    def mean_of(tasks: list[str]) -> float | None:
        values = [accuracies.get(f"vtab/{t}") for t in tasks]
        if any(v is None for v in values):
            return None
        return sum(values) / len(values)  # type: ignore[arg-type]

    groups = {g: mean_of([t for t, (_, grp) in VTAB_TASKS.items() if grp == g]) for g in VTAB_GROUPS}
    return mean_of(list(VTAB_TASKS)), groups
