"""One writer per run: a lease object ``<run_dir>/_LEASE.json`` (owner id, heartbeat, expiry) in the run's storage.

A job takes the lease before it writes anything of the run, renews it from a background thread every third of
its time to live, and removes it when it ends. A second job with the same run name is refused while the lease
is alive (``LeaseHeldError`` names the holder and when the lease expires); a lease whose holder died without
removing it is taken over once it has expired.

Taking the lease is a create-only write: ``os.link`` of a finished temporary file on a local or shared
filesystem, and a GCS upload with the precondition ``ifGenerationMatch=0`` (gcsfs ``mode="create"``) on
``gs://``: of two jobs creating it at once, exactly one succeeds. Taking over an expired lease deletes it first
and then creates it again; two jobs doing that at the same moment can both delete, and only one create
succeeds. The remaining window: a job whose delete comes after the other's create deletes a live lease. Each
creator therefore reads the lease back after a short settle time, and each renewal checks the owner, so the job
that lost stops (``LeaseLostError``) within one renewal period. (The GCS emulator used in the tests ignores the
precondition; real GCS enforces it.)
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import storage

log = logging.getLogger(__name__)

LEASE_FILE = "_LEASE.json"
SETTLE_S = 1.0  # between creating the lease and reading it back (see the module docstring)


class LeaseHeldError(RuntimeError):
    """Another live job holds the run's lease."""


class LeaseLostError(RuntimeError):
    """This job's lease was taken by another job (it had expired, e.g. while this job was stalled)."""


def _stamp(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _create_new(url: str, data: bytes) -> bool:
    """Write ``url`` only if it does not exist; False when it does. Atomic against a concurrent creator."""
    fs, path = storage.filesystem(url)
    local = storage.local_path(url)
    if local is not None:
        local.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=local.parent, prefix=f".{local.name}.")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.link(tmp, local)  # fails if the name exists: the create-only step
            return True
        except FileExistsError:
            return False
        finally:
            Path(tmp).unlink(missing_ok=True)
    if storage.scheme_of(url) == "gs":
        try:
            fs.pipe_file(path, data, mode="create")  # ifGenerationMatch=0
            return True
        except (FileExistsError, OSError) as exc:
            if isinstance(exc, FileExistsError) or "412" in str(exc) or "Precondition" in str(exc):
                return False
            raise
    if fs.exists(path):  # memory://: one process only
        return False
    fs.pipe_file(path, data)
    return True


@dataclass
class Lease:
    url: str
    owner: str
    ttl_s: float
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)
    lost: str | None = None  # why the heartbeat stopped, when another job took the lease

    def _record(self) -> dict[str, Any]:
        now = time.time()
        return {"owner": self.owner, "heartbeat": now, "expires": now + self.ttl_s, "ttl_s": self.ttl_s}

    def renew(self) -> None:
        """Push the expiry out by ``ttl_s``; LeaseLostError if another job holds the lease now."""
        current = read_lease(self.url)
        if current is None or current.get("owner") != self.owner:
            holder = current.get("owner") if current else "nobody (it was deleted)"
            raise LeaseLostError(f"the lease {self.url} is now held by {holder}, not {self.owner}")
        storage.write_json(self.url, self._record())

    def start_heartbeat(self) -> None:
        def beat() -> None:
            while not self._stop.wait(self.ttl_s / 3):
                try:
                    self.renew()
                except LeaseLostError as exc:
                    self.lost = str(exc)
                    log.error("%s: this job is no longer the run's one writer", exc)
                    return
                except Exception as exc:  # a storage hiccup: the next beat tries again before the lease expires
                    log.warning("could not renew the lease %s: %s", self.url, exc)

        self._thread = threading.Thread(target=beat, name="run-lease-heartbeat", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop renewing and remove the lease. Never raises: a failure here (storage down) must not hide the
        run's own result or error; the lease then expires after ``ttl_s``."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            current = read_lease(self.url)
            if current is not None and current.get("owner") == self.owner:
                storage.remove(self.url)
        except Exception as exc:
            log.warning("could not remove the lease %s (%s): it expires in at most %.0f s", self.url, exc, self.ttl_s)


def read_lease(url: str) -> dict[str, Any] | None:
    try:
        return storage.read_json(url)
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {"owner": "unreadable lease", "expires": 0.0}


def acquire(run_dir: str, *, ttl_s: float, run_name: str, owner: str | None = None) -> Lease:
    """Take the run's lease (or raise LeaseHeldError naming the holder and the expiry). Call before any write."""
    url = storage.join(run_dir, LEASE_FILE)
    # One owner per process: a run started again by the same process (whose earlier release failed, e.g. in a
    # storage outage) takes its own lease back instead of waiting for it to expire.
    owner = owner or f"{socket.gethostname()}:{os.getpid()}"
    lease = Lease(url, owner, ttl_s)
    for _ in range(3):
        current = read_lease(url)
        if current is not None and current.get("owner") == owner:
            storage.write_json(url, lease._record())
            return lease
        if current is not None:
            expires = float(current.get("expires", 0.0))
            if expires > time.time():
                raise LeaseHeldError(
                    f"run.name={run_name}: another job ({current.get('owner')}) is writing this run; its lease "
                    f"{url} expires at {_stamp(expires)} unless renewed. Wait for that job to end, or choose "
                    "another run.name"
                )
            log.warning("taking over the expired lease of %s (expired %s)", current.get("owner"), _stamp(expires))
            storage.remove(url)
        if _create_new(url, json.dumps(lease._record()).encode()):
            time.sleep(SETTLE_S)
            holder = read_lease(url)
            if holder is not None and holder.get("owner") == owner:
                return lease
    current = read_lease(url) or {}
    raise LeaseHeldError(
        f"run.name={run_name}: another job ({current.get('owner')}) took the lease {url} at the same time; "
        "choose another run.name or try again"
    )
