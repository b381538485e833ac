"""The full plan of a pretraining run (memory table, recommendation, communication, data rate, time, the paper's
cost) and its printed form, ``jobs/plan.py``'s output.
"""

from dataclasses import dataclass

from pipeline.planner.costs import (
    DAY_S,
    PAPER_TPUV3_CORE_DAYS,
    DataRate,
    PaperComparison,
    TimeEstimate,
    comm_bytes_per_step,
    comm_seconds,
    step_seconds,
)
from pipeline.planner.fit import Fitter, PlanRequest, PreflightResult, preflight, request_facts
from pipeline.planner.hardware import GIB, GPUS, REPORT_GPUS, TPUV3_CORE_PEAK_FLOPS
from pipeline.planner.memory import ZERO_STAGES, MemoryEstimate, ModelFacts, format_gib


@dataclass(frozen=True)
class ScalePlan:
    """Everything the printed plan shows (named apart from pipeline.config.RunLayout, a run's resolved settings)."""

    request: PlanRequest
    facts: ModelFacts
    preflight: PreflightResult
    micro_batch: int  # the micro-batch the memory table is for (configured, else recommended)
    memory_table: list[MemoryEstimate]  # stages 0-3 × checkpointing off/on at `micro_batch`
    comm: dict[int, float]  # stage -> bytes per GPU per step
    grad_accumulation: int
    time: TimeEstimate | None  # None on CPU (no peak to assume an MFU of)
    data: DataRate | None
    paper: PaperComparison | None


