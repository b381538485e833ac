"""Fault injection for the reliability tests: a real SIGKILL or exception at a named point of a pretraining run.

Off unless ``VITPIPE_FAULTS`` is set (in the driver's environment; ``pipeline.pretrain.run`` forwards it to the Ray
Train workers). Never set it in production. The value is a comma-separated list of ``<action>@<point>:<step>:<rank>``:

- actions: ``kill`` (``SIGKILL`` of the worker's own process: no cleanup, no exception, as the OOM killer or a
  lost node would do it) or ``raise`` (a ``FaultInjected`` exception from that point);
- points, each reached by every rank at every step where it applies:
  ``after_step``    the training loop, after step ``<step>`` was applied (and its ledger line written);
  ``before_marker`` ``checkpoint.save`` on rank 0, after every rank uploaded its files and before the completion
                    marker is written;
  ``mid_upload``    ``checkpoint.save``, in place of this rank's upload: the first file is uploaded whole, the next
                    one only its first half (an object store without atomic writes, or gcsfs's ``fs.open`` when the
                    writer raises, leaves exactly that), then the action fires.

e.g. ``VITPIPE_FAULTS=kill@after_step:6:1`` kills rank 1 right after step 6. Each fault fires once per run: before
acting it writes ``<run_dir>/_faults/<fault>.json`` through ``pipeline.storage``, and a restarted worker that
finds that record goes on.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from pathlib import Path

from pipeline import storage

ENV = "VITPIPE_FAULTS"
ACTIONS = ("kill", "raise")
POINTS = ("after_step", "before_marker", "mid_upload")


class FaultInjected(RuntimeError):
    """Raised by a ``raise@...`` fault."""


@dataclass(frozen=True)
class Fault:
    action: str
    point: str
    step: int
    rank: int

    @property
    def name(self) -> str:
        return f"{self.action}@{self.point}-step{self.step}-rank{self.rank}"


def parse(text: str) -> list[Fault]:
    faults = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        try:
            action_point, step, rank = item.rsplit(":", 2)
            action, point = action_point.split("@")
            fault = Fault(action, point, int(step), int(rank))
        except ValueError:
            example = "kill@after_step:6:1"
            raise ValueError(f"{ENV}: {item!r} is not <action>@<point>:<step>:<rank>, e.g. {example}") from None
        if fault.action not in ACTIONS or fault.point not in POINTS:
            raise ValueError(f"{ENV}: {item!r}: action must be one of {ACTIONS}, point one of {POINTS}")
        faults.append(fault)
    return faults


def record_url(run_dir: str, fault: Fault) -> str:
    return storage.join(run_dir, "_faults", fault.name + ".json")


def _due(point: str, step: int, rank: int, run_dir: str) -> Fault | None:
    """The fault configured for here that has not fired yet in this run; records it as fired."""
    text = os.environ.get(ENV)
    if not text:
        return None
    for fault in parse(text):
        if (fault.point, fault.step, fault.rank) != (point, step, rank):
            continue
        record = record_url(run_dir, fault)
        if storage.exists(record):
            return None  # fired in an earlier attempt: this is the restart
        storage.write_json(record, {"fault": fault.name, "pid": os.getpid()})
        return fault
    return None


def _act(fault: Fault) -> None:
    if fault.action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise FaultInjected(f"injected fault {fault.name} ({ENV})")


def fire(point: str, *, step: int, rank: int, run_dir: str) -> None:
    """Act if a fault is configured for this point, step and rank and has not fired yet in this run."""
    fault = _due(point, step, rank, run_dir)
    if fault is not None:
        _act(fault)


def upload_dir(local_dir: Path, url: str, *, step: int, rank: int, run_dir: str) -> list[str]:
    """``storage.upload_dir``, unless a ``mid_upload`` fault is due here: then half an upload, and the fault."""
    fault = _due("mid_upload", step, rank, run_dir)
    if fault is None:
        return storage.upload_dir(local_dir, url)
    files = sorted(p for p in Path(local_dir).rglob("*") if p.is_file())
    left = {"fault": fault.name, "pid": os.getpid(), "whole": [], "truncated": {}}
    for i, file in enumerate(files[:2]):
        name = file.relative_to(local_dir).as_posix()
        if i == 0:
            storage.put_file(file, storage.join(url, name))
            left["whole"].append(name)
        else:
            size = file.stat().st_size
            storage.write_bytes(storage.join(url, name), file.read_bytes()[: size // 2])
            left["truncated"][name] = {"bytes": size // 2, "of": size}
    storage.write_json(record_url(run_dir, fault), left)  # what the interrupted upload left, for the tests to check
    _act(fault)
    raise AssertionError("unreachable")
