"""Training-step speed of our ViT against timm's ViT of the same shape (CPU, fp32).

One process, same weights and batch for both; after a warm-up the two models take turns (the order
flips every round so neither always runs on a warmer cache) and the medians are compared.
Wall-clock time is the headline; process CPU time is printed beside it because on a shared machine
it is far less disturbed by other processes (with --threads 1 it is the work done by the step).

    python bench/model_step.py [--rounds 10] [--threads 1]

One thread is the default: both models run the same kinds of kernels, so the ratio hardly depends on
the thread count, while two OpenMP threads on a busy 2-core machine wait on each other and swing the
timings by tens of percent. Pass --threads 2 on an idle machine for absolute 2-core throughput.

Expected result: the per-op kernels are the same as timm's; ours does less work because forward()
sends only the class token through the last block (nothing else of it is read), about 1/depth of
the step, so roughly 0.93 for Ti/16 (12 blocks) and 0.87 for Mi/4 (6 blocks).

The last line is `ours/timm step time: X.XX` (geometric mean over the configs; lower is better).
"""

import argparse
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import timm
from timm.models.vision_transformer import VisionTransformer as TimmViT

from model import create_vit, load_checkpoint


@dataclass(frozen=True)
class Config:
    variant: str
    img_size: int
    batch: int
    num_classes: int


CONFIGS = [Config("Ti/16", 224, 8, 1000), Config("Mi/4", 32, 64, 10)]


def build_timm(cfg: Config) -> torch.nn.Module:
    if cfg.variant == "Ti/16":
        return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=cfg.num_classes)
    # timm has no micro size; same shape as create_vit("Mi/4")
    return TimmViT(
        img_size=cfg.img_size,
        patch_size=4,
        embed_dim=128,
        depth=6,
        num_heads=4,
        mlp_ratio=4.0,
        num_classes=cfg.num_classes,
    )


def make_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    model.train()

    def step() -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return time.perf_counter() - wall, time.process_time() - cpu

    return step


def run_config(cfg: Config, rounds: int, warmup: int) -> dict[str, tuple[float, float]]:
    """Median (wall, cpu) seconds per training step for "ours" and "timm"."""
    torch.manual_seed(0)
    ref = build_timm(cfg)
    ours = create_vit(cfg.variant, num_classes=cfg.num_classes, img_size=cfg.img_size)
    load_checkpoint(ours, ref.state_dict())  # identical starting weights
    x = torch.randn(cfg.batch, 3, cfg.img_size, cfg.img_size)
    y = torch.randint(0, cfg.num_classes, (cfg.batch,))
    steps = {"ours": make_step(ours, x, y), "timm": make_step(ref, x, y)}
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[str, list[tuple[float, float]]] = {"ours": [], "timm": []}
    for r in range(rounds):
        order = ("ours", "timm") if r % 2 == 0 else ("timm", "ours")
        for name in order:
            times[name].append(steps[name]())
    return {
        name: (statistics.median(t[0] for t in ts), statistics.median(t[1] for t in ts)) for name, ts in times.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10, help="timed steps per model and config")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per model and config")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"torch {torch.__version__}, timm {timm.__version__}, {torch.get_num_threads()} threads, fp32 CPU")
    header = ("config", "batch", "ours ms", "timm ms", "ours/timm", "cpu ours/timm", "ours img/s")
    print(f"{header[0]:<12}" + "".join(f"{h:>{w}}" for h, w in zip(header[1:], (6, 10, 10, 11, 15, 12), strict=True)))
    ratios = []
    for cfg in CONFIGS:
        t = run_config(cfg, args.rounds, args.warmup)
        (ours, ours_cpu), (ref, ref_cpu) = t["ours"], t["timm"]
        ratios.append(ours / ref)
        name = f"{cfg.variant}@{cfg.img_size}"
        print(
            f"{name:<12}{cfg.batch:>6}{ours * 1e3:>10.1f}{ref * 1e3:>10.1f}{ours / ref:>11.3f}"
            f"{ours_cpu / ref_cpu:>15.3f}{cfg.batch / ours:>12.1f}"
        )
    geomean = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
    print(f"ours/timm step time: {geomean:.2f}")


if __name__ == "__main__":
    main()
