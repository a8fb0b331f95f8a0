"""MSA's selection on Hopper (sm90) in Gluon: index scores, causal block max and running top-k,
as the Triton `select._msa_select_kernel`, on 256-token tiles (two consumer warpgroups of 128
tokens and one loader warp). Same ids, ties included.

Measured at 128K (bench/NOTES_msa.md, round 4): the selection is bound by the L2 -> SM traffic
of index-key blocks (each 32 KB block serves BLOCK_T tokens), not by the row max / top-k work
between the products: 128-token tiles ran at ~510 TFLOP/s in Triton and ~500 here with the next
product overlapping the fold, 256-token tiles at ~680. Triton could not fit 256-token tiles.

Runs only on CUDA devices of compute capability 9.x with bf16/fp16 index inputs whose head dim
pads to 64 or 128, blocks of at most 128 keys (`supported`); tested on the GPU only
(tests/test_msa_gluon.py), against the Triton kernel and the reference.

Legend: B batch, S tokens (queries), G GQA groups, DI padded index head dim, K = topk slots
(K_W: padded to a power of two, at least 16), bs block size, SK = q_offset + S keys, NS stages.
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from model.msa.ops.common import index_operands, pow2
from model.msa.ops.common_sm90 import GL_DTYPE, load_block, takes, wg_mma


def supported(index_q: torch.Tensor, block_size: int) -> bool:
    """Whether the sm90 selection takes these index queries [B, S, G, Di] (Di padded as the
    launcher pads it), else the Triton one runs."""
    return takes(index_q.dtype, pow2(index_q.shape[-1]), block_size)


@gluon.jit
def _select_loader(k_desc, k_smem, ready, empty, kv_row0, n_blk, block_size, NS: gl.constexpr):
    """Producer warp: index-key block j into stage j % NS once both consumers released it."""
    for j in range(n_blk):
        st = j % NS
        mbarrier.wait(empty.index(st), ((j // NS) & 1) ^ 1)
        load_block(k_desc, k_smem.index(st), ready.index(st), kv_row0 + j * block_size, 0)


@gluon.jit
def _topk_fold(s, kb, vals, ids, minv, t, t_first, own, block_size, local_blocks,
               BLOCK_N: gl.constexpr, FULL_BLOCK: gl.constexpr, s_l: gl.constexpr, k_l: gl.constexpr):
    """Block kb's causal row max (the block score) into the running top-k (vals, ids [rows, K])."""
    col_l: gl.constexpr = gl.SliceLayout(0, s_l)
    jj = gl.arange(0, BLOCK_N, layout=col_l)
    j = kb * block_size + jj
    if not FULL_BLOCK:  # (a power-of-two block has no padding keys: no per-element select)
        s = gl.where((jj < block_size)[None, :], s, float("-inf"))
    if kb * block_size + BLOCK_N - 1 > t_first:  # the keys reach past some token: causal
        s = gl.where(j[None, :] <= gl.convert_layout(t, gl.SliceLayout(1, s_l))[:, None], s, float("-inf"))
    bscore = gl.convert_layout(gl.max(s, axis=1), gl.SliceLayout(1, k_l))  # -inf after the own block
    bscore = gl.where((kb <= own) & (kb > own - local_blocks), float("inf"), bscore)
    ins = bscore > minv
    # evict the weakest entry: lowest score, and among equal scores the highest id (the new
    # block has the highest id so far, so it loses ties: ties go to lower ids)
    ev_id = gl.max(gl.where(vals == minv[:, None], ids, -(1 << 30)), axis=1)
    ev = (ids == ev_id[:, None]) & ins[:, None]
    vals = gl.where(ev, bscore[:, None], vals)
    ids = gl.where(ev, kb, ids)
    return vals, ids, gl.min(vals, axis=1)


