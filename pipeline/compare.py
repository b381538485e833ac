"""Put transfer sweeps side by side, shaped like the ViT paper's Table 2.

Rows are benchmarks, columns are pretrained models (one per transfer sweep in MLflow, i.e. one parent run each),
followed by the paper's published numbers as reference columns. A benchmark that failed or was not run in a
sweep shows as a visible gap ("failed", "—"), never as a dropped row; a number that stands on only some of its
fine-tuning runs says how many failed.

The sweeps are read in the result schema of ``pipeline.results``, which ``pipeline.transfer`` writes.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pipeline import paper
from pipeline.results import (
    COMPARISON_ROLE,
    INIT_TAG,
    MODEL_LABEL_TAG,
    ROLE_TAG,
    ROWS_TAG,
    SCRATCH_RUN_TAG,
    STATUS_OK,
    SWEEP_ROLE,
    failed_runs_key,
    status_tag,
    std_key,
    value_key,
)

MISSING = "—"


# --- the table --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Cell:
    """Accuracy in percent (with its std over seeds, if any), or the text shown in its place."""

    value: float | None = None
    std: float | None = None
    gap: str = MISSING
    note: str = ""  # e.g. some fine-tuning runs of the row failed: the number stands on the others

    def text(self) -> str:
        if self.value is None:
            return self.gap
        text = f"{self.value:.2f}" if self.std is None else f"{self.value:.2f} ± {self.std:.2f}"
        return f"{text} ({self.note})" if self.note else text

    def csv_text(self) -> str:
        return self.gap if self.value is None else f"{self.value:.2f}"


@dataclass(frozen=True)
class Column:
    name: str
    kind: str  # "pretrained", "scratch" or "paper"
    run_id: str | None = None
    baseline_run_id: str | None = None  # a pretrained sweep's from-scratch baseline, when it has one


@dataclass(frozen=True)
class PretrainingGain:
    """Pretrained minus from-scratch accuracy on one row, against the larger of the two spreads over seeds."""

    model: str
    baseline: str
    row: str
    gain: float  # percentage points
    spread: float | None  # None with a single seed: nothing to judge the gain against

    def verdict(self) -> str:
        if self.spread is None:
            return "no spread over seeds recorded (one seed, or an aggregate row), nothing to judge against"
        if abs(self.gain) <= self.spread:
            return "within the spread across seeds"
        direction = "helps" if self.gain > 0 else "hurts"
        return f"pretraining {direction}, beyond the spread across seeds"

    def text(self) -> str:
        spread = "" if self.spread is None else f" (spread {self.spread:.2f})"
        return f"{self.model} vs {self.baseline} on {self.row}: {self.gain:+.2f} points{spread}: {self.verdict()}"


@dataclass
class ComparisonTable:
    rows: list[str]
    columns: list[Column]
    cells: dict[tuple[str, str], Cell] = field(default_factory=dict)

    def cell(self, row: str, column: str) -> Cell:
        return self.cells.get((row, column), Cell())

    def pretraining_gains(self) -> list[PretrainingGain]:
        """Every row where a pretrained column and its from-scratch baseline both have a number."""
        by_run = {c.run_id: c for c in self.columns if c.run_id}
        gains = []
        for column in self.columns:
            baseline = by_run.get(column.baseline_run_id) if column.baseline_run_id else None
            if column.kind != "pretrained" or baseline is None:
                continue
            for row in self.rows:
                ours, theirs = self.cell(row, column.name), self.cell(row, baseline.name)
                if ours.value is None or theirs.value is None:
                    continue
                stds = [s for s in (ours.std, theirs.std) if s is not None]
                spread = max(stds) if stds else None
                gains.append(PretrainingGain(column.name, baseline.name, row, ours.value - theirs.value, spread))
        return gains

    def gains_markdown(self) -> str:
        """The value-of-pretraining section (empty without a from-scratch baseline), printed and in comparison.md."""
        gains = self.pretraining_gains()
        if not gains:
            return ""
        lines = "".join(f"- {g.text()}\n" for g in gains)
        return (
            "## Value of pretraining\n\nPretrained minus from-scratch accuracy; spread: the larger std over seeds.\n\n"
            + lines
        )

    def to_markdown(self) -> str:
        header = ["benchmark", *(c.name for c in self.columns)]
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * len(self.columns)) + "|"]
        for row in self.rows:
            lines.append("| " + " | ".join([row, *(self.cell(row, c.name).text() for c in self.columns)]) + " |")
        return "\n".join(lines) + "\n"

    def to_csv(self) -> str:
        """First column ``benchmark``, then one column per model; accuracies in percent, gaps as text."""
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["benchmark", *(c.name for c in self.columns)])
        for row in self.rows:
            writer.writerow([row, *(self.cell(row, c.name).csv_text() for c in self.columns)])
        return out.getvalue()

    def to_long_csv(self) -> str:
        """One line per (model, benchmark) with the std and the run id: the machine-readable companion."""
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["model", "kind", "run_id", "benchmark", "accuracy", "std", "status", "note"])
        for column in self.columns:
            for row in self.rows:
                cell = self.cell(row, column.name)
                writer.writerow(
                    [
                        column.name,
                        column.kind,
                        column.run_id or "",
                        row,
                        "" if cell.value is None else f"{cell.value:.4f}",
                        "" if cell.std is None else f"{cell.std:.4f}",
                        STATUS_OK if cell.value is not None else cell.gap,
                        cell.note,
                    ]
                )
        return out.getvalue()

    def plot(self, path: str | Path) -> Path:
        """Grouped horizontal bars per benchmark (error bars = std over seeds); gaps are written in the plot."""
        import matplotlib

        matplotlib.use("Agg")  # no display on clusters and CI
        import matplotlib.pyplot as plt

        path = Path(path)
        # A paper column with no number on any of these rows (e.g. the embedded demo) would only take space.
        columns = [
            c
            for c in self.columns
            if c.kind != "paper" or any(self.cell(r, c.name).value is not None for r in self.rows)
        ]
        n_rows, n_cols = len(self.rows), len(columns)
        bar = 0.8 / max(n_cols, 1)
        fig, ax = plt.subplots(figsize=(11, 1.5 + 0.2 * max(n_rows * n_cols, 6)))
        colors = plt.get_cmap("tab10")
        for j, column in enumerate(columns):
            color = colors(j % 10)
            ys, xs, err_ys, err_xs, errs = [], [], [], [], []
            for i, row in enumerate(self.rows):
                y = i + (j - (n_cols - 1) / 2) * bar
                cell = self.cell(row, column.name)
                if cell.value is None:
                    if column.kind != "paper":  # the paper has no number for most rows: no need to say so
                        ax.text(1, y, cell.gap, va="center", fontsize=7, color=color)
                    continue
                ys.append(y)
                xs.append(cell.value)
                if cell.std is not None:
                    err_ys.append(y)
                    err_xs.append(cell.value)
                    errs.append(cell.std)
            paper_style = column.kind == "paper"
            ax.barh(
                ys,
                xs,
                height=bar,
                color=color,
                hatch="//" if paper_style else None,
                alpha=0.6 if paper_style else 0.9,
                label=column.name,
            )
            if errs:
                ax.errorbar(err_xs, err_ys, xerr=errs, fmt="none", ecolor="black", elinewidth=0.8, capsize=2)
        ax.set_yticks(range(n_rows), self.rows, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, 100)
        ax.set_xlabel("top-1 accuracy (%)")
        ax.set_title("Transfer accuracy (fine-tuning; few-shot rows: linear probe)")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


@dataclass(frozen=True)
class Sweep:
    """What the table needs from one transfer sweep's parent run."""

    run_id: str
    label: str
    init: str
    rows: list[str]
    metrics: dict[str, float]
    tags: dict[str, str]

    def cell(self, row: str) -> Cell:
        if row not in self.rows:
            return Cell(gap=MISSING)
        status = self.tags.get(status_tag(row), MISSING)
        value = self.metrics.get(value_key(row))
        if status != STATUS_OK or value is None or math.isnan(value):
            return Cell(gap=status if status != STATUS_OK else MISSING)
        std = self.metrics.get(std_key(row))
        failed = int(self.metrics.get(failed_runs_key(row), 0))
        note = f"{failed} run{'s' if failed > 1 else ''} failed" if failed else ""
        return Cell(value=100.0 * value, std=None if std is None else 100.0 * std, note=note)