def plan(req: PlanRequest) -> ScalePlan:
    """Everything `jobs/plan.py` prints; the formulas and their sources are in memory.py and costs.py."""
    facts = request_facts(req)
    check = preflight(req)
    n = req.num_gpus
    per_gpu = max(1, req.global_batch // n)
    rec = check.recommendation
    micro = req.micro_batch or (rec.micro_batch if rec else 1)
    fitter = Fitter(req, facts, check.device)
    table = [fitter.estimate(stage, micro, ckpt) for stage in ZERO_STAGES for ckpt in (False, True)]
    accumulation = max(1, per_gpu // micro)
    wire_bytes = 4 if fitter.precision == "fp32" else 2
    comm = {stage: comm_bytes_per_step(facts.params, stage, n, accumulation, wire_bytes) for stage in ZERO_STAGES}

    time = data = paper = None
    if req.gpu != "cpu":
        peak = GPUS[req.gpu].peak_bf16_flops
        step = step_seconds(
            global_batch=req.global_batch,
            train_flops_per_image=facts.train_flops_per_image,
            num_gpus=n,
            peak_flops=peak,
            mfu=req.mfu,
        )
        total = step * req.steps
        images_per_s = req.global_batch / step
        flops_total = facts.train_flops_per_image * req.global_batch * req.steps
        time = TimeEstimate(step, total, total / 3600.0 * n, images_per_s, flops_total)
        per_node = images_per_s / req.nodes
        data = DataRate(
            images_per_s=images_per_s,
            images_per_s_per_node=per_node,
            cores_per_node=per_node / req.loader_rate_per_core,
            bytes_per_s=images_per_s * req.image_bytes,
            shards_per_s=images_per_s * req.image_bytes / req.shard_bytes,
        )
        core_days = PAPER_TPUV3_CORE_DAYS.get(facts.variant)
        if core_days is not None:
            budget = core_days * DAY_S * TPUV3_CORE_PEAK_FLOPS
            paper = PaperComparison(
                paper_core_days=core_days,
                paper_peak_flops=budget,
                paper_equivalent_gpu_days=budget / peak / DAY_S,
                plan_equivalent_core_days=time.gpu_hours * 3600.0 * peak / TPUV3_CORE_PEAK_FLOPS / DAY_S,
                implied_paper_mfu=flops_total / budget,
            )
    return ScalePlan(req, facts, check, micro, table, comm, accumulation, time, data, paper)


def _bytes(x: float) -> str:
    return f"{x / 1e9:.2f} GB" if x >= 1e8 else f"{x / 1e6:.2f} MB"


def _duration(seconds: float) -> str:
    if seconds >= 2 * DAY_S:
        return f"{seconds / DAY_S:.1f} days"
    if seconds >= 2 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.1f} min"


def format_plan(p: ScalePlan) -> str:
    req, f, check = p.request, p.facts, p.preflight
    n = req.num_gpus
    device = check.device
    out: list[str] = []
    add = out.append
    precision = "fp32" if req.gpu == "cpu" else req.precision
    attention = "fused (flash) attention" if req.flash_attention else "eager attention"
    wire = 4 if precision == "fp32" else 2

    add(f"== Plan: ViT-{f.variant} at {f.img_size} px, {f.num_classes} classes ==")
    add(
        f"model: Ψ = {f.params / 1e6:.1f} M params, width {f.width}, depth {f.depth}, heads {f.heads}, "
        f"MLP {f.mlp_dim}, {f.seq_len} tokens; {f.train_flops_per_image / 1e12:.3f} TFLOPs per training image "
        "(3 × forward)"
    )
    add(
        f"cluster: {req.nodes} node{'s' if req.nodes > 1 else ''} × {req.gpus_per_node} {device.name} = {n} ranks; "
        f"global batch "
        f"{req.global_batch} ({req.global_batch / n:g} per rank); {req.steps:,} steps"
    )

    add("")
    add(f"-- Memory per GPU at micro-batch {p.micro_batch}, {precision}, {attention} (GiB) --")
    layout = "bf16 2Ψ + 2Ψ + 12Ψ" if precision == "bf16" else "fp32 4Ψ + 4Ψ + 8Ψ (12Ψ with DeepSpeed ZeRO ≥ 1)"
    add(f"   states = params + grads + optimizer (ZeRO paper §5: {layout}, partitioned by stage over N)")
    add("   activations per layer = s·b·h·34 + 4·a·s·b bytes with fused attention, s·b·h·(34 + 5·a·s/h) eager")
    add("   (Korthikanti et al. 2022 eq. 1); checkpointing keeps 2·s·b·h per layer + one layer")
    targets = [device] if req.gpu == "cpu" else [GPUS[k] for k in REPORT_GPUS]
    if device not in targets:
        targets.append(device)
    header = f"{'stage':>5} {'ckpt':>4} {'params':>7} {'grads':>7} {'optim':>7} {'states':>7} {'activ':>7} {'total':>7}"
    add(header + " | " + " ".join(f"{g.key.upper():>9}" for g in targets))
    for m in p.memory_table:
        cells = [m.states.params, m.states.grads, m.states.optimizer, m.states.total, m.activations, m.total]
        row = f"{m.zero_stage:>5} {'on' if m.grad_checkpointing else 'off':>4} " + " ".join(
            f"{c / GIB:>7.1f}" for c in cells
        )
        add(row + " | " + " ".join(f"{'fits' if m.total <= g.usable_bytes else '-':>9}" for g in targets))
    reserve = "1 GiB (the process's runtime)" if req.gpu == "cpu" else "3 GiB (CUDA context, NCCL, DeepSpeed buckets)"
    add(
        f"   usable = capacity × 0.9 (fragmentation, backward temporaries) − {reserve}: "
        + ", ".join(f"{g.name} {g.usable_bytes / GIB:.1f} of {g.memory_gib:.1f}" for g in targets)
    )

    add("")
    add("-- Recommendation --")
    rec = check.recommendation
    if rec is not None:
        add(f"{rec.describe()} on {device.name} ({format_gib(device.usable_bytes)} usable)")
    else:
        add("none: nothing fits")
    if check.setting is not None:
        m = check.setting
        state = "fits" if m.total <= device.usable_bytes else "does NOT fit"
        add(
            f"configured zero_stage={m.zero_stage}, micro_batch={m.micro_batch}, grad_checkpointing="
            f"{'on' if m.grad_checkpointing else 'off'}: {format_gib(m.total)} per GPU, {state}"
        )
    add(f"preflight: {'OK' if check.fits else 'REFUSED'}")
    for reason in check.reasons:
        add(f"  - {reason}")
    for note in check.notes:
        add(f"  note: {note}")

    add("")
    add(
        f"-- Communication per GPU per optimizer step ({precision} on the wire, N = {n}, accumulation A = "
        f"{p.grad_accumulation}; ZeRO paper §7) --"
    )
    formulas = {0: "2Ψ (all-reduce)", 1: "2Ψ (reduce-scatter + all-gather)", 2: "Ψ·A + Ψ", 3: "3Ψ·A (1.5 × DDP)"}
    for stage, volume in p.comm.items():
        line = f"stage {stage}: {formulas[stage]:<34} × {wire} B × (N−1)/N = {_bytes(volume):>9}"
        if req.nodes > 1:
            seconds = comm_seconds(
                volume, nodes=req.nodes, gpus_per_node=req.gpus_per_node, net_gbits_per_gpu=req.net_gbits_per_gpu
            )
            line += f", network ≈ {seconds * 1e3:.0f} ms"
        add(line)
    if req.nodes > 1:
        add(
            f"   network ≈ volume / ({req.gpus_per_node} NICs × {req.net_gbits_per_gpu:g} Gb/s) per node "
            "(NCCL rings cross each node once per NIC; NVLink taken as free)"
            + (f"; compute per step ≈ {p.time.step_s * 1e3:.0f} ms" if p.time else "")
        )

    if p.data is not None and p.time is not None:
        d = p.data
        add("")
        add(f"-- Data the loader must sustain at MFU {req.mfu:g} --")
        add(
            f"{d.images_per_s:,.0f} images/s in all, {d.images_per_s_per_node:,.0f} per node -> "
            f"{d.cores_per_node:.1f} CPU cores per node at {req.loader_rate_per_core:g} images/s/core "
            f"(shard read + decode + crop + flip)"
        )
        add(
            f"GCS: {d.bytes_per_s / 1e9:.2f} GB/s at {req.image_bytes / 1e3:.0f} KB per image, "
            f"{d.shards_per_s:.1f} shard reads/s of {req.shard_bytes / 1e6:.0f} MB "
            f"({d.bytes_per_s * 8 / 1e9:.0f} Gb/s: compare with the project's GCS egress bandwidth quota per region)"
        )

    if p.time is not None:
        t = p.time
        peak = GPUS[req.gpu].peak_bf16_flops
        add("")
        add(f"-- Time at MFU {req.mfu:g} of {peak / 1e12:.0f} TFLOP/s bf16 peak --")
        add(
            "step = global_batch × train FLOPs/image / (MFU × peak × GPUs) = "
            f"{req.global_batch} × {f.train_flops_per_image / 1e12:.3f}e12 / ({req.mfu:g} × {peak / 1e12:.0f}e12 × {n})"
            f" = {t.step_s:.3f} s"
        )
        add(
            f"{req.steps:,} steps -> {_duration(t.total_s)} wall-clock, {t.gpu_hours:,.0f} GPU-hours "
            f"({t.gpu_hours / 24:,.0f} GPU-days), {t.train_flops_total:.3g} training FLOPs, "
            f"{t.images_per_s:,.0f} images/s"
        )
        if p.request.grad_checkpointing or (rec is not None and rec.grad_checkpointing):
            add("  note: activation checkpointing recomputes the forward; expect a lower MFU (~3/4) than without")
    if p.paper is not None:
        c = p.paper
        add("")
        add(f"-- ViT paper: ViT-{f.variant} on JFT-300M took {c.paper_core_days / 1000:g}k TPUv3-core-days --")
        add(
            f"= {c.paper_core_days:,.0f} × 86,400 s × 61.5 TFLOP/s (123 per chip / 2 cores) = "
            f"{c.paper_peak_flops:.3g} peak FLOPs = {c.paper_equivalent_gpu_days:,.0f} {GPUS[req.gpu].name}-days "
            "at the same utilisation"
        )
        add(
            f"this plan: {p.time.gpu_hours / 24:,.0f} GPU-days = {c.plan_equivalent_core_days / 1000:.2f}k "
            "TPUv3-core-days of equal peak FLOPs; "
            f"if the paper ran this schedule, its MFU was {c.implied_paper_mfu:.2f}"
        )
    return "\n".join(out)
