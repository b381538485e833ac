"""The Ray Data engine on a local Ray instance: the same shards, reading through gcsfs from the GCS emulator."""

from __future__ import annotations

import io
import tarfile
import threading
from collections import Counter

import pytest
import torch

from pipeline import storage
from pipeline.data import DataConfig, DataError
from pipeline.data.ray_engine import RayTrainLoader, build_ray_dataset
from tests.fixtures.gcs import make_bucket
from tests.test_data_loader import _jpeg, write_set

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def local_ray(gcs_emulator):
    # Started after the emulator fixture so that Ray's workers inherit STORAGE_EMULATOR_HOST.
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


def _run_ranks(cfg: DataConfig, world_size: int, batch_size: int, **dataset_kw) -> list[RayTrainLoader | Exception]:
    """Each simulated rank iterates its streaming split in a thread until its first batch of epoch 1."""
    splits = build_ray_dataset(cfg, **dataset_kw).streaming_split(world_size, equal=True)
    results: list = [None] * world_size

    def consume(rank: int) -> None:
        loader = RayTrainLoader(
            cfg, batch_size=batch_size, rank=rank, world_size=world_size, dataset_shard=splits[rank]
        )
        loader.keys = []
        try:
            for batch in loader.batches():
                assert batch.images.shape == (batch_size, 3, cfg.image_size, cfg.image_size)
                assert batch.images.dtype == torch.uint8 and batch.labels.dtype == torch.int64
                if batch.epochs[0] >= 1:
                    break
                loader.keys += batch.keys
                loader.epoch0_stats = loader.stats()
            results[rank] = loader
        except Exception as exc:
            results[rank] = exc

    threads = [threading.Thread(target=consume, args=(r,)) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    return results


def test_ray_engine_reads_gcs_and_splits_every_sample_once_per_epoch(local_ray):
    url = make_bucket() + "/train"
    keys = write_set(url, shards=4, per_shard=8)  # 32 rows: 16 per rank, 4 batches of 4
    cfg = DataConfig(train=f"{url}/train.manifest.json", image_size=8, engine="ray", shuffle_buffer=0)
    loaders = _run_ranks(cfg, world_size=2, batch_size=4)
    for loader in loaders:
        assert not isinstance(loader, Exception), loader
    seen = Counter(k for loader in loaders for k in loader.keys)
    assert seen == Counter(keys)
    assert loaders[0].stats()["epoch"] == 1 and loaders[0].state_dict()["epoch"] == 1


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture(scope="module")
def bad_set(local_ray, tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("raybad")
    good = [m for i in range(7) for m in ((f"g{i}.jpg", _jpeg(i)), (f"g{i}.cls", b"1"))]
    (root / "train-000000.tar").write_bytes(_tar([*good, ("bad.jpg", b"nope"), ("bad.cls", b"0")]))
    (root / "train-000001.tar").write_bytes(_tar([("h0.jpg", _jpeg(1)), ("h0.cls", b"0"), ("nolabel.jpg", _jpeg(2))]))
    return f"file://{root}/train-{{000000..000001}}.tar"


def test_ray_engine_counts_bad_samples_like_the_worker_engine(bad_set):
    cfg = DataConfig(train=bad_set, image_size=8, engine="ray", shuffle_buffer=0, max_bad_fraction=0.5)
    (loader,) = _run_ranks(cfg, world_size=1, batch_size=2)
    assert not isinstance(loader, Exception), loader
    base = storage.check_url(bad_set).split("train-")[0]
    assert loader.epoch0_stats["bad_by_shard"] == {f"{base}train-000000.tar": 1, f"{base}train-000001.tar": 1}
    assert "bad" not in loader.keys and "nolabel" not in loader.keys


def test_ray_engine_strict_mode_raises(bad_set):
    cfg = DataConfig(train=bad_set, image_size=8, engine="ray", shuffle_buffer=0, strict=True)
    (result,) = _run_ranks(cfg, world_size=1, batch_size=2)
    assert isinstance(result, DataError) and "data.strict=true" in str(result)
