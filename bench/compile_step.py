"""Does torch.compile (or a channels-last input) pay for our ViT's training step? Before/after, side by side.

One process; the same weights and batch for every variant of the step: eager (the default), eager with
channels-last input and weights, and ``torch.compile`` (inductor). After warm-up (which for the compiled step
includes the compilation, timed separately) the variants take turns, the order rotating every round, and the
medians are compared. On CPU the thread count is 1 by default for the same reason as bench/model_step.py.

    python bench/compile_step.py [--rounds 10] [--threads 1] [--device cpu|cuda]

On a GPU the step runs in bf16 autocast (as the pretraining engine does) and the batch is scaled up.
The last line is `compiled/eager step time: X.XX  channels-last/eager: Y.YY` (geometric means over the configs;
below 1 means faster). Compilation time is printed per config: it is paid once per worker start.
"""

import argparse
import contextlib
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.model_step import CONFIGS as CPU_CONFIGS  # the same two CPU shapes as the ours-vs-timm step bench
from bench.model_step import Config
from model import create_vit

GPU_CONFIGS = [Config("B/16", 224, 64, 1000), Config("Ti/16", 224, 256, 1000)]


def make_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> Callable[[], float]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    model.train()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

    def step() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    return step


def run_config(cfg: Config, device: torch.device, rounds: int, warmup: int) -> tuple[dict[str, float], float]:
    """Median seconds per training step for each variant, and the compiled step's first-call (compile) time."""
    torch.manual_seed(0)
    base = create_vit(cfg.variant, num_classes=cfg.num_classes, img_size=cfg.img_size)
    models = {
        name: create_vit(cfg.variant, num_classes=cfg.num_classes, img_size=cfg.img_size)
        for name in ("eager", "channels_last", "compiled")
    }
    for m in models.values():
        m.load_state_dict(base.state_dict())
        m.to(device)
    # Channels-last for the weights too (only the patch-embedding convolution has 4-D ones) as for the input.
    models["channels_last"].to(memory_format=torch.channels_last)
    x = torch.randn(cfg.batch, 3, cfg.img_size, cfg.img_size, device=device)
    y = torch.randint(0, cfg.num_classes, (cfg.batch,), device=device)
    steps = {
        "eager": make_step(models["eager"], x, y, device),
        "channels_last": make_step(models["channels_last"], x.contiguous(memory_format=torch.channels_last), y, device),
        "compiled": make_step(torch.compile(models["compiled"]), x, y, device),
    }
    compile_s = steps["compiled"]()  # first call: tracing + inductor code generation
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(steps[name]())
    return {name: statistics.median(ts) for name, ts in times.items()}, compile_s


def geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10, help="timed steps per variant and config")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant and config (after compiling)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU (0: torch's default)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    where = (
        torch.cuda.get_device_name() + ", bf16 autocast"
        if device.type == "cuda"
        else (f"CPU, {torch.get_num_threads()} threads, fp32")
    )
    print(f"torch {torch.__version__}, {where}")
    print(
        f"{'config':<12}{'batch':>6}{'eager ms':>10}{'c-last ms':>11}{'compiled ms':>13}{'compile s':>11}"
        f"{'compiled/eager':>16}{'c-last/eager':>14}"
    )
    compiled_ratios, channels_ratios = [], []
    for cfg in CPU_CONFIGS if device.type == "cpu" else GPU_CONFIGS:
        t, compile_s = run_config(cfg, device, args.rounds, args.warmup)
        compiled_ratios.append(t["compiled"] / t["eager"])
        channels_ratios.append(t["channels_last"] / t["eager"])
        print(
            f"{cfg.variant + '@' + str(cfg.img_size):<12}{cfg.batch:>6}{t['eager'] * 1e3:>10.1f}"
            f"{t['channels_last'] * 1e3:>11.1f}{t['compiled'] * 1e3:>13.1f}{compile_s:>11.1f}"
            f"{compiled_ratios[-1]:>16.3f}{channels_ratios[-1]:>14.3f}"
        )
    print(
        f"compiled/eager step time: {geomean(compiled_ratios):.2f}  channels-last/eager: {geomean(channels_ratios):.2f}"
    )


if __name__ == "__main__":
    main()
