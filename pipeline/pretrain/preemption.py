"""Preemption: SIGTERM (a spot or preemptible node's notice, ``kill``, torchrun passing its own SIGTERM on) asks the
run to stop at the next step boundary with a checkpoint, instead of losing up to ``checkpoint.every_steps - 1`` steps.

The handler only sets a flag; the training loop asks every rank at each step boundary (``agreed``, one tiny
all-reduce), so that a signal that reached one rank stops all of them at the same step. The run then writes a
checkpoint of that step and ends with ``preempted`` in its result: the driver closes the MLflow run as KILLED and
``jobs/pretrain.py`` exits with ``EXIT_PREEMPTED``. A resubmission resumes from that checkpoint, redoing no step.

A handler can only be installed from a process's main thread: the local launcher's ranks (plain or under torchrun).
A Ray Train worker runs the training function in a thread of its own, next to Ray's own SIGTERM handler: there
``Preemption`` installs nothing and the worker dies as on SIGKILL (Ray Train restarts from the last checkpoint).
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

# EX_TEMPFAIL: the job did not fail, it was asked to stop; submitting it again resumes it.
EXIT_PREEMPTED = 75


class Preemption:
    """While entered, SIGTERM sets ``requested`` instead of ending the process (main thread only)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None
        self._installed = False

    def __enter__(self) -> Preemption:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
            self._installed = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        if not self.requested:
            log.warning("SIGTERM: checkpointing at the end of this step, then stopping")
        self.requested = True

    def agreed(self, device: torch.device) -> bool:
        """True on every rank when any rank was asked to stop (collective: call it at every step boundary)."""
        flag = torch.tensor([1.0 if self.requested else 0.0], device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)
