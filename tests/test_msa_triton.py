"""The MSA Triton kernels (model/msa/ops/) against references: a dense fp64 attention with the
mask built from block_indices (tests/msa_oracles.py), brute-force selection and block scores
written here, and the chunked PyTorch reference.

Without a GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, in a child pytest,
fp32, small sizes), driven through the API with `msa_backends(...="triton")`, or through their
launchers where a test sets tiles; with a GPU, the CUDA tests add bf16 at larger sizes (and on
Hopper the default dispatch, which runs the sm90 kernels: tests/test_msa_gluon.py tests those).
Every output buffer the kernels allocate is poisoned first (NaN, or a sentinel for integers), so
a row the kernel forgets to write fails.
"""

from __future__ import annotations

import math
import os
import types

import pytest
import torch

triton = pytest.importorskip("triton")

CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Without a GPU the kernel tests run in a child pytest started with TRITON_INTERPRET=1
# (conftest.run_under_triton_interpreter says why), and are skipped in this process.
IN_PARENT = not CUDA and not INTERPRET

from conftest import kernel_test, run_under_triton_interpreter
from model.msa import (
    attention_block_mass,
    indexer_kl_loss,
    msa_attention,
    msa_attention_with_lse,
    msa_attention_with_mass,
    msa_backends,
    msa_block_scores,
    msa_select,
    msa_select_with_scores,
    reference,
)
from model.msa.ops import attention as attention_ops
from model.msa.ops import indexer as indexer_ops
from model.msa.ops import plan as plan_ops
from model.msa.ops import select as select_ops
from model.msa.ops.common import AttnConfig
from msa_oracles import dense_reference, row_tile_plan


@pytest.mark.skipif(not IN_PARENT, reason="this process runs the kernel tests itself")
def test_kernels_under_triton_interpreter():
    run_under_triton_interpreter(__file__)


DEV = "cuda" if CUDA else "cpu"


# --------------------------------------------------------------------------------------------
# references
# --------------------------------------------------------------------------------------------


def brute_select(index_q, index_k, block_size, topk, local_blocks, q_offset=0):
    """Loop-level selection: the contract of `msa_select`, one (b, g, t) at a time. Query
    row i is token q_offset + i of the sequence whose keys index_k [B, q_offset + S, Di] holds."""
    B, S, G, _ = index_q.shape
    n_keys = index_k.shape[1]
    nb = math.ceil(n_keys / block_size)
    score = torch.einsum("bsgd,bjd->bgsj", index_q.double(), index_k.double())  # [B, G, S, n_keys]
    causal = torch.arange(n_keys) <= q_offset + torch.arange(S)[:, None]
    score = score.masked_fill(~causal, float("-inf"))
    pad = nb * block_size - n_keys
    score = torch.nn.functional.pad(score, (0, pad), value=float("-inf"))
    bscore = score.view(B, G, S, nb, block_size).amax(-1)  # [B, G, S, nb]
    out = torch.full((B, G, S, topk), -1, dtype=torch.int64)
    for b in range(B):
        for g in range(G):
            for t in range(S):
                own = (q_offset + t) // block_size
                local = list(range(max(0, own - local_blocks + 1), own + 1))
                others = [j for j in range(own + 1) if j not in local]
                others.sort(key=lambda j: (-bscore[b, g, t, j].item(), j))
                chosen = sorted(local + others[: topk - len(local)])
                out[b, g, t, : len(chosen)] = torch.tensor(chosen)
    return out


def random_selection(B, G, S, block_size, topk, seed, drop=0.3, local_blocks=1):
    """Random per-token selections: local blocks, random others, some slots left -1 (partial),
    rows ascending then -1 as the selection kernel writes them."""
    gen = torch.Generator().manual_seed(seed)
    out = torch.full((B, G, S, topk), -1, dtype=torch.int64)
    for b in range(B):
        for g in range(G):
            for t in range(S):
                own = t // block_size
                local = list(range(max(0, own - local_blocks + 1), own + 1))
                pool = [j for j in range(own + 1) if j not in local]
                perm = torch.randperm(len(pool), generator=gen).tolist()
                n_other = min(len(pool), topk - len(local))
                if torch.rand(1, generator=gen).item() < drop:
                    n_other = int(torch.randint(0, n_other + 1, (1,), generator=gen))
                chosen = sorted(local + [pool[i] for i in perm[:n_other]])
                out[b, g, t, : len(chosen)] = torch.tensor(chosen)
    return out


class _Poisoned(types.ModuleType):
    """Stands in for `torch` inside the kernel modules: empty/empty_like return poisoned memory."""

    def __init__(self):
        super().__init__("torch")

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def _poison(x):
        return x.fill_(float("nan")) if x.is_floating_point() else x.fill_(-123456)

    def empty(self, *args, **kwargs):
        return self._poison(torch.empty(*args, **kwargs))

    def empty_like(self, *args, **kwargs):
        return self._poison(torch.empty_like(*args, **kwargs))


@pytest.fixture
def poisoned(monkeypatch):
    for module in (plan_ops, select_ops, attention_ops, indexer_ops):
        monkeypatch.setattr(module, "torch", _Poisoned())


