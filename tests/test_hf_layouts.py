"""A released-format MiniMax-M2 (tiny, every tensor random, from transformers) in parallel
layouts, through the user's commands: `convert import-hf` under torchrun in pp2 evaluated by
`python -m pretrain.evaluate` in tp2, and `checkpoint.init_from=hf:DIR` read on the fly by
`python -m pretrain` in ep2 evaluated in ep2, equal transformers' loss over the same windows
(fp32, rel 1e-5); the pp2 checkpoint exported back reloads in transformers with equal logits.
One 2-process run per layout family and command.

The released MiniMax-M3 (tests/test_m3.py's tiny random model, vision tower included, MSA
layers selecting) the same way: imported once under ep2, evaluated in tp2 x ep2, pp2 and cp2
(MSA on the context-parallel ring), equal transformers' loss."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers

from conftest import run_module
from test_convert import TINY_HF, random_hf_model
from test_m3 import TINY_M3, random_m3, save_released

pytestmark = pytest.mark.multiproc

S, MAX_TOKENS = 32, 300
WINDOWS = math.ceil(MAX_TOKENS / S)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(the HF model, its released checkpoint, a corpus prefix and its tokenizer over the same
    vocabulary, the HF loss over evaluate's windows of that corpus)."""
    root = tmp_path_factory.mktemp("hf_layouts")
    model = random_hf_model(seed=7)
    model.save_pretrained(root / "hf")
    return model, root, _corpus_and_loss(model, root, TINY_HF["vocab_size"], TINY_HF["eos_token_id"], S)


def _corpus_and_loss(model, root: Path, vocab: int, eos: int, seq: int) -> float:
    """Write a word-level tokenizer over the vocabulary and a corpus of random documents to
    `root`; return the HF model's loss over evaluate's windows of `seq` tokens (eval.max_tokens
    MAX_TOKENS)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    from tokenizers import Tokenizer, models

    words = {f"t{i}": i for i in range(vocab)}
    Tokenizer(models.WordLevel(words, unk_token="t0")).save(str(root / "tokenizer.json"))
    rng = np.random.default_rng(0)
    builder = IndexedDatasetBuilder(str(root / "corpus.bin"), dtype=np.int32)
    docs = []
    for _ in range(20):
        doc = np.append(rng.integers(3, vocab, rng.integers(5, 60)), eos).astype(np.int32)
        builder.add_document(torch.from_numpy(doc), [len(doc)])
        docs.append(doc)
    builder.finalize(str(root / "corpus.idx"))
    stream = torch.from_numpy(np.concatenate(docs).astype(np.int64))
    windows = math.ceil(MAX_TOKENS / seq)
    batch = torch.stack([stream[w * seq : w * seq + seq + 1] for w in range(windows)])
    with torch.no_grad():
        logits = model(batch[:, :-1]).logits
    return F.cross_entropy(logits.reshape(-1, vocab).float(), batch[:, 1:].reshape(-1)).item()


def _run(args: list[str], cwd: Path) -> str:
    result = run_module(args, cwd=cwd, nproc=2, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result.stdout


def _evaluate(root: Path, ckpt: Path, layout: tuple[str, ...], name: str, seq: int = S) -> dict:
    out = _run(["pretrain.evaluate", f"hydra.run.dir={root}/eval_{name}", f"checkpoint.dir={ckpt}",
                f"data.prefixes=[{root / 'corpus'}]", f"data.tokenizer={root / 'tokenizer.json'}",
                f"train.seq_length={seq}", f"eval.max_tokens={MAX_TOKENS}", *layout, "logger.wandb.mode=disabled"], root)
    return json.loads(out.strip().splitlines()[-1])


def test_import_in_pp2_evaluates_in_tp2_to_transformers_loss(setup):
    """`convert import-hf` under pp2 writes a checkpoint that evaluates under tp2 (dist
    checkpoints are layout-independent) to transformers' loss; exported back to Hugging Face
    from that sharded checkpoint it gives transformers' logits."""
    model, root, want = setup
    ckpt = root / "ckpt_pp2"
    _run(["convert", "import-hf", "--hf", str(root / "hf"), "--out", str(ckpt), "--dtype", "fp32", "--progress", "lines",
          "parallel.pp=2"], root)
    result = _evaluate(root, ckpt, ("parallel.tp=2",), "tp2")
    assert result["windows"] == WINDOWS and result["tokens"] == WINDOWS * S and result["iteration"] == 0
    assert result["loss"] == pytest.approx(want, rel=1e-5)
    export = run_module(["convert", "export-hf", "--checkpoint", str(ckpt), "--out", str(root / "export"),
                         "--dtype", "fp32"], cwd=root)
    assert export.returncode == 0, export.stderr[-3000:]
    reloaded = transformers.MiniMaxM2ForCausalLM.from_pretrained(root / "export").eval()
    tokens = torch.randint(0, TINY_HF["vocab_size"], (2, 29), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(tokens).logits, model(tokens).logits, rtol=1e-5, atol=1e-5)


