"""Multi-label data end to end: a Parquet snapshot with a list-of-classes column, converted to shards, read by the
real loaders as multi-hot targets [B, K], refused at pre-flight with the softmax loss, and trained with the sigmoid
loss by the pretraining Trainer (local launcher, in this process)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest
import torch
from test_ingest_sources import _digit_pngs, _hf_metadata, _write_parquet

from pipeline.config import ConfigError, load_config
from pipeline.data import DataConfig, build_eval_loader, build_train_loader
from pipeline.data import loader as loader_module
from pipeline.data.ingest import IngestOptions, convert_split
from pipeline.data.parquet import parquet_source

CLASSES = ["a", "b", "c", "d"]


def _label_lists(count: int) -> list[list[int]]:
    return [[i % 4, (i + 1) % 4] if i % 3 else [i % 4] for i in range(count)]


@pytest.fixture(scope="module")
def multi_label_shards(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, list[int]]]:
    """Manifest URL of 64 digit images with one or two of 4 classes each, in 4 shards; and {key: labels}."""
    root = tmp_path_factory.mktemp("multi")
    pngs, _, _ = _digit_pngs()
    labels = _label_lists(64)
    feature = {"_type": "Sequence", "feature": {"_type": "ClassLabel", "names": CLASSES}}
    _write_parquet(
        root / "s" / "train" / "0000.parquet", pngs[:64], labels, pa.list_(pa.int64()), _hf_metadata(feature)
    )
    convert_split(
        parquet_source(str(root / "s")), "train", IngestOptions(out=(root / "out").as_uri(), samples_per_shard=16)
    )
    return (root / "out" / "train.manifest.json").as_uri(), {f"0000_{i:08d}": labels[i] for i in range(64)}


def _multi_hot(labels: list[int]) -> list[int]:
    return [1 if c in labels else 0 for c in range(len(CLASSES))]


def test_loaders_give_multi_hot_targets_of_the_fixture_labels(multi_label_shards):
    url, expected = multi_label_shards
    train = build_train_loader(DataConfig(train=url, image_size=16, workers=0), batch_size=8, rank=0, world_size=1)
    batches = train.batches()
    for _ in range(8):  # one epoch
        batch = next(batches)
        assert batch.labels.shape == (8, 4) and batch.labels.dtype == torch.uint8
        for key, row in zip(batch.keys, batch.labels.tolist(), strict=True):
            assert row == _multi_hot(expected[key])
    seen = {}
    for batch in build_eval_loader(url, image_size=16, batch_size=16, crop_fraction=None).batches():
        seen.update(zip(batch.keys, batch.labels.tolist(), strict=True))
    assert seen == {key: _multi_hot(labels) for key, labels in expected.items()}


def _overrides(url: str, root: Path, *extra: str) -> list[str]:
    return [
        f"data.train={url}",
        f"run.root={root.as_uri()}",
        "run.name=multi",
        "scale.launcher=local",
        "scale.workers=1",
        "train.global_batch=16",
        "train.micro_batch=8",
        "train.steps=3",
        "optim.warmup_steps=1",
        "checkpoint.every_steps=100",
        "tracking.enabled=false",
        *extra,
    ]


def test_a_multi_label_manifest_with_the_softmax_loss_is_refused_at_pre_flight(multi_label_shards, tmp_path):
    from pipeline.pretrain import check_before_launch

    with pytest.raises(ConfigError, match=r"multi-label.*--set train\.loss=sigmoid"):
        check_before_launch(load_config("tiny", _overrides(multi_label_shards[0], tmp_path, "train.loss=softmax")))


@pytest.mark.slow
def test_tiny_pretrains_on_multi_label_shards_with_the_sigmoid_loss(multi_label_shards, tmp_path, monkeypatch):
    from pipeline.pretrain import check_before_launch
    from pipeline.pretrain.driver import run_local

    url, expected = multi_label_shards
    delivered: list[tuple[list[str], torch.Tensor]] = []
    real_batches = loader_module.TrainLoader.batches

    def recorded(self):  # what the loader hands the Trainer, passed through unchanged
        for batch in real_batches(self):
            delivered.append((batch.keys, batch.labels.clone()))
            yield batch

    monkeypatch.setattr(loader_module.TrainLoader, "batches", recorded)
    cfg = load_config("tiny", _overrides(url, tmp_path, "train.loss=sigmoid"))
    plan = check_before_launch(cfg)
    assert plan.num_classes == 4
    result = run_local(cfg, plan)
    assert result.status == "finished" and result.step == 3
    assert len(delivered) >= 6  # 3 steps x 2 micro-batches
    for keys, labels in delivered:
        assert labels.shape == (8, 4)
        assert labels.tolist() == [_multi_hot(expected[key]) for key in keys]