def triton_select(index_q, index_k, block_size, topk, local_blocks=1, q_offset=0):
    """`msa_select` on the Triton kernel (on CPU tensors: under the interpreter)."""
    with msa_backends(select="triton"):
        return msa_select(index_q, index_k, block_size=block_size, topk=topk, local_blocks=local_blocks,
                          q_offset=q_offset)


def _rel(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    assert torch.isfinite(a).all(), "non-finite values (an unwritten or poisoned element?)"
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


# --------------------------------------------------------------------------------------------
# selection
# --------------------------------------------------------------------------------------------


@kernel_test
@pytest.mark.parametrize(
    "S,block_size,topk,local_blocks,levels",
    [
        (150, 16, 4, 1, 4),  # coarse values: many exact ties, broken to the lower id
        (137, 32, 3, 2, 64),  # two local blocks, S not a multiple of the block
        (20, 32, 4, 1, 64),  # S < block: one block, the rest -1
        (100, 24, 5, 1, 16),  # block size not a power of two, K not a power of two
    ],
)
def test_select_matches_brute_force(poisoned, S, block_size, topk, local_blocks, levels):
    torch.manual_seed(S + block_size)
    B, G, Di = 1, 2, 32
    # small multiples of 1/levels: every product and sum is exact in fp32, so the kernel and the
    # fp64 brute force see identical scores (ties included)
    iq = torch.randint(-levels, levels + 1, (B, S, G, Di)) / levels
    ik = torch.randint(-levels, levels + 1, (B, S, Di)) / levels
    got = triton_select(iq.to(DEV), ik.to(DEV), block_size, topk, local_blocks).cpu()
    want = brute_select(iq, ik, block_size, topk, local_blocks)
    assert torch.equal(got, want), (got != want).nonzero()[:5]


def _exact_index_inputs(B, S, q_offset, G, Di, levels, seed, dtype=torch.float32):
    """index_q [B, S, G, Di], index_k [B, q_offset + S, Di]: small multiples of 1/levels, exact
    in bf16 for levels <= 64 and so every product and sum is exact in fp32 (ties included)."""
    gen = torch.Generator().manual_seed(seed)
    iq = torch.randint(-levels, levels + 1, (B, S, G, Di), generator=gen) / levels
    ik = torch.randint(-levels, levels + 1, (B, q_offset + S, Di), generator=gen) / levels
    return iq.to(dtype), ik.to(dtype)


@kernel_test
@pytest.mark.parametrize(
    "S,q_offset,block_size,topk,local_blocks,levels",
    [
        (40, 37, 16, 4, 1, 4),  # offset inside a block and a query tile (16 on CPU); many ties
        (36, 32, 16, 3, 2, 64),  # the chunk starts a block; its other local block is all before it
        (10, 27, 16, 3, 1, 64),  # S < block: the queries straddle blocks 1 and 2; a -1 slot
        (30, 16, 24, 5, 2, 16),  # offset a multiple of the tile, not of the block (not a power of two)
    ],
)
def test_select_with_q_offset_matches_reference(poisoned, S, q_offset, block_size, topk, local_blocks, levels):
    """Context-parallel selection: queries at global positions q_offset.., keys from 0, global
    block ids. B = 2 so that the key rows' batch stride (q_offset + S) is exercised."""
    iq, ik = _exact_index_inputs(2, S, q_offset, 2, 32, levels, seed=S + q_offset)
    got = triton_select(iq.to(DEV), ik.to(DEV), block_size, topk, local_blocks, q_offset).cpu()
    want = reference.msa_select(iq, ik, block_size, topk, local_blocks, q_offset)
    assert torch.equal(want, brute_select(iq, ik, block_size, topk, local_blocks, q_offset))
    assert torch.equal(got, want), (got != want).nonzero()[:5]


@kernel_test
def test_select_rejects_more_local_blocks_than_topk():
    iq, ik = torch.zeros(1, 8, 1, 16), torch.zeros(1, 8, 16)
    with pytest.raises(ValueError, match="local_blocks"):
        triton_select(iq, ik, 16, 2, 3)
    with pytest.raises(ValueError, match="index_k"):  # q_offset 4 needs 4 + 8 keys
        triton_select(iq, ik, 16, 2, 1, 4)


# --------------------------------------------------------------------------------------------
# plan: per row tile, the union of the blocks its tokens selected
# --------------------------------------------------------------------------------------------


def _check_plan(sel, S, hpg, block_m, block_size, q_offset=0):
    sel32 = sel.to(torch.int32)
    plan = plan_ops.build_plan(sel32.to(DEV), S, hpg, block_m, block_size, q_offset)
    union, count = row_tile_plan(sel32, S, hpg, block_m, block_size, q_offset)
    assert torch.equal(plan.count.cpu(), count), (plan.count.cpu() != count).nonzero()[:5]
    assert torch.equal(plan.union.cpu(), union), (plan.union.cpu() != union).nonzero()[:5]
    return count


@kernel_test
@pytest.mark.parametrize(
    "S,hpg,block_m,block_size,topk,q_offset",
    [
        (300, 6, 128, 32, 16, 0),  # M2's heads, tile and K; S not a multiple of the block
        (300, 1, 128, 32, 16, 0),  # the block scores' plan (a row per token) at the CUDA tile
        (20, 6, 32, 32, 5, 0),  # S < block, K not a power of two
        (97, 3, 32, 24, 5, 0),  # tiles start inside a token's rows; block not a power of two
        (40, 1, 16, 16, 4, 37),  # query offset inside a block and a tile (the CPU block scores' tile)
        (10, 1, 32, 16, 3, 27),  # offset, S < block: one tile whose tokens straddle blocks 1 and 2
    ],
)
def test_plan_matches_reference(poisoned, S, hpg, block_m, block_size, topk, q_offset):
    """Ids drawn from -1 .. one past the last block (-1 slots, duplicates within and across
    tokens, unsorted rows, blocks after the tile's last token's own, which are dropped), and at
    q_offset 0 also rows as the selection kernel writes them. B = G = 2."""
    n_blocks = (q_offset + S + block_size - 1) // block_size
    gen = torch.Generator().manual_seed(S + hpg)
    _check_plan(torch.randint(-1, n_blocks + 1, (2, 2, S, topk), generator=gen), S, hpg, block_m,
                block_size, q_offset)
    if q_offset == 0:
        _check_plan(random_selection(2, 2, S, block_size, topk, seed=S), S, hpg, block_m, block_size)


@kernel_test
@pytest.mark.parametrize(
    "S,hpg,block_m,topk,counts",
    [
        (23, 6, 128, 16, [22 * 16, 2 * 16]),  # tile 0: 352 steps (its row is 368 wide)
        (40, 1, 32, 5, [32 * 5, 8 * 5]),
        (30, 3, 32, 5, [11 * 5, 12 * 5, 9 * 5]),  # neighbouring tiles share tokens 10 and 21
    ],
)
def test_plan_of_distinct_ids(poisoned, S, hpg, block_m, topk, counts):
    """Every id distinct and kept (block size 1, queries after all of them): each tile's count
    is its tokens x K, so a token left out or a copy taken twice shows."""
    q_offset = 4000
    ids = torch.randperm(q_offset, generator=torch.Generator().manual_seed(S))[: S * topk]
    count = _check_plan(ids.view(1, 1, S, topk), S, hpg, block_m, 1, q_offset)
    assert count.flatten().tolist() == counts


# --------------------------------------------------------------------------------------------
# attention: outputs and gradients against the dense fp64 reference
# --------------------------------------------------------------------------------------------

CASES = {
    # name: (S, Hq, G, D, block_size, topk)
    "S300_bs32_hpg3": (300, 6, 2, 32, 32, 4),
    "S301_bs16_hpg1": (301, 2, 2, 16, 16, 3),
    "S20_lt_block": (20, 4, 2, 16, 32, 2),
    "S97_bs24": (97, 4, 1, 16, 24, 3),
    "S70_bs16_hpg16": (70, 32, 2, 16, 16, 3),  # M3's 16 query heads per KV group (64 / 4)
}


def _check_attention(S, Hq, G, D, block_size, topk, sel, dtype, tol, config=None, seed=0, backend="triton"):
    """`msa_attention_with_lse` on `backend` (None: the default dispatch) with the Triton tiles
    `config` against the fp64 dense reference: out, lse, dq, dk, dv (a gradient through lse too)."""
    torch.manual_seed(seed)
    B = sel.shape[0]
    q = torch.randn(B, S, Hq, D, device=DEV, dtype=dtype, requires_grad=True)
    k = torch.randn(B, S, G, D, device=DEV, dtype=dtype, requires_grad=True)
    v = torch.randn(B, S, G, D, device=DEV, dtype=dtype, requires_grad=True)
    dout = torch.randn(B, S, Hq, D, device=DEV, dtype=dtype)
    dlse = torch.randn(B, S, Hq, device=DEV)
    scale = 0.7 / math.sqrt(D)
    with msa_backends(attention=backend, attention_config=config):
        out, lse = msa_attention_with_lse(q, k, v, sel.to(DEV), block_size=block_size, softmax_scale=scale)
    ((out.float() * dout.float()).sum() + (lse * dlse).sum()).backward()

    qr, kr, vr = (x.detach().double().requires_grad_() for x in (q, k, v))
    out_r, lse_r = dense_reference(qr, kr, vr, sel.to(DEV), block_size, scale)
    ((out_r * dout.double()).sum() + (lse_r * dlse.double()).sum()).backward()

    assert out.dtype == dtype and lse.dtype == torch.float32
    errs = {
        "out": _rel(out, out_r), "lse": _rel(lse, lse_r),
        "dq": _rel(q.grad, qr.grad), "dk": _rel(k.grad, kr.grad), "dv": _rel(v.grad, vr.grad),
    }
    assert max(errs.values()) < tol, errs


@kernel_test
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n.startswith(("S300", "S301", "S70")) else n
                                  for n in CASES])
