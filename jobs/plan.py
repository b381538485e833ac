"""Plan a pretraining run before launching it: memory per GPU by ZeRO stage, the recommended stage / micro-batch /
accumulation, communication per step, the loader's data rate, wall-clock and GPU-hours, and the ViT paper's cost.
With --transfer, plan fine-tuning memory instead: one GPU, the paper's batch 512, a table per benchmark resolution.

From a preset (pipeline/presets.py; `--set` overrides as in jobs/pretrain.py):

    python jobs/plan.py --config vit_h14_jft --nodes 32 --gpus-per-node 8 --gpu h100

Or explicitly, without a preset:

    python jobs/plan.py --variant H/14 --global-batch 4096 --epochs 14 --dataset-images 303000000 \\
        --num-classes 18291 --representation-size 1280 --nodes 32 --gpus-per-node 8 --gpu h100

Fine-tuning memory per micro-batch, activation checkpointing off and on, at the paper's resolutions for the model
(384 px; 512 for L/16, 518 for H/14):

    python jobs/plan.py --transfer --variant H/14 --gpu h100

Nothing is launched and no GPU is needed. Exit codes: 0 the configuration fits, 1 it does not (the reasons name
the fix), 2 bad arguments or configuration.
"""

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline import planner

# Dataset facts for presets whose size and classes the config leaves to the data (check_data reads them from the
# shards at launch; the planner runs before there is any data). ViT paper §4.1: JFT-300M has 18k classes and
# 303M high-resolution images; ImageNet-21k has 21k classes and 14M images (21,843 and 14,197,122 exactly).
# The tiny presets (and the paper presets' tiny siblings) train on the scikit-learn digits 0-4 for fixed steps.
DATASETS: dict[str, tuple[int | None, int]] = {  # preset name part -> (images, classes); first match wins
    "tiny": (None, 5),
    "jft": (303_000_000, 18_291),
    "i21k": (14_197_122, 21_843),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("run (a preset, or the explicit flags; flags override the preset)")
    src.add_argument("--config", help="preset name from pipeline/presets.py, e.g. vit_h14_jft")
    src.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a preset field, as in jobs/pretrain.py (repeatable)",
    )
    src.add_argument("--variant", help='ViT variant, e.g. "H/14"')
    src.add_argument("--img-size", type=int)
    src.add_argument("--num-classes", type=int)
    src.add_argument("--representation-size", type=int)
    src.add_argument("--global-batch", type=int)
    src.add_argument("--micro-batch", type=int, help="default: the preset's, else the planner's choice")
    src.add_argument("--zero-stage", type=int, choices=planner.ZERO_STAGES)
    src.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=None)
    src.add_argument("--steps", type=int, help="optimizer steps (or --epochs with --dataset-images)")
    src.add_argument("--epochs", type=float)
    src.add_argument("--dataset-images", type=int, help="training-set size, to turn epochs into steps")

    hw = p.add_argument_group("cluster and assumptions")
    hw.add_argument("--nodes", type=int, help="default: the preset's workers / gpus-per-node, else 1")
    hw.add_argument("--gpus-per-node", type=int, help="default: 8 on GPU")
    hw.add_argument(
        "--gpu",
        choices=[*planner.GPUS, "cpu"],
        default=None,
        help="GPU model (default h100); cpu checks host memory instead",
    )
    hw.add_argument("--mfu", type=float, default=0.45, help="assumed model FLOPs utilisation (default 0.45)")
    hw.add_argument(
        "--loader-rate-per-core",
        type=float,
        default=planner.LOADER_IMAGES_PER_SEC_PER_CORE,
        help=f"images/s one CPU core decodes and augments (default {planner.LOADER_IMAGES_PER_SEC_PER_CORE:g}, "
        "see planner.LOADER_IMAGES_PER_SEC_PER_CORE)",
    )
    hw.add_argument("--image-bytes", type=int, default=planner.DEFAULT_IMAGE_BYTES, help="mean JPEG size")
    hw.add_argument("--shard-bytes", type=int, default=planner.DEFAULT_SHARD_BYTES, help="WebDataset shard size")
    hw.add_argument(
        "--net-gbps", type=float, default=planner.DEFAULT_NET_GBITS_PER_GPU, help="network Gb/s per GPU (one NIC each)"
    )
    hw.add_argument("--eager-attention", action="store_true", help="plan for attention that stores the s×s scores")

    ft = p.add_argument_group("fine-tuning (--transfer; also --variant or --config, --gpu, --num-classes)")
    ft.add_argument("--transfer", action="store_true", help="plan fine-tuning memory on one GPU instead")
    ft.add_argument("--transfer-batch", type=int, default=planner.FINETUNE_BATCH, help="fine-tuning batch (512)")
    ft.add_argument(
        "--resolution",
        type=int,
        action="append",
        help="fine-tuning resolution (repeatable; default: the paper's for the model)",
    )
    return p.parse_args(argv)


def paper_resolutions(variant: str) -> list[int]:
    """The paper's fine-tuning resolutions for a model: Table 4's 384 px where the patch divides it, and the
    higher one its largest models were fine-tuned at (the transfer stage's table)."""
    import model
    from pipeline.transfer.tasks import HIGH_RES_FINETUNE

    shape = model.parse_variant(variant)
    table4 = [384] if 384 % shape.patch_size == 0 else []
    return sorted({*table4, *([HIGH_RES_FINETUNE[shape.name]] if shape.name in HIGH_RES_FINETUNE else [])})


