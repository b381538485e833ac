"""Preemption: SIGTERM (a spot or preemptible node's notice, ``kill``, ``ray job stop``, torchrun passing its own
SIGTERM on) asks the run to stop at the next step boundary with a checkpoint, instead of losing up to
``checkpoint.every_steps - 1`` steps. The run then ends *preempted*: the MLflow run KILLED, ``jobs/pretrain.py``
exiting ``EXIT_PREEMPTED`` (75); a resubmission resumes from that checkpoint, redoing no step.

Where the signal lands, and how every rank learns of it at the same step boundary:

- A worker (one rank). ``Preemption``, entered by the trainer, catches SIGTERM in that process and sets a flag. A
  handler can only be installed from a process's main thread. A rank of the local launcher runs there. A Ray Train
  worker runs the training function in a thread of its actor process, whose main thread runs Ray's task loop with
  Ray's own handler (``Worker.main_loop``: exit at once); Ray's loop runs Python signal handlers in that main thread
  every few milliseconds. So ``Preemption`` has its own actor run ``install_sigterm_handler`` as a task
  (``RayTrainWorker.execute``: a synchronous actor runs its tasks in the main thread) and puts Ray's handler back
  on exit. Where that is impossible (a Ray without that method) it says so, and a SIGTERMed worker dies as on
  SIGKILL: Ray Train restarts the group from the last checkpoint.
- The driver (``jobs/pretrain.py``, Ray's job entrypoint). ``DriverStop`` catches SIGTERM in its main thread and
  writes a stop request (``STOP_MARKER``) into the run's storage; rank 0's ``Preemption`` looks for it every
  ``MARKER_POLL_S`` seconds in a thread of its own. The driver waits for the workers at most ``grace_s`` (or until a
  second SIGTERM), then gives up (``Preempted``): the workers die with it and the run resumes from the latest
  complete checkpoint. A SIGTERM before the workers were started starts none. ``driver.run`` calls ``begin_run``
  once it holds the run's lease (so a refused duplicate job never stops the holder's run) and ``run_ending`` when
  it closes the MLflow run (KILLED, not FAILED, after a SIGTERM).

Either way ``agreed``, one tiny all-reduce at each step boundary, turns one rank's flag into every rank's decision.
Bound, from the signal to the checkpoint: the rest of the current step plus one checkpoint, plus up to
``MARKER_POLL_S`` when the driver was signalled (docs/reliability.md gives the measured figures).
"""

from __future__ import annotations

import _thread
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING, Any

from pipeline import storage

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# EX_TEMPFAIL: the job did not fail, it was asked to stop; submitting it again resumes it.
EXIT_PREEMPTED = 75
# The driver's stop request, in the run's directory; lifted by the next submission (``begin_run``).
STOP_MARKER = "_STOP_REQUESTED.json"
MARKER_POLL_S = 2.0  # how often rank 0 looks for it: one existence check per poll
DEFAULT_GRACE_S = 120.0  # how long a signalled driver waits for its workers to checkpoint and stop


def stop_marker_url(run_dir: str) -> str:
    return storage.join(run_dir, STOP_MARKER)


# -- the worker side ---------------------------------------------------------------------------------------------

_signalled = threading.Event()  # set by this process's SIGTERM handler while a Preemption is entered
_previous_handler: Any = signal.SIG_DFL


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    if not _signalled.is_set():
        log.warning("SIGTERM: checkpointing at the end of this step, then stopping")
    _signalled.set()


def install_sigterm_handler() -> None:
    """Catch SIGTERM in this process (main thread only); ``restore_sigterm_handler`` puts the previous one back."""
    global _previous_handler
    _previous_handler = signal.signal(signal.SIGTERM, _on_sigterm)


def restore_sigterm_handler() -> None:
    signal.signal(signal.SIGTERM, _previous_handler if _previous_handler is not None else signal.SIG_DFL)


def _in_main_thread(fn: Callable[[], None]) -> bool:
    """Run ``fn`` in this process's main thread: directly, or as a task of this Ray Train worker's own actor. False
    (and a warning) where neither is possible."""
    if threading.current_thread() is threading.main_thread():
        fn()
        return True
    if "ray" not in sys.modules:  # not a Ray worker: a thread of some other program
        log.warning("SIGTERM is not caught: the training loop runs outside the main thread of a non-Ray process")
        return False
    import ray

    try:
        actor = ray.get_runtime_context().current_actor
        ray.get(actor.execute.remote(fn), timeout=30)
        return True
    except Exception as exc:  # not in an actor, or a Ray Train whose worker actor has no execute() any more
        log.warning(
            "SIGTERM is not caught in this Ray worker (%s): it ends the worker as SIGKILL would, and Ray Train "
            "restarts the group from the last checkpoint",
            exc,
        )
        return False


