"""Fault injection for the reliability tests: a real SIGKILL or exception at a named point of a pretraining run.

Off unless ``VITPIPE_FAULTS`` is set (in the driver's environment; ``pipeline.pretrain.run`` forwards it to the Ray
Train workers). Never set it in production. The value is a comma-separated list of ``<action>@<point>:<step>:<rank>``:

- actions: ``kill`` (``SIGKILL`` of the worker's own process: no cleanup, no exception, as the OOM killer or a
  lost node would do it), ``raise`` (a ``FaultInjected`` exception from that point) or ``inf_grad`` (at
  ``backward`` only: the step's first micro-batch back-propagates its loss times infinity, so every gradient of
  the step is non-finite while the loss it reports stays finite, as an fp16/bf16 overflow does);
- points, each reached by every rank at every step where it applies:
  ``after_step``    the training loop, after step ``<step>`` was applied (and its ledger line written);
  ``before_marker`` ``checkpoint.save`` on rank 0, after every rank uploaded its files and before the completion
                    marker is written;
  ``backward``      the training step ``<step>``, at the backward pass of its first micro-batch;
  ``mid_upload``    ``checkpoint.save``, in place of this rank's upload: the first file is uploaded whole, the next
                    one only its first half (an object store without atomic writes, or gcsfs's ``fs.open`` when the
                    writer raises, leaves exactly that), then the action fires.

e.g. ``VITPIPE_FAULTS=kill@after_step:6:1`` kills rank 1 right after step 6. Each fault fires once per run: before
acting it writes ``<run_dir>/_faults/<fault>.json`` through ``pipeline.storage``, and a restarted worker that
finds that record goes on.

How a killed process ended is recorded too, so that a test can tell a SIGKILL from any other death: before the
kill a watcher process attaches to the worker with ``ptrace`` (the only way for a process other than the parent,
here Ray's raylet, to receive the exit status), and writes what ``waitpid`` reports to
``<run_dir>/_faults/<fault>.exit.json`` (``exit_signal``: 9 for SIGKILL).
"""

from __future__ import annotations

import ctypes
import math
import os
import select
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline import storage

if TYPE_CHECKING:
    import torch

ENV = "VITPIPE_FAULTS"
ACTIONS = ("kill", "raise", "inf_grad")
POINTS = ("after_step", "before_marker", "mid_upload", "backward")


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
        if (fault.action == "inf_grad") != (fault.point == "backward"):
            raise ValueError(f"{ENV}: {item!r}: inf_grad is the action of the backward point, and only it")
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


def exit_record_url(run_dir: str, fault: Fault) -> str:
    return storage.join(run_dir, "_faults", fault.name + ".exit.json")


def _act(fault: Fault, run_dir: str) -> None:
    if fault.action == "kill":
        _watch_own_exit(exit_record_url(run_dir, fault))
        os.kill(os.getpid(), signal.SIGKILL)
    raise FaultInjected(f"injected fault {fault.name} ({ENV})")


def _watch_own_exit(url: str) -> None:
    """Start a watcher that records how this process ends (``watch_exit``) and wait until it is attached."""
    root = str(Path(__file__).resolve().parents[1])
    code = f"import sys; sys.path.insert(0, {root!r}); from pipeline.faults import watch_exit; watch_exit()"
    watcher = subprocess.Popen(
        [sys.executable, "-c", code, str(os.getpid()), url],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,  # outlives this process and whatever stops its process group
    )
    ready, _, _ = select.select([watcher.stdout], [], [], 60)
    if not ready or watcher.stdout.readline().strip() != "attached":
        storage.write_json(url, {"pid": os.getpid(), "error": "the exit watcher did not attach within 60 s"})


def watch_exit() -> None:
    """``python -c ... <pid> <url>``: attach to process <pid> with ptrace, say "attached", wait for it to end and
    write its exit status to <url>. Signals stopping it on the way are passed on unchanged."""
    ptrace_seize, ptrace_cont, wait_all_threads = 0x4206, 7, 0x40000000
    pid, url = int(sys.argv[1]), sys.argv[2]
    libc = ctypes.CDLL(None, use_errno=True)
    libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
    if libc.ptrace(ptrace_seize, pid, None, None) != 0:
        storage.write_json(url, {"pid": pid, "error": f"ptrace: {os.strerror(ctypes.get_errno())}"})
        print("failed", flush=True)
        return
    print("attached", flush=True)
    while True:
        _, status = os.waitpid(pid, wait_all_threads)
        if os.WIFSIGNALED(status) or os.WIFEXITED(status):
            break
        passed_on = os.WSTOPSIG(status) if os.WIFSTOPPED(status) else 0
        libc.ptrace(ptrace_cont, pid, None, ctypes.c_void_p(passed_on))
    exit_signal = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
    exit_code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
    storage.write_json(url, {"pid": pid, "exit_signal": exit_signal, "exit_code": exit_code})


def fire(point: str, *, step: int, rank: int, run_dir: str) -> None:
    """Act if a fault is configured for this point, step and rank and has not fired yet in this run."""
    fault = _due(point, step, rank, run_dir)
    if fault is not None:
        _act(fault, run_dir)


def loss_to_backward(loss: torch.Tensor, *, step: int, rank: int, run_dir: str) -> torch.Tensor:
    """The loss to back-propagate: ``loss`` itself, unless an ``inf_grad@backward`` fault is due at this step."""
    fault = _due("backward", step, rank, run_dir)
    if fault is None:
        return loss
    return loss * math.inf


def upload_dir_unless_faulted(local_dir: Path, url: str, *, step: int, rank: int, run_dir: str) -> list[str]:
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
    _act(fault, run_dir)
    raise AssertionError("unreachable")
