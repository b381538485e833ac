"""The GPU path checked in one command on one H100/H200, through the pretraining Trainer itself (local launcher).

    make gpu-wheels                 # here: wheels for Python 3.12 x86-64 + JPEG shards, into .gpu/ (git-ignored)
    python bench/gpu_check.py       # on the GPU machine (carry .gpu): installs from .gpu/wheels, then measures

On a machine with CUDA PyTorch, timm, numpy, safetensors and scipy, it first installs what else the pretraining
path imports from ``.gpu/wheels`` (no Ray, no MLflow: the local launcher with tracking off needs neither), then:

1. bf16 ZeRO-1 training steps of B/16, L/16 and H/14 at 224 px on synthetic data, through ``Trainer.setup`` and
   ``Trainer.train_step`` (bench/gpu_step.py's search and timing around them): step time, images/s, MFU, peak
   memory next to the planner's, the largest micro-batch with and without activation checkpointing;
2. ``--loader-steps`` (100) steps of B/16 from the real JPEG shards in ``.gpu/data`` through ``Trainer.resume``'s
   WebDataset loader with one DataLoader worker per spare CPU core: images/s and the data-wait fraction;
3. one fine-tuning step at the paper's transfer settings (B/16, 384 px, batch 512) through
   ``pipeline.transfer.finetune.run_finetune``, with the micro-batch ``planner.plan_transfer_memory`` chooses:
   peak memory against the planner's.

Results: ``<out>/<UTC date>-gpu-check-<device>.json`` and ``.md`` (default out: bench/results). ``--dry-run`` runs the
same code on CPU in fp32 with ViT-Mi/4 at 32 px and a few JPEGs made on the spot, and writes to ``--out`` only.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import gpu_step  # noqa: E402 (after the path set-up)

GPU_DIR = REPO / ".gpu"
WHEELS_DIR = GPU_DIR / "wheels"
DATA_DIR = GPU_DIR / "data"
# The import names of the modules the pretraining path needs beyond the GPU machine's own.
NEEDED_MODULES = ("deepspeed", "pydantic", "webdataset", "braceexpand", "fsspec", "simplejpeg", "yaml", "hjson")
# The embedded photos the JPEG shards are cut from (one class each).
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry")
JPEG_SIZE = (400, 350)


def ensure_packages() -> None:
    """Install the missing Python packages from .gpu/wheels (no index, no dependency resolution: the folder holds
    exactly the closure ``make gpu-wheels`` downloads)."""
    missing = [name for name in NEEDED_MODULES if importlib.util.find_spec(name) is None]
    if not missing:
        return
    wheels = sorted(str(p) for p in WHEELS_DIR.glob("*.whl"))
    if not wheels:
        sys.exit(f"missing {', '.join(missing)} and no wheels in {WHEELS_DIR}: run `make gpu-wheels` first")
    print(f"installing {len(wheels)} wheels from {WHEELS_DIR} (missing: {', '.join(missing)})", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", *wheels], check=True)
    importlib.invalidate_caches()


# ---------------------------------------------------------------------------------------------------------------------
# JPEG shards


def make_jpeg_shards(out: Path, per_class: int, samples_per_shard: int) -> str:
    """~400x350 q90 JPEG crops of scikit-image's photos (upscaled where the photo is smaller), one class per photo,
    turned into train/minival/test shards by jobs/prepare_data.py. Returns the train manifest URL."""
    import numpy as np
    import skimage.data
    from PIL import Image

    from jobs.prepare_data import main as prepare_data

    rng = np.random.default_rng(0)
    folder = out / "jpeg"
    width, height = JPEG_SIZE
    for name in PHOTOS:
        photo = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            # A random box of the JPEG's aspect ratio covering 40-100 % of the photo's shorter side.
            scale = rng.uniform(0.4, 1.0)
            box_h = int(min(photo.height, photo.width * height / width) * scale)
            box_w = int(box_h * width / height)
            x, y = rng.integers(0, photo.width - box_w + 1), rng.integers(0, photo.height - box_h + 1)
            crop = photo.resize((width, height), Image.Resampling.BICUBIC, box=(x, y, x + box_w, y + box_h))
            crop.save(folder / name / f"{i:04d}.jpg", quality=90)
    shards = out / "shards"
    args = ["--source", "imagefolder", "--input", str(folder), "--out", shards.as_uri(), "--split", "all"]
    if prepare_data([*args, "--samples-per-shard", str(samples_per_shard)]) != 0:
        raise RuntimeError("jobs/prepare_data.py failed")
    shutil.rmtree(folder)  # only the shards travel to the GPU machine (64 MiB with the wheels)
    return (shards / "train.manifest.json").as_uri()


# ---------------------------------------------------------------------------------------------------------------------
# The pretraining Trainer, configured for one local rank


@dataclass(frozen=True)
class Bench:
    on_gpu: bool
    img_size: int
    run_root: str
    context: Any  # pipeline.pretrain.launch.LocalWorkerContext


def pretrain_setup(
    bench: Bench, variant: str, *, micro_batch: int, steps: int, data: str | None, workers: int = 0, name: str
) -> tuple[Any, Any]:
    """The config and run layout of a one-rank bf16 (fp32 on CPU) ZeRO-1 run of ``variant``: from ``data`` (checked
    as before a launch), or, without data, for 1000 synthetic classes."""
    from pipeline.config import load_config, make_layout
    from pipeline.data import DataInfo
    from pipeline.pretrain import check_before_launch

    overrides = [
        f"data.train={data or 'file:///synthetic/train-{000000..000000}.tar'}",
        f"data.image_size={bench.img_size}",
        f"data.workers={workers}",
        f"model.variant={variant}",
        f"train.global_batch={micro_batch}",
        f"train.micro_batch={micro_batch}",
        f"train.steps={steps + 1}",
        "train.epochs=null",
        "optim.warmup_steps=1",
        "train.zero_stage=1",
        f"train.precision={'bf16' if bench.on_gpu else 'fp32'}",
        "scale.launcher=local",
        "scale.workers=1",
        f"scale.gpus_per_worker={int(bench.on_gpu)}",
        "scale.gpu=null",  # the bench measures what fits; the planner's figures are reported beside it
        f"run.root={bench.run_root}",
        f"run.name={name}",
        "tracking.enabled=false",
    ]
    if data is None:
        cfg = load_config("vit_b16_i21k", [*overrides, f"model.num_classes={gpu_step.NUM_CLASSES}"])
        synthetic = DataInfo(num_shards=1, num_samples=None, num_classes=gpu_step.NUM_CLASSES, class_names=None)
        return cfg, make_layout(cfg, synthetic)
    cfg = load_config("vit_b16_i21k", overrides)
    return cfg, check_before_launch(cfg)


def synthetic_batches(micro_batch: int, img_size: int) -> Any:
    from pipeline.data import Batch

    images = torch.randint(0, 256, (micro_batch, 3, img_size, img_size), dtype=torch.uint8)
    labels = torch.randint(0, gpu_step.NUM_CLASSES, (micro_batch,))
    if torch.cuda.is_available():
        images = images.pin_memory()
    batch = Batch(images, labels, keys=[""] * micro_batch, epochs=[0] * micro_batch, stream=0, position=(0, 0, 0))
    while True:
        yield batch


class TrainerSteps(gpu_step.Trainer):
    """bench/gpu_step.py's engine interface over the pretraining Trainer: ``Trainer.setup`` builds model and engine,
    ``Trainer.train_step`` trains on synthetic uint8 batches of any size."""

    def __init__(self, variant: str, setup: gpu_step.Setup, bench: Bench) -> None:
        self.bench, self.worker = bench, None
        super().__init__(variant, setup)

    def _build(self) -> None:
        from pipeline.pretrain.health import SkippedSteps
        from pipeline.pretrain.trainer import Trainer, Window

        name = "synthetic-" + self.variant.replace("/", "")
        cfg, plan = pretrain_setup(self.bench, self.variant, micro_batch=1, steps=1000, data=None, name=name)
        self.worker = Trainer(cfg, plan, None, self.bench.context)
        self.worker.setup()
        # What Trainer.resume sets besides the data loader, which synthetic batches replace.
        self.worker.window = Window()
        self.worker.skipped = SkippedSteps(self.worker.engine, cfg.train.max_skipped_steps)
        self.worker.engine.train()
        self.engine = self.worker.engine

    def step(self, micro_batch: int, *, checkpointing: bool) -> None:
        self.engine.module.set_grad_checkpointing(checkpointing)
        self.worker.batches = synthetic_batches(micro_batch, self.setup.img_size)
        self.worker.train_step()

    def release(self) -> None:
        self.worker = None
        super().release()


# ---------------------------------------------------------------------------------------------------------------------
# The three checks


def loader_check(bench: Bench, variant: str, data: str, *, micro_batch: int, steps: int, workers: int) -> dict:
    """``steps`` Trainer steps from the JPEG shards (after 3 untimed ones): images/s and the data-wait fraction."""
    from pipeline.pretrain.trainer import Trainer, Window

    cfg, plan = pretrain_setup(
        bench, variant, micro_batch=micro_batch, steps=steps + 3, data=data, workers=workers, name="loader"
    )
    worker = Trainer(cfg, plan, None, bench.context)
    worker.setup()
    worker.resume()
    worker.window = Window()
    worker.engine.train()
    for _ in range(3):
        worker.train_step()
    worker.window = Window()
    start = time.perf_counter()
    for _ in range(steps):
        worker.train_step()
    if bench.on_gpu:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    result = {
        "variant": variant,
        "img_size": bench.img_size,
        "micro_batch": micro_batch,
        "steps": steps,
        "loader_workers": workers,
        "images_per_s": steps * micro_batch / elapsed,
        "data_wait_fraction": worker.window.data_wait_s / elapsed,
    }
    worker.engine.destroy()
    return result


def finetune_check(bench: Bench, variant: str, data: str, *, resolution: int, batch: int, device: str) -> dict:
    """One fine-tuning step (``run_finetune``, from scratch) at the micro-batch the planner picks for ``device``."""
    from pipeline import planner
    from pipeline.planner.finetune import plan_transfer_memory
    from pipeline.transfer import tasks
    from pipeline.transfer.finetune import RunSpec, run_finetune
    from pipeline.transfer.source import PretrainedSource

    plan = plan_transfer_memory(variant, resolution, batch, device, num_classes=len(PHOTOS))
    recipe = tasks.Recipe(
        resolution=resolution,
        steps=1,
        warmup_steps=0,
        batch_size=batch,
        lrs=(0.01,),
        refit=False,
        micro_batch_size=plan.micro_batch,
        num_gpus=float(bench.on_gpu),
    )
    shape = {"variant": variant, "img_size": 224, "pool": "token", "representation_size": None}
    spec = RunSpec(
        kind="finetune",
        benchmark="gpu-check",
        num_classes=len(PHOTOS),
        recipe=recipe,
        init="scratch",
        source=PretrainedSource("export", "scratch", shape, "scratch"),
        urls={split: data.replace("train.manifest", f"{split}.manifest") for split in ("train", "minival", "test")},
        lr=0.01,
        num_gpus=float(bench.on_gpu),
        loader_workers=min(8, os.cpu_count() or 1) if bench.on_gpu else 0,
    )
    if bench.on_gpu:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    run_finetune(spec)
    peak = torch.cuda.max_memory_allocated() / planner.GIB if bench.on_gpu else None
    return {
        "variant": variant,
        "resolution": resolution,
        "batch": batch,
        "planned_for": plan.device.key,
        "micro_batch": plan.micro_batch,
        "grad_accumulation": plan.grad_accumulation,
        "grad_checkpointing": plan.grad_checkpointing,
        "peak_memory_gib": peak,
        "planner_memory_gib": plan.memory.total / planner.GIB,
        "seconds": time.perf_counter() - start,
    }


# ---------------------------------------------------------------------------------------------------------------------
# Output


def to_markdown(report: gpu_step.Report, loader: dict, finetune: dict) -> str:
    fmt = gpu_step._fmt
    lines = [
        gpu_step.to_markdown(report).replace("# Training step on one", "# GPU check on one", 1).rstrip("\n"),
        "",
        "## Training from JPEG shards (WebDataset loader, pretraining Trainer)",
        "",
        "| variant | px | micro-batch | steps | loader workers | images/s | data wait |",
        "|---|---|---|---|---|---|---|",
        f"| {loader['variant']} | {loader['img_size']} | {loader['micro_batch']} | {loader['steps']} | "
        f"{loader['loader_workers']} | {loader['images_per_s']:.1f} | {loader['data_wait_fraction']:.1%} |",
        "",
        "## One fine-tuning step at the paper's transfer settings (run_finetune)",
        "",
        "| variant | px | batch | micro-batch x accumulation | checkpointing | peak mem GiB | planner GiB | s |",
        "|---|---|---|---|---|---|---|---|",
        f"| {finetune['variant']} | {finetune['resolution']} | {finetune['batch']} | {finetune['micro_batch']} x "
        f"{finetune['grad_accumulation']} | {finetune['grad_checkpointing']} | "
        f"{fmt(finetune['peak_memory_gib'], '.1f')} | {fmt(finetune['planner_memory_gib'], '.1f')} | "
        f"{finetune['seconds']:.1f} |",
        "",
        f"The fine-tuning plan is pipeline.planner.plan_transfer_memory for {finetune['planned_for']}; peak memory "
        "includes the evaluation at the end of the run.",
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default="B/16,L/16,H/14")
    p.add_argument("--steps", type=int, default=10, help="timed synthetic steps per variant")
    p.add_argument("--max-micro-batch", type=int, default=1024, help="upper end of the micro-batch search")
    p.add_argument("--loader-steps", type=int, default=100)
    p.add_argument("--loader-micro-batch", type=int, default=256)
    p.add_argument("--out", type=Path, help="results folder (default bench/results; the dry run writes only here)")
    p.add_argument("--dry-run", action="store_true", help="the same code on CPU, fp32, ViT-Mi/4 at 32 px")
    p.add_argument("--prepare-data", action="store_true", help=f"only make the JPEG shards in {DATA_DIR} and exit")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.prepare_data:
        print(make_jpeg_shards(DATA_DIR, per_class=60, samples_per_shard=12))
        return 0
    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device: nothing to measure (run it on a GPU machine; --dry-run exercises the code on CPU)")
        return 0
    ensure_packages()
    started = time.perf_counter()
    from pipeline.pretrain.launch import local_worker

    tmp = Path(tempfile.mkdtemp(prefix="vitpipe-gpu-check-"))
    if args.dry_run:
        setup = gpu_step.Setup(torch.device("cpu"), "fp32", img_size=32, max_micro_batch=4, zero_stage=1)
        variants, steps, gpu, device_name = ["Mi/4"], 1, None, f"CPU ({platform.machine()})"
        loader_variant, loader_micro, loader_steps, loader_workers = "Mi/4", 8, 3, 1
        finetune_args = {"variant": "Mi/4", "resolution": 32, "batch": 8, "device": "h100"}
        data = make_jpeg_shards(tmp / "data", per_class=15, samples_per_shard=5)
    else:
        setup = gpu_step.Setup(torch.device("cuda", 0), "bf16", 224, args.max_micro_batch, zero_stage=1)
        variants, steps = [v.strip() for v in args.variants.split(",") if v.strip()], args.steps
        device_name = torch.cuda.get_device_name(0)
        from pipeline import planner

        gpu = planner.detect_gpu(device_name)
        loader_variant, loader_micro, loader_steps = "B/16", args.loader_micro_batch, args.loader_steps
        loader_workers = max(1, (os.cpu_count() or 2) - 2)
        finetune_args = {"variant": "B/16", "resolution": 384, "batch": 512, "device": device_name}
        data = (DATA_DIR / "shards" / "train.manifest.json").as_uri()
        if not (DATA_DIR / "shards" / "train.manifest.json").exists():
            sys.exit(f"no JPEG shards in {DATA_DIR}: run `make gpu-wheels` (it makes them too) and carry .gpu")
    report = gpu_step.new_report(device_name, gpu, "bench/gpu_check.py", argv)
    with local_worker(setup.device.type == "cuda") as context:
        bench = Bench(setup.device.type == "cuda", setup.img_size, (tmp / "runs").as_uri(), context)
        for variant in variants:
            print(f"{variant}: largest micro-batch, then {steps} timed steps (pretraining Trainer)", flush=True)
            report.results.append(
                gpu_step.measure(
                    variant,
                    setup,
                    steps=steps,
                    micro_batch=None,
                    peak_flops=gpu.peak_bf16_flops if gpu else None,
                    make_trainer=lambda v, s: TrainerSteps(v, s, bench),
                )
            )
        print(f"{loader_variant}: {loader_steps} steps from JPEG shards, {loader_workers} loader workers", flush=True)
        loader = loader_check(
            bench, loader_variant, data, micro_batch=loader_micro, steps=loader_steps, workers=loader_workers
        )
        print(f"{finetune_args['variant']}: one fine-tuning step at {finetune_args['resolution']} px", flush=True)
        finetune = finetune_check(bench, data=data, **finetune_args)
    text = to_markdown(report, loader, finetune)
    print(text)
    print(f"gpu_check: {time.perf_counter() - started:.0f} s")
    out = args.out or (None if args.dry_run else gpu_step.RESULTS_DIR)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        slug = "cpu-dry-run" if args.dry_run else gpu_step.device_slug(device_name)
        stem = out / f"{report.date}-gpu-check-{slug}"
        stem.with_suffix(".md").write_text(text)
        payload = {**asdict(report), "loader": loader, "finetune": finetune}
        stem.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {stem}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
