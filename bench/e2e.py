"""End to end: how much of the machine the `tiny` pretraining run turns into training steps.

Runs the real job (`jobs/pretrain.py --config tiny`: Ray Train, 2 workers, DeepSpeed ZeRO-2, WebDataset shards,
MLflow) for --steps steps in a scratch VITPIPE_HOME, reads its throughput and data-wait fraction back from
MLflow, and compares the throughput with the bare model step of the same shape (same micro-batch, AdamW, one
thread, in this process, no Ray / DeepSpeed / data) times the number of workers, i.e. assuming the workers'
steps would scale perfectly over the cores: the ratio is what the pipeline keeps (a lower bound of it).

    python bench/e2e.py [--steps 150] [--keep DIR]

The first logging window (Ray and DeepSpeed start-up effects, allocator warm-up) is left out of both figures.
Last line: `tiny run: X img/s, data wait Y %  pipeline/model-only: Z.ZZ` (1.00 would be no overhead at all).
"""

import argparse
import os
import re
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import create_vit, parse_variant
from pipeline.config import presets

ROOT = Path(__file__).resolve().parents[1]


def run_job(home: Path, steps: int) -> tuple[str, float]:
    """Prepare the demo data and run the tiny pretraining in ``home``; return its MLflow run id and wall time."""
    os.environ["VITPIPE_HOME"] = str(home)  # the demo data command names its output under the home
    env = dict(os.environ)
    prepare = presets.demo_data_command().split()[1:]
    subprocess.run([sys.executable, *prepare], cwd=ROOT, env=env, check=True, capture_output=True)
    command = [sys.executable, "jobs/pretrain.py", "--config", "tiny", "--set", f"train.steps={steps}"]
    command += ["--set", "run.name=bench-e2e", "--set", f"checkpoint.every_steps={steps}"]
    print("$ VITPIPE_HOME=" + str(home) + " " + " ".join(command[1:]), flush=True)
    start = time.monotonic()
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.monotonic() - start
    if proc.returncode != 0:
        sys.exit(f"pretraining failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    found = re.search(r"MLflow run (\w+)", proc.stdout)
    if not found:
        sys.exit(f"pretraining printed no MLflow run id:\n{proc.stdout[-3000:]}")
    return found.group(1), wall


def window_metrics(db: Path, run_id: str) -> dict[str, list[float]]:
    """Per-window values of the job's perf/ metrics, in step order (read straight from the SQLite store)."""
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "SELECT key, value FROM metrics WHERE run_uuid = ? AND key IN (?, ?) ORDER BY step",
            (run_id, "perf/images_per_s", "perf/data_wait_fraction"),
        ).fetchall()
    out: dict[str, list[float]] = {"perf/images_per_s": [], "perf/data_wait_fraction": []}
    for key, value in rows:
        out[key].append(value)
    return out


def model_only_images_per_s(micro_batch: int, workers: int, rounds: int = 20) -> float:
    """Images/s of `workers` bare one-thread training steps of the tiny model, scaled perfectly (one measured)."""
    cfg = presets.tiny()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    variant = cfg.model.variant
    # The preset's representation_size="width": a pre-logits layer as wide as the model.
    vit = create_vit(
        variant, num_classes=5, img_size=cfg.data.image_size, representation_size=parse_variant(variant).width
    )
    opt = torch.optim.AdamW(vit.parameters(), lr=1e-3)
    x = torch.randn(micro_batch, 3, cfg.data.image_size, cfg.data.image_size)
    y = torch.randint(0, 5, (micro_batch,))
    times = []
    for i in range(rounds + 3):
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(vit(x), y).backward()
        opt.step()
        if i >= 3:
            times.append(time.perf_counter() - start)
    return workers * micro_batch / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150, help="training steps of the tiny run (log every 10)")
    parser.add_argument("--keep", type=Path, help="run in this directory and keep it (default: a temporary one)")
    args = parser.parse_args()
    if args.steps < 30:
        sys.exit("--steps must be at least 30: the first of the 10-step windows is left out")
    cfg = presets.tiny()
    workers, micro = cfg.scale.workers, cfg.train.micro_batch

    with tempfile.TemporaryDirectory() as tmp:
        home = args.keep or Path(tmp)
        home.mkdir(parents=True, exist_ok=True)
        run_id, wall = run_job(home, args.steps)
        perf = window_metrics(home / "runs" / "mlflow.db", run_id)
    speeds, waits = perf["perf/images_per_s"][1:], perf["perf/data_wait_fraction"][1:]
    if not speeds:
        sys.exit("the run logged no perf/ metrics after its first window")
    speed, wait = statistics.mean(speeds), statistics.mean(waits)
    bare = model_only_images_per_s(micro, workers)
    print(f"{args.steps} steps of {workers} x {micro} images, {wall:.0f} s wall including start-up")
    print(f"windows after the first: {len(speeds)}; img/s min {min(speeds):.0f} max {max(speeds):.0f}")
    print(f"model-only ({workers} x one-thread steps of {micro}): {bare:.0f} img/s")
    print(f"tiny run: {speed:.0f} img/s, data wait {wait:.1%}  pipeline/model-only: {speed / bare:.2f}")


if __name__ == "__main__":
    main()
