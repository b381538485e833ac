"""MLflow tracking that an MLflow outage cannot stop.

- ``open_run`` (driver, before the workers start): find the MLflow run of this run name (a restarted run
  continues its MLflow run) or create it, and log the flattened config as params.
- ``MetricLogger`` (rank 0): metrics, tags and small text artifacts go into a bounded in-memory queue that a
  background thread delivers with retries and backoff. Training never waits on MLflow; when the queue is
  full the oldest records are dropped and counted. ``close()`` waits a bounded time and reports how many
  records could not be delivered.
- ``close_run`` (driver): mark the run FINISHED / FAILED / KILLED.
- ``retry_transient``: one MLflow call retried with doubling waits within a time budget while the error may pass
  (network errors, 5xx, 408, 429); a request MLflow refuses (any other 4xx) is never retried.

Every function here catches MLflow and network errors: tracking problems are logged, never raised.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger(__name__)

# MLflow's HTTP client retries each request up to 7 times with exponential backoff (minutes against a dead
# server). Retrying is MetricLogger's job here, so requests give up sooner; MLflow reads these per request and an
# explicit setting in the environment wins.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")

RUN_NAME_TAG = "vitpipe.run_name"
EXPORT_TAG = "export_uri"
MAX_PARAMS_PER_CALL = 100  # MLflow's log_batch limit
MAX_METRICS_PER_CALL = 1000
# How long opening or closing a run keeps retrying an outage. A dead server already costs one call ~13 s of
# MLflow's own retries; no new attempt starts that could not end within the budget, so the run starts untracked
# after at most about this long.
OPEN_RETRY_S = 15.0

T = TypeVar("T")


def is_permanent(exc: BaseException) -> bool:
    """Whether MLflow refused the request itself (a 4xx other than 408/429): sending it again cannot succeed.

    Network errors, timeouts and 5xx answers (MLflow reports these as errors with a 5xx status) may pass."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        status = exc.get_http_status_code()
        return 400 <= status < 500 and status not in (408, 429)
    return not isinstance(exc, OSError)  # e.g. a TypeError: a bug, not an outage


def retry_transient(call: Callable[[], T], *, what: str, budget_s: float, first_wait_s: float = 0.5) -> T:
    """``call()``, retried after 0.5, 1, 2, ... 8 s while its error may pass and a new attempt (as long as the last
    one took, plus the wait) can end within ``budget_s``; otherwise its last error is raised."""
    deadline = time.monotonic() + budget_s
    wait = first_wait_s
    while True:
        started = time.monotonic()
        try:
            return call()
        except Exception as exc:
            took = time.monotonic() - started
            if is_permanent(exc) or time.monotonic() + wait + took > deadline:
                raise
            log.warning("MLflow: %s failed (%s); retrying in %.1f s", what, exc, wait)
            time.sleep(wait)
            wait = min(2 * wait, 8.0)


