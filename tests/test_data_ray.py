"""The Ray Data engine on a local Ray instance: the same shards, reading through gcsfs from the GCS emulator."""

from __future__ import annotations

import io
import tarfile
import threading
from collections import Counter

import numpy as np
import pytest
import torch

from pipeline import storage
from pipeline.data import DataConfig, DataError
from pipeline.data import shards as shardlib
from pipeline.data.ray_engine import RayTrainLoader, build_ray_dataset, decode_kwargs
from pipeline.data.ray_read import TASK_MIN_BYTES, block_rows, decode_shards, shard_groups
from pipeline.data.shardsets import resolve
from pipeline.data.transforms import eval_transform
from tests.fixtures.gcs import make_bucket
from tests.test_data_loader import _jpeg, write_set

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def local_ray(gcs_emulator):
    # A process holds one Ray connection: when an earlier file of this test process connected it to the session's
    # Ray head (``ray_connected``), that connection is set aside here and restored after.
    session_head = ray.get_runtime_context().gcs_address if ray.is_initialized() else None
    if session_head:
        ray.shutdown()
    # Started after the emulator fixture so that Ray's workers inherit STORAGE_EMULATOR_HOST.
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()
    if session_head:
        from pipeline.cluster import connect_ray

        connect_ray(session_head)


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


def test_small_shards_are_read_in_groups_of_enough_bytes_spread_over_the_cpus():
    urls = [f"file:///set/train-{i:06d}.tar" for i in range(40)]
    small = TASK_MIN_BYTES / 8
    groups = shard_groups(urls, shard_bytes=small, min_tasks=2)
    assert [len(g) for g in groups] == [8] * 5 and [u for g in groups for u in g] == urls
    # Fewer shards than a group would hold: still one task per CPU of the cluster.
    assert shard_groups(urls[:8], shard_bytes=small, min_tasks=4) == [urls[0:2], urls[2:4], urls[4:6], urls[6:8]]
    assert shard_groups(urls[:3], shard_bytes=TASK_MIN_BYTES * 16, min_tasks=1) == [[u] for u in urls[:3]]


def test_read_tasks_shuffle_each_shard_and_fill_channels_first_blocks(tmp_path):
    url = f"file://{tmp_path}/set"
    keys = write_set(url, shards=2, per_shard=40)
    urls, manifest = resolve(f"{url}/train.manifest.json")
    train_cfg = DataConfig(train=url, image_size=8, engine="ray", shuffle_buffer=40)
    blocks = list(decode_shards({"urls": [urls]}, **decode_kwargs(train_cfg, manifest, train=True)))
    assert block_rows(8) > 80 and len(blocks) == 1  # both shards of the task in one block
    (block,) = blocks
    assert block["image"].shape == (80, 3, 8, 8) and block["image"].dtype == np.uint8
    read = block["key"].tolist()
    # Every sample once, each shard's samples together and in an order of their own (1 in 40! to be in order).
    assert sorted(read) == keys and sorted(read[:40]) == keys[:40] and read[:40] != keys[:40]
    assert list(block["url"]) == [urls[0]] * 40 + [urls[1]] * 40 and set(block["error"]) == {""}

    eval_cfg = DataConfig(train=url, image_size=8, engine="ray", shuffle_buffer=40)
    (unshuffled,) = decode_shards({"urls": [urls[:1]]}, **decode_kwargs(eval_cfg, manifest, train=False))
    assert unshuffled["key"].tolist() == keys[:40]
    first = next(iter(shardlib.iter_shard(urls[0], None)))
    assert np.array_equal(unshuffled["image"][0], eval_transform(first.image, 8).permute(2, 0, 1).numpy())


class _Blocks:
    """What ``streaming_split`` hands a rank, reduced to the call the loader makes: the same blocks every epoch."""

    def __init__(self, blocks: list[dict[str, np.ndarray]]) -> None:
        self.blocks = blocks

    def iter_batches(self, *, batch_size: None, batch_format: str):
        assert batch_size is None and batch_format == "numpy"
        return iter(self.blocks)


def _block(keys: list[str], errors: list[str]) -> dict[str, np.ndarray]:
    n = len(keys)
    return {
        "image": np.stack([np.full((3, 8, 8), int(k[1:]), np.uint8) for k in keys]),
        "label": np.array([int(k[1:]) % 3 for k in keys], np.int64),
        "key": np.array(keys, dtype=object),
        "url": np.array(["file:///set/train-000000.tar"] * n, dtype=object),
        "error": np.array(errors, dtype=object),
    }


def test_batches_cut_across_blocks_and_epochs_repeat_the_previous_good_row_for_a_bad_one(tmp_path):
    url = f"file://{tmp_path}/set"
    write_set(url, shards=1, per_shard=4)
    cfg = DataConfig(train=f"{url}/train.manifest.json", image_size=8, engine="ray", max_bad_fraction=0.9)
    blocks = [_block(["k1", "k2", "k3"], ["bad", "", "bad"]), _block(["k4", "k5"], ["bad", ""])]
    loader = RayTrainLoader(cfg, batch_size=3, rank=0, world_size=1, dataset_shard=_Blocks(blocks))
    batches = loader.batches()
    first, second = next(batches), next(batches)
    # Epoch 0 gives k2 k2 k2 k5: k1 is bad with no good row before it (left out), k2 stands in for k3 and k4.
    assert first.keys == ["k2", "k2", "k2"] and first.epochs == [0, 0, 0]
    assert first.images.shape == (3, 3, 8, 8) and first.images[:, 0, 0, 0].tolist() == [2, 2, 2]
    assert first.labels.tolist() == [2, 2, 2] and first.bad_by_shard == {"file:///set/train-000000.tar": 3}
    # The last row of epoch 0 opens the next batch; epoch 1 has no good row before its k1 either.
    assert second.keys == ["k5", "k2", "k2"] and second.epochs == [0, 1, 1]
    assert second.images[:, 0, 0, 0].tolist() == [5, 2, 2] and second.bad_by_shard == {
        "file:///set/train-000000.tar": 2
    }
    assert loader.stats()["bad_samples"] == 5 and loader.state_dict()["epoch"] == 1
