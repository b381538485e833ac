"""Training-step throughput, MFU and memory of ViT-B/16, L/16, H/14 on one GPU (bf16, DeepSpeed ZeRO).

For each variant, on a single GPU with synthetic data already on the device (this measures the model step, not the
loader):

1. the largest micro-batch that trains without activation checkpointing, and with it: doubling from 8, then a
   binary search; a probe is one forward + backward + optimizer step, and an out-of-memory error rebuilds the
   engine (DeepSpeed's ZeRO hooks are not safe to reuse after a backward died half-way);
2. images/s over `--steps` timed steps (after 3 warm-up steps) at `--micro-batch`, default the largest power of
   two that fits without checkpointing;
3. MFU = images/s × model.train_flops_per_image / the device's dense bf16 peak (pipeline.planner.detect_gpu, by
   torch.cuda.get_device_name()); peak memory = torch.cuda.max_memory_allocated over the timed steps, next to the
   planner's estimate (model states + activations) for the same setting.

    python bench/gpu_step.py [--variants B/16,L/16,H/14] [--steps 20] [--zero-stage 1] [--micro-batch N]

Results go to bench/results/<UTC date>-<device>.md and .json (see bench/results/README.md).

Without a CUDA device it prints "no CUDA device: nothing to measure" and exits 0 (a benchmark with nothing to
measure has not failed; the CPU code path is checked by `--dry-run`). `--dry-run` runs the same code on CPU in fp32
with a tiny ViT (Mi/4 at 32 px), micro-batches up to 4 and 1 timed step, and writes results only with `--out`.
"""

import argparse
import gc
import json
import os
import platform
import re
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import model
from pipeline import planner

RESULTS_DIR = Path(__file__).resolve().parent / "results"
NUM_CLASSES = 1000
WARMUP_STEPS = 3
FIRST_PROBE = 8


@dataclass(frozen=True)
class Setup:
    device: torch.device
    precision: str  # "bf16" on GPU, "fp32" for the CPU dry run
    img_size: int
    max_micro_batch: int
    zero_stage: int


@dataclass
class VariantResult:
    variant: str
    img_size: int
    zero_stage: int
    precision: str
    params: int
    train_flops_per_image: int
    max_micro_batch: int  # without activation checkpointing; 0 = not even 1 fits
    max_micro_batch_checkpointed: int
    micro_batch: int  # the one timed
    steps: int
    step_seconds: float | None = None
    images_per_s: float | None = None
    mfu: float | None = None
    peak_memory_gib: float | None = None
    planner_memory_gib: float | None = None
    search_cap: int = 0  # --max-micro-batch: a maximum equal to it means the real limit may be higher


@dataclass
class Report:
    date: str
    device: str
    peak_bf16_tflops: float | None
    torch: str
    deepspeed: str
    host: str
    command: str
    results: list[VariantResult] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------------------
# Search


def largest_fitting(fits: Callable[[int], bool], *, cap: int, start: int = FIRST_PROBE) -> int:
    """Largest b in 1..cap with fits(b), for fits that is True up to some size and False above; 0 if none.

    Doubles from `start` until a failure (or cap), then bisects between the last fit and the first failure.
    """
    lo, hi = 0, None  # largest size known to fit, smallest known to fail
    b = min(start, cap)
    while hi is None:
        if fits(b):
            lo = b
            if b == cap:
                return cap
            b = min(2 * b, cap)
        else:
            hi = b
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


# ---------------------------------------------------------------------------------------------------------------------
# One engine