def test_attention_matches_dense_reference(poisoned, name):
    S, Hq, G, D, bs, topk = CASES[name]
    sel = random_selection(1, G, S, bs, topk, seed=S)
    assert (sel == -1).any()  # partial selections are part of every case
    _check_attention(S, Hq, G, D, bs, topk, sel, torch.float32, 1e-5)


@pytest.mark.slow
@kernel_test
def test_attention_shared_blocks_take_the_unmasked_path(poisoned):
    """Every token selects blocks 0 and 1 besides its own: whole tiles then read those blocks
    without the per-element mask (skip_mask), which must change nothing."""
    S, Hq, G, D, bs, topk = 200, 4, 2, 16, 16, 3
    own = torch.arange(S) // bs
    rows = [sorted({0, 1, int(o)}) for o in own]
    sel = torch.tensor([r + [-1] * (topk - len(r)) for r in rows]).expand(1, G, S, topk).clone()
    _check_attention(S, Hq, G, D, bs, topk, sel, torch.float32, 1e-5)
    cfg = AttnConfig(block_m=32, fwd_sub_n=16, dq_sub_n=16, dq_skip_mask=True, fwd_tma=True, dq_tma=True)
    _check_attention(S, Hq, G, D, bs, topk, sel, torch.float32, 1e-5, config=cfg)


