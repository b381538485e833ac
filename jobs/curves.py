"""Draw the evaluation curves of one or several pretraining runs from MLflow (held-out loss, top-1 or
precision@1, few-shot accuracies against the step: what ``eval.every_steps`` logs).

    python jobs/curves.py --runs demo                      # a run name in the vit-pretrain experiment
    python jobs/curves.py --runs <run id>,<run id> --out runs/curves/b16-vs-l16.png

Writes the PNG (default runs/curves/curves.png) and prints the last value of every metric per run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", required=True, help="comma-separated MLflow run ids or run names")
    parser.add_argument("--experiment", default="vit-pretrain", help="where run names are looked up")
    parser.add_argument("--out", help="PNG path (default: runs/curves/curves.png)")
    parser.add_argument("--tracking-uri", help="MLflow URI (default: $MLFLOW_TRACKING_URI, else runs/mlflow.db)")
    args = parser.parse_args(argv)
    from mlflow.exceptions import MlflowException

    from pipeline import curves
    from pipeline.config import default_tracking_uri, home_dir

    names = [r.strip() for r in args.runs.split(",") if r.strip()]
    out = Path(args.out) if args.out else home_dir() / "runs" / "curves" / "curves.png"
    try:
        runs = curves.read_curves(args.tracking_uri or default_tracking_uri(), names, experiment=args.experiment)
        curves.draw(runs, out)
    except (ValueError, MlflowException) as exc:
        print(f"curves: {exc}", file=sys.stderr)
        return 2
    print(curves.table(runs))
    print(f"curves: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
