"""Where metrics go: `metrics.jsonl` in the run directory and one log line per record."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

log = logging.getLogger("pretrain")

# Console names and formats, in Megatron's order.
_CONSOLE = (
    ("lm_loss", "lm loss", "{:.4f}"),
    ("valid_loss", "valid loss", "{:.4f}"),
    ("grad_norm", "grad norm", "{:.3f}"),
    ("lr", "lr", "{:.3e}"),
    ("tokens_per_s", "tokens/s", "{:.0f}"),
)


class MetricsLog:
    """Appends one JSON object per logged iteration; only the rank that holds the loss writes."""

    def __init__(self, run_dir: Path, *, enabled: bool, total_iters: int):
        self.enabled = enabled
        self.total_iters = total_iters
        self._file = open(run_dir / "metrics.jsonl", "a") if enabled else None

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        log.info(self.line(record))

    def line(self, record: dict) -> str:
        parts = [f"iteration {record['iteration']}/{self.total_iters}"]
        for key, name, fmt in _CONSOLE:
            if key == "valid_loss":
                continue
            if key == "grad_norm":  # MTP losses go right after the LM loss, as in Megatron
                parts += [
                    f"{k.removesuffix('_loss')} loss {_fmt(v, '{:.4f}')}"
                    for k, v in record.items() if k.startswith("mtp_")
                ]
            if record.get(key) is not None:
                parts.append(f"{name} {_fmt(record[key], fmt)}")
        if record.get("valid_loss") is not None:
            parts.append(f"valid loss {_fmt(record['valid_loss'], '{:.4f}')}")
        return " | ".join(parts)

    def close(self) -> None:
        if self._file:
            self._file.close()


def _fmt(value: float, fmt: str) -> str:
    return "nan" if value is None or math.isnan(value) else fmt.format(value)
