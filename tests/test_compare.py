"""The comparison table read from MLflow sweeps: every row, the paper columns, our numbers as logged."""

import csv
import io

import pytest
from mlflow.tracking import MlflowClient

from pipeline import compare as cmp
from pipeline import paper
from pipeline import results as schema


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory):
    # A real MLflow store (SQLite), as the embedded default uses; the server-backed path is covered by the
    # transfer sweep test.
    return "sqlite:///" + str(tmp_path_factory.mktemp("mlflow") / "mlflow.db")


def _log_sweep(client, exp_id, *, label, init, results, failed=(), extra_tags=None):
    """A parent run laid out as the transfer sweep writes it (see pipeline.results)."""
    rows = [*results, *failed]
    tags = {
        schema.ROLE_TAG: schema.SWEEP_ROLE,
        schema.MODEL_LABEL_TAG: label,
        schema.INIT_TAG: init,
        schema.ROWS_TAG: ",".join(rows),
        **(extra_tags or {}),
    }
    run = client.create_run(exp_id, run_name=label, tags=tags)
    rid = run.info.run_id
    for row, (mean, std) in results.items():
        client.log_metric(rid, schema.value_key(row), mean)
        if std is not None:
            client.log_metric(rid, schema.std_key(row), std)
        client.set_tag(rid, schema.status_tag(row), schema.STATUS_OK)
    for row in failed:
        client.set_tag(rid, schema.status_tag(row), schema.STATUS_FAILED)
    client.set_terminated(rid, "FINISHED")
    return rid


def _read_csv(path):
    return list(csv.DictReader(io.StringIO(path.read_text())))


def test_table_has_every_row_paper_columns_and_the_logged_numbers(tracking_uri, tmp_path):
    client = MlflowClient(tracking_uri)
    exp_id = client.create_experiment("compare-table")
    scratch = _log_sweep(
        client,
        exp_id,
        label="Mi/4",
        init="scratch",
        results={"digits_heldout": (0.4125, 0.031), "lfw": (0.71, None), "digits_heldout/fewshot_5shot": (0.3, 0.02)},
    )
    pretrained = _log_sweep(
        client,
        exp_id,
        label="Mi/4 digits0-4",
        init="pretrained",
        results={
            "digits_heldout": (0.8375, 0.0123),
            "digits_heldout/fewshot_5shot": (0.77, 0.05),
            "cifar10": (0.5, None),
        },
        failed=["lfw"],
        extra_tags={schema.SCRATCH_RUN_TAG: scratch},
    )

    # Name only the pretrained sweep: its scratch baseline comes along.
    result = cmp.compare(run_ids=[pretrained], tracking_uri=tracking_uri, out_dir=f"file://{tmp_path}/out")
    table = result.table
    rows = _read_csv(result.files["csv"])
    header = list(rows[0])
    assert header[0] == "benchmark"
    assert header[1:3] == ["Mi/4 digits0-4", "Mi/4 (scratch)"]
    assert header[3:] == [paper.paper_column(m) for m in paper.PAPER_MODELS]

    by_row = {r["benchmark"]: r for r in rows}
    assert list(by_row) == ["digits_heldout", "digits_heldout/fewshot_5shot", "cifar10", "lfw"]
    assert by_row["digits_heldout"]["Mi/4 digits0-4"] == "83.75"
    assert by_row["digits_heldout"]["Mi/4 (scratch)"] == "41.25"
    assert by_row["lfw"]["Mi/4 digits0-4"] == "failed"  # failure is a visible gap
    assert by_row["lfw"]["Mi/4 (scratch)"] == "71.00"
    assert by_row["cifar10"]["Mi/4 (scratch)"] == "—"  # not run in that sweep
    assert by_row["cifar10"]["ViT-H/14 JFT (paper)"] == "99.50"
    assert by_row["digits_heldout"]["ViT-L/16 I21k (paper)"] == "—"

    markdown = result.files["markdown"].read_text()
    assert "83.75 ± 1.23" in markdown and "| lfw | failed | 71.00 |" in markdown
    assert "on digits_heldout: +42.50 points (spread 3.10): pretraining helps" in markdown
    assert table.cell("digits_heldout/fewshot_5shot", "Mi/4 digits0-4").std == pytest.approx(5.0)
    assert result.files["png"].stat().st_size > 5000
    assert result.files["csv"] == tmp_path / "out" / "comparison.csv"

    # The comparison run holds the files as artifacts.
    client_files = {f.path for f in client.list_artifacts(result.run_id)}
    assert {"comparison.csv", "comparison.md", "comparison.png"} <= client_files
    assert client.get_run(result.run_id).data.tags["compared_runs"] == f"{pretrained},{scratch}"


def test_sweeps_selected_by_experiment_and_tag_filter_with_paper_rows(tracking_uri, tmp_path):
    client = MlflowClient(tracking_uri)
    exp_id = client.create_experiment("compare-select")
    for label in ("A", "B", "C"):
        _log_sweep(client, exp_id, label=label, init="pretrained", results={"pets": (0.9, None)})
    result = cmp.compare(
        experiment="compare-select",
        filter_string="tags.model_label != 'B'",
        tracking_uri=tracking_uri,
        out_dir=tmp_path,
        paper_rows=True,
        log_run=False,
    )
    names = [c.name for c in result.table.columns if c.kind != "paper"]
    assert names == ["A", "C"]
    assert result.table.rows[0] == "pets"
    assert set(paper.PAPER_ACCURACY) <= set(result.table.rows)
    assert result.table.cell("imagenet", "A").text() == "—"
    assert result.table.cell("vtab", "ViT-L/16 JFT (paper)").value == 76.28