@gluon.jit
def _select_consumer(q, k_smem, ready, empty, Out, n_blk, bg, t0, S, q_off, block_size, topk, local_blocks,
                     HALF: gl.constexpr, BLOCK_N: gl.constexpr, K_W: gl.constexpr, FULL_BLOCK: gl.constexpr,
                     NS: gl.constexpr):
    """One warpgroup: tokens [t0, t0 + HALF) of the tile (q: theirs in shared memory)."""
    s_l: gl.constexpr = wg_mma(BLOCK_N)
    # the running top-k in an accumulator layout of the same rows (row maxima land in place)
    k_l: gl.constexpr = wg_mma(K_W)
    row_l: gl.constexpr = gl.SliceLayout(1, k_l)
    slot = gl.arange(0, K_W, layout=gl.SliceLayout(0, k_l))
    t_loc = t0 + gl.arange(0, HALF, layout=row_l)
    t = q_off + t_loc  # global position: key index of the token's own key
    own = t // block_size
    t_first = q_off + t0
    zero = gl.zeros([HALF, K_W], gl.int32, k_l)
    # unused slots hold -inf and distinct negative ids; padding slots (K not a power of two)
    # hold +inf so that they are never evicted
    vals = gl.where(slot[None, :] < topk, float("-inf"), float("inf")) + zero.to(gl.float32)
    ids = gl.where(slot[None, :] < topk, -1 - slot[None, :], (1 << 30) + slot[None, :]) + zero
    minv = gl.min(vals, axis=1)
    s_zero = gl.zeros([HALF, BLOCK_N], gl.float32, s_l)

    # one accumulator: while this warpgroup folds block j, the other one's product runs
    for j in range(n_blk):
        st = j % NS
        mbarrier.wait(ready.index(st), (j // NS) & 1)
        s = warpgroup_mma(q, k_smem.index(st).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        s = warpgroup_mma_wait(0, deps=(s,))
        mbarrier.arrive(empty.index(st), count=1)
        vals, ids, minv = _topk_fold(s, j, vals, ids, minv, t, t_first, own, block_size, local_blocks,
                                     BLOCK_N, FULL_BLOCK, s_l, k_l)
    # unsorted ids, unused slots as INT32_MAX (sorted last); the launcher sorts each row
    o_row = (bg.to(gl.int64) * S + t_loc) * topk
    gl.store(Out + o_row[:, None] + slot[None, :], gl.where(ids < 0, 2147483647, ids),
             mask=(t_loc < S)[:, None] & (slot[None, :] < topk))


@gluon.jit
def _msa_select_sm90_kernel(
    IQ,  # [B, S, G, DI]
    k_desc,  # tensor descriptor over index keys [B * SK, DI] (SK = q_off + S), boxes [BLOCK_N, DI]
    Out,  # [B, G, S, TOPK] int32, each row unsorted, INT32_MAX in unused slots
    S, q_off, block_size, topk, local_blocks, n_tiles,
    G: gl.constexpr, DI: gl.constexpr, K_W: gl.constexpr, BLOCK_T: gl.constexpr, BLOCK_N: gl.constexpr,
    FULL_BLOCK: gl.constexpr, NS: gl.constexpr, num_warps: gl.constexpr,
):
    HALF: gl.constexpr = BLOCK_T // 2
    dtype: gl.constexpr = k_desc.dtype
    tile = n_tiles - 1 - gl.program_id(0)  # the last tiles have the most blocks to walk: first
    bg = gl.program_id(1)
    b = bg // G
    g = bg % G
    SK = q_off + S
    q_ld: gl.constexpr = gl.BlockedLayout([1, 8], [32 * 8 // DI, DI // 8], [num_warps, 1], [1, 0])
    q_smem = gl.allocate_shared_memory(dtype, [2, HALF, DI], gl.NVMMASharedLayout.get_default_for([HALF, DI], dtype))
    for h in gl.static_range(2):
        tq = tile * BLOCK_T + h * HALF + gl.arange(0, HALF, layout=gl.SliceLayout(1, q_ld))
        dd = gl.arange(0, DI, layout=gl.SliceLayout(0, q_ld))
        row = (b.to(gl.int64) * S + tq) * G + g
        q_smem.index(h).store(gl.load(IQ + row[:, None] * DI + dd[None, :], mask=(tq < S)[:, None], other=0.0))
    k_smem = gl.allocate_shared_memory(dtype, [NS, BLOCK_N, DI], k_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [NS, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [NS, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(NS):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)  # one arrive per consumer warpgroup
    fence_async_shared()
    gl.thread_barrier()
    # blocks 0 .. the block of the tile's last key position (both warpgroups walk all of them)
    n_blk = (gl.minimum(q_off + tile * BLOCK_T + BLOCK_T, SK) - 1) // block_size + 1
    gl.warp_specialize([
        (_select_consumer, (q_smem.index(0), k_smem, ready, empty, Out, n_blk, bg, tile * BLOCK_T, S, q_off,
                            block_size, topk, local_blocks, HALF, BLOCK_N, K_W, FULL_BLOCK, NS)),
        (_select_consumer, (q_smem.index(1), k_smem, ready, empty, Out, n_blk, bg, tile * BLOCK_T + HALF, S,
                            q_off, block_size, topk, local_blocks, HALF, BLOCK_N, K_W, FULL_BLOCK, NS)),
        (_select_loader, (k_desc, k_smem, ready, empty, b * SK, n_blk, block_size, NS)),
    ], [4, 1], [240, 24])


def select(index_q: torch.Tensor, index_k: torch.Tensor, block_size: int, topk: int, local_blocks: int,
           q_offset: int = 0, num_stages: int = 3, block_t: int = 256) -> torch.Tensor:
    """Launcher, as `select.select`: index_q [B, S, G, Di], index_k [B, q_offset + S, Di] (Di
    padded to DI 64 or 128) -> block ids [B, G, S, topk] int64, ascending, -1 (unused slots) last."""
    iq, ik = index_operands(index_q, index_k)
    B, S, G, DI = iq.shape
    SK = ik.shape[1]
    block_n = triton.next_power_of_2(block_size)
    out = torch.empty(B, G, S, topk, dtype=torch.int32, device=iq.device)
    layout = gl.NVMMASharedLayout.get_default_for([block_n, DI], GL_DTYPE[iq.dtype])
    k_desc = TensorDescriptor.from_tensor(ik.view(B * SK, DI), [block_n, DI], layout)
    n_tiles = triton.cdiv(S, block_t)
    _msa_select_sm90_kernel[(n_tiles, B * G)](
        iq, k_desc, out, S, q_offset, block_size, topk, local_blocks, n_tiles,
        G=G, DI=DI, K_W=max(16, triton.next_power_of_2(topk)), BLOCK_T=block_t, BLOCK_N=block_n,
        FULL_BLOCK=block_n == block_size, NS=num_stages, num_warps=4, maxnreg=168,
    )
    # ascending ids, unused slots (-1) last: as the Triton kernel's in-register sort leaves them
    srt = out.sort(dim=-1).values
    return torch.where(srt == torch.iinfo(torch.int32).max, -1, srt).long()
