"""Byte-level BPE tokenizer: training with HF `tokenizers`, and megatron-core's tokenizer interface.

megatron-core's new tokenizer system (`megatron.core.tokenizers`) wraps HF tokenizers only
through `transformers`, which we do not depend on; GPTDataset only needs the legacy interface
(`vocab_size`, `eod`, `unique_identifiers`), so we implement that over `tokenizers` directly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Sequence

import numpy as np
from megatron.core.datasets.megatron_tokenizer import MegatronLegacyTokenizer
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from data.config import MIN_VOCAB_SIZE
from data.documents import read_documents

EOD_TOKEN = "<|endoftext|>"
"""Appended after every document; the only special token."""


class _DropLegacyTokenizerNotice(logging.Filter):
    """We use the legacy interface on purpose (see above); its deprecation notice on every
    tokenizer construction would only be noise in each rank's log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("You're using the legacy tokenizer system")


logging.getLogger("megatron.core.datasets.megatron_tokenizer").addFilter(
    _DropLegacyTokenizerNotice()
)


def train_tokenizer(
    files: Sequence[str | os.PathLike],
    vocab_size: int,
    out_path: str | os.PathLike,
    *,
    text_key: str = "text",
) -> str:
    """Train a byte-level BPE on the documents of `files`; save it to `out_path` (tokenizer.json).

    Deterministic for a given document stream. `files` are read with `read_documents` (JSONL or
    one document per file). The file is written under a temporary name and renamed, so a killed
    run never leaves a truncated tokenizer. Returns the absolute path written.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size={vocab_size} is below {MIN_VOCAB_SIZE} (256 byte tokens + {EOD_TOKEN})"
        )
    tokenizer = Tokenizer(models.BPE())
    # No prefix space: decode(encode(text)) must give `text` back byte for byte.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOD_TOKEN],
        # All 256 bytes, so that no input is ever out of vocabulary.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(read_documents(files, text_key=text_key), trainer)

    out_path = os.path.abspath(os.fspath(out_path))
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    tmp_path = f"{out_path}.tmp-{os.getpid()}"
    tokenizer.save(tmp_path)
    os.replace(tmp_path, out_path)
    return out_path


class HFTokenizer(MegatronLegacyTokenizer):
    """A tokenizer.json (from `train_tokenizer`, or a released model's) behind megatron-core's
    tokenizer interface.

    The end-of-document token is `eod` when given (a released model's eos id, e.g. M2's
    200020), else the tokenizer's <|endoftext|>. `unique_identifiers` (which megatron hashes
    into its dataset index cache names) hold the absolute path, a digest of the file and the
    end-of-document id, so retraining a tokenizer in place invalidates the cached indices built
    with the old one.
    """

    def __init__(self, path: str | os.PathLike, eod: int | None = None) -> None:
        path = os.path.abspath(os.path.expanduser(os.fspath(path)))
        with open(path, "rb") as f:
            raw = f.read()
        super().__init__(path, sha256=hashlib.sha256(raw).hexdigest()[:16], **({} if eod is None else {"eod": eod}))
        self.path = path
        self._tokenizer = Tokenizer.from_str(raw.decode("utf-8"))
        if eod is None:
            eod = self._tokenizer.token_to_id(EOD_TOKEN)
            if eod is None:
                raise ValueError(
                    f"tokenizer {path} has no {EOD_TOKEN} token: give the end-of-document id of the "
                    "model it belongs to (data.prepare --eod ID or --eod-from CHECKPOINT; training and "
                    "evaluation take it from the checkpoint's model.eod_token_id), or train one with "
                    "`python -m data.prepare --train-tokenizer VOCAB ...`"
                )
        elif not 0 <= eod < self._tokenizer.get_vocab_size(with_added_tokens=True):
            raise ValueError(f"end-of-document id {eod} is outside the vocabulary of tokenizer {path}")
        self._eod = eod
        self._vocab = self._tokenizer.get_vocab(with_added_tokens=True)
        self._inv_vocab = {i: t for t, i in self._vocab.items()}

    def tokenize(self, text: str) -> np.ndarray:
        """Token ids of `text`, without the end-of-document token. [n] int64"""
        return np.asarray(self._tokenizer.encode(text).ids, dtype=np.int64)

    def tokenize_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """`tokenize` over many texts at once, parallel inside `tokenizers`. each [n_i] int64"""
        encodings = self._tokenizer.encode_batch(list(texts))
        return [np.asarray(e.ids, dtype=np.int64) for e in encodings]

    def detokenize(self, ids: Iterable[int] | np.ndarray) -> str:
        """Text of `ids`; special tokens are kept, so an EOD shows up as `<|endoftext|>`."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1).tolist()
        return self._tokenizer.decode(ids, skip_special_tokens=False)

    @property
    def vocab(self) -> dict[str, int]:
        return self._vocab

    @property
    def inv_vocab(self) -> dict[int, str]:
        return self._inv_vocab

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def eod(self) -> int:
        return self._eod

    def check_fits(self, vocab_size: int, what: str) -> None:
        """ValueError when token ids reach past `vocab_size` rows of the model's embedding."""
        if self.vocab_size > vocab_size:
            raise ValueError(
                f"the tokenizer {self.path} has {self.vocab_size} tokens but {what} has {vocab_size} "
                "embedding rows (model.vocab_size): raise model.vocab_size (a model trained from "
                "scratch), or use the tokenizer its weights were trained with"
            )


CHECKPOINT_MARKER = "m2_checkpoint.json"
"""pretrain/checkpoint.py's MARKER (data sits below pretrain; tests/test_data.py checks they agree)."""


def eod_of_checkpoint(directory: str | os.PathLike) -> int:
    """The end-of-document id a checkpoint's model was trained with: a Hugging Face checkpoint's
    config.json eos_token_id (the first, if a list), or one of ours: model.eod_token_id of an
    iter_* directory (or of the newest complete one inside `directory`)."""
    root = os.path.abspath(os.path.expanduser(os.fspath(directory)))
    hf_config = os.path.join(root, "config.json")
    if os.path.isfile(hf_config):
        with open(hf_config) as f:
            eos = json.load(f).get("eos_token_id")
        eos = eos[0] if isinstance(eos, list) and eos else eos
        if not isinstance(eos, int):
            raise ValueError(f"{hf_config} has no eos_token_id")
        return eos
    markers = [os.path.join(root, CHECKPOINT_MARKER)] + sorted(
        (os.path.join(root, d, CHECKPOINT_MARKER) for d in os.listdir(root) if d.startswith("iter_")),
        reverse=True,
    ) if os.path.isdir(root) else []
    for marker in markers:
        if os.path.isfile(marker):
            with open(marker) as f:
                eos = json.load(f)["config"]["model"].get("eod_token_id")
            if eos is None:
                raise ValueError(f"{marker}: its model has no eod_token_id (it uses the tokenizer's {EOD_TOKEN})")
            return eos
    raise ValueError(f"{root}: neither a Hugging Face checkpoint (config.json) nor a checkpoint of this project")