def test_a_run_that_is_not_a_sweep_is_refused_with_advice(tracking_uri):
    client = MlflowClient(tracking_uri)
    exp_id = client.create_experiment("compare-wrong")
    rid = client.create_run(exp_id).info.run_id
    with pytest.raises(ValueError, match=r"not a transfer sweep.*parent run ids"):
        cmp.compare(run_ids=[rid], tracking_uri=tracking_uri, log_run=False)


def test_same_label_twice_gets_distinct_columns():
    sweeps = [
        cmp.Sweep(run_id=rid, label="ViT", init="pretrained", rows=["pets"], metrics={}, tags={})
        for rid in ("aaaaaaaa1111", "bbbbbbbb2222")
    ]
    names = [c.name for c in cmp.build_table(sweeps).columns[:2]]
    assert names == ["ViT", "ViT [bbbbbbbb]"]


def test_value_of_pretraining_is_judged_against_the_spread_across_seeds():
    scratch = cmp.Sweep(
        run_id="scratch00001",
        label="Mi/4 (scratch)",
        init="scratch",
        rows=["digits_heldout", "lfw", "pets"],
        metrics={
            "digits_heldout/test_accuracy": 0.246,
            "digits_heldout/test_accuracy_std": 0.030,
            "lfw/test_accuracy": 0.95,
            "pets/test_accuracy": 0.50,
            "pets/test_accuracy_std": 0.04,
        },
        tags={schema.status_tag(r): schema.STATUS_OK for r in ("digits_heldout", "lfw", "pets")},
    )
    pretrained = cmp.Sweep(
        run_id="pretrained01",
        label="Mi/4",
        init="pretrained",
        rows=["digits_heldout", "lfw", "pets", "cifar10"],
        metrics={
            "digits_heldout/test_accuracy": 0.436,
            "digits_heldout/test_accuracy_std": 0.034,
            "lfw/test_accuracy": 0.975,
            "pets/test_accuracy": 0.48,
            "pets/test_accuracy_std": 0.01,
            "cifar10/test_accuracy": 0.9,
        },
        tags={schema.SCRATCH_RUN_TAG: "scratch00001"}
        | {schema.status_tag(r): schema.STATUS_OK for r in ("digits_heldout", "lfw", "pets", "cifar10")},
    )
    gains = {g.row: g for g in cmp.build_table([pretrained, scratch]).pretraining_gains()}

    assert set(gains) == {"digits_heldout", "lfw", "pets"}  # cifar10 has no baseline number
    assert gains["digits_heldout"].gain == pytest.approx(19.0)
    assert gains["digits_heldout"].spread == pytest.approx(3.4)
    assert gains["digits_heldout"].verdict() == "pretraining helps, beyond the spread across seeds"
    assert gains["pets"].gain == pytest.approx(-2.0)
    assert gains["pets"].verdict() == "within the spread across seeds"
    assert gains["lfw"].spread is None
    assert "no spread" in gains["lfw"].verdict()
    assert gains["digits_heldout"].text().startswith("Mi/4 vs Mi/4 (scratch) on digits_heldout: +19.00 points")


def test_a_sweep_without_its_baseline_in_the_table_has_no_gains():
    lone = cmp.Sweep(
        run_id="pretrained02",
        label="ViT",
        init="pretrained",
        rows=["pets"],
        metrics={"pets/test_accuracy": 0.9},
        tags={schema.SCRATCH_RUN_TAG: "not-selected", schema.status_tag("pets"): schema.STATUS_OK},
    )
    assert cmp.build_table([lone]).pretraining_gains() == []


def test_a_number_standing_on_only_some_runs_says_how_many_failed():
    sweep = cmp.Sweep(
        run_id="partial00001",
        label="ViT",
        init="pretrained",
        rows=["pets", "lfw"],
        metrics={
            "pets/test_accuracy": 0.436,
            "pets/test_accuracy_std": 0.034,
            schema.failed_runs_key("pets"): 2,
            "lfw/test_accuracy": 0.9,
        },
        tags={schema.status_tag("pets"): schema.STATUS_OK, schema.status_tag("lfw"): schema.STATUS_OK},
    )
    table = cmp.build_table([sweep])
    assert "| pets | 43.60 ± 3.40 (2 runs failed) |" in table.to_markdown()
    assert "| lfw | 90.00 |" in table.to_markdown()
    wide = {r["benchmark"]: r for r in csv.DictReader(io.StringIO(table.to_csv()))}
    assert wide["pets"]["ViT"] == "43.60"  # the CSV keeps plain numbers
    long = {(r["model"], r["benchmark"]): r for r in csv.DictReader(io.StringIO(table.to_long_csv()))}
    assert long[("ViT", "pets")]["note"] == "2 runs failed" and long[("ViT", "pets")]["status"] == "ok"
    assert long[("ViT", "lfw")]["note"] == ""
