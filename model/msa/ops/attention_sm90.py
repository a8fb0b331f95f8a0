"""MSA's sparse attention on Hopper (sm90) in Gluon, forward and backward, with the same tiles,
plan and math as the Triton kernels of `attention`, scheduled by hand in the manner of
FlashAttention-3. The launchers `attn_fwd` and `attn_bwd` have the signatures of the Triton
ones; `model.msa.dispatch` passes them to `attention.MSAAttention` where `supported` /
`bwd_supported` say these kernels take the inputs.

Why a second kernel: Triton 3.6 waits on every wgmma right after issuing it and does not
warp-specialise on sm90, so the softmax of a step (exp2, row max/sum, mask: CUDA cores and the
MUFU) runs in series with the step's two products, and one 8-warp program per SM has nothing
else to run meanwhile. Gluon makes layouts, shared memory, TMA, mbarriers, asynchronous wgmma
and warp specialisation explicit. Measured at 128K on the H100 (bench/NOTES_msa.md, round 4):
Triton 21.0 ms, this schedule without warp specialisation 19.4 ms, with it 16.3 ms, and
persistent 15.4 ms (round 5: against 15.9 ms per tile on the same GPU).

Work item = one row tile: 128 flattened (token, head) rows of one group (row n = t * HPG + hh).
The kernel is persistent: one program per SM takes the items program_id, + num_programs, ...
(neighbouring tiles of one group run at the same time, so their shared K/V blocks meet in L2),
in three partitions:
- two consumer warpgroups (`_consumer`), 64 rows each, 240 registers per thread; each walks
  each tile's whole plan on its own: per visited block u it issues S_u = q k_u^T and O += P_{u-1} v_{u-1}
  asynchronously, waits only for S_u, runs block u's softmax while the second product is still
  on the tensor cores, then waits for it and rescales O. The two warpgroups never synchronise
  with each other, so one's softmax also overlaps the other's products.
- one loader warp (`_loader`, 24 registers): TMA loads of K_u and V_u into two stages, each
  stage refilled once both consumers released it (ready / empty mbarriers per stage, for K and
  V separately, so S_u can start before V_u has landed). It runs on into the next tile, so
  that tile's first blocks are loaded while the consumers finish the current one.
Each consumer's q rows sit in shared memory for the whole walk of a tile, in two buffers: the
next tile's rows are copied in (cp.async) while the current tile is walked.
P goes from the accumulator registers straight into the second product's A operand; it is
converted from the fp32 softmax only after the previous product that reads the old P finished
(a wgmma reads register operands asynchronously: the wait names P as a dependency).

Same results as the Triton forward up to the order of fp32 additions: the mask (the row's token
selected the block, j <= t, key inside the block) and the mask skip (every row of the
warpgroup selected the block and it ends before the warpgroup's first token) are the same, and
a tile with an empty plan walks block 0 fully masked (rows with no selected key: out 0, lse
-inf).

With `mass` (the indexer loss's target, `attention.attn_fwd(mass=True)`'s) each consumer keeps
per row its slots' shares of l in a [64 x SEL_W] fp32 tile beside the selections, rescaled with l,
and writes share / l per head. Measured at 128K, 48/8 heads on the H200: forward 15.7-16.1 ms
without, 18.2-18.7 with (the separate block-mass pass it replaces: 16.5 ms).

Backward: dq over the plan, as the Triton `_msa_attn_bwd_dq_kernel`, with each step's dk/dv
contributions added into fp32 buffers by TMA reduce-adds (~124 GB of fp32 adds per backward at
128K). Measured at 128K (bench/NOTES_msa.md, rounds 4-5): 45-47 ms (~430 raw TFLOP/s, ~40 ms
without the reduce-adds); with per-thread atomics (4 consecutive fp32 each) 55.6-58.6,
Triton's 65-66. delta = rowsum(out * dout) - dlse is formed in the prologue. Its dk/dv products
have the keys of one step as the wgmma M (at least 64), so it takes blocks of more than 32 keys
(`bwd_supported`); the Triton backward runs for smaller ones.

Runs only on CUDA devices of compute capability 9.x with bf16/fp16 inputs, d 64 or 128, blocks
of at most 128 keys (`supported`); there is no interpreter for Gluon, so its tests run on the
GPU (tests/test_msa_gluon.py) against the fp64 dense masked reference and the Triton kernels.

Legend: B batch, S tokens, G KV heads (= GQA groups), Hq query heads, HPG = Hq // G query heads
per group, D head dim, K = TOPK selected blocks per token, bs block size, T = n_tiles row tiles
per group, W plan width, NS pipeline stages.
"""

from __future__ import annotations

import functools

import torch
import triton
from triton._C.libtriton import gluon_ir, ir
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language._core import builtin
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from model.msa.ops.common import LOG2E
from model.msa.ops.common_sm90 import GL_DTYPE, load_block, takes, wg_mma
from model.msa.ops.plan import Plan

if not hasattr(gluon_ir.GluonOpBuilder, "create_async_tma_reduce"):  # `_tma_reduce_add`'s op
    raise ImportError("this Triton's Gluon builder has no create_async_tma_reduce")