class Preemption:
    """While entered, SIGTERM to this process (and, given ``stop_marker``, the driver's stop request on storage) sets
    ``requested`` instead of ending the process; ``agreed`` makes it every rank's decision."""

    def __init__(self, stop_marker: str | None = None, *, poll_s: float = MARKER_POLL_S) -> None:
        self.stop_marker, self.poll_s = stop_marker, poll_s
        self._installed = False
        self._marker_seen = threading.Event()
        self._exited = threading.Event()

    def __enter__(self) -> Preemption:
        _signalled.clear()
        self._installed = _in_main_thread(install_sigterm_handler)
        if self.stop_marker is not None:
            self._look_for_marker()  # now: a request made while the workers were starting stops them before step 1
            threading.Thread(target=self._watch, name="stop-request-watcher", daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._exited.set()
        if self._installed:
            _in_main_thread(restore_sigterm_handler)

    @property
    def requested(self) -> bool:
        return _signalled.is_set() or self._marker_seen.is_set()

    def _watch(self) -> None:
        while not self._exited.wait(self.poll_s) and not self._marker_seen.is_set():
            self._look_for_marker()

    def _look_for_marker(self) -> None:
        assert self.stop_marker is not None
        try:
            if storage.exists(self.stop_marker):
                log.warning("the driver asked the run to stop (%s): checkpointing at this step", self.stop_marker)
                self._marker_seen.set()
        except Exception as exc:  # an outage: training goes on, the next look may get through
            log.warning("could not look for the stop request %s: %s", self.stop_marker, exc)

    def agreed(self, device: torch.device) -> bool:
        """True on every rank when any rank was asked to stop (collective: call it at every step boundary)."""
        import torch
        import torch.distributed as dist

        flag = torch.tensor([1.0 if self.requested else 0.0], device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)


# -- the driver side ---------------------------------------------------------------------------------------------


class Preempted(KeyboardInterrupt):
    """The signalled driver stops waiting for its workers. A KeyboardInterrupt because a blocking Ray call
    (``ray.get`` in ``TorchTrainer.fit``) passes on only that (and SystemExit) from a signal handler."""


class DriverStop:
    """In the driver's main thread, while entered: the first SIGTERM asks the workers to stop (``begin_run`` says
    where); a second one, or ``grace_s`` without the workers stopping, raises ``Preempted`` in the main thread."""

    def __init__(self, grace_s: float = DEFAULT_GRACE_S) -> None:
        self.grace_s = grace_s
        self.requested_at: float | None = None  # time.monotonic() of the first SIGTERM
        self.why = ""  # why the driver stopped waiting, when it did
        self.stop_marker: str | None = None  # once the run began: where the request goes
        self._closing = False
        self._original: Any = None
        self._deadline: threading.Timer | None = None

    @property
    def requested(self) -> bool:
        return self.requested_at is not None

    def __enter__(self) -> DriverStop:
        global _driver
        self._original = signal.getsignal(signal.SIGTERM)
        self.install()
        _driver = self
        return self

    def install(self) -> None:
        """Catch SIGTERM (again after ``ray.init``, which installs its own handler)."""
        signal.signal(signal.SIGTERM, self._on_sigterm)

    def __exit__(self, *exc: object) -> None:
        global _driver
        _driver = None
        self._stop_deadline()
        signal.signal(signal.SIGTERM, self._original if self._original is not None else signal.SIG_DFL)

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        if self._closing:  # the run is being closed: let the closing finish
            return
        if self.requested:
            waited = time.monotonic() - (self.requested_at or 0.0)
            self.why = f"the workers did not stop within {waited:.0f} s of the first SIGTERM"
            raise Preempted(self.why)
        self.requested_at = time.monotonic()
        if self.stop_marker is None:
            log.warning("SIGTERM before the run began: no worker will start")
            return
        log.warning(
            "SIGTERM: asking the workers to checkpoint and stop at their next step boundary (waiting at most %.0f s; "
            "a second SIGTERM stops waiting)",
            self.grace_s,
        )
        self._request()

    def _request(self) -> None:
        """Write the stop request; interrupt the main thread if the workers have not stopped within ``grace_s``."""
        assert self.stop_marker is not None
        try:
            storage.write_json(self.stop_marker, {"requested_at": time.time(), "by": "SIGTERM to the driver"})
        except Exception as exc:  # the workers cannot be told: they die with the driver when the grace runs out
            log.error("could not write the stop request %s (%s): the workers will not stop", self.stop_marker, exc)
        # interrupt_main runs this SIGTERM handler again in the main thread, even inside ray.get.
        self._deadline = threading.Timer(self.grace_s, _thread.interrupt_main, args=(signal.SIGTERM,))
        self._deadline.daemon = True
        self._deadline.start()

    def _stop_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()

    def arm(self, stop_marker: str) -> None:
        self.stop_marker = stop_marker
        if self.requested:
            self.why = "SIGTERM came before the workers were started"
            raise Preempted(self.why)

    def closing(self) -> None:
        self._closing = True
        self._stop_deadline()


_driver: DriverStop | None = None  # the entered DriverStop of this process, if any


def begin_run(run_dir: str) -> None:
    """The driver holds the run and is about to start its workers: lift the stop request an earlier submission left,
    and from now on let a SIGTERM to this driver write one. Raises ``Preempted`` if a SIGTERM came already."""
    marker = stop_marker_url(run_dir)
    storage.remove(marker)
    if _driver is not None:
        _driver.arm(marker)


def run_ending(status: str) -> str:
    """The driver closes the run (nothing interrupts it from now on). Returns the MLflow status to close it with:
    KILLED in place of FAILED when a SIGTERM asked the run to stop."""
    if _driver is None:
        return status
    _driver.closing()
    return "KILLED" if _driver.requested and status == "FAILED" else status
