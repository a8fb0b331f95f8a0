"""MSA's functional API on CPU (the chunked PyTorch reference) against brute force built from
S x S score matrices: selection (ids, ties, packing), sparse attention (outputs, lse, every
gradient, no NaN leaking from dropped keys), index block scores and their sparse gradient, the
block masses and the indexer KL loss of both the sparse and the dense warm-up mode, memory
that does not grow like S^2, and what the dispatch chooses on CPU tensors.

Legend: B batch, S tokens, Hq query heads, G groups, D head dim, Di index head dim, K slots,
bs block size, nb key blocks.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from model.msa import (
    attention_block_mass,
    dense_block_mass,
    dense_block_scores,
    dense_block_valid,
    indexer_kl_loss,
    msa_attention,
    msa_attention_with_lse,
    msa_block_scores,
    msa_backends,
    msa_select,
    reference,
)
from model.msa.dispatch import attention_backends, select_backend
from msa_oracles import dense_masked_attention, selection_mask

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Chunks of a few dozen queries, so that every test crosses many chunk boundaries."""
    monkeypatch.setattr(reference, "CHUNK_ELEMENTS", 1 << 18)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _index_inputs(B, S, G, Di, seed, dtype=torch.float32, ints: int | None = None):
    """index_q [B, S, G, Di], index_k [B, S, Di]: normal, or integers in [-ints, ints] if `ints`."""
    g = _gen(seed)
    if ints is not None:
        iq = torch.randint(-ints, ints + 1, (B, S, G, Di), generator=g).float()
        ik = torch.randint(-ints, ints + 1, (B, S, Di), generator=g).float()
    else:
        iq, ik = torch.randn(B, S, G, Di, generator=g), torch.randn(B, S, Di, generator=g)
    return iq.to(dtype), ik.to(dtype)


def _brute_block_scores(iq: torch.Tensor, ik: torch.Tensor, bs: int) -> torch.Tensor:
    """[B, G, S, nb] in the inputs' dtype (autograd-friendly): masked S x S scores, max per block."""
    S = iq.shape[1]
    scores = torch.einsum("btgd,bjd->bgtj", iq, ik)
    scores = scores.masked_fill(~torch.ones(S, S, dtype=torch.bool).tril(), -math.inf)
    return torch.stack([scores[..., b0 : b0 + bs].max(-1).values for b0 in range(0, S, bs)], -1)


