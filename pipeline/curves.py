"""Evaluation curves of pretraining runs, read from MLflow: held-out loss and top-1 and few-shot accuracies
against the training step (what ``pipeline.pretrain.evaluation`` logs), one line per run, as one PNG."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The metrics drawn: the evaluation's, not its bookkeeping (how long it took, how many images it read).
PREFIXES = ("eval/", "fewshot/")
LEFT_OUT = ("eval/seconds", "eval/images")


@dataclass
class RunCurves:
    run_id: str
    label: str  # the run's name, or its id when it has none
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # metric -> (step, value), by step


def _find_run(client: Any, experiment: str, name_or_id: str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(name_or_id)
    except MlflowException:
        pass
    found = client.get_experiment_by_name(experiment)
    runs = (
        client.search_runs(
            [found.experiment_id],
            filter_string=f"attributes.run_name = '{name_or_id}'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if found
        else []
    )
    if not runs:
        raise ValueError(f"no MLflow run with id or name {name_or_id!r} (names are looked up in {experiment!r})")
    return runs[0]


def read_curves(tracking_uri: str, runs: list[str], *, experiment: str = "vit-pretrain") -> list[RunCurves]:
    """The evaluation curves of each run (an id, or a run name in ``experiment``: its latest run)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    result = []
    for name_or_id in runs:
        run = _find_run(client, experiment, name_or_id)
        item = RunCurves(run.info.run_id, run.info.run_name or run.info.run_id)
        for key in sorted(run.data.metrics):
            if key.startswith(PREFIXES) and key not in LEFT_OUT:
                history = client.get_metric_history(run.info.run_id, key)
                item.curves[key] = sorted((m.step, m.value) for m in history)
        result.append(item)
    return result


def draw(runs: list[RunCurves], path: str | Path) -> list[str]:
    """One panel per metric, one line per run; writes a PNG at ``path`` and returns the metrics drawn."""
    import matplotlib

    matplotlib.use("Agg")  # no display on clusters and CI
    import matplotlib.pyplot as plt

    metrics = sorted({key for run in runs for key in run.curves})
    if not metrics:
        labels = ", ".join(run.label for run in runs)
        raise ValueError(f"runs {labels} logged no evaluation metrics: set eval.every_steps (and data.eval)")
    cols = min(3, len(metrics))
    rows = -(-len(metrics) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False, layout="constrained")
    for ax, metric in zip(axes.flat, metrics, strict=False):
        for run in runs:
            points = run.curves.get(metric)
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", markersize=3, label=run.label)
        ax.set_title(metric)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(metrics) :]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize="small")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return metrics


def table(runs: list[RunCurves]) -> str:
    """The last value of every metric per run, as Markdown (what the PNG ends at)."""
    metrics = sorted({key for run in runs for key in run.curves})
    lines = ["| run | step | " + " | ".join(metrics) + " |", "|---|---:|" + "---:|" * len(metrics)]
    for run in runs:
        last_step = max((points[-1][0] for points in run.curves.values() if points), default=0)
        cells = [f"{run.curves[m][-1][1]:.4f}" if run.curves.get(m) else "—" for m in metrics]
        lines.append(f"| {run.label} | {last_step} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
