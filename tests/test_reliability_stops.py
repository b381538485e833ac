"""Which errors stop a run for good (``pipeline.pretrain.stops``), read through the real loader on the GCS emulator.

A shard storage refuses (HTTP 403 through tests/fixtures/faulty_proxy.py), read by a DataLoader worker process as a
training rank reads it, must become a permanent data error naming the shard: recorded on the run's storage so that
Ray's restarts refuse to train, lifted by a resubmission. The run-level proof (jobs/pretrain.py on a Ray head, a
garbage shard, one attempt instead of max_failures + 1) is in tests/test_reliability_training.py, and so is the
transient side: an endless outage fails the run with a StorageError and leaves no stop record.
"""

from __future__ import annotations

import re

import pytest

from pipeline import storage
from pipeline.data import DataConfig, build_train_loader
from pipeline.pretrain import stops
from tests.fixtures.gcs import make_bucket
from tests.test_reliability_data import _good, _tar, write_shard_set
from tests.test_reliability_storage import proxy  # noqa: F401 (a fixture)

pytestmark = pytest.mark.reliability


@pytest.mark.timeout(120)
def test_a_shard_storage_refuses_stops_the_run_for_good_naming_it_until_resubmitted(gcs_emulator, proxy, tmp_path):  # noqa: F811
    tars = [_tar(_good(f"s{i}", range(4)))[0] for i in range(2)]
    manifest, urls = write_shard_set(make_bucket() + "/refused", tars)
    run_dir = (tmp_path / "refused").as_uri()  # the run's storage answers; only the data's bucket refuses
    cfg = DataConfig(train=manifest, image_size=8, workers=1, shuffle_buffer=0)
    loader = build_train_loader(cfg, batch_size=2, rank=0, world_size=1)  # reads the manifest before the 403s
    proxy.set_mode("403")
    with pytest.raises(stops.PermanentDataError) as stopped, stops.stopping_on_bad_data(run_dir, "refused"):
        next(loader.batches())
    proxy.set_mode("pass")
    # The DataLoader worker's error arrives wrapped in its traceback; the user reads the loader's own message.
    either = "|".join(re.escape(url) for url in urls)
    shown = rf"shard ({either}) cannot be read: access denied \(Forbidden: "
    assert re.match(rf"run refused stopped on data no restart can read: {shown}", str(stopped.value)), stopped.value
    assert "Traceback" not in str(stopped.value)
    assert str(stopped.value).endswith("it resumes from the last complete checkpoint")
    # A restarted worker refuses at setup with the same message; the driver reports it for a failure that names it.
    with pytest.raises(stops.PermanentDataError) as refused:
        stops.check_not_stopped(run_dir)
    assert str(refused.value) == str(stopped.value)
    assert str(stops.recorded_stop(run_dir, RuntimeError(f"WorkerGroupError: ... {refused.value!r}"))) == str(
        refused.value
    )
    # Any other failure is not looked up (a storage outage would make the lookup wait out its retries).
    assert stops.recorded_stop(run_dir, storage.StorageError("reading shard ... failed")) is None
    stops.lift_stop(run_dir)  # what a resubmission does first
    stops.check_not_stopped(run_dir)