def _brute_select(block_scores: torch.Tensor, bs: int, topk: int, local: int) -> torch.Tensor:
    """Row-by-row selection in Python from [B, G, S, nb] block scores."""
    B, G, S, _ = block_scores.shape
    rows = block_scores.tolist()
    out = torch.full((B, G, S, topk), -1, dtype=torch.long)
    for b in range(B):
        for g in range(G):
            for t in range(S):
                tb = t // bs
                forced = set(range(max(0, tb - local + 1), tb + 1))
                others = sorted(set(range(tb + 1)) - forced, key=lambda j: (-rows[b][g][t][j], j))
                chosen = sorted(forced | set(others[: topk - len(forced)]))
                out[b, g, t, : len(chosen)] = torch.tensor(chosen)
    return out


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _check_packing(idx: torch.Tensor, bs: int, topk: int, local: int = 1) -> None:
    """Ascending ids, then -1; min(t//bs + 1, K) of them; the token's own block among them."""
    S = idx.shape[2]
    n_valid = (torch.arange(S) // bs + 1).clamp_max(topk)  # [S]
    used = idx >= 0
    assert torch.equal(used.sum(-1), n_valid.expand_as(used[..., 0]))
    assert torch.equal(used, (torch.arange(topk) < n_valid[:, None]).expand_as(used))  # left-packed
    ids = idx.masked_fill(~used, 1 << 30)
    assert ((ids[..., 1:] > ids[..., :-1]) | ~used[..., 1:]).all()  # strictly ascending ids
    if local:
        assert (idx == (torch.arange(S) // bs)[:, None]).any(-1).all()


@pytest.mark.parametrize(
    "S, bs, topk, local",
    [
        (1000, 64, 4, 1),  # S not a multiple of bs; early tokens have -1 slots
        (997, 32, 8, 2),
        (77, 128, 4, 1),  # S < block_size: a single partial block
        (100, 32, 8, 1),  # more slots than blocks in the whole sequence
        (203, 7, 5, 5),  # only local blocks
        (515, 16, 16, 3),
        (300, 32, 3, 0),  # nothing forced
    ],
)
def test_select_matches_brute_force_with_ties(S, bs, topk, local):
    # Integers from {-2..2} over Di=4: exact fp32 products and many exactly tied block scores.
    iq, ik = _index_inputs(2, S, 2, 4, seed=S, ints=2)
    idx = msa_select(iq, ik, block_size=bs, topk=topk, local_blocks=local)
    assert idx.dtype == torch.long and idx.shape == (2, 2, S, topk)
    expected = _brute_select(_brute_block_scores(iq.double(), ik.double(), bs), bs, topk, local)
    assert torch.equal(idx, expected)
    _check_packing(idx, bs, topk, local)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_select_random_inputs_all_dtypes(dtype):
    S, bs, topk = 1001, 64, 6
    iq, ik = _index_inputs(2, S, 3, 16, seed=7, dtype=dtype)
    idx = msa_select(iq, ik, block_size=bs, topk=topk)
    _check_packing(idx, bs, topk)
    # Scores are fp32 of the inputs as given: brute force upcasts the same values to fp64.
    block_scores = _brute_block_scores(iq.double(), ik.double(), bs)
    expected = _brute_select(block_scores, bs, topk, 1)
    differ = (idx != expected).any(-1)
    # Only a near tie (fp32 vs fp64 rounding) may pick a different, equally good block.
    for b, g, t in differ.nonzero().tolist():
        mine = block_scores[b, g, t, idx[b, g, t][idx[b, g, t] >= 0]].sort().values
        theirs = block_scores[b, g, t, expected[b, g, t][expected[b, g, t] >= 0]].sort().values
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-4)
    assert differ.float().mean() < 0.01


def test_select_rejects_bad_arguments():
    iq, ik = _index_inputs(1, 10, 2, 4, seed=0)
    with pytest.raises(ValueError, match="local_blocks"):
        msa_select(iq, ik, block_size=4, topk=2, local_blocks=3)
    with pytest.raises(ValueError, match="index_k"):
        msa_select(iq, ik[:, :9], block_size=4, topk=2)


def _attention_inputs(B, S, Hq, G, D, seed, dtype=torch.float32):
    g = _gen(seed)
    q = torch.randn(B, S, Hq, D, generator=g).to(dtype)
    k = torch.randn(B, S, G, D, generator=g).to(dtype)
    v = torch.randn(B, S, G, D, generator=g).to(dtype)
    return q, k, v


def _selection(B, S, G, bs, topk, seed):
    iq, ik = _index_inputs(B, S, G, 8, seed=seed)
    return msa_select(iq, ik, block_size=bs, topk=topk)


def _grads(out, inputs, seed):
    grad_out = torch.randn(out.shape, generator=_gen(seed), dtype=torch.float64).to(out.dtype)
    return torch.autograd.grad(out, inputs, grad_out)


@pytest.mark.parametrize(
    "S, bs, topk, scale",
    [(999, 64, 4, None), (50, 64, 3, None), (611, 16, 6, 0.3)],  # the second: S < block_size
)
def test_attention_matches_dense_masked_fp64(S, bs, topk, scale):
    B, Hq, G, D = 2, 6, 2, 32
    q, k, v = (x.requires_grad_() for x in _attention_inputs(B, S, Hq, G, D, seed=S))
    idx = _selection(B, S, G, bs, topk, seed=S + 1)
    out, lse = msa_attention_with_lse(q, k, v, idx, block_size=bs, softmax_scale=scale)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32 and lse.shape == (B, S, Hq)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()

    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    keep = selection_mask(idx, S, bs)
    ref_out, ref_lse = dense_masked_attention(q64, k64, v64, keep, scale)
    assert _rel_err(out, ref_out) < 1e-5
    torch.testing.assert_close(lse.double(), ref_lse.detach(), rtol=1e-6, atol=1e-6)
    # Through out and lse together (lse is differentiable like the Triton kernel's).
    g_out = torch.randn(out.shape, generator=_gen(0))
    g_lse = torch.randn(lse.shape, generator=_gen(1))
    mine = torch.autograd.grad((out, lse), (q, k, v), (g_out, g_lse))
    theirs = torch.autograd.grad((ref_out, ref_lse), (q64, k64, v64), (g_out.double(), g_lse.double()))
    for a, b in zip(mine, theirs):
        assert torch.isfinite(a).all()
        assert _rel_err(a, b) < 1e-5
    torch.testing.assert_close(msa_attention(q, k, v, idx, block_size=bs, softmax_scale=scale), out)


def test_attention_bf16_within_bf16_tolerance():
    B, S, Hq, G, D, bs, topk = 1, 777, 4, 2, 64, 32, 5
    q, k, v = (x.requires_grad_() for x in _attention_inputs(B, S, Hq, G, D, seed=3, dtype=torch.bfloat16))
    idx = _selection(B, S, G, bs, topk, seed=4)
    out = msa_attention(q, k, v, idx, block_size=bs)
    assert out.dtype == torch.bfloat16
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref_out, _ = dense_masked_attention(q64, k64, v64, selection_mask(idx, S, bs))
    assert _rel_err(out, ref_out) < 1e-2
    for mine, theirs in zip(_grads(out, (q, k, v), 1), _grads(ref_out, (q64, k64, v64), 1)):
        assert mine.dtype == torch.bfloat16
        assert _rel_err(mine, theirs) < 2e-2


def test_attention_does_not_leak_nan_from_dropped_keys():
    """Keys after T (inside a local block, and whole later blocks) hold NaN. Tokens before T
    never attend them: their outputs, lse and q gradients must equal the clean run's, whatever
    the gathers of padding and -1 slots read. (Tokens from T on attend NaN, so their outputs and
    the k, v gradients they send back are rightly NaN.)"""
    B, S, Hq, G, D, bs, topk = 2, 301, 4, 2, 16, 32, 4
    T = 150  # mid-block
    q, k, v = _attention_inputs(B, S, Hq, G, D, seed=5)
    idx = _selection(B, S, G, bs, topk, seed=6)
    k_bad, v_bad = k.clone(), v.clone()
    k_bad[:, T:], v_bad[:, T:] = math.nan, math.nan
    results = []
    for keys, values in ((k, v), (k_bad, v_bad)):
        q_ = q.clone().requires_grad_()
        out, lse = msa_attention_with_lse(q_, keys, values, idx, block_size=bs)
        (dq,) = torch.autograd.grad(out[:, :T].sum() + lse[:, :T].sum(), q_)
        results.append((out[:, :T], lse[:, :T], dq[:, :T]))
    for clean, poisoned in zip(*results):
        assert torch.isfinite(poisoned).all()
        torch.testing.assert_close(poisoned, clean, rtol=0, atol=0)


def test_attention_empty_rows_and_holes():
    """Indices the selector never makes, which the kernels must still handle: a token whose
    slots are all -1 (or only later blocks) gets out 0, lse -inf and zero gradients; -1 holes
    between ids are skipped."""
    B, S, Hq, G, D, bs = 1, 70, 2, 1, 8, 16
    q, k, v = (x.requires_grad_() for x in _attention_inputs(B, S, Hq, G, D, seed=8))
    idx = torch.tensor([0, -1, 2, -1]).expand(B, G, S, 4).clone()
    idx[:, :, :5] = -1  # nothing at all
    idx[:, :, 5:10] = torch.tensor([3, 4, -1, -1])  # only blocks after the token's own
    out, lse = msa_attention_with_lse(q, k, v, idx, block_size=bs)
    assert (out[:, :10] == 0).all() and torch.isneginf(lse[:, :10]).all()
    dq, dk, dv = torch.autograd.grad((out.sum() + lse[:, 10:].sum()), (q, k, v))
    assert (dq[:, :10] == 0).all() and all(torch.isfinite(x).all() for x in (dq, dk, dv))
    keep = selection_mask(idx, S, bs)
    ref_out, ref_lse = dense_masked_attention(q.detach().double(), k.double(), v.double(), keep)
    torch.testing.assert_close(out[:, 10:].double(), ref_out[:, 10:].detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse[:, 10:].double(), ref_lse[:, 10:], rtol=1e-5, atol=1e-6)


def _assert_unique_block_maxima(iq, ik, bs, idx):
    """Each selected (token, block) max is attained by one key: the gradient target is unambiguous."""
    S = iq.shape[1]
    scores = torch.einsum("btgd,bjd->bgtj", iq, ik)
    scores = scores.masked_fill(~torch.ones(S, S, dtype=torch.bool).tril(), -math.inf)
    blocks = torch.nn.functional.pad(scores, (0, -S % bs), value=-math.inf).unflatten(-1, (-1, bs))
    n_max = (blocks == blocks.amax(-1, keepdim=True)).sum(-1)  # [B, G, S, nb]
    assert (n_max.gather(-1, idx.clamp_min(0))[idx >= 0] == 1).all()


def test_block_scores_values_and_sparse_gradient():
    B, S, G, Di, bs, topk = 2, 999, 2, 16, 64, 4
    # Integers up to 1000 over Di=16: dot products stay exact in fp32 (< 2^24) and the block
    # maxima are unique for this seed, so the argmax (and with it the gradient) is unambiguous.
    iq, ik = _index_inputs(B, S, G, Di, seed=11, ints=1000)
    idx = msa_select(iq, ik, block_size=bs, topk=topk)
    iq.requires_grad_(), ik.requires_grad_()
    scores = msa_block_scores(iq, ik, idx, block_size=bs)
    assert scores.dtype == torch.float32 and scores.shape == (B, G, S, topk)

    iq64, ik64 = (x.detach().double().requires_grad_() for x in (iq, ik))
    dense = _brute_block_scores(iq64, ik64, bs)
    _assert_unique_block_maxima(iq64.detach(), ik64.detach(), bs, idx)
    expected = torch.where(idx >= 0, dense.gather(-1, idx.clamp_min(0)), -math.inf)
    assert torch.equal(scores.double(), expected.detach())
    assert torch.isinf(scores[idx < 0]).all()

    upstream = torch.randn(scores.shape, generator=_gen(12)).masked_fill(idx < 0, 0.0)
    d_iq, d_ik = torch.autograd.grad(scores, (iq, ik), upstream)
    ref_iq, ref_ik = torch.autograd.grad(expected, (iq64, ik64), upstream.double())
    torch.testing.assert_close(d_iq.double(), ref_iq, rtol=1e-6, atol=1e-3)
    torch.testing.assert_close(d_ik.double(), ref_ik, rtol=1e-6, atol=1e-3)
    # Sparse: a key gets gradient only where it is some (token, block)'s argmax.
    touched = (d_ik != 0).any(-1).sum().item()
    assert 0 < touched <= (idx >= 0).sum().item()


def test_block_scores_of_unusable_slots_are_inf_without_gradient():
    """-1 slots and blocks after the token's own (which a selection never holds) score -inf and
    pass no gradient, whatever gradient arrives for them."""
    B, S, G, Di, bs = 1, 40, 2, 4, 16
    iq, ik = (x.requires_grad_() for x in _index_inputs(B, S, G, Di, seed=9))
    idx = torch.tensor([0, 2, -1]).expand(B, G, S, 3).clone()  # block 2 starts at token 32
    scores = msa_block_scores(iq, ik, idx, block_size=bs)
    usable = torch.isfinite(scores)
    assert torch.equal(usable[..., 0], torch.ones(B, G, S, dtype=torch.bool))
    assert torch.equal(usable[..., 1], (torch.arange(S) >= 32).expand(B, G, S))
    assert not usable[..., 2].any()
    upstream = torch.ones_like(scores).masked_fill(idx < 0, math.nan)  # even NaN must not pass
    got = torch.autograd.grad(scores, (iq, ik), upstream, retain_graph=True)
    expected = torch.autograd.grad(scores.masked_fill(~usable, 0.0), (iq, ik), usable.float())
    for a, b in zip(got, expected):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_dense_block_scores_values_and_gradient():
    B, S, G, Di, bs = 2, 333, 3, 16, 32
    iq, ik = _index_inputs(B, S, G, Di, seed=13, ints=1000)
    iq.requires_grad_(), ik.requires_grad_()
    scores = dense_block_scores(iq, ik, block_size=bs)
    nb = math.ceil(S / bs)
    assert scores.shape == (B, G, S, nb) and scores.dtype == torch.float32
    iq64, ik64 = (x.detach().double().requires_grad_() for x in (iq, ik))
    expected = _brute_block_scores(iq64, ik64, bs)
    assert torch.equal(scores.double(), expected.detach())
    assert torch.equal(torch.isfinite(scores), dense_block_valid(S, bs).expand_as(scores))
    valid = dense_block_valid(S, bs)
    upstream = torch.randn(scores.shape, generator=_gen(14)).masked_fill(~valid, 0.0)
    mine = torch.autograd.grad(scores, (iq, ik), upstream)
    theirs = torch.autograd.grad(expected, (iq64, ik64), upstream.double())
    for a, b in zip(mine, theirs):
        torch.testing.assert_close(a.double(), b, rtol=1e-6, atol=1e-3)


def _brute_block_mass(q64, k64, keep, bs, scale=None):
    """Head-averaged softmax mass per key block from the dense masked probabilities: [B, G, S, nb]."""
    B, S, Hq, D = q64.shape
    G = k64.shape[2]
    scale = D**-0.5 if scale is None else scale
    logits = torch.einsum("bthd,bjhd->bhtj", q64, k64.repeat_interleave(Hq // G, 2)) * scale
    probs = torch.softmax(logits.masked_fill(~keep.repeat_interleave(Hq // G, 1), -math.inf), -1)
    probs = probs.unflatten(1, (G, Hq // G)).mean(2)  # [B, G, S, S]
    return torch.stack([probs[..., b0 : b0 + bs].sum(-1) for b0 in range(0, S, bs)], -1)


def test_attention_block_mass_matches_dense_softmax():
    B, S, Hq, G, D, bs, topk = 2, 555, 6, 3, 16, 32, 4
    q, k, v = _attention_inputs(B, S, Hq, G, D, seed=15)
    idx = _selection(B, S, G, bs, topk, seed=16)
    _, lse = msa_attention_with_lse(q, k, v, idx, block_size=bs)
    mass = attention_block_mass(q, k, lse, idx, block_size=bs)
    assert mass.shape == (B, G, S, topk) and mass.dtype == torch.float32

    per_block = _brute_block_mass(q.double(), k.double(), selection_mask(idx, S, bs), bs)
    expected = torch.where(idx >= 0, per_block.gather(-1, idx.clamp_min(0)), 0.0)
    expected = expected / expected.sum(-1, keepdim=True)
    torch.testing.assert_close(mass.double(), expected, rtol=1e-5, atol=1e-6)
    assert (mass[idx < 0] == 0).all()


def test_dense_block_mass_matches_full_softmax():
    B, S, Hq, G, D, bs = 2, 1100, 4, 2, 16, 64  # 1100 > 512: several key chunks per query
    q, k, _ = _attention_inputs(B, S, Hq, G, D, seed=17)
    mass = dense_block_mass(q, k, block_size=bs, softmax_scale=0.2)
    causal = torch.ones(S, S, dtype=torch.bool).tril().expand(B, G, S, S)
    expected = _brute_block_mass(q.double(), k.double(), causal, bs, scale=0.2)
    torch.testing.assert_close(mass.double(), expected, rtol=1e-5, atol=1e-6)
    assert (mass[..., ~dense_block_valid(S, bs)] == 0).all()
    torch.testing.assert_close(mass.sum(-1), torch.ones(B, G, S))


def _kl_by_hand(p, scores, valid):
    """Mean over rows of sum_valid p log(p / q), q = exp(s) / sum_valid exp(s), in fp64."""
    p, s = p.double(), scores.double()
    e = torch.where(valid, torch.exp(s - s.masked_fill(~valid, -math.inf).amax(-1, keepdim=True)), 0.0)
    q_ = e / e.sum(-1, keepdim=True)
    terms = torch.where(valid & (p > 0), p * torch.log(p / torch.where(valid, q_, 1.0)), 0.0)
    return terms.sum(-1).mean()


def test_indexer_kl_loss_sparse_mode():
    B, S, Hq, G, D, Di, bs, topk = 2, 301, 4, 2, 16, 8, 16, 5
    q, k, v = (x.requires_grad_() for x in _attention_inputs(B, S, Hq, G, D, seed=19))
    iq, ik = (x.requires_grad_() for x in _index_inputs(B, S, G, Di, seed=20))
    idx = msa_select(iq, ik, block_size=bs, topk=topk)
    _, lse = msa_attention_with_lse(q, k, v, idx, block_size=bs)
    p_main = attention_block_mass(q, k, lse, idx, block_size=bs)
    scores = msa_block_scores(iq, ik, idx, block_size=bs)
    loss = indexer_kl_loss(p_main, scores, idx)
    assert loss.dim() == 0 and loss > 0
    torch.testing.assert_close(loss.double(), _kl_by_hand(p_main, scores.detach(), idx >= 0))
    # The same loss with a bool mask in place of the ids.
    torch.testing.assert_close(indexer_kl_loss(p_main, scores, idx >= 0), loss)

    loss.backward()
    assert q.grad is None and k.grad is None and v.grad is None
    assert iq.grad is not None and iq.grad.abs().sum() > 0 and ik.grad.abs().sum() > 0

    # Even a p_main that carries a graph gets no gradient.
    p_req = p_main.clone().requires_grad_()
    (grad_p,) = torch.autograd.grad(indexer_kl_loss(p_req, scores.detach().requires_grad_(), idx), [p_req],
                                    allow_unused=True)
    assert grad_p is None


def test_indexer_kl_loss_zero_at_match_and_by_hand_with_zeros():
    B, G, S, K = 2, 3, 40, 6
    g = _gen(21)
    valid = torch.rand(B, G, S, K, generator=g) < 0.7
    valid[..., 0] = True
    scores = torch.randn(B, G, S, K, generator=g).masked_fill(~valid, -math.inf).requires_grad_()
    p_index = torch.softmax(scores.detach(), -1)
    loss = indexer_kl_loss(p_index, scores, valid)
    assert abs(loss.item()) < 1e-6
    (grad,) = torch.autograd.grad(loss, scores)
    assert torch.isfinite(grad).all() and grad.abs().max() < 1e-6

    p = torch.rand(B, G, S, K, generator=g) * valid
    p[..., 1] = 0.0  # zero mass on a valid slot adds nothing
    p = p / p.sum(-1, keepdim=True)
    torch.testing.assert_close(indexer_kl_loss(p, scores, valid).double(), _kl_by_hand(p, scores.detach(), valid))


def test_indexer_kl_loss_dense_warmup_mode():
    B, S, Hq, G, D, Di, bs = 1, 260, 4, 2, 16, 8, 32
    q, k, _ = (x.requires_grad_() for x in _attention_inputs(B, S, Hq, G, D, seed=22))
    iq, ik = (x.requires_grad_() for x in _index_inputs(B, S, G, Di, seed=23))
    p_main = dense_block_mass(q, k, block_size=bs)
    scores = dense_block_scores(iq, ik, block_size=bs)
    valid = dense_block_valid(S, bs)
    loss = indexer_kl_loss(p_main, scores, valid)
    torch.testing.assert_close(loss.double(), _kl_by_hand(p_main, scores.detach(), valid.expand_as(scores)))
    loss.backward()
    assert q.grad is None and k.grad is None
    assert torch.isfinite(iq.grad).all() and iq.grad.abs().sum() > 0 and torch.isfinite(ik.grad).all()


_MEMORY_PROBE = textwrap.dedent(
    """
    import resource, sys, torch
    from model.msa import msa_attention, msa_block_scores, msa_select, dense_block_mass
    torch.manual_seed(0)
    torch.set_num_threads(2)

    def run(S):
        B, Hq, G, D, Di, bs, topk = 1, 4, 2, 32, 32, 64, 8
        q, k, v = (torch.randn(B, S, h, D, requires_grad=True) for h in (Hq, G, G))
        iq, ik = torch.randn(B, S, G, Di, requires_grad=True), torch.randn(B, S, Di, requires_grad=True)
        idx = msa_select(iq, ik, block_size=bs, topk=topk)
        msa_attention(q, k, v, idx, block_size=bs).sum().backward()
        msa_block_scores(iq, ik, idx, block_size=bs).sum().backward()
        dense_block_mass(q, k, block_size=bs)

    S = int(sys.argv[1])
    run(300)  # thread pools, allocator arenas, lazy imports
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    run(S)
    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
    """
)


@pytest.mark.slow
def test_memory_stays_below_one_s_by_s_matrix():
    """At S = 6000 one fp32 S x S matrix is 144 MB; the whole select + attention (fwd and bwd) +
    block scores + dense mass must grow the peak RSS by less than that."""
    S = 6000
    proc = subprocess.run(
        [sys.executable, "-c", _MEMORY_PROBE, str(S)], cwd=REPO, capture_output=True, text=True,
        timeout=300,
        # A fixed mmap threshold stops glibc from serving freed 16 MB chunks out of the heap,
        # where fragmentation, not live tensors, would drive the peak RSS.
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2", "MALLOC_MMAP_THRESHOLD_": "131072"},
    )
    assert proc.returncode == 0, proc.stderr
    growth = int(proc.stdout.split()[-1])
    assert growth < S * S * 4, f"peak RSS grew by {growth / 2**20:.0f} MiB"


def test_dispatch_runs_the_reference_on_cpu_and_checks_forced_backends():
    """CPU tensors take the reference unless a backend is forced; a forced backend that cannot
    run the call raises instead of running something else; nested blocks override what they
    name and end with their block."""
    q, k, v = _attention_inputs(1, 32, 4, 2, 16, seed=24)
    iq, ik = _index_inputs(1, 32, 2, 8, seed=25)
    idx = _selection(1, 32, 2, 8, 3, seed=26)
    assert select_backend(iq, 8) == "reference"
    assert attention_backends(q, 8) == attention_backends(q, 8, q_offset=32) == ("reference", "reference")
    with msa_backends(attention="reference"):
        out = msa_attention(q, k, v, idx, block_size=8)
    torch.testing.assert_close(out, msa_attention(q, k, v, idx, block_size=8), rtol=0, atol=0)
    with pytest.raises(ValueError, match="expected one of"):
        with msa_backends(select="gluon"):
            pass
    with pytest.raises(ValueError, match="expected one of"):
        with msa_backends(block_scores="sm90"):
            pass
    with pytest.raises(ValueError, match="expected one of"):
        with msa_backends(kl_loss="sm90"):
            pass
    p = torch.full((1, 1, 2, 4097), 1 / 4097)
    with msa_backends(kl_loss="triton"), pytest.raises(ValueError, match="at most 4096"):
        indexer_kl_loss(p, torch.zeros_like(p), torch.ones_like(p, dtype=torch.bool))
    with msa_backends(attention="sm90"):
        with pytest.raises(ValueError, match="sm90"):
            msa_attention(q, k, v, idx, block_size=8)
    with msa_backends(select="triton"), msa_backends(attention="triton"):
        with pytest.raises(ValueError, match="q_offset=16"):  # inside the keys: the kernels lack it
            msa_attention(q, k, v, idx, block_size=8, q_offset=16)
        if not os.environ.get("TRITON_INTERPRET") == "1":
            with pytest.raises(ValueError, match="TRITON_INTERPRET"):
                msa_select(iq, ik, block_size=8, topk=3)
    with msa_backends(attention_bwd="triton"):
        with pytest.raises(ValueError, match="reference backward"):  # the forward is the reference's
            msa_attention(q, k, v, idx, block_size=8)
    assert select_backend(iq, 8) == "reference"

