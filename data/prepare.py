"""Text -> megatron-core indexed dataset (.bin/.idx), and the default corpus.

    python -m data.prepare --input docs.jsonl more.txt --tokenizer tok.json \
        --output-prefix /data/mycorpus [--text-key text] [--train-tokenizer 32000]

The default corpus (used when `data.prefixes` is null) is the source of Python's standard
library: it is on every machine, needs no download, and is a few million tokens of real text.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import sys
import sysconfig
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import TextIO

import numpy as np
from filelock import FileLock
from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

from data.documents import read_documents
from data.tokenizer import HFTokenizer, eod_of_checkpoint, train_tokenizer

DEFAULT_CORPUS = "stdlib-v1"
"""Bump the version when the file selection or tokenizer recipe changes, so caches rebuild."""

# Directory names under the stdlib that are not part of the corpus: installed packages are not
# "the standard library", and the test suites are large, repetitive and partly non-UTF-8.
_STDLIB_EXCLUDED_DIRS = frozenset(
    {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}
)

# Documents are tokenized in chunks so `tokenizers` can parallelise within a chunk while memory
# stays bounded for corpora larger than RAM.
_CHUNK_DOCS = 256
_CHUNK_CHARS = 8 << 20
_PROGRESS_EVERY_S = 5.0


@dataclass
class PrepareStats:
    """What `write_indexed_dataset` wrote."""

    documents: int
    """Number of documents (each ends with one EOD token)."""

    tokens: int
    """Number of tokens including the EOD tokens."""

    text_bytes: int
    """UTF-8 size of the input text."""

    seconds: float
    """Wall time of tokenizing and writing."""


def token_dtype(vocab_size: int) -> type[np.number]:
    """Storage dtype for token ids: uint16 below 65500 ids (megatron's rule), else int32."""
    return DType.optimal_dtype(vocab_size)


def write_indexed_dataset(
    files: Sequence[str | os.PathLike],
    tokenizer: HFTokenizer,
    output_prefix: str | os.PathLike,
    *,
    text_key: str = "text",
    progress: TextIO | None = sys.stderr,
) -> PrepareStats:
    """Tokenize the documents of `files`, append EOD to each, write `output_prefix`.bin/.idx.

    Both files are written under temporary names and renamed at the end, the .idx last: a
    prefix whose .idx exists is complete. Progress lines go to `progress` (None = silent).
    """
    output_prefix = os.path.abspath(os.fspath(output_prefix))
    os.makedirs(os.path.dirname(output_prefix), exist_ok=True)
    tmp_prefix = f"{output_prefix}.tmp-{os.getpid()}"
    dtype = token_dtype(tokenizer.vocab_size)
    builder = IndexedDatasetBuilder(tmp_prefix + ".bin", dtype=dtype)

    stats = PrepareStats(documents=0, tokens=0, text_bytes=0, seconds=0.0)
    t_start = last_report = time.monotonic()

    def report(final: bool) -> None:
        elapsed = max(time.monotonic() - t_start, 1e-9)
        what = f"wrote {output_prefix}.bin/.idx:" if final else "prepare:"
        print(
            f"data.prepare {what} {stats.documents:,} docs, {stats.tokens:,} tokens "
            f"({np.dtype(dtype).name}), {stats.text_bytes / 1e6:.1f} MB text, "
            f"{stats.text_bytes / 1e6 / elapsed:.1f} MB/s, {elapsed:.1f} s",
            file=progress,
            flush=True,
        )

    def flush(chunk: list[str]) -> None:
        for text, ids in zip(chunk, tokenizer.tokenize_batch(chunk)):
            ids = np.append(ids, tokenizer.eod)  # [n + 1]
            builder.add_document(ids, [ids.size])
            stats.documents += 1
            stats.tokens += ids.size
            stats.text_bytes += len(text.encode("utf-8"))

    try:
        chunk: list[str] = []
        chunk_chars = 0
        for text in read_documents(files, text_key=text_key):
            chunk.append(text)
            chunk_chars += len(text)
            if len(chunk) >= _CHUNK_DOCS or chunk_chars >= _CHUNK_CHARS:
                flush(chunk)
                chunk, chunk_chars = [], 0
                if progress is not None and time.monotonic() - last_report > _PROGRESS_EVERY_S:
                    report(final=False)
                    last_report = time.monotonic()
        flush(chunk)
        if stats.documents == 0:
            raise ValueError(f"--input {list(map(os.fspath, files))} holds no non-empty document")
        builder.finalize(tmp_prefix + ".idx")
    except BaseException:
        builder.data_file.close()
        for suffix in (".bin", ".idx"):
            if os.path.exists(tmp_prefix + suffix):
                os.remove(tmp_prefix + suffix)
        raise

    # Drop the old .idx first: a crash between the two renames then leaves no .idx (incomplete)
    # rather than a new .bin paired with a stale .idx.
    if os.path.exists(output_prefix + ".idx"):
        os.remove(output_prefix + ".idx")
    os.replace(tmp_prefix + ".bin", output_prefix + ".bin")
    os.replace(tmp_prefix + ".idx", output_prefix + ".idx")
    stats.seconds = time.monotonic() - t_start
    if progress is not None:
        report(final=True)
    return stats


def stdlib_files() -> list[str]:
    """The default corpus documents: every .py file of this Python's stdlib, in a fixed order."""
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_EXCLUDED_DIRS]
        files += [os.path.join(dirpath, f) for f in filenames if f.endswith(".py")]
    # Sort on the path relative to the stdlib root so the order does not depend on where
    # Python is installed.
    return sorted(files, key=lambda f: os.path.relpath(f, root).split(os.sep))