def _client(uri: str) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def experiment_id_for(client: Any, uri: str, name: str) -> str:
    """The id of experiment ``name``, created if missing, with artifacts next to an SQLite store (all jobs share it)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    artifact_location = None
    if uri.startswith("sqlite:///"):
        # Without this MLflow puts artifacts in ./mlruns of whichever process creates the experiment.
        artifact_location = (Path(uri[len("sqlite:///") :]).parent / "mlartifacts").as_uri()
    from mlflow.exceptions import MlflowException

    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except MlflowException as exc:
        # Several jobs starting at once race to create the experiment; the losers use the winner's.
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id


def _param_value(value: Any) -> str:
    text = "null" if value is None else str(value)
    return text[:6000]  # MLflow's param value limit


def open_run(uri: str, experiment: str, run_name: str, params: dict[str, Any], tags: dict[str, str]) -> str | None:
    """The MLflow run id for ``run_name`` (reused when the run is resumed), or None if MLflow is unreachable.

    The whole opening is retried through a short outage: it is idempotent (a retry finds the run an interrupted
    attempt created and continues it)."""
    try:
        return retry_transient(
            lambda: _open_run(uri, experiment, run_name, params, tags),
            what=f"opening run {run_name}",
            budget_s=OPEN_RETRY_S,
        )
    except Exception as exc:  # tracking must not stop training
        log.warning("MLflow at %s is unreachable (%s): this run's metrics will not be tracked", uri, exc)
        return None


def _open_run(uri: str, experiment: str, run_name: str, params: dict[str, Any], tags: dict[str, str]) -> str:
    from mlflow.entities import Param, RunStatus

    client = _client(uri)
    experiment_id = experiment_id_for(client, uri, experiment)
    existing = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'",
        max_results=1,
        order_by=["attributes.start_time DESC"],
    )
    values = {key: _param_value(value) for key, value in params.items()}
    if existing:
        run = existing[0]
        run_id = run.info.run_id
        client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
        # MLflow params are immutable: a changed value on resume is recorded as a tag instead.
        changed = {k: v for k, v in values.items() if k in run.data.params and run.data.params[k] != v}
        new = [Param(k, v) for k, v in values.items() if k not in run.data.params]
        for key, value in changed.items():
            client.set_tag(run_id, f"param_changed.{key}", value)
        for i in range(0, len(new), MAX_PARAMS_PER_CALL):
            client.log_batch(run_id, params=new[i : i + MAX_PARAMS_PER_CALL])
        log.info("MLflow: continuing run %s (%s) in experiment %r", run_id, run_name, experiment)
    else:
        run = client.create_run(experiment_id, run_name=run_name, tags={RUN_NAME_TAG: run_name})
        run_id = run.info.run_id
        items = [Param(k, v) for k, v in values.items()]
        for i in range(0, len(items), MAX_PARAMS_PER_CALL):
            client.log_batch(run_id, params=items[i : i + MAX_PARAMS_PER_CALL])
        log.info("MLflow: created run %s (%s) in experiment %r", run_id, run_name, experiment)
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
    return run_id


def close_run(uri: str, run_id: str | None, status: str, tags: dict[str, str] | None = None) -> bool:
    """Set final tags and the run status (FINISHED, FAILED, KILLED); False if MLflow could not be reached."""
    if run_id is None:
        return False

    def close() -> None:
        client = _client(uri)
        for key, value in (tags or {}).items():
            client.set_tag(run_id, key, value)
        client.set_terminated(run_id, status=status)

    try:
        retry_transient(close, what=f"closing run {run_id} as {status}", budget_s=OPEN_RETRY_S)
        return True
    except Exception as exc:
        log.warning("MLflow: could not close run %s as %s (%s)", run_id, status, exc)
        return False


@dataclass
class DeliveryReport:
    delivered: int  # metric values, tags and artifacts that reached MLflow
    undelivered: int  # dropped from a full queue, refused by MLflow, or still queued when close() gave up
    refused: int = 0  # of the undelivered: refused by MLflow (a 4xx: an invalid name or value, a deleted run)

    def __str__(self) -> str:
        if not self.undelivered:
            return f"MLflow: all {self.delivered} records delivered"
        refused = f", {self.refused} of them refused by MLflow" if self.refused else ""
        return f"MLflow: {self.undelivered} records could not be delivered{refused} ({self.delivered} delivered)"


@dataclass
class _Record:
    kind: str  # "metrics", "tags" or "text"
    payload: Any
    size: int  # metric values / tags / artifacts in this record


class MetricLogger:
    """Asynchronous, bounded, retrying MLflow writer for one run. No method raises or blocks on MLflow.

    ``run_id=None`` (MLflow was unreachable when the run started) counts every record as undelivered. A batch
    that MLflow refuses (a 4xx) is not retried: its records are sent again one by one, and only those refused
    alone are dropped and counted, so that one bad record cannot block everything queued behind it.
    """

    def __init__(self, uri: str, run_id: str | None, *, max_queue: int = 10_000, max_backoff_s: float = 10.0):
        self.uri = uri
        self.run_id = run_id
        self.max_queue = max_queue
        self.max_backoff_s = max_backoff_s
        self._queue: collections.deque[_Record] = collections.deque()
        self._cond = threading.Condition()
        self._closing = False
        self._delivered = 0
        self._dropped = 0
        self._failures = 0
        self._refused = 0
        self._one_by_one = 0  # records still to be sent singly, after a batch was refused
        self._thread: threading.Thread | None = None
        if run_id is not None:
            self._thread = threading.Thread(target=self._run, name="mlflow-logger", daemon=True)
            self._thread.start()

    # -- producer side (the training loop)

    def _put(self, record: _Record) -> None:
        if self.run_id is None:
            self._dropped += record.size
            return
        with self._cond:
            while len(self._queue) >= self.max_queue:
                self._dropped += self._queue.popleft().size  # keep the newest
            self._queue.append(record)
            self._cond.notify()

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
        if items:
            self._put(_Record("metrics", items, len(items)))

    def set_tags(self, tags: dict[str, str]) -> None:
        self._put(_Record("tags", dict(tags), len(tags)))

    def log_text(self, text: str, artifact_file: str) -> None:
        self._put(_Record("text", (text, artifact_file), 1))

    # -- consumer side (background thread)

    def _deliver(self, batch: list[_Record]) -> None:
        from mlflow.entities import RunTag

        client = _client(self.uri)
        metrics = [m for r in batch if r.kind == "metrics" for m in r.payload]
        tags = [RunTag(k, str(v)) for r in batch if r.kind == "tags" for k, v in r.payload.items()]
        for i in range(0, len(metrics), MAX_METRICS_PER_CALL):
            client.log_batch(self.run_id, metrics=metrics[i : i + MAX_METRICS_PER_CALL])
        if tags:
            client.log_batch(self.run_id, tags=tags)
        for r in batch:
            if r.kind == "text":
                client.log_text(self.run_id, *r.payload)

    def _run(self) -> None:
        backoff = 0.5
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue:
                    return
                size = 1 if self._one_by_one else 50
                batch = [self._queue[i] for i in range(min(len(self._queue), size))]
            try:
                self._deliver(batch)
            except Exception as exc:
                if is_permanent(exc):
                    self._refuse(batch, exc)
                    continue
                self._failures += 1
                if self._failures in (1, 10) or self._failures % 100 == 0:
                    log.warning(
                        "MLflow: delivery failed %d time(s), retrying in the background (%s)", self._failures, exc
                    )
                with self._cond:
                    self._cond.wait(timeout=backoff)
                backoff = min(self.max_backoff_s, backoff * 2)
                continue
            backoff = 0.5
            self._one_by_one = max(0, self._one_by_one - len(batch))
            with self._cond:
                # Records dropped meanwhile were the oldest, i.e. possibly some of this batch.
                for record in batch:
                    if self._queue and self._queue[0] is record:
                        self._queue.popleft()
                        self._delivered += record.size

    def _refuse(self, batch: list[_Record], exc: BaseException) -> None:
        """MLflow refused ``batch``: if it holds several records, send them singly; a single one is dropped."""
        if len(batch) > 1:
            log.warning("MLflow refused a batch of %d records (%s); sending them one by one", len(batch), exc)
            self._one_by_one = len(batch)
            return
        self._one_by_one = max(0, self._one_by_one - 1)
        with self._cond:
            if self._queue and self._queue[0] is batch[0]:
                self._queue.popleft()
                self._refused += batch[0].size
                self._dropped += batch[0].size
        log.warning("MLflow refused a %s record, dropped: %s", batch[0].kind, exc)

    def pending(self) -> int:
        with self._cond:
            return sum(r.size for r in self._queue)

    def close(self, timeout_s: float = 30.0) -> DeliveryReport:
        """Deliver what is queued within ``timeout_s``; report what could not be delivered."""
        if self._thread is not None:
            deadline = time.monotonic() + timeout_s
            while self.pending() and time.monotonic() < deadline:
                time.sleep(0.05)
            with self._cond:
                left = sum(r.size for r in self._queue)
                self._queue.clear()
                self._dropped += left
                self._closing = True
                self._cond.notify_all()
            self._thread.join(timeout=1.0)
        report = DeliveryReport(delivered=self._delivered, undelivered=self._dropped, refused=self._refused)
        (log.warning if report.undelivered else log.info)("%s", report)
        return report