class Trainer:
    """A DeepSpeed engine around one ViT, rebuilt after an out-of-memory error."""

    def __init__(self, variant: str, setup: Setup) -> None:
        self.variant, self.setup = variant, setup
        self.engine: Any = None
        self._build()

    def _config(self) -> dict[str, Any]:
        fused = {"fused": True} if self.setup.device.type == "cuda" else {}
        return {
            "train_micro_batch_size_per_gpu": 1,  # the batch each call gets is what counts; DeepSpeed does not check
            "gradient_accumulation_steps": 1,
            # the optimizer pipeline/engine.py trains with: torch's AdamW (fused kernel on GPU), no DeepSpeed
            # extension to JIT-compile
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.1, "torch_adam": True, **fused}},
            "bf16": {"enabled": self.setup.precision == "bf16"},
            "gradient_clipping": 1.0,
            "zero_optimization": {"stage": self.setup.zero_stage},
            "steps_per_print": 1_000_000,
            "wall_clock_breakdown": False,
        }

    def _build(self) -> None:
        import deepspeed

        net = model.create_vit(
            self.variant, num_classes=NUM_CLASSES, img_size=self.setup.img_size, device=self.setup.device
        )
        self.engine, *_ = deepspeed.initialize(model=net, model_parameters=net.parameters(), config=self._config())

    def release(self) -> None:
        if self.engine is not None and hasattr(self.engine, "destroy"):
            self.engine.destroy()
        self.engine = None
        gc.collect()
        if self.setup.device.type == "cuda":
            torch.cuda.empty_cache()

    def step(self, micro_batch: int, *, checkpointing: bool) -> None:
        dtype = torch.bfloat16 if self.setup.precision == "bf16" else torch.float32
        size, device = self.setup.img_size, self.setup.device
        x = torch.randn(micro_batch, 3, size, size, device=device, dtype=dtype)
        y = torch.randint(0, NUM_CLASSES, (micro_batch,), device=device)
        self.engine.module.set_grad_checkpointing(checkpointing)
        loss = torch.nn.functional.cross_entropy(self.engine(x).float(), y)
        self.engine.backward(loss)
        self.engine.step()

    def fits(self, micro_batch: int, *, checkpointing: bool) -> bool:
        """One full training step at this micro-batch; False (and a fresh engine) if it ran out of memory."""
        failed = False
        try:
            self.step(micro_batch, checkpointing=checkpointing)
            self._sync()
        except (torch.OutOfMemoryError, RuntimeError) as exc:
            if not _is_oom(exc):
                raise
            failed = True  # rebuild outside the except block: the traceback pins the step's tensors
        if failed:
            self.release()
            self._build()
        print(f"  {self.variant} micro-batch {micro_batch:>4} ckpt={checkpointing!s:<5} {'OOM' if failed else 'ok'}")
        return not failed

    def _sync(self) -> None:
        if self.setup.device.type == "cuda":
            torch.cuda.synchronize()

    def time_steps(self, micro_batch: int, steps: int) -> tuple[float, float | None]:
        """Seconds per step over `steps` steps after warm-up, and peak GiB allocated during them (GPU only)."""
        for _ in range(WARMUP_STEPS):
            self.step(micro_batch, checkpointing=False)
        self._sync()
        if self.setup.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(steps):
            self.step(micro_batch, checkpointing=False)
        self._sync()
        seconds = (time.perf_counter() - start) / steps
        peak = torch.cuda.max_memory_allocated() / planner.GIB if self.setup.device.type == "cuda" else None
        return seconds, peak


def measure(
    variant: str,
    setup: Setup,
    *,
    steps: int,
    micro_batch: int | None,
    peak_flops: float | None,
    make_trainer: Callable[[str, Setup], Trainer] | None = None,
) -> VariantResult:
    """``make_trainer``: another engine with this Trainer's interface (bench/gpu_check.py passes the pretraining
    Trainer's own); default: this file's bare DeepSpeed engine."""
    flops = model.train_flops_per_image(variant, setup.img_size, num_classes=NUM_CLASSES)
    trainer = (make_trainer or Trainer)(variant, setup)
    try:
        cap = setup.max_micro_batch
        plain = largest_fitting(lambda b: trainer.fits(b, checkpointing=False), cap=cap)
        ckpt = largest_fitting(lambda b: trainer.fits(b, checkpointing=True), cap=cap, start=max(plain, 1))
        result = VariantResult(
            variant=model.parse_variant(variant).name,
            img_size=setup.img_size,
            zero_stage=setup.zero_stage,
            precision=setup.precision,
            params=sum(p.numel() for p in trainer.engine.module.parameters()),
            train_flops_per_image=flops,
            max_micro_batch=plain,
            max_micro_batch_checkpointed=ckpt,
            micro_batch=micro_batch or (1 << (plain.bit_length() - 1) if plain else 0),
            steps=steps,
            search_cap=cap,
        )
        if result.micro_batch == 0:
            return result  # not even one image fits: nothing to time
        try:
            seconds, peak = trainer.time_steps(result.micro_batch, steps)
        except (torch.OutOfMemoryError, RuntimeError) as exc:
            if not _is_oom(exc):
                raise
            print(f"  {variant}: micro-batch {result.micro_batch} ran out of memory while timing: not timed")
            return result
    finally:
        trainer.release()
    facts = planner.ModelFacts.build(variant, img_size=setup.img_size, num_classes=NUM_CLASSES)
    predicted = planner.estimate_memory(
        facts,
        zero_stage=setup.zero_stage,
        micro_batch=result.micro_batch,
        num_gpus=1,
        grad_checkpointing=False,
        precision="bf16" if setup.precision == "bf16" else "fp32",
        flash_attention=True,  # model uses F.scaled_dot_product_attention: fused kernels on GPU and CPU
    )
    result.step_seconds = seconds
    result.images_per_s = result.micro_batch / seconds
    result.mfu = result.images_per_s * flops / peak_flops if peak_flops else None
    result.peak_memory_gib = peak
    result.planner_memory_gib = predicted.total / planner.GIB
    return result


# ---------------------------------------------------------------------------------------------------------------------
# Output