def default_corpus_dir(cache_dir: str | os.PathLike, vocab_size: int) -> str:
    """Directory holding the default corpus for `vocab_size`."""
    cache_dir = os.path.abspath(os.path.expanduser(os.fspath(cache_dir)))
    return os.path.join(cache_dir, f"{DEFAULT_CORPUS}-{vocab_size}")


def default_corpus_paths(cache_dir: str | os.PathLike, vocab_size: int) -> tuple[str, str]:
    """(indexed dataset prefix, tokenizer.json) of the default corpus; may not exist yet."""
    corpus_dir = default_corpus_dir(cache_dir, vocab_size)
    return os.path.join(corpus_dir, "stdlib"), os.path.join(corpus_dir, "tokenizer.json")


def _is_complete(corpus_dir: str) -> bool:
    names = ("tokenizer.json", "stdlib.bin", "stdlib.idx", "manifest.json")
    return all(os.path.isfile(os.path.join(corpus_dir, n)) for n in names)


def prepare_default_corpus(cache_dir: str | os.PathLike, vocab_size: int) -> tuple[str, str]:
    """Make sure the default corpus exists under `cache_dir`; return (prefix, tokenizer path).

    The first call trains the tokenizer on the stdlib sources and writes the indexed dataset
    into a temporary directory that is renamed into place when complete; later calls return at
    once. Concurrent callers (ranks of one job, or separate jobs) serialise on a file lock, and
    the losers find the finished corpus.
    """
    corpus_dir = default_corpus_dir(cache_dir, vocab_size)
    paths = default_corpus_paths(cache_dir, vocab_size)
    if _is_complete(corpus_dir):
        return paths
    os.makedirs(os.path.dirname(corpus_dir), exist_ok=True)
    with FileLock(corpus_dir + ".lock"):
        if _is_complete(corpus_dir):
            return paths
        # Under the lock, any temporary directory is left over from a killed prepare.
        for stale in glob.glob(glob.escape(corpus_dir) + ".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if os.path.exists(corpus_dir):
            shutil.rmtree(corpus_dir)

        t_start = time.monotonic()
        tmp_dir = f"{corpus_dir}.tmp-{os.getpid()}"
        os.makedirs(tmp_dir)
        files = stdlib_files()
        tokenizer_path = train_tokenizer(files, vocab_size, os.path.join(tmp_dir, "tokenizer.json"))
        stats = write_indexed_dataset(
            files, HFTokenizer(tokenizer_path), os.path.join(tmp_dir, "stdlib"), progress=None
        )
        manifest = {
            "corpus": DEFAULT_CORPUS,
            "python": sys.version.split()[0],
            "stdlib": sysconfig.get_paths()["stdlib"],
            "files": len(files),
            "vocab_size": vocab_size,
            **asdict(stats),
        }
        with open(os.path.join(tmp_dir, "manifest.json"), "w") as f:
            json.dump(manifest, f, indent=2)
        os.rename(tmp_dir, corpus_dir)
        print(
            f"data: prepared the default corpus (Python {manifest['python']} stdlib, "
            f"{len(files)} files, {stats.text_bytes / 1e6:.1f} MB -> {stats.tokens:,} tokens, "
            f"vocab {vocab_size}) in {time.monotonic() - t_start:.1f} s at {corpus_dir}",
            file=sys.stderr,
            flush=True,
        )
    return paths


def main(argv: Iterable[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m data.prepare",
        description="Tokenize documents into a megatron-core indexed dataset (PREFIX.bin/.idx). "
        "Files ending in .jsonl/.json/.ndjson hold one JSON document per line; any other file "
        "is one document. Every document gets an end-of-document token appended.",
    )
    parser.add_argument("--input", nargs="+", required=True, metavar="FILE", help="input files")
    parser.add_argument(
        "--tokenizer",
        required=True,
        metavar="TOKENIZER_JSON",
        help="HF tokenizer.json to use (or to write, with --train-tokenizer)",
    )
    parser.add_argument(
        "--output-prefix",
        required=True,
        metavar="PREFIX",
        help="writes PREFIX.bin and PREFIX.idx (the value for data.prefixes)",
    )
    parser.add_argument(
        "--text-key", default="text", help="JSONL field holding the text (default: text)"
    )
    eod = parser.add_mutually_exclusive_group()
    eod.add_argument(
        "--eod", type=int, metavar="ID",
        help="end-of-document token id (default: the tokenizer's <|endoftext|>), e.g. 200020 for M2's tokenizer",
    )
    eod.add_argument(
        "--eod-from", metavar="CHECKPOINT",
        help="take the end-of-document id from a checkpoint: a Hugging Face one (config.json eos_token_id) "
        "or one of this project (its model.eod_token_id)",
    )
    parser.add_argument(
        "--train-tokenizer",
        type=int,
        metavar="VOCAB",
        help="first train a byte-level BPE of VOCAB tokens on the inputs, written to --tokenizer",
    )
    args = parser.parse_args(None if argv is None else list(argv))

    try:
        if args.train_tokenizer is not None:
            t_start = time.monotonic()
            train_tokenizer(
                args.input, args.train_tokenizer, args.tokenizer, text_key=args.text_key
            )
            print(
                f"data.prepare: trained tokenizer ({args.train_tokenizer} tokens) in "
                f"{time.monotonic() - t_start:.1f} s -> {args.tokenizer}",
                file=sys.stderr,
                flush=True,
            )
        elif not os.path.isfile(args.tokenizer):
            raise ValueError(
                f"--tokenizer {args.tokenizer} does not exist; pass --train-tokenizer VOCAB to "
                "train one on the inputs"
            )
        eod = eod_of_checkpoint(args.eod_from) if args.eod_from else args.eod
        write_indexed_dataset(
            args.input, HFTokenizer(args.tokenizer, eod=eod), args.output_prefix, text_key=args.text_key
        )
    except ValueError as err:
        parser.error(str(err))


if __name__ == "__main__":
    main()
