"""Where a run's files go by default: the checkout's runs/ directory, or $VITPIPE_HOME/runs."""

from __future__ import annotations

import os
from pathlib import Path

# pipeline/config/paths.py -> the repository root, three levels up.
REPO_ROOT = Path(__file__).resolve().parents[2]
# Set VITPIPE_HOME to keep runs/ (checkpoints, exports, the SQLite MLflow store) somewhere else than the
# repository, e.g. when the code runs from the temporary copy `ray job submit --working-dir .` makes.
HOME_ENV = "VITPIPE_HOME"


def home_dir() -> Path:
    return Path(os.environ.get(HOME_ENV) or REPO_ROOT).expanduser().resolve()


def in_ray_job_copy() -> bool:
    """True when this code runs from the temporary copy `ray job submit --working-dir` makes (Ray deletes it)."""
    return any(part.startswith("_ray_pkg_") for part in REPO_ROOT.parts)


def default_runs_root() -> str:
    return "file://" + str(home_dir() / "runs")


def default_tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else an SQLite store in runs/ (an absolute path, so any cwd works)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///" + str(home_dir() / "runs" / "mlflow.db")
