"""Triton kernels of MSA's sparse attention over the selected blocks, forward and backward.

Layers: Triton kernels (`_*_kernel`) -> launchers (`attn_fwd`, `attn_bwd`: they allocate
outputs and set the grid; `attention_sm90` has launchers of the same signature for Hopper) ->
`MSAAttention` (torch.autograd.Function, running the launchers it is given) -> `sparse_attention`
-> `model.msa.api.msa_attention`, which `model.msa.dispatch` routes here. These kernels also run
on CPU tensors under TRITON_INTERPRET=1, which is how the CPU tests drive them.

Design (numbers and the measurements behind it: bench/NOTES_msa.md):
- Query-outer over the row tiles of `plan`: a tile of 128 flattened (token, head) rows of one
  group walks the union of its tokens' selected blocks; each row keeps only the keys of blocks
  its own token selected (j <= t), so results are exact per token.
- Backward: dq by the same query-outer loop, which also forms the block's dk/dv contributions
  and adds them into fp32 buffers with atomics (measured 2x faster on H100 than a KV-outer dk/dv
  kernel, one program per key block accumulating in registers: NOTES, round 1; since removed).
- The forward reads K/V through tensor descriptors (TMA on Hopper, `AttnConfig.fwd_tma`) over the
  [B * S, G * D] view, one whole block per step; pointer loads remain (CPU interpreter, fp32).
- Exact; only the forward skips the per-element mask for blocks that every row of the tile
  selected and that end before its first token.
- The indexer loss's target in the same pass (`attn_fwd(mass=True)`): each row keeps its
  slots' shares of the softmax denominator l, rescaled with l as the running max moves, so that
  share / l is the slot block's attention mass (what `indexer.head_block_mass` computes with a
  second read of q and k).
- On Hopper (sm90) in bf16/fp16 `model.msa.dispatch` runs the Gluon kernels of `attention_sm90`
  instead (same tiles, plan and results; warp-specialised, asynchronous wgmma); these Triton
  kernels are the path everywhere else and the CPU-tested reference of those.

Legend: B batch, S tokens, G KV heads (= GQA groups), Hq query heads, HPG = Hq // G query heads
per group, D head dim, K = TOPK selected blocks per token, bs block size, NB = cdiv(S, bs) key
blocks, R = B * S * Hq query rows.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl

from model.msa.ops.common import LOG2E, AttnConfig, dot_precision, pow2
from model.msa.ops.plan import Plan, build_plan, plan_row, plan_step, row_tile, step_needs_mask


@triton.jit
def _load_kv(K, V, kv_row, kv_ok, d, key0, g, TMA: tl.constexpr, D: tl.constexpr):
    """One [SUB_N, D] tile of K and of V: by tensor descriptors over [B * S, G * D] (TMA on
    Hopper; key0 = b * S + first key) or by pointers (kv_row [SUB_N] rows of the [B*S*G, D] view)."""
    if TMA:
        k = K.load([key0, g * D])
        v = V.load([key0, g * D])
    else:
        k = tl.load(K + kv_row[:, None] * D + d[None, :], mask=kv_ok[:, None], other=0.0)
        v = tl.load(V + kv_row[:, None] * D + d[None, :], mask=kv_ok[:, None], other=0.0)
    return k, v


@triton.jit
def _msa_attn_fwd_kernel(
    Q,  # [B, S, HQ, D]
    K, V,  # [B, S, G, D], or tensor descriptors over [B * S, G * D] when TMA
    Sel,  # [B, G, S, TOPK] int32
    Union, Count,  # [B, G, T, W], [B, G, T] int32
    Out,  # [B, S, HQ, D]
    Lse,  # [B, S, HQ] fp32
    Mass,  # [B, G, S, HPG, TOPK] fp32 when MASS
    S, block_size, n_tiles, W, qk_scale2,
    G: tl.constexpr, HPG: tl.constexpr, D: tl.constexpr, TOPK: tl.constexpr, TOPK_P2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SUB_N: tl.constexpr, DOT_PREC: tl.constexpr,
    SKIP_MASK: tl.constexpr, TMA: tl.constexpr, MASS: tl.constexpr,
):
    tile, bg, b, g, t_first, n, row_ok, t, d, q_row, q, kk, sel = row_tile(
        Q, Sel, S, G, HPG, D, TOPK, TOPK_P2, BLOCK_M)

    # m_i is kept in log2 units of the scaled scores; the scale enters exp2 as one FMA per
    # element (s * scale - m) instead of a separate multiply
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    # MASS: each slot's share of l_i (the same running-max frame, rescaled with it): at the end
    # slot / l_i is the attention mass of the slot's block, the indexer loss's target
    slots = tl.zeros([BLOCK_M, TOPK_P2], tl.float32)
    jj = tl.arange(0, SUB_N)
    u_base, cnt = plan_row(Count, bg, tile, n_tiles, W)
    # one step = SUB_N keys of a visited block (NSUB steps per block): smaller pipeline stages
    NSUB: tl.constexpr = BLOCK_N // SUB_N
    for it in range(0, cnt * NSUB):
        kb, j0, j, kv_ok = plan_step(Union, u_base, it, jj, block_size, S, NSUB, SUB_N)  # j, kv_ok [SUB_N]
        k, v = _load_kv(K, V, (b.to(tl.int64) * S + j) * G + g, kv_ok, d, b * S + kb * block_size + j0,
                        g, TMA, D)  # [SUB_N, D] each
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)  # [BLOCK_M, SUB_N] unscaled
        hit = tl.max(tl.where(sel == kb, 1, 0), axis=1) > 0  # the row's token selected kb
        need = step_needs_mask(hit, kb, j0, t_first, block_size, SKIP_MASK, SUB_N, BLOCK_N)
        if need:
            keep = hit[:, None] & (j[None, :] <= t[:, None]) & (j0 + jj < block_size)[None, :]
            s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1) * qk_scale2)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s * qk_scale2 - m_use[:, None])
        row_sum = tl.sum(p, axis=1)
        l_i = l_i * alpha + row_sum
        if MASS:
            slots = slots * alpha[:, None] + tl.where(sel == kb, row_sum[:, None], 0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new

    has = l_i > 0  # rows with no selected key (only from hand-made selections) give 0, lse -inf
    l_use = tl.where(has, l_i, 1.0)
    out = acc / l_use[:, None]
    lse = tl.where(has, (m_i + tl.log2(l_use)) * 0.6931471805599453, float("-inf"))
    tl.store(Out + q_row[:, None] * D + d[None, :], out.to(Out.dtype.element_ty), mask=row_ok[:, None])
    tl.store(Lse + q_row, lse, mask=row_ok)
    if MASS:
        o_row = (bg.to(tl.int64) * S * HPG + n) * TOPK
        tl.store(Mass + o_row[:, None] + kk[None, :], slots / l_use[:, None],
                 mask=row_ok[:, None] & (kk[None, :] < TOPK))


def _kv_operands(k, v, sub_n: int, tma: bool):
    """K/V as the kernels take them: the tensors, or (tma) tensor descriptors over the
    [B * S, G * D] view with [sub_n, D] boxes. Keys past S inside a batch read the next batch's
    rows (past B * S: zeros); the kernels mask those keys (j < S) before they count."""
    if not tma:
        return k, v
    from triton.tools.tensor_descriptor import TensorDescriptor

    B, S, G, D = k.shape
    return tuple(TensorDescriptor.from_tensor(x.view(B * S, G * D), [sub_n, D]) for x in (k, v))


def attn_fwd(q, k, v, sel32, plan: Plan, block_size: int, scale: float, cfg: AttnConfig, mass: bool = False):
    """Launcher: q [B, S, Hq, D], k/v [B, S, G, D] contiguous, sel32 [B, G, S, K] int32 and its
    plan -> out [B, S, Hq, D], lse [B, S, Hq] fp32; with `mass` also the attention mass of each
    selected block per head, [B, G, S, HPG, K] fp32 (indexer.head_block_mass's, in the same pass)."""
    B, S, Hq, D = q.shape
    G = k.shape[2]
    K = sel32.shape[-1]
    out = torch.empty_like(q)
    lse = torch.empty(B, S, Hq, dtype=torch.float32, device=q.device)
    head_mass = torch.empty(B, G, S, Hq // G, K, dtype=torch.float32, device=q.device) if mass else lse
    BN = pow2(block_size)
    sub_n = min(cfg.fwd_sub_n, BN)
    kd, vd = _kv_operands(k, v, sub_n, cfg.fwd_tma)
    grid = (plan.n_tiles, B * G)
    _msa_attn_fwd_kernel[grid](
        q, kd, vd, sel32, plan.union, plan.count, out, lse, head_mass,
        S, block_size, plan.n_tiles, plan.union.shape[-1], scale * LOG2E,
        G=G, HPG=Hq // G, D=D, TOPK=K, TOPK_P2=pow2(K, 1),
        BLOCK_M=plan.block_m, BLOCK_N=BN, SUB_N=sub_n, DOT_PREC=dot_precision(q.dtype),
        SKIP_MASK=cfg.skip_mask, TMA=cfg.fwd_tma, MASS=mass,
        num_warps=cfg.fwd_warps, num_stages=cfg.fwd_stages,
    )
    return (out, lse, head_mass) if mass else (out, lse)


@triton.jit
def _msa_bwd_delta_kernel(
    Out, dOut,  # [R, D] with R = B * S * HQ
    dLse,  # [R] fp32 (ignored unless HAS_DLSE)
    Delta,  # [R] fp32: rowsum(out * dout) - dlse
    R, D: tl.constexpr, BLOCK_R: tl.constexpr, HAS_DLSE: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = r < R
    d = tl.arange(0, D)
    o = tl.load(Out + r[:, None] * D + d[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
    do = tl.load(dOut + r[:, None] * D + d[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
    delta = tl.sum(o * do, axis=1)
    if HAS_DLSE:
        # d lse / d s = p, so a gradient on lse enters ds = p * (dp - delta) as -dlse in delta
        delta -= tl.load(dLse + r, mask=ok, other=0.0)
    tl.store(Delta + r, delta, mask=ok)


@triton.jit
def _msa_attn_bwd_dq_kernel(
    Q, K, V, dO,  # [B, S, HQ, D], [B, S, G, D] x2 (or descriptors, as in the fwd), [B, S, HQ, D]
    Sel, Union, Count,
    Lse, Delta,  # [B, S, HQ] fp32
    dQ,  # [B, S, HQ, D]
    dK32, dV32,  # [B, S, G, D] fp32 (ATOMIC_KV False leaves them: the benchmark's attribution)
    S, block_size, n_tiles, W, qk_scale2, sm_scale,
    G: tl.constexpr, HPG: tl.constexpr, D: tl.constexpr, TOPK: tl.constexpr, TOPK_P2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SUB_N: tl.constexpr, DOT_PREC: tl.constexpr,
    ATOMIC_KV: tl.constexpr, SKIP_MASK: tl.constexpr, TMA: tl.constexpr,
):
    tile, bg, b, g, t_first, n, row_ok, t, d, q_row, q, kk, sel = row_tile(
        Q, Sel, S, G, HPG, D, TOPK, TOPK_P2, BLOCK_M)
    do = tl.load(dO + q_row[:, None] * D + d[None, :], mask=row_ok[:, None], other=0.0)
    lse2 = tl.load(Lse + q_row, mask=row_ok, other=0.0) * 1.4426950408889634  # [BLOCK_M]
    delta = tl.load(Delta + q_row, mask=row_ok, other=0.0)

    dq = tl.zeros([BLOCK_M, D], tl.float32)
    jj = tl.arange(0, SUB_N)
    u_base, cnt = plan_row(Count, bg, tile, n_tiles, W)
    for u in range(cnt):
        kb = tl.load(Union + u_base + u)
        hit = tl.max(tl.where(sel == kb, 1, 0), axis=1) > 0
        some_miss = (tl.min(hit.to(tl.int32), axis=0) == 0) | (block_size != BLOCK_N)
        # a static loop over the block's SUB_N-key steps (one flat loop over (block, step)
        # measured 7% slower: NOTES)
        for j0 in tl.static_range(0, BLOCK_N, SUB_N):
            j = kb * block_size + j0 + jj  # [SUB_N]
            kv_row = (b.to(tl.int64) * S + j) * G + g
            kv_ok = (j0 + jj < block_size) & (j < S)
            k, v = _load_kv(K, V, kv_row, kv_ok, d, b * S + kb * block_size + j0, g, TMA, D)  # [SUB_N, D]
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)  # [BLOCK_M, SUB_N] unscaled
            p = tl.exp2(s * qk_scale2 - lse2[:, None])
            need = True
            if SKIP_MASK:
                need = some_miss | (kb * block_size + j0 + SUB_N - 1 > t_first)
            if need:
                keep = hit[:, None] & (j[None, :] <= t[:, None]) & kv_ok[None, :]
                p = tl.where(keep, p, 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)  # [BLOCK_M, SUB_N]
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
            if ATOMIC_KV:
                dv_c = tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PREC)  # [SUB_N, D]
                dk_c = tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PREC) * sm_scale
                tl.atomic_add(dV32 + kv_row[:, None] * D + d[None, :], dv_c, mask=kv_ok[:, None], sem="relaxed")
                tl.atomic_add(dK32 + kv_row[:, None] * D + d[None, :], dk_c, mask=kv_ok[:, None], sem="relaxed")
    dq = dq * sm_scale
    tl.store(dQ + q_row[:, None] * D + d[None, :], dq.to(dQ.dtype.element_ty), mask=row_ok[:, None])


def attn_bwd(dout, dlse, q, k, v, out, lse, sel32, plan: Plan, block_size: int, scale: float, cfg: AttnConfig):
    """Launcher: dout [B, S, Hq, D] and dlse [B, S, Hq] fp32 (or None) contiguous, the forward's
    inputs, outputs and plan -> dq [B, S, Hq, D], dk, dv [B, S, G, D]."""
    B, S, Hq, D = q.shape
    G = k.shape[2]
    K = sel32.shape[-1]
    hpg = Hq // G
    BN = pow2(block_size)
    dq = torch.empty_like(q)
    dk32 = torch.zeros(B, S, G, D, dtype=torch.float32, device=q.device)
    dv32 = torch.zeros_like(dk32)
    R = B * S * Hq
    delta = torch.empty(B, S, Hq, dtype=torch.float32, device=q.device)
    _msa_bwd_delta_kernel[(triton.cdiv(R, 64),)](
        out, dout, dlse if dlse is not None else delta, delta, R,
        D=D, BLOCK_R=64, HAS_DLSE=dlse is not None, num_warps=4,
    )
    sub_n = min(cfg.dq_sub_n, BN)
    kd, vd = _kv_operands(k, v, sub_n, cfg.dq_tma)
    _msa_attn_bwd_dq_kernel[(plan.n_tiles, B * G)](
        q, kd, vd, dout, sel32, plan.union, plan.count, lse, delta, dq, dk32, dv32,
        S, block_size, plan.n_tiles, plan.union.shape[-1], scale * LOG2E, scale,
        G=G, HPG=hpg, D=D, TOPK=K, TOPK_P2=pow2(K, 1), BLOCK_M=plan.block_m, DOT_PREC=dot_precision(q.dtype),
        BLOCK_N=BN, SUB_N=sub_n, ATOMIC_KV=True, SKIP_MASK=cfg.dq_skip_mask, TMA=cfg.dq_tma,
        num_warps=cfg.dq_warps, num_stages=cfg.dq_stages,
    )
    return dq, dk32.to(k.dtype), dv32.to(v.dtype)


Forward = Callable[..., tuple[torch.Tensor, ...]]
"""`attn_fwd`'s signature: (q, k, v, sel32, plan, block_size, scale, cfg) -> out, lse."""
Backward = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
"""`attn_bwd`'s signature: (dout, dlse, q, k, v, out, lse, sel32, plan, block_size, scale, cfg)
-> dq, dk, dv."""


class MSAAttention(torch.autograd.Function):
    """Builds the plan, runs the forward launcher `fwd` it is given and, in backward, the
    backward launcher `bwd` (this module's or `attention_sm90`'s: the caller chose them)."""

    @staticmethod
    def forward(ctx, q, k, v, block_indices, block_size, scale, cfg, fwd: Forward, bwd: Backward, mass=False):
        B, S, Hq, D = q.shape
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        sel32 = block_indices.to(torch.int32).contiguous()  # [B, G, S, K]
        plan = build_plan(sel32, S, Hq // k.shape[2], cfg.block_m, block_size)
        out, lse, *head_mass = fwd(q, k, v, sel32, plan, block_size, scale, cfg, **({"mass": True} if mass else {}))
        ctx.save_for_backward(q, k, v, out, lse, sel32, plan.union, plan.count)
        ctx.meta = (block_size, scale, cfg, plan.block_m, plan.n_tiles, bwd)
        ctx.set_materialize_grads(False)  # an unused lse passes dlse=None, not zeros
        ctx.mark_non_differentiable(*head_mass)
        return (out, lse, *head_mass)

    @staticmethod
    def backward(ctx, dout, dlse, *_):
        q, k, v, out, lse, sel32, union, count = ctx.saved_tensors
        block_size, scale, cfg, block_m, n_tiles, bwd = ctx.meta
        plan = Plan(block_m, n_tiles, union, count)
        if dout is None:
            dout = torch.zeros_like(out)
        dout = dout.contiguous()
        dlse = dlse.contiguous() if dlse is not None else None
        dq, dk, dv = bwd(dout, dlse, q, k, v, out, lse, sel32, plan, block_size, scale, cfg)
        return dq, dk, dv, None, None, None, None, None, None, None


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_indices: torch.Tensor,
                     block_size: int, scale: float, cfg: AttnConfig, fwd: Forward = attn_fwd,
                     bwd: Backward = attn_bwd, mass: bool = False) -> tuple[torch.Tensor, ...]:
    """Exact attention of each query over the keys of its token's selected blocks (j <= t).

    Args:
        q: [B, S, Hq, D]; k, v: [B, S, G, D]; head h reads group g = h // (Hq // G).
        block_indices: [B, G, S, K] integer block ids per (token, group), -1 = unused slot.
        block_size: keys per block; scale: the softmax scale.
        cfg: the Triton kernels' tiles (`common.attn_config_for`, or a benchmark's).
        fwd, bwd: the launchers (this module's, or `attention_sm90`'s where they take the inputs).
        mass: also return each selected block's attention mass per head, computed by the forward
            pass (`fwd` takes `mass=True`: this module's and `attention_sm90`'s do).

    Returns:
        out [B, S, Hq, D] in q's dtype and lse [B, S, Hq] fp32, differentiable in q, k, v
        (through both). A row with no selected key gives out 0, lse -inf. With `mass`, also
        [B, G, S, HPG, K] fp32 (no gradient): per head, the sum over the block's keys j <= t of
        exp(scale * q.k_j - lse), 0 at -1 slots.
    """
    D = q.shape[-1]
    if D not in (16, 32, 64, 128, 256):
        raise ValueError(f"head dim {D} not supported by the Triton kernels (16, 32, 64, 128, 256)")
    return MSAAttention.apply(q, k, v, block_indices, block_size, scale, cfg, fwd, bwd, mass)
