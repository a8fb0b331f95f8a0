"""data/: prepare -> indexed dataset -> megatron GPTDataset -> batches, on real files."""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from data import (
    EOD_TOKEN,
    DataConfig,
    HFTokenizer,
    batch_iterator,
    build_datasets,
    load_tokenizer,
    prepare_default_corpus,
    write_indexed_dataset,
)

REPO = Path(__file__).resolve().parents[1]
SEQ = 37  # odd, so samples straddle documents at varying offsets
SEED = 1234


def _python(*args: str, cwd: Path = REPO) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen) -> str:
    """Wait for `proc`; return its stderr, failing the test with it if the exit code is not 0."""
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    return err


def _make_docs(rng: random.Random, n: int) -> list[str]:
    """Documents with the things a tokenizer gets wrong: unicode, leading spaces, newlines."""
    words = ["alpha", "beta", " gamma", "délta", "日本語", "🙂", "x = 1\n", "\tdef f():\n", " "]
    return ["".join(rng.choice(words) for _ in range(rng.randint(1, 40))) for _ in range(n)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Two prefixes sharing one tokenizer: A from the CLI (JSONL + a text file), B in-process."""
    root = tmp_path_factory.mktemp("tiny")
    rng = random.Random(0)
    docs_a = _make_docs(rng, 60)
    with open(root / "a.jsonl", "w") as f:
        for d in docs_a[:-1]:
            f.write(json.dumps({"text": d, "id": 0}) + "\n")
    (root / "last.txt").write_text(docs_a[-1], encoding="utf-8")
    err = _finish(_python(
        "-m", "data.prepare", "--input", str(root / "a.jsonl"), str(root / "last.txt"),
        "--tokenizer", str(root / "tok.json"), "--output-prefix", str(root / "a"),
        "--train-tokenizer", "300",
    ))
    assert "60 docs" in err and "MB/s" in err, err

    docs_b = _make_docs(rng, 40)
    with open(root / "b.jsonl", "w") as f:
        for d in docs_b:
            f.write(json.dumps({"body": d}) + "\n")
    tok = HFTokenizer(root / "tok.json")
    write_indexed_dataset([root / "b.jsonl"], tok, root / "b", text_key="body", progress=None)
    return {"root": root, "docs_a": docs_a, "docs_b": docs_b, "tok": tok}


@pytest.fixture(scope="module")
def tiny_train(tiny):
    cfg = DataConfig(
        prefixes=[str(tiny["root"] / "a")], tokenizer=str(tiny["root"] / "tok.json"),
        cache_dir=str(tiny["root"] / "cache"), split="90,10,0",
    )
    train, valid = build_datasets(
        cfg, seq_length=SEQ, seed=SEED, train_samples=50, valid_samples=4, tokenizer=tiny["tok"]
    )
    return train, valid


def test_prepared_documents_round_trip(tiny):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    tok = tiny["tok"]
    ds = IndexedDataset(str(tiny["root"] / "a"))
    assert ds.index.dtype == np.uint16
    assert len(ds) == len(tiny["docs_a"])
    for i, doc in enumerate(tiny["docs_a"]):
        ids = ds[i]
        assert ids[-1] == tok.eod and tok.eod not in ids[:-1]
        assert tok.detokenize(ids[:-1]) == doc
        np.testing.assert_array_equal(ids[:-1], tok.tokenize(doc))
    ds_b = IndexedDataset(str(tiny["root"] / "b"))
    assert [tok.detokenize(ds_b[i][:-1]) for i in range(len(ds_b))] == tiny["docs_b"]


def test_samples_are_shifted_document_text(tiny, tiny_train):
    tok = tiny["tok"]
    train, valid = tiny_train
    assert len(train) >= 50 and len(valid) >= 4
    corpus = EOD_TOKEN.join(tiny["docs_a"])
    for i in range(len(train)):
        s = train[i]
        assert s["tokens"].shape == (SEQ,) and s["tokens"].dtype == torch.int64
        torch.testing.assert_close(s["labels"][:-1], s["tokens"][1:])
        torch.testing.assert_close(s["position_ids"], torch.arange(SEQ))
        torch.testing.assert_close(s["loss_mask"], torch.ones(SEQ))
        # Documents are shuffled, so check each document-internal piece of the sample.
        text = tok.detokenize(torch.cat([s["tokens"], s["labels"][-1:]]))
        for piece in text.split(EOD_TOKEN):
            if "\ufffd" not in piece:  # a piece may start or end inside a multi-byte char
                assert piece in corpus


def test_eod_mask_loss(tiny):
    cfg = DataConfig(
        prefixes=[str(tiny["root"] / "a")], tokenizer=str(tiny["root"] / "tok.json"),
        cache_dir=str(tiny["root"] / "cache"), split="90,10,0", eod_mask_loss=True,
    )
    train, _ = build_datasets(
        cfg, seq_length=SEQ, seed=SEED, train_samples=50, valid_samples=0, tokenizer=tiny["tok"]
    )
    batch = next(batch_iterator(train, micro_batch_size=8, global_batch_size=8, dp_rank=0,
                                dp_size=1))
    is_eod = batch["tokens"] == tiny["tok"].eod
    assert is_eod.any()
    torch.testing.assert_close(batch["loss_mask"], (~is_eod).float())


def _stream(dataset, start: int, count: int) -> torch.Tensor:
    """Tokens of global samples start..start+count-1, wrapping like batch_iterator. [count, s]"""
    return torch.stack([dataset[i % len(dataset)]["tokens"] for i in range(start, start + count)])


def _take(it, n: int) -> list[dict[str, torch.Tensor]]:
    return [next(it) for _ in range(n)]


# Negative: counted back from the end of the dataset, so the stream wraps around mid-batch.
@pytest.mark.parametrize("consumed", [0, 8, 5, -5])
def test_dp_slices_partition_global_batches_and_resume(tiny_train, consumed):
    train, _ = tiny_train
    consumed %= len(train)
    mbs, gbs, dp = 2, 8, 2
    steps = 3
    per_rank = [
        _take(batch_iterator(train, micro_batch_size=mbs, global_batch_size=gbs, dp_rank=r,
                             dp_size=dp, consumed_samples=consumed), steps * gbs // (mbs * dp))
        for r in range(dp)
    ]
    for b in per_rank[0] + per_rank[1]:
        assert b["tokens"].shape == (mbs, SEQ) and b["loss_mask"].dtype == torch.float32
    micro_per_step = gbs // (mbs * dp)
    for step in range(steps):
        global_batch = torch.cat([
            b["tokens"]
            for r in range(dp)
            for b in per_rank[r][step * micro_per_step:(step + 1) * micro_per_step]
        ])
        torch.testing.assert_close(global_batch, _stream(train, consumed + step * gbs, gbs))

    # Resuming at a step boundary continues the uninterrupted run exactly.
    if consumed % gbs == 0 and consumed > 0:
        fresh = _take(batch_iterator(train, micro_batch_size=mbs, global_batch_size=gbs,
                                     dp_rank=1, dp_size=dp), (consumed // gbs + 1) * 2)
        for a, b in zip(fresh[consumed // gbs * 2:], per_rank[1]):
            torch.testing.assert_close(a["tokens"], b["tokens"])


def test_batch_iterator_rejects_indivisible_global_batch(tiny_train):
    with pytest.raises(ValueError, match="train.global_batch_size"):
        next(batch_iterator(tiny_train[0], micro_batch_size=3, global_batch_size=8, dp_rank=0,
                            dp_size=2))


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"prefixes": ["a", "b"], "weights": [1.0], "tokenizer": "t.json"}, "data.weights"),
        ({"prefixes": ["a"]}, "data.tokenizer"),
        ({"tokenizer": "t.json"}, "data.tokenizer"),
        ({"vocab_size": 200}, "data.vocab_size"),
        ({"split": "98;2"}, "data.split"),
        ({"split": "0,1,0"}, "data.split"),
    ],
)
def test_config_errors_name_the_key(kwargs, key):
    with pytest.raises(ValueError, match=key):
        DataConfig(**kwargs)


def test_validate_paths_says_what_to_run(tiny, tmp_path):
    tok = str(tiny["root"] / "tok.json")
    missing = DataConfig(prefixes=[str(tmp_path / "nope")], tokenizer=tok)
    with pytest.raises(ValueError, match=r"data\.prefixes\[0\].*python -m data\.prepare"):
        missing.validate_paths()
    no_tok = DataConfig(prefixes=[str(tiny["root"] / "a")], tokenizer=str(tmp_path / "t.json"))
    with pytest.raises(ValueError, match=r"data\.tokenizer.*--train-tokenizer"):
        no_tok.validate_paths()


def test_split_without_documents_is_rejected(tiny):
    # 60 documents: 0.5% of them rounds to none, which would hang megatron's epoch count.
    cfg = DataConfig(prefixes=[str(tiny["root"] / "a")], tokenizer=str(tiny["root"] / "tok.json"),
                     cache_dir=str(tiny["root"] / "cache"), split="99.5,0.5,0")
    with pytest.raises(ValueError, match="data.split"):
        build_datasets(cfg, seq_length=SEQ, seed=SEED, train_samples=8, valid_samples=2,
                       tokenizer=tiny["tok"])


def _rank_worker(rank: int, world: int, root: str, tiny_root: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{root}/pg", rank=rank, world_size=world)
    out = {}
    # Both ranks race to create the default corpus, as two jobs sharing a cache dir would.
    dist.barrier()
    log = io.StringIO()
    with contextlib.redirect_stderr(log):
        prepare_default_corpus(f"{root}/cache", 4096)
    out["prepare_log"] = log.getvalue()

    cfg = DataConfig(cache_dir=f"{root}/cache")
    tok = load_tokenizer(cfg)
    train, valid = build_datasets(cfg, seq_length=256, seed=SEED, train_samples=320,
                                  valid_samples=16, tokenizer=tok)
    it = batch_iterator(train, micro_batch_size=2, global_batch_size=8, dp_rank=rank,
                        dp_size=world)
    out["default"] = torch.stack([b["tokens"] for b in _take(it, 4)])  # [4, 2, 256]
    out["default_valid"] = _stream(valid, 0, 4)
    # A weighted blend, which megatron-core only builds with torch.distributed initialised.
    blend = DataConfig(prefixes=[f"{tiny_root}/a", f"{tiny_root}/b"], weights=[1.0, 3.0],
                       tokenizer=f"{tiny_root}/tok.json", cache_dir=f"{root}/cache")
    train_b, _ = build_datasets(blend, seq_length=SEQ, seed=SEED, train_samples=200,
                                valid_samples=0, tokenizer=load_tokenizer(blend))
    out["blend_ids"] = torch.tensor([int(train_b[i]["dataset_id"]) for i in range(200)])
    out["blend"] = _stream(train_b, 0, 16)
    torch.save(out, f"{root}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def gloo_job(tiny, tmp_path_factory):
    """Outputs of a 2-rank gloo job that creates the default corpus and reads batches."""
    root = tmp_path_factory.mktemp("gloo")
    mp.spawn(_rank_worker, args=(2, str(root), str(tiny["root"])), nprocs=2, join=True)
    return root, [torch.load(root / f"rank{r}.pt") for r in range(2)]


@pytest.mark.multiproc
def test_default_corpus_first_use_is_race_free_then_idempotent(gloo_job, capfd):
    root, outs = gloo_job
    assert sum("prepared the default corpus" in o["prepare_log"] for o in outs) == 1, outs
    cache = root / "cache"
    assert not list(cache.glob("*.tmp-*"))

    prefix, tokenizer = prepare_default_corpus(cache, 4096)
    files = [prefix + ".bin", prefix + ".idx", tokenizer]
    mtimes = [os.stat(f).st_mtime_ns for f in files]
    capfd.readouterr()
    assert prepare_default_corpus(cache, 4096) == (prefix, tokenizer)
    assert [os.stat(f).st_mtime_ns for f in files] == mtimes
    assert "prepared" not in capfd.readouterr().err
    manifest = json.loads((Path(prefix).parent / "manifest.json").read_text())
    assert manifest["tokens"] > 2_000_000 and HFTokenizer(tokenizer).vocab_size == 4096


@pytest.mark.multiproc
def test_two_gloo_ranks_share_datasets_and_split_batches(gloo_job):
    root, outs = gloo_job
    # The ranks saw the same datasets; a single-process read of the corpus agrees with them.
    for key in ("default_valid", "blend_ids", "blend"):
        torch.testing.assert_close(outs[0][key], outs[1][key])
    cfg = DataConfig(cache_dir=str(root / "cache"))
    train, _ = build_datasets(cfg, seq_length=256, seed=SEED, train_samples=320, valid_samples=16,
                              tokenizer=load_tokenizer(cfg))
    # Rank r's 2 micro-batches of step k are slice r of global batch k.
    for step in range(2):
        for r in range(2):
            got = outs[r]["default"][2 * step:2 * step + 2].reshape(4, 256)
            torch.testing.assert_close(got, _stream(train, 8 * step + 4 * r, 4))
    share_b = outs[0]["blend_ids"].float().mean().item()
    assert abs(share_b - 0.75) < 0.02, share_b


@pytest.mark.slow
def test_blend_without_distributed_is_refused_clearly(tiny):
    """Run in a fresh interpreter: the test session may already hold a process group."""
    code = f"""
import pytest, sys
sys.path.insert(0, {str(REPO)!r})
from data import DataConfig, HFTokenizer, build_datasets
cfg = DataConfig(prefixes=[{str(tiny["root"] / "a")!r}, {str(tiny["root"] / "b")!r}],
                 tokenizer={str(tiny["root"] / "tok.json")!r},
                 cache_dir={str(tiny["root"] / "cache")!r})
with pytest.raises(RuntimeError, match="torch.distributed"):
    build_datasets(cfg, seq_length={SEQ}, seed={SEED}, train_samples=8, valid_samples=0,
                   tokenizer=HFTokenizer(cfg.tokenizer))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def _without_endoftext(src: Path, dst: Path) -> None:
    """A copy of tokenizer `src` whose <|endoftext|> is renamed </s>, as a released model's
    tokenizer.json has its own end-of-document token."""
    spec = json.loads(src.read_text())
    for token in spec["added_tokens"]:
        if token["content"] == EOD_TOKEN:
            token["content"] = "</s>"
    spec["model"]["vocab"]["</s>"] = spec["model"]["vocab"].pop(EOD_TOKEN)
    dst.write_text(json.dumps(spec))


@pytest.mark.slow
def test_released_tokenizers_take_the_eod_of_their_checkpoint(tiny, tmp_path):
    from data.tokenizer import CHECKPOINT_MARKER, eod_of_checkpoint
    from pretrain.checkpoint import MARKER

    assert CHECKPOINT_MARKER == MARKER
    released = tmp_path / "tokenizer.json"
    _without_endoftext(tiny["root"] / "tok.json", released)
    with pytest.raises(ValueError, match="--eod ID or --eod-from"):
        HFTokenizer(released)
    eos = HFTokenizer(tiny["root"] / "tok.json").eod  # the id the renamed token kept
    assert HFTokenizer(released, eod=eos).eod == eos
    with pytest.raises(ValueError, match="outside the vocabulary"):
        HFTokenizer(released, eod=10**6)

    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"eos_token_id": [eos, 1]}))
    ours = tmp_path / "ckpt" / "iter_0000004"
    ours.mkdir(parents=True)
    (ours / MARKER).write_text(json.dumps({"config": {"model": {"eod_token_id": eos}}}))
    assert eod_of_checkpoint(hf) == eod_of_checkpoint(ours.parent) == eod_of_checkpoint(ours) == eos
    with pytest.raises(ValueError, match="neither a Hugging Face checkpoint"):
        eod_of_checkpoint(tmp_path / "nothing")

    # data.prepare with the released tokenizer ends every document with the checkpoint's id
    err = _finish(_python("-m", "data.prepare", "--input", str(tiny["root"] / "b.jsonl"), "--text-key", "body",
                          "--tokenizer", str(released), "--output-prefix", str(tmp_path / "c"), "--eod-from", str(hf)))
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    docs = IndexedDataset(str(tmp_path / "c"))
    assert len(docs) == len(tiny["docs_b"]) and all(docs[i][-1] == eos for i in range(len(docs))), err


def test_evaluation_windows_tile_the_document_stream(tiny):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from data.loader import document_windows

    prefixes = [str(tiny["root"] / "a"), str(tiny["root"] / "b")]
    stream = torch.cat([torch.from_numpy(ds[i].astype(np.int64)) for p in prefixes
                        for ds in [IndexedDataset(p)] for i in range(len(ds))])
    windows = list(document_windows(prefixes, SEQ))
    assert len(windows) == (len(stream) - 1) // SEQ  # the tail that fills no window is dropped
    for w, window in enumerate(windows):
        assert torch.equal(window, stream[w * SEQ : (w + 1) * SEQ + 1]), w
    assert len(list(document_windows(prefixes, SEQ, max_tokens=3 * SEQ))) == 3
    assert len(list(document_windows(prefixes, SEQ, max_tokens=3 * SEQ + 1))) == 4
