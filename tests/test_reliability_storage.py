"""GCS outages at the storage level, injected by a loopback proxy in front of the real GCS emulator.

``pipeline.storage`` reaches GCS through gcsfs with its retry policy (6 attempts, exponential backoff: about
30 s in all). Through ``tests/fixtures/faulty_proxy.py`` these tests check that:
- a few seconds of 503s, dropped connections or reset connections are ridden out, for single reads and for
  a training loader in the middle of an epoch, with no sample lost, repeated or counted as bad;
- 403 and 404 are not retried: they fail on the first request;
- an outage longer than the retry budget fails the loader within bounded time with a storage error, instead of
  passing the rest of the shard off as corrupt data and training on without it.
(The training-level half -- a run that continues through the outage or restarts from its checkpoint -- is in
tests/test_reliability_training.py.)
"""

from __future__ import annotations

import re
import time
from collections import Counter

import pytest

from pipeline import storage
from pipeline.data import DataConfig, build_train_loader
from pipeline.data.config import DataError
from tests.fixtures.faulty_proxy import FaultyProxy
from tests.fixtures.gcs import make_bucket
from tests.test_reliability_data import _good, _tar, write_shard_set

pytestmark = pytest.mark.reliability

# Small read-ahead blocks, so that one shard takes several range requests and an outage can fall mid-shard.
BLOCK = 4096


@pytest.fixture
def proxy(gcs_emulator, monkeypatch):
    """pipeline.storage pointed at GCS through a proxy; the data is written directly, before it is used."""
    import gcsfs

    with FaultyProxy(gcs_emulator.endpoint) as proxy:
        monkeypatch.setenv(storage.EMULATOR_ENV, proxy.url)
        gcsfs.GCSFileSystem.clear_instance_cache()
        yield proxy
    gcsfs.GCSFileSystem.clear_instance_cache()


@pytest.fixture
def shard_set(gcs_emulator) -> tuple[str, list[str], list[str]]:
    """6 shards x 8 samples on the emulator itself: (manifest URL, shard URLs, keys)."""
    tars = [_tar(_good(f"s{i}", range(8)))[0] for i in range(6)]
    manifest, urls = write_shard_set(make_bucket() + "/outage", tars)
    keys = [f"s{i}{j:02d}" for i in range(6) for j in range(8)]
    return manifest, urls, keys


def _timed_read(url: str) -> tuple[bytes | Exception, float]:
    started = time.monotonic()
    try:
        return storage.read_bytes(url), time.monotonic() - started
    except Exception as exc:
        return exc, time.monotonic() - started


@pytest.mark.timeout(90)
@pytest.mark.parametrize("mode", ["503", "drop", "reset"])
def test_a_few_seconds_of_outage_are_ridden_out_by_retries(gcs_emulator, proxy, mode):
    url = make_bucket() + "/object.bin"
    storage.write_bytes(url, b"x" * 5000)
    proxy.outage(mode, seconds=2.5)
    data, seconds = _timed_read(url)
    assert data == b"x" * 5000, data
    assert proxy.counts[mode] >= 1  # the outage was really met, and survived
    assert seconds < 30


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("status", "error"), [("403", PermissionError), ("404", FileNotFoundError)])
def test_forbidden_and_not_found_fail_on_the_first_request(gcs_emulator, proxy, status, error):
    url = make_bucket() + "/object.bin"
    storage.write_bytes(url, b"y")
    proxy.set_mode(status)
    result, seconds = _timed_read(url)
    # gcsfs raises 403 as a plain OSError("Forbidden: ..."); a PermissionError would be as good.
    assert isinstance(result, error) or (status == "403" and isinstance(result, OSError) and "Forbidden" in str(result))
    assert proxy.counts[status] == 1, f"{proxy.counts[status]} requests: a {status} must not be retried"
    assert seconds < 10


def _epoch0(cfg: DataConfig, on_first_batch) -> tuple[Counter, dict]:
    loader = build_train_loader(cfg, batch_size=3, rank=0, world_size=1)
    keys: Counter = Counter()
    for i, batch in enumerate(loader.batches()):
        if i == 0:
            on_first_batch()
        keys.update(k for k, e in zip(batch.keys, batch.epochs, strict=True) if e == 0)
        if batch.epochs[-1] >= 1:
            return keys, loader.stats()
        assert i < 100
    raise AssertionError("unreachable")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["503", "reset"])
def test_a_short_outage_mid_epoch_loses_and_repeats_no_sample(proxy, shard_set, monkeypatch, mode):
    monkeypatch.setattr(storage, "STREAM_BLOCK_SIZE", BLOCK)
    manifest, _, keys = shard_set
    cfg = DataConfig(train=manifest, image_size=8, workers=0, shuffle_buffer=0, seed=5)
    seen, stats = _epoch0(cfg, lambda: proxy.outage(mode, seconds=3))
    assert proxy.counts[mode] >= 1
    assert seen == Counter(keys)
    assert stats["bad_samples"] == 0


@pytest.mark.timeout(150)
def test_an_outage_past_the_retry_budget_fails_the_loader_in_bounded_time_without_skipping_samples(
    proxy, shard_set, monkeypatch
):
    monkeypatch.setattr(storage, "STREAM_BLOCK_SIZE", BLOCK)
    manifest, urls, _ = shard_set
    cfg = DataConfig(train=manifest, image_size=8, workers=0, shuffle_buffer=0, seed=5, max_bad_fraction=1.0)
    loader = build_train_loader(cfg, batch_size=3, rank=0, world_size=1)
    batches = loader.batches()
    next(batches)
    proxy.set_mode("reset")  # for good: mid-shard, the next range read cannot succeed
    started = time.monotonic()
    with pytest.raises((storage.StorageError, DataError)) as raised:
        for _ in range(100):
            next(batches)
    seconds = time.monotonic() - started
    assert isinstance(raised.value, storage.StorageError), f"reported as a data problem: {raised.value}"
    # The documented error: the shard that could not be read, and that none of its samples was skipped.
    documented = r"reading shard (gs://\S+) failed \(.+\); no sample of it was skipped"
    named = re.fullmatch(documented, str(raised.value), re.S)
    assert named and named.group(1) in urls, str(raised.value)
    assert loader.stats()["bad_samples"] == 0  # an outage is not corrupt data
    assert seconds < 100, f"took {seconds:.0f}s to give up"