def sweep_from_run(run) -> Sweep:
    """Read a parent run (an ``mlflow.entities.Run``) written by the transfer sweep."""
    tags = dict(run.data.tags)
    if tags.get(ROLE_TAG) != SWEEP_ROLE:
        raise ValueError(
            f"MLflow run {run.info.run_id} is not a transfer sweep (tag {ROLE_TAG}={tags.get(ROLE_TAG)!r}); "
            "pass the parent run ids printed by jobs/transfer.py"
        )
    init = tags.get(INIT_TAG, "pretrained")
    label = tags.get(MODEL_LABEL_TAG) or run.info.run_name or run.info.run_id[:8]
    if init == "scratch" and "scratch" not in label:
        label = f"{label} (scratch)"
    rows = [r for r in tags.get(ROWS_TAG, "").split(",") if r]
    return Sweep(run.info.run_id, label, init, rows, dict(run.data.metrics), tags)


def build_table(sweeps: Sequence[Sweep], *, paper_rows: bool = False) -> ComparisonTable:
    """Rows: every row any sweep meant to produce (in order), plus the paper's rows when asked."""
    rows: list[str] = []
    for sweep in sweeps:
        rows += [r for r in sweep.rows if r not in rows]
    if paper_rows:
        rows += [r for r in paper.PAPER_ACCURACY if r not in rows]

    columns: list[Column] = []
    cells: dict[tuple[str, str], Cell] = {}
    seen: set[str] = set()
    for sweep in sweeps:
        name = sweep.label if sweep.label not in seen else f"{sweep.label} [{sweep.run_id[:8]}]"
        seen.add(name)
        columns.append(
            Column(name=name, kind=sweep.init, run_id=sweep.run_id, baseline_run_id=sweep.tags.get(SCRATCH_RUN_TAG))
        )
        for row in rows:
            cells[(row, name)] = sweep.cell(row)
    for model in paper.PAPER_MODELS:
        name = paper.paper_column(model)
        columns.append(Column(name=name, kind="paper"))
        for row in rows:
            value = paper.paper_value(row, model)
            cells[(row, name)] = Cell(value=value) if value is not None else Cell(gap=MISSING)
    return ComparisonTable(rows=rows, columns=columns, cells=cells)


