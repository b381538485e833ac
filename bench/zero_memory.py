"""Per-rank bytes of parameters, gradients and optimizer states under DeepSpeed ZeRO-1/2/3, against the ZeRO formulas.

Two ranks on this machine's CPU (DS_ACCELERATOR=cpu, gloo, MASTER_ADDR=127.0.0.1), each a process started by
torch.multiprocessing. For every (precision, stage) a fresh ViT goes through deepspeed.initialize, one full step
(so Adam's m and v exist) and one more forward/backward; the bytes are read off the engine's own tensors, never
process RSS:

  weights     the module's parameters (stages 1/2: views into DeepSpeed's flat 16-bit buffer; stage 3: each
              parameter's `ds_tensor` partition) and DeepSpeed's flat weight buffers
  grads       the peak, over the backward pass, of everything holding gradients: `param.grad`, and DeepSpeed's
              gradient partitions (`averaged_gradients`, `grads_in_partition`, `grad_partitions_flat_buffer`, ...),
              sampled by a post-accumulate-grad hook on every parameter
  optimizer   the fp32 master partition (`single_partition_of_fp32_groups` / `fp32_partitioned_groups_flat`) and
              the tensors in the torch optimizer's `state` (Adam m, v)
  buffers     DeepSpeed's communication buckets (`ipg_buckets`), shown but not part of the formulas
  other       every other tensor reachable from the ZeRO optimizer's attributes, to show nothing was missed

Each storage is counted once (views share it), in that order. The formulas are `pipeline.planner.model_state_bytes`
(ZeRO paper §5): bf16 2Ψ + 2Ψ + 12Ψ with N = 2, partitioned by stage; fp32 4Ψ + 4Ψ + 12Ψ, because DeepSpeed's ZeRO
optimizers keep a separate fp32 partition of the weights even when the model is fp32 (the textbook fp32 Adam
needs 4Ψ + 4Ψ + 8Ψ: that column is printed too). bf16 runs here although CPU bf16 matmuls are slow: it is the GPU
path and the paper's formula, and the model is tiny.

    python bench/zero_memory.py [--variant Ti/16] [--img-size 32] [--precisions bf16,fp32]

The last line: `measured/formula: bf16 ZeRO-1 1.00, ...` (per-rank totals of weights + grads + optimizer).
"""

import argparse
import gc
import json
import logging
import os
import socket
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported anywhere

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.planner import model_state_bytes

WORLD_SIZE = 2
STAGES = (1, 2, 3)
CATEGORIES = ("weights", "grads", "optimizer", "buffers", "other")
# DeepSpeed's default buckets (5e8 elements = 1 GB in bf16) dwarf a small model; 1e5 keeps them visible but small.
BUCKET_ELEMENTS = 100_000


@dataclass(frozen=True)
class Measurement:
    precision: str
    stage: int
    rank: int
    psi: int
    weights: int
    grads: int
    optimizer: int
    buffers: int
    other: int
    optimizer_class: str

    @property
    def states(self) -> int:
        return self.weights + self.grads + self.optimizer


# ---------------------------------------------------------------------------------------------------------------------
# Tensor census


def _tensors(obj: Any, depth: int = 0, seen: set[int] | None = None) -> Iterable[torch.Tensor]:
    """Tensors reachable from obj through lists, tuples, dicts and DeepSpeed's own helper objects (buckets)."""
    seen = set() if seen is None else seen
    if id(obj) in seen or depth > 5:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _tensors(value, depth + 1, seen)
    elif isinstance(obj, list | tuple):
        for value in obj:
            yield from _tensors(value, depth + 1, seen)
    elif type(obj).__module__.startswith("deepspeed") and hasattr(obj, "__dict__"):
        for value in vars(obj).values():
            yield from _tensors(value, depth + 1, seen)


def _attrs(obj: Any, keep: Callable[[str], bool]) -> list[Any]:
    return [value for name, value in vars(obj).items() if keep(name)]