@pytest.mark.slow
@kernel_test
def test_attention_tma_loads_batch_boundary(poisoned):
    """K/V by tensor descriptors over [B * S, G * D]: the last block of batch 0 (S not a
    multiple of the block, which is not a power of two) reaches into batch 1's rows; those keys
    must not count. Two key steps per block (fwd_sub_n, dq_sub_n 16 of 32)."""
    S, Hq, G, D, bs, topk = CASES["S97_bs24"]
    sel = random_selection(2, G, S, bs, topk, seed=9)
    cfg = AttnConfig(block_m=32, fwd_sub_n=16, dq_sub_n=16, fwd_tma=True, dq_tma=True)
    _check_attention(S, Hq, G, D, bs, topk, sel, torch.float32, 1e-5, config=cfg)


@pytest.mark.slow
@kernel_test
def test_attention_local_block_boundary_and_odd_selections(poisoned):
    """Two local blocks where a token's own block starts at it (t % bs == 0, one causal key),
    selections unsorted, duplicated, and naming blocks after the token's own (no key j <= t)."""
    S, Hq, G, D, bs, topk = 130, 4, 2, 16, 16, 4
    sel = random_selection(1, G, S, bs, topk, seed=3, local_blocks=2)
    sel = sel.flip(-1)  # -1 slots first, ids descending
    sel[0, 0, 64, :2] = torch.tensor([5, 5])  # duplicate, and a block after t=64's own (4)
    _check_attention(S, Hq, G, D, bs, topk, sel, torch.float32, 1e-5, seed=1)


@pytest.mark.slow
@kernel_test
def test_attention_with_kernel_selection_end_to_end(poisoned):
    """Selections written by the selection kernel feed the attention kernel."""
    S, Hq, G, D, bs, topk = 200, 4, 2, 32, 16, 4
    torch.manual_seed(7)
    iq, ik = torch.randn(1, S, G, 16, device=DEV), torch.randn(1, S, 16, device=DEV)
    sel = triton_select(iq, ik, bs, topk, 1).cpu()
    _check_attention(S, Hq, G, D, bs, topk, sel, torch.float32, 1e-5)


@kernel_test
def test_attention_without_lse_output():
    S, Hq, G, D, bs = 40, 2, 1, 16, 16
    sel = random_selection(1, G, S, bs, 2, seed=2)
    torch.manual_seed(0)
    q = torch.randn(1, S, Hq, D, device=DEV, requires_grad=True)
    k = torch.randn(1, S, G, D, device=DEV, requires_grad=True)
    v = torch.randn(1, S, G, D, device=DEV, requires_grad=True)
    with msa_backends(attention="triton"):
        out = msa_attention(q, k, v, sel.to(DEV), block_size=bs)
    out.sum().backward()
    out_r, _ = dense_reference(q.double(), k.double(), v.double(), sel.to(DEV), bs, D**-0.5)
    assert _rel(out, out_r) < 1e-5
    assert torch.isfinite(k.grad).all()


@kernel_test
def test_attention_with_query_offset_runs_after_the_keys(poisoned):
    """q_offset >= S (a context-parallel ring step against an earlier shard) on the kernels,
    which have no query offset: the dispatch puts the queries after the keys. Outputs, lse and
    every gradient against the reference at the same q_offset; selections with -1 slots."""
    B, S, Hq, G, D, bs = 2, 32, 4, 2, 16, 8
    gen = torch.Generator().manual_seed(4)
    idx = torch.tensor([[-1, 0, 2], [1, -1, 3], [0, 1, 2]])[torch.randint(0, 3, (B, G, S), generator=gen)]
    qkv = [torch.randn(B, S, h, D, generator=gen, requires_grad=True) for h in (Hq, G, G)]
    dout, dlse = torch.randn(B, S, Hq, D, generator=gen), torch.randn(B, S, Hq, generator=gen)
    runs = []
    for backend in ("triton", "reference"):
        with msa_backends(attention=backend):
            out, lse = msa_attention_with_lse(*(x.to(DEV) for x in qkv), idx.to(DEV), block_size=bs,
                                              softmax_scale=0.3, q_offset=S)
        grads = torch.autograd.grad((out, lse), qkv, (dout.to(DEV), dlse.to(DEV)))
        runs.append([out, lse, *grads])
    for got, want in zip(*runs):
        assert _rel(got, want) < 1e-5


