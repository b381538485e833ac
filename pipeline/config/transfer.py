"""Typed configuration of a transfer sweep, validated before Ray starts.

A sweep is described by one ``TransferConfig``: the pretrained model, the benchmarks, few-shot settings and
recipe overrides. ``build_config(fields, sets)`` folds the ``--set key=value`` strings of ``jobs/transfer.py``
into its fields (a transfer setting, a recipe field of every benchmark, or ``<benchmark>.<recipe field>``) and
validates them, raising ``ConfigError`` that names every bad field. The deeper checks that need the data and the
pretrained model (``plan_sweep``) live in ``pipeline.transfer.sweep``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import pydantic

from pipeline import storage
from pipeline.config import ConfigError, default_tracking_uri, home_dir
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


RECIPE_FIELDS = set(tasks.Recipe.model_fields)
# Fields holding sequences: a single --set value ("lrs=0.01") means a one-element sequence.
SEQUENCE_FIELDS = {"lrs", "fewshot", "benchmarks"}


def parse_value(raw: str) -> Any:
    """``--set`` values: YAML scalars (``0.01``, ``true``, ``null``), lists as ``[a, b]`` or ``a,b``."""
    import yaml

    text = raw.strip()
    if "," in text and not text.startswith(("[", "{")):
        return [yaml.safe_load(part) for part in text.split(",") if part.strip()]
    return yaml.safe_load(text) if text else ""


def apply_sets(fields: dict[str, Any], sets: Sequence[str]) -> dict[str, Any]:
    """Fold ``key=value`` strings into TransferConfig fields.

    ``key`` is a TransferConfig field (``data_root``, ``fewshot``...), a recipe field for every benchmark
    (``steps``, ``lrs``, ``micro_batch_size``...), or ``<benchmark>.<recipe field>`` for one benchmark.
    """
    fields = dict(fields)
    recipe = dict(fields.get("recipe") or {})
    per_bench = {k: dict(v) for k, v in (fields.get("benchmark_recipes") or {}).items()}
    problems = []
    for text in sets:
        key, sep, raw = text.partition("=")
        key = key.strip()
        if not sep or not key:
            problems.append(f"--set {text!r}: expected key=value, e.g. --set steps=500")
            continue
        value = parse_value(raw)
        name, dot, leaf = key.rpartition(".")
        if (leaf or key) in SEQUENCE_FIELDS and not isinstance(value, list):
            value = [value]
        if dot and leaf in RECIPE_FIELDS:
            per_bench.setdefault(name, {})[leaf] = value
        elif key in RECIPE_FIELDS:
            recipe[key] = value
        elif key in TransferConfig.model_fields and key not in ("recipe", "benchmark_recipes"):
            fields[key] = value
        else:
            known = sorted(set(TransferConfig.model_fields) - {"recipe", "benchmark_recipes"})
            problems.append(
                f"--set {key}: unknown key. Use a transfer setting ({', '.join(known)}), a recipe field for every "
                f"benchmark ({', '.join(sorted(RECIPE_FIELDS))}), or <benchmark>.<recipe field>"
            )
    if problems:
        raise ConfigError(problems)
    fields["recipe"] = recipe
    fields["benchmark_recipes"] = per_bench
    return fields


def build_config(fields: dict[str, Any], sets: Sequence[str] = ()) -> TransferConfig:
    """TransferConfig from keyword fields plus ``--set`` strings, or ConfigError naming each bad field."""
    fields = apply_sets(fields, sets)
    try:
        return TransferConfig.model_validate(fields)
    except pydantic.ValidationError as exc:
        raise ConfigError(_messages(exc, prefix="")) from None


def _messages(exc: pydantic.ValidationError, prefix: str) -> list[str]:
    out = []
    for err in exc.errors():
        # Model-level checks have no location: their messages already name the field.
        loc = prefix + ".".join(str(p) for p in err["loc"]) if err["loc"] else ""
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field: remove it or fix the spelling"
        out.append(f"{loc}: {msg}" if loc else msg)
    return out
