"""Where a run's files go by default: ``runs/`` under the home (``home_dir``).

The home is ``$VITPIPE_HOME`` when set; else the checkout the code runs from; but under ``ray job submit
--working-dir`` the code runs from a temporary copy that Ray deletes, so there it is ``~/.vitpipe`` (of the user
the Ray node runs as). ``make demo`` links ``~/.vitpipe/runs`` to its checkout's ``runs/`` (``link_home_runs``),
so that a submitted job finds the demo's data and writes where the demo does.
"""

from __future__ import annotations

import os
from pathlib import Path

# pipeline/config/paths.py -> the repository root, three levels up.
REPO_ROOT = Path(__file__).resolve().parents[2]
HOME_ENV = "VITPIPE_HOME"
# The home of jobs that run from Ray's temporary copy of the code.
STABLE_HOME = "~/.vitpipe"


def home_dir() -> Path:
    configured = os.environ.get(HOME_ENV)
    if configured:
        return Path(configured).expanduser().resolve()
    if in_ray_job_copy():
        return Path(STABLE_HOME).expanduser()
    return REPO_ROOT.resolve()


def link_home_runs(runs_dir: Path | None = None, home: Path | None = None) -> str:
    """Make ``<~/.vitpipe>/runs`` a link to ``runs_dir`` (default: this checkout's runs/) unless it already exists;
    returns a line saying where submitted jobs will write."""
    runs_dir = (runs_dir or REPO_ROOT / "runs").resolve()
    link = (home or Path(STABLE_HOME).expanduser()) / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() and link.resolve() == runs_dir:
        return f"ray job submit jobs write to {link} -> {runs_dir}"
    if link.exists() or link.is_symlink():
        return f"ray job submit jobs write to {link} (not linked to {runs_dir}: it already exists)"
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(runs_dir, target_is_directory=True)
    return f"ray job submit jobs write to {link} -> {runs_dir} (linked now)"


def in_ray_job_copy() -> bool:
    """True when this code runs from the temporary copy `ray job submit --working-dir` makes (Ray deletes it)."""
    return any(part.startswith("_ray_pkg_") for part in REPO_ROOT.parts)


def default_runs_root() -> str:
    return "file://" + str(home_dir() / "runs")


def default_tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else an SQLite store in runs/ (an absolute path, so any cwd works)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///" + str(home_dir() / "runs" / "mlflow.db")
