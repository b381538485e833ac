"""Conversion tasks of ``pipeline.data.ingest`` run as Ray tasks: a local Ray by default, a cluster by address.

The plan (which parts each task reads, how its shards are cut) is made once on the driver and does not depend
on the number of workers, so the shards are identical whether 1 or 1,000 CPUs write them. Each task writes its
shards one by one (each durable on its own, see ``pipeline.data.ingest``); Ray retries a task whose worker died,
and the retry, like a rerun of the whole command, skips the shards already finished. The driver shows a progress
bar (samples, images/s, ETA) fed by the tasks after every shard (Ray streaming generators: no extra process),
and writes the manifest last.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

from tqdm import tqdm

from pipeline.data.ingest import IngestOptions, Task, finish_split, iter_task, plan_tasks, start_split
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


def _convert_task(task: Task, num_classes: int, opts: IngestOptions) -> Iterator[dict[str, Any]]:
    # A Ray streaming generator: each shard's record reaches the driver as soon as the shard is durable.
    yield from iter_task(task, num_classes, opts)


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
    start_split(split, opts)
    start_ray(address, num_cpus)
    remote = ray.remote(num_cpus=1, max_retries=TASK_RETRIES, num_returns="streaming")(_convert_task)
    num_classes = len(source.class_names)
    pending = [remote.remote(task, num_classes, opts) for task in tasks]
    by_name: dict[str, dict[str, Any]] = {}  # keyed by shard name: a retried task may report a shard again
    finished_tasks = written = 0
    bar = _Bar(split, tasks)
    try:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=0.5)
            for generator in ready:
                try:
                    record = ray.get(next(generator))
                except StopIteration:
                    finished_tasks += 1
                    continue
                if record["name"] not in by_name:
                    written += record["samples"]
                by_name[record["name"]] = record
                pending.append(generator)
            bar.update(written, finished_tasks)
    finally:
        bar.close()
    # Shard names sort in plan order (task, then shard within the task), whoever finished first.
    return finish_split(source, split, [by_name[name] for name in sorted(by_name)], opts)
