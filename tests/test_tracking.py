"""MLflow tracking against a real server, and what an outage does: training never waits, losses are counted."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from pipeline import tracking
from tests.fixtures.faulty_proxy import FaultyProxy
from tests.fixtures.mlflow_server import start_mlflow_server
from tests.fixtures.ray_cluster import free_port


def _dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there


def test_open_run_logs_params_and_is_reused_by_run_name(mlflow_server) -> None:
    params = {"train.steps": 10, "optim.betas": "[0.9, 0.999]", "model.num_classes": None}
    run_id = tracking.open_run(mlflow_server.url, "tracking-tests", "run-a", params, {"vitpipe.preset": "tiny"})
    assert run_id is not None
    again = tracking.open_run(
        mlflow_server.url, "tracking-tests", "run-a", {**params, "train.steps": 20, "new.key": 1}, {}
    )
    assert again == run_id  # a restarted run continues its MLflow run
    other = tracking.open_run(mlflow_server.url, "tracking-tests", "run-b", params, {})
    assert other not in (None, run_id)

    run = MlflowClient(mlflow_server.url).get_run(run_id)
    assert run.data.params["train.steps"] == "10" and run.data.params["model.num_classes"] == "null"
    assert run.data.params["new.key"] == "1"
    assert run.data.tags["param_changed.train.steps"] == "20"  # params are immutable in MLflow
    assert run.data.tags["vitpipe.preset"] == "tiny" and run.data.tags[tracking.RUN_NAME_TAG] == "run-a"
    assert tracking.close_run(mlflow_server.url, run_id, "FINISHED", {"export_uri": "file:///x"})
    run = MlflowClient(mlflow_server.url).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["export_uri"] == "file:///x"


def test_metric_logger_delivers_metrics_tags_and_text(mlflow_server) -> None:
    run_id = tracking.open_run(mlflow_server.url, "tracking-tests", "run-logger", {}, {})
    logger = tracking.MetricLogger(mlflow_server.url, run_id)
    for step in range(1, 6):
        logger.log_metrics({"train/loss": 1.0 / step, "train/lr": 1e-3, "perf/mfu": None}, step)
    logger.set_tags({"export_uri": "file:///e"})
    logger.log_text('{"a": 1}', "export.json")
    report = logger.close(timeout_s=60)
    assert report.undelivered == 0 and report.delivered == 5 * 2 + 1 + 1

    client = MlflowClient(mlflow_server.url)
    history = client.get_metric_history(run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(s, 1.0 / s) for s in range(1, 6)]
    assert client.get_run(run_id).data.tags["export_uri"] == "file:///e"
    assert [a.path for a in client.list_artifacts(run_id)] == ["export.json"]


def test_an_outage_never_blocks_training_and_losses_are_counted() -> None:
    logger = tracking.MetricLogger(_dead_url(), "0" * 32)
    start = time.monotonic()
    for step in range(200):
        logger.log_metrics({"train/loss": 1.0, "train/lr": 0.1}, step)
    assert time.monotonic() - start < 1.0  # the training loop never waits on MLflow
    start = time.monotonic()
    report = logger.close(timeout_s=1.0)
    assert time.monotonic() - start < 5.0
    assert report.undelivered == 400 and report.delivered == 0
    assert "400 records could not be delivered" in str(report)


def test_the_queue_is_bounded_and_keeps_the_newest(mlflow_server, monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # each attempt during the outage fails at once
    run_id = tracking.open_run(mlflow_server.url, "tracking-tests", "run-bounded", {}, {})
    with FaultyProxy(mlflow_server.url) as proxy:
        proxy.set_mode("reset")  # MLflow down while 20 records are logged into a queue of 5
        logger = tracking.MetricLogger(proxy.url, run_id, max_queue=5, max_backoff_s=0.5)
        for step in range(20):
            logger.log_metrics({"train/loss": float(step)}, step)
        time.sleep(1.0)  # any attempt that took a batch before the last records were queued has failed by now
        assert logger.pending() == 5
        proxy.set_mode("pass")
        report = logger.close(timeout_s=60)
    assert (report.delivered, report.undelivered) == (5, 15)
    # Exactly the 5 newest arrived: not none, not the oldest.
    history = MlflowClient(mlflow_server.url).get_metric_history(run_id, "train/loss")
    assert sorted((m.step, m.value) for m in history) == [(s, float(s)) for s in range(15, 20)]


def test_records_queued_during_an_outage_arrive_when_mlflow_is_back(mlflow_server) -> None:
    run_id = tracking.open_run(mlflow_server.url, "tracking-tests", "run-outage", {}, {})
    # The same store served on a port where nothing listens yet: MLflow is "down" while training logs.
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    logger = tracking.MetricLogger(url, run_id, max_backoff_s=1.0)
    for step in range(10):
        logger.log_metrics({"train/loss": float(step)}, step)
    time.sleep(1.0)
    assert logger.pending() == 10
    server = start_mlflow_server(mlflow_server.root, port=port)
    try:
        report = logger.close(timeout_s=60)
        assert report.undelivered == 0 and report.delivered == 10
        assert len(MlflowClient(url).get_metric_history(run_id, "train/loss")) == 10
    finally:
        server.stop()


def test_open_run_without_mlflow_returns_none_quickly() -> None:
    start = time.monotonic()
    assert tracking.open_run(_dead_url(), "x", "y", {"a": 1}, {}) is None
    assert time.monotonic() - start < 30
    assert not tracking.close_run(_dead_url(), None, "FINISHED")


def test_metric_logger_without_a_run_counts_everything_as_undelivered() -> None:
    logger = tracking.MetricLogger(_dead_url(), None)
    logger.log_metrics({"a": 1.0, "b": 2.0}, 1)
    logger.set_tags({"export_uri": "x"})
    assert logger.close(timeout_s=0).undelivered == 3


@pytest.mark.parametrize("uri", ["sqlite:///{tmp}/mlflow.db"])
def test_embedded_sqlite_store_keeps_artifacts_next_to_it(uri: str, tmp_path: Path) -> None:
    uri = uri.format(tmp=tmp_path)
    run_id = tracking.open_run(uri, "tracking-tests", "local", {"a": 1}, {})
    logger = tracking.MetricLogger(uri, run_id)
    logger.log_metrics({"train/loss": 0.5}, 1)
    logger.log_text("{}", "export.json")
    assert logger.close(timeout_s=60).undelivered == 0
    assert (tmp_path / "mlartifacts").is_dir()
    assert any(p.name == "export.json" for p in (tmp_path / "mlartifacts").rglob("*"))
