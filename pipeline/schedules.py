"""Learning-rate schedule of the paper's pretraining: linear warmup, then linear decay.

A small object rather than DeepSpeed's WarmupDecayLR because that one gives lr 0 to the first step and
always decays to 0; this one is a pure function of the step (easy to test and to plot) and is saved and
restored by DeepSpeed's checkpoint like any scheduler (``state_dict`` / ``load_state_dict``).
"""

from __future__ import annotations

from typing import Any


def warmup_linear_decay(
    step: int, *, peak_lr: float, warmup_steps: int, total_steps: int, end_lr: float = 0.0
) -> float:
    """Learning rate of optimizer step ``step`` (0-based).

    Rises linearly to ``peak_lr`` over ``warmup_steps`` steps (the first step already gets
    ``peak_lr / warmup_steps``), then falls linearly to ``end_lr`` at ``total_steps``.
    """
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return peak_lr + (end_lr - peak_lr) * progress


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
