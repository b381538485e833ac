"""Fine-tune a pretrained ViT on downstream benchmarks (one Ray task per benchmark x learning rate x seed), with
few-shot linear evaluation and an optional from-scratch baseline, all recorded in MLflow.

On a cluster (the paper's benchmarks; shards under <root>/<benchmark>/{train,minival,test}.manifest.json):

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/transfer.py \\
        --pretrained <MLflow run id | export URL | official .npz> \\
        --benchmarks cifar10,cifar100,pets,flowers102,imagenet,vtab --fewshot 1,5,10,25 \\
        --set data_root=gs://<bucket>/benchmarks --tracking-uri http://<mlflow>:5000

On a laptop (embedded benchmarks, local Ray, SQLite MLflow under runs/):

    python jobs/transfer.py --pretrained <run id> --benchmarks digits_heldout,lfw --fewshot 1,5,10 --scratch

``--set key=value`` (repeatable) changes a transfer setting (``data_root``, ``num_gpus``, ``loader_workers``...),
a recipe field of every benchmark (``steps``, ``lrs=0.003,0.01``, ``resolution``, ``micro_batch_size``...), or of
one benchmark (``imagenet.micro_batch_size=64``). ``--dry-run`` validates everything and prints the plan.

Memory: a GPU benchmark without ``micro_batch_size`` gets the largest micro-batch that fits the runs' GPU (and
activation checkpointing only where nothing fits without it), planned before Ray starts for ``--set gpu=h100``
(default ``auto``: the driver's GPU, else an assumed H100; sized again if the cluster's resources name another);
a setting that cannot fit is refused with the fix. The printed plan says what was chosen for each benchmark.

Exit codes: 0 every run finished; 1 the sweep completed but some runs failed (they are FAILED in MLflow);
2 configuration or data error (nothing was started).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.config import ConfigError
from pipeline.config.cli import add_config_arguments, refuse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrained", required=True, help="MLflow run id of a pretraining run, export URL or .npz")
    parser.add_argument("--benchmarks", required=True, help="comma-separated names or aliases (vtab, paper, embedded)")
    parser.add_argument("--fewshot", default="", help="shot counts for few-shot linear evaluation, e.g. 1,5,10,25")
    parser.add_argument("--fewshot-seeds", type=int, help="draws of the shots per count (default 3)")
    parser.add_argument("--scratch", action="store_true", help="also fine-tune the same architecture from scratch")
    parser.add_argument("--variant", help="architecture of an official .npz checkpoint, e.g. B/16")
    parser.add_argument("--label", help="model label shown in comparisons (default: from the pretraining run)")
    parser.add_argument("--tracking-uri", help="MLflow URI (default: $MLFLOW_TRACKING_URI, else runs/mlflow.db)")
    parser.add_argument("--experiment", help="MLflow experiment (default: vit-transfer)")
    add_config_arguments(parser, set_example="steps=500 --set lrs=0.003,0.01 --set imagenet.micro_batch_size=64")
    parser.add_argument("--dry-run", action="store_true", help="validate and print the plan; start nothing")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    from pipeline.config.transfer import build_config
    from pipeline.transfer.orchestrate import describe_plan, run_sweep
    from pipeline.transfer.sweep import plan_sweep

    fields = {
        "pretrained": args.pretrained,
        "benchmarks": [b.strip() for b in args.benchmarks.split(",") if b.strip()],
        "scratch": args.scratch,
        "variant": args.variant,
        "model_label": args.label,
        "ray_address": args.address,
    }
    optional = {"fewshot_seeds": args.fewshot_seeds, "tracking_uri": args.tracking_uri, "experiment": args.experiment}
    fields |= {k: v for k, v in optional.items() if v is not None}
    # parse -> validate (benchmarks, recipes, shards, the pretrained model): all before Ray starts.
    try:
        if args.fewshot:
            try:
                fields["fewshot"] = [int(k) for k in args.fewshot.split(",") if k.strip()]
            except ValueError:
                raise ConfigError(
                    [f"--fewshot {args.fewshot!r}: give shot counts as integers, e.g. 1,5,10,25"]
                ) from None
        cfg = build_config(fields, args.sets)
        plan = plan_sweep(cfg)
    except (ConfigError, ValueError) as exc:
        return refuse("transfer", exc)
    print(describe_plan(plan), flush=True)
    if args.dry_run:
        return 0

    import ray

    try:
        result = run_sweep(cfg, plan=plan)
    except ConfigError as exc:  # e.g. the cluster cannot fit a run's resource request
        return refuse("transfer", exc)
    finally:
        ray.shutdown()

    print(f"\ntransfer: parent run {result.run_id} ({plan.source.label})")
    if result.scratch_run_id:
        print(f"transfer: from-scratch baseline run {result.scratch_run_id}")
    for init, metrics in result.metrics.items():
        for key in sorted(k for k in metrics if k.endswith(("/test_accuracy", "shot")) and "/lr_" not in k):
            std = metrics.get(key + "_std")
            spread = f" ± {100 * std:.2f}" if std is not None else ""
            print(f"  [{init}] {key}: {100 * metrics[key]:.2f}{spread}")
    for outcome in result.failed:
        print(f"transfer: FAILED {outcome.spec.name}: {outcome.error}", file=sys.stderr)
    for lost in result.untracked:
        print(f"transfer: not recorded in MLflow (the tracking server kept failing): {lost}")
    print(f"compare: python jobs/compare.py --runs {result.run_id}")
    return 1 if result.failed or result.untracked else 0


if __name__ == "__main__":
    sys.exit(main())
