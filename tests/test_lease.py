"""One writer per run: the run's lease, with real processes holding, racing for and abandoning it."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.config import ConfigError, load_config
from pipeline.pretrain import lease
from pipeline.pretrain.driver import take_lease

REPO = Path(__file__).resolve().parent.parent
HOLD = """
import sys, time
sys.path.insert(0, sys.argv[3])
from pipeline.pretrain import lease
held = lease.acquire(sys.argv[1], ttl_s=float(sys.argv[2]), run_name="r", owner="holder-job")
held.start_heartbeat()
print("HELD", flush=True)
time.sleep(600)
"""


def _hold(run_dir: str, ttl_s: float) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, run_dir, str(ttl_s), str(REPO)], stdout=subprocess.PIPE, text=True, env=os.environ
    )
    assert proc.stdout.readline().strip() == "HELD"
    return proc


@pytest.fixture(params=["file", "gs"])
def run_root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "file":
        return (tmp_path / "runs").as_uri()
    return request.getfixturevalue("gcs_bucket") + "/runs"


@pytest.mark.timeout(120)
def test_a_second_job_is_refused_naming_the_holder_and_a_dead_jobs_lease_is_taken_over_after_expiry(
    run_root: str,
) -> None:
    cfg = load_config("tiny", [f"run.root={run_root}", "run.name=shared", "run.lease_ttl_s=6"])
    plan_dir = f"{run_root}/shared"

    class Plan:  # take_lease reads only these two fields of the RunLayout
        run_dir, run_name = plan_dir, "shared"

    holder = _hold(plan_dir, 6)
    try:
        time.sleep(7)  # past one time to live: only the holder's heartbeat keeps the lease alive
        with pytest.raises(ConfigError) as refused:
            take_lease(cfg, Plan)
        message = str(refused.value)
        assert "run.name=shared" in message and "holder-job" in message and "expires at" in message
    finally:
        holder.send_signal(signal.SIGKILL)  # dies without releasing: the lease stays until it expires
        holder.wait()
    assert lease.read_lease(f"{plan_dir}/{lease.LEASE_FILE}")["owner"] == "holder-job"
    started = time.monotonic()
    while True:
        try:
            mine = take_lease(cfg, Plan)
            break
        except ConfigError:
            assert time.monotonic() - started < 20, "the dead job's lease was never taken over"
            time.sleep(0.5)
    waited = time.monotonic() - started
    try:
        assert lease.read_lease(mine.url)["owner"] == mine.owner
        assert waited <= 6 + 2, waited
    finally:
        mine.release()
    assert lease.read_lease(mine.url) is None
    print(f"taken over {waited:.1f}s after the holder was killed (ttl 6 s)")


def _race(run_dir: str, start_at: float, out: multiprocessing.Queue) -> None:
    time.sleep(max(0.0, start_at - time.time()))
    try:
        held = lease.acquire(run_dir, ttl_s=30, run_name="race")
        out.put(("won", held.owner))
    except lease.LeaseHeldError as exc:
        out.put(("refused", str(exc)))


@pytest.mark.timeout(120)
def test_of_four_jobs_starting_at_once_on_a_shared_filesystem_exactly_one_gets_the_lease(tmp_path: Path) -> None:
    run_dir = (tmp_path / "runs" / "race").as_uri()
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    start_at = time.time() + 5  # after every process has started
    procs = [ctx.Process(target=_race, args=(run_dir, start_at, out)) for _ in range(4)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=60)
    results = [out.get(timeout=5) for _ in procs]
    winners = [owner for verdict, owner in results if verdict == "won"]
    assert len(winners) == 1, results
    assert all(winners[0] in text for verdict, text in results if verdict == "refused"), results


def test_the_same_process_starting_the_run_again_takes_its_own_lease_back(tmp_path: Path) -> None:
    """A run whose release failed (storage down at the end) is resumed by the same process without waiting."""
    run_dir = (tmp_path / "runs" / "again").as_uri()
    first = lease.acquire(run_dir, ttl_s=60, run_name="again")
    second = lease.acquire(run_dir, ttl_s=60, run_name="again")  # first was never released
    assert second.owner == first.owner and lease.read_lease(second.url)["owner"] == first.owner
    second.release()
    assert lease.read_lease(second.url) is None