def census(engine: Any) -> dict[str, int]:
    """Bytes per category of the distinct storages the engine holds right now (see the module docstring)."""
    opt = engine.optimizer  # DeepSpeedZeroOptimizer (stages 1/2) or DeepSpeedZeroOptimizer_Stage3
    params = list(engine.module.parameters())
    roots: dict[str, list[Any]] = {
        "weights": [
            [p.data for p in params],
            [getattr(p, "ds_tensor", None) for p in params],
            getattr(opt, "bit16_groups_flat", None),
            getattr(opt, "fp16_partitioned_groups_flat", None),
        ],
        "optimizer": [
            getattr(opt, "single_partition_of_fp32_groups", None),
            getattr(opt, "fp32_partitioned_groups_flat", None),
            opt.optimizer.state,
        ],
        "grads": [[p.grad for p in params], _attrs(opt, lambda name: "grad" in name.lower())],
        "buffers": [_attrs(opt, lambda name: "ipg" in name)],
        # anything else the optimizer holds: a copy the categories above missed would show up here
        "other": [_attrs(opt, lambda name: True), _attrs(opt.optimizer, lambda name: True)],
    }
    counted: set[int] = set()
    sizes = dict.fromkeys(CATEGORIES, 0)
    for category in CATEGORIES:
        for tensor in _tensors(roots[category]):
            storage = tensor.untyped_storage()
            if storage.nbytes() == 0 or storage.data_ptr() in counted:
                continue
            counted.add(storage.data_ptr())
            sizes[category] += storage.nbytes()
    return sizes


# ---------------------------------------------------------------------------------------------------------------------
# One configuration on one rank


def ds_config(stage: int, precision: str) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.1, "torch_adam": True}},
        "bf16": {"enabled": precision == "bf16"},
        "zero_optimization": {
            "stage": stage,
            "reduce_bucket_size": BUCKET_ELEMENTS,
            "allgather_bucket_size": BUCKET_ELEMENTS,
            "stage3_prefetch_bucket_size": BUCKET_ELEMENTS,
            # DeepSpeed keeps parameters under 1e5 elements whole on every rank by default (biases, LayerNorms);
            # 0 partitions all of them, as the ZeRO paper's formula assumes.
            "stage3_param_persistence_threshold": 0,
        },
        "steps_per_print": 1_000_000,
    }


def measure(variant: str, img_size: int, stage: int, precision: str, rank: int) -> Measurement:
    import deepspeed

    import model

    torch.manual_seed(0)
    net = model.create_vit(variant, num_classes=10, img_size=img_size)
    psi = sum(p.numel() for p in net.parameters())
    engine, *_ = deepspeed.initialize(model=net, model_parameters=net.parameters(), config=ds_config(stage, precision))
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    x = torch.randn(2, 3, img_size, img_size, dtype=dtype)
    y = torch.randint(0, 10, (2,))

    def loss() -> torch.Tensor:
        return torch.nn.functional.cross_entropy(engine(x).float(), y)

    engine.backward(loss())
    engine.step()  # Adam's m and v are created on the first step

    # Gradients and buckets come and go during backward: keep the largest amount seen after any parameter's
    # gradient was accumulated (DeepSpeed's own hooks, registered earlier, have run by then).
    peaks = {"grads": 0, "buffers": 0}

    def sample(_: torch.Tensor) -> None:
        now = census(engine)
        for key in peaks:
            peaks[key] = max(peaks[key], now[key])

    hooks = [p.register_post_accumulate_grad_hook(sample) for p in engine.module.parameters()]
    engine.backward(loss())
    for hook in hooks:
        hook.remove()
    sizes = census(engine)  # after backward, before step: stage 3 has released its gathered weights
    result = Measurement(
        precision=precision,
        stage=stage,
        rank=rank,
        psi=psi,
        weights=sizes["weights"],
        grads=max(peaks["grads"], sizes["grads"]),
        optimizer=sizes["optimizer"],
        buffers=max(peaks["buffers"], sizes["buffers"]),
        other=sizes["other"],
        optimizer_class=type(engine.optimizer).__name__,
    )
    engine.step()
    if hasattr(engine, "destroy"):
        engine.destroy()  # removes ZeRO-3's module hooks
    return result


def worker(rank: int, port: int, variant: str, img_size: int, precisions: list[str], out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE)
    )
    torch.set_num_threads(1)  # two ranks on two cores
    import deepspeed
    import torch.distributed as dist

    deepspeed.utils.logger.setLevel(logging.WARNING)  # its INFO lines would bury the table
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch's note on DeepSpeed's all_gather_into_tensor

    t0 = time.perf_counter()
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    if rank == 0:
        print(f"process group up in {time.perf_counter() - t0:.0f} s", flush=True)
    results = []
    for precision in precisions:
        for stage in STAGES:
            t0 = time.perf_counter()
            mine = measure(variant, img_size, stage, precision, rank)
            gc.collect()  # the engine just measured is garbage now
            if rank == 0:
                print(f"measured {precision} ZeRO-{stage} in {time.perf_counter() - t0:.0f} s", flush=True)
            both: list[Any] = [None] * WORLD_SIZE
            dist.all_gather_object(both, asdict(mine))
            results.extend(both)
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------------------------
# Report


