"""Transfer numbers checked exactly, in-process (no Ray, no MLflow), on tiny real digits shards.

- ``predict`` returns the split's labels in stored order (read back from the tar files themselves), one
  prediction per image whatever the batch size, and predictions that are the model's own;
- a few-shot run (``execute``, which embeds only the drawn shots) gives, seed by seed, exactly the accuracies and
  regularisers of the few-shot evaluator run on features extracted from the whole splits by the same model.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

import model as vit_model
from pipeline.config.transfer import build_config
from pipeline.data import build_eval_loader
from pipeline.data.prepare import PrepareOptions, prepare
from pipeline.export import save_exported_model
from pipeline.linear_probe import fewshot_eval
from pipeline.transfer.fewshot import extract_features
from pipeline.transfer.finetune import predict
from pipeline.transfer.orchestrate import execute
from pipeline.transfer.source import build_model
from pipeline.transfer.sweep import plan_sweep

FAST = ["resolution=24", "steps=3", "warmup_steps=1", "batch_size=8", "seeds=1", "lrs=[0.01]"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("benchmarks")
    out = f"file://{root}/digits_heldout"
    prepare(PrepareOptions(source="digits", out=out, split="train", classes="5-9", per_class=6))
    for split in ("minival", "test"):
        prepare(PrepareOptions(source="digits", out=out, split=split, classes="5-9"))
    return root


@pytest.fixture(scope="module")
def export_url(tmp_path_factory) -> str:
    torch.manual_seed(0)
    vit = vit_model.create_vit("Mi/4", num_classes=5, img_size=16, representation_size=32)
    return save_exported_model(vit, f"file://{tmp_path_factory.mktemp('export')}/tiny", metadata={"run_name": "x"})


def _labels_in_the_tars(split_dir: Path, split: str) -> list[int]:
    """The split's labels in stored order, read from the tar members (shards in manifest order)."""
    manifest = json.loads((split_dir / f"{split}.manifest.json").read_text())
    labels = []
    for shard in manifest["shards"]:
        name = shard if isinstance(shard, str) else shard["name"]
        with tarfile.open(split_dir / Path(name).name) as tar:
            labels += [int(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".cls")]
    return labels


def test_predict_returns_the_labels_in_stored_order_and_the_models_own_prediction_for_each_image(digits):
    url = f"file://{digits}/digits_heldout/test.manifest.json"
    expected_labels = _labels_in_the_tars(digits / "digits_heldout", "test")
    torch.manual_seed(3)
    vit = vit_model.create_vit("Mi/4", num_classes=5, img_size=16)
    with torch.no_grad():  # the head starts at zero: give it weights so that predictions differ between images
        vit.head.weight.normal_(std=1.0)
    cpu = torch.device("cpu")

    preds, labels, bad = predict(vit, url, image_size=16, batch_size=64, device=cpu)
    assert labels.tolist() == expected_labels and bad == 0
    assert len(set(preds.tolist())) > 1  # a random model: the check below is not about a constant
    small, small_labels, _ = predict(vit, url, image_size=16, batch_size=7, device=cpu)  # ragged last batch
    assert small.tolist() == preds.tolist() and small_labels.tolist() == expected_labels

    # A head that scores class c highest for every image: every prediction is c, so the accuracy is exactly
    # the share of c among the labels read from the tars.
    with torch.no_grad():
        vit.head.weight.zero_()
        vit.head.bias.copy_(torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0]))
    preds, labels, _ = predict(vit, url, image_size=16, batch_size=64, device=cpu)
    assert preds.tolist() == [2] * len(expected_labels)
    assert float((preds == labels).mean()) == expected_labels.count(2) / len(expected_labels)


def test_a_few_shot_run_gives_exactly_the_evaluators_accuracies_on_features_of_the_whole_splits(digits, export_url):
    fields = {
        "pretrained": export_url,
        "benchmarks": ["digits_heldout"],
        "data_root": f"file://{digits}",
        "fewshot": (1, 3),
        "fewshot_seeds": 3,
    }
    (spec,) = [s for s in plan_sweep(build_config(fields, FAST)).specs() if s.kind == "fewshot"]
    metrics = execute(spec)

    vit = build_model(spec.source, "pretrained", seed=spec.seed).eval()

    def features(split: str) -> tuple[np.ndarray, np.ndarray]:
        loader = build_eval_loader(
            spec.urls[split], image_size=16, batch_size=256, crop_fraction=spec.recipe.eval_crop_fraction
        )
        return extract_features(vit, loader)

    train = features("train")
    assert len(train[1]) == 30 and metrics["train_images_embedded"] < 30  # the run embedded only its draws
    expected = fewshot_eval(train, features("test"), val=features("minival"), num_classes=5, shots=(1, 3), seeds=3)
    for k in (1, 3):
        for seed in range(3):
            assert metrics[f"fewshot_{k}shot_seed{seed}"] == expected.accuracies[k][seed], (k, seed)
        assert metrics[f"fewshot_{k}shot"] == expected.mean(k)
        assert metrics[f"fewshot_{k}shot_l2"] == float(np.mean(expected.l2[k]))
