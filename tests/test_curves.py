"""jobs/curves.py: evaluation curves of pretraining runs read from a real MLflow store, drawn as one PNG."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))

import curves as curves_job


def _log_run(client, experiment_id: str, name: str, values: dict[str, list[tuple[int, float]]]) -> str:
    run = client.create_run(experiment_id, run_name=name)
    for key, points in values.items():
        for step, value in points:
            client.log_metric(run.info.run_id, key, value, step=step)
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def test_curves_of_two_runs_by_name_and_id_are_drawn_and_their_last_values_printed(tmp_path: Path, capsys) -> None:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    experiment = client.create_experiment("vit-pretrain")
    small = {
        "eval/loss": [(100, 1.2), (200, 0.8)],
        "eval/top1": [(100, 0.5), (200, 0.7)],
        "fewshot/digits_heldout/5shot": [(100, 0.3), (200, 0.35)],
        "eval/seconds": [(100, 2.0), (200, 2.1)],  # bookkeeping: not drawn
        "train/loss": [(10, 1.6)],  # not an evaluation metric
    }
    _log_run(client, experiment, "small", small)
    big_id = _log_run(client, experiment, "big", {"eval/loss": [(100, 1.0), (200, 0.6), (300, 0.5)]})
    out = tmp_path / "out" / "curves.png"

    code = curves_job.main(["--runs", f"small,{big_id}", "--tracking-uri", uri, "--out", str(out)])

    printed = capsys.readouterr().out
    assert code == 0 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| run | step | eval/loss | eval/top1 | fewshot/digits_heldout/5shot |" in printed
    assert "| small | 200 | 0.8000 | 0.7000 | 0.3500 |" in printed
    assert "| big | 300 | 0.5000 | — | — |" in printed


@pytest.mark.parametrize("runs", ["nosuchrun", "train_only"])
def test_curves_exit_2_naming_the_run_when_there_is_nothing_to_draw(tmp_path: Path, capsys, runs: str) -> None:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    _log_run(client, client.create_experiment("vit-pretrain"), "train_only", {"train/loss": [(10, 1.6)]})

    code = curves_job.main(["--runs", runs, "--tracking-uri", uri, "--out", str(tmp_path / "c.png")])

    assert code == 2 and runs in capsys.readouterr().err
    assert not (tmp_path / "c.png").exists()
