"""Context parallelism: ring attention and MSA over CP ranks give the single-process results.

Layer-level checks run in CP=2 and CP=4 process groups on gloo, one group per CP size (spawned
once, every check inside): each rank computes the single-process reference on the full
sequence itself and compares its own load-balanced slice of the outputs and gradients.
The module imports no megatron-core at the top, so that the spawned ranks start quickly.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from model.msa import (
    attention_block_mass,
    indexer_kl_loss,
    msa_attention_with_lse,
    msa_block_scores,
    msa_select,
)
from parallel.context_parallel import Ring, ring_attention
from model.msa.cp import msa_sparse_context_parallel


def _spawn(cp: int, fn) -> None:
    from conftest import (
        free_port,  # here, not at the top: the spawned ranks import this module
    )

    port = free_port()
    mp.spawn(_init_and_run, args=(cp, port, fn), nprocs=cp, join=True)


def _init_and_run(rank: int, cp: int, port: int, fn) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=cp)
    try:
        fn(Ring(dist.group.WORLD))
    finally:
        dist.destroy_process_group()


def _local(x: torch.Tensor, ring: Ring) -> torch.Tensor:
    """This rank's load-balanced slice (dim 1) of a full-sequence tensor, as a new leaf."""
    pos = ring.positions(x.shape[1] // ring.size)
    return x.detach()[:, pos].clone().requires_grad_(x.requires_grad)


def _close(got: torch.Tensor, want: torch.Tensor, what: str, tol: float = 1e-10) -> None:
    err = (got - want).abs().max().item()
    assert err <= tol * max(1.0, want.abs().max().item()), f"{what}: max error {err}"


def _dense_reference(q, k, v):
    """Full causal GQA attention through SDPA: [B, S, Hq, D], [B, S, G, D] -> [B, S, Hq, D]."""
    hpg = q.shape[2] // k.shape[2]
    k, v = (x.repeat_interleave(hpg, dim=2).transpose(1, 2) for x in (k, v))
    return torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k, v, is_causal=True).transpose(1, 2)


def _check_dense_ring(ring: Ring) -> None:
    torch.manual_seed(0)
    B, Hq, G, D = 2, 6, 2, 8
    S = 7 * 2 * ring.size  # odd chunks of 7 tokens
    q = torch.randn(B, S, Hq, D, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, S, G, D, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, S, G, D, dtype=torch.float64, requires_grad=True)
    out = _dense_reference(q, k, v)
    d_out = torch.randn_like(out)
    out.backward(d_out)
    ql, kl, vl = (_local(x, ring) for x in (q, k, v))
    got = ring_attention(ql, kl, vl, cp_group=ring.group)
    got.backward(_local(d_out, ring))
    _close(got, _local(out, ring), "out")
    for name, mine, full in (("dq", ql, q), ("dk", kl, k), ("dv", vl, v)):
        _close(mine.grad, _local(full.grad, ring), name)