# --------------------------------------------------------------------------------------------
# indexer-loss terms: block mass and block scores against the reference and a brute force
# --------------------------------------------------------------------------------------------


def brute_block_scores(index_q, index_k, block_indices, block_size, q_offset=0):
    """fp64 loop-free brute force: per (b, g, t, slot) the max over the slot's block's keys
    j <= q_offset + t and the lowest key position reaching it; -inf and -1 where none."""
    S = index_q.shape[1]
    n_keys = index_k.shape[1]
    score = torch.einsum("bsgd,bjd->bgsj", index_q.double(), index_k.double())[:, :, :, None]  # [B, G, S, 1, SK]
    j = torch.arange(n_keys)
    keep = (j // block_size == block_indices[..., None]) & (block_indices[..., None] >= 0)
    keep &= j <= q_offset + torch.arange(S)[:, None, None]  # [B, G, S, K, SK]
    score = score.masked_fill(~keep, float("-inf"))
    best = score.max(-1)
    return best.values.float(), torch.where(best.values > float("-inf"), best.indices, -1)


def _block_mass_check(B, S, Hq, G, D, bs, sel, dtype, tol, seed=0):
    """The block mass kernel, and the attention forward that computes the mass in its own pass
    (`msa_attention_with_mass`: its out and lse too), against the reference."""
    torch.manual_seed(seed)
    q = torch.randn(B, S, Hq, D, device=DEV, dtype=dtype)
    k = torch.randn(B, S, G, D, device=DEV, dtype=dtype)
    v = torch.randn(B, S, G, D, device=DEV, dtype=dtype)
    scale = 0.7 / math.sqrt(D)
    sel = sel.to(DEV)
    ref_out, lse = reference.msa_attention(q, k, v, sel, bs, scale)
    want = reference.attention_block_mass(q, k, lse, sel, bs, scale)
    with msa_backends(block_mass="triton"):
        got = attention_block_mass(q, k, lse, sel, block_size=bs, softmax_scale=scale)
    with msa_backends(attention="triton"):
        out, fused_lse, fused = msa_attention_with_mass(q, k, v, sel, block_size=bs, softmax_scale=scale)
    assert _rel(out, ref_out) < tol and _rel(fused_lse, lse) < tol
    for mass in (got, fused):
        assert mass.shape == want.shape and mass.dtype == torch.float32
        assert torch.equal(mass[sel < 0], torch.zeros_like(mass[sel < 0]))
        assert _rel(mass, want) < tol, _rel(mass, want)


@kernel_test
@pytest.mark.parametrize("name", [pytest.param("S300_bs32_hpg3", marks=pytest.mark.slow), "S20_lt_block", "S97_bs24"])
def test_block_mass_matches_reference(poisoned, name):
    S, Hq, G, D, bs, topk = CASES[name]
    B = 1 if S > 100 else 2  # (interpreter time) the batch stride in the two small cases
    sel = random_selection(B, G, S, bs, topk, seed=S + 1)
    assert (sel == -1).any()
    _block_mass_check(B, S, Hq, G, D, bs, sel, torch.float32, 1e-5)


@kernel_test
def test_block_mass_odd_selections(poisoned):
    """Unsorted and duplicated ids, and a block after the token's own (no causal key: 0 mass)."""
    S, Hq, G, D, bs, topk = 130, 4, 2, 16, 16, 4
    sel = random_selection(1, G, S, bs, topk, seed=3, local_blocks=2).flip(-1)
    sel[0, 0, 64, :2] = torch.tensor([5, 5])
    _block_mass_check(1, S, Hq, G, D, bs, sel, torch.float32, 1e-5, seed=1)


@kernel_test
def test_block_mass_shared_blocks_take_the_unmasked_path(poisoned):
    """Every token selects blocks 0 and 1 besides its own: whole tiles skip the mask there."""
    S, Hq, G, D, bs, topk = 200, 4, 2, 16, 16, 3
    rows = [sorted({0, 1, int(o)}) for o in torch.arange(S) // bs]
    sel = torch.tensor([r + [-1] * (topk - len(r)) for r in rows]).expand(1, G, S, topk).clone()
    _block_mass_check(1, S, Hq, G, D, bs, sel, torch.float32, 1e-5, seed=2)


def _scores_selection(iq, ik, bs, topk, q_offset, seed):
    """Reference selection (global ids), then some slots emptied (-1) and, for one token, a
    block after its own (a used slot with no causal key)."""
    sel = reference.msa_select(iq, ik, bs, topk, 1, q_offset)
    gen = torch.Generator().manual_seed(seed)
    sel = sel.masked_fill(torch.rand(sel.shape, generator=gen) < 0.2, -1)
    n_blocks = math.ceil(ik.shape[1] / bs)
    if (q_offset + 0) // bs + 1 < n_blocks:
        sel[0, 0, 0, 0] = (q_offset + 0) // bs + 1
    return sel


def _check_block_scores(iq, ik, bs, topk, q_offset, seed, dev=DEV):
    sel = _scores_selection(iq, ik, bs, topk, q_offset, seed)
    want, want_arg = brute_block_scores(iq.float(), ik.float(), sel, bs, q_offset)
    sc, arg, _ = indexer_ops.block_scores_argmax(iq.to(dev), ik.to(dev), sel.to(dev, torch.int32), bs, q_offset)
    assert torch.equal(sc.cpu(), want), (sc.cpu() != want).nonzero()[:5]
    assert torch.equal(arg.cpu(), want_arg), (arg.cpu() != want_arg).nonzero()[:5]
    _check_block_scores_grads(iq, ik, sel, bs, q_offset, seed, dev)


def _check_block_scores_grads(iq, ik, sel, bs, q_offset, seed, dev=DEV):
    """The kernel backward's gradients (fp32) against the reference's."""
    w = torch.randn(sel.shape, generator=torch.Generator().manual_seed(seed))
    grads = []
    for backend, d in (("triton", dev), ("reference", "cpu")):
        x = [t.detach().float().to(d).requires_grad_() for t in (iq, ik)]
        with msa_backends(block_scores=backend):
            out = msa_block_scores(x[0], x[1], sel.to(d), block_size=bs, q_offset=q_offset)
        (torch.where(torch.isfinite(out), out, 0.0) * w.to(d)).sum().backward()
        grads.append([t.grad.cpu() for t in x])
    for g_got, g_want in zip(*grads):
        assert g_want.abs().sum() > 0
        assert torch.allclose(g_got, g_want, rtol=1e-5, atol=1e-5)


@kernel_test
@pytest.mark.parametrize(
    "S,q_offset,block_size,topk,levels,Di",
    [
        pytest.param(150, 0, 16, 4, 4, 32, marks=pytest.mark.slow),  # coarse values: exact ties inside blocks, the lowest key position wins
        (20, 0, 32, 3, 64, 32),  # S < block
        pytest.param(97, 0, 24, 5, 16, 32, marks=pytest.mark.slow),  # block not a power of two, S not a multiple of it, K not a power of two
        (40, 37, 16, 4, 4, 32),  # q_offset inside a block and a tile
        (10, 27, 16, 3, 64, 32),  # q_offset, S < block, the queries straddle two blocks
        (40, 16, 16, 4, 16, 24),  # index head dim not a power of two: zero-padded, forward and backward
    ],
)
def test_block_scores_match_brute_force(poisoned, S, q_offset, block_size, topk, levels, Di):
    iq, ik = _exact_index_inputs(2, S, q_offset, 2, Di, levels, seed=S + q_offset)
    _check_block_scores(iq, ik, block_size, topk, q_offset, seed=S)


@kernel_test
def test_block_scores_backward_merges_shared_keys(poisoned):
    """The backward's per-tile sums: every token of a tile with the same index query (all hit one
    argmax key per earlier block), and tokens that select one block in two slots (both slots'
    gradients reach its argmax key), against the reference's gradients."""
    S, q_offset, bs, topk, Di = 70, 0, 16, 4, 32
    iq, ik = _exact_index_inputs(2, S, q_offset, 2, Di, 16, seed=5)
    iq[:, 12:48] = iq[:, 12:13]  # one query for two whole CPU tiles (16 tokens) and part of a third
    sel = _scores_selection(iq, ik, bs, topk, q_offset, seed=5)
    sel[:, :, 50, 1] = sel[:, :, 50, 0]
    sel[:, :, 60:63, 2] = sel[:, :, 60:63, 3]
    _check_block_scores_grads(iq, ik, sel, bs, q_offset, seed=6)


@kernel_test
@pytest.mark.parametrize(
    "S,q_offset,block_size,topk,local_blocks,levels,Di",
    [
        (150, 0, 16, 4, 1, 4, 32),  # coarse values: ties between blocks and inside them
        (97, 0, 24, 5, 2, 16, 32),  # block not a power of two, K not a power of two, two local blocks
        (40, 37, 16, 4, 1, 4, 24),  # q_offset inside a block and a tile, index head dim padded
        (20, 0, 32, 3, 1, 64, 32),  # S < block: one block, the other slots unused
    ],
)
def test_selection_gives_the_block_scores(poisoned, S, q_offset, block_size, topk, local_blocks, levels, Di):
    """`msa_select_with_scores` on the kernels: the blocks of `msa_select` and their scores and
    argmax keys equal to the brute force (local blocks with their own scores, -inf / -1 at unused
    slots); gradients equal to the reference's."""
    iq, ik = _exact_index_inputs(2, S, q_offset, 2, Di, levels, seed=S + q_offset + 1)
    iq, ik = iq.to(DEV), ik.to(DEV)
    with msa_backends(select="triton"):
        want_blocks = msa_select(iq, ik, block_size=block_size, topk=topk, local_blocks=local_blocks,
                                 q_offset=q_offset)
    assert (want_blocks < 0).any()  # the first tokens have fewer than K blocks: unused slots
    want, _ = brute_block_scores(iq.float().cpu(), ik.float().cpu(), want_blocks.cpu(), block_size, q_offset)
    w = torch.randn(want_blocks.shape, generator=torch.Generator().manual_seed(S))
    grads = []
    for backend in ("triton", "reference"):
        x = [t.detach().float().requires_grad_() for t in (iq, ik)]
        with msa_backends(select=backend, block_scores=backend):
            got_blocks, out = msa_select_with_scores(x[0], x[1], block_size=block_size, topk=topk,
                                                     local_blocks=local_blocks, q_offset=q_offset)
        assert torch.equal(got_blocks, want_blocks) and not got_blocks.requires_grad
        assert torch.equal(out.detach().cpu(), want)
        (torch.where(torch.isfinite(out), out, 0.0) * w.to(out.device)).sum().backward()
        grads.append([t.grad.cpu() for t in x])
    for g_got, g_want in zip(*grads):
        assert torch.allclose(g_got, g_want, rtol=1e-5, atol=1e-5)


def _kl_inputs(shape, seed, dense_valid=None):
    """p_main, scores, valid as the layer makes them: scores -inf at invalid slots, p_main a
    distribution over the valid slots with some zeros; plus rows with no valid slot, an all-zero
    p row, and mass on invalid slots (both backends must ignore it)."""
    gen = torch.Generator().manual_seed(seed)
    if dense_valid is None:
        valid = torch.rand(shape, generator=gen) < 0.7
        valid[..., 0, :] = False  # a row (per b, g) without any valid slot
    else:
        valid = dense_valid.expand(shape)
    scores = (torch.randn(shape, generator=gen) * 3).masked_fill(~valid, float("-inf"))
    p = torch.rand(shape, generator=gen).masked_fill(torch.rand(shape, generator=gen) < 0.2, 0.0) * valid
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-30)
    p[..., 1, :] = 0.0  # attention mass zero everywhere
    p[..., 2, -1] = 0.5  # mass on a slot that may be invalid
    return p, scores, dense_valid if dense_valid is not None else valid


@kernel_test
@pytest.mark.parametrize(
    "shape,dense",
    [
        ((2, 3, 37, 5), False),  # K not a power of two, rows not a multiple of a program's
        ((1, 2, 45, 300), False),  # long rows: a few rows per program
        ((1, 2, 70, 3), True),  # the dense warm-up's mask [S, nb], broadcast
        ((1, 8, 600, 16), False),  # M2's groups and top-k
    ],
)
def test_kl_loss_matches_reference(poisoned, shape, dense):
    """The KL kernel's loss and its gradient in the scores (scaled by the incoming gradient)
    against the reference's autograd; without a gradient the same loss."""
    dense_valid = reference.dense_block_valid(shape[2], 16)[:, : shape[3]] if dense else None
    p, scores, valid = _kl_inputs(shape, seed=sum(shape), dense_valid=dense_valid)
    got = []
    for backend in ("triton", "reference"):
        x = scores.to(DEV).requires_grad_()
        with msa_backends(kl_loss=backend):
            loss = indexer_kl_loss(p.to(DEV), x, valid.to(DEV))
            with torch.no_grad():
                loss_nograd = indexer_kl_loss(p.to(DEV), x, valid.to(DEV))
        (grad,) = torch.autograd.grad(loss * 0.7, x)
        got.append((loss.detach().cpu(), loss_nograd.cpu(), grad.cpu()))
    (loss, loss_nograd, grad), (want, _, want_grad) = got
    assert want > 0 and torch.isfinite(grad).all()
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(loss_nograd, loss, rtol=0, atol=0)
    torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-8)


