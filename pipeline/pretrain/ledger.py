"""The step ledger: which samples each rank trained on at each step, and the step's loss, attempt by attempt
(``train.ledger=true``).

An audit aid for short runs and the reliability tests, off by default. Each rank writes its own object per attempt
(a Ray Train restart or a resubmission of the same run is a new attempt)::

    <run_dir>/ledger/rank-00001/attempt-002.jsonl
        {"event": "start", "rank": 1, "attempt": 2, "resumed_from_step": 4, "checkpoint": "gs://.../step_00000004"}
        {"step": 5, "attempt": 2, "keys": ["digits-0003", ...], "epochs": [0, ...], "loss": 1.57}
        ...

A step's line is written after the optimizer applied the step (and after that step's checkpoint, when it has
one). Object stores cannot append, so the attempt's object is rewritten whole after every step: cheap for the
tens of steps this is meant for, quadratic beyond.

Which steps count (``committed``): a step's effect survives only through a checkpoint. Steps an attempt trained
beyond the checkpoint that the next attempt resumed from are lost with the process and done again by the next
attempt; so attempt ``a`` commits the steps in ``(resumed_from(a), resumed_from(a + 1)]``, and the last attempt
commits every step it trained. ``committed`` checks the rest: each attempt starts right after the checkpoint it
resumed from, resumes from a step an earlier attempt reached, and no step is committed twice.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass, field
from typing import Any

from pipeline import storage

ATTEMPT_RE = re.compile(r"^attempt-(\d{3,})\.jsonl$")


class LedgerError(AssertionError):
    """The ledger shows a step trained out of order, skipped, or committed twice."""


def rank_dir(run_dir: str, rank: int) -> str:
    return storage.join(run_dir, "ledger", f"rank-{rank:05d}")


class StepLedger:
    """The writer of one rank in one attempt."""

    def __init__(self, run_dir: str, rank: int, *, resumed_from_step: int, checkpoint: str | None) -> None:
        directory = rank_dir(run_dir, rank)
        taken = [int(m.group(1)) for m in (ATTEMPT_RE.match(u.rsplit("/", 1)[-1]) for u in storage.listdir(directory))]
        self.attempt = max(taken, default=-1) + 1
        self.url = storage.join(directory, f"attempt-{self.attempt:03d}.jsonl")
        start = {
            "event": "start",
            "rank": rank,
            "attempt": self.attempt,
            "resumed_from_step": resumed_from_step,
            "checkpoint": checkpoint,
        }
        self._lines = [json.dumps(start)]
        self._flush()

    def record(self, step: int, keys: list[str], epochs: list[int], loss: float | None = None) -> None:
        entry = {"step": step, "attempt": self.attempt, "keys": keys, "epochs": epochs}
        if loss is not None:
            entry["loss"] = loss  # the step's loss (mean over micro-batches and ranks): runs compare trajectories
        self._lines.append(json.dumps(entry))
        self._flush()

    def _flush(self) -> None:
        storage.write_bytes(self.url, ("\n".join(self._lines) + "\n").encode())


@dataclass(frozen=True)
class Attempt:
    rank: int
    attempt: int
    resumed_from_step: int
    checkpoint: str | None
    steps: dict[int, dict[str, Any]]  # step -> {"keys": [...], "epochs": [...]}
    losses: dict[int, float] = field(default_factory=dict)  # step -> its loss, where it was recorded


def read(run_dir: str) -> dict[int, list[Attempt]]:
    """rank -> its attempts, oldest first."""
    out: dict[int, list[Attempt]] = {}
    for directory in storage.listdir(storage.join(run_dir, "ledger")):
        for url in storage.listdir(directory):
            if not ATTEMPT_RE.match(url.rsplit("/", 1)[-1]):
                continue
            lines = [json.loads(line) for line in storage.read_bytes(url).decode().splitlines() if line.strip()]
            start, entries = lines[0], lines[1:]
            steps: dict[int, dict[str, Any]] = {}
            losses: dict[int, float] = {}
            for entry in entries:
                if entry["step"] in steps:
                    raise LedgerError(f"{url}: step {entry['step']} trained twice in one attempt")
                steps[entry["step"]] = {"keys": entry["keys"], "epochs": entry["epochs"]}
                if "loss" in entry:
                    losses[entry["step"]] = entry["loss"]
            attempt = Attempt(
                start["rank"], start["attempt"], start["resumed_from_step"], start["checkpoint"], steps, losses
            )
            out.setdefault(attempt.rank, []).append(attempt)
    for attempts in out.values():
        attempts.sort(key=lambda a: a.attempt)
    return out


def committed(attempts: list[Attempt]) -> dict[int, dict[str, Any]]:
    """step -> what was trained in it, for the steps that count (see the module docstring); LedgerError if the
    attempts are inconsistent."""
    result: dict[int, dict[str, Any]] = {}
    for i, attempt in enumerate(attempts):
        trained = sorted(attempt.steps)
        start = attempt.resumed_from_step
        if trained and trained != list(range(start + 1, start + 1 + len(trained))):
            raise LedgerError(
                f"rank {attempt.rank} attempt {attempt.attempt} resumed from step {start} but trained {trained}"
            )
        if i + 1 < len(attempts):
            upto = attempts[i + 1].resumed_from_step
            reached = trained[-1] if trained else start
            if upto > reached:
                raise LedgerError(
                    f"rank {attempt.rank} attempt {attempts[i + 1].attempt} resumed from step {upto}, which no "
                    f"earlier attempt reached (attempt {attempt.attempt} stopped at {reached})"
                )
        else:
            upto = trained[-1] if trained else start
        for step in trained:
            if step > upto:
                continue  # trained, then lost with the process: the next attempt did it again
            if step in result:
                raise LedgerError(f"rank {attempt.rank}: step {step} committed twice")
            result[step] = attempt.steps[step]
    return result


def redone(attempts: list[Attempt]) -> list[tuple[int, int]]:
    """(attempt, step) of the steps an attempt trained and lost, i.e. that the next attempt trained again."""
    lost = []
    for attempt, following in itertools.pairwise(attempts):
        lost += [(attempt.attempt, s) for s in sorted(attempt.steps) if s > following.resumed_from_step]
    return lost
