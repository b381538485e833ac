"""Communication, time and data-rate formulas of a pretraining step, and the facts they rest on.

* Communication per step: ZeRO paper (Rajbhandari et al. 2020) §7 — ``comm_bytes_per_step``.
* Wall-clock: training FLOPs (≈ 3 × forward, ViT paper / Kaplan et al. 2020) over MFU × peak (Chowdhery et al.
  2022, PaLM, Appendix B) — ``step_seconds``.
"""

from dataclasses import dataclass

DAY_S = 86_400.0

# Pretraining cost on JFT-300M, ViT paper Table 2.
PAPER_TPUV3_CORE_DAYS: dict[str, float] = {"H/14": 2500.0, "L/16": 680.0}

# Images/s one CPU core feeds to training. Source: `python bench/loader.py` (the loader of commit f2a3511) on the
# 2-core development machine, 2026-11-25: "loader gcs emulator, 0 workers" 1055 img/s per CPU-second, i.e. tar
# streaming through gcsfs + reduced-scale JPEG decode + Inception crop + flip, on 400x350 q90 photo crops of 36 KB
# (the transform alone: 1377 img/s/core). Photos of ImageNet/JFT size (~110 KB) decode slower: measure on the real
# shards and pass --loader-rate-per-core.
LOADER_IMAGES_PER_SEC_PER_CORE = 1050.0
# Mean JPEG size of ImageNet-1k train (~140 GB / 1.28 M images); JFT images are of the same order.
DEFAULT_IMAGE_BYTES = 110_000
# `jobs/prepare_data.py --shard-size` default (pipeline/data/prepare.py: 256 MB).
DEFAULT_SHARD_BYTES = 256 * 1000**2


def comm_bytes_per_step(
    num_params: int, zero_stage: int, num_gpus: int, grad_accumulation: int = 1, bytes_per_value: int = 2
) -> float:
    """Bytes each GPU sends (and receives) per optimizer step for data parallelism (ZeRO paper §7).

    A ring all-reduce is a reduce-scatter plus an all-gather, each moving Ψ·(N−1)/N elements per GPU:

        stage 0   all-reduce of the gradients                                2Ψ
        stage 1   reduce-scatter of gradients + all-gather of updated weights  2Ψ  (the paper: same as DDP)
        stage 2   the same, but DeepSpeed reduce-scatters gradients in every
                  micro-step's backward, so with A accumulation steps         Ψ·A + Ψ
        stage 3   weights all-gathered for forward and again for backward,
                  gradients reduce-scattered, every micro-step                  3Ψ·A (the paper: 1.5 × DDP)

    times (N−1)/N and the bytes per element on the wire (bf16: 2). Stages 0 and 1 reduce once per step, at the
    gradient-accumulation boundary.
    """
    psi, a = float(num_params), float(grad_accumulation)
    elements = {0: 2.0 * psi, 1: 2.0 * psi, 2: psi * a + psi, 3: 3.0 * psi * a}[zero_stage]
    return elements * bytes_per_value * (num_gpus - 1) / num_gpus


def comm_seconds(volume_bytes: float, *, nodes: int, gpus_per_node: int, net_gbits_per_gpu: float) -> float:
    """Network time of `comm_bytes_per_step` when a node's GPUs share NVLink and each has its own NIC.

    NCCL runs one ring (or tree) per NIC; each crosses the node boundary once, so a node's network egress is
    about one GPU's volume, spread over its gpus_per_node NICs: time ≈ volume / (gpus_per_node × NIC rate).
    NVLink (900 GB/s on H100) is taken as free. On one node nothing crosses the network: 0.
    """
    if nodes == 1:
        return 0.0
    return volume_bytes / (gpus_per_node * net_gbits_per_gpu / 8.0 * 1e9)


def step_seconds(
    *, global_batch: int, train_flops_per_image: float, num_gpus: int, peak_flops: float, mfu: float
) -> float:
    """Seconds per optimizer step: global_batch × training FLOPs per image / (MFU × peak FLOP/s × GPUs)."""
    return global_batch * train_flops_per_image / (mfu * peak_flops * num_gpus)


@dataclass(frozen=True)
class TimeEstimate:
    step_s: float
    total_s: float
    gpu_hours: float
    images_per_s: float
    train_flops_total: float


@dataclass(frozen=True)
class DataRate:
    images_per_s: float
    images_per_s_per_node: float
    cores_per_node: float
    bytes_per_s: float
    shards_per_s: float


@dataclass(frozen=True)
class PaperComparison:
    paper_core_days: float
    paper_peak_flops: float  # core-days × 86,400 s × 61.5 TFLOP/s
    paper_equivalent_gpu_days: float  # the same peak-FLOP budget on this plan's GPU
    plan_equivalent_core_days: float  # this plan's GPU-hours as TPUv3-core-days of equal peak
    implied_paper_mfu: float  # this schedule's training FLOPs / the paper's peak budget