# --------------------------------------------------------------------------------------------
# CUDA: bf16 at larger sizes
# --------------------------------------------------------------------------------------------

cuda_only = pytest.mark.gpu(reason="needs a CUDA GPU (bf16 in the compiled kernels; "
                                                "Triton's CPU interpreter has no bf16)")


CUDA_CONFIGS = {  # name: (Triton tiles, backend)
    "default": (dict(), None),  # the default dispatch: on sm90 the Gluon kernels (tests/test_msa_gluon.py)
    "tma_sub64": (dict(fwd_tma=True, fwd_sub_n=64, fwd_stages=3, dq_tma=True, dq_sub_n=64, dq_stages=2), "triton"),
    "pointer_sub128": (dict(fwd_tma=False, fwd_sub_n=128, fwd_stages=2, dq_tma=False, dq_sub_n=64, dq_stages=2),
                       "triton"),
}


@cuda_only
@pytest.mark.parametrize("name", list(CUDA_CONFIGS))
def test_cuda_bf16_attention(poisoned, name):
    S, Hq, G, D, bs, topk = 1500, 12, 2, 128, 64, 8
    sel = random_selection(2, G, S, bs, topk, seed=11)
    tiles, backend = CUDA_CONFIGS[name]
    _check_attention(S, Hq, G, D, bs, topk, sel, torch.bfloat16, 1.5e-2, config=AttnConfig(**tiles),
                     backend=backend)


