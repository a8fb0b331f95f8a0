"""The one place metrics go: `metrics.jsonl` in the run directory, the console, and W&B.

A record is a flat dict for one logged iteration, keyed as in metrics.jsonl (`lm_loss`,
`mtp_1_loss`, `grad_norm`, `tokens_per_s`, `mfu`, ...; docs/metrics.md lists them). W&B gets the
same values under `/` names (`WANDB_KEYS`) at step = iteration. The console shows a progress bar
on a terminal and one Megatron-style line per record otherwise; lines go through the `pretrain`
logger, which Hydra sends to the console and to pretrain.log.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # the configs import megatron-core through parallel/; the monitor needs none of it
    from pretrain.config import LoggerConfig, RunConfig, WandbConfig

log = logging.getLogger("pretrain")

GIB = 2**30

# metrics.jsonl key -> W&B name. `mtp_<d>_loss` maps to `train/mtp_<d>_loss`; other numeric keys
# pass through unchanged (e.g. `moe/max_load/L00-07`).
WANDB_KEYS = {
    "lm_loss": "train/lm_loss",
    "indexer_loss": "train/indexer_loss",
    "grad_norm": "train/grad_norm",
    "lr": "train/lr",
    "skipped_iters": "train/skipped_iters",
    "consumed_samples": "train/consumed_samples",
    "valid_loss": "valid/lm_loss",
    "tokens_per_s": "perf/tokens_per_s",
    "tflops_per_gpu": "perf/tflops_per_gpu",
    "mfu": "perf/mfu",
    "iter_time_s": "perf/iter_time_s",
    "memory_allocated_gib": "memory/allocated_gib",
    "memory_reserved_gib": "memory/reserved_gib",
    "memory_max_allocated_gib": "memory/max_allocated_gib",
    "memory_rss_gib": "memory/rss_gib",
    "moe_max_load": "moe/max_load",
    "moe_min_load": "moe/min_load",
}
_MTP_LOSS = re.compile(r"mtp_(\d+)_loss")

# Bar layout: the description (latest loss), then tqdm's bar, position, elapsed time and ETA.
_BAR_FORMAT = "{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}, ETA {remaining}, {rate_fmt}]"


def wandb_metrics(record: dict) -> dict[str, float]:
    """The numeric values of a record under their W&B names (the iteration is the step)."""
    metrics = {}
    for key, value in record.items():
        if key == "iteration" or value is None or isinstance(value, str):
            continue
        if not isinstance(value, numbers.Real):
            raise TypeError(f"metric {key!r} is a {type(value).__name__}: records hold Python numbers")
        mtp = _MTP_LOSS.fullmatch(key)
        name = f"train/{key}" if mtp else WANDB_KEYS.get(key, key)
        metrics[name] = float(value)
    return metrics


def console_line(record: dict, total_iters: int) -> str:
    """Megatron's log line: `iteration 120/5000 | lm loss 2.3456 | mtp_1 loss 2.5000 | ...`."""
    parts = [f"iteration {record['iteration']}/{total_iters}"]

    def add(key: str, name: str, fmt: str) -> None:
        if record.get(key) is not None:
            parts.append(f"{name} {_fmt(record[key], fmt)}")

    add("lm_loss", "lm loss", "{:.4f}")
    depths = sorted(int(m.group(1)) for k in record if (m := _MTP_LOSS.fullmatch(k)))
    for d in depths:
        add(f"mtp_{d}_loss", f"mtp_{d} loss", "{:.4f}")
    add("indexer_loss", "indexer loss", "{:.4f}")
    add("grad_norm", "grad norm", "{:.3f}")
    add("lr", "lr", "{:.3e}")
    add("tokens_per_s", "tokens/s", "{:.0f}")
    add("tflops_per_gpu", "TFLOP/s/GPU", "{:.1f}")
    mfu = record.get("mfu")
    if mfu is not None and not math.isnan(mfu):  # NaN = unknown peak, already warned about
        parts.append(f"MFU {100 * mfu:.1f}%")
    if record.get("skipped_iters"):
        parts.append(f"skipped {record['skipped_iters']}")
    add("valid_loss", "valid loss", "{:.4f}")
    return " | ".join(parts)


def memory_stats(device: torch.device) -> dict[str, float]:
    """Memory in GiB for a record: on CUDA allocated, reserved and peak allocated by torch's
    caching allocator; everywhere the process's resident set (RSS)."""
    stats = {}
    if device.type == "cuda":
        stats["memory_allocated_gib"] = torch.cuda.memory_allocated(device) / GIB
        stats["memory_reserved_gib"] = torch.cuda.memory_reserved(device) / GIB
        stats["memory_max_allocated_gib"] = torch.cuda.max_memory_allocated(device) / GIB
    stats["memory_rss_gib"] = _rss_bytes() / GIB
    return stats


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:  # size resident shared ... in pages
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # no /proc (macOS): the peak RSS is the closest the stdlib offers
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