# --- reading MLflow and writing the outputs ------------------------------------------------------------------
@dataclass
class ComparisonResult:
    table: ComparisonTable
    files: dict[str, Path]
    run_id: str | None  # the comparison run holding the files as artifacts


def select_sweeps(
    client,
    *,
    run_ids: Sequence[str] = (),
    experiment: str | None = None,
    filter_string: str | None = None,
    include_baselines: bool = True,
) -> list[Sweep]:
    """Parent runs by id and/or every sweep of an experiment matching an MLflow filter (e.g. on a tag).

    With ``include_baselines`` a pretrained sweep's from-scratch baseline comes along even if not named.
    """
    runs = [client.get_run(rid) for rid in run_ids]
    if experiment is not None:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            raise ValueError(f"MLflow experiment {experiment!r} does not exist (check --experiment and the URI)")
        query = f"tags.{ROLE_TAG} = '{SWEEP_ROLE}'" + (f" and {filter_string}" if filter_string else "")
        found = client.search_runs([exp.experiment_id], filter_string=query, order_by=["attributes.start_time ASC"])
        runs += [r for r in found if r.info.run_id not in {x.info.run_id for x in runs}]
    if not runs:
        raise ValueError("no transfer sweeps selected: pass parent run ids or an experiment (and optional filter)")
    sweeps = [sweep_from_run(r) for r in runs]
    if include_baselines:
        chosen = {s.run_id for s in sweeps}
        for sweep in list(sweeps):
            baseline = sweep.tags.get(SCRATCH_RUN_TAG)
            if baseline and baseline not in chosen:
                sweeps.append(sweep_from_run(client.get_run(baseline)))
                chosen.add(baseline)
    return sweeps


def _local_dir(out_dir: str | Path) -> Path:
    """A local directory given as a path or a file:// URL (the files also go to MLflow, which can be remote)."""
    text = str(out_dir)
    if "://" not in text:
        return Path(text)
    from pipeline import storage

    local = storage.local_path(text)
    if local is None:
        raise ValueError(
            f"out_dir {text!r}: comparison files are written to a local directory (path or file:// URL); "
            "they are also logged to MLflow as artifacts, which may live on remote storage"
        )
    return local


def write_outputs(table: ComparisonTable, out_dir: str | Path) -> dict[str, Path]:
    out = _local_dir(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "markdown": out / "comparison.md",
        "csv": out / "comparison.csv",
        "long_csv": out / "comparison_long.csv",
    }
    gains = table.gains_markdown()
    files["markdown"].write_text(table.to_markdown() + (f"\n{gains}" if gains else ""))
    files["csv"].write_text(table.to_csv())
    files["long_csv"].write_text(table.to_long_csv())
    files["png"] = table.plot(out / "comparison.png")
    return files


def compare(
    *,
    run_ids: Sequence[str] = (),
    experiment: str | None = None,
    filter_string: str | None = None,
    tracking_uri: str | None = None,
    out_dir: str | Path = "runs/compare",
    include_baselines: bool = True,
    paper_rows: bool = False,
    log_run: bool = True,
    comparison_experiment: str | None = None,
) -> ComparisonResult:
    """Read sweeps from MLflow, write comparison.{md,csv,png} to ``out_dir`` and log them as a comparison run.

    The comparison run goes to ``comparison_experiment`` (default: ``experiment``, else the first sweep's).
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    sweeps = select_sweeps(
        client, run_ids=run_ids, experiment=experiment, filter_string=filter_string, include_baselines=include_baselines
    )
    table = build_table(sweeps, paper_rows=paper_rows)
    files = write_outputs(table, out_dir)
    run_id = None
    if log_run:
        if comparison_experiment or experiment:
            name = comparison_experiment or experiment
            exp = client.get_experiment_by_name(name)
            exp_id = exp.experiment_id if exp is not None else client.create_experiment(name)
        else:
            exp_id = client.get_run(sweeps[0].run_id).info.experiment_id
        run = client.create_run(
            exp_id,
            run_name="comparison",
            tags={ROLE_TAG: COMPARISON_ROLE, "compared_runs": ",".join(s.run_id for s in sweeps)},
        )
        run_id = run.info.run_id
        try:
            for path in files.values():
                client.log_artifact(run_id, str(path))
        except BaseException:
            client.set_terminated(run_id, "FAILED")
            raise
        client.set_terminated(run_id, "FINISHED")
    return ComparisonResult(table=table, files=files, run_id=run_id)
