"""data/: turns text into batches (tokenizer, indexed datasets, megatron GPTDataset, batch order).

Exports resolve lazily (PEP 562) so that `import data.config` stays light (no megatron import)
and `python -m data.prepare` does not find data.prepare already imported by its package.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "DataConfig": "data.config",
    "batch_iterator": "data.loader",
    "build_datasets": "data.loader",
    "load_tokenizer": "data.loader",
    "default_corpus_paths": "data.prepare",
    "prepare_default_corpus": "data.prepare",
    "stdlib_files": "data.prepare",
    "write_indexed_dataset": "data.prepare",
    "EOD_TOKEN": "data.tokenizer",
    "HFTokenizer": "data.tokenizer",
    "train_tokenizer": "data.tokenizer",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from data.config import DataConfig
    from data.loader import batch_iterator, build_datasets, load_tokenizer
    from data.prepare import (
        default_corpus_paths,
        prepare_default_corpus,
        stdlib_files,
        write_indexed_dataset,
    )
    from data.tokenizer import EOD_TOKEN, HFTokenizer, train_tokenizer


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'data' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
