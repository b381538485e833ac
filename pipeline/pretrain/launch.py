"""How the worker processes of a pretraining run are started, and what each one is told about itself.

``scale.launcher`` picks one of two launchers; both run the same ``trainer.Trainer``:

- ``ray`` (the default): Ray Train starts ``scale.workers`` workers and makes their process group
  (``driver._torch_trainer``); ``RayWorkerContext`` hands each one its rank, device and result channel.
- ``local``: this process is one rank. Run plainly it is a world of one (e.g. under a debugger, or on a machine
  without Ray); under ``torchrun --nproc-per-node N`` each process is one of N ranks, as torchrun's environment
  (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) says. ``LocalWorkerContext`` makes the process
  group. Rank 0 also does the driver's part (the MLflow run, the divergence marker): ``driver.run_local``.

Neither launcher hands the worker a checkpoint: a worker (re)starts from the run's latest complete checkpoint on
storage (``Trainer.find_checkpoint``), which covers Ray Train's restarts, resubmissions and torchrun restarts alike.
Nothing here imports Ray unless the Ray launcher is used.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from pipeline.config import PretrainConfig


class WorkerContext(Protocol):
    """What a launcher tells a worker about itself, and how the worker hands back its result."""

    rank: int
    world_size: int
    device: torch.device

    def report(self, metrics: dict[str, Any], pointer: dict[str, Any] | None) -> None:
        """The worker's final metrics; ``pointer`` (rank 0 only) says where its checkpoint and export are."""
        ...


@dataclass
class RayWorkerContext:
    """A Ray Train worker: rank and device from Ray Train's context; results through ``ray.train.report``."""

    rank: int
    world_size: int
    device: torch.device

    @classmethod
    def current(cls) -> RayWorkerContext:
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        return cls(context.get_world_rank(), context.get_world_size(), ray.train.torch.get_device())

    def report(self, metrics: dict[str, Any], pointer: dict[str, Any] | None) -> None:
        import ray.train

        # Ray Train hands the driver only metrics that come with a checkpoint: rank 0 reports a small one that
        # points at the real checkpoint and export on storage.
        with tempfile.TemporaryDirectory(prefix="vitpipe-pointer-") as tmp:
            checkpoint = None
            if pointer is not None:
                (Path(tmp) / "pointer.json").write_text(json.dumps(pointer))
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint)


@dataclass(frozen=True)
class LocalWorld:
    """This process's place in a local (plain or torchrun) world, as the environment says."""

    rank: int
    world_size: int
    local_rank: int

    @classmethod
    def from_env(cls) -> LocalWorld:
        return cls(
            rank=int(os.environ.get("RANK", "0")),
            world_size=int(os.environ.get("WORLD_SIZE", "1")),
            local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        )


def check_local_world(cfg: PretrainConfig) -> list[str]:
    """The config's worker count against the local world (before any work starts); [] for the Ray launcher."""
    if cfg.scale.launcher != "local":
        return []
    world = LocalWorld.from_env()
    if world.world_size == cfg.scale.workers:
        return []
    started = "torchrun started" if "TORCHELASTIC_RUN_ID" in os.environ or world.world_size > 1 else "this is"
    return [
        f"scale.workers={cfg.scale.workers} but {started} a world of {world.world_size} process(es) "
        f"(scale.launcher=local): --set scale.workers={world.world_size}, or start "
        f"`torchrun --nproc-per-node {cfg.scale.workers} jobs/pretrain.py ...`"
    ]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LocalWorkerContext:
    """One rank of a local world: makes (and later destroys) the process group; keeps the reported result."""

    rank: int
    world_size: int
    device: torch.device
    result: dict[str, Any] = field(default_factory=dict)
    pointer: dict[str, Any] | None = None
    saved_env: dict[str, str | None] = field(default_factory=dict)  # what start() replaced, put back by close()

    @classmethod
    def start(cls, on_gpu: bool, collective_timeout_s: float = 600.0) -> LocalWorkerContext:
        """Join the local world; a collective that waits longer than ``collective_timeout_s`` for a peer (dead or
        partitioned) raises instead of hanging (``scale.collective_timeout_s``)."""
        world = LocalWorld.from_env()
        saved_env: dict[str, str | None] = {}
        if world.world_size == 1:
            # A plain process: the rendezvous torchrun would have set up, on loopback. DeepSpeed reads these too.
            # They are put back on close: a process that trains in-process twice (or starts a subprocess after)
            # must not inherit a port whose store may still be listening.
            own = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
            own["MASTER_ADDR"] = os.environ.get("MASTER_ADDR", "127.0.0.1")
            own["MASTER_PORT"] = os.environ.get("MASTER_PORT") or str(_free_port())
            saved_env = {name: os.environ.get(name) for name in own}
            os.environ.update(own)
        if on_gpu:
            device = torch.device("cuda", world.local_rank)
            torch.cuda.set_device(device)
        else:
            device = torch.device("cpu")
        if not dist.is_initialized():
            dist.init_process_group(
                "nccl" if on_gpu else "gloo",
                rank=world.rank,
                world_size=world.world_size,
                init_method="env://",
                timeout=datetime.timedelta(seconds=collective_timeout_s),
            )
        return cls(world.rank, world.world_size, device, saved_env=saved_env)

    def report(self, metrics: dict[str, Any], pointer: dict[str, Any] | None) -> None:
        self.result, self.pointer = dict(metrics), pointer

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
        for name, value in self.saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextmanager
def local_worker(on_gpu: bool, collective_timeout_s: float = 600.0) -> Iterator[LocalWorkerContext]:
    context = LocalWorkerContext.start(on_gpu, collective_timeout_s)
    try:
        yield context
    finally:
        context.close()