def formula(m: Measurement) -> tuple[float, float, float]:
    s = model_state_bytes(m.psi, m.stage, WORLD_SIZE, m.precision)  # type: ignore[arg-type]
    return s.params, s.grads, s.optimizer


def textbook_fp32(psi: int, stage: int) -> float:
    """fp32 Adam without a master copy: 4Ψ + 4Ψ + 8Ψ, partitioned the same way."""
    n = WORLD_SIZE
    return 4 * psi / (n if stage >= 3 else 1) + 4 * psi / (n if stage >= 2 else 1) + 8 * psi / n


def report(rows: list[Measurement], seconds: float) -> str:
    mb = 1e6
    psi = rows[0].psi
    lines = [
        f"ZeRO memory per rank: {WORLD_SIZE} ranks on CPU (gloo), model Ψ = {psi:,} params; MB = 1e6 bytes",
        "formula (ZeRO paper §5, N = 2): bf16 2Ψ + 2Ψ + 12Ψ; fp32 4Ψ + 4Ψ + 12Ψ (DeepSpeed keeps an fp32 copy);"
        " stage 1 shards the optimizer, 2 also grads, 3 also weights",
        "",
        f"{'prec':<5}{'stage':>6}{'rank':>5} | {'weights':>8}{'grads':>8}{'optim':>8}{'total':>8} | "
        f"{'formula':>8}{'ratio':>7} | {'w':>5}{'g':>5}{'o':>5} | {'buffers':>8}{'other':>7}  optimizer class",
    ]
    for m in rows:
        fw, fg, fo = formula(m)
        lines.append(
            f"{m.precision:<5}{m.stage:>6}{m.rank:>5} | {m.weights / mb:>8.2f}{m.grads / mb:>8.2f}"
            f"{m.optimizer / mb:>8.2f}{m.states / mb:>8.2f} | {(fw + fg + fo) / mb:>8.2f}"
            f"{m.states / (fw + fg + fo):>7.3f} | {m.weights / fw:>5.2f}{m.grads / fg:>5.2f}{m.optimizer / fo:>5.2f} | "
            f"{m.buffers / mb:>8.2f}{m.other / mb:>7.2f}  {m.optimizer_class}"
        )
    lines.append("(w, g, o: measured/formula for weights, grads, optimizer states)")
    fp32 = [m for m in rows if m.precision == "fp32" and m.rank == 0]
    if fp32:
        lines.append(
            "fp32 against the textbook 4Ψ + 4Ψ + 8Ψ (no master copy): "
            + ", ".join(f"ZeRO-{m.stage} {m.states / textbook_fp32(m.psi, m.stage):.2f}" for m in fp32)
        )
    lines.append(f"({seconds:.0f} s)")
    ratios = []
    for m in rows:
        if m.rank == 0:
            worst = max((r for r in rows if (r.precision, r.stage) == (m.precision, m.stage)), key=_deviation)
            ratios.append(f"{m.precision} ZeRO-{m.stage} {worst.states / sum(formula(worst)):.2f}")
    lines.append("measured/formula: " + ", ".join(ratios))
    return "\n".join(lines)


def _deviation(m: Measurement) -> float:
    return abs(m.states / sum(formula(m)) - 1.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="Ti/16", help="ViT variant built with model.create_vit")
    parser.add_argument("--img-size", type=int, default=32, help="small images keep bf16 on CPU fast")
    parser.add_argument("--precisions", default="bf16,fp32")
    args = parser.parse_args(argv)
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    if not set(precisions) <= {"bf16", "fp32"}:
        parser.error("--precisions takes bf16 and/or fp32")

    with socket.socket() as s:  # a free port on loopback for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "results.json")
        mp.spawn(worker, args=(port, args.variant, args.img_size, precisions, out), nprocs=WORLD_SIZE)
        rows = [Measurement(**row) for row in json.loads(Path(out).read_text())]
    print(report(rows, time.perf_counter() - start))
    return 0


if __name__ == "__main__":
    sys.exit(main())
