"""Compare transfer sweeps (one per pretrained model) side by side with the ViT paper's Table 2.

    python jobs/compare.py --runs <parent run id>[,<parent run id>...]
    python jobs/compare.py --experiment vit-transfer --filter "tags.model_label LIKE 'ViT-L%'"

Writes comparison.md, comparison.csv (first column ``benchmark``, one column per model; the paper's numbers as
extra columns), comparison_long.csv and comparison.png to --out, prints the table, and logs the files as
artifacts of a "comparison" run in MLflow. A pretrained sweep's from-scratch baseline is included unless
--no-baselines. Failed or missing benchmarks show as "failed" / "—".
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="", help="comma-separated parent run ids printed by jobs/transfer.py")
    parser.add_argument("--experiment", help="take every transfer sweep of this MLflow experiment")
    parser.add_argument("--filter", help="with --experiment: an MLflow filter, e.g. \"tags.model_label = 'tiny'\"")
    parser.add_argument("--out", default=None, help="output directory, path or file:// URL (default: runs/compare)")
    parser.add_argument("--tracking-uri", help="MLflow URI (default: $MLFLOW_TRACKING_URI, else runs/mlflow.db)")
    parser.add_argument("--no-baselines", action="store_true", help="leave out the sweeps' from-scratch baselines")
    parser.add_argument("--paper-rows", action="store_true", help="also list the paper's benchmarks not run here")
    parser.add_argument("--no-log", action="store_true", help="do not log a comparison run to MLflow")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from mlflow.exceptions import MlflowException

    from pipeline.compare import compare
    from pipeline.config import default_tracking_uri, home_dir

    run_ids = [r.strip() for r in args.runs.split(",") if r.strip()]
    if not run_ids and not args.experiment:
        print("compare: pass --runs <parent run ids> or --experiment <name>", file=sys.stderr)
        return 2
    try:
        result = compare(
            run_ids=run_ids,
            experiment=args.experiment,
            filter_string=args.filter,
            tracking_uri=args.tracking_uri or default_tracking_uri(),
            out_dir=args.out or home_dir() / "runs" / "compare",
            include_baselines=not args.no_baselines,
            paper_rows=args.paper_rows,
            log_run=not args.no_log,
        )
    except (ValueError, MlflowException) as exc:  # e.g. a run id that is not in this tracking store
        print(f"compare: {exc}", file=sys.stderr)
        return 2
    print(result.table.to_markdown())
    gains = result.table.gains_markdown()
    if gains:
        print(gains)
    for kind, path in result.files.items():
        print(f"compare: {kind}: {path}")
    if result.run_id:
        print(f"compare: logged as MLflow run {result.run_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