def supported(q: torch.Tensor, block_size: int) -> bool:
    """Whether the sm90 forward takes these inputs (q [B, S, Hq, D]), else the Triton one runs."""
    return takes(q.dtype, q.shape[-1], block_size)


def bwd_supported(q: torch.Tensor, block_size: int) -> bool:
    """Whether the sm90 backward takes these inputs: as the forward, and blocks of more than 32
    keys (its dk/dv products have the keys of one step as the wgmma M, at least 64)."""
    return supported(q, block_size) and triton.next_power_of_2(block_size) >= 64


@gluon.jit
def _wg_rows(bg, n0, ROWS: gl.constexpr, G: gl.constexpr, HPG: gl.constexpr, row_l: gl.constexpr):
    """A consumer warpgroup's rows n0 .. n0 + ROWS - 1 of group bg: (b, g, the token of its first
    row, the rows n and their tokens t [ROWS] in row_l)."""
    n = n0 + gl.arange(0, ROWS, layout=row_l)
    return bg // G, bg % G, n0 // HPG, n, n // HPG


@gluon.jit
def _wg_selections(Sel, bg, S, n0, ROWS: gl.constexpr, HPG: gl.constexpr, TOPK: gl.constexpr,
                   SEL_W: gl.constexpr):
    """The selections [ROWS, SEL_W] (-1 padded) of rows n0 .. n0 + ROWS - 1 in `wg_mma(SEL_W)`:
    a row max of the hit test lands in the threads that hold the row's scores."""
    sel_l: gl.constexpr = wg_mma(SEL_W)
    ns = n0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, sel_l))
    kk = gl.arange(0, SEL_W, layout=gl.SliceLayout(0, sel_l))
    return gl.load(Sel + ((bg.to(gl.int64) * S + ns // HPG) * TOPK)[:, None] + kk[None, :],
                   mask=(ns < S * HPG)[:, None] & (kk < TOPK)[None, :], other=-1)


@builtin
def _tma_reduce_add(desc, coord, src, _semantic=None):
    """TMA bulk reduce-add (PTX cp.reduce.async.bulk.tensor .add) of the shared memory src into
    desc's tensor at coord, in the manner of Gluon's own TMA copies: Triton 3.6's Gluon builder
    has the op (`create_async_tma_reduce`, checked at import) but no Python wrapper for it."""
    coord = _semantic._convert_to_ir_values(coord, require_i64=False)
    _semantic.builder.create_async_tma_reduce(ir.DESCRIPTOR_REDUCE_KIND.ADD, desc.handle, coord, src.handle)


@gluon.jit
def _softmax_step(s, kb, sel, t, t_first, m_i, l_i, block_size, S, qk_scale2,
                  BLOCK_N: gl.constexpr, row_l: gl.constexpr, col_l: gl.constexpr):
    """Mask (only where needed), running max, p = exp2(s * scale - m) (fp32), the rescale
    factor of the accumulator, the new row sums and this block's share of them."""
    hit = gl.convert_layout(gl.max(gl.where(sel == kb, 1, 0), axis=1), row_l) > 0  # [BLOCK_M]
    need = (gl.min(hit.to(gl.int32), axis=0) == 0) | (kb * block_size + BLOCK_N - 1 > t_first) \
        | (block_size != BLOCK_N)
    if need:
        jj = gl.arange(0, BLOCK_N, layout=col_l)
        j = kb * block_size + jj
        keep = hit[:, None] & (j[None, :] <= t[:, None]) & ((jj < block_size) & (j < S))[None, :]
        s = gl.where(keep, s, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, axis=1) * qk_scale2)
    m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = gl.exp2(m_i - m_use)
    p = gl.exp2(s * qk_scale2 - m_use[:, None])
    row_sum = gl.sum(p, axis=1)
    return p, m_new, l_i * alpha + row_sum, alpha, row_sum


@gluon.jit
def _mass_step(slots, sel, kb, alpha, row_sum, MASS: gl.constexpr, SEL_W: gl.constexpr):
    """MASS: each slot's share of the row sum l, in l's running-max frame (rescaled by the same
    alpha), plus this block's row sum in the slot(s) holding kb; at the end slot / l is the
    slot block's attention mass (the Triton forward's `MASS`, `indexer.head_block_mass`)."""
    if MASS:
        row_l: gl.constexpr = gl.SliceLayout(1, wg_mma(SEL_W))  # slots' and sel's layout: wg_mma(SEL_W)
        # the slot test in fp32 (block ids are exact there): as `sel == kb` in int32 ptxas
        # merges it with the softmax step's hit test and keeps its predicates live, packed into
        # register bits, across the masked softmax (1187 against 935 SASS instructions per
        # step on sm90; bench/sass_sm90.py)
        is_kb = sel.to(gl.float32) == kb.to(gl.float32)
        slots = slots * gl.convert_layout(alpha, row_l)[:, None] \
            + gl.where(is_kb, gl.convert_layout(row_sum, row_l)[:, None], 0.0)
    return slots


@gluon.jit
def _tile_of(w, n_tiles, W):
    """Work item w (b * G + g major, row tile minor: concurrent programs take neighbouring tiles
    of one group, whose K/V blocks overlap in L2) -> (bg, tile, the plan row's offset)."""
    bg = w // n_tiles
    return bg, w % n_tiles, w.to(gl.int64) * W


@gluon.jit
def _loader(k_desc, v_desc, k_smem, v_smem, bars, Union, Count, n_items, n_tiles, W, S, block_size,
            G: gl.constexpr, D: gl.constexpr, NS: gl.constexpr):
    """Producer warp: K_u and V_u of every block every tile of this program visits, into stage
    i % NS (i counts the blocks over the program's tiles), each once both consumer warpgroups
    released that stage's previous block (empty barriers count 2). It runs ahead across tile
    boundaries: the next tile's first blocks load while the consumers finish the current one."""
    k_ready, k_empty, v_ready, v_empty = bars
    i = 0
    for w in range(gl.program_id(0), n_items, gl.num_programs(0)):
        bg, _, u_base = _tile_of(w, n_tiles, W)
        cnt = gl.maximum(gl.load(Count + w), 1)  # empty plan: block 0, all masked
        for u in range(cnt):
            st = i % NS
            ph = (i // NS) & 1
            row = (bg // G) * S + gl.load(Union + u_base + u) * block_size
            mbarrier.wait(k_empty.index(st), ph ^ 1)  # a fresh barrier counts as released: no wait
            load_block(k_desc, k_smem.index(st), k_ready.index(st), row, (bg % G) * D)
            mbarrier.wait(v_empty.index(st), ph ^ 1)
            load_block(v_desc, v_smem.index(st), v_ready.index(st), row, (bg % G) * D)
            i += 1


@gluon.jit
def _q_copy(Q, dst, w, n_tiles, S, G: gl.constexpr, HPG: gl.constexpr, D: gl.constexpr, ROWS: gl.constexpr,
            BLOCK_M: gl.constexpr, WG: gl.constexpr):
    """cp.async of warpgroup WG's q rows of work item w ([ROWS, D]) into dst (q rows are not a
    box TMA can load: a tile starts and ends inside a token's heads)."""
    ld: gl.constexpr = gl.BlockedLayout([1, 8], [32 * 8 // D, D // 8], [4, 1], [1, 0])
    bg = w // n_tiles
    n = (w % n_tiles) * BLOCK_M + WG * ROWS + gl.arange(0, ROWS, layout=gl.SliceLayout(1, ld))
    dd = gl.arange(0, D, layout=gl.SliceLayout(0, ld))
    q_row = ((bg // G).to(gl.int64) * S + n // HPG) * (G * HPG) + (bg % G) * HPG + n % HPG
    async_copy.async_copy_global_to_shared(dst, Q + q_row[:, None] * D + dd[None, :],
                                           mask=(n < S * HPG)[:, None])
    async_copy.commit_group()


@gluon.jit
def _consumer(Q, q_smem, k_smem, v_smem, bars, Sel, Union, Count, Out, Lse, Mass, n_items, n_tiles, W, S,
              block_size, qk_scale2, WG: gl.constexpr, G: gl.constexpr, HPG: gl.constexpr, D: gl.constexpr,
              TOPK: gl.constexpr, SEL_W: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
              NS: gl.constexpr, MASS: gl.constexpr):
    """One warpgroup: rows [WG * BLOCK_M / 2, + BLOCK_M / 2) of each of the program's tiles, the
    whole plan walk of each. Its q rows sit in its own two buffers (q_smem index 2 * j + WG for
    the tile parity j): the next tile's are copied in while this tile's blocks are walked."""
    HALF: gl.constexpr = BLOCK_M // 2
    dtype: gl.constexpr = q_smem.dtype
    k_ready, k_empty, v_ready, v_empty = bars
    s_l: gl.constexpr = wg_mma(BLOCK_N)
    o_l: gl.constexpr = wg_mma(D)
    row_l: gl.constexpr = gl.SliceLayout(1, s_l)
    col_l: gl.constexpr = gl.SliceLayout(0, s_l)
    p_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_l, k_width=2)
    s_zero = gl.zeros([HALF, BLOCK_N], gl.float32, s_l)
    i = 0  # blocks consumed over the program's tiles: stage i % NS, phase (i // NS) & 1
    j = 0  # tiles: q buffer j % 2
    nprog = gl.num_programs(0)
    _q_copy(Q, q_smem.index(WG), gl.program_id(0), n_tiles, S, G, HPG, D, HALF, BLOCK_M, WG)
    for w in range(gl.program_id(0), n_items, nprog):
        bg, tile, u_base = _tile_of(w, n_tiles, W)
        cnt = gl.maximum(gl.load(Count + w), 1)
        n0 = tile * BLOCK_M + WG * HALF
        b, g, t_first, n, t = _wg_rows(bg, n0, HALF, G, HPG, row_l)
        sel = _wg_selections(Sel, bg, S, n0, HALF, HPG, TOPK, SEL_W)
        m_i = gl.full([HALF], float("-inf"), gl.float32, row_l)
        l_i = gl.zeros([HALF], gl.float32, row_l)
        o = gl.zeros([HALF, D], gl.float32, o_l)
        slots = gl.zeros([HALF, SEL_W], gl.float32, wg_mma(SEL_W))  # MASS only
        q = q_smem.index((j % 2) * 2 + WG)
        async_copy.wait_group(0)  # this tile's q rows (copied during the previous tile)
        fence_async_shared()
        gl.thread_barrier()

        st = i % NS
        mbarrier.wait(k_ready.index(st), (i // NS) & 1)
        s = warpgroup_mma(q, k_smem.index(st).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        # the next tile's q rows into the other buffer (its last reader, the previous tile, is done);
        # none after the last tile, so that no copy is in flight when the program ends
        if w + nprog < n_items:
            _q_copy(Q, q_smem.index((1 - j % 2) * 2 + WG), w + nprog, n_tiles, S, G, HPG, D, HALF, BLOCK_M, WG)
        s = warpgroup_mma_wait(0, deps=(s,))
        mbarrier.arrive(k_empty.index(st), count=1)
        kb = gl.load(Union + u_base)
        s, m_i, l_i, alpha, row_sum = _softmax_step(s, kb, sel, t, t_first, m_i, l_i, block_size, S, qk_scale2,
                                                    BLOCK_N, row_l, col_l)
        slots = _mass_step(slots, sel, kb, alpha, row_sum, MASS, SEL_W)
        p = gl.convert_layout(s.to(dtype), p_l)
        for u in range(1, cnt):
            st = (i + u) % NS
            prev = (i + u - 1) % NS
            mbarrier.wait(k_ready.index(st), ((i + u) // NS) & 1)
            s_tok = warpgroup_mma(q, k_smem.index(st).permute((1, 0)), s_zero, use_acc=False, is_async=True)
            mbarrier.wait(v_ready.index(prev), ((i + u - 1) // NS) & 1)
            o_tok = warpgroup_mma(p, v_smem.index(prev), o, is_async=True)
            s = warpgroup_mma_wait(1, deps=(s_tok,))  # S_u done; O += P V still running, reading p
            mbarrier.arrive(k_empty.index(st), count=1)
            kb = gl.load(Union + u_base + u)
            s, m_i, l_i, alpha, row_sum = _softmax_step(s, kb, sel, t, t_first, m_i, l_i, block_size, S,
                                                        qk_scale2, BLOCK_N, row_l, col_l)
            slots = _mass_step(slots, sel, kb, alpha, row_sum, MASS, SEL_W)
            o, p = warpgroup_mma_wait(0, deps=(o_tok, p))
            mbarrier.arrive(v_empty.index(prev), count=1)
            o = o * gl.convert_layout(alpha, gl.SliceLayout(1, o_l))[:, None]
            p = gl.convert_layout(s.to(dtype), p_l)  # only now: the registers of the old p were in use
        last = (i + cnt - 1) % NS
        mbarrier.wait(v_ready.index(last), ((i + cnt - 1) // NS) & 1)
        o = warpgroup_mma(p, v_smem.index(last), o, is_async=True)
        o, p = warpgroup_mma_wait(0, deps=(o, p))
        mbarrier.arrive(v_empty.index(last), count=1)
        i += cnt
        j += 1

        has = l_i > 0  # rows with no selected key give 0, lse -inf
        l_use = gl.where(has, l_i, 1.0)
        lse = gl.where(has, (m_i + gl.log2(l_use)) * 0.6931471805599453, float("-inf"))
        out = o / gl.convert_layout(l_use, gl.SliceLayout(1, o_l))[:, None]
        no = n0 + gl.arange(0, HALF, layout=gl.SliceLayout(1, o_l))
        do = gl.arange(0, D, layout=gl.SliceLayout(0, o_l))
        o_row = (b.to(gl.int64) * S + no // HPG) * (G * HPG) + g * HPG + no % HPG
        gl.store(Out + o_row[:, None] * D + do[None, :], out.to(dtype), mask=(no < S * HPG)[:, None])
        l_row = (b.to(gl.int64) * S + t) * (G * HPG) + g * HPG + n % HPG
        gl.store(Lse + l_row, lse, mask=n < S * HPG)
        if MASS:  # [B, G, S, HPG, TOPK]: row n of group bg is flat row bg * S * HPG + n
            mass_l: gl.constexpr = wg_mma(SEL_W)
            ns = n0 + gl.arange(0, HALF, layout=gl.SliceLayout(1, mass_l))
            kk = gl.arange(0, SEL_W, layout=gl.SliceLayout(0, mass_l))
            m_row = (bg.to(gl.int64) * S * HPG + ns) * TOPK
            share = slots / gl.convert_layout(l_use, gl.SliceLayout(1, mass_l))[:, None]
            gl.store(Mass + m_row[:, None] + kk[None, :], share, mask=(ns < S * HPG)[:, None] & (kk < TOPK)[None, :])


@gluon.jit
def _msa_attn_fwd_sm90_kernel(
    Q,  # [B, S, HQ, D]
    k_desc, v_desc,  # tensor descriptors over K, V viewed as [B * S, G * D], boxes [BLOCK_N, D]
    Sel,  # [B, G, S, TOPK] int32
    Union, Count,  # the plan: [B, G, T, W], [B, G, T] int32
    Out,  # [B, S, HQ, D]
    Lse,  # [B, S, HQ] fp32
    Mass,  # [B, G, S, HPG, TOPK] fp32 when MASS
    S, block_size, n_tiles, n_items, W, qk_scale2,  # n_items = B * G * n_tiles
    G: gl.constexpr, HPG: gl.constexpr, D: gl.constexpr, TOPK: gl.constexpr, SEL_W: gl.constexpr,
    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, NS: gl.constexpr, MASS: gl.constexpr,
):
    # persistent: one program per SM walks the tiles w = program_id, + num_programs, ... of the
    # B * G * n_tiles work items
    HALF: gl.constexpr = BLOCK_M // 2
    dtype: gl.constexpr = k_desc.dtype
    q_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([HALF, D], dtype)
    q_smem = gl.allocate_shared_memory(dtype, [4, HALF, D], q_sl)  # two tiles' (buffer, half)
    k_smem = gl.allocate_shared_memory(dtype, [NS, BLOCK_N, D], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [NS, BLOCK_N, D], v_desc.layout)
    k_ready = gl.allocate_shared_memory(gl.int64, [NS, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [NS, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [NS, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [NS, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(NS):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=2)  # one arrive per consumer warpgroup
        mbarrier.init(v_empty.index(i), count=2)
    fence_async_shared()  # the barrier inits before the async proxy uses them
    gl.thread_barrier()
    bars = (k_ready, k_empty, v_ready, v_empty)
    WG0: gl.constexpr = 0
    WG1: gl.constexpr = 1
    gl.warp_specialize([
        (_consumer, (Q, q_smem, k_smem, v_smem, bars, Sel, Union, Count, Out, Lse, Mass, n_items, n_tiles, W, S,
                     block_size, qk_scale2, WG0, G, HPG, D, TOPK, SEL_W, BLOCK_M, BLOCK_N, NS, MASS)),
        (_consumer, (Q, q_smem, k_smem, v_smem, bars, Sel, Union, Count, Out, Lse, Mass, n_items, n_tiles, W, S,
                     block_size, qk_scale2, WG1, G, HPG, D, TOPK, SEL_W, BLOCK_M, BLOCK_N, NS, MASS)),
        (_loader, (k_desc, v_desc, k_smem, v_smem, bars, Union, Count, n_items, n_tiles, W, S, block_size, G, D,
                   NS)),
    ], [4, 1], [240, 24])


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def kv_descriptor(x: torch.Tensor, block_n: int) -> TensorDescriptor:
    """A tensor descriptor over x [B, S, G, D] viewed as [B * S, G * D], boxes [block_n, D]."""
    B, S, G, D = x.shape
    layout = gl.NVMMASharedLayout.get_default_for([block_n, D], GL_DTYPE[x.dtype])
    return TensorDescriptor.from_tensor(x.view(B * S, G * D), [block_n, D], layout)


def _reduce_descriptor(x32: torch.Tensor, step: int) -> TensorDescriptor:
    """A TMA reduce target over x32 [B, S, G, D] fp32 viewed as [G * D / 32, B * S, 32], boxes
    [D / 32, step, 32]: 128-byte rows (the widest a 128-byte swizzle takes), the 32-column chunk
    outermost so that the consumers' stores into the stage are free of bank conflicts."""
    B, S, G, D = x32.shape
    layout = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=32, rank=3)
    return TensorDescriptor(x32, [G * D // 32, B * S, 32], [32, G * D, 1], [D // 32, step, 32], layout)


def attn_fwd(q, k, v, sel32, plan: Plan, block_size: int, scale: float, cfg=None, mass: bool = False):
    """Launcher, as `attention.attn_fwd`: q [B, S, Hq, D], k/v [B, S, G, D] contiguous, sel32
    [B, G, S, K] int32 and its plan (of 128-row tiles; the Triton tiles `cfg` do not apply) ->
    out [B, S, Hq, D], lse [B, S, Hq] fp32; with `mass` also each selected block's attention
    mass per head, [B, G, S, HPG, K] fp32, from the same pass."""
    B, S, Hq, D = q.shape
    G = k.shape[2]
    K = sel32.shape[-1]
    assert plan.block_m == 128, "the sm90 forward's tile is 128 rows (two warpgroups of 64)"
    block_n = triton.next_power_of_2(block_size)
    out = torch.empty_like(q)
    lse = torch.empty(B, S, Hq, dtype=torch.float32, device=q.device)
    head_mass = torch.empty(B, G, S, Hq // G, K, dtype=torch.float32, device=q.device) if mass else lse
    n_items = B * G * plan.n_tiles
    args = (q, kv_descriptor(k, block_n), kv_descriptor(v, block_n), sel32, plan.union, plan.count, out, lse,
            head_mass, S, block_size, plan.n_tiles, n_items, plan.union.shape[-1], scale * LOG2E)
    shape = dict(G=G, HPG=Hq // G, D=D, TOPK=K, SEL_W=max(16, triton.next_power_of_2(K)),
                 BLOCK_M=plan.block_m, BLOCK_N=block_n)
    # 12 warps (two consumer warpgroups, the loader's warp rounded up to a third) x 168
    # registers fill the register file; the loader gives its share to the consumers (240 each).
    # One program per SM (its shared memory, 193 KiB, fits one), persistent over the tiles: the
    # items are dealt round-robin, so SMs held by a concurrent kernel (communication overlapped
    # with the attention) delay their programs' whole share rather than being balanced around.
    grid = (min(n_items, _sm_count(q.device)),)
    _msa_attn_fwd_sm90_kernel[grid](*args, **shape, NS=2, MASS=mass, num_warps=4, maxnreg=168)
    return (out, lse, head_mass) if mass else (out, lse)


@gluon.jit
def _bwd_loader(k_desc, v_desc, k_smem, v_smem, kv_ready, kv_empty, Union, u_base, n_steps, kv_row0, col,
                block_size, STEP: gl.constexpr, NSUB: gl.constexpr, NS: gl.constexpr):
    """Producer warp: K and V of step i (keys [i % NSUB * STEP, + STEP) of visited block
    i // NSUB) into stage i % NS once both consumers released it."""
    for i in range(n_steps):
        st = i % NS
        row = kv_row0 + gl.load(Union + u_base + i // NSUB) * block_size + (i % NSUB) * STEP
        mbarrier.wait(kv_empty.index(st), ((i // NS) & 1) ^ 1)
        mbarrier.expect(kv_ready.index(st), k_desc.block_type.nbytes + v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [row, col], kv_ready.index(st), k_smem.index(st))
        tma.async_copy_global_to_shared(v_desc, [row, col], kv_ready.index(st), v_smem.index(st))


@gluon.jit
def _bwd_consumer(q_all, do_all, k_smem, v_smem, p_smem, ds_smem, bars, Sel, Union, Lse, delta_smem, dQ, red_desc,
                  red_smem, u_base, n_steps, n0, bg, S, block_size, qk_scale2, sm_scale, WG: gl.constexpr,
                  G: gl.constexpr, HPG: gl.constexpr, D: gl.constexpr, TOPK: gl.constexpr, SEL_W: gl.constexpr,
                  BLOCK_N: gl.constexpr, STEP: gl.constexpr, NSUB: gl.constexpr, NS: gl.constexpr):
    """One warpgroup: rows [n0, n0 + 64) of the tile. Per step it forms its rows' p and ds,
    dq += ds k, and puts p, ds into shared memory; once both warpgroups have, warpgroup 0 forms
    the step's dv contribution p^T dO over all 128 rows and warpgroup 1 the dk contribution
    ds^T q, and adds it into its fp32 buffer by a TMA reduce-add from red_smem (red_desc: dV32
    for warpgroup 0, dK32 for 1)."""
    ROWS: gl.constexpr = 64
    dtype: gl.constexpr = q_all.dtype
    kv_ready, kv_empty, pds_ready, pds_free = bars
    s_l: gl.constexpr = wg_mma(STEP)
    o_l: gl.constexpr = wg_mma(D)
    row_l: gl.constexpr = gl.SliceLayout(1, s_l)
    col_l: gl.constexpr = gl.SliceLayout(0, s_l)
    ds_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_l, k_width=2)
    b, g, t_first, n, t = _wg_rows(bg, n0, ROWS, G, HPG, row_l)
    row_ok = n < S * HPG
    q_row = (b.to(gl.int64) * S + t) * (G * HPG) + g * HPG + n % HPG
    lse2 = gl.load(Lse + q_row, mask=row_ok, other=0.0) * 1.4426950408889634
    delta = delta_smem.slice(WG * ROWS, ROWS).load(row_l)
    sel = _wg_selections(Sel, bg, S, n0, ROWS, HPG, TOPK, SEL_W)
    q = q_all.slice(WG * ROWS, ROWS)
    do = do_all.slice(WG * ROWS, ROWS)
    s_zero = gl.zeros([ROWS, STEP], gl.float32, s_l)
    c_zero = gl.zeros([STEP, D], gl.float32, o_l)
    dq = gl.zeros([ROWS, D], gl.float32, o_l)
    jj = gl.arange(0, STEP, layout=col_l)
    for i in range(n_steps):
        st = i % NS
        kb = gl.load(Union + u_base + i // NSUB)
        j0 = (i % NSUB) * STEP
        mbarrier.wait(kv_ready.index(st), (i // NS) & 1)
        s_tok = warpgroup_mma(q, k_smem.index(st).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        dp_tok = warpgroup_mma(do, v_smem.index(st).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        s, dp = warpgroup_mma_wait(0, deps=(s_tok, dp_tok))
        p = gl.exp2(s * qk_scale2 - lse2[:, None])
        hit = gl.convert_layout(gl.max(gl.where(sel == kb, 1, 0), axis=1), row_l) > 0
        j = kb * block_size + j0 + jj
        need = (gl.min(hit.to(gl.int32), axis=0) == 0) | (kb * block_size + j0 + STEP - 1 > t_first) \
            | (block_size != BLOCK_N)
        if need:
            keep = hit[:, None] & (j[None, :] <= t[:, None]) & ((j0 + jj < block_size) & (j < S))[None, :]
            p = gl.where(keep, p, 0.0)
        ds16 = (p * (dp - delta[:, None])).to(dtype)
        # one p / ds buffer (shared memory is full): free again once both warpgroups' products
        # of the previous step that read it are done
        mbarrier.wait(pds_free, (i & 1) ^ 1)
        p_smem.slice(WG * ROWS, ROWS).store(p.to(dtype))
        ds_smem.slice(WG * ROWS, ROWS).store(ds16)
        fence_async_shared()
        mbarrier.arrive(pds_ready, count=1)
        ds_op = gl.convert_layout(ds16, ds_l)
        dq_tok = warpgroup_mma(ds_op, k_smem.index(st), dq, is_async=True)
        mbarrier.wait(pds_ready, i & 1)
        if WG == 0:
            c_tok = warpgroup_mma(p_smem.permute((1, 0)), do_all, c_zero, use_acc=False, is_async=True)
        else:
            c_tok = warpgroup_mma(ds_smem.permute((1, 0)), q_all, c_zero, use_acc=False, is_async=True)
        dq, c, ds_op = warpgroup_mma_wait(0, deps=(dq_tok, c_tok, ds_op))
        mbarrier.arrive(pds_free, count=1)
        mbarrier.arrive(kv_empty.index(st), count=1)
        if WG == 1:
            c = c * sm_scale
        # the contribution of keys [kb * block_size + j0, + STEP) goes out by one TMA reduce-add;
        # its rows past the block or past S are exact zeros (p and so ds are 0 there): they land
        # on the next block's or the next sequence's first keys and add nothing (past B * S the
        # box is clipped)
        tma.store_wait(0)  # the previous step's reduce has read the stage
        gl.thread_barrier()
        red_smem.store(gl.permute(gl.reshape(c, [STEP, D // 32, 32]), [1, 0, 2]))
        fence_async_shared()
        gl.thread_barrier()
        _tma_reduce_add(red_desc, [g * (D // 32), b * S + kb * block_size + j0, 0], red_smem)
    tma.store_wait(0)
    no = n0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, o_l))
    do_c = gl.arange(0, D, layout=gl.SliceLayout(0, o_l))
    o_row = (b.to(gl.int64) * S + no // HPG) * (G * HPG) + g * HPG + no % HPG
    gl.store(dQ + o_row[:, None] * D + do_c[None, :], (dq * sm_scale).to(dtype), mask=(no < S * HPG)[:, None])


@gluon.jit
def _msa_attn_bwd_sm90_kernel(
    Q, dO,  # [B, S, HQ, D]
    k_desc, v_desc,  # tensor descriptors over K, V viewed as [B * S, G * D], boxes [STEP, D]
    Sel, Union, Count,  # [B, G, S, TOPK], the plan [B, G, T, W], [B, G, T] int32
    Out, Lse, dLse,  # [B, S, HQ, D], [B, S, HQ] fp32 x2 (dLse read only if HAS_DLSE)
    dQ,  # [B, S, HQ, D]
    dk_red, dv_red,  # TMA reduce targets over dK32, dV32 [B, S, G, D] fp32 (`_reduce_descriptor`)
    S, block_size, n_tiles, W, qk_scale2, sm_scale,
    G: gl.constexpr, HPG: gl.constexpr, D: gl.constexpr, TOPK: gl.constexpr, SEL_W: gl.constexpr,
    BLOCK_N: gl.constexpr, STEP: gl.constexpr, NS: gl.constexpr, HAS_DLSE: gl.constexpr,
    num_warps: gl.constexpr,
):
    BLOCK_M: gl.constexpr = 128
    NSUB: gl.constexpr = BLOCK_N // STEP
    dtype: gl.constexpr = k_desc.dtype
    ld: gl.constexpr = gl.BlockedLayout([1, 8], [32 * 8 // D, D // 8], [num_warps, 1], [1, 0])
    tile = gl.program_id(0)
    bg = gl.program_id(1)
    b = bg // G
    g = bg % G
    nq = tile * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, ld))
    dd = gl.arange(0, D, layout=gl.SliceLayout(0, ld))
    q_row = (b.to(gl.int64) * S + nq // HPG) * (G * HPG) + g * HPG + nq % HPG
    rows = q_row[:, None] * D + dd[None, :]
    ok = nq < S * HPG
    row_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, D], dtype)
    q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, D], row_sl, gl.load(Q + rows, mask=ok[:, None], other=0.0))
    do = gl.load(dO + rows, mask=ok[:, None], other=0.0)
    do_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, D], row_sl, do)
    # delta = rowsum(out * dout) - dlse (d lse / d s = p: a gradient on lse enters ds = p * (dp -
    # delta) as -dlse), for the tile's rows, where dout is loaded anyway
    out = gl.load(Out + rows, mask=ok[:, None], other=0.0)
    delta = gl.sum(out.to(gl.float32) * do.to(gl.float32), axis=1)
    if HAS_DLSE:
        delta -= gl.load(dLse + q_row, mask=ok, other=0.0)
    delta_smem = gl.allocate_shared_memory(gl.float32, [BLOCK_M], gl.SwizzledSharedLayout(1, 1, 1, [0]), delta)
    pds_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, STEP], dtype)
    p_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, STEP], pds_sl)
    ds_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, STEP], pds_sl)
    k_smem = gl.allocate_shared_memory(dtype, [NS, STEP, D], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [NS, STEP, D], v_desc.layout)
    kv_ready = gl.allocate_shared_memory(gl.int64, [NS, 1], mbarrier.MBarrierLayout())
    kv_empty = gl.allocate_shared_memory(gl.int64, [NS, 1], mbarrier.MBarrierLayout())
    pds_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    pds_free = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    for i in gl.static_range(NS):
        mbarrier.init(kv_ready.index(i), count=1)
        mbarrier.init(kv_empty.index(i), count=2)  # one arrive per consumer warpgroup
    mbarrier.init(pds_ready, count=2)
    mbarrier.init(pds_free, count=2)
    fence_async_shared()  # q/dO stores and barrier inits before the async proxy reads them
    gl.thread_barrier()
    bars = (kv_ready, kv_empty, pds_ready, pds_free)
    # each warpgroup's [STEP, D] fp32 contribution, staged for its TMA reduce-add
    dv_stage = gl.allocate_shared_memory(gl.float32, [D // 32, STEP, 32], dv_red.layout)
    dk_stage = gl.allocate_shared_memory(gl.float32, [D // 32, STEP, 32], dk_red.layout)
    u_base = (bg.to(gl.int64) * n_tiles + tile) * W
    cnt = gl.maximum(gl.load(Count + bg * n_tiles + tile), 1)  # empty plan: block 0, all masked
    n_steps = cnt * NSUB
    WG0: gl.constexpr = 0
    WG1: gl.constexpr = 1
    gl.warp_specialize([
        (_bwd_consumer, (q_smem, do_smem, k_smem, v_smem, p_smem, ds_smem, bars, Sel, Union, Lse, delta_smem, dQ, dv_red,
                         dv_stage, u_base, n_steps, tile * BLOCK_M, bg, S, block_size, qk_scale2, sm_scale, WG0,
                         G, HPG, D, TOPK, SEL_W, BLOCK_N, STEP, NSUB, NS)),
        (_bwd_consumer, (q_smem, do_smem, k_smem, v_smem, p_smem, ds_smem, bars, Sel, Union, Lse, delta_smem, dQ, dk_red,
                         dk_stage, u_base, n_steps, tile * BLOCK_M + 64, bg, S, block_size, qk_scale2, sm_scale,
                         WG1, G, HPG, D, TOPK, SEL_W, BLOCK_N, STEP, NSUB, NS)),
        (_bwd_loader, (k_desc, v_desc, k_smem, v_smem, kv_ready, kv_empty, Union, u_base, n_steps, b * S, g * D,
                       block_size, STEP, NSUB, NS)),
    ], [4, 1], [240, 24])


def attn_bwd(dout, dlse, q, k, v, out, lse, sel32, plan: Plan, block_size: int, scale: float, cfg=None):
    """Launcher, as `attention.attn_bwd`: dout [B, S, Hq, D] and dlse [B, S, Hq] fp32 (or None)
    contiguous, the forward's inputs, outputs and plan (the Triton tiles `cfg` do not apply) ->
    dq [B, S, Hq, D], dk, dv [B, S, G, D]; dk and dv are summed in fp32 by TMA reduce-adds."""
    B, S, Hq, D = q.shape
    G = k.shape[2]
    K = sel32.shape[-1]
    assert plan.block_m == 128, "the sm90 backward's tile is 128 rows (two warpgroups of 64)"
    dq = torch.empty_like(q)
    dk32 = torch.zeros(B, S, G, D, dtype=torch.float32, device=q.device)
    dv32 = torch.zeros_like(dk32)
    block_n = triton.next_power_of_2(block_size)
    step = min(block_n, 64)  # keys per step (the wgmma M of the dk/dv products: at least 64)
    # shared memory: q, dO 32 KiB each, two 32 KiB K/V stages, p/ds 32 KiB, both warpgroups'
    # [64, 128] fp32 contributions staged for their TMA reduce-adds, delta: 225 of the 227 KiB
    red = [_reduce_descriptor(x, step) for x in (dk32, dv32)]
    _msa_attn_bwd_sm90_kernel[(plan.n_tiles, B * G)](
        q, dout, kv_descriptor(k, step), kv_descriptor(v, step), sel32, plan.union, plan.count, out, lse,
        lse if dlse is None else dlse, dq, *red,
        S, block_size, plan.n_tiles, plan.union.shape[-1], scale * LOG2E, scale,
        G=G, HPG=Hq // G, D=D, TOPK=K, SEL_W=max(16, triton.next_power_of_2(K)), BLOCK_N=block_n, STEP=step,
        NS=2, HAS_DLSE=dlse is not None, num_warps=4, maxnreg=168,
    )
    return dq, dk32.to(k.dtype), dv32.to(v.dtype)
