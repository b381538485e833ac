"""The pretraining run's typed configuration (``PretrainConfig``) and what is derived from it (``RunLayout``).

The schema's own defaults are the paper's pretraining recipe (ViT-B/16, Adam (0.9, 0.999), weight decay 0.1, 10k
warmup steps then linear decay, batch 4096, sigmoid cross-entropy, representation layer, 224 px); the presets
(``presets.py``) change what differs. Three steps, all on the driver and all before any cluster work:

1. ``load_config(preset, overrides)`` (``presets.py``): preset + ``--set`` overrides -> ``PretrainConfig`` (types,
   ranges, batch arithmetic), or ``ConfigError`` naming every bad field and what to do.
2. ``check_data`` (``pipeline.data``) on ``cfg.data``: shards reachable and non-empty, dataset size.
3. ``make_layout(cfg, data_info)``: everything derived (steps, gradient accumulation, classes, URLs) in one frozen
   ``RunLayout`` that the workers receive.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from model.variants import parse_variant, resolution_problem
from pipeline import storage
from pipeline.config import paths
from pipeline.config.evaluation import EvalSection, fewshot_sets
from pipeline.config.overrides import ConfigError, validate
from pipeline.data import DataConfig
from pipeline.data.config import split_sources

RUN_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class Section(BaseModel):
    # Unknown keys are errors (a typo must not silently fall back to a default); assignments are re-validated.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunSection(Section):
    name: str | None = Field(
        default=None,
        description="Run name; a run started again with the same name resumes. Default: the preset's name.",
    )
    root: str = Field(
        default_factory=paths.default_runs_root,
        description="Storage URL (file://, gs://) under which <name>/checkpoints and <name>/export are written.",
    )
    shared_filesystem: bool = Field(
        default=False,
        description="A file:// run.root (and a local SQLite/file tracking.uri) that every Ray node mounts (NFS, "
        "Filestore). Without it both are refused on a cluster of several nodes: each node would keep its own "
        "checkpoints, and rank 0 would log to its own node's store.",
    )
    lease_ttl_s: float = Field(
        default=120.0,
        ge=5.0,
        description="Time to live of the run's lease (one writer per run; renewed every third of it). A second job "
        "with the same run name is refused until it expires; a dead job's lease is taken over after it.",
    )
    storage_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="Seconds a gs:// request may go without a byte from the server before the attempt is given up "
        "(6 attempts): a hung bucket fails a storage call within 6 x this + 36 s instead of 30 minutes.",
    )

    @field_validator("name")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        if value is not None and not RUN_NAME_RE.fullmatch(value):
            raise ValueError(
                f"{value!r} is not a usable run name: use letters, digits, '.', '_' or '-' (at most 128), "
                "e.g. vit_b16_i21k-try2"
            )
        return value

    @field_validator("root")
    @classmethod
    def _root(cls, value: str) -> str:
        return storage.check_url(value, field="run.root")


class ModelSection(Section):
    variant: str = Field(default="B/16", description='ViT variant "<size>/<patch>": Mi/4, Ti/16, B/16, L/16, H/14.')
    pool: Literal["token", "gap"] = "token"
    representation_size: int | Literal["width"] | None = Field(
        default="width",
        description='Size of the tanh pre-logits layer used in pretraining; "width" = the model width, None = none.',
    )
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    attn_dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    num_classes: int | None = Field(
        default=None, ge=1, description="Classifier outputs. Default: the number of classes check_data finds."
    )
    head_bias_init: float | None = Field(
        default=None,
        description="Initial head bias. Default: -log(num_classes) for sigmoid loss (the paper's -10 for ~20k "
        "classes: every class starts unlikely), 0 for softmax.",
    )

    @field_validator("variant")
    @classmethod
    def _variant(cls, value: str) -> str:
        return parse_variant(value).name

    @field_validator("representation_size")
    @classmethod
    def _representation(cls, value: int | str | None) -> int | str | None:
        if isinstance(value, int) and value < 1:
            raise ValueError('use a positive size, "width", or null for no representation layer')
        return value


class OptimSection(Section):
    lr: float = Field(default=8e-4, gt=0, description="Peak learning rate (after warmup).")
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(default=1e-8, gt=0)
    weight_decay: float = Field(default=0.1, ge=0, description="Decoupled (AdamW) weight decay on weight matrices.")
    warmup_steps: int = Field(default=10_000, ge=1)
    end_lr: float = Field(default=0.0, ge=0, description="Learning rate reached by the linear decay at the last step.")
    grad_clip: float = Field(default=1.0, gt=0, description="Global gradient-norm clipping.")

    @field_validator("betas")
    @classmethod
    def _betas(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in value):
            raise ValueError(f"both Adam betas must be in [0, 1), e.g. [0.9, 0.999]; got {list(value)}")
        return value


class TrainSection(Section):
    global_batch: int = Field(default=4096, ge=1, description="Images per optimizer step over all workers.")
    micro_batch: int = Field(default=32, ge=1, description="Images per forward/backward on one worker.")
    grad_accum: int | None = Field(
        default=None, ge=1, description="Micro-batches per optimizer step. Default: global / (micro x workers)."
    )
    steps: int | None = Field(default=None, ge=1, description="Optimizer steps; give this or train.epochs.")
    epochs: float | None = Field(default=7.0, gt=0, description="Passes over the training set (sets steps).")
    loss: Literal["sigmoid", "softmax"] = "sigmoid"
    zero_stage: Literal[0, 1, 2, 3] = 2
    precision: Literal["auto", "bf16", "fp32"] = Field(
        default="auto", description="auto = bf16 on GPU, fp32 on CPU (bf16 is emulated there and >10x slower)."
    )
    activation_checkpointing: bool = False
    seed: int = 0
    log_every: int = Field(default=50, ge=1, description="Steps between console lines and MLflow metrics.")
    # An audit aid for short runs and the reliability tests (pipeline/pretrain/ledger.py).
    ledger: bool = Field(False, description="Write which samples each rank trained on at each step, per attempt.")
    max_skipped_steps: int = Field(
        default=10,
        ge=0,
        description="Stop the run once DeepSpeed has skipped more optimizer steps than this because their gradients "
        "were not finite (an fp16/bf16 overflow, or a gradient blow-up in fp32 ZeRO-1/2); skipped steps consume "
        "their samples without training on them, and are counted in train/skipped_steps.",
    )
    stop_at_step: int | None = Field(
        default=None,
        ge=1,
        description="Stop (with a checkpoint, without export) after this step; the schedule still spans all "
        "steps, so starting the run again continues it.",
    )

    @model_validator(mode="after")
    def _length(self) -> TrainSection:
        if (self.steps is None) == (self.epochs is None):
            raise ValueError(
                "give exactly one of train.steps and train.epochs (e.g. --set train.steps=1000 --set train.epochs=null)"
            )
        return self


class ScaleSection(Section):
    launcher: Literal["ray", "local"] = Field(
        default="ray",
        description="ray = Ray Train starts scale.workers workers; local = this process is one rank (a world of "
        "one, or one of `torchrun --nproc-per-node N`'s processes): no Ray needed, e.g. for a debugger.",
    )
    workers: int = Field(default=2, ge=1, description="Ray Train workers (one DeepSpeed rank each).")
    gpus_per_worker: int = Field(default=0, ge=0, le=1, description="0 = CPU training, 1 = one GPU per worker.")
    cpus_per_worker: float = Field(default=1.0, gt=0)
    max_failures: int = Field(
        default=0, ge=-1, description="Worker-group restarts Ray Train may do (from the latest checkpoint); -1 = any."
    )
    placement: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    collective_timeout_s: float = Field(
        default=600.0,
        ge=10,
        description="Seconds a collective (all-reduce, barrier) may wait for a peer before the attempt fails (the "
        "process group's timeout): a dead or partitioned worker ends the attempt within it. Raise it if a "
        "checkpoint upload or the export keeps the other ranks waiting longer.",
    )
    gpu: Literal["auto", "a100-40", "a100-80", "h100", "h200"] | None = Field(
        default="auto",
        description="The workers' GPU, for the memory check before launch (pipeline.planner): auto = the driver's "
        "GPU if it has one the planner knows, else h100 (what the paper presets are sized for); null = no check. "
        "CPU workers are checked against the host's available memory instead (null skips that too).",
    )


class CheckpointSection(Section):
    every_steps: int = Field(
        default=1000, ge=1, description="Steps between checkpoints (one is always written at the end)."
    )
    keep_last: int = Field(default=3, ge=1, description="Complete checkpoints kept; older ones are deleted.")


class TrackingSection(Section):
    enabled: bool = True
    uri: str = Field(
        default_factory=paths.default_tracking_uri,
        description="MLflow tracking URI. Default: $MLFLOW_TRACKING_URI, else sqlite:///<repo>/runs/mlflow.db.",
    )
    experiment: str = "vit-pretrain"
    queue_size: int = Field(default=10_000, ge=1, description="Metric records buffered while MLflow is unreachable.")
    flush_timeout_s: float = Field(default=30.0, ge=0, description="How long the end of a run waits for MLflow.")

    @field_validator("uri")
    @classmethod
    def _uri(cls, value: str) -> str:
        if value.startswith("sqlite:///"):
            path = Path(value[len("sqlite:///") :])
            if not path.is_absolute():
                # Relative SQLite paths would follow the process's cwd, which differs between the driver,
                # Ray workers and `ray job submit`'s temporary copy of the code.
                value = "sqlite:///" + str((paths.home_dir() / path).resolve())
        elif not value.startswith(("http://", "https://", "databricks", "file:")):
            raise ValueError(f"{value!r}: use http(s)://host:port of an MLflow server or sqlite:///abs/path.db")
        return value


class PretrainConfig(Section):
    """Everything that defines a pretraining run. Print one with ``python jobs/pretrain.py --print-config``."""

    preset: str = "custom"
    run: RunSection = Field(default_factory=RunSection)
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataConfig
    optim: OptimSection = Field(default_factory=OptimSection)
    train: TrainSection = Field(default_factory=TrainSection)
    scale: ScaleSection = Field(default_factory=ScaleSection)
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)
    tracking: TrackingSection = Field(default_factory=TrackingSection)
    eval: EvalSection = Field(default_factory=EvalSection)

    @model_validator(mode="after")
    def _cross_field(self) -> PretrainConfig:
        problems = []
        resolution = resolution_problem(self.data.image_size, self.model.variant, field="data.image_size")
        if resolution:
            problems.append(resolution)
        per_round = self.train.micro_batch * self.scale.workers
        if self.train.global_batch % per_round:
            choices = [
                m
                for m in range(1, self.train.global_batch + 1)
                if self.train.global_batch % (m * self.scale.workers) == 0
            ]
            hint = (
                f"pick train.micro_batch from {choices[-6:]}"
                if choices
                else f"make train.global_batch a multiple of scale.workers={self.scale.workers}"
            )
            problems.append(
                f"train.global_batch={self.train.global_batch} is not divisible by train.micro_batch="
                f"{self.train.micro_batch} x scale.workers={self.scale.workers} = {per_round}: {hint}"
            )
        elif self.train.grad_accum is not None and self.train.grad_accum * per_round != self.train.global_batch:
            problems.append(
                f"train.grad_accum={self.train.grad_accum} x micro_batch={self.train.micro_batch} x workers="
                f"{self.scale.workers} = {self.train.grad_accum * per_round} != train.global_batch="
                f"{self.train.global_batch}: drop train.grad_accum (it is derived) or fix one of them"
            )
        if self.train.steps is not None and self.optim.warmup_steps >= self.train.steps:
            problems.append(
                f"optim.warmup_steps={self.optim.warmup_steps} must be smaller than train.steps={self.train.steps}"
            )
        if (
            self.train.stop_at_step is not None
            and self.train.steps is not None
            and self.train.stop_at_step > self.train.steps
        ):
            problems.append(
                f"train.stop_at_step={self.train.stop_at_step} is past train.steps={self.train.steps}: "
                "lower it or drop it"
            )
        if self.eval.every_steps and self.data.eval is None and not self.eval.fewshot:
            problems.append(
                f"eval.every_steps={self.eval.every_steps} but there is nothing to evaluate: set data.eval (held-out "
                "shards) and/or eval.fewshot (benchmarks), or set eval.every_steps=0"
            )
        if self.eval.fewshot and not self.eval.every_steps:
            problems.append("eval.fewshot is set but eval.every_steps=0 never evaluates: set e.g. eval.every_steps=500")
        if self.scale.launcher == "local" and self.data.engine == "ray":
            problems.append(
                "data.engine=ray needs Ray Data, which scale.launcher=local does without: use data.engine=webdataset "
                "or scale.launcher=ray"
            )
        if problems:
            raise ValueError("\n".join(problems))
        if self.train.precision == "bf16" and self.scale.gpus_per_worker == 0:
            warnings.warn(
                "train.precision=bf16 on CPU workers: bf16 matrix math is emulated on CPU and >10x slower than fp32",
                stacklevel=2,
            )
        return self

    @property
    def run_name(self) -> str:
        return self.run.name or self.preset

    @property
    def on_gpu(self) -> bool:
        return self.scale.gpus_per_worker > 0

    @property
    def use_bf16(self) -> bool:
        return self.train.precision == "bf16" or (self.train.precision == "auto" and self.on_gpu)

    def flat(self) -> dict[str, Any]:
        """Dotted keys -> values (lists as JSON), e.g. for MLflow params."""
        return flatten(self.model_dump(mode="json"))

    @classmethod
    def from_tree(cls, tree: dict[str, Any]) -> PretrainConfig:
        """The validated config of a nested settings tree (a preset's plus overrides), or ConfigError naming every
        bad field and what to do."""
        preset = tree.get("preset", "?")
        no_data = (
            f"the preset {preset!r} names no training shards: pass --set data.train=gs://<bucket>/<path>/"
            "train-{000000..001023}.tar (or a manifest URL written by jobs/prepare_data.py)"
        )
        return validate(cls, tree, missing={"data.train": no_data})


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, path + "."))
        elif isinstance(value, list | tuple):
            flat[path] = json.dumps(value)
        else:
            flat[path] = value
    return flat


def check_durable_defaults(cfg: PretrainConfig) -> list[str]:
    """Paths inside Ray's temporary copy of the code (e.g. a relative --set), where nothing survives the job."""
    if not paths.in_ray_job_copy():
        return []

    def inside_copy(local: Path | None) -> bool:
        return local is not None and local.resolve().is_relative_to(paths.REPO_ROOT.resolve())

    # The defaults are under paths.home_dir(), outside the copy; only a path given explicitly can be inside it.
    fix = (
        f"Ray deletes it after the job: give a path outside it (an absolute one), or drop the setting to use the "
        f"default under {paths.home_dir() / 'runs'} (set {paths.HOME_ENV} to move that)"
    )
    problems = []
    if inside_copy(storage.local_path(cfg.run.root)):
        problems.append(f"run.root: {cfg.run.root} is inside Ray's temporary copy of the code: {fix}")
    sqlite = cfg.tracking.uri.startswith("sqlite:///")
    if cfg.tracking.enabled and sqlite and inside_copy(Path(cfg.tracking.uri[len("sqlite:///") :])):
        problems.append(f"tracking.uri: the SQLite store {cfg.tracking.uri} is inside Ray's temporary copy: {fix}")
    if any(inside_copy(storage.local_path(source)) for source in split_sources(cfg.data.train)):
        problems.append(f"data.train: {cfg.data.train} is inside Ray's temporary copy of the code: {fix}")
    return problems


# ---------------------------------------------------------------------------------------------------------
# the run layout: everything derived, decided once on the driver


@dataclass(frozen=True)
class RunLayout:
    """How a run is laid out, derived once on the driver from the config and the data: where it writes, how the
    global batch splits over workers and micro-batches, how many steps, classes and which head. The workers
    receive it and decide nothing on their own."""

    run_name: str
    run_dir: str
    checkpoint_dir: str
    export_dir: str
    world_size: int
    micro_batch: int
    grad_accum: int
    global_batch: int
    total_steps: int
    stop_step: int  # last step this invocation trains (== total_steps unless train.stop_at_step)
    warmup_steps: int
    num_classes: int
    head_bias_init: float
    representation_size: int | None
    samples_per_epoch: int | None
    class_names: list[str] | None
    bf16: bool
    resume_step: int | None = None  # set by train.preflight when a complete checkpoint exists: the workers must find it
    # eval.fewshot resolved against the transfer registry (``config.evaluation.FewShotSet`` as dicts, so that the
    # layout stays plain data on its way to the workers).
    fewshot_sets: tuple[dict[str, Any], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def make_layout(cfg: PretrainConfig, info: Any) -> RunLayout:
    """Derive the run's numbers from the config and ``check_data``'s ``DataInfo``; ConfigError if impossible."""
    problems = []
    num_classes = cfg.model.num_classes or info.num_classes
    if not num_classes:
        problems.append(
            "model.num_classes: the shards do not say how many classes there are; "
            "set it, e.g. --set model.num_classes=1000"
        )
    elif info.num_classes and cfg.model.num_classes and cfg.model.num_classes < info.num_classes:
        problems.append(
            f"model.num_classes={cfg.model.num_classes} is smaller than the {info.num_classes} classes in data.train: "
            "raise it or drop it (it defaults to the data's)"
        )
    if getattr(info, "multi_label", False) and cfg.train.loss == "softmax":
        problems.append(
            "train.loss: data.train is multi-label (its manifest says multi_label: true) but the softmax loss "
            "trains on one class per image; use --set train.loss=sigmoid (the paper's pretraining loss)"
        )
    total_steps = cfg.train.steps
    if total_steps is None:
        if not info.num_samples:
            problems.append(
                "train.epochs: the dataset size is unknown (no manifest), so epochs cannot become steps; "
                "use --set train.steps=N --set train.epochs=null"
            )
        else:
            total_steps = max(1, math.ceil(cfg.train.epochs * info.num_samples / cfg.train.global_batch))
    if total_steps is not None and cfg.optim.warmup_steps >= total_steps:
        problems.append(
            f"optim.warmup_steps={cfg.optim.warmup_steps} is not below the run's {total_steps} steps: lower it"
        )
    if total_steps is not None and cfg.train.stop_at_step is not None and cfg.train.stop_at_step > total_steps:
        problems.append(f"train.stop_at_step={cfg.train.stop_at_step} is past the run's {total_steps} steps")
    if problems:
        raise ConfigError(problems)
    assert total_steps is not None and num_classes

    width = parse_variant(cfg.model.variant).width
    representation = width if cfg.model.representation_size == "width" else cfg.model.representation_size
    head_bias = cfg.model.head_bias_init
    if head_bias is None:
        head_bias = -math.log(num_classes) if cfg.train.loss == "sigmoid" else 0.0
    run_dir = storage.join(cfg.run.root, cfg.run_name)
    return RunLayout(
        run_name=cfg.run_name,
        run_dir=run_dir,
        checkpoint_dir=storage.join(run_dir, "checkpoints"),
        export_dir=storage.join(run_dir, "export"),
        world_size=cfg.scale.workers,
        micro_batch=cfg.train.micro_batch,
        grad_accum=cfg.train.global_batch // (cfg.train.micro_batch * cfg.scale.workers),
        global_batch=cfg.train.global_batch,
        total_steps=total_steps,
        stop_step=min(total_steps, cfg.train.stop_at_step or total_steps),
        warmup_steps=cfg.optim.warmup_steps,
        num_classes=num_classes,
        head_bias_init=head_bias,
        representation_size=representation,
        samples_per_epoch=info.num_samples,
        class_names=info.class_names,
        bf16=cfg.use_bf16,
        fewshot_sets=tuple(asdict(s) for s in fewshot_sets(cfg.eval)),
    )
