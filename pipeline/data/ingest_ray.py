"""Conversion tasks of ``pipeline.data.ingest`` run as Ray tasks: a local Ray by default, a cluster by address.

The plan (which parts each task reads, how its shards are cut) is made once on the driver and does not depend
on the number of workers, so the shards are identical whether 1 or 1,000 CPUs write them. Each task writes its
shards one by one (each durable on its own, see ``pipeline.data.ingest``); Ray retries a task whose worker died,
and the retry, like a rerun of the whole command, skips the shards already finished. The driver shows a progress
bar (samples, images/s, ETA) fed by the tasks after every shard, and writes the manifest last.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

from tqdm import tqdm

from pipeline import storage
from pipeline.data import shards
from pipeline.data.ingest import IngestOptions, Task, manifest_for, plan_tasks, run_task
from pipeline.data.sources import Source

log = logging.getLogger(__name__)

TASK_RETRIES = 3


def start_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join the cluster at ``address`` / $RAY_ADDRESS (or the one a ``ray job submit`` runs in), else start a local
    Ray with ``num_cpus`` CPUs (default: all of this machine's)."""
    import ray

    from pipeline.cluster import connect_ray, joins_existing_cluster
    from pipeline.config import REPO_ROOT

    if ray.is_initialized():
        return
    if joins_existing_cluster(address):
        connect_ray(address)
        return
    # A local Ray's workers run on this machine: the code is found on PYTHONPATH, nothing is uploaded.
    path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    ray.init(num_cpus=num_cpus, runtime_env={"env_vars": {"PYTHONPATH": path}}, log_to_driver=True)


def _progress_actor():
    import ray

    @ray.remote(num_cpus=0)
    class Progress:
        """Samples written so far, reported by the tasks after each shard."""

        def __init__(self) -> None:
            self.samples = 0

        def add(self, samples: int) -> None:
            self.samples += samples

        def total(self) -> int:
            return self.samples

    return Progress.remote()


def _convert_task(task: Task, num_classes: int, opts: IngestOptions, progress: Any) -> list[dict[str, Any]]:
    return run_task(task, num_classes, opts, on_progress=lambda n: progress.add.remote(n))


class _Bar:
    """samples, images/s and ETA; the ETA counts samples when every part knows its size, else finished tasks."""

    def __init__(self, split: str, tasks: list[Task]) -> None:
        sizes = [p.size for t in tasks for p in t.parts]
        self.total = sum(sizes) if all(s is not None for s in sizes) else None  # type: ignore[misc]
        self.tasks = len(tasks)
        self.start = time.monotonic()
        self.bar = tqdm(total=self.total, desc=split, unit="img", file=sys.stderr, dynamic_ncols=True)

    def update(self, samples: int, finished_tasks: int) -> None:
        self.bar.update(samples - self.bar.n)
        if self.total is None and finished_tasks:
            elapsed = time.monotonic() - self.start
            eta = elapsed * (self.tasks - finished_tasks) / finished_tasks
            self.bar.set_postfix_str(
                f"tasks {finished_tasks}/{self.tasks}, ETA {time.strftime('%H:%M:%S', time.gmtime(eta))}"
            )

    def close(self) -> None:
        self.bar.close()


def convert_split_ray(
    source: Source, split: str, opts: IngestOptions, *, address: str | None = None, num_cpus: int | None = None
) -> dict[str, Any]:
    """Convert one split with one Ray task per planned task; returns the manifest (written last)."""
    import ray

    tasks = plan_tasks(source, split, opts)
    manifest_url = storage.join(opts.out, shards.manifest_name(split))
    if storage.exists(manifest_url):
        storage.remove(manifest_url)  # incomplete from here until the new manifest is written
    start_ray(address, num_cpus)
    progress = _progress_actor()
    remote = ray.remote(num_cpus=1, max_retries=TASK_RETRIES)(_convert_task)
    num_classes = len(source.class_names)
    refs = [remote.remote(task, num_classes, opts, progress) for task in tasks]
    results: dict[Any, list[dict[str, Any]]] = {}
    bar = _Bar(split, tasks)
    try:
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=len(pending), timeout=0.5)
            for ref in done:
                results[ref] = ray.get(ref)
            bar.update(ray.get(progress.total.remote()), len(results))
    finally:
        bar.close()
    records = [record for ref in refs for record in results[ref]]  # plan order, whoever finished first
    manifest = manifest_for(source, split, records, opts)
    storage.write_json(manifest_url, manifest)
    log.info("%s: %d samples in %d shards -> %s", split, manifest["num_samples"], len(manifest["shards"]), manifest_url)
    return manifest
