"""The sm90 Gluon kernels of MSA (model/msa/ops/attention_sm90.py: attention forward and backward;
model/msa/ops/select_sm90.py: selection) against the fp64 dense masked reference / the selection
reference and against the Triton kernels, on Hopper GPUs only: Gluon has no interpreter, so on
CPU machines (CI) these tests skip and the Triton kernels they are checked against run under
TRITON_INTERPRET=1 in tests/test_msa_triton.py instead.

The Gluon runs go through the default dispatch (model/msa/dispatch.py), which must choose them
here (the launches are counted); the Triton runs force `msa_backends(...="triton")`."""

from __future__ import annotations

import math

import pytest
import torch

SM90 = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not SM90, reason="the Gluon kernels run on Hopper (sm90) GPUs only; "
                                "no interpreter exists for Gluon")]

if SM90:
    from model.msa import msa_attention_with_lse, msa_attention_with_mass, msa_backends, msa_select, reference
    from model.msa.ops import attention_sm90, select_sm90
    from model.msa.ops import select as select_ops
    from msa_oracles import dense_reference


def _walk_selection(B, S, G, block_size, topk, seed):
    """Selections of smoothly varying index queries (tiles share most blocks, so the unmasked
    path runs) through the selection kernel."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    iq = (torch.randn(B, S, G, 64, device="cuda", generator=g) * 0.05).cumsum(1)
    iq += torch.randn(B, 1, G, 64, device="cuda", generator=g)
    ik = torch.randn(B, S, 64, device="cuda", generator=g)
    return msa_select(iq.bfloat16(), ik.bfloat16(), block_size=block_size, topk=topk)


def _qkv(B, S, Hq, G, D, dtype, seed):
    torch.manual_seed(seed)
    return (torch.randn(B, S, Hq, D, device="cuda", dtype=dtype),
            torch.randn(B, S, G, D, device="cuda", dtype=dtype),
            torch.randn(B, S, G, D, device="cuda", dtype=dtype))


def _forward(q, k, v, sel, block_size, gluon):
    """out, lse by the default dispatch (gluon: on this GPU, the sm90 kernels where they take
    the inputs), or by the Triton kernels forward and backward."""
    with msa_backends(attention=None if gluon else "triton"):
        return msa_attention_with_lse(q, k, v, sel, block_size=block_size)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _worst_row(a, b):
    """The largest error of one row (the last dim), relative to that row's norm or to the mean
    row norm, whichever is larger: a bug confined to a few tokens hides in a whole-tensor norm,
    not here; rows whose gradient nearly cancels (or that are much heavier than the rest, as
    the keys of a popular block are in dk/dv) do not make it flaky."""
    a, b = a.double().flatten(0, -2), b.double().flatten(0, -2)
    norm = b.norm(dim=-1)
    return ((a - b).norm(dim=-1) / torch.maximum(norm, norm.mean()).clamp_min(1e-12)).max().item()


@pytest.fixture
def gluon_calls(monkeypatch):
    """Counts the launches of the Gluon kernels, so a test knows they ran (a silent fallback
    would compare the Triton kernels with themselves)."""
    calls = {"attn_fwd": 0, "attn_bwd": 0, "select": 0}
    for name in calls:
        module = select_sm90 if name == "select" else attention_sm90
        real = getattr(module, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)
    return calls


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,S,Hq,G,D,block_size,topk", [
    (1, 3000, 12, 2, 128, 128, 16),  # M2's tile shapes, S not a multiple of the block
    (2, 1000, 6, 1, 64, 64, 5),  # batch boundary, d 64, 64-key blocks, K not a power of two
    (1, 700, 8, 2, 128, 96, 4),  # non-power-of-two block (padding keys in every box)
    (1, 50, 6, 1, 128, 128, 2),  # S smaller than one block
])
def test_gluon_forward_matches_reference(gluon_calls, dtype, B, S, Hq, G, D, block_size, topk):
    q, k, v = _qkv(B, S, Hq, G, D, dtype, seed=0)
    sel = _walk_selection(B, S, G, block_size, topk, seed=S)
    assert attention_sm90.supported(q, block_size)
    out, lse = _forward(q, k, v, sel, block_size, gluon=True)
    assert gluon_calls["attn_fwd"] == 1
    out_t, lse_t = _forward(q, k, v, sel, block_size, gluon=False)
    out_r, lse_r = dense_reference(q, k, v, sel, block_size, D**-0.5)
    tol = 2e-3 if dtype == torch.float16 else 1.6e-2
    assert _rel(out, out_r) < tol
    assert _rel(lse, lse_r) < 1e-5
    assert _worst_row(out, out_r) < 4 * tol
    # the same math as the Triton forward: differences are the order of fp32 sums and p's rounding
    assert _worst_row(out, out_t) < 2 * tol
    assert torch.allclose(lse, lse_t, atol=1e-4, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,S,Hq,G,D,block_size,topk", [
    (1, 3000, 12, 2, 128, 128, 16),  # M2's tile shapes, S not a multiple of the block
    (2, 1000, 6, 1, 64, 64, 5),  # batch boundary, d 64, 64-key blocks (one step per block)
    (1, 700, 8, 2, 128, 96, 4),  # non-power-of-two block: the second step of each block is partly padding
    (1, 50, 6, 1, 128, 128, 2),  # S smaller than one block
    (1, 600, 6, 1, 128, 32, 8),  # 32-key blocks: the Gluon forward, the Triton backward
])
def test_gluon_backward_matches_reference(gluon_calls, dtype, B, S, Hq, G, D, block_size, topk):
    """dq, dk, dv (with a gradient through lse too) against the fp64 dense masked reference and
    the Triton backward."""
    q, k, v = _qkv(B, S, Hq, G, D, dtype, seed=S)
    sel = _walk_selection(B, S, G, block_size, topk, seed=S + 1)
    dout = torch.randn_like(q)
    dlse = torch.randn(B, S, Hq, device="cuda")
    grads = {}
    for gluon in (True, False):
        x = [t.clone().requires_grad_() for t in (q, k, v)]
        out, lse = _forward(*x, sel, block_size, gluon)
        torch.autograd.backward((out, lse), (dout, dlse))
        grads[gluon] = [t.grad for t in x]
    assert gluon_calls["attn_bwd"] == (1 if attention_sm90.bwd_supported(q, block_size) else 0)
    x = [t.double().requires_grad_() for t in (q, k, v)]
    out_r, lse_r = dense_reference(*x, sel, block_size, D**-0.5)
    torch.autograd.backward((out_r, lse_r), (dout.double(), dlse.double()))
    tol = 2e-3 if dtype == torch.float16 else 1.6e-2
    for got, want, ref in zip(grads[True], grads[False], x):
        assert torch.isfinite(got).all()
        assert _rel(got, ref.grad) < tol
        assert _worst_row(got, ref.grad) < 4 * tol
        assert _worst_row(got, want) < 2 * tol


@pytest.mark.parametrize("B,S,Hq,G,D,block_size,topk", [
    (1, 3000, 12, 2, 128, 128, 16),  # M2's tile shapes, S not a multiple of the block
    (2, 1000, 6, 1, 64, 64, 5),  # batch boundary, d 64, K not a power of two
    (1, 700, 8, 2, 128, 96, 4),  # non-power-of-two block
    (1, 20000, 6, 1, 128, 128, 16),  # many tiles per program, empty tiles mid-walk
])
def test_gluon_forward_mass_matches_reference(gluon_calls, B, S, Hq, G, D, block_size, topk):
    """`msa_attention_with_mass` on the sm90 forward (the indexer loss's block mass from the
    attention's own pass): p_main against the reference from the same lse and against the Triton
    forward's fold; out and lse those of the forward without mass. Selections with unused slots,
    a duplicated id and rows without keys."""
    q, k, v = _qkv(B, S, Hq, G, D, torch.bfloat16, seed=S + 7)
    sel = _walk_selection(B, S, G, block_size, topk, seed=S + 8)
    sel = sel.masked_fill(torch.rand(sel.shape, device="cuda", generator=torch.Generator("cuda").manual_seed(S))
                          < 0.1, -1)
    sel[:, :, S // 2, 1] = sel[:, :, S // 2, 0]  # one token's block twice: both slots get its mass
    if S > 10000:
        sel[:, :, 5000:5100] = -1
    out, lse, p_main = msa_attention_with_mass(q, k, v, sel, block_size=block_size)
    assert gluon_calls["attn_fwd"] == 1
    out0, lse0 = _forward(q, k, v, sel, block_size, gluon=True)
    assert _worst_row(out, out0) < 1e-3 and torch.allclose(lse, lse0, atol=1e-5, rtol=0)
    want = reference.attention_block_mass(q, k, lse, sel, block_size, D**-0.5)
    assert torch.isfinite(p_main).all()
    assert _rel(p_main, want) < 2e-3 and _worst_row(p_main, want) < 1e-2
    with msa_backends(attention="triton"):
        _, _, p_triton = msa_attention_with_mass(q, k, v, sel, block_size=block_size)
    assert _worst_row(p_main, p_triton) < 1e-2
    assert torch.equal(p_main[sel < 0], torch.zeros_like(p_main[sel < 0]))


@pytest.mark.parametrize("B,S,Hq,G,D,block_size,topk", [
    (2, 20000, 12, 2, 64, 96, 8),  # d 64, batch boundary, non-power-of-two block
    (1, 30000, 6, 1, 128, 128, 16),  # M2's tile shapes
])
def test_gluon_many_tiles_per_program_match_triton(gluon_calls, B, S, Hq, G, D, block_size, topk):
    """The persistent forward deals many tiles to each program (each tile with its own number of
    blocks, some with none, so the stage phases and q buffers cross tile boundaries at every
    offset): out, lse and the gradients (with one through lse) against the Triton kernels, which
    tests/test_msa_triton.py checks against the fp64 reference (that does not fit at this S)."""
    q, k, v = _qkv(B, S, Hq, G, D, torch.bfloat16, seed=S)
    sel = _walk_selection(B, S, G, block_size, topk, seed=S + 1)
    sel[:, :, 5000:5100] = -1  # 600 rows per group without keys: whole empty tiles mid-walk
    n_items = B * G * math.ceil(S * (Hq // G) / 128)
    assert n_items > 8 * torch.cuda.get_device_properties(0).multi_processor_count
    dout, dlse = torch.randn_like(q), torch.randn(B, S, Hq, device="cuda")
    res = {}
    for gluon in (True, False):
        x = [t.clone().requires_grad_() for t in (q, k, v)]
        out, lse = _forward(*x, sel, block_size, gluon)
        torch.autograd.backward((out, lse), (dout, dlse))
        res[gluon] = (out, lse, *(t.grad for t in x))
    assert gluon_calls["attn_fwd"] == 1 and gluon_calls["attn_bwd"] == 1
    (out, lse, *grads), (out_t, lse_t, *grads_t) = res[True], res[False]
    empty = torch.isneginf(lse_t)
    assert empty.any() and torch.equal(torch.isneginf(lse), empty)
    assert torch.allclose(lse[~empty], lse_t[~empty], atol=1e-4, rtol=0)
    assert torch.equal(out[empty], torch.zeros_like(out[empty]))
    for got, want in zip([out, *grads], [out_t, *grads_t]):
        assert torch.isfinite(got).all()
        assert _worst_row(got, want) < 3.2e-2


def test_gluon_forward_rows_without_keys():
    """Tokens whose selection is empty give out 0 and lse -inf, also where a whole row tile has
    no block to visit (its plan is empty and the kernel walks block 0 fully masked)."""
    S, Hq, G, D, bs = 700, 12, 2, 128, 128
    q, k, v = _qkv(1, S, Hq, G, D, torch.bfloat16, seed=1)
    sel = _walk_selection(1, S, G, bs, 4, seed=3)
    empty = torch.zeros(S, dtype=torch.bool, device="cuda")
    empty[:64] = True  # 384 rows: exactly the first three 128-row tiles
    empty[300:301] = True
    sel[:, :, empty] = -1
    sel[:, 1, 500:520] = -1
    out, lse = _forward(q, k, v, sel, bs, gluon=True)
    out_r, _ = dense_reference(q, k, v, sel, bs, D**-0.5)
    no_key = (sel < 0).all(-1).transpose(1, 2).repeat_interleave(Hq // G, 2)  # [1, S, Hq]
    assert torch.equal(out[no_key], torch.zeros_like(out[no_key]))
    assert torch.isneginf(lse[no_key]).all() and torch.isfinite(lse[~no_key]).all()
    assert _rel(out, torch.nan_to_num(out_r)) < 1.6e-2


def test_gluon_forward_overwrites_poisoned_outputs(monkeypatch):
    """Every output element is written: every float buffer the forward and backward allocate is
    poisoned with NaN (integer ones with a huge negative id) and the outputs come back finite."""
    S, Hq, G, D, bs = 1000, 12, 2, 128, 128
    q, k, v = _qkv(1, S, Hq, G, D, torch.bfloat16, seed=2)
    sel = _walk_selection(1, S, G, bs, 16, seed=5)
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poisoned(t):
        if t.is_floating_point():
            return t.fill_(math.nan)
        return t.fill_(-(2**30)) if t.dtype in (torch.int32, torch.int64) else t

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: poisoned(real_empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: poisoned(real_empty_like(*a, **kw)))
    x = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = _forward(*x, sel, bs, gluon=True)
    out.float().sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert all(torch.isfinite(t.grad).all() for t in x)


@pytest.mark.parametrize("B,S,G,Di,block_size,topk,local_blocks,q_offset", [
    (1, 3000, 2, 128, 128, 16, 1, 0),  # M2's shapes, S not a multiple of the block
    (2, 1000, 3, 64, 64, 5, 2, 0),  # batch boundary, Di 64, K not a power of two, two local blocks
    (1, 700, 2, 128, 96, 4, 1, 0),  # non-power-of-two block (padding keys in every box)
    (1, 50, 1, 128, 128, 2, 1, 0),  # S smaller than one block
    (1, 1000, 2, 128, 128, 8, 1, 1000),  # a context-parallel chunk: queries at 1000 .. 1999
    (1, 300, 2, 128, 64, 8, 2, 1000),  # an offset inside a block
])
def test_gluon_select_matches_triton_and_reference(gluon_calls, B, S, G, Di, block_size, topk, local_blocks,
                                                   q_offset):
    """Exact ids (ties included: quarter-integer inputs give exact fp32 scores and many equal
    block maxima) against the Triton kernel and the reference."""
    from model.msa import reference

    torch.manual_seed(S + q_offset)
    iq = (torch.randint(-4, 5, (B, S, G, Di), device="cuda") / 4).bfloat16()
    ik = (torch.randint(-4, 5, (B, q_offset + S, Di), device="cuda") / 4).bfloat16()
    assert select_sm90.supported(iq, block_size)
    got = msa_select(iq, ik, block_size=block_size, topk=topk, local_blocks=local_blocks, q_offset=q_offset)
    assert gluon_calls["select"] == 1
    want = select_ops.select(iq, ik, block_size, topk, local_blocks, q_offset)
    assert got.dtype == torch.int64 and torch.equal(got, want)
    # 128-token tiles (64 per warpgroup), 4 stages
    assert torch.equal(select_sm90.select(iq, ik, block_size, topk, local_blocks, q_offset, 4, 128), want)
    ref = reference.msa_select(iq.float().cpu(), ik.float().cpu(), block_size, topk, local_blocks, q_offset)
    assert torch.equal(got.cpu(), ref)


def test_gluon_select_random_inputs_match_triton():
    """Normal inputs at M2's shape: the scores are the same bf16 products accumulated in fp32 in
    a possibly different order (Triton takes 64-key steps, Gluon whole blocks), so nearly every
    selection agrees; the exact comparisons are above."""
    torch.manual_seed(7)
    iq = torch.randn(1, 5000, 4, 128, device="cuda").bfloat16()
    ik = torch.randn(1, 5000, 128, device="cuda").bfloat16()
    got = msa_select(iq, ik, block_size=128, topk=16)
    want = select_ops.select(iq, ik, 128, 16, 1)
    assert (got == want).float().mean() > 0.999  # fp32 sums may differ in order; nearly all equal
