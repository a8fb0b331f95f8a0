"""A released-format MiniMax-M2 (tiny, every tensor random, from transformers) in parallel
layouts, through the user's commands: `convert import-hf` under torchrun in tp2 and pp2, and
`checkpoint.init_from=hf:DIR` read on the fly by `python -m pretrain` in ep2; each evaluated by
`python -m pretrain.evaluate` in its layout equals transformers' loss over the same windows
(fp32, rel 1e-5); the tp2 checkpoint exported back reloads in transformers with equal logits.
One 2-process run per layout family and command."""

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

pytestmark = pytest.mark.multiproc

S, MAX_TOKENS = 32, 300
WINDOWS = math.ceil(MAX_TOKENS / S)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(the HF model, its released checkpoint, a corpus prefix and its tokenizer over the same
    vocabulary, the HF loss over evaluate's windows of that corpus)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    from tokenizers import Tokenizer, models

    root = tmp_path_factory.mktemp("hf_layouts")
    model = random_hf_model(seed=7)
    model.save_pretrained(root / "hf")
    vocab = TINY_HF["vocab_size"]
    eos = TINY_HF["eos_token_id"]
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
    batch = torch.stack([stream[w * S : w * S + S + 1] for w in range(WINDOWS)])
    with torch.no_grad():
        logits = model(batch[:, :-1]).logits
    loss = F.cross_entropy(logits.reshape(-1, vocab).float(), batch[:, 1:].reshape(-1)).item()
    return model, root, loss


def _run(args: list[str], cwd: Path) -> str:
    result = run_module(args, cwd=cwd, nproc=2, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result.stdout


def _evaluate(root: Path, ckpt: Path, layout: str, name: str) -> dict:
    out = _run(["pretrain.evaluate", f"hydra.run.dir={root}/eval_{name}", f"checkpoint.dir={ckpt}",
                f"data.prefixes=[{root / 'corpus'}]", f"data.tokenizer={root / 'tokenizer.json'}",
                f"train.seq_length={S}", f"eval.max_tokens={MAX_TOKENS}", layout, "logger.wandb.mode=disabled"], root)
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize("layout", ["parallel.tp=2", "parallel.pp=2"])
def test_import_then_evaluate_in_a_layout_equals_transformers(setup, layout):
    model, root, want = setup
    name = layout.split(".")[1].replace("=", "")
    ckpt = root / f"ckpt_{name}"
    _run(["convert", "import-hf", "--hf", str(root / "hf"), "--out", str(ckpt), "--dtype", "fp32", "--progress", "lines",
          layout], root)
    result = _evaluate(root, ckpt, layout, name)
    assert result["windows"] == WINDOWS and result["tokens"] == WINDOWS * S and result["iteration"] == 0
    assert result["loss"] == pytest.approx(want, rel=1e-5)
    if name == "tp2":  # back to Hugging Face from the sharded checkpoint: transformers' logits
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
    assert _evaluate(root, initial, "parallel.ep=2", "ep2_initial")["loss"] == pytest.approx(want, rel=1e-5)