def test_training_starts_from_hf_weights_read_on_the_fly_in_ep2(setup):
    """checkpoint.init_from=hf:DIR: each rank reads its shards of the HF checkpoint; the shape
    comes from config.json; the initial weights (checkpoint.save_initial) evaluate to
    transformers' loss."""
    model, root, want = setup
    out = _run(["pretrain", f"hydra.run.dir={root}/train_ep2", f"checkpoint.dir={root}/ckpt_ep2",
                f"checkpoint.init_from=hf:{root / 'hf'}", "checkpoint.save_initial=true", "train.iters=1",
                "model.attention.type=dense", f"data.prefixes=[{root / 'corpus'}]",
                f"data.tokenizer={root / 'tokenizer.json'}", "data.split='80,20,0'", f"train.seq_length={S}", "train.global_batch_size=2",
                "train.micro_batch_size=1", "parallel.ep=2", "logger.wandb.mode=disabled", "train.eval_interval=0",
                "train.eval_iters=1"], root)
    run_dir = root / "train_ep2"
    log = (run_dir / "pretrain.log").read_text() if (run_dir / "pretrain.log").exists() else out
    assert f"initialised from hf:{root / 'hf'}" in log, log[-2000:]
    import shutil

    initial = root / "ckpt_ep2_initial"
    initial.mkdir()
    shutil.copytree(root / "ckpt_ep2" / "iter_0000000", initial / "iter_0000000")
    assert _evaluate(root, initial, ("parallel.ep=2",), "ep2_initial")["loss"] == pytest.approx(want, rel=1e-5)


M3_S = 64
"""M3 windows: 8 key blocks of 8 with top-2 selection, so the MSA layers select."""


@pytest.fixture(scope="module")
def m3_setup(tmp_path_factory):
    """(root, the tiny M3's checkpoint imported by `convert import-hf` under ep2 from its released
    form, transformers' loss over evaluate's windows). The checkpoint is layout-independent:
    each test evaluates it in another layout."""
    root = tmp_path_factory.mktemp("m3_layouts")
    model = random_m3(seed=7)
    save_released(model, root / "hf")
    want = _corpus_and_loss(model, root, TINY_M3["vocab_size"], TINY_M3["eos_token_id"], M3_S)
    ckpt = root / "ckpt"
    result = run_module(["convert", "import-hf", "--hf", str(root / "hf"), "--out", str(ckpt), "--dtype", "fp32",
                         "--progress", "lines", "parallel.ep=2"], cwd=root, nproc=2, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stderr.count("skipped 27 tensors of the vision model") == 1  # rank 0's line
    return root, ckpt, want


@pytest.mark.parametrize("layout", [("parallel.tp=2", "parallel.etp=1", "parallel.ep=2"), ("parallel.pp=2",),
                                    ("parallel.cp=2",)], ids=["tp2_ep2", "pp2", "cp2"])
def test_m3_imported_evaluates_to_transformers_loss_in_a_layout(m3_setup, layout):
    """tp2 x ep2 on two processes (index branch replicated, per-head QK-norm, shared expert and
    dense MLP split over TP; the routed experts over EP), pp2 (dense and MSA layers on different
    stages), cp2 (MSA on the context-parallel ring)."""
    root, ckpt, want = m3_setup
    name = "_".join(o.split(".")[1].replace("=", "") for o in layout)
    result = _evaluate(root, ckpt, layout, name, seq=M3_S)
    assert result["windows"] == math.ceil(MAX_TOKENS / M3_S) and result["iteration"] == 0
    assert result["loss"] == pytest.approx(want, rel=1e-5)
