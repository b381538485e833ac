"""The ``eval`` section of a pretraining config: what is evaluated during pretraining, and how often.

Every ``eval.every_steps`` steps the workers measure the held-out loss and top-1 (precision@1 for a sigmoid run) on
``data.eval`` and, for each benchmark named in ``eval.fewshot``, k-shot linear-probe accuracies on frozen
pre-logits features (``pipeline.pretrain.evaluation`` does it). Benchmark names are those of the transfer registry
(``pipeline.transfer.tasks``); the config resolves them here, before launch, into plain ``FewShotSet`` entries of
the ``RunLayout``, so the pretraining workers never import the transfer stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from pipeline import storage
from pipeline.config import paths


def default_benchmark_root() -> str:
    """Where the transfer benchmarks' shards live by default (as for ``jobs/transfer.py``): runs/data."""
    return "file://" + str(paths.home_dir() / "runs" / "data")


class EvalSection(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    every_steps: int = Field(
        default=0,
        ge=0,
        description="Steps between evaluations (and one at the last step); 0 = no evaluation during pretraining.",
    )
    batch_size: int | None = Field(
        default=None, ge=1, description="Images per forward on one worker while evaluating. Default: train.micro_batch."
    )
    fewshot: list[str] = Field(
        default_factory=list,
        description="Transfer benchmarks (names or aliases of pipeline/transfer/tasks.py) probed with k-shot linear "
        "regression on frozen features at each evaluation; shots from their train split, the regulariser chosen on "
        "minival, accuracy on test (as jobs/transfer.py --fewshot does).",
    )
    shots: list[int] = Field(default_factory=lambda: [5], description="Examples per class of each few-shot probe.")
    seeds: int = Field(default=1, ge=1, description="Few-shot draws per shot count (their mean is logged).")
    data_root: str = Field(
        default_factory=default_benchmark_root,
        description="Storage URL under which the few-shot benchmarks' shards live (<root>/<benchmark>/<split>...).",
    )

    @field_validator("fewshot")
    @classmethod
    def _fewshot(cls, value: list[str]) -> list[str]:
        if not value:
            return value
        from pipeline.transfer import tasks  # the registry; the config layer may read it, pretraining may not

        try:
            return [b.name for b in tasks.resolve_benchmarks(value)]
        except ValueError as exc:
            raise ValueError(f"{exc} (e.g. --set eval.fewshot=digits_heldout)") from None

    @field_validator("shots")
    @classmethod
    def _shots(cls, value: list[int]) -> list[int]:
        if not value or any(k < 1 for k in value):
            raise ValueError(f"give one or more positive shot counts, e.g. --set eval.shots=1,5; got {value}")
        return sorted(set(value))

    @field_validator("data_root")
    @classmethod
    def _root(cls, value: str) -> str:
        return storage.check_url(value, field="eval.data_root")


@dataclass(frozen=True)
class FewShotSet:
    """One few-shot benchmark as the workers need it: no registry, just URLs and numbers."""

    name: str
    num_classes: int
    train: str
    minival: str
    test: str
    crop_fraction: float | None  # the benchmark's evaluation crop (None: the whole image)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FewShotSet:
        return cls(**data)


def fewshot_sets(section: EvalSection) -> list[FewShotSet]:
    """The benchmarks of ``eval.fewshot`` resolved against the transfer registry (names were checked already)."""
    if not section.fewshot:
        return []
    from pipeline.transfer import tasks

    sets = []
    for bench in tasks.resolve_benchmarks(section.fewshot):
        urls = {split: bench.split_url(section.data_root, split) for split in ("train", "minival", "test")}
        sets.append(FewShotSet(bench.name, bench.num_classes, crop_fraction=bench.recipe.eval_crop_fraction, **urls))
    return sets
