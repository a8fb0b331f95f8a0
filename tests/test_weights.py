"""Starting from weights, through `python -m pretrain` and `python -m pretrain.evaluate`:
checkpoint.init_from loads once and the run resumes from its own checkpoints afterwards; the
model's shape comes with the weights (a conflicting override is an error naming the key); a run
extended with a changed schedule follows optim.on_resume or stops naming the fields; evaluation
equals a plain PyTorch loss over the same windows."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import run_module

pytestmark = pytest.mark.slow

QUIET = ["logger.wandb.mode=disabled", "train.log_interval=1", "train.eval_interval=0",
         "train.seq_length=64", "train.global_batch_size=4", "train.micro_batch_size=2"]
CORPUS = Path("~/.cache/m2-pretrain/stdlib-v1-4096").expanduser()


def _run(args: list[str], cwd: Path, expect: int = 0):
    result = run_module(args, cwd=cwd)
    assert result.returncode == expect, result.stdout[-2000:] + result.stderr[-4000:]
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A tiny MSA model trained 3 iterations: its checkpoint directory."""
    root = tmp_path_factory.mktemp("source")
    _run(["pretrain", f"hydra.run.dir={root}/run", f"checkpoint.dir={root}/ckpt", "train.iters=3", *QUIET], root)
    return root / "ckpt"


def _model(path: Path, mtp: bool = True):
    """The model a checkpoint of this project holds, built from its config on one process (fp32);
    without its MTP modules when `mtp` is False (megatron's GPTModel returns logits only then)."""
    import dataclasses

    from omegaconf import OmegaConf

    from model.builder import build_model, transformer_config
    from model.config import ModelConfig
    from parallel.config import ParallelConfig
    from pretrain import checkpoint, weights

    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), weights.saved_model_config(path)))
    if not mtp:
        cfg = dataclasses.replace(cfg, mtp_num_layers=0)
    torch.manual_seed(0)
    (model,) = build_model(cfg, transformer_config(cfg, ParallelConfig(), cpu=True), backend="local")
    missing, unused = checkpoint.load_weights(path, [model])
    assert not missing and (all(k.startswith("mtp.") for k in unused) and unused if not mtp else not unused)
    return model


def _model_tensors(path: Path) -> dict[str, torch.Tensor]:
    from parallel import gather

    return gather.full_tensors([_model(path)], grads=False)


def test_init_from_loads_once_then_the_run_resumes_its_own(source, tmp_path, dist):
    args = ["pretrain", f"hydra.run.dir={tmp_path}/run", f"checkpoint.dir={tmp_path}/ckpt", f"checkpoint.init_from={source}",
            "train.iters=1", "checkpoint.save_initial=true", "model.attention.type=dense", *QUIET]
    out = _run(args, tmp_path)
    assert f"initialised from {source}/iter_0000003" in out
    assert "not used" in out and "self_attention.indexer.linear_q.weight" in out  # dense: no index branch
    start, weights = _model_tensors(tmp_path / "ckpt" / "iter_0000000"), _model_tensors(source / "iter_0000003")
    assert not [k for k in start if ".indexer." in k]
    assert set(start) == {k for k in weights if ".indexer." not in k}
    for key, value in start.items():
        assert torch.equal(value, weights[key]), key
    again = _run(args, tmp_path)  # its own checkpoint now: resumed, not initialised again
    assert "resumed from" in again and "initialised from" not in again
    assert (source / "iter_0000003").is_dir()  # the source is never pruned


def test_the_shape_comes_with_the_weights(source, tmp_path):
    """Every override that conflicts with the weights' shape is named, in one error."""
    out = _run(["pretrain", f"hydra.run.dir={tmp_path}/run", f"checkpoint.dir={tmp_path}/ckpt",
                f"checkpoint.init_from={source}", "model.num_layers=3", "model=proxy_1gpu", *QUIET], tmp_path, expect=2)
    assert "comes with the weights" in out and "Traceback" not in out
    assert "model.num_layers=3" in out and "model.hidden_size=" in out


def test_resuming_with_index_branches_the_checkpoint_lacks_names_the_settings(source, tmp_path):
    """A resume whose model runs MSA where the checkpoint has no index branch (here the MTP
    modules: model.attention.mtp=msa against a checkpoint written with dense MTP attention) is
    one error naming the settings that wrote it, not a failed tensor read."""
    ckpt = tmp_path / "ckpt"
    latest = sorted(source.glob("iter_*"))[-1]
    shutil.copytree(latest, ckpt / latest.name)
    out = _run(["pretrain", f"hydra.run.dir={tmp_path}/run", f"checkpoint.dir={ckpt}", "model.attention.mtp=msa",
                "train.iters=4", *QUIET], tmp_path, expect=2)
    assert "no MSA index branch in the MTP modules" in out and "model.attention.mtp=dense" in out, out[-3000:]
    assert "checkpoint.init_from=" in out and "Traceback" not in out


def test_extending_a_run_follows_on_resume_or_stops(source, tmp_path):
    import shutil

    from pretrain import schedule
    from pretrain.config import OptimConfig

    ckpt = tmp_path / "ckpt"
    shutil.copytree(source, ckpt)
    base = ["pretrain", f"hydra.run.dir={tmp_path}/run", f"checkpoint.dir={ckpt}", "train.iters=6", *QUIET]
    out = _run(base, tmp_path, expect=2)
    assert "lr_decay_steps" in out and "optim.on_resume=config" in out and "optim.on_resume=checkpoint" in out
    _run([*base, "optim.on_resume=config"], tmp_path)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    lrs = {r["iteration"]: r["lr"] for r in records}
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
    fresh = schedule.build(opt, OptimConfig(), iters=6)
    for iteration in range(1, 7):  # the logged lr of iteration i is the schedule's after i steps
        fresh.step(increment=1)
        if iteration in lrs:
            assert lrs[iteration] == pytest.approx(opt.param_groups[0]["lr"]), iteration
    assert sorted(lrs) == [4, 5, 6]


def test_evaluate_equals_a_plain_loss_over_the_same_windows(source, tmp_path, dist):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    S, max_tokens = 128, 600
    out = run_module(["pretrain.evaluate", f"hydra.run.dir={tmp_path}/eval", f"checkpoint.dir={source}",
                      f"data.prefixes=[{CORPUS / 'stdlib'}]", f"data.tokenizer={CORPUS / 'tokenizer.json'}",
                      f"train.seq_length={S}", f"eval.max_tokens={max_tokens}", "eval.micro_batch_size=3",
                      "eval.indexer_recall=true"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    windows = math.ceil(max_tokens / S)
    assert result["windows"] == windows and result["tokens"] == windows * S and result["iteration"] == 3
    assert 0.2 < result["indexer_recall"] < 1  # top-4 of 16-key blocks, over the tokens 64..127

    model = _model(source / "iter_0000003", mtp=False)
    model.eval()
    docs = IndexedDataset(str(CORPUS / "stdlib"))
    stream, i = [], 0
    while sum(map(len, stream)) < windows * S + 1:
        stream.append(torch.from_numpy(docs[i].astype("int64")))
        i += 1
    stream = torch.cat(stream)
    batch = torch.stack([stream[w * S : w * S + S + 1] for w in range(windows)])  # [windows, S + 1]
    with torch.no_grad():
        logits = model(batch[:, :-1], torch.arange(S).expand(windows, S), None)  # [b, s, vocab]
    want = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1))
    assert result["loss"] == pytest.approx(want.item(), rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(want.item()), rel=1e-5)
