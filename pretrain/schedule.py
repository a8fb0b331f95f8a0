"""The learning-rate and weight-decay schedule: megatron-core's OptimizerParamScheduler built from
the `optim` group, and what happens to it when a run resumes from a checkpoint.

Schedules (`optim.schedule`), after a linear warm-up from optim.warmup_start_lr to optim.lr:
cosine or linear decay to optim.min_lr over optim.decay_iters; constant; wsd (warmup-stable-
decay: optim.lr until the last optim.wsd_decay_iters iterations of the schedule, then a decay
of optim.wsd_decay_style to optim.min_lr). A run that starts from other weights
(checkpoint.init_from) starts a fresh schedule, so its warm-up is a re-warm-up.

On resume, megatron's scheduler silently takes the checkpoint's values, so a run extended by
raising train.iters would sit at its old minimum lr for the whole extension. Here the
checkpoint's schedule is compared with the one the config derives; on a difference
`optim.on_resume` decides (checkpoint: keep it; config: follow the config's schedule from the
checkpoint's iteration on), and without a decision the run stops naming the fields.
"""

from __future__ import annotations

import logging

from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from pretrain.config import OptimConfig

log = logging.getLogger("pretrain")

_STYLES = {"cosine": "cosine", "linear": "linear", "constant": "constant", "wsd": "WSD"}

COMPARED = {
    "max_lr": "optim.lr",
    "min_lr": "optim.min_lr",
    "init_lr": "optim.warmup_start_lr",
    "lr_warmup_steps": "optim.warmup_iters",
    "lr_decay_steps": "optim.warmup_iters + optim.decay_iters (or train.iters)",
    "lr_decay_style": "optim.schedule",
    "wsd_decay_steps": "optim.wsd_decay_iters",
    "lr_wsd_decay_style": "optim.wsd_decay_style",
    "start_wd": "optim.weight_decay",
    "end_wd": "optim.weight_decay",
}
"""Scheduler fields compared on resume -> the config keys that set them."""


def schedule_fields(optim: OptimConfig, iters: int) -> dict:
    """The scheduler's fields that `optim` and train.iters derive (see COMPARED)."""
    decay = optim.decay_iters if optim.decay_iters is not None else max(iters - optim.warmup_iters, 1)
    constant = optim.schedule == "constant"
    wsd = optim.schedule == "wsd"
    return {
        "max_lr": optim.lr,
        "min_lr": optim.min_lr,
        "init_lr": optim.warmup_start_lr,
        "lr_warmup_steps": optim.warmup_iters,
        # a constant schedule has no decay: its length does not change when a run is extended
        "lr_decay_steps": optim.warmup_iters + (1 if constant else decay),
        "lr_decay_style": _STYLES[optim.schedule],
        "wsd_decay_steps": optim.wsd_decay_iters if wsd else None,
        "lr_wsd_decay_style": optim.wsd_decay_style if wsd else None,
        "start_wd": optim.weight_decay,
        "end_wd": optim.weight_decay,
    }


def check(optim: OptimConfig, iters: int) -> None:
    """ValueError naming the keys when the schedule does not fit a run of `iters` iterations."""
    decay = optim.decay_iters if optim.decay_iters is not None else max(iters - optim.warmup_iters, 1)
    if optim.schedule == "wsd" and optim.wsd_decay_iters > decay:
        raise ValueError(
            f"optim.wsd_decay_iters={optim.wsd_decay_iters} exceeds the {decay} iterations after the "
            "warm-up (optim.decay_iters, or train.iters - optim.warmup_iters): lower it"
        )


def build(optimizer, optim: OptimConfig, iters: int) -> OptimizerParamScheduler:
    """The scheduler of a run of `iters` iterations, at iteration 0."""
    f = schedule_fields(optim, iters)
    return OptimizerParamScheduler(
        optimizer,
        init_lr=f["init_lr"],
        max_lr=f["max_lr"],
        min_lr=f["min_lr"],
        lr_warmup_steps=f["lr_warmup_steps"],
        lr_decay_steps=f["lr_decay_steps"],
        lr_decay_style=f["lr_decay_style"],
        start_wd=f["start_wd"],
        end_wd=f["end_wd"],
        wd_incr_steps=iters,
        wd_incr_style="constant",
        wsd_decay_steps=f["wsd_decay_steps"],
        lr_wsd_decay_style=f["lr_wsd_decay_style"],
    )


def state(scheduler: OptimizerParamScheduler) -> dict:
    """What a checkpoint stores: megatron's state_dict plus the fields it leaves out (the warm-up
    start and the WSD decay), so that a resume can compare all of them."""
    return {
        **scheduler.state_dict(),
        "init_lr": scheduler.init_lr,
        "wsd_decay_steps": scheduler.wsd_decay_steps,
        "lr_wsd_decay_style": scheduler.lr_wsd_decay_style,
    }


def differences(saved: dict, scheduler: OptimizerParamScheduler) -> list[str]:
    """The COMPARED fields on which a checkpoint's scheduler state and `scheduler` (built from
    the config) differ, as lines naming the config keys. Fields a checkpoint did not store
    (written before they existed) are not compared."""
    current = state(scheduler)
    return [
        f"{field} ({key}): checkpoint {saved[field]!r}, config {current[field]!r}"
        for field, key in COMPARED.items()
        if field in saved and saved[field] != current[field]
    ]


class ScheduleMismatch(ValueError):
    """A resumed checkpoint's schedule differs from the config's and optim.on_resume is unset."""


def resume(scheduler: OptimizerParamScheduler, saved: dict, on_resume: str | None, where: str) -> None:
    """Put `scheduler` (built from the config, at iteration 0) at the checkpoint's iteration,
    following `optim.on_resume` when the checkpoint's schedule differs from the config's."""
    diffs = differences(saved, scheduler)
    if diffs and on_resume is None:
        raise ScheduleMismatch(
            f"{where}: the checkpoint's learning-rate schedule differs from the config's ("
            + "; ".join(diffs) + "). Set optim.on_resume=config to follow the config's schedule from "
            f"iteration {saved['num_steps']} on (e.g. a run extended by raising train.iters), or "
            "optim.on_resume=checkpoint to keep the checkpoint's"
        )
    if diffs and on_resume == "checkpoint":
        log.warning("optim.on_resume=checkpoint: keeping the checkpoint's schedule (%s)", "; ".join(diffs))
        for field in ("init_lr", "wsd_decay_steps", "lr_wsd_decay_style"):
            if field in saved:
                setattr(scheduler, field, saved[field])
        scheduler.load_state_dict(saved)  # megatron's default: the checkpoint's values win
        return
    if diffs:
        log.warning("optim.on_resume=config: following the config's schedule from iteration %d (%s)",
                    saved["num_steps"], "; ".join(diffs))
    scheduler.step(increment=saved["num_steps"])