def device_slug(name: str) -> str:
    """ "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def to_markdown(report: Report) -> str:
    peak = f"{report.peak_bf16_tflops:g} TFLOP/s dense bf16 peak" if report.peak_bf16_tflops else "peak unknown"
    lines = [
        f"# Training step on one {report.device} — {report.date}",
        "",
        f"{peak}; torch {report.torch}, deepspeed {report.deepspeed}; host {report.host}",
        f"command: `{report.command}`",
        "",
        "| variant | px | ZeRO | precision | micro-batch | step ms | images/s | MFU | peak mem GiB | planner GiB "
        "| max micro-batch | max with checkpointing |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report.results:
        plain = f"{r.max_micro_batch}{'+' if r.max_micro_batch == r.search_cap else ''}"
        ckpt = f"{r.max_micro_batch_checkpointed}{'+' if r.max_micro_batch_checkpointed == r.search_cap else ''}"
        lines.append(
            f"| {r.variant} | {r.img_size} | {r.zero_stage} | {r.precision} | {r.micro_batch} | "
            f"{_fmt(r.step_seconds and r.step_seconds * 1e3, '.1f')} | {_fmt(r.images_per_s, '.1f')} | "
            f"{_fmt(r.mfu, '.3f')} | {_fmt(r.peak_memory_gib, '.1f')} | {_fmt(r.planner_memory_gib, '.1f')} | "
            f"{plain} | {ckpt} |"
        )
    lines += [
        "",
        "MFU = images/s × model.train_flops_per_image (3 × forward) / peak. Peak memory: "
        "torch.cuda.max_memory_allocated over the timed steps; planner: pipeline.planner.estimate_memory "
        "(model states + activations, no reserve). `+`: the search stopped at --max-micro-batch.",
    ]
    return "\n".join(lines) + "\n"


def write(report: Report, out_dir: Path, slug: str) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"{report.date}-{slug}"
    md, js = stem.with_suffix(".md"), stem.with_suffix(".json")
    md.write_text(to_markdown(report))
    js.write_text(json.dumps(asdict(report), indent=2) + "\n")
    return md, js


# ---------------------------------------------------------------------------------------------------------------------
# Main


def new_report(device_name: str, gpu: Any, script: str, argv: list[str] | None) -> Report:
    """An empty report for this machine and command (``gpu``: the planner's GpuSpec, None if unknown)."""
    import deepspeed

    return Report(
        date=datetime.now(UTC).strftime("%Y-%m-%d"),
        device=device_name,
        peak_bf16_tflops=gpu.peak_bf16_flops / 1e12 if gpu else None,
        torch=torch.__version__,
        deepspeed=deepspeed.__version__,
        host=platform.node(),
        command=f"python {script} " + " ".join(sys.argv[1:] if argv is None else argv),
    )


def init_single_rank(backend: str) -> None:
    """A one-rank process group on loopback, which DeepSpeed needs even on one device."""
    import deepspeed

    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    os.environ.update(MASTER_ADDR="127.0.0.1", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    deepspeed.init_distributed(dist_backend=backend, verbose=False)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default="B/16,L/16,H/14")
    p.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    p.add_argument("--zero-stage", type=int, default=1, choices=planner.ZERO_STAGES)
    p.add_argument("--micro-batch", type=int, help="micro-batch to time (default: largest power of two that fits)")
    p.add_argument("--max-micro-batch", type=int, default=2048, help="upper end of the micro-batch search")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--out", type=Path, help=f"results folder (default {RESULTS_DIR}; the dry run writes only here)")
    p.add_argument("--dry-run", action="store_true", help="one tiny CPU fp32 step through the same code, no GPU")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device: nothing to measure (run it on a GPU machine; --dry-run exercises the code on CPU)")
        return 0
    if args.dry_run:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        variants, steps = ["Mi/4"], 1
        setup = Setup(torch.device("cpu"), "fp32", img_size=32, max_micro_batch=4, zero_stage=args.zero_stage)
        device_name, gpu, backend = f"CPU ({platform.processor() or platform.machine()})", None, "gloo"
    else:
        variants, steps = [v.strip() for v in args.variants.split(",") if v.strip()], args.steps
        torch.cuda.set_device(0)
        setup = Setup(torch.device("cuda", 0), "bf16", args.img_size, args.max_micro_batch, args.zero_stage)
        device_name = torch.cuda.get_device_name(0)
        gpu, backend = planner.detect_gpu(device_name), "nccl"
        if gpu is None:
            print(f"unknown GPU {device_name!r}: no peak FLOP/s to compute MFU with (add it to pipeline.planner)")
    init_single_rank(backend)
    report = new_report(device_name, gpu, "bench/gpu_step.py", argv)
    for variant in variants:
        print(f"{variant}: searching the largest micro-batch, then timing {steps} steps", flush=True)
        report.results.append(
            measure(
                variant,
                setup,
                steps=steps,
                micro_batch=args.micro_batch,
                peak_flops=gpu.peak_bf16_flops if gpu else None,
            )
        )
    print(to_markdown(report))
    out = args.out or (None if args.dry_run else RESULTS_DIR)
    if out is not None:
        slug = "cpu-dry-run" if args.dry_run else device_slug(device_name)
        for path in write(report, out, slug):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
