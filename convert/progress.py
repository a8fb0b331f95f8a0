"""Progress of a long import or export: tensors and bytes done, rate, ETA.

On a terminal a tqdm bar (bytes, with tensors in its postfix); otherwise (Slurm logs, pipes) a
log line every `interval_s` seconds and at the end.
"""

from __future__ import annotations

import logging
import resource
import sys
import time

from tqdm import tqdm

log = logging.getLogger("convert")

MODES = ("auto", "bar", "lines", "off")


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def max_rss_bytes(children: bool = False) -> int:
    """Peak resident memory of this process (or of its finished children), in bytes (Linux
    reports ru_maxrss in KiB)."""
    who = resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF
    return resource.getrusage(who).ru_maxrss * 1024


class Progress:
    """Counts tensors and bytes towards known totals and shows them."""

    def __init__(self, what: str, total_tensors: int, total_bytes: int, *, mode: str = "auto", interval_s: float = 30.0):
        assert mode in MODES, mode
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "lines"
        self.what, self.mode, self.interval_s = what, mode, interval_s
        self.total_tensors, self.total_bytes = total_tensors, total_bytes
        self.tensors = self.bytes = 0
        self.start = self.last_line = time.perf_counter()
        self.bar = None
        if mode == "bar":
            self.bar = tqdm(total=total_bytes, desc=what, unit="B", unit_scale=True, unit_divisor=1024,
                            dynamic_ncols=True, file=sys.stderr)

    def advance(self, tensors: int, nbytes: int) -> None:
        self.tensors += tensors
        self.bytes += nbytes
        if self.bar is not None:
            self.bar.update(nbytes)
            self.bar.set_postfix_str(f"{self.tensors}/{self.total_tensors} tensors", refresh=False)
        elif self.mode == "lines" and time.perf_counter() - self.last_line >= self.interval_s:
            self.last_line = time.perf_counter()
            log.info(self.line())

    def line(self) -> str:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        rate = self.bytes / elapsed
        eta = _duration((self.total_bytes - self.bytes) / rate) if rate > 0 else "?"
        return (f"{self.what}: {self.tensors}/{self.total_tensors} tensors, {_gib(self.bytes)}/{_gib(self.total_bytes)}, "
                f"{self.bytes / elapsed / 2**20:.0f} MiB/s, ETA {eta}")

    def close(self) -> str:
        """Stop the display; return the closing summary (with this process's peak memory)."""
        if self.bar is not None:
            self.bar.close()
        elapsed = time.perf_counter() - self.start
        return (f"{self.what}: {self.tensors} tensors, {_gib(self.bytes)} in {_duration(elapsed)}; "
                f"ru_maxrss {_gib(max_rss_bytes())}")
