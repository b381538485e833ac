"""Hardware facts: the one table of accelerators (memory, peak FLOP/s, interconnect) the whole project reads.

The planner sizes runs against it, pretraining reports MFU against its peaks, and the benchmarks name the device
they ran on with it. Add a GPU here, and only here.
"""

from dataclasses import dataclass

GIB = 1024**3

# What the memory formulas leave out is taken off the top of every GPU before comparing: the CUDA context and
# cuBLAS workspaces (~1 GiB), NCCL buffers (~0.5-1 GiB) and DeepSpeed's gradient bucket (reduce_bucket_size
# defaults to 5e8 elements = 1 GB in bf16) as a fixed amount, plus a fraction for caching-allocator fragmentation
# and the short-lived activation gradients of backward, which the activation formula does not count.
RESERVE_FIXED_GIB = 3.0
RESERVE_FRACTION = 0.10
# A CPU training process needs no CUDA context, but its Python, torch, DeepSpeed and Ray worker take about 1 GiB.
CPU_PROCESS_RESERVE_GIB = 1.0


def usable_memory_bytes(capacity_bytes: float, reserve_fixed_gib: float = RESERVE_FIXED_GIB) -> float:
    """Memory the model states and activations may use: capacity × (1 − RESERVE_FRACTION) − the fixed reserve."""
    return max(0.0, capacity_bytes * (1.0 - RESERVE_FRACTION) - reserve_fixed_gib * GIB)


@dataclass(frozen=True)
class GpuSpec:
    """One accelerator model.

    `memory_gib` is what `nvidia-smi` reports (MiB / 1024), a little under the marketing GB. Peaks are dense
    tensor-core bf16 (no 2:4 sparsity) and plain fp32 (CUDA cores: PyTorch does not use TF32 for matmuls unless
    asked to). `nvlink_gbytes_per_s` is the total NVLink bandwidth of one GPU (both directions), `pcie_gbytes_per_s`
    its host link (both directions).
    """

    key: str
    name: str
    memory_gib: float
    peak_bf16_flops: float
    peak_fp32_flops: float = 0.0
    nvlink_gbytes_per_s: float = 0.0
    pcie_gbytes_per_s: float = 0.0
    reserve_fixed_gib: float = RESERVE_FIXED_GIB

    @property
    def usable_bytes(self) -> float:
        return usable_memory_bytes(self.memory_gib * GIB, self.reserve_fixed_gib)


# Sources: NVIDIA datasheets (A100, H100, H100 NVL, H200). Memory: the MiB totals nvidia-smi prints (40960, 81920,
# 81559, 95830, 143771) / 1024. H200 has the H100 SXM compute die, hence the same peaks. H100 PCIe runs at a lower
# clock and power limit (756 TFLOP/s bf16); H100 NVL (94 GB, PCIe card with an NVLink bridge) sits between them.
GPUS: dict[str, GpuSpec] = {
    "a100-40": GpuSpec("a100-40", "A100 40GB", 40.0, 312e12, 19.5e12, 600.0, 64.0),
    "a100-80": GpuSpec("a100-80", "A100 80GB", 80.0, 312e12, 19.5e12, 600.0, 64.0),
    "h100": GpuSpec("h100", "H100 80GB SXM", 79.65, 989e12, 67e12, 900.0, 128.0),
    "h100-pcie": GpuSpec("h100-pcie", "H100 PCIe", 79.65, 756e12, 51e12, 600.0, 128.0),
    "h100-nvl": GpuSpec("h100-nvl", "H100 NVL", 93.58, 835e12, 60e12, 600.0, 128.0),
    "h200": GpuSpec("h200", "H200 141GB", 140.40, 989e12, 67e12, 900.0, 128.0),
}

# The GPUs the printed plan compares side by side (the ones cloud clusters are built from); any key of GPUS can
# be planned for.
REPORT_GPUS = ("a100-40", "a100-80", "h100", "h200")

# Per-GPU network bandwidth used to turn bytes into seconds: GCP A3 Mega gives each H100 one 200 Gb/s NIC.
DEFAULT_NET_GBITS_PER_GPU = 200.0

# The ViT paper (Table 2) reports pretraining cost on JFT-300M in TPUv3-core-days. A TPUv3 chip peaks at 123
# TFLOP/s bf16 and has 2 cores, so one core-day is 61.5e12 × 86,400 peak FLOPs.
TPUV3_CORE_PEAK_FLOPS = 61.5e12


def detect_gpu(device_name: str) -> GpuSpec | None:
    """Map `torch.cuda.get_device_name()` ("NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-40GB", ...) to a GpuSpec.

    None for a device the table does not know (no MFU is reported there).
    """
    name = device_name.upper()
    if "H200" in name:
        return GPUS["h200"]
    if "H100" in name:
        if "NVL" in name:
            return GPUS["h100-nvl"]
        if "PCIE" in name:
            return GPUS["h100-pcie"]
        return GPUS["h100"]
    if "A100" in name:
        return GPUS["a100-80"] if "80G" in name else GPUS["a100-40"]
    return None


def cpu_device(processes_per_node: int) -> GpuSpec:
    """Host memory available to each of `processes_per_node` training processes (psutil), as a pseudo-GPU."""
    import psutil  # a dependency of ray; imported here because only CPU runs need it

    available = psutil.virtual_memory().available
    per_process = available / GIB / processes_per_node
    return GpuSpec(
        "cpu",
        f"CPU process ({per_process:.1f} GiB host memory)",
        per_process,
        peak_bf16_flops=0.0,
        reserve_fixed_gib=CPU_PROCESS_RESERVE_GIB,
    )
