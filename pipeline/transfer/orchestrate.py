"""The sweep on the cluster: MLflow parent and child runs, and one Ray task per run.

``run_sweep`` plans (or takes the printed plan), joins Ray and checks that the cluster can host each run
(``pipeline.cluster``), creates a parent run per init (pretrained, scratch) and a child run per task up front, so
that a task whose worker dies can still be marked FAILED, then submits every run with its own resource request
and collects them with ``ray.wait`` as they finish. A refit benchmark's final runs are submitted once its
selection runs are in. A run that fails marks its child FAILED and its siblings carry on; at the end each
parent gets the rows of ``summarise``. Once runs are under way an MLflow outage costs tracking at most, never the
sweep or its summary (``_DriverWrites``). ``execute`` runs one spec, in-process or as the body of a Ray task.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from pipeline import results
from pipeline.cluster import ResourceNeed, check_resources, connect_ray, joins_existing_cluster
from pipeline.config.transfer import TransferConfig, build_config
from pipeline.planner.hardware import GpuSpec, detect_gpu
from pipeline.transfer.fewshot import run_fewshot
from pipeline.transfer.finetune import RunSpec, run_finetune
from pipeline.transfer.summary import ERROR_TAG, MAX_TAG_CHARS, RunOutcome, choose_lr, summarise
from pipeline.transfer.sweep import SweepPlan, fit_memory, plan_sweep, planning_gpu

log = logging.getLogger(__name__)


def execute(spec: RunSpec) -> dict[str, float]:
    """Run one spec, streaming its metrics to its MLflow child run (if any). Used in-process and by Ray tasks."""
    from pipeline.tracking import MetricLogger

    logger = MetricLogger(spec.tracking_uri, spec.run_id) if spec.tracking_uri and spec.run_id else None
    try:
        run = run_finetune if spec.kind == "finetune" else run_fewshot
        return run(spec, logger.log_metrics if logger else None)
    finally:
        if logger is not None:
            logger.close(timeout_s=60)


def _ray_task(spec: RunSpec) -> dict[str, float]:
    # One thread per CPU the task asked for: on a shared box, more threads than CPUs only fight each other.
    torch.set_num_threads(max(1, int(spec.recipe.num_cpus)))
    return execute(spec)


@dataclass
class SweepResult:
    run_id: str  # the parent run of the pretrained model's sweep
    scratch_run_id: str | None
    outcomes: list[RunOutcome]
    metrics: dict[str, dict[str, float]]  # init -> parent metrics
    untracked: list[str] = field(default_factory=list)  # MLflow writes that failed for good (what, and why)

    @property
    def failed(self) -> list[RunOutcome]:
        return [o for o in self.outcomes if o.status == "FAILED"]


def _error_text(exc: BaseException) -> str:
    import ray.exceptions

    cause = exc.cause if isinstance(exc, ray.exceptions.RayTaskError) and exc.cause is not None else exc
    return f"{type(cause).__name__}: {cause}"


# How often a sweep whose runs all stay pending says so.
WAIT_REPORT_S = 600
# How long the driver retries one MLflow write once runs are under way before setting it aside.
TRACKING_RETRY_S = 60.0


class _DriverWrites:
    """The driver's MLflow writes once runs are under way. An MLflow outage may cost tracking, never the sweep or
    its summary: a write is retried for TRACKING_RETRY_S, then set aside and tried again when the sweep ends; what
    still fails is listed in ``lost``. While MLflow is known to be down, later writes are tried once, so that a long
    outage does not stall the driver for the full retry time at every run."""

    def __init__(self) -> None:
        self.set_aside: list[tuple[str, Callable[[], Any]]] = []
        self.lost: list[str] = []
        self.down = False

    def _try(self, what: str, write: Callable[[], Any]) -> Exception | None:
        from pipeline.tracking import is_permanent, retry_transient

        try:
            retry_transient(write, what=what, budget_s=0.0 if self.down else TRACKING_RETRY_S)
        except Exception as exc:
            self.down = not is_permanent(exc)
            return exc
        self.down = False
        return None

    def __call__(self, what: str, write: Callable[[], Any]) -> None:
        if (exc := self._try(what, write)) is not None:
            log.warning("MLflow: could not record %s (%s); the sweep goes on and tries again at its end", what, exc)
            self.set_aside.append((what, write))

    def retry_set_aside(self) -> None:
        self.down = False
        for what, write in self.set_aside:
            if (exc := self._try(what, write)) is not None:
                log.warning("MLflow: %s is not recorded (%s)", what, exc)
                self.lost.append(f"{what}: {type(exc).__name__}: {exc}")
        self.set_aside = []


def resource_needs(specs: list[RunSpec]) -> list[ResourceNeed]:
    """What each run asks of the cluster, with the setting that lowers it, for ``pipeline.cluster.check_resources``."""
    return [
        ResourceNeed(
            asker=f"{s.benchmark}: a run",
            cpus=s.recipe.num_cpus,
            gpus=s.num_gpus,
            cpu_fix=f"lower --set {s.benchmark}.num_cpus",
            gpu_fix="run on a GPU cluster or pass --set num_gpus=0 (CPU fine-tuning)",
        )
        for s in specs
    ]


def _parent_tags(plan: SweepPlan, init: str, label: str) -> dict[str, str]:
    src = plan.source
    return {
        results.ROLE_TAG: results.SWEEP_ROLE,
        results.INIT_TAG: init,
        results.MODEL_LABEL_TAG: label,
        results.PRETRAINED_URI_TAG: src.uri,
        results.PRETRAIN_RUN_TAG: src.pretrain_run_id or "",
        "variant": str(src.spec["variant"]),
        "benchmarks": ",".join(p.benchmark.name for p in plan.benchmarks),
    }


def run_sweep(
    cfg: TransferConfig | None = None, *, plan: SweepPlan | None = None, sets: Sequence[str] = (), **fields: Any
) -> SweepResult:
    """Fine-tune (and few-shot evaluate) one pretrained model on the configured benchmarks; returns the run ids.

    Either pass a TransferConfig or its fields as keywords (plus ``sets``, the ``--set key=value`` strings).
    """
    import ray
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import experiment_id_for

    if cfg is None:
        cfg = plan.cfg if plan is not None else build_config(fields, sets)
    plan = plan if plan is not None else plan_sweep(cfg)  # a caller that printed the plan passes it: checked once
    connect_ray(cfg.ray_address)
    plan = sized_for_the_cluster(plan, ray.cluster_resources())
    specs = plan.specs()
    # Only a local Ray cannot grow; a cluster we joined may have an autoscaler (it warns instead of failing).
    check_resources(resource_needs(specs), can_grow=joins_existing_cluster(cfg.ray_address))

    client = MlflowClient(cfg.tracking_uri)
    exp_id = experiment_id_for(client, cfg.tracking_uri, cfg.experiment)
    parents: dict[str, str] = {}
    for init in plan.inits:
        label = plan.source.label if init == "pretrained" else f"{plan.source.label} (scratch)"
        run = client.create_run(exp_id, run_name=f"transfer {label}", tags=_parent_tags(plan, init, label))
        parents[init] = run.info.run_id
        client.log_param(run.info.run_id, "config", cfg.model_dump_json()[:6000])
    if "scratch" in parents:
        client.set_tag(parents["pretrained"], results.SCRATCH_RUN_TAG, parents["scratch"])
        client.set_tag(parents["scratch"], results.BASELINE_FOR_TAG, parents["pretrained"])

    outcomes: list[RunOutcome] = []
    write = _DriverWrites()
    remote = ray.remote(_ray_task)
    pending: dict[Any, RunSpec] = {}
    submitted: list[RunSpec] = []  # with their MLflow child run ids

    def submit(new: list[RunSpec]) -> None:
        created = [_create_child(client, exp_id, parents[s.init], s) for s in new]
        submitted.extend(created)
        for s in created:
            options = dict(num_cpus=s.recipe.num_cpus, num_gpus=s.num_gpus, max_retries=cfg.max_retries, name=s.name)
            pending[remote.options(**options).remote(s)] = s

    try:
        submit(specs)
        log.info("submitted %d transfer runs to Ray", len(pending))
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=WAIT_REPORT_S)
            if not done:  # e.g. runs waiting for GPUs a fixed-size cluster will never have: keep saying so
                log.warning(
                    "%d transfer runs pending, none finished in the last %d s; the cluster has %s",
                    len(pending),
                    WAIT_REPORT_S,
                    ray.available_resources(),
                )
                continue
            spec = pending.pop(done[0])
            try:
                metrics = ray.get(done[0])
            except Exception as exc:  # the task raised, or its worker died: this run failed, the others go on
                outcome = RunOutcome(spec, "FAILED", error=_error_text(exc))
                tags = {ERROR_TAG: outcome.error[:MAX_TAG_CHARS], "error_detail": str(exc)[-MAX_TAG_CHARS:]}
                write(f"the failure of {spec.name}", _closing(client, spec.run_id, "FAILED", tags))
                log.warning("FAILED %s: %s", spec.name, outcome.error)
            else:
                outcome = RunOutcome(spec, "FINISHED", metrics=metrics)
                write(f"the end of {spec.name}", _closing(client, spec.run_id, "FINISHED"))
                log.info("finished %s: %s", spec.name, _short(metrics))
            outcomes.append(outcome)
            due = _final_runs_due(plan, outcomes, spec)
            try:
                submit(due)
            except Exception as exc:  # e.g. MLflow briefly unreachable: those runs fail, the finished ones count
                for s in due:
                    outcomes.append(RunOutcome(s, "FAILED", error=f"could not start: {_error_text(exc)}"))
                log.warning("could not start the final runs of %s: %s", spec.benchmark, _error_text(exc))
    except BaseException:
        # Interrupted driver: what did not finish is recorded as killed, not left RUNNING forever (one attempt
        # each: the driver is going down, and MLflow may be why).
        finished = {o.spec.run_id for o in outcomes}
        unfinished = [s.run_id for s in submitted if s.run_id and s.run_id not in finished]
        for run_id in [*unfinished, *parents.values()]:
            try:
                client.set_terminated(run_id, "KILLED")
            except Exception as exc:
                log.warning("MLflow: could not mark run %s KILLED (%s)", run_id, exc)
        raise

    summaries = {}
    for init, run_id in parents.items():
        metrics, tags = summarise(outcomes, plan, init)
        mine = [o for o in outcomes if o.spec.init == init]
        all_failed = bool(mine) and all(o.status == "FAILED" for o in mine)
        status = "FAILED" if all_failed else "FINISHED"
        write(f"the summary of the {init} sweep", _closing(client, run_id, status, tags, metrics))
        summaries[init] = metrics
    write.retry_set_aside()  # what an outage made the driver set aside
    return SweepResult(parents["pretrained"], parents.get("scratch"), outcomes, summaries, untracked=write.lost)


def _closing(
    client: Any, run_id: str, status: str, tags: dict[str, str] | None = None, metrics: dict[str, float] | None = None
) -> Callable[[], None]:
    """One idempotent MLflow write: ``tags`` and ``metrics`` (batched within MLflow's limits), then ``status``."""
    from mlflow.entities import Metric, RunTag

    now = int(time.time() * 1000)  # fixed: a retried write repeats the same metric values, which MLflow ignores

    def write() -> None:
        tag_list = [RunTag(k, v) for k, v in (tags or {}).items()]
        metric_list = [Metric(k, float(v), now, 0) for k, v in (metrics or {}).items()]
        for i in range(0, len(tag_list), 100):
            client.log_batch(run_id, tags=tag_list[i : i + 100])
        for i in range(0, len(metric_list), 1000):
            client.log_batch(run_id, metrics=metric_list[i : i + 1000])
        client.set_terminated(run_id, status)

    return write


def gpu_named_by(resources: Mapping[str, float]) -> GpuSpec | None:
    """The GPU a Ray cluster's resources name (Ray adds ``accelerator_type:<model>``, e.g. ``accelerator_type:H100``,
    for the GPUs it detects); with several kinds, the one with the least memory, since a run may land on any."""
    kinds = [detect_gpu(key.split(":", 1)[1]) for key in resources if key.startswith("accelerator_type:")]
    return min((g for g in kinds if g is not None), key=lambda g: g.memory_gib, default=None)


def sized_for_the_cluster(plan: SweepPlan, resources: Mapping[str, float]) -> SweepPlan:
    """With gpu=auto, the micro-batches were sized before Ray for the driver's GPU or an assumed H100; a cluster
    whose resources name another GPU gets them sized again for it (ConfigError if something no longer fits)."""
    named = gpu_named_by(resources) if plan.cfg.gpu == "auto" else None
    if named is None or plan.gpu is None or named.key == plan.gpu.key:
        return plan
    plan = fit_memory(plan, *planning_gpu(plan.cfg, cluster_gpu=named))
    log.info("the Ray cluster's GPUs are %s: micro-batches sized again for them\n%s", named.name, describe_memory(plan))
    return plan


def _final_runs_due(plan: SweepPlan, outcomes: list[RunOutcome], last: RunSpec) -> list[RunSpec]:
    """The final runs of ``last``'s benchmark once its last selection run is in (none if every one failed)."""
    if last.kind != "finetune" or last.stage != "select" or not last.recipe.refit:
        return []
    mine = [
        o
        for o in outcomes
        if o.spec.benchmark == last.benchmark and o.spec.init == last.init and o.spec.kind == "finetune"
    ]
    if sum(o.spec.stage == "select" for o in mine) < plan.selection_runs(last.benchmark):
        return []
    lr = choose_lr(mine, last.recipe.lrs)
    if lr is None:
        return []
    log.info(
        "%s [%s]: learning rate %g chosen on minival; final runs on train + minival", last.benchmark, last.init, lr
    )
    return plan.final_specs(last.benchmark, last.init, lr)


def _create_child(client: Any, exp_id: str, parent_id: str, spec: RunSpec) -> RunSpec:
    from mlflow.entities import Param

    tags = {
        "mlflow.parentRunId": parent_id,
        "benchmark": spec.benchmark,
        "init": spec.init,
        "kind": spec.kind,
    }
    run = client.create_run(exp_id, run_name=spec.name, tags=tags)
    params = [Param(k, str(v)) for k, v in spec.params().items()]
    client.log_batch(run.info.run_id, params=params)
    return replace(spec, run_id=run.info.run_id)


def _short(metrics: dict[str, float]) -> str:
    keys = [k for k in ("minival_accuracy", "test_accuracy", "seconds") if k in metrics]
    keys += [k for k in metrics if k.startswith("fewshot_") and k.endswith("shot")]
    return ", ".join(f"{k}={metrics[k]:.4g}" for k in keys)


def describe_plan(plan: SweepPlan) -> str:
    """A human-readable list of what the sweep will run (printed by the job before submitting)."""
    lines = [f"pretrained: {plan.source.label} ({plan.source.kind}: {plan.source.uri})"]
    for p in plan.benchmarks:
        r = p.recipe
        selection = plan.selection_runs(p.benchmark.name)
        finals = r.seeds if r.refit else 0
        how = f"{selection} + {finals} on train+minival" if selection and finals else str(selection or finals)
        lines.append(
            f"  {p.benchmark.name}: {p.benchmark.num_classes} classes, {r.resolution}px, {r.steps} steps, "
            f"batch {r.batch_size}, lrs {list(r.lrs)}, seeds {r.seeds} -> {how} runs"
            + (" (x2 with scratch)" if "scratch" in plan.inits else "")
        )
        if p.memory:
            lines.append(f"    memory: {p.memory}")
    return "\n".join(lines)


def describe_memory(plan: SweepPlan) -> str:
    return "\n".join(f"  {p.benchmark.name}: {p.memory}" for p in plan.benchmarks if p.memory)
