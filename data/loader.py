"""Token datasets through megatron-core's GPTDataset, and the pretraining batch order.

Every rank builds the datasets and reads its own micro-batches (`is_built_on_rank` is always
true): batches are small token-id tensors, so there is no point in megatron-LM's
build-on-TP-rank-0-then-broadcast scheme, and ranks of one tensor/context-parallel group get
identical batches by passing the same `dp_rank`.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Iterator

import torch
import torch.distributed as dist
from filelock import FileLock
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.blended_megatron_dataset_config import (
    convert_split_vector_to_split_matrix,
    parse_and_normalize_split,
)
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset
from torch.utils.data import Dataset

from data.config import DataConfig
from data.prepare import prepare_default_corpus
from data.tokenizer import HFTokenizer

BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


def _is_rank_zero() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _corpus(cfg: DataConfig) -> tuple[list[str], str]:
    """(prefixes, tokenizer path) of `cfg`, preparing the default corpus if needed.

    Collective when torch.distributed is initialised: global rank 0 prepares first while the
    others wait, then the others find it done (or, on a node that does not share `cache_dir`,
    prepare their own copy under the file lock).
    """
    if cfg.prefixes is not None:
        cfg.validate_paths()
        tokenizer = cfg.tokenizer_path()
        assert tokenizer is not None
        return cfg.prefix_paths(), tokenizer
    if _is_rank_zero():
        prefix, tokenizer = prepare_default_corpus(cfg.cache_path(), cfg.vocab_size)
    if dist.is_initialized():
        dist.barrier()
        if dist.get_rank() != 0:
            prefix, tokenizer = prepare_default_corpus(cfg.cache_path(), cfg.vocab_size)
    return [prefix], tokenizer


def load_tokenizer(cfg: DataConfig, eod: int | None = None) -> HFTokenizer:
    """The tokenizer of `cfg`'s corpus, with end-of-document id `eod` (None: its <|endoftext|>).
    Collective when torch.distributed is initialised."""
    _, tokenizer = _corpus(cfg)
    return HFTokenizer(tokenizer, eod=eod)


def _index_cache_dir(cfg: DataConfig, prefixes: list[str]) -> str:
    """Megatron's index cache directory for these data files.

    Megatron names cached indices by a hash of the prefix path and config but not of the file
    contents, so re-preparing a prefix in place would silently reuse indices that point into
    the old .bin. Keying the directory on each .idx's size and mtime avoids that.
    """
    fingerprint = hashlib.sha256()
    for prefix in prefixes:
        st = os.stat(prefix + ".idx")
        fingerprint.update(f"{prefix}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return os.path.join(cfg.cache_path(), "megatron-index", fingerprint.hexdigest()[:16])


def _check_splits_nonempty(cfg: DataConfig, prefixes: list[str], sizes: list[int]) -> None:
    """Reject a split that would receive no documents but is asked for samples.

    GPTDataset computes the epochs it needs by adding up tokens per epoch until it has enough;
    with zero documents that loop never ends.
    """
    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(cfg.split))
    for prefix in prefixes:
        num_docs = len(IndexedDataset(prefix).sequence_lengths)
        for name, bookends, size in zip(("train", "valid", "test"), matrix, sizes):
            if bookends is None or size == 0:
                continue
            begin, end = (int(round(b * num_docs)) for b in bookends)
            if begin == end:
                raise ValueError(
                    f"data.split={cfg.split!r} gives the {name} split 0 of the {num_docs} "
                    f"documents in {prefix}; raise its weight or add documents"
                )


def build_datasets(
    cfg: DataConfig,
    *,
    seq_length: int,
    seed: int,
    train_samples: int,
    valid_samples: int,
    tokenizer: HFTokenizer,
) -> tuple[Dataset, Dataset | None]:
    """(train, valid) datasets of `seq_length`-token samples from `cfg`'s corpus.

    `train_samples`/`valid_samples` are the samples the run will draw; megatron builds enough
    epochs over the documents to cover them (a blend with `weights=None` covers one epoch of
    each prefix at most; `batch_iterator` wraps around beyond that). The valid dataset is None
    when `cfg.split` gives it no weight.

    Collective when torch.distributed is initialised (gloo is fine): global rank 0 builds and
    caches the indices first, the others load them after a barrier, so `cfg.cache_dir` must be
    shared by all nodes. Without torch.distributed a single prefix works; a blend of several
    prefixes does not, because megatron-core's BlendedDataset._build_indices calls
    torch.distributed.get_rank() unguarded.
    """
    if seq_length < 1 or train_samples < 1 or valid_samples < 0:
        raise ValueError(
            f"build_datasets needs seq_length >= 1, train_samples >= 1, valid_samples >= 0; got "
            f"{seq_length}, {train_samples}, {valid_samples}"
        )
    prefixes, _ = _corpus(cfg)
    if len(prefixes) > 1 and not dist.is_initialized():
        raise RuntimeError(
            "a blend of several data.prefixes needs torch.distributed initialised (a 1-process "
            "gloo group is enough): megatron-core's BlendedDataset calls get_rank() unguarded"
        )
    # The test split is never drawn from; asking 0 samples keeps megatron from building it big.
    sizes = [train_samples, valid_samples, 0]
    _check_splits_nonempty(cfg, prefixes, sizes)

    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=(prefixes, None if cfg.weights is None else list(cfg.weights)),
        split=cfg.split,
        path_to_cache=_index_cache_dir(cfg, prefixes),
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=cfg.eod_mask_loss,
        create_attention_mask=False,
    )
    builder = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config)
    if _is_rank_zero():
        # Megatron orders ranks within a job; this lock orders separate jobs sharing the cache,
        # whose rank 0s would otherwise race writing the same index files.
        os.makedirs(config.path_to_cache, exist_ok=True)
        with FileLock(os.path.join(config.path_to_cache, "build.lock")):
            train_ds, valid_ds, _ = builder.build()
    else:
        train_ds, valid_ds, _ = builder.build()
    assert train_ds is not None
    if len(train_ds) < train_samples:
        warnings.warn(
            f"data.weights is null, so megatron built one epoch of each of data.prefixes "
            f"({len(train_ds)} samples) for {train_samples} train samples; batch_iterator will "
            "repeat them in the same order. Set data.weights to get reshuffled epochs.",
            stacklevel=2,
        )
    return train_ds, valid_ds


def _collate(samples: list[dict]) -> dict[str, torch.Tensor]:
    # GPTDataset already returns tokens/labels/position_ids as int64 and loss_mask as float32;
    # a BlendedDataset adds a "dataset_id" we do not need.
    return {k: torch.stack([s[k] for s in samples]) for k in BATCH_KEYS}  # each [b, s]


def batch_iterator(
    dataset: Dataset,
    *,
    micro_batch_size: int,
    global_batch_size: int,
    dp_rank: int,
    dp_size: int,
    consumed_samples: int = 0,
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless micro-batches for data-parallel rank `dp_rank`, starting at `consumed_samples`.

    The samples form one global stream, index `consumed_samples` onward, consumed in order like
    megatron's MegatronPretrainingSampler. Each global batch of `global_batch_size` samples is
    cut into `dp_size` contiguous slices; rank r takes slice r as consecutive micro-batches of
    `micro_batch_size`. (Megatron-LM's sampler instead interleaves ranks micro-batch by
    micro-batch; every global batch, hence every optimizer step, holds the same samples either
    way.) Resuming with the `consumed_samples` of a checkpoint continues the stream exactly.
    Past `len(dataset)` the stream wraps around to sample 0 and repeats the same order.

    Yields {"tokens", "labels", "position_ids": [b, s] int64, "loss_mask": [b, s] float32}.
    """
    if micro_batch_size < 1:
        raise ValueError(f"train.micro_batch_size={micro_batch_size} must be >= 1")
    if global_batch_size % (micro_batch_size * dp_size) != 0:
        raise ValueError(
            f"train.global_batch_size={global_batch_size} must be a multiple of "
            f"train.micro_batch_size * data-parallel size = {micro_batch_size} * {dp_size}"
        )
    assert 0 <= dp_rank < dp_size, (dp_rank, dp_size)
    assert consumed_samples >= 0, consumed_samples
    num_samples = len(dataset)
    if num_samples == 0:
        raise ValueError("the dataset has no samples; use more data or a shorter seq_length")

    per_rank = global_batch_size // dp_size
    batch_start = consumed_samples
    while True:
        rank_start = batch_start + dp_rank * per_rank
        for mb_start in range(rank_start, rank_start + per_rank, micro_batch_size):
            yield _collate(
                [dataset[i % num_samples] for i in range(mb_start, mb_start + micro_batch_size)]
            )
        batch_start += global_batch_size


def document_windows(prefixes: list[str], seq_length: int, max_tokens: int | None = None) -> Iterator[torch.Tensor]:
    """Evaluation windows over every document of `prefixes`, in order.

    The documents (each ending with its end-of-document token, as data.prepare writes them)
    are concatenated; window w holds tokens [w * S, (w + 1) * S] of that stream, S + 1 tokens:
    S inputs and their S next tokens (consecutive windows share one token). The tail that does
    not fill a window is dropped; with `max_tokens` the windows stop after the first that
    brings the predicted tokens to at least that many. Yields int64 [S + 1].
    """
    pending = torch.empty(0, dtype=torch.int64)  # the stream not yet windowed, shorter than a window
    predicted = 0
    for prefix in prefixes:
        dataset = IndexedDataset(prefix)
        for i in range(len(dataset)):
            pending = torch.cat([pending, torch.from_numpy(dataset[i].astype("int64"))])
            start = 0
            while len(pending) - start >= seq_length + 1:
                yield pending[start : start + seq_length + 1]
                start += seq_length
                predicted += seq_length
                if max_tokens is not None and predicted >= max_tokens:
                    return
            pending = pending[start:]