def transfer_main(args: argparse.Namespace) -> int:
    """`--transfer`: fine-tuning memory tables; exit 1 when a resolution fits nowhere on the GPU."""
    variant = args.variant
    if variant is None and args.config:
        from pipeline.config import load_config

        variant = load_config(args.config, ["data.train=gs://plan-only/train-{000000..000001}.tar"]).model.variant
    if variant is None:
        raise planner.PlanError("--transfer needs --variant (e.g. H/14) or --config <preset>")
    if args.gpu == "cpu":
        raise planner.PlanError("--transfer plans GPU memory: use --gpu " + "|".join(planner.GPUS))
    plans, refusals = [], []
    for resolution in args.resolution or paper_resolutions(variant):
        try:
            plans.append(
                planner.plan_transfer_memory(
                    variant,
                    resolution,
                    args.transfer_batch,
                    args.gpu or "h100",
                    num_classes=args.num_classes or 1000,
                    grad_checkpointing=args.grad_checkpointing,
                )
            )
        except planner.DoesNotFitError as exc:
            refusals.append(str(exc))
    if plans:
        print(planner.format_transfer_memory(plans))
    for reason in refusals:
        print(f"REFUSED: {reason}")
    return 1 if refusals else 0


def _dataset_defaults(preset: str | None) -> tuple[int | None, int | None]:
    for key, (images, classes) in DATASETS.items():
        if preset and key in preset:
            return images, classes
    return None, None


def _steps(steps: int | None, epochs: float | None, images: int | None, global_batch: int) -> int:
    if steps is not None:
        return steps
    if epochs is None or images is None:
        raise planner.PlanError("give --steps, or --epochs with --dataset-images (the size of the training set)")
    return max(1, math.ceil(epochs * images / global_batch))  # as pipeline.config.make_layout does


def build_request(args: argparse.Namespace) -> tuple[planner.PlanRequest, list[str]]:
    notes: list[str] = []
    assumptions = {
        "mfu": args.mfu,
        "loader_rate_per_core": args.loader_rate_per_core,
        "image_bytes": args.image_bytes,
        "shard_bytes": args.shard_bytes,
        "net_gbits_per_gpu": args.net_gbps,
        "flash_attention": not args.eager_attention,
    }
    explicit = {
        "variant": args.variant,
        "img_size": args.img_size,
        "representation_size": args.representation_size,
        "global_batch": args.global_batch,
        "micro_batch": args.micro_batch,
        "zero_stage": args.zero_stage,
        "grad_checkpointing": args.grad_checkpointing,
    }
    explicit = {k: v for k, v in explicit.items() if v is not None}
    default_images, default_classes = _dataset_defaults(args.config)
    images = args.dataset_images or default_images
    if args.config:
        from pipeline.config import load_config  # only preset runs need pydantic and the config schema

        overrides = list(args.overrides)
        if not any(o.startswith("data.train=") for o in overrides):
            # Paper presets name no shards (the run must be told); planning reads none, so any valid URL will do.
            overrides.append("data.train=gs://plan-only/train-{000000..000001}.tar")
        cfg = load_config(args.config, overrides)
        global_batch = args.global_batch or cfg.train.global_batch
        steps = _steps(args.steps or cfg.train.steps, args.epochs or cfg.train.epochs, images, global_batch)
        num_classes = args.num_classes or cfg.model.num_classes or default_classes
        if num_classes is None:
            raise planner.PlanError(f"preset {args.config} leaves the classes to the data: pass --num-classes")
        req = planner.request_from_config(
            cfg,
            steps=steps,
            num_classes=num_classes,
            nodes=args.nodes,
            gpus_per_node=args.gpus_per_node,
            gpu=args.gpu or "h100",
            **assumptions,
            **explicit,
        )
        if req.num_gpus != cfg.scale.workers:
            notes.append(f"the preset has {cfg.scale.workers} workers; planned for {req.num_gpus} GPUs")
        if args.micro_batch is None and req.micro_batch is None:
            notes.append(
                f"the preset's micro_batch={cfg.train.micro_batch} does not divide the per-GPU batch at "
                f"{req.num_gpus} GPUs: the planner chooses it"
            )
        if cfg.train.steps is None and args.steps is None:
            notes.append(f"{steps:,} steps = {cfg.train.epochs:g} epochs × {images:,} images / {global_batch}")
        return req, notes

    if "variant" not in explicit or "global_batch" not in explicit:
        raise planner.PlanError("give --config <preset>, or at least --variant and --global-batch (and --steps)")
    gpu = args.gpu or "h100"
    req = planner.PlanRequest(
        steps=_steps(args.steps, args.epochs, images, explicit["global_batch"]),
        num_classes=args.num_classes or 1000,
        nodes=args.nodes or 1,
        gpus_per_node=args.gpus_per_node or (8 if gpu != "cpu" else 1),
        gpu=gpu,
        precision="fp32" if gpu == "cpu" else "bf16",
        **assumptions,
        **explicit,
    )
    return req, notes


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.transfer:
        try:
            return transfer_main(args)
        except ValueError as exc:  # PlanError, bad variant names or resolutions
            print(f"plan: {exc}", file=sys.stderr)
            return 2
    try:
        req, notes = build_request(args)
        result = planner.plan(req)
    except ValueError as exc:  # PlanError, pipeline.config.ConfigError, bad variant names
        print(f"plan: {exc}", file=sys.stderr)
        return 2
    if args.config:
        print(f"preset {args.config}" + "".join(f"; {n}" for n in notes))
    print(planner.format_plan(result))
    return 0 if result.preflight.fits else 1


if __name__ == "__main__":
    sys.exit(main())
