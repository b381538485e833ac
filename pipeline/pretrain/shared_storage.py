"""The run's storage (``run.root``) is the one truth every node of the cluster shares.

- ``ray_storage``: where Ray Train keeps its own run state (``RunConfig.storage_path`` / ``storage_filesystem``):
  under the run directory, on the same storage as the checkpoints -- never a node's ``~/ray_results``, which the
  other nodes cannot read (Ray Train then fails the run at its first reported checkpoint).
- ``check_shared_root``: a ``file://`` run root is a node-local disk unless the config says otherwise; on a
  cluster of several nodes each node would write its own checkpoints there and resume from its own, so the
  driver refuses it before any worker starts. ``check_shared_tracking`` does the same for a local MLflow store
  (the default ``sqlite:///~/.vitpipe/runs/mlflow.db``): rank 0 logs the metrics from whichever node it lands on.
- ``agreed_checkpoint``: rank 0 alone chooses the checkpoint to resume from and every rank loads that one, so no
  two ranks can resume from different steps (a checkpoint completed between two ranks' listings, or node-local
  leftovers).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch.distributed as dist

from pipeline import storage
from pipeline.pretrain import checkpoints as ckpt


def ray_storage(run_dir: str) -> tuple[str, Any]:
    """``(storage_path, storage_filesystem)`` for Ray Train's ``RunConfig``: ``<run_dir>/ray`` on the run's storage."""
    filesystem, path = storage.arrow_filesystem(storage.join(run_dir, "ray"))
    return path, filesystem


def nodes_for_workers(nodes: Iterable[Mapping[str, Any]]) -> list[str]:
    """Addresses of the alive Ray nodes (``ray.nodes()``) that can host a training worker (any CPU or GPU)."""
    return sorted(
        str(node.get("NodeManagerAddress", "?")) + ":" + str(node.get("NodeManagerPort", "?"))
        for node in nodes
        if node.get("Alive")
        and (node.get("Resources", {}).get("CPU", 0) > 0 or node.get("Resources", {}).get("GPU", 0) > 0)
    )


def check_shared_root(run_root: str, shared_filesystem: bool, nodes: Iterable[Mapping[str, Any]]) -> list[str]:
    """The problem (if any) with a ``file://`` run root on a cluster of several nodes that can host workers."""
    if storage.local_path(run_root) is None or shared_filesystem:
        return []
    hosts = nodes_for_workers(nodes)
    if len(hosts) <= 1:
        return []
    return [
        f"run.root: {run_root} is a local path and the Ray cluster has {len(hosts)} nodes that can run workers: each "
        "node would write and resume its own checkpoints. Use shared storage (--set run.root=gs://<bucket>/runs), "
        "or, when that path is a filesystem every node mounts (NFS, Filestore), say so with "
        "--set run.shared_filesystem=true"
    ]


def check_shared_tracking(
    tracking_uri: str, enabled: bool, shared_filesystem: bool, nodes: Iterable[Mapping[str, Any]]
) -> list[str]:
    """The problem (if any) with a local MLflow store (SQLite or a ``file:`` directory) on a cluster of several nodes.

    The driver opens the MLflow run, but rank 0 logs its metrics, from whichever node Ray places it on: a local
    store there is another node's file, which holds no such run, so every metric of the run would be lost."""
    local = tracking_uri.startswith(("sqlite:", "file:")) or "://" not in tracking_uri
    if not enabled or not local or shared_filesystem:
        return []
    hosts = nodes_for_workers(nodes)
    if len(hosts) <= 1:
        return []
    return [
        f"tracking.uri: {tracking_uri} is a local MLflow store and the Ray cluster has {len(hosts)} nodes that can "
        "run workers: rank 0 logs from its own node, where that store does not hold this run. Use the cluster's "
        "MLflow server (--set tracking.uri=http://<mlflow-host>:5000, or MLFLOW_TRACKING_URI in the job's env), "
        "--set tracking.enabled=false, or, when that path is on a filesystem every node mounts, "
        "--set run.shared_filesystem=true"
    ]


def agreed_checkpoint(checkpoint_dir: str, *, rank: int) -> ckpt.CheckpointRef | None:
    """The latest complete checkpoint as rank 0 sees it, on every rank (collective when a process group is up)."""
    choice: list[ckpt.CheckpointRef | None] = [None]
    if rank == 0:
        choice[0] = ckpt.latest_complete(checkpoint_dir)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(choice, src=0)
    return choice[0]