def _check_msa(ring: Ring, local_blocks: int) -> None:
    """Outputs, selections, p_main, indexer loss and the q/k/v/index gradients of sparse MSA.

    Chunks of 8 tokens = 2 blocks of 4, top-5: the first tokens have fewer than 5 blocks
    (-1 slots); with local_blocks=2 the first block of a chunk also takes the last block of the
    previous chunk, which another rank holds."""
    torch.manual_seed(1 + local_blocks)
    B, Hq, G, D, Di, bs, topk = 2, 4, 2, 8, 8, 4, 5
    S = 8 * 2 * ring.size
    f64 = dict(dtype=torch.float64, requires_grad=True)
    q, k, v = torch.randn(B, S, Hq, D, **f64), torch.randn(B, S, G, D, **f64), torch.randn(B, S, G, D, **f64)
    # Index scores with structure (nearby tokens pick similar blocks), but no ties.
    iq = torch.randn(B, S, G, Di, **f64)
    ik = torch.randn(B, S, Di, **f64)
    blocks = msa_select(iq, ik, block_size=bs, topk=topk, local_blocks=local_blocks)
    out, lse = msa_attention_with_lse(q, k, v, blocks, block_size=bs)
    p_main = attention_block_mass(q.detach(), k.detach(), lse.detach(), blocks, block_size=bs)
    loss = indexer_kl_loss(p_main, msa_block_scores(iq, ik, blocks, block_size=bs), blocks)
    d_out = torch.randn_like(out)
    ((out * d_out).sum() + loss).backward()
    assert (blocks[:, :, :bs] < 0).any() and (blocks >= 0).all(-1).any()  # partial and full rows

    mine = [_local(x, ring) for x in (q, k, v, iq, ik)]
    got = msa_sparse_context_parallel(
        *mine, block_size=bs, topk=topk, local_blocks=local_blocks, cp_group=ring.group, indexer_loss=True,
    )
    local_loss = indexer_kl_loss(got.p_main, got.scores, got.blocks)
    # The CP=1 loss is the mean of the ranks' means (equal rows per rank).
    ((got.out * _local(d_out, ring)).sum() + local_loss / ring.size).backward()
    pos = ring.positions(S // ring.size)
    assert torch.equal(got.blocks, blocks[:, :, pos])
    _close(got.out, out[:, pos], "msa out", 1e-6)  # the reference returns lse in fp32
    _close(got.p_main, p_main[:, :, pos], "p_main", 1e-6)
    mean_loss = local_loss.detach().clone()
    dist.all_reduce(mean_loss, group=ring.group)
    _close(mean_loss / ring.size, loss.detach(), "indexer loss", 1e-6)
    for name, x, full in zip(("dq", "dk", "dv", "d index_q", "d index_k"), mine, (q, k, v, iq, ik)):
        _close(x.grad, full.grad[:, pos], name, 1e-6)


def _check_all(ring: Ring) -> None:
    _check_dense_ring(ring)
    for local_blocks in (1, 2):
        _check_msa(ring, local_blocks)


@pytest.mark.multiproc
@pytest.mark.parametrize("cp", [2, 4])
def test_context_parallel_layers_match_single_process(cp):
    _spawn(cp, _check_all)


def test_attention_after_keys_is_the_query_offset():
    """What the dispatch runs on the kernels for a visiting ring step (offset-free kernels,
    queries moved after the keys) equals q_offset = S; here both run the reference, outputs and
    gradients (tests/test_msa_triton.py runs it on the kernels)."""
    from model.msa.dispatch import attention_after_keys

    torch.manual_seed(3)
    B, S, Hq, G, D, bs = 1, 12, 4, 2, 8, 4
    qkv = [torch.randn(B, S, h, D, dtype=torch.float64, requires_grad=True) for h in (Hq, G, G)]
    idx = torch.tensor([[-1, 0, 2], [1, -1, -1]])[torch.randint(0, 2, (B, G, S))]  # [B, G, S, 3]
    runs = []
    for fn in (lambda *x: msa_attention_with_lse(*x, idx, block_size=bs, softmax_scale=0.3, q_offset=S),
               lambda *x: attention_after_keys(*x, idx, bs, 0.3)):
        out, lse = fn(*qkv)
        grads = torch.autograd.grad((out * out).sum() + lse.sum(), qkv)
        runs.append([out, lse, *grads])
    for a, b in zip(*runs):
        _close(a, b, "after keys", 1e-6)


def test_layout_rejects_cp_that_splits_msa_blocks():
    from conftest import tiny_model_config

    from model.config import AttentionConfig
    from parallel.config import ParallelConfig
    from conftest import model_layout

    msa = tiny_model_config(attention=AttentionConfig(type="msa", dense_layers=[0]))
    block = msa.msa.block_size
    assert model_layout(ParallelConfig(cp=2), msa, 2, 4 * block).cp == 2
    with pytest.raises(ValueError, match=r"train.seq_length=.*parallel.cp\*model.msa.block_size"):
        model_layout(ParallelConfig(cp=2), msa, 2, 6 * block)


RUN = ["train.iters=3", "train.log_interval=1", "logger.wandb.mode=disabled", "train.seq_length=64",
       "train.eval_iters=1"]


def _losses(run_dir, *overrides, nproc=None) -> dict[int, float]:
    from conftest import run_module

    result = run_module(["pretrain", f"hydra.run.dir={run_dir}", *RUN, *overrides], cwd=run_dir.parent, nproc=nproc)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    records = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return {r["iteration"]: (r["lm_loss"], r.get("indexer_loss"), r["grad_norm"]) for r in records}


@pytest.mark.multiproc
@pytest.mark.parametrize("mtp", ["dense", "msa"])
def test_cp2_gives_single_process_losses(tmp_path, mtp):
    """The tiny model (a dense first layer, on the dense ring, then an MSA layer, on MSA's ring;
    its two MTP modules dense or, with model.attention.mtp=msa, MSA too) under parallel.cp=2 from
    the single-process run's initial weights: the same LM and indexer losses."""
    single = _losses(tmp_path / "single", "checkpoint.save_initial=true", "checkpoint.keep=null",
                     f"model.attention.mtp={mtp}")
    init = tmp_path / "single" / "checkpoints" / "iter_0000000"
    got = _losses(tmp_path / "cp2", "parallel.cp=2", f"checkpoint.load={init}", "checkpoint.save=false",
                  f"model.attention.mtp={mtp}", nproc=2)
    assert got.keys() == single.keys()
    # The first step's gradient norm covers every gradient, the index branch's included (its
    # KL loss is scaled by hand under CP, model/msa/layer.py; a wrong scale moves the norm ~2x).
    # fp32 reordering alone (the ring's per-step lse merge against SDPA) moves it ~2e-5.
    assert got[1][2] == pytest.approx(single[1][2], rel=1e-4)
    for it, (lm, indexer, _) in single.items():
        assert got[it][0] == pytest.approx(lm, rel=1e-4), it
        # the selection is a top-k: after two optimizer steps an index-score near-tie can fall
        # the other way under the ring's fp32 order (with MSA in the MTP modules too, step 3's
        # indexer loss moved 1.2e-4 after 7e-8 at step 2; the LM losses stay within 1e-4)
        assert got[it][1] == pytest.approx(indexer, rel=1e-4 if it <= 2 else 1e-3), it


def test_data_yields_million_token_sequences():
    """Long-context samples are documents concatenated by megatron's GPTDataset, separated by
    end-of-document tokens, with no attention reset at their boundaries."""
    from data import build_datasets, load_tokenizer
    from data.config import DataConfig

    cfg = DataConfig()
    tokenizer = load_tokenizer(cfg)
    train, _ = build_datasets(cfg, seq_length=1 << 20, seed=1, train_samples=1, valid_samples=1, tokenizer=tokenizer)
    sample = train[0]
    assert all(v.shape == (1 << 20,) for v in sample.values())
    assert (sample["tokens"] == tokenizer.eod).sum() > 1  # several documents in one sequence
    assert torch.equal(sample["position_ids"], torch.arange(1 << 20))  # positions run on across them
