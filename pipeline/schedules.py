"""Learning-rate schedules: a linear warmup, then a decay.

Pretraining follows the paper with a linear decay (``warmup_linear_decay``, applied by ``WarmupLinearDecay``);
fine-tuning with a cosine decay (``warmup_cosine``). Both warm up the same way: the first step already gets
``peak_lr / warmup_steps`` and step ``warmup_steps - 1`` reaches ``peak_lr``.

A small object rather than DeepSpeed's WarmupDecayLR because that one gives lr 0 to the first step and
always decays to 0; this one is a pure function of the step (easy to test and to plot) and is saved and
restored by DeepSpeed's checkpoint like any scheduler (``state_dict`` / ``load_state_dict``).
"""

from __future__ import annotations

import math
from typing import Any


def _warmup(step: int, *, peak_lr: float, warmup_steps: int) -> float:
    return peak_lr * (step + 1) / warmup_steps


def _decay_progress(step: int, *, warmup_steps: int, total_steps: int) -> float:
    """How far ``step`` is through the decay: 0 right after the warmup, 1 at ``total_steps`` (and beyond)."""
    return min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))


def warmup_linear_decay(
    step: int, *, peak_lr: float, warmup_steps: int, total_steps: int, end_lr: float = 0.0
) -> float:
    """Learning rate of optimizer step ``step`` (0-based).

    Rises linearly to ``peak_lr`` over ``warmup_steps`` steps (the first step already gets
    ``peak_lr / warmup_steps``), then falls linearly to ``end_lr`` at ``total_steps``.
    """
    if step < warmup_steps:
        return _warmup(step, peak_lr=peak_lr, warmup_steps=warmup_steps)
    progress = _decay_progress(step, warmup_steps=warmup_steps, total_steps=total_steps)
    return peak_lr + (end_lr - peak_lr) * progress


def warmup_cosine(step: int, *, peak_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based): the same linear warmup, then cosine decay to 0."""
    if step < warmup_steps:
        return _warmup(step, peak_lr=peak_lr, warmup_steps=warmup_steps)
    progress = _decay_progress(step, warmup_steps=warmup_steps, total_steps=total_steps)
    return 0.5 * peak_lr * (1.0 + math.cos(math.pi * progress))


class WarmupLinearDecay:
    """Sets ``lr`` of every param group of ``optimizer`` from ``warmup_linear_decay``.

    ``step()`` is called by DeepSpeed after each optimizer step (not after each micro-batch).
    """

    def __init__(
        self, optimizer: Any, *, peak_lr: float, warmup_steps: int, total_steps: int, end_lr: float = 0.0
    ) -> None:
        self.optimizer = optimizer
        self.peak_lr = peak_lr
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.end_lr = end_lr
        self.steps_done = 0
        self._apply()

    def lr(self, step: int) -> float:
        return warmup_linear_decay(
            step,
            peak_lr=self.peak_lr,
            warmup_steps=self.warmup_steps,
            total_steps=self.total_steps,
            end_lr=self.end_lr,
        )

    def _apply(self) -> None:
        lr = self.lr(self.steps_done)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def step(self, *args: Any, **kwargs: Any) -> None:
        self.steps_done += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {"steps_done": self.steps_done}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps_done = int(state["steps_done"])
        self._apply()
