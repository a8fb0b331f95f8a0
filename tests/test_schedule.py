"""pretrain/schedule.py: the learning-rate schedules against their formulas, and the resume rule
(a changed schedule follows optim.on_resume or stops naming the fields)."""

from __future__ import annotations

import math

import pytest
import torch

from pretrain import schedule
from pretrain.config import OptimConfig


def _lrs(optim: OptimConfig, iters: int, steps: int) -> list[float]:
    """The lr the scheduler sets before each of `steps` steps (iteration k uses step k's lr)."""
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = schedule.build(opt, optim, iters)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        sched.step(increment=1)
    return out


def test_cosine_warms_up_then_decays_to_min():
    o = OptimConfig(lr=1.0, min_lr=0.1, warmup_iters=4, warmup_start_lr=0.2)
    lrs = _lrs(o, iters=14, steps=16)
    assert lrs[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    for k in range(4, 15):
        assert lrs[k] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (k - 4) / 10)))
    assert lrs[15] == pytest.approx(0.1)  # past the end: min_lr


def test_linear_constant_and_wsd():
    linear = _lrs(OptimConfig(lr=1.0, min_lr=0.0, schedule="linear", warmup_iters=0), iters=10, steps=11)
    assert linear == pytest.approx([1 - k / 10 for k in range(11)])
    constant = _lrs(OptimConfig(lr=0.5, min_lr=0.0, schedule="constant", warmup_iters=2), iters=10, steps=12)
    assert constant == pytest.approx([0.0, 0.25] + [0.5] * 10)
    wsd = _lrs(OptimConfig(lr=1.0, min_lr=0.1, schedule="wsd", warmup_iters=2, wsd_decay_iters=4), iters=12, steps=13)
    # warm-up 2, stable until iteration 12 - 4 = 8, then linear to min_lr at 12
    assert wsd == pytest.approx([0.0, 0.5] + [1.0] * 7 + [0.1 + 0.9 * (1 - j / 4) for j in (1, 2, 3, 4)])


def test_bad_schedules_name_the_key():
    with pytest.raises(ValueError, match="optim.schedule"):
        OptimConfig(schedule="step")
    with pytest.raises(ValueError, match="optim.wsd_decay_iters"):
        OptimConfig(schedule="wsd")
    with pytest.raises(ValueError, match="optim.on_resume"):
        OptimConfig(on_resume="latest")
    with pytest.raises(ValueError, match="optim.wsd_decay_iters=20 exceeds"):
        schedule.check(OptimConfig(schedule="wsd", wsd_decay_iters=20, warmup_iters=4), iters=16)


def _resumed(saved_optim: OptimConfig, saved_iters: int, at: int, optim: OptimConfig, iters: int):
    """A scheduler of `optim` over `iters` resumed from one of `saved_optim` saved at step `at`."""
    old = schedule.build(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))]), saved_optim, saved_iters)
    old.step(increment=at)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
    new = schedule.build(opt, optim, iters)
    schedule.resume(new, schedule.state(old), optim.on_resume, where="ckpt")
    return new, opt


def test_extending_a_run_needs_a_decision_and_config_follows_the_new_curve():
    o = OptimConfig(lr=1.0, min_lr=0.1, warmup_iters=2)
    with pytest.raises(schedule.ScheduleMismatch, match=r"lr_decay_steps .*checkpoint 10, config 20.*optim\.on_resume"):
        _resumed(o, 10, 10, o, 20)
    same, _ = _resumed(o, 10, 6, o, 10)  # an unchanged schedule resumes silently
    assert same.num_steps == 6

    follow = OptimConfig(lr=1.0, min_lr=0.1, warmup_iters=2, on_resume="config")
    new, opt = _resumed(o, 10, 10, follow, 20)
    fresh = _lrs(o, iters=20, steps=21)
    for k in range(10, 20):  # iteration k+1 after the resume gets the new run's lr of step k
        assert opt.param_groups[0]["lr"] == pytest.approx(fresh[k])
        new.step(increment=1)

    keep = OptimConfig(lr=1.0, min_lr=0.1, warmup_iters=2, on_resume="checkpoint")
    _, opt = _resumed(o, 10, 10, keep, 20)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)  # the old schedule ended at min_lr


def test_mismatch_names_every_changed_field():
    old = OptimConfig(lr=1.0, min_lr=0.1, warmup_iters=2)
    new = OptimConfig(lr=2.0, min_lr=0.1, warmup_iters=3, schedule="wsd", wsd_decay_iters=3, weight_decay=0.0)
    with pytest.raises(schedule.ScheduleMismatch) as e:
        _resumed(old, 10, 4, new, 10)
    for field in ("max_lr (optim.lr)", "lr_warmup_steps (optim.warmup_iters)", "lr_decay_style (optim.schedule)",
                  "wsd_decay_steps", "start_wd (optim.weight_decay)"):
        assert field in str(e.value), field
    assert "(optim.min_lr)" not in str(e.value)  # unchanged
