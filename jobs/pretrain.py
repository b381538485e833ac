"""Pretrain a ViT with Ray Train + DeepSpeed ZeRO on WebDataset shards, tracked in MLflow.

On a laptop (starts or joins a local Ray; the default preset `tiny` trains ViT-Mi/4 on digits 0-4 on 2 CPUs):

    python jobs/prepare_data.py --source digits --classes 0-4 --split train --out runs/data/digits-0-4 \\
        --samples-per-shard 128
    python jobs/pretrain.py

Without Ray (one process, e.g. under a debugger; or one process per rank under torchrun):

    python jobs/pretrain.py --set scale.launcher=local --set scale.workers=1
    torchrun --nproc-per-node 2 jobs/pretrain.py --set scale.launcher=local

On a cluster:

    ray job submit --address http://<head>:8265 --working-dir . -- python jobs/pretrain.py \\
        --config vit_h14_jft --set data.train=gs://<bucket>/jft/train.manifest.json --set run.root=gs://<bucket>/runs

SIGTERM to this job (`ray job stop`, a preempted node) or to one of its workers makes the run checkpoint at its next
step boundary, close its MLflow run KILLED and exit 75; this job waits at most --stop-grace-s for the workers (under
`ray job stop`, give the job that long: RAY_JOB_STOP_WAIT_TIME_S in its runtime env, default 3 s).

Starting a run again with the same run name (default: the preset's name) resumes it from its latest complete
checkpoint. Exit codes: 0 done (or stopped at train.stop_at_step), 2 configuration error (nothing started),
1 training failed, 65 stopped on training data no restart can read (the error names the shard), 75 preempted.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.config import ConfigError, load_config
from pipeline.config.cli import add_config_arguments, refuse
from pipeline.config.presets import DEFAULT_PRESET, PRESETS

if TYPE_CHECKING:
    from pipeline.pretrain.preemption import DriverStop


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(
        parser,
        set_example="train.steps=200 --set run.root=gs://bucket/runs",
        presets=PRESETS,
        default_preset=DEFAULT_PRESET,
    )
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    parser.add_argument(
        "--stop-grace-s",
        type=_positive_seconds,
        default=120.0,
        help="after a SIGTERM, how long to wait for the workers to checkpoint and stop (default 120)",
    )
    return parser.parse_args(argv)


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"--stop-grace-s must be a number of seconds > 0, not {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    from pipeline.pretrain.preemption import DriverStop

    # From here on SIGTERM stops the run cleanly (pipeline.pretrain.preemption), whenever it comes.
    with DriverStop(args.stop_grace_s) as stop:
        return pretrain_job(args, stop)


def _preempted(why: str) -> int:
    from pipeline.pretrain.preemption import EXIT_PREEMPTED

    print(
        f"pretrain: preempted (SIGTERM): {why}; submit the same command again to resume from the latest complete "
        "checkpoint",
        flush=True,
    )
    return EXIT_PREEMPTED


def pretrain_job(args: argparse.Namespace, stop: DriverStop) -> int:
    # parse -> validate: every configuration problem is reported here, before Ray starts.
    try:
        cfg = load_config(args.config, args.sets)
        if args.print_config:
            print(json.dumps(cfg.model_dump(mode="json"), indent=2))
            return 0
        from pipeline import pretrain

        plan = pretrain.check_before_launch(cfg)
    except ConfigError as exc:
        return refuse("pretrain", exc)
    print(
        f"pretrain: run {plan.run_name}: {cfg.model.variant} at {cfg.data.image_size}px, {plan.total_steps} steps "
        f"of {plan.global_batch} images ({plan.world_size} workers x {plan.micro_batch} x {plan.grad_accum} accum), "
        f"ZeRO-{cfg.train.zero_stage}, {'bf16' if plan.bf16 else 'fp32'}; storage {plan.run_dir}",
        flush=True,
    )
    if stop.requested:
        return _preempted("it came during the pre-flight, nothing was started")
    # build -> run -> close: Ray is shut down on success and on failure. The local launcher needs no Ray at all.
    on_ray = cfg.scale.launcher == "ray"
    try:
        if on_ray:
            from pipeline.cluster import connect_ray

            connect_ray(args.address)
            stop.install()  # ray.init put its own SIGTERM handler in place
        result = pretrain.run(cfg, plan)
    except ConfigError as exc:  # what only the connected cluster can tell (e.g. a local run.root on several nodes)
        return refuse("pretrain", exc)
    except KeyboardInterrupt:  # pipeline.pretrain.preemption.Preempted, passed on by Ray as a plain one
        if not stop.requested:
            raise
        return _preempted(f"{stop.why}; the MLflow run was closed KILLED")
    except SystemExit as exc:  # ray.init's own SIGTERM handler (sys.exit(15)), in place while it connects
        if exc.code != signal.SIGTERM:
            raise
        return _preempted("it came while connecting to Ray, nothing was started")
    except pretrain.LossNotFiniteError as exc:
        print(f"pretrain: stopped: {exc}", file=sys.stderr)
        return 1
    except pretrain.PermanentDataError as exc:  # a shard no restart can read: a person must fix the data
        print(f"pretrain: stopped: {exc}", file=sys.stderr)
        return pretrain.EXIT_DATA_ERROR
    except Exception as exc:
        print(f"pretrain: training failed: {exc}", file=sys.stderr)
        return 1
    finally:
        if on_ray:
            import ray

            ray.shutdown()
    metrics = result.metrics
    if result.status == "already-complete":
        print(f"pretrain: run {plan.run_name} was already complete; export: {result.export_uri}")
    elif result.status == "preempted":
        return _preempted(f"checkpointed step {result.step} of {plan.total_steps} and stopped")
    elif result.status == "stopped":
        print(
            f"pretrain: stopped at step {result.step} of {plan.total_steps} (train.stop_at_step); run again "
            "without it to continue"
        )
    else:
        losses = ""
        if metrics.get("loss_start") is not None:
            losses = (
                f"; loss {metrics['loss_start']:.4f} -> {metrics['loss_end']:.4f} (means of the first/last 10 steps)"
            )
        print(
            f"pretrain: finished {result.step} steps{losses}; {metrics.get('images_per_s', 0):,.0f} img/s; "
            f"{metrics.get('wall_s', 0):.0f} s training; "
            f"{metrics.get('skipped_steps', 0)} optimizer steps skipped (non-finite gradients); "
            f"export: {result.export_uri}" + (f"; MLflow run {result.mlflow_run_id}" if result.mlflow_run_id else "")
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
