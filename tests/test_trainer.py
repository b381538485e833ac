"""The pretraining worker's small pieces, on CPU without Ray: loss summaries, losses, data digests, ETA, MFU."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.pretrain.trainer import (
    LossTrace,
    device_peak_flops,
    format_eta,
    loss_function,
    model_flops_utilization,
    update_digest,
)


def test_the_loss_trace_reports_first_last_and_means_of_the_first_and_last_ten_steps() -> None:
    trace = LossTrace()
    for loss in range(1, 26):  # 1.0 .. 25.0
        trace.add(float(loss))
    assert trace.summary() == {"first_loss": 1.0, "last_loss": 25.0, "loss_start": 5.5, "loss_end": 20.5}


def test_an_empty_loss_trace_reports_nothing() -> None:
    assert set(LossTrace().summary().values()) == {None}


def test_sigmoid_loss_sums_over_classes_and_averages_over_images() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 1.0, -3.0]])
    labels = torch.tensor([0, 2])
    targets = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    per_image = [F.binary_cross_entropy_with_logits(logits[i], targets[i], reduction="sum") for i in range(2)]
    assert loss_function("sigmoid", 3)(logits, labels).item() == pytest.approx(sum(per_image).item() / 2)
    assert loss_function("softmax", 3)(logits, labels).item() == pytest.approx(F.cross_entropy(logits, labels).item())


def test_sigmoid_loss_of_known_logits_has_its_value_by_hand() -> None:
    # Zero logits: every class costs log 2, whatever the label; 3 classes -> 3 log 2 per image.
    assert loss_function("sigmoid", 3)(torch.zeros(4, 3), torch.tensor([0, 1, 2, 0])).item() == pytest.approx(
        3 * math.log(2), rel=1e-6
    )
    # One image, logits (2, -1), label 0: softplus(-2) for the true class + softplus(-1) for the other one.
    expected = math.log1p(math.exp(-2.0)) + math.log1p(math.exp(-1.0))
    assert loss_function("sigmoid", 2)(torch.tensor([[2.0, -1.0]]), torch.tensor([0])).item() == pytest.approx(
        expected, rel=1e-6
    )
    # The same image with both classes present (multi-hot): softplus(-2) + softplus(1).
    both = loss_function("sigmoid", 2)(torch.tensor([[2.0, -1.0]]), torch.tensor([[1, 1]]))
    assert both.item() == pytest.approx(math.log1p(math.exp(-2.0)) + math.log1p(math.exp(1.0)), rel=1e-6)


def test_mfu_is_the_models_flops_per_second_over_the_peak_of_all_workers() -> None:
    # 1,000 img/s of ViT-B/16 at 224 px (3 x 35.2 GFLOPs each) on 8 GPUs of 989 TFLOP/s peak: 1.33 %.
    mfu = model_flops_utilization(1000.0, 3 * 35.2e9, 989e12, 8)
    assert mfu == pytest.approx(1000 * 105.6e9 / (8 * 989e12)) and mfu == pytest.approx(0.013347, rel=1e-4)
    assert model_flops_utilization(50.0, 2e12, 1e15, 2) == 0.05


def test_the_data_digest_depends_on_the_samples_and_their_order() -> None:
    a = (torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.tensor([0, 1]))
    b = (torch.ones(2, 3, 4, 4, dtype=torch.uint8), torch.tensor([0, 1]))
    ab = update_digest(update_digest("", *a), *b)
    assert ab == update_digest(update_digest("", *a), *b)
    assert ab != update_digest(update_digest("", *b), *a)


def test_eta_is_hours_minutes_seconds_or_unknown() -> None:
    assert format_eta(3725.9) == "1:02:05"
    assert format_eta(math.inf) == "?"


def test_no_mfu_peak_on_cpu() -> None:
    assert device_peak_flops(torch.device("cpu")) is None
