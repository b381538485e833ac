"""Bounded waits: a hung bucket fails a storage call, and a dead peer fails a collective, within a known bound.

- Storage: the GCS emulator behind ``tests/fixtures/faulty_proxy.py`` in mode ``hang`` (connections accepted, requests
  read, never answered); ``pipeline.storage`` with a 1 s request timeout must raise within
  ``storage.worst_case_call_s()`` (6 attempts x 1 s + gcsfs's backoff).
- Collectives: two real gloo ranks joined by the local launcher's ``LocalWorkerContext`` with a 3 s collective
  timeout; rank 1 is SIGKILLed (its connections close: gloo notices at once) or SIGSTOPped (a partitioned or frozen
  peer: its connections stay open and only the timeout ends the wait), and rank 0's next all-reduce must raise
  within the timeout (plus slack for a busy machine) instead of waiting 30 minutes.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import time

import pytest

from pipeline import storage
from tests.fixtures.faulty_proxy import FaultyProxy
from tests.fixtures.gcs import make_bucket

COLLECTIVE_TIMEOUT_S = 3.0


@pytest.fixture
def hung_storage(gcs_emulator, monkeypatch):
    """pipeline.storage reaching the emulator through the proxy, with a 1 s request timeout."""
    import gcsfs

    with FaultyProxy(gcs_emulator.endpoint) as proxy:
        monkeypatch.setenv(storage.EMULATOR_ENV, proxy.url)
        gcsfs.GCSFileSystem.clear_instance_cache()
        storage.set_request_timeout(1.0)
        yield proxy
        storage.set_request_timeout(storage.DEFAULT_REQUEST_TIMEOUT_S)
    gcsfs.GCSFileSystem.clear_instance_cache()


@pytest.mark.timeout(120)
def test_a_hung_bucket_fails_a_storage_call_within_the_documented_bound(hung_storage) -> None:
    url = make_bucket() + "/object.bin"
    storage.write_bytes(url, b"x" * 5000)
    assert storage.read_bytes(url) == b"x" * 5000  # the path through the proxy works
    hung_storage.set_mode("hang")
    started = time.monotonic()
    with pytest.raises(Exception) as failure:
        storage.read_bytes(url)
    waited = time.monotonic() - started
    print(f"hung bucket: {type(failure.value).__name__} after {waited:.1f} s")
    assert hung_storage.counts["hang"] >= 1  # the request really met the hung server
    assert waited < storage.worst_case_call_s() + 5, waited  # + 5 s for a busy machine


def _rank(rank: int, port: int, out: multiprocessing.Queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK="0")
    import torch
    import torch.distributed as dist

    from pipeline.pretrain.launch import LocalWorkerContext

    context = LocalWorkerContext.start(on_gpu=False, collective_timeout_s=COLLECTIVE_TIMEOUT_S)
    value = torch.ones(4)
    dist.all_reduce(value)  # both ranks are alive: this one completes
    out.put(("ready", rank, os.getpid(), float(value[0])))
    if rank == 1:
        time.sleep(600)  # until the test kills it
    time.sleep(1.0)  # the test SIGKILLs rank 1 meanwhile
    started = time.monotonic()
    try:
        dist.all_reduce(value)
        out.put(("completed", rank, time.monotonic() - started, ""))
    except Exception as exc:
        out.put(("raised", rank, time.monotonic() - started, f"{type(exc).__name__}: {exc}"[:300]))
    context.close()


@pytest.mark.timeout(400)
@pytest.mark.parametrize("how", ["SIGKILL", "SIGSTOP"])
def test_a_dead_or_frozen_peer_fails_the_next_collective_within_the_collective_timeout(how: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("spawn")
    # One queue per rank: a queue's lock is shared by its writers, and a rank stopped while holding it would
    # block the other's report.
    queues = [ctx.Queue(), ctx.Queue()]
    procs = [ctx.Process(target=_rank, args=(rank, port, queues[rank])) for rank in (0, 1)]
    for proc in procs:
        proc.start()
    try:
        ready = {rank: (pid, total) for _, rank, pid, total in (q.get(timeout=300) for q in queues)}
        assert ready[0][1] == ready[1][1] == 2.0  # the group worked before the kill
        os.kill(ready[1][0], getattr(signal, how))
        outcome, rank, waited, error = queues[0].get(timeout=60)
    finally:
        procs[1].kill()  # a stopped rank 1 would never exit by itself
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
    print(f"{how} peer: rank 0's all-reduce {outcome} after {waited:.1f} s ({error})")
    assert (outcome, rank) == ("raised", 0), error
    assert waited < COLLECTIVE_TIMEOUT_S + 10, waited  # + 10 s for a busy machine
