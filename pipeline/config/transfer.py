"""Typed configuration of a transfer sweep, validated before Ray starts.

A sweep is described by one ``TransferConfig``: the pretrained model, the benchmarks, few-shot settings and
recipe overrides. ``build_config(fields, sets)`` folds the ``--set key=value`` strings of ``jobs/transfer.py``
into its fields (a transfer setting, a recipe field of every benchmark, or ``<benchmark>.<recipe field>``), each
value typed by the field it sets (the grammar of ``pipeline.config.overrides``: ``lrs=0.003,0.01``,
``lrs=[0.01]``, ``scratch=true``, ``variant=null``), and validates them, raising ``ConfigError`` that names every
bad field. The deeper checks that need the data and the pretrained model (``plan_sweep``) live in
``pipeline.transfer.sweep``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import pydantic

from pipeline import storage
from pipeline.config.overrides import ConfigError, did_you_mean, read_value, split_override, validate
from pipeline.config.paths import default_tracking_uri, home_dir
from pipeline.transfer import tasks


def local_data_root() -> str:
    """Where the embedded benchmarks' shards live by default: runs/data of the checkout (or of $VITPIPE_HOME)."""
    return "file://" + str(home_dir() / "runs" / "data")


class TransferConfig(pydantic.BaseModel, extra="forbid"):
    """One transfer sweep. ``recipe`` overrides apply to every benchmark, ``benchmark_recipes`` to one."""

    pretrained: str  # MLflow run id | export directory URL | official .npz URL
    benchmarks: list[str]  # registry names or aliases ("vtab", "paper", "embedded")
    data_root: str | None = None  # root of <benchmark>/<split>.manifest.json; default: runs/data for embedded ones
    model_label: str | None = None  # column name in comparisons; default: from the pretraining run / export
    # Only for an official .npz checkpoint, which does not name its architecture: the variant must be given; the
    # rest is read from the file's array headers unless set (a set value the file contradicts is an error, except
    # the resolution, which position-embedding resampling bridges).
    variant: str | None = None
    checkpoint_img_size: int | None = None
    checkpoint_pool: Literal["token", "gap"] | None = None
    checkpoint_representation_size: int | None = None
    scratch: bool = False  # also fine-tune the same architecture from random init, with the same budget
    fewshot: tuple[int, ...] = ()  # shot counts for the few-shot linear evaluation (empty: none)
    fewshot_seeds: int = 3
    recipe: dict[str, Any] = pydantic.Field(default_factory=dict)
    benchmark_recipes: dict[str, dict[str, Any]] = pydantic.Field(default_factory=dict)
    num_gpus: float | None = None  # GPUs per run for every benchmark (e.g. 0 on a CPU cluster); default: recipe's
    # The GPU a run gets, for planning each benchmark's micro-batch and activation checkpointing
    # (pipeline.planner.plan_transfer_memory). auto: the GPU the Ray cluster's resources name
    # (accelerator_type:H100 ...), else the driver's own, else h100; null: no planning and no memory check.
    gpu: Literal["auto", "a100-40", "a100-80", "h100", "h200"] | None = "auto"
    loader_workers: int = 0  # DataLoader worker processes inside each run
    max_retries: int = 0  # Ray retries of a task whose worker died; 0 reports it FAILED at once
    tracking_uri: str = pydantic.Field(default_factory=default_tracking_uri)
    experiment: str = "vit-transfer"
    ray_address: str | None = None  # default: the job's cluster (RAY_ADDRESS) or a local one

    @pydantic.field_validator("fewshot")
    @classmethod
    def _shots(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if any(k < 1 for k in value):
            raise ValueError(f"shot counts must be positive, e.g. fewshot=1,5,10,25; got {list(value)}")
        return tuple(sorted(set(value)))

    @pydantic.field_validator("fewshot_seeds", "checkpoint_img_size", "checkpoint_representation_size")
    @classmethod
    def _positive(cls, value: int | None, info: pydantic.ValidationInfo) -> int | None:
        if value is not None and value < 1:
            raise ValueError(f"{info.field_name} must be >= 1, got {value}")
        return value

    @pydantic.field_validator("loader_workers", "max_retries")
    @classmethod
    def _non_negative(cls, value: int, info: pydantic.ValidationInfo) -> int:
        if value < 0:
            raise ValueError(f"{info.field_name} must be >= 0, got {value}")
        return value

    @pydantic.field_validator("data_root")
    @classmethod
    def _root(cls, value: str | None) -> str | None:
        return None if value is None else storage.check_url(value, field="data_root")


# Settings --set may change directly; recipe and benchmark_recipes are filled from recipe fields instead.
SETTINGS = [name for name in TransferConfig.model_fields if name not in ("recipe", "benchmark_recipes")]
RECIPE_FIELDS = tasks.Recipe.model_fields


def apply_sets(fields: dict[str, Any], sets: Sequence[str]) -> dict[str, Any]:
    """Fold ``key=value`` strings into TransferConfig fields, every value typed by the field it sets.

    ``key`` is a TransferConfig field (``data_root``, ``fewshot``...), a recipe field for every benchmark
    (``steps``, ``lrs``, ``micro_batch_size``...), or ``<benchmark>.<recipe field>`` for one benchmark.
    Every bad key or value is reported at once.
    """
    fields = dict(fields)
    recipe = dict(fields.get("recipe") or {})
    per_bench = {k: dict(v) for k, v in (fields.get("benchmark_recipes") or {}).items()}
    problems = []
    for text in sets:
        try:
            key, raw = split_override(text, example="steps=500")
            name, dot, leaf = key.rpartition(".")
            if dot and leaf in RECIPE_FIELDS:
                per_bench.setdefault(name, {})[leaf] = read_value(key, raw, RECIPE_FIELDS[leaf].annotation)
            elif key in RECIPE_FIELDS:
                recipe[key] = read_value(key, raw, RECIPE_FIELDS[key].annotation)
            elif key in SETTINGS:
                fields[key] = read_value(key, raw, TransferConfig.model_fields[key].annotation)
            else:
                known = [*SETTINGS, *RECIPE_FIELDS, *(f"{name}.{r}" for r in RECIPE_FIELDS if dot)]
                raise ConfigError(
                    [
                        f"--set {key}: unknown key; {did_you_mean(key, known)}use a transfer setting "
                        f"({', '.join(sorted(SETTINGS))}), a recipe field for every benchmark "
                        f"({', '.join(sorted(RECIPE_FIELDS))}), or <benchmark>.<recipe field>"
                    ]
                )
        except ConfigError as exc:
            problems += exc.problems
    if problems:
        raise ConfigError(problems)
    fields["recipe"] = recipe
    fields["benchmark_recipes"] = per_bench
    return fields


def build_config(fields: dict[str, Any], sets: Sequence[str] = ()) -> TransferConfig:
    """TransferConfig from keyword fields plus ``--set`` strings, or ConfigError naming each bad field."""
    return validate(TransferConfig, apply_sets(fields, sets))
