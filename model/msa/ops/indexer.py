"""Triton kernels of MSA's indexer-loss terms: the attention mass per selected block (p_main,
the KL target) and the index block scores of the selected blocks, forward and backward.

Layers: Triton kernels (`_*_kernel`) -> launchers (`head_block_mass`, `block_scores_argmax`) ->
`BlockScores`, `IndexerKL` (torch.autograd.Function) -> `block_mass`, `block_scores`,
`indexer_kl_loss` -> `model.msa.api`'s `attention_block_mass`, `msa_block_scores` and
`indexer_kl_loss`, which `model.msa.dispatch` routes here.

Design (numbers and the measurements behind it: bench/NOTES_msa.md):
- The block mass walks the attention forward's row tiles and plan (one product per step, row
  sums into the slot of the block): per visited block p = exp(scale * q.k - lse) over the row's
  keys of that block, masked as in the forward. Query offset 0 only, like the attention kernels.
- The block scores walk a plan of 128-token tiles (one row per token) like the selection,
  keeping per slot the causal max and its lowest key position (ties: the lowest position, as
  torch.max in the reference). Keys [B, q_offset + S, Di]: they take context parallelism's
  query offset.
- The block-score backward walks the forward's plan again: d index_q gathers each slot's argmax
  key; for d index_k each visited block forms W [tokens, keys] (each token's score gradient at
  its argmax key) and W^T index_q in one product, so the fp32 atomic adds are one row per key a
  tile's tokens hit. The earlier kernel added one row per (token, slot): 2.1e9 scalar atomics at
  128K (48/8 heads, top-16), which neighbouring tokens aim at the same argmax keys, 11 ms on
  the H200.

- The KL loss is one pass over its rows (b, g, t): the loss's partial sums and its gradient
  in the scores, which the backward only scales (the reference's autograd: ~12 elementwise
  kernels forward and as many backward).

Legend: B batch, S tokens (queries), Hq query heads, G GQA groups (= KV heads = index query
heads), HPG = Hq // G, D head dim, Di index head dim (DI: padded to a power of two), K = TOPK
selected blocks, bs block size, SK = q_offset + S keys.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from model.msa.ops.common import (
    LOG2E,
    AttnConfig,
    attn_config_for,
    dot_precision,
    index_operands,
    pow2,
    scores_tile,
)
from model.msa.ops.plan import Plan, build_plan, plan_row, plan_step, row_tile, step_needs_mask


@triton.jit
def _msa_block_mass_kernel(
    Q,  # [B, S, HQ, D]
    K,  # [B, S, G, D]
    Sel, Union, Count,  # as in the forward
    Lse,  # [B, S, HQ] fp32, natural log
    Mass,  # [B, G, S, HPG, TOPK] fp32
    S, block_size, n_tiles, W, qk_scale2,
    G: tl.constexpr, HPG: tl.constexpr, D: tl.constexpr, TOPK: tl.constexpr, TOPK_P2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SUB_N: tl.constexpr, DOT_PREC: tl.constexpr,
    SKIP_MASK: tl.constexpr,
):
    # the forward's row tile and plan; per visited block p = exp(scale * q.k - lse) over the
    # row's keys of that block, its row sum added into the slot(s) holding the block's id
    tile, bg, b, g, t_first, n, row_ok, t, d, q_row, q, kk, sel = row_tile(
        Q, Sel, S, G, HPG, D, TOPK, TOPK_P2, BLOCK_M)
    lse2 = tl.load(Lse + q_row, mask=row_ok, other=0.0) * 1.4426950408889634  # [BLOCK_M] log2 units

    mass = tl.zeros([BLOCK_M, TOPK_P2], tl.float32)
    jj = tl.arange(0, SUB_N)
    u_base, cnt = plan_row(Count, bg, tile, n_tiles, W)
    NSUB: tl.constexpr = BLOCK_N // SUB_N
    for it in range(0, cnt * NSUB):
        kb, j0, j, kv_ok = plan_step(Union, u_base, it, jj, block_size, S, NSUB, SUB_N)  # j, kv_ok [SUB_N]
        k = tl.load(K + ((b.to(tl.int64) * S + j) * G + g)[:, None] * D + d[None, :],
                    mask=kv_ok[:, None], other=0.0)  # [SUB_N, D]
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)  # [BLOCK_M, SUB_N] unscaled
        p = tl.exp2(s * qk_scale2 - lse2[:, None])
        is_kb = sel == kb  # [BLOCK_M, TOPK_P2]
        hit = tl.max(is_kb.to(tl.int32), axis=1) > 0
        need = step_needs_mask(hit, kb, j0, t_first, block_size, SKIP_MASK, SUB_N, BLOCK_N)
        if need:
            keep = hit[:, None] & (j[None, :] <= t[:, None]) & kv_ok[None, :]
            p = tl.where(keep, p, 0.0)
        mass += tl.where(is_kb, tl.sum(p, axis=1)[:, None], 0.0)
    o_row = (bg.to(tl.int64) * S * HPG + n) * TOPK
    tl.store(Mass + o_row[:, None] + kk[None, :], mass, mask=row_ok[:, None] & (kk[None, :] < TOPK))


def head_block_mass(q, k, lse, sel32, block_size: int, scale: float, cfg: AttnConfig) -> torch.Tensor:
    """Launcher: q [B, S, Hq, D], k [B, S, G, D], lse [B, S, Hq] fp32, sel32 [B, G, S, K] int32
    -> per-head mass [B, G, S, HPG, K] fp32."""
    B, S, Hq, D = q.shape
    G = k.shape[2]
    K = sel32.shape[-1]
    hpg = Hq // G
    plan = build_plan(sel32, S, hpg, cfg.block_m, block_size)
    mass = torch.empty(B, G, S, hpg, K, dtype=torch.float32, device=q.device)
    BN = pow2(block_size)
    _msa_block_mass_kernel[(plan.n_tiles, B * G)](
        q, k, sel32, plan.union, plan.count, lse, mass,
        S, block_size, plan.n_tiles, plan.union.shape[-1], scale * LOG2E,
        G=G, HPG=hpg, D=D, TOPK=K, TOPK_P2=pow2(K, 1),
        BLOCK_M=plan.block_m, BLOCK_N=BN, SUB_N=min(cfg.fwd_sub_n, BN), DOT_PREC=dot_precision(q.dtype),
        SKIP_MASK=cfg.skip_mask, num_warps=cfg.fwd_warps, num_stages=cfg.fwd_stages,
    )
    return mass


def block_mass(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, block_indices: torch.Tensor,
               block_size: int, scale: float, cfg: AttnConfig | None = None) -> torch.Tensor:
    """p_main of the indexer loss (no gradient), `reference.attention_block_mass` at q_offset 0.

    Args:
        q: [B, S, Hq, D]; k: [B, S, G, D]; lse: [B, S, Hq] fp32 of the attention on the same
            inputs; block_indices: [B, G, S, K], -1 = unused slot; scale: the softmax scale.
        cfg: the tiles (None: `attn_config_for` the device and dtype).

    Returns:
        fp32 [B, G, S, K]: per slot the sum over the block's keys j <= t of
        exp(scale * q.k_j - lse), averaged over the group's heads, renormalised over the slots.
    """
    D = q.shape[-1]
    if D not in (16, 32, 64, 128, 256):
        raise ValueError(f"head dim {D} not supported by the Triton kernels (16, 32, 64, 128, 256)")
    cfg = cfg or attn_config_for(q.device, q.dtype)
    with torch.no_grad():
        sel32 = block_indices.to(torch.int32).contiguous()
        mass = head_block_mass(q.contiguous(), k.contiguous(), lse.float().contiguous(), sel32, block_size,
                               float(scale), cfg)  # [B, G, S, HPG, K]
        return p_main_of(mass)


def p_main_of(head_mass: torch.Tensor) -> torch.Tensor:
    """Per-head block mass [B, G, S, HPG, K] (this module's kernel, or the attention forward's
    with mass=True) -> p_main [B, G, S, K]: averaged over the group's heads, each row divided by
    its sum (an all-zero row stays zero)."""
    mass = head_mass.mean(3)
    total = mass.sum(-1, keepdim=True)
    return mass / torch.where(total > 0, total, 1.0)


@triton.jit
def _msa_block_scores_kernel(
    IQ,  # [B, S, G, DI]
    IK,  # [B, SK, DI] with SK = q_off + S
    Sel, Union, Count,  # [B, G, S, TOPK] int32 and the plan of one row per token
    Score,  # [B, G, S, TOPK] fp32
    Arg,  # [B, G, S, TOPK] int64
    S, q_off, block_size, n_tiles, W,
    G: tl.constexpr, DI: tl.constexpr, TOPK: tl.constexpr, TOPK_P2: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, SUB_N: tl.constexpr, DOT_PREC: tl.constexpr,
):
    # a tile of tokens visits the union of their selected blocks; per step the causal row max
    # and its lowest key position, folded into the slot(s) holding the block's id. Steps go in
    # key order and only a strictly larger max replaces: ties keep the lowest position. The
    # causal mask costs CUDA-core work per element: only the steps whose keys may follow the
    # tile's first token or fall outside the block take it (rows that did not select the block
    # are discarded by the slot test either way).
    tile = tl.program_id(0)
    bg = tl.program_id(1)
    b = bg // G
    g = bg % G
    SK = q_off + S
    t_loc = tile * BLOCK_T + tl.arange(0, BLOCK_T)  # [BLOCK_T]
    t_ok = t_loc < S
    t = q_off + t_loc  # global position
    d = tl.arange(0, DI)
    iq_row = (b.to(tl.int64) * S + t_loc) * G + g
    q = tl.load(IQ + iq_row[:, None] * DI + d[None, :], mask=t_ok[:, None], other=0.0)  # [BLOCK_T, DI]
    kk = tl.arange(0, TOPK_P2)
    s_row = (bg.to(tl.int64) * S + t_loc) * TOPK
    sel = tl.load(Sel + s_row[:, None] + kk[None, :], mask=t_ok[:, None] & (kk[None, :] < TOPK), other=-1)

    best = tl.full([BLOCK_T, TOPK_P2], float("-inf"), tl.float32)
    arg = tl.full([BLOCK_T, TOPK_P2], -1, tl.int32)
    jj = tl.arange(0, SUB_N)
    u_base, cnt = plan_row(Count, bg, tile, n_tiles, W)
    NSUB: tl.constexpr = BLOCK_N // SUB_N
    for it in range(0, cnt * NSUB):
        kb = tl.load(Union + u_base + it // NSUB)
        j0 = (it % NSUB) * SUB_N
        j = kb * block_size + j0 + jj  # [SUB_N]
        kv_ok = (j0 + jj < block_size) & (j < SK)
        k = tl.load(IK + (b.to(tl.int64) * SK + j)[:, None] * DI + d[None, :],
                    mask=kv_ok[:, None], other=0.0)  # [SUB_N, DI]
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)  # [BLOCK_T, SUB_N] fp32
        # the mask only where a key may follow a token of the tile or lie outside the block
        if (kb * block_size + j0 + SUB_N - 1 > q_off + tile * BLOCK_T) | (j0 + SUB_N > block_size) \
                | (kb * block_size + j0 + SUB_N > SK):
            s = tl.where((j[None, :] <= t[:, None]) & kv_ok[None, :], s, float("-inf"))
        m = tl.max(s, axis=1)  # [BLOCK_T]
        pos = tl.min(tl.where(s == m[:, None], j[None, :], 1 << 30), axis=1)
        upd = (sel == kb) & (m[:, None] > best)
        best = tl.where(upd, m[:, None], best)
        arg = tl.where(upd, pos[:, None], arg)
    ok = t_ok[:, None] & (kk[None, :] < TOPK)
    tl.store(Score + s_row[:, None] + kk[None, :], best, mask=ok)
    tl.store(Arg + s_row[:, None] + kk[None, :], arg.to(tl.int64), mask=ok)


def block_scores_argmax(index_q, index_k, sel32, block_size: int, q_offset: int, tile: dict | None = None):
    """Launcher: index_q [B, S, G, Di], index_k [B, q_offset + S, Di], sel32 [B, G, S, K] int32
    -> scores fp32 and argmax key positions int64 (-1: none), both [B, G, S, K], and the plan
    it walked (the backward walks it again). `tile`: block_t, num_warps, num_stages, sub_n
    (None: `scores_tile`'s; bench/msa.py --variants sweeps it)."""
    B, S, G, _ = index_q.shape
    K = sel32.shape[-1]
    iq, ik = index_operands(index_q, index_k)
    tile = tile or scores_tile(iq)
    plan = build_plan(sel32, S, 1, tile["block_t"], block_size, q_offset)
    scores = torch.empty(B, G, S, K, dtype=torch.float32, device=iq.device)
    argmax = torch.empty(B, G, S, K, dtype=torch.int64, device=iq.device)
    BN = pow2(block_size)
    _msa_block_scores_kernel[(plan.n_tiles, B * G)](
        iq, ik, sel32, plan.union, plan.count, scores, argmax,
        S, q_offset, block_size, plan.n_tiles, plan.union.shape[-1],
        G=G, DI=iq.shape[-1], TOPK=K, TOPK_P2=pow2(K, 1), BLOCK_T=plan.block_m, BLOCK_N=BN,
        SUB_N=min(tile["sub_n"], BN), DOT_PREC=dot_precision(iq.dtype),
        num_warps=tile["num_warps"], num_stages=tile["num_stages"],
    )
    return scores, argmax, plan


@triton.jit
def _msa_block_scores_bwd_kernel(
    IQ,  # [B, S, G, DI]
    IK,  # [B, SK, DI]
    Sel, Arg, dScore,  # [B, G, S, TOPK]: int32 ids, int64 argmax key positions (-1: none), fp32
    Union, Count,  # the forward's plan (one row per token)
    dIQ,  # [B, S, G, DI] in IQ's dtype
    dIK32,  # [B, SK, DI] fp32, zeroed
    S, SK, block_size, n_tiles, W,
    G: tl.constexpr, DI: tl.constexpr, TOPK: tl.constexpr, TOPK_P2: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
):
    # d index_q: each token's slots gather their argmax keys (rows of its own: no atomics).
    # d index_k: the tile walks the union of its tokens' blocks; per block, the matrix W
    # [BLOCK_T, BLOCK_N] holds each token's score gradient at its argmax key's column, and
    # W^T index_q [BLOCK_N, DI] (one product) is every token's contribution summed per key: the
    # atomic adds are one row per key some token of the tile hit, not one per (token, slot).
    tile = tl.program_id(0)
    bg = tl.program_id(1)
    b = bg // G
    g = bg % G
    t_loc = tile * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t_loc < S
    d = tl.arange(0, DI)
    iq_row = (b.to(tl.int64) * S + t_loc) * G + g
    iq = tl.load(IQ + iq_row[:, None] * DI + d[None, :], mask=t_ok[:, None], other=0.0)  # [BLOCK_T, DI]
    kk = tl.arange(0, TOPK_P2)
    s_row = (bg.to(tl.int64) * S + t_loc) * TOPK
    ok = t_ok[:, None] & (kk[None, :] < TOPK)
    sel = tl.load(Sel + s_row[:, None] + kk[None, :], mask=ok, other=-1)
    pos = tl.load(Arg + s_row[:, None] + kk[None, :], mask=ok, other=-1).to(tl.int32)
    w = tl.load(dScore + s_row[:, None] + kk[None, :], mask=ok & (pos >= 0), other=0.0)  # [BLOCK_T, TOPK_P2]

    diq = tl.zeros([BLOCK_T, DI], tl.float32)
    for k in range(TOPK):
        pos_k = tl.load(Arg + s_row + k, mask=t_ok, other=-1)
        hit = t_ok & (pos_k >= 0)
        w_k = tl.load(dScore + s_row + k, mask=hit, other=0.0)
        key_row = b.to(tl.int64) * SK + tl.maximum(pos_k, 0)
        keys = tl.load(IK + key_row[:, None] * DI + d[None, :], mask=hit[:, None], other=0.0).to(tl.float32)
        diq += w_k[:, None] * keys
    tl.store(dIQ + iq_row[:, None] * DI + d[None, :], diq.to(dIQ.dtype.element_ty), mask=t_ok[:, None])

    jj = tl.arange(0, BLOCK_N)
    u_base, cnt = plan_row(Count, bg, tile, n_tiles, W)
    for u in range(0, cnt):
        kb = tl.load(Union + u_base + u)
        is_kb = sel == kb  # [BLOCK_T, TOPK_P2]; a duplicated id: both slots, the same argmax
        w_t = tl.sum(tl.where(is_kb, w, 0.0), axis=1)  # [BLOCK_T]
        col = tl.max(tl.where(is_kb, pos, -1), axis=1) - kb * block_size  # [BLOCK_T]; < 0: none
        on = jj[None, :] == col[:, None]  # [BLOCK_T, BLOCK_N]
        w_mat = tl.where(on, w_t[:, None], 0.0)
        # W in index_q's dtype: a 16-bit run rounds each term to ~3 significant digits, as the
        # 16-bit d index_k it ends in is (W in two bf16 parts, near fp32: 8.4 against 4.5 ms at
        # 128K, 48/8 heads, on the H200)
        dk = tl.dot(tl.trans(w_mat.to(iq.dtype)), iq, input_precision=DOT_PREC)  # [BLOCK_N, DI] fp32
        j = kb * block_size + jj
        # the hit keys by dk's rows (a row reduction) rather than `on`'s columns (a reduction
        # across the warps): a hit key whose row is all zeros adds nothing, a NaN row is kept
        keep = (tl.sum(tl.abs(dk), axis=1) != 0) & (jj < block_size) & (j < SK)
        tl.atomic_add(dIK32 + (b.to(tl.int64) * SK + j)[:, None] * DI + d[None, :], dk, mask=keep[:, None],
                      sem="relaxed")


def block_scores_backward(index_q, index_k, sel32, argmax, d_scores, plan, block_size: int, num_warps: int = 4):
    """Launcher: index_q [B, S, G, DI], index_k [B, SK, DI] (DI a power of two), sel32, argmax,
    d_scores [B, G, S, K] and the forward's plan -> d index_q (index_q's dtype), d index_k fp32.
    Tiles: 128 tokens (the plan's), 4 warps (on the H200 at 128K, 48/8 heads: 4.5 ms; 8 warps
    7.0, 64-token tiles 5.5, 256 5.3)."""
    B, S, G, DI = index_q.shape
    SK, K = index_k.shape[1], sel32.shape[-1]
    d_iq = torch.empty_like(index_q)
    d_ik = torch.zeros(B, SK, DI, dtype=torch.float32, device=index_q.device)
    if B * S:
        _msa_block_scores_bwd_kernel[(plan.n_tiles, B * G)](
            index_q, index_k, sel32, argmax, d_scores, plan.union, plan.count, d_iq, d_ik,
            S, SK, block_size, plan.n_tiles, plan.union.shape[-1],
            G=G, DI=DI, TOPK=K, TOPK_P2=pow2(K, 1), BLOCK_T=plan.block_m, BLOCK_N=pow2(block_size),
            DOT_PREC=dot_precision(index_q.dtype), num_warps=num_warps,
        )
    return d_iq, d_ik


class BlockScores(torch.autograd.Function):
    """Forward and backward by kernels; the backward (`block_scores_backward`) sends each score's
    gradient to its one argmax key, from the saved index q and k, argmax and the forward's plan."""

    @staticmethod
    def forward(ctx, index_q, index_k, block_indices, block_size, q_offset):
        sel32 = block_indices.to(torch.int32).contiguous()
        scores, argmax, plan = block_scores_argmax(index_q, index_k, sel32, block_size, q_offset)
        ctx.save_for_backward(index_q, index_k, sel32, argmax, plan.union, plan.count)
        ctx.meta = (block_size, plan.block_m, plan.n_tiles)
        return scores

    @staticmethod
    def backward(ctx, d_scores):
        index_q, index_k, sel32, argmax, union, count = ctx.saved_tensors
        block_size, block_m, n_tiles = ctx.meta
        Di = index_q.shape[-1]
        iq, ik = index_operands(index_q, index_k)  # the kernel's tiles: Di zero-padded to a power of two
        d_iq, d_ik = block_scores_backward(iq, ik, sel32, argmax, d_scores.float().contiguous(),
                                           Plan(block_m, n_tiles, union, count), block_size)
        return d_iq[..., :Di].to(index_q.dtype), d_ik[..., :Di].to(index_k.dtype), None, None, None


def block_scores(index_q: torch.Tensor, index_k: torch.Tensor, block_indices: torch.Tensor, block_size: int,
                 q_offset: int = 0) -> torch.Tensor:
    """Index block scores of the selected blocks (`reference.msa_block_scores`).

    Args:
        index_q: [B, S, G, Di]; index_k: [B, q_offset + S, Di]; block_indices: [B, G, S, K]
            global block ids, -1 = unused; query row i is token q_offset + i.

    Returns:
        fp32 [B, G, S, K]: max over the block's keys j <= t of index_q[t, g] . index_k[j]
        (fp32 accumulation), -inf at -1 slots and at blocks with no such key. Differentiable in
        index_q and index_k: the gradient goes to the lowest-position argmax key.
    """
    return BlockScores.apply(index_q, index_k, block_indices, block_size, q_offset)


@triton.jit
def _indexer_kl_kernel(
    P,  # [R, K] fp32 p_main
    Sc,  # [R, K] fp32 index scores
    V,  # [R, K] bool/uint8: the slot counts
    Part,  # [n_programs] fp32: the program's sum of row KLs
    dSc,  # [R, K] fp32: d loss / d scores (GRAD)
    R, K, inv_rows,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, GRAD: tl.constexpr,
):
    # BLOCK_R rows (b, g, t) per program, one row's K slots across a tile row. Per row:
    # log q = s - logsumexp(s over valid slots); KL = sum over valid slots with p > 0 of
    # p (log p - log q); its gradient in s: (q * P - p) over the valid slots, P = sum of those p.
    pid = tl.program_id(0)
    r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.arange(0, BLOCK_K)
    ok = (r < R)[:, None] & (c < K)[None, :]
    off = r.to(tl.int64)[:, None] * K + c[None, :]
    valid = (tl.load(V + off, mask=ok, other=0) != 0) & ok
    s = tl.where(valid, tl.load(Sc + off, mask=ok, other=0.0), float("-inf"))
    p = tl.load(P + off, mask=ok, other=0.0)
    any_v = tl.max(valid.to(tl.int32), axis=1) > 0  # a row without a valid slot adds 0
    m = tl.where(any_v, tl.max(s, axis=1), 0.0)
    e = tl.exp(s - m[:, None])  # 0 at invalid slots
    z = tl.where(any_v, tl.sum(e, axis=1), 1.0)
    take = valid & (p > 0)
    log_q = s - (m + tl.log(z))[:, None]
    terms = tl.where(take, p * (tl.log(tl.where(take, p, 1.0)) - log_q), 0.0)
    tl.store(Part + pid, tl.sum(tl.sum(terms, axis=1), axis=0))
    if GRAD:
        pw = tl.where(take, p, 0.0)
        g = tl.where(valid, e / z[:, None] * tl.sum(pw, axis=1)[:, None] - pw, 0.0)
        tl.store(dSc + off, g * inv_rows, mask=ok)


class IndexerKL(torch.autograd.Function):
    """`reference.indexer_kl_loss` in one pass: the forward writes the loss's gradient in the
    scores (the backward scales it by the incoming gradient), in place of the ~12 elementwise
    kernels and their saved tensors the reference's autograd runs."""

    @staticmethod
    def forward(ctx, p_main, scores, valid):
        K = scores.shape[-1]
        R = scores.numel() // K if K else 0
        block_k = pow2(K, 1)
        block_r = max(1, 2048 // block_k)
        n_prog = triton.cdiv(R, block_r)
        part = torch.zeros(max(n_prog, 1), dtype=torch.float32, device=scores.device)
        grad = ctx.needs_input_grad[1]
        d_scores = torch.empty(scores.shape, dtype=torch.float32, device=scores.device) if grad else part
        if n_prog:
            _indexer_kl_kernel[(n_prog,)](
                p_main.detach().float().contiguous(), scores.detach().float().contiguous(),
                valid.expand(scores.shape).contiguous(), part, d_scores, R, K, 1.0 / R,
                BLOCK_R=block_r, BLOCK_K=block_k, GRAD=grad, num_warps=4,
            )
        if grad:
            ctx.save_for_backward(d_scores)
        return part.sum() / max(R, 1)

    @staticmethod
    def backward(ctx, d_loss):
        (d_scores,) = ctx.saved_tensors
        return None, d_scores * d_loss, None


def indexer_kl_loss(p_main: torch.Tensor, index_scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """`model.msa.api.indexer_kl_loss` (arguments checked there; valid bool, broadcastable to
    the scores) by `IndexerKL`: fp32 scalar, differentiable in index_scores."""
    return IndexerKL.apply(p_main, index_scores, valid)
