"""Stops that no restart can cure: a run whose loss diverged, and training data that cannot be read.

Ray Train restarts the worker group after a failure (up to ``scale.max_failures`` times) from the last checkpoint.
That rides out a dead worker or a storage outage, but a diverged run diverges again from the same checkpoint, and
a shard that is gone or is not a tar fails again at the same place: every restart would cost a worker-group start
and the steps since the checkpoint, for the same error. So the worker that meets such an error records it on the
run's storage (``<run_dir>/_STOPPED.json``: the reason and the message for the user) before raising; a restarted
worker refuses to train while the record is there (``check_not_stopped``, before the engine is built); the driver
turns the failure Ray Train finally reports into the recorded error (``recorded_stop``) and lifts the record when
the run is submitted again (``lift_stop``), as a deliberate retry once the cause is fixed.

Which data errors are permanent (``is_permanent_data_error``): every ``DataError`` (a shard with no readable
sample, a shard not found, storage refusing access to one, a shard that disagrees with its manifest, bad samples
past ``data.max_bad_fraction``...). A storage access that failed after the client's retries (timeouts, 5xx, reset
connections) is transient, left to Ray's restarts; ``storage_access`` names it: one ``StorageError`` saying the
operation and the URL, whichever access (a shard, the step ledger, a checkpoint) an outage meets first.

The divergence record is written by rank 0 (every rank sees the same loss); a data error is met by the rank that
reads the shard, so that rank writes the record (one small object, rewritten whole if two ranks stop at once).
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator
from typing import Any

from pipeline import storage

log = logging.getLogger(__name__)

STOP_MARKER = "_STOPPED.json"

# jobs/pretrain.py's exit status after a permanent data error (sysexits' EX_DATAERR: the input data was incorrect).
EXIT_DATA_ERROR = 65


class LossNotFiniteError(RuntimeError):
    """The loss became NaN or infinite; training stops instead of writing a poisoned checkpoint."""


class PermanentDataError(RuntimeError):
    """Training data no restart can read (a shard gone, not a tar, refused, or not what its manifest says)."""


_ERRORS: dict[str, type[RuntimeError]] = {"diverged": LossNotFiniteError, "data": PermanentDataError}


def stop_url(run_dir: str) -> str:
    return storage.join(run_dir, STOP_MARKER)


def record_stop(run_dir: str, reason: str, message: str, **details: Any) -> None:
    """Record that this run must not train again until it is resubmitted; ``reason`` is a key of ``_ERRORS``."""
    storage.write_json(stop_url(run_dir), {"reason": reason, "message": message, **details})


def check_not_stopped(run_dir: str) -> None:
    """Raise the recorded error when the run was stopped (a worker's setup, before anything is built)."""
    url = stop_url(run_dir)
    with storage_access("reading the stop record", url):
        record = storage.read_json(url) if storage.exists(url) else None
    if record is not None:
        raise _ERRORS[record["reason"]](record["message"])


def lift_stop(run_dir: str) -> None:
    storage.remove(stop_url(run_dir))


def recorded_stop(run_dir: str, failure: BaseException) -> RuntimeError | None:
    """The recorded error behind a failed run, or None. Storage is read only when the failure names a stop error:
    after any other failure (a storage outage) the lookup would add the client's retry budget and then report its
    own error in place of the run's."""
    if not any(error.__name__ in str(failure) for error in _ERRORS.values()):
        return None
    url = stop_url(run_dir)
    if not storage.exists(url):
        return None
    record = storage.read_json(url)
    return _ERRORS[record["reason"]](record["message"])


def worker_storage_error(failure: BaseException) -> storage.StorageError | None:
    """The first ``StorageError`` a worker raised, from the failure Ray Train reports (which carries the workers'
    tracebacks as text), so that the job ends with that one line rather than Ray's whole report."""
    if isinstance(failure, storage.StorageError):
        return None  # raised here (the local launcher): already the error itself
    found = re.search(rf"{re.escape(storage.StorageError.__module__)}\.StorageError: (.+)", str(failure))
    return storage.StorageError(found.group(1).strip()) if found else None


def is_permanent_data_error(error: BaseException) -> bool:
    from pipeline.data import DataError

    return isinstance(error, DataError)


def _original_message(error: BaseException) -> str:
    """The error's own message; a DataLoader worker's error arrives wrapped with its traceback ("Caught DataError
    in DataLoader worker process 0. Original Traceback ... DataError: <message>")."""
    text, own = str(error), f"{type(error).__name__}: "
    if "Original Traceback" in text and own in text:
        text = text.rsplit(own, 1)[1]
    return text.strip()


@contextlib.contextmanager
def stopping_on_bad_data(run_dir: str, run_name: str) -> Iterator[None]:
    """Around a worker's training: a permanent data error is recorded (``record_stop``) and raised as
    ``PermanentDataError`` saying what to do; any other error goes on to Ray's restarts unchanged."""
    try:
        yield
    except Exception as exc:
        if not is_permanent_data_error(exc):
            raise
        cause = _original_message(exc)
        message = (
            f"run {run_name} stopped on data no restart can read: {cause}. Fix or remove that shard and rewrite the "
            "manifest (jobs/prepare_data.py), then submit the same command again: it resumes from the last "
            "complete checkpoint"
        )
        try:
            record_stop(run_dir, "data", message, error=cause[:2000])
        except Exception as write_failure:  # the restarts then meet the data error again, as without the record
            log.warning(f"could not record the stop of run {run_name} ({write_failure}); restarts will retry")
        raise PermanentDataError(message) from exc


def _is_storage_client_error(error: BaseException) -> bool:
    """An error of the storage clients (fsspec, gcsfs, aiohttp, the OS) that their retries did not cure."""
    import aiohttp
    from gcsfs.retry import HttpError

    return isinstance(error, OSError | aiohttp.ClientError | HttpError)


@contextlib.contextmanager
def storage_access(operation: str, url: str) -> Iterator[None]:
    """Name what failed: a storage client's error inside (after its retries) becomes one ``StorageError``,
    "<operation> <url> failed (<error>)", the form a failed shard read takes, so that whichever access an outage
    meets first (a shard, the step ledger, a checkpoint), the run reports the same kind of error naming its URL.
    Other errors pass unchanged; Ray Train restarts the workers on either (transient)."""
    try:
        yield
    except storage.StorageError:
        raise
    except Exception as exc:
        if not _is_storage_client_error(exc):
            raise
        said = " ".join(str(exc).split())[:300]  # one line: the driver reports the line a worker raised
        raise storage.StorageError(f"{operation} {url} failed ({type(exc).__name__}: {said})") from exc
