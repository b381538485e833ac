"""The result schema of a transfer sweep: what ``pipeline.transfer`` writes on each sweep's MLflow parent run and
``pipeline.compare`` reads back.

- tags ``role=transfer_sweep``, ``model_label``, ``init`` (pretrained | scratch), ``pretrain_run_id``,
  ``pretrained_uri``, ``result_rows`` (comma-separated row names) and ``status/<row>`` (``ok`` or why not);
  a pretrained sweep with a from-scratch baseline names it in ``scratch_run_id`` (and the baseline names the
  sweep in ``baseline_for``); a comparison run made by ``pipeline.compare`` has ``role=comparison``;
- metrics ``<benchmark>/test_accuracy`` (fraction, mean over seeds), ``<benchmark>/test_accuracy_std`` (with
  several seeds), ``<benchmark>/best_lr``, ``<benchmark>/failed_runs`` (when some fine-tuning runs failed),
  few-shot ``<benchmark>/fewshot_<k>shot`` (+ ``_std``).

It sits on the ground floor so that the transfer stage and the comparison share it without importing each other.
"""

from __future__ import annotations

ROLE_TAG = "role"
SWEEP_ROLE = "transfer_sweep"
COMPARISON_ROLE = "comparison"
MODEL_LABEL_TAG = "model_label"
INIT_TAG = "init"  # "pretrained" or "scratch"
PRETRAIN_RUN_TAG = "pretrain_run_id"
PRETRAINED_URI_TAG = "pretrained_uri"
SCRATCH_RUN_TAG = "scratch_run_id"  # on a pretrained sweep: its from-scratch baseline's parent run
BASELINE_FOR_TAG = "baseline_for"  # on a scratch sweep: the pretrained sweep it is the baseline of
ROWS_TAG = "result_rows"
STATUS_OK = "ok"
STATUS_FAILED = "failed"


def value_key(row: str) -> str:
    """Metric holding a row's accuracy (a fraction): few-shot rows are named after their metric already."""
    return row if "/fewshot_" in row else f"{row}/test_accuracy"


def std_key(row: str) -> str:
    return value_key(row) + "_std"


def failed_runs_key(row: str) -> str:
    """Metric counting a benchmark's failed fine-tuning runs, when its row still has a number from the others."""
    return f"{row}/failed_runs"


def status_tag(row: str) -> str:
    return f"status/{row}"


def fewshot_row(benchmark: str, shots: int) -> str:
    return f"{benchmark}/fewshot_{shots}shot"