class Monitor:
    """Metrics of one run. Only the logging rank is `enabled`; on the others every method
    returns at once and nothing is written.

    `wandb_run_id`: the id of a previous W&B run to continue (a resumed job); None starts a new
    run. Save `monitor.wandb_run_id` with the checkpoint to pass it back on resume.
    """

    def __init__(
        self,
        cfg: RunConfig,
        run_dir: Path,
        *,
        enabled: bool,
        total_iters: int,
        start_iteration: int = 0,
        wandb_run_id: str | None = None,
        resolved_config: dict | None = None,
    ):
        self.enabled = enabled
        self.total_iters = total_iters
        self._run_id = wandb_run_id
        self._file = None
        self._run = None
        self._bar = None
        if not enabled:
            return
        run_dir = Path(run_dir)
        self._file = open(run_dir / "metrics.jsonl", "a")
        self._run = _start_wandb(cfg.logger.wandb, run_dir, wandb_run_id, resolved_config)
        if self._run is not None:
            self._run_id = self._run.id
        if _wants_bar(cfg.logger):
            self._bar = _ProgressBar(total_iters, start_iteration)

    @property
    def wandb_run_id(self) -> str | None:
        """The W&B run's id (the one passed in while W&B is disabled, None if none was)."""
        return self._run_id

    def tick(self, iteration: int) -> None:
        """Iteration `iteration` finished: advance the progress bar (every iteration)."""
        if self._bar is not None:
            self._bar.advance(iteration)

    def log(self, record: dict) -> None:
        """One logged iteration: metrics.jsonl, the console, and W&B at step record["iteration"]."""
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        line = console_line(record, self.total_iters)
        if self._bar is None:
            log.info(line)
        else:
            if record.get("lm_loss") is not None:
                self._bar.describe(f"lm loss {_fmt(record['lm_loss'], '{:.4f}')}")
            self._bar.advance(record["iteration"])
            # The bar shows the progress; the full line goes to pretrain.log, and to the console
            # too when it carries a validation loss, which is worth keeping in the scrollback.
            log.info(line, extra={"console": record.get("valid_loss") is not None})
        if self._run is not None:
            self._run.log(wandb_metrics(record), step=record["iteration"])

    def event(self, message: str) -> None:
        """Something notable (a checkpoint saved, a resume): logged above the bar and into
        pretrain.log (and W&B's console log)."""
        if self.enabled:
            log.info(message)

    def close(self, exit_code: int = 0) -> None:
        """Close the bar and metrics.jsonl and finish the W&B run; idempotent."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._run is not None:
            self._run.finish(exit_code=exit_code)
            self._run = None

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(exit_code=0 if exc_type is None else 1)


def _wants_bar(cfg: LoggerConfig) -> bool:
    return cfg.console == "bar" or (cfg.console == "auto" and sys.stdout.isatty())


def _start_wandb(cfg: WandbConfig, run_dir: Path, run_id: str | None, config: dict | None):
    """The W&B run, or None when disabled. WANDB_MODE, when set, wins over logger.wandb.mode."""
    mode = os.environ.get("WANDB_MODE") or cfg.mode
    if mode == "disabled":
        return None
    import wandb

    resume = {"id": run_id, "resume": "allow"} if run_id else {}
    try:
        return wandb.init(
            mode=mode,
            dir=run_dir,  # W&B's files go under <run dir>/wandb
            project=cfg.project,
            entity=cfg.entity,
            name=cfg.name or run_dir.name,
            config=config,
            **resume,
        )
    except wandb.errors.UsageError as e:
        raise ValueError(
            f"W&B did not start in mode {mode!r}: {e}. Log in (wandb login), or set "
            "logger.wandb.mode=offline (or WANDB_MODE=offline) and `wandb sync` the run later"
        ) from e


class _ProgressBar:
    """A tqdm bar on stdout. While it is up, the console handlers of the root and `pretrain`
    loggers write above it instead of through it, and drop records logged with
    `extra={"console": False}` (those still reach the other handlers, i.e. pretrain.log)."""

    def __init__(self, total: int, initial: int):
        from tqdm import tqdm

        self.bar = tqdm(
            total=total, initial=initial, file=sys.stdout, dynamic_ncols=True, bar_format=_BAR_FORMAT,
            desc="lm loss -",
        )
        self._swapped: list[tuple[logging.Logger, logging.Handler, logging.Handler]] = []
        for logger in (logging.getLogger(), log):
            for handler in list(logger.handlers):
                if _is_console(handler):
                    above = _AboveBar(self.bar, handler)
                    logger.removeHandler(handler)
                    logger.addHandler(above)
                    self._swapped.append((logger, handler, above))

    def advance(self, iteration: int) -> None:
        if iteration > self.bar.n:
            self.bar.update(iteration - self.bar.n)

    def describe(self, text: str) -> None:
        self.bar.set_description_str(text, refresh=False)

    def close(self) -> None:
        self.bar.close()
        for logger, handler, above in self._swapped:
            logger.removeHandler(above)
            logger.addHandler(handler)


def _is_console(handler: logging.Handler) -> bool:
    return (
        type(handler) is logging.StreamHandler  # not a FileHandler, which subclasses it
        and handler.stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)
    )


class _AboveBar(logging.Handler):
    """Stands in for a console handler while the bar is up: same level, filters and format,
    written with tqdm.write (clear the bar, print the line, redraw the bar)."""

    def __init__(self, bar, console: logging.StreamHandler):
        super().__init__(console.level)
        self.bar = bar
        self.console = console
        self.filters = list(console.filters)
        self.setFormatter(console.formatter)

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "console", True) is False:
            return
        try:
            self.bar.write(self.format(record), file=self.console.stream)
        except Exception:
            self.handleError(record)


def _fmt(value: float, fmt: str) -> str:
    return "nan" if math.isnan(value) else fmt.format(value)