@cuda_only
def test_cuda_fp32_attention(poisoned):
    """fp32 inputs take the CUDA fp32 tiles (exact fp32 products): rel. error < 1e-4 at d 128."""
    S, Hq, G, D, bs, topk = 700, 6, 2, 128, 64, 6
    sel = random_selection(1, G, S, bs, topk, seed=12)
    _check_attention(S, Hq, G, D, bs, topk, sel, torch.float32, 1e-4)


@cuda_only
def test_cuda_select_bf16_inputs(poisoned):
    S, G, Di, bs, topk = 1000, 4, 128, 64, 6
    torch.manual_seed(3)
    iq = (torch.randint(-4, 5, (1, S, G, Di)) / 4).to(torch.bfloat16)
    ik = (torch.randint(-4, 5, (1, S, Di)) / 4).to(torch.bfloat16)
    want = brute_select(iq.float(), ik.float(), bs, topk, 1)
    for sub_n in (64, 32):  # one and two key steps per block
        got = select_ops.select(iq.cuda(), ik.cuda(), bs, topk, 1, sub_n=sub_n).cpu()
        assert torch.equal(got, want), sub_n


@cuda_only
def test_cuda_select_bf16_with_q_offset(poisoned):
    """Selection under context parallelism on the GPU, bf16 (exact inputs, so ids must equal the
    reference's): an offset at a block and tile start and one inside a block, one and two key
    steps per block, and through `msa_select`'s dispatch."""
    S, G, Di, bs, topk = 700, 4, 128, 64, 6
    for q_offset in (1024, 1000):
        iq, ik = _exact_index_inputs(2, S, q_offset, G, Di, 4, seed=q_offset, dtype=torch.bfloat16)
        want = reference.msa_select(iq.float(), ik.float(), bs, topk, 2, q_offset)
        for sub_n in (64, 32):
            got = select_ops.select(iq.cuda(), ik.cuda(), bs, topk, 2, q_offset, sub_n=sub_n).cpu()
            assert torch.equal(got, want), (q_offset, sub_n)
        got = msa_select(iq.cuda(), ik.cuda(), block_size=bs, topk=topk, local_blocks=2, q_offset=q_offset)
        assert torch.equal(got.cpu(), want), q_offset


