"""Is the run still sound? Non-finite weights before a checkpoint is marked complete, and optimizer steps DeepSpeed
skipped.

The loss is checked before every optimizer step (``Trainer.check_divergence``), but an update can still blow the
weights up after a finite loss, and a checkpoint saved right then would be offered as the "last good" one.
``nonfinite_weights`` is asked before every save (``checkpoints.save``).

DeepSpeed skips an optimizer step without an error when its gradients are not finite (the ZeRO-1/2 optimizers in
fp32, and the fp16 / bf16 loss scaler or overflow check): the weights and the learning-rate schedule stay where
they were, but the step's samples are consumed. ``SkippedSteps`` counts them from the engine's own counter (which
DeepSpeed saves with each checkpoint, so a resumed run counts on), and says when a run has skipped more than
``train.max_skipped_steps``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def nonfinite_weights(engine: Any) -> list[str]:
    """Names of the parameters holding a NaN or an infinity, on any rank (collective: every rank gets the same list).

    Each rank checks what it holds: the whole module under ZeRO-0/1/2 (whose weights are updated from the fp32
    master partitions after every step), its own partition (``ds_tensor``) of every parameter under ZeRO-3.
    """
    bad = []
    for name, param in engine.module.named_parameters():
        held = getattr(param, "ds_tensor", None)
        held = param if held is None else held
        if held.numel() and not torch.isfinite(held.detach()).all():
            bad.append(name)
    if not (dist.is_available() and dist.is_initialized()):
        return bad
    every_rank: list[list[str]] = [[] for _ in range(dist.get_world_size())]
    dist.all_gather_object(every_rank, bad)
    return sorted({name for names in every_rank for name in names})


class SkippedSteps:
    """Optimizer steps DeepSpeed skipped over this run, read off ``engine.skipped_steps`` after every step."""

    def __init__(self, engine: Any, limit: int) -> None:
        self.engine, self.limit = engine, limit
        self.count = int(engine.skipped_steps)  # restored from the checkpoint on resume

    def after_step(self) -> bool:
        """True when the step just taken was skipped."""
        now = int(self.engine.skipped_steps)
        skipped, self.count = now > self.count, now
        return skipped

    @property
    def over_limit(self) -> bool:
        return self.count > self.limit
