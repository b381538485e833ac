"""The learning-rate schedules of pretraining (linear decay) and fine-tuning (cosine decay)."""

from __future__ import annotations

import itertools

import pytest
import torch

from pipeline.schedules import WarmupLinearDecay, warmup_cosine, warmup_linear_decay


def test_cosine_warms_up_exactly_as_the_linear_decay_does() -> None:
    for step in range(4):
        assert warmup_cosine(step, peak_lr=0.1, warmup_steps=4, total_steps=20) == warmup_linear_decay(
            step, peak_lr=0.1, warmup_steps=4, total_steps=20
        )


def test_cosine_decays_from_the_peak_through_half_to_zero_and_stays_there() -> None:
    lrs = [warmup_cosine(s, peak_lr=0.1, warmup_steps=4, total_steps=20) for s in range(25)]
    assert lrs[:4] == pytest.approx([0.025, 0.05, 0.075, 0.1])
    assert lrs[4] == pytest.approx(0.1) and lrs[12] == pytest.approx(0.05)
    assert all(a >= b for a, b in itertools.pairwise(lrs[4:]))
    assert lrs[19] > 0 and lrs[20] == pytest.approx(0.0) and lrs[24] == pytest.approx(0.0)


def test_cosine_without_warmup_starts_at_the_peak() -> None:
    assert warmup_cosine(0, peak_lr=0.5, warmup_steps=0, total_steps=10) == 0.5


def _optimizer() -> torch.optim.Optimizer:
    groups = [{"params": [torch.nn.Parameter(torch.zeros(1))]}, {"params": [torch.nn.Parameter(torch.zeros(1))]}]
    return torch.optim.AdamW(groups, lr=0.0)


def test_the_scheduler_object_sets_every_group_and_resumes_at_its_step() -> None:
    sched = WarmupLinearDecay(_optimizer(), peak_lr=1.0, warmup_steps=4, total_steps=12)
    for _ in range(6):
        sched.step()
    assert sched.get_last_lr() == [warmup_linear_decay(6, peak_lr=1.0, warmup_steps=4, total_steps=12)] * 2
    resumed = WarmupLinearDecay(_optimizer(), peak_lr=1.0, warmup_steps=4, total_steps=12)
    resumed.load_state_dict(sched.state_dict())
    assert resumed.get_last_lr() == sched.get_last_lr() and resumed.steps_done == 6