@cuda_only
def test_cuda_bf16_indexer_terms(poisoned):
    """M2-like heads (Hq 48, G 8, D = Di = 128, block 128, top 16) at S = 3000, bf16: block mass
    against the reference, from the block mass kernel and from the Triton attention forward
    (`msa_attention_with_mass`); block scores (exact inputs) equal to it, from the block scores
    kernel (`msa_select_with_scores`); through the default dispatch where not forced."""
    S, Hq, G, D, bs, topk = 3000, 48, 8, 128, 128, 16
    iq, ik = _exact_index_inputs(1, S, 0, G, D, 4, seed=21, dtype=torch.bfloat16)
    sel = msa_select(iq.cuda(), ik.cuda(), block_size=bs, topk=topk)
    fused_sel, fused_scores = msa_select_with_scores(iq.cuda(), ik.cuda(), block_size=bs, topk=topk)
    assert torch.equal(fused_sel, sel)
    assert torch.equal(fused_scores, reference.msa_block_scores(iq.float().cuda(), ik.float().cuda(), sel, bs))
    torch.manual_seed(4)
    sel = sel.masked_fill(torch.rand(sel.shape, device="cuda") < 0.1, -1)
    q = torch.randn(1, S, Hq, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, S, G, D, device="cuda", dtype=torch.bfloat16)
    _, lse = msa_attention_with_lse(q, k, k, sel, block_size=bs)
    got = attention_block_mass(q, k, lse, sel, block_size=bs)
    want = reference.attention_block_mass(q, k, lse, sel, bs, D**-0.5)
    assert _rel(got, want) < 2e-3
    with msa_backends(attention="triton"):
        _, fused_lse, fused = msa_attention_with_mass(q, k, k, sel, block_size=bs)
    attended = torch.isfinite(lse)  # a token whose only block was dropped above attends to nothing
    assert torch.equal(torch.isfinite(fused_lse), attended) and _rel(fused_lse[attended], lse[attended]) < 1e-4
    assert _rel(fused, want) < 2e-3
    want = reference.msa_block_scores(iq.float().cuda(), ik.float().cuda(), sel, bs)
    got = msa_block_scores(iq.cuda(), ik.cuda(), sel, block_size=bs)
    assert torch.equal(got, want)
    # the bf16 backward (W rounded to bf16, as the bf16 d index_k it ends in) against the
    # reference's fp32 gradients
    w = torch.randn(sel.shape, device="cuda")
    grads = []
    for x in ([t.cuda().requires_grad_() for t in (iq, ik)], [t.float().cuda().requires_grad_() for t in (iq, ik)]):
        with msa_backends(block_scores="triton" if x[0].dtype == torch.bfloat16 else "reference"):
            out = msa_block_scores(x[0], x[1], sel, block_size=bs)
        (torch.where(torch.isfinite(out), out, 0.0) * w).sum().backward()
        grads.append([t.grad.float() for t in x])
    for g_got, g_want in zip(*grads):
        assert _rel(g_got, g_want) < 4e-3


@cuda_only
def test_cuda_bf16_block_scores_with_q_offset(poisoned):
    """Block scores and argmax positions (exact bf16 inputs) at offsets 1000 and 1024, against
    the brute force; gradients against the reference."""
    S, G, Di, bs, topk = 600, 4, 128, 128, 6
    for q_offset in (1000, 1024):
        iq, ik = _exact_index_inputs(1, S, q_offset, G, Di, 4, seed=q_offset, dtype=torch.bfloat16)
        _check_block_scores(iq, ik, bs, topk, q_offset, seed=q_offset, dev="cuda")
