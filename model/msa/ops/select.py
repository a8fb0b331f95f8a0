"""Triton kernel of MSA's selection: fused index scoring, causal block max and running top-k.

Design (numbers and the measurements behind it: bench/NOTES_msa.md): one program per (128-token
tile, b, g). It walks the key blocks 0 .. last causal block in steps of 64 keys (small
shared-memory stages: two programs per SM overlap one's products with the other's row max), one
tensor-core product [tokens, Di] x [Di, 64] per step, takes the causal row max (the block
score) and folds it into a running top-K held in registers ([tokens, K] scores and ids).
Neither the S x S scores nor the [S, NB] block scores ever reach memory. With a query offset
(context parallelism) the tile's tokens sit at global positions q_offset + t: the causal mask,
the diagonal blocks, the local blocks and the loop's end follow those positions, block ids count
from key 0. The sm90 version is `select_sm90` (same results, 256-token tiles). The indexer loss's block
scores of the selected blocks come from `indexer.block_scores_argmax`, a second pass over the K
selected blocks only: keeping them (and their argmax keys) beside the running top-k here, which
this kernel did for a while, made it 2x slower on the H200 at 128K (35.1 -> ~69 ms: the argmax
is a second row reduction per step, and the row max is this kernel's bottleneck), against 2.8 ms
for the second pass.

Legend: B batch, S tokens (queries), G GQA groups (= index query heads), Di index head dim
(DI padded to a power of two), K = topk selected blocks, bs block size, SK = q_offset + S keys,
NB = cdiv(SK, bs) key blocks.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from model.msa.ops.common import dot_precision, index_operands, pow2, select_tile

_EMPTY = tl.constexpr(1 << 29)  # sort key of an unused top-k slot: after every real block id
_PAD = tl.constexpr(1 << 30)  # sort key of a padding slot (K not a power of two): after the unused ones


@triton.jit
def _msa_select_kernel(
    IQ,  # [B, S, G, DI]
    IK,  # [B, SK, DI] with SK = q_off + S
    Out,  # [B, G, S, TOPK] int64
    S, q_off, block_size, topk, local_blocks, n_tiles,
    G: tl.constexpr, DI: tl.constexpr, TOPK_P2: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, SUB_N: tl.constexpr, DOT_PREC: tl.constexpr,
    FULL_BLOCK: tl.constexpr,
):
    # the last tiles have the most blocks to walk: start them first
    tile = n_tiles - 1 - tl.program_id(0)
    bg = tl.program_id(1)
    b = bg // G
    g = bg % G
    SK = q_off + S
    t_loc = tile * BLOCK_T + tl.arange(0, BLOCK_T)  # [BLOCK_T] row of IQ / Out
    t_ok = t_loc < S
    t = q_off + t_loc  # [BLOCK_T] global position: key index of the token's own key
    d = tl.arange(0, DI)
    iq_row = (b.to(tl.int64) * S + t_loc) * G + g
    q = tl.load(IQ + iq_row[:, None] * DI + d[None, :], mask=t_ok[:, None], other=0.0)  # [BLOCK_T, DI]
    own = t // block_size  # [BLOCK_T] the token's own block

    slot = tl.arange(0, TOPK_P2)
    zero = tl.zeros([BLOCK_T, TOPK_P2], dtype=tl.int32)
    # running top-k: unused slots hold -inf and distinct negative ids; padding slots (K not a
    # power of two) hold +inf so that they are never evicted
    vals = tl.where(slot[None, :] < topk, float("-inf"), float("inf")) + zero.to(tl.float32)
    ids = tl.where(slot[None, :] < topk, -1 - slot[None, :], _PAD + slot[None, :]) + zero
    minv = tl.min(vals, axis=1)  # [BLOCK_T]

    t_first = q_off + tile * BLOCK_T  # global positions from here on
    last_blk = (tl.minimum(t_first + BLOCK_T, SK) - 1) // block_size
    # a block is read in NSUB steps of SUB_N keys: smaller shared-memory stages (more programs
    # per SM, so one program's row max / top-k work overlaps another's products)
    NSUB: tl.constexpr = BLOCK_N // SUB_N
    jj = tl.arange(0, SUB_N)
    bpart = tl.full([BLOCK_T], float("-inf"), tl.float32)  # running max over a block's sub-steps
    for it in range(0, (last_blk + 1) * NSUB):
        kb = it // NSUB
        j0 = (it % NSUB) * SUB_N
        j = kb * block_size + j0 + jj  # [SUB_N]
        in_blk = j0 + jj < block_size
        k = tl.load(IK + (b.to(tl.int64) * SK + j)[:, None] * DI + d[None, :],
                    mask=in_blk[:, None] & (j < SK)[:, None], other=0.0)  # [SUB_N, DI]
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)  # [BLOCK_T, SUB_N] fp32
        if not FULL_BLOCK:  # (a power-of-two block has no padding keys: no per-element select)
            s = tl.where(in_blk[None, :], s, float("-inf"))
        if kb * block_size + j0 + SUB_N - 1 > t_first:  # the keys reach past some token: causal
            s = tl.where(j[None, :] <= t[:, None], s, float("-inf"))
        bpart = tl.maximum(bpart, tl.max(s, axis=1))
        if j0 + SUB_N >= BLOCK_N:  # the block's last sub-step: fold its score into the top-k
            bscore = bpart  # [BLOCK_T]; -inf for blocks after the token's own
            bpart = tl.full([BLOCK_T], float("-inf"), tl.float32)
            is_local = (kb <= own) & (kb > own - local_blocks)
            bscore = tl.where(is_local, float("inf"), bscore)
            ins = bscore > minv
            if tl.max(ins.to(tl.int32), axis=0) > 0:
                # evict the weakest entry: lowest score, and among equal scores the highest id
                # (the new block has the highest id so far, so it loses ties: ties go to lower ids)
                ev_id = tl.max(tl.where(vals == minv[:, None], ids, -(1 << 30)), axis=1)
                ev = (ids == ev_id[:, None]) & ins[:, None]
                vals = tl.where(ev, bscore[:, None], vals)
                ids = tl.where(ev, kb, ids)
                minv = tl.min(vals, axis=1)

    o_row = (bg.to(tl.int64) * S + t_loc) * topk
    key = tl.where(ids < 0, _EMPTY, ids)
    key = tl.sort(key, dim=1)
    res = tl.where(key >= _EMPTY, -1, key)
    tl.store(Out + o_row[:, None] + slot[None, :], res.to(tl.int64), mask=t_ok[:, None] & (slot[None, :] < topk))


def select(index_q: torch.Tensor, index_k: torch.Tensor, block_size: int, topk: int, local_blocks: int,
           q_offset: int = 0, block_t: int | None = None, num_warps: int | None = None,
           num_stages: int | None = None, sub_n: int | None = None) -> torch.Tensor:
    """Launcher: top-k key blocks per token and group (arguments checked by `model.msa.api`).

    Args:
        index_q: [B, S, G, Di] index queries (one head per GQA group).
        index_k: [B, q_offset + S, Di] the shared index key head.
        block_size: keys per block; topk: K blocks per (token, group), local ones included;
        local_blocks: the blocks t//bs - local_blocks + 1 .. t//bs (clipped at 0), always taken.
        q_offset: query row i is token t = q_offset + i of the sequence whose keys index_k
            holds (context parallelism); t and the block ids below are positions in it.
        block_t, num_warps, num_stages, sub_n: the tile (benchmarks and tests; None: `select_tile`).

    Returns:
        int64 [B, G, S, K]: per (b, g, t) the selected block ids ascending, then -1 for unused
        slots. Block score = max over keys j <= t of the block of index_q[t, g] . index_k[j]
        (fp32 accumulation; fp32 inputs multiply exactly), ties to the lower id.
    """
    B, S, G, _ = index_q.shape
    iq, ik = index_operands(index_q, index_k)
    DI = iq.shape[-1]
    out = torch.empty(B, G, S, topk, dtype=torch.int64, device=iq.device)
    tile = select_tile(iq)
    block_t = block_t or tile["block_t"]
    BN = pow2(block_size)
    sub_n = min(sub_n or tile["sub_n"], BN)
    grid = (triton.cdiv(S, block_t), B * G)
    _msa_select_kernel[grid](
        iq, ik, out, S, q_offset, block_size, topk, local_blocks, grid[0],
        G=G, DI=DI, TOPK_P2=pow2(topk, 1), BLOCK_T=block_t, BLOCK_N=BN, SUB_N=sub_n, FULL_BLOCK=BN == block_size,
        DOT_PREC=dot_precision(iq.dtype),
        num_warps=num_warps or tile["num_warps"], num_stages=num_stages or tile["num_stages"],
    )
    return out
