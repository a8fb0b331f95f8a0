"""The `data` config group: which token corpus to train on and how to split it."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

# Megatron accepts any run of digits and dots in its split string; we accept the documented form
# only, so that a typo ("98.2") fails at config build instead of silently meaning something else.
_SPLIT_RE = re.compile(r"^\s*\d+(\.\d*)?\s*(,\s*\d+(\.\d*)?\s*){0,2}$")

# 256 byte-level symbols plus the end-of-document token.
MIN_VOCAB_SIZE = 257


@dataclass
class DataConfig:
    """Where training tokens come from (Hydra group `data`)."""

    prefixes: list[str] | None = None
    """Megatron indexed-dataset path prefixes (no .bin/.idx); None = the default stdlib corpus."""

    weights: list[float] | None = None
    """Blend weight per prefix; None = blend in proportion to dataset size."""

    tokenizer: str | None = None
    """HF tokenizer.json the prefixes were written with; None only with the default corpus."""

    cache_dir: str = "~/.cache/m2-pretrain"
    """Directory for the default corpus and megatron's dataset index caches."""

    vocab_size: int = 4096
    """Vocab size of the tokenizer trained for the default corpus (ignored with prefixes)."""

    split: str = "98,2,0"
    """Train,valid,test document split weights, megatron's format."""

    eod_mask_loss: bool = False
    """Exclude end-of-document tokens from the loss."""

    def __post_init__(self) -> None:
        if self.prefixes is not None and len(self.prefixes) == 0:
            raise ValueError("data.prefixes is an empty list; give at least one prefix or null")
        if self.weights is not None:
            if self.prefixes is None:
                raise ValueError(
                    "data.weights is set but data.prefixes is null; weights blend data.prefixes"
                )
            if len(self.weights) != len(self.prefixes):
                raise ValueError(
                    f"data.weights has {len(self.weights)} entries but data.prefixes has "
                    f"{len(self.prefixes)}; give one weight per prefix"
                )
            if any(w <= 0 for w in self.weights):
                raise ValueError(f"data.weights must all be > 0, got {list(self.weights)}")
        if self.prefixes is not None and self.tokenizer is None:
            raise ValueError(
                "data.tokenizer is required when data.prefixes is set: the tokenizer.json the "
                "prefixes were written with (python -m data.prepare --tokenizer ...)"
            )
        if self.prefixes is None and self.tokenizer is not None:
            raise ValueError(
                "data.tokenizer is set but data.prefixes is null: the default corpus is "
                "tokenized with its own tokenizer; unset data.tokenizer or set data.prefixes"
            )
        if self.vocab_size < MIN_VOCAB_SIZE:
            raise ValueError(
                f"data.vocab_size={self.vocab_size} is below {MIN_VOCAB_SIZE} "
                "(256 byte tokens + end-of-document)"
            )
        if not _SPLIT_RE.match(self.split):
            raise ValueError(
                f"data.split={self.split!r} is not 1-3 comma-separated weights like '98,2,0'"
            )
        if self.split_weights()[0] <= 0:
            raise ValueError(f"data.split={self.split!r} gives the train split no documents")

    def split_weights(self) -> list[float]:
        """[train, valid, test] weights as written (not normalised), missing entries 0."""
        weights = [float(w) for w in self.split.split(",")]
        return weights + [0.0] * (3 - len(weights))

    def cache_path(self) -> str:
        """`cache_dir` with `~` expanded."""
        return os.path.abspath(os.path.expanduser(self.cache_dir))

    def prefix_paths(self) -> list[str] | None:
        """`prefixes` with `~` expanded, or None for the default corpus."""
        if self.prefixes is None:
            return None
        return [os.path.abspath(os.path.expanduser(p)) for p in self.prefixes]

    def tokenizer_path(self) -> str | None:
        """`tokenizer` with `~` expanded, or None for the default corpus."""
        if self.tokenizer is None:
            return None
        return os.path.abspath(os.path.expanduser(self.tokenizer))

    def validate_paths(self) -> None:
        """Check the configured files exist; call at run start (config build has no filesystem).

        The default corpus (prefixes=None) is created on demand, so there is nothing to check.
        """
        if self.prefixes is None:
            return
        tokenizer = self.tokenizer_path()
        assert tokenizer is not None  # __post_init__ rejects prefixes without a tokenizer
        for i, prefix in enumerate(self.prefix_paths()):
            for suffix in (".bin", ".idx"):
                if not os.path.isfile(prefix + suffix):
                    raise ValueError(
                        f"data.prefixes[{i}]={self.prefixes[i]!r}: {prefix + suffix} does not "
                        f"exist; write it with `python -m data.prepare --input FILE [FILE ...] "
                        f"--tokenizer {self.tokenizer} --output-prefix {self.prefixes[i]}`"
                    )
        if not os.path.isfile(tokenizer):
            raise ValueError(
                f"data.tokenizer={self.tokenizer!r}: {tokenizer} does not exist; train one with "
                f"`python -m data.prepare --input FILE [FILE ...] --train-tokenizer VOCAB "
                f"--tokenizer {self.tokenizer} --output-prefix PREFIX`"
            )
