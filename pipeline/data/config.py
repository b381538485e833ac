"""Typed configuration of the data path, checked before any cluster work starts."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import pydantic

from pipeline import storage


class DataError(ValueError):
    """A data problem the user must fix (missing shards, too few shards, corrupt data past the threshold...)."""


# The largest image any decode path accepts, by default PIL's own (Image.MAX_IMAGE_PIXELS: 256 MiB of 24-bit
# pixels, e.g. 9459 x 9459). PIL refuses images over twice that whatever we allow: the ceiling of the setting.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485
PIL_HARD_MAX_IMAGE_PIXELS = 2 * DEFAULT_MAX_IMAGE_PIXELS

# Several sources read as one (e.g. a benchmark's train and minival splits), as in WebDataset's URL lists.
SOURCE_SEPARATOR = "::"


def split_sources(url: str) -> list[str]:
    """The sources of a data URL: one, or several joined with ``::``."""
    return [part.strip() for part in url.split(SOURCE_SEPARATOR)]


def join_sources(urls: list[str] | tuple[str, ...]) -> str:
    """One data URL reading ``urls`` (manifests, patterns or shards) as one set; the inverse of `split_sources`."""
    return f" {SOURCE_SEPARATOR} ".join(urls)


def _check_data_url(url: str, field_name: str) -> str:
    try:
        return SOURCE_SEPARATOR.join(storage.check_url(part, field=field_name) for part in split_sources(url))
    except storage.UnsupportedURLError as exc:
        raise ValueError(str(exc)) from None


# The numeric fields' limits: (whether a value is valid, what the error says after "data.<field>").
_LIMITS: dict[str, tuple[Callable[[float], bool], str]] = {
    "image_size": (lambda v: v > 0, "must be a positive number of pixels (e.g. 224 or 32)"),
    "workers": (lambda v: v >= 0, "is the number of DataLoader workers per rank: use 0 or more"),
    "shuffle_buffer": (lambda v: v >= 0, "must be >= 0 (0 disables sample shuffling)"),
    "max_bad_fraction": (lambda v: 0.0 <= v <= 1.0, "is a fraction of samples: use a value in [0, 1]"),
    "max_image_pixels": (
        lambda v: 0 < v <= PIL_HARD_MAX_IMAGE_PIXELS,
        f"is the largest image (height x width) decoded: use 1..{PIL_HARD_MAX_IMAGE_PIXELS} (PIL's own ceiling)",
    ),
}


class DataConfig(pydantic.BaseModel, extra="forbid", frozen=False):
    """Where the training images come from and how they are turned into batches.

    ``train``/``eval`` are either a shard URL pattern with braces (``gs://b/data/train-{000000..000127}.tar``)
    or the URL of a manifest written by ``jobs/prepare_data.py`` (``gs://b/data/train.manifest.json``), or several
    of those joined with ``::``, read as one set (manifests must then agree on the classes).
    """

    train: str
    eval: str | None = None
    image_size: int = 224
    engine: Literal["webdataset", "ray"] = "webdataset"
    workers: int = 4
    shuffle_buffer: int = 2000
    resampled: bool = False
    strict: bool = False
    max_bad_fraction: float = 0.01
    # Larger images are bad samples, refused from their header before decoding (decompression bombs).
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    crop_scale: tuple[float, float] = (0.08, 1.0)
    flip: bool = True
    seed: int = 0

    @pydantic.field_validator("train")
    @classmethod
    def _train_url(cls, value: str) -> str:
        return _check_data_url(value, "data.train")

    @pydantic.field_validator("eval")
    @classmethod
    def _eval_url(cls, value: str | None) -> str | None:
        return None if value is None else _check_data_url(value, "data.eval")

    @pydantic.field_validator(*_LIMITS)
    @classmethod
    def _within_limits(cls, value: float, info: pydantic.ValidationInfo) -> float:
        is_valid, what_to_do = _LIMITS[info.field_name]
        if not is_valid(value):
            raise ValueError(f"data.{info.field_name} {what_to_do}, got {value}")
        return value

    @pydantic.field_validator("crop_scale")
    @classmethod
    def _crop_scale(cls, value: tuple[float, float]) -> tuple[float, float]:
        low, high = value
        if not 0.0 < low <= high <= 1.0:
            raise ValueError(
                f"data.crop_scale is the (min, max) fraction of the image area a training crop covers: "
                f"use 0 < min <= max <= 1, e.g. (0.08, 1.0); got {value}"
            )
        return value


@dataclass
class DataInfo:
    """What the pre-flight check found."""

    num_shards: int
    num_samples: int | None
    num_classes: int | None
    class_names: list[str] | None
    shard_urls: list[str] = field(default_factory=list, repr=False)
    multi_label: bool = False  # the manifest says samples carry several labels (train with the sigmoid loss)
