"""Triton kernels of MSA: fused index scoring + top-k block selection, and sparse attention
over the selected blocks (forward and backward).

Entry points (called by `model.msa.api` for CUDA tensors; they also run on CPU tensors under
TRITON_INTERPRET=1, which is how the CPU tests drive them):
    triton_msa_select(index_q, index_k, block_size, topk, local_blocks, q_offset) -> [B, G, S, K] int64
    triton_msa_attention(q, k, v, block_indices, block_size, softmax_scale, return_lse)
    triton_attention_block_mass(q, k, lse, block_indices, block_size, softmax_scale) -> [B, G, S, K]
    triton_msa_block_scores(index_q, index_k, block_indices, block_size, q_offset) -> [B, G, S, K]

Layers: Triton kernels (`_*_kernel`) -> launchers (`_select`, `_attn_fwd`, `_attn_bwd`: they
allocate outputs and set the grid) -> `_MSAAttention` (torch.autograd.Function) -> the two entry
points above, whose docstrings give the shapes.

Legend: B batch, S tokens, G KV heads (= GQA groups = index query heads), Hq query heads,
HPG = Hq // G query heads per group, D head dim, Di index head dim, K = topk selected blocks,
bs block size, NB = cdiv(S, bs) key blocks. Selection with a query offset (context parallelism):
S queries, SK = q_offset + S keys, NB = cdiv(SK, bs).

Design (numbers and the measurements behind it: bench/NOTES_msa.md):
- Selection: one program per (128-token tile, b, g). It walks the key blocks 0 .. last causal
  block in steps of 64 keys (small shared-memory stages: two programs per SM overlap one's
  products with the other's row max), one tensor-core product [tokens, Di] x [Di, 64] per step,
  takes the causal row max
  (the block score) and folds it into a running top-K held in registers ([tokens, K] scores and
  ids). Neither the S x S scores nor the [S, NB] block scores ever reach memory. With a query
  offset the tile's tokens sit at global positions q_offset + t: the causal mask, the diagonal
  blocks, the local blocks and the loop's end follow those positions, block ids count from key 0.
- Attention is query-outer over "row tiles": the (token, head) pairs of one group are flattened
  (row n = t * HPG + hh), so a tile of BLOCK_M = 128 rows holds ~21 tokens x 6 heads and fills the
  tensor-core M dimension without padding the 6 heads to 8 or 16. The tile visits the union of
  its tokens' selected blocks (a "plan", built once per forward by a kernel that takes a tile's
  distinct ids smallest first); each row keeps only the keys of blocks its own token selected
  (j <= t), so results are exact per token.
  Neighbouring tokens select nearly the same blocks, so the union is close to K.
- Backward: dq by the same query-outer loop, which also forms the block's dk/dv contributions
  and adds them into fp32 buffers with atomics (measured 2x faster on H100 than the KV-outer
  alternative kept behind `kv_outer=True`: one program per (key block, group, chunk of the row
  tiles that visited it), accumulating in registers, one add per chunk).
- The forward reads K/V through tensor descriptors (TMA on Hopper, `AttnConfig.fwd_tma`) over the
  [B * S, G * D] view, one whole block per step; pointer loads remain (CPU interpreter, fp32).
- Indexer-loss terms: the block mass walks the attention forward's row tiles and plan (one
  product per step, row sums into the slot of the block); the block scores walk a plan of
  128-token tiles (one row per token) like the selection, keeping per slot the causal max and
  its lowest key position. The block-score backward gathers each slot's argmax key for d
  index_q and adds into d index_k with fp32 atomics (32 tokens of one group per program).
- Selection and attention are exact; only the forward skips the per-element mask for blocks that
  every row of the tile selected and that end before its first token.
- On Hopper (sm90) in bf16/fp16 the attention forward, the dq/dk/dv kernel and the selection run
  the Gluon kernels of `model.msa.gluon_kernels` (same tiles, plan and results; warp-specialised,
  asynchronous wgmma; the selection on 256-token tiles) unless `AttnConfig.fwd_gluon` /
  `bwd_gluon` / `_select(gluon=False)` say otherwise; these Triton kernels are the path
  everywhere else and the CPU-tested reference.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from model.msa.reference import _BlockMaxScores, _renormalise

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
_EMPTY = tl.constexpr(1 << 29)  # sort key of an unused top-k slot: after every real block id
_PAD = tl.constexpr(1 << 30)  # sort key of a padding slot (K not a power of two): after the unused ones


@dataclass(frozen=True)
class AttnConfig:
    """Tile sizes of the attention kernels (the benchmark varies them; the defaults are the
    measured choice on H100). On sm90 in bf16/fp16 the Gluon kernels run instead and the
    Triton tile fields below apply only with fwd_gluon / bwd_gluon False."""

    block_m: int = 128  # rows (token, head) per query-outer tile, also the plan's tile
    fwd_warps: int = 8
    fwd_stages: int = 2
    fwd_sub_n: int = 128  # keys per step in the forward (64: a block in two steps, smaller stages)
    fwd_tma: bool = True  # forward K/V loads by tensor descriptors (TMA on Hopper)
    fwd_gluon: bool = True  # sm90, bf16/fp16: the Gluon forward (model/msa/gluon_kernels.py)
    bwd_gluon: bool = True  # the same for the dq kernel with dk/dv reduce-adds (not with kv_outer)
    dq_sub_n: int = 64  # keys per step inside a block in the dq kernel
    dq_warps: int = 8
    dq_stages: int = 2
    dq_tma: bool = False  # the same in the dq kernel
    dkdv_sub_m: int = 64  # rows per step of a row tile in the KV-outer dk/dv kernel
    dkdv_warps: int = 8
    dkdv_stages: int = 2
    dkdv_chunk: int = 64  # row tiles per dk/dv program (bounds the tail of popular blocks)
    kv_outer: bool = False  # True: dk/dv by the KV-outer kernel; False: atomics from the dq loop
    skip_mask: bool = True  # forward: skip the per-element mask where every row takes the block
    dq_skip_mask: bool = False  # the same in the dq loop (measured slower there: NOTES)


# CPU (interpreter tests): pointer loads; the TMA path has tests of its own
_CPU_CONFIG = AttnConfig(block_m=32, fwd_sub_n=32, fwd_tma=False, dq_sub_n=16, dkdv_sub_m=16, dkdv_chunk=4)

# selection tile on CUDA: 128 tokens, 8 warps, 64-key steps (bench/NOTES_msa.md; the
# benchmark may override)
SELECT_TILE = dict(block_t=128, num_warps=8, num_stages=3, sub_n=64)


# fp32 inputs on CUDA (tests and checks, not training): tiles that fit shared memory at d 128
_SELECT_TILE_FP32 = dict(block_t=64, num_warps=4, num_stages=2, sub_n=32)
_CUDA_FP32_CONFIG = AttnConfig(block_m=64, fwd_warps=4, fwd_stages=2, fwd_sub_n=32, fwd_tma=False,
                               dq_sub_n=32, dq_warps=4, dq_stages=2, dq_tma=False,
                               dkdv_sub_m=32, dkdv_warps=4)


def _pow2(x: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(x))


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: exact fp32 products (tf32 would move selections and miss 1e-5 tolerances);
    # bf16/fp16 inputs take the tensor cores natively whatever this says.
    return "ieee" if dtype == torch.float32 else "tf32"


# --------------------------------------------------------------------------------------------
# Selection: fused index scores, causal block max and running top-k
# --------------------------------------------------------------------------------------------


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

    key = tl.where(ids < 0, _EMPTY, ids)
    key = tl.sort(key, dim=1)
    res = tl.where(key >= _EMPTY, -1, key)
    o_row = (bg.to(tl.int64) * S + t_loc) * topk
    tl.store(Out + o_row[:, None] + slot[None, :], res.to(tl.int64),
             mask=t_ok[:, None] & (slot[None, :] < topk))


def _index_operands(index_q, index_k):
    """index_q, index_k contiguous, in index_q's dtype, the head dim zero-padded to a power of
    two (which leaves every score unchanged)."""
    Di = index_q.shape[-1]
    DI = _pow2(Di)
    iq = index_q.contiguous()
    ik = index_k.contiguous().to(iq.dtype)
    if DI != Di:
        iq = torch.nn.functional.pad(iq, (0, DI - Di))
        ik = torch.nn.functional.pad(ik, (0, DI - Di))
    return iq, ik


def _select_tile(iq: torch.Tensor) -> dict:
    """Token tile of the kernels that score index queries against index keys."""
    if not iq.is_cuda:
        return dict(block_t=16, num_warps=4, num_stages=2, sub_n=16)
    # fp32 tiles take twice the shared memory
    return _SELECT_TILE_FP32 if iq.dtype == torch.float32 else SELECT_TILE


def _select(index_q, index_k, block_size, topk, local_blocks, q_offset=0, block_t=None, num_warps=None,
            num_stages=None, sub_n=None, gluon=True):
    """Launcher: index_q [B, S, G, Di], index_k [B, q_offset + S, Di] -> int64 [B, G, S, topk].
    On sm90 in bf16/fp16 the Gluon kernel runs unless `gluon` is False or a tile is given."""
    B, S, G, _ = index_q.shape
    iq, ik = _index_operands(index_q, index_k)
    tiled = any(x is not None for x in (block_t, num_warps, num_stages, sub_n))
    gluon_kernels = _gluon_for(iq) if gluon and not tiled else None
    if gluon_kernels is not None and gluon_kernels.supported(iq, block_size):
        return gluon_kernels.select(iq, ik, block_size, topk, local_blocks, q_offset)
    DI = iq.shape[-1]
    out = torch.empty(B, G, S, topk, dtype=torch.int64, device=iq.device)
    tile = _select_tile(iq)
    block_t = block_t or tile["block_t"]
    BN = _pow2(block_size)
    sub_n = min(sub_n or tile["sub_n"], BN)
    grid = (triton.cdiv(S, block_t), B * G)
    _msa_select_kernel[grid](
        iq, ik, out, S, q_offset, block_size, topk, local_blocks, grid[0],
        G=G, DI=DI, TOPK_P2=_pow2(topk, 1), BLOCK_T=block_t, BLOCK_N=BN, SUB_N=sub_n, FULL_BLOCK=BN == block_size,
        DOT_PREC=_dot_precision(iq.dtype),
        num_warps=num_warps or tile["num_warps"], num_stages=num_stages or tile["num_stages"],
    )
    return out


def triton_msa_select(index_q: torch.Tensor, index_k: torch.Tensor, block_size: int, topk: int,
                      local_blocks: int, q_offset: int = 0) -> torch.Tensor:
    """Top-k key blocks per token and group, fused (no S x S or S x NB intermediate).

    Args:
        index_q: [B, S, G, Di] index queries (one head per GQA group).
        index_k: [B, q_offset + S, Di] the shared index key head.
        block_size: keys per block; topk: K blocks per (token, group), local ones included;
        local_blocks: the blocks t//bs - local_blocks + 1 .. t//bs (clipped at 0), always taken.
        q_offset: query row i is token t = q_offset + i of the sequence whose keys index_k
            holds (context parallelism); t and the block ids below are positions in it.

    Returns:
        int64 [B, G, S, K]: per (b, g, t) the selected block ids ascending, then -1 for unused
        slots. Block score = max over keys j <= t of the block of index_q[t, g] . index_k[j]
        (fp32 accumulation; fp32 inputs multiply exactly), ties to the lower id.
    """
    if block_size < 1 or topk < 1 or local_blocks < 0 or local_blocks > topk or q_offset < 0:
        raise ValueError(f"need block_size >= 1, topk >= 1, 0 <= local_blocks <= topk and q_offset >= 0; "
                         f"got block_size={block_size}, topk={topk}, local_blocks={local_blocks}, "
                         f"q_offset={q_offset}")
    B, S, _, Di = index_q.shape
    if index_k.shape != (B, q_offset + S, Di):
        raise ValueError(f"index_k has shape {tuple(index_k.shape)}; expected {(B, q_offset + S, Di)}")
    return _select(index_q, index_k, block_size, topk, local_blocks, q_offset)


# --------------------------------------------------------------------------------------------
# Plan: per query row tile, the union of the blocks its tokens selected
# --------------------------------------------------------------------------------------------


@dataclass
class Plan:
    """Which key blocks each query row tile visits. Row tile i of group g holds the flattened
    rows n = t * HPG + hh in [i * block_m, (i + 1) * block_m)."""

    block_m: int
    n_tiles: int
    union: torch.Tensor  # [B, G, n_tiles, W] int32, ascending, valid in the first `count`
    count: torch.Tensor  # [B, G, n_tiles] int32


@triton.jit
def _msa_plan_kernel(
    Sel,  # [B, G, S, TOPK] int32
    Union,  # [B, G, n_tiles, W] int32, zeros: the kernel writes the first `count` of each row
    Count,  # [B, G, n_tiles] int32
    S, q_off, block_size, n_tiles, W,
    HPG: tl.constexpr, TOPK: tl.constexpr, BLOCK_M: tl.constexpr, N_CAND: tl.constexpr,
):
    # One program per (row tile, b * G + g), the attention's grid. It takes the tile's distinct
    # ids smallest first, one per step (a min over the candidates, then every copy of it
    # dropped): `count` steps, the number of blocks the attention then visits with a tile of
    # products each, so ~20 at M2's realistic selections and hundreds only where the attention
    # has hundreds of blocks per tile too. Programs of their own let each stop at its own count.
    # (tl.sort would take a fixed log^2 network, but Triton's CPU interpreter runs its xor
    # reductions element by element: ~50 ms per program, +36 s on this file's kernel tests.)
    NONE: tl.constexpr = 2**31 - 1  # a candidate dropped or taken: above every block id
    tile = tl.program_id(0)
    bg = tl.program_id(1)
    t_lo = tile * BLOCK_M // HPG
    t_hi = tl.minimum((tile * BLOCK_M + BLOCK_M - 1) // HPG, S - 1)
    # the tile's tokens are consecutive rows of Sel: their ids are one contiguous run
    c = tl.arange(0, N_CAND)
    cand = tl.load(Sel + (bg.to(tl.int64) * S + t_lo) * TOPK + c, mask=c < (t_hi - t_lo + 1) * TOPK, other=-1)
    # a block after the tile's last token's own block has no key j <= t for any of its rows
    last = (t_hi + q_off) // block_size
    cand = tl.where((cand < 0) | (cand > last), NONE, cand)  # [N_CAND]
    row = bg.to(tl.int64) * n_tiles + tile
    count = 0
    blk = tl.min(cand, 0)
    while blk != NONE:
        tl.store(Union + row * W + count, blk)
        count += 1
        cand = tl.where(cand == blk, NONE, cand)
        blk = tl.min(cand, 0)
    tl.store(Count + row, count)


def _build_plan(sel32: torch.Tensor, S: int, hpg: int, block_m: int, block_size: int, q_offset: int = 0) -> Plan:
    """Launcher: sel32 [B, G, S, K] int32 -> Plan with W = tt * K, tt = cdiv(block_m, hpg) + 1
    (`reference.row_tile_plan` builds the same with torch ops). Query t sits at key position
    q_offset + t (block scores under context parallelism)."""
    B, G, _, K = sel32.shape
    n_tiles = triton.cdiv(S * hpg, block_m)
    width = ((block_m + hpg - 1) // hpg + 1) * K
    union = torch.zeros(B, G, n_tiles, width, dtype=torch.int32, device=sel32.device)
    count = torch.empty(B, G, n_tiles, dtype=torch.int32, device=sel32.device)
    tokens = (block_m + hpg - 2) // hpg + 1  # most tokens in one tile (block_m at hpg 1, not tt)
    # one warp: a step's min is one warp reduction (no barrier); 16 ids per thread at M2's shape
    _msa_plan_kernel[(n_tiles, B * G)](
        sel32, union, count, S, q_offset, block_size, n_tiles, width,
        HPG=hpg, TOPK=K, BLOCK_M=block_m, N_CAND=_pow2(tokens * K, 1), num_warps=1,
    )
    return Plan(block_m, n_tiles, union, count)


def _kv_items(plan: Plan, n_blocks: int, chunk: int):
    """Inverse of the plan for the KV-outer backward: per (b, g, key block), the row tiles that
    visit it, cut into chunks of at most `chunk` tiles. Returns (tiles [P] int32, item_key,
    item_start, item_end [I] int32), key = (b * G + g) * NB + block."""
    B, G, T, W = plan.union.shape
    dev = plan.union.device
    valid = torch.arange(W, device=dev)[None, None, None, :] < plan.count[..., None]
    bg_i, t_i, u_i = valid.reshape(B * G, T, W).nonzero(as_tuple=True)
    blk = plan.union.reshape(B * G, T, W)[bg_i, t_i, u_i].long()
    key = bg_i * n_blocks + blk
    key_sorted, order = torch.sort(key, stable=True)
    tiles = t_i[order].to(torch.int32)
    counts = torch.bincount(key_sorted, minlength=B * G * n_blocks)
    offsets = counts.cumsum(0) - counts
    n_chunks = (counts + chunk - 1) // chunk
    item_key = torch.repeat_interleave(torch.arange(B * G * n_blocks, device=dev), n_chunks)
    chunk_idx = torch.arange(item_key.numel(), device=dev) - (n_chunks.cumsum(0) - n_chunks)[item_key]
    start = offsets[item_key] + chunk_idx * chunk
    end = torch.minimum(start + chunk, offsets[item_key] + counts[item_key])
    return tiles, item_key.to(torch.int32), start.to(torch.int32), end.to(torch.int32)


# --------------------------------------------------------------------------------------------
# Sparse attention forward
# --------------------------------------------------------------------------------------------


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
def _plan_row(Count, bg, tile, n_tiles, W):
    """Where tile `tile` of (b, g) = bg finds its visited blocks in the plan: the offset of its
    row of Union, and how many of them there are."""
    return (bg.to(tl.int64) * n_tiles + tile) * W, tl.load(Count + bg * n_tiles + tile)


@triton.jit
def _plan_step(Union, u_base, it, jj, block_size, S, NSUB: tl.constexpr, SUB_N: tl.constexpr):
    """Step `it` of a row tile's walk over its plan (NSUB steps of SUB_N keys per block): the
    block kb, the step's first key offset j0 in it, its keys j [SUB_N] and which are real keys."""
    kb = tl.load(Union + u_base + it // NSUB)
    j0 = (it % NSUB) * SUB_N
    j = kb * block_size + j0 + jj
    kv_ok = (j0 + jj < block_size) & (j < S)
    return kb, j0, j, kv_ok


@triton.jit
def _step_needs_mask(hit, kb, j0, t_first, block_size, SKIP_MASK: tl.constexpr, SUB_N: tl.constexpr,
                     BLOCK_N: tl.constexpr):
    """Whether a step needs the per-element mask (CUDA-core work per element): not where every
    row selected the block (hit [BLOCK_M]) and every key precedes the tile's first token."""
    need = True
    if SKIP_MASK:
        need = (tl.min(hit.to(tl.int32), axis=0) == 0) \
            | (kb * block_size + j0 + SUB_N - 1 > t_first) | (block_size != BLOCK_N)
    return need


@triton.jit
def _row_tile(Q, Sel, S, G: tl.constexpr, HPG: tl.constexpr, D: tl.constexpr, TOPK: tl.constexpr,
              TOPK_P2: tl.constexpr, BLOCK_M: tl.constexpr):
    """The program's row tile (grid: tile, b * G + g) of the query-outer kernels: its rows
    n = t * HPG + hh, their q [BLOCK_M, D] and selections sel [BLOCK_M, TOPK_P2] (-1 padded)."""
    tile = tl.program_id(0)
    bg = tl.program_id(1)
    b = bg // G
    g = bg % G
    t_first = tile * BLOCK_M // HPG
    n = tile * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] flattened (token, head) rows
    row_ok = n < S * HPG
    t = n // HPG
    h = g * HPG + n % HPG
    d = tl.arange(0, D)
    q_row = (b.to(tl.int64) * S + t) * (G * HPG) + h
    q = tl.load(Q + q_row[:, None] * D + d[None, :], mask=row_ok[:, None], other=0.0)
    kk = tl.arange(0, TOPK_P2)
    sel = tl.load(Sel + ((bg.to(tl.int64) * S + t) * TOPK)[:, None] + kk[None, :],
                  mask=row_ok[:, None] & (kk[None, :] < TOPK), other=-1)
    return tile, bg, b, g, t_first, n, row_ok, t, d, q_row, q, kk, sel


@triton.jit
def _msa_attn_fwd_kernel(
    Q,  # [B, S, HQ, D]
    K, V,  # [B, S, G, D], or tensor descriptors over [B * S, G * D] when TMA
    Sel,  # [B, G, S, TOPK] int32
    Union, Count,  # [B, G, T, W], [B, G, T] int32
    Out,  # [B, S, HQ, D]
    Lse,  # [B, S, HQ] fp32
    S, block_size, n_tiles, W, qk_scale2,
    G: tl.constexpr, HPG: tl.constexpr, D: tl.constexpr, TOPK: tl.constexpr, TOPK_P2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SUB_N: tl.constexpr, DOT_PREC: tl.constexpr,
    SKIP_MASK: tl.constexpr, TMA: tl.constexpr,
):
    tile, bg, b, g, t_first, n, row_ok, t, d, q_row, q, kk, sel = _row_tile(
        Q, Sel, S, G, HPG, D, TOPK, TOPK_P2, BLOCK_M)

    # m_i is kept in log2 units of the scaled scores; the scale enters exp2 as one FMA per
    # element (s * scale - m) instead of a separate multiply
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    jj = tl.arange(0, SUB_N)
    u_base, cnt = _plan_row(Count, bg, tile, n_tiles, W)
    # one step = SUB_N keys of a visited block (NSUB steps per block): smaller pipeline stages
    NSUB: tl.constexpr = BLOCK_N // SUB_N
    for it in range(0, cnt * NSUB):
        kb, j0, j, kv_ok = _plan_step(Union, u_base, it, jj, block_size, S, NSUB, SUB_N)  # j, kv_ok [SUB_N]
        k, v = _load_kv(K, V, (b.to(tl.int64) * S + j) * G + g, kv_ok, d, b * S + kb * block_size + j0,
                        g, TMA, D)  # [SUB_N, D] each
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)  # [BLOCK_M, SUB_N] unscaled
        hit = tl.max(tl.where(sel == kb, 1, 0), axis=1) > 0  # the row's token selected kb
        need = _step_needs_mask(hit, kb, j0, t_first, block_size, SKIP_MASK, SUB_N, BLOCK_N)
        if need:
            keep = hit[:, None] & (j[None, :] <= t[:, None]) & (j0 + jj < block_size)[None, :]
            s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1) * qk_scale2)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s * qk_scale2 - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new

    has = l_i > 0  # rows with no selected key (only from hand-made selections) give 0, lse -inf
    l_use = tl.where(has, l_i, 1.0)
    out = acc / l_use[:, None]
    lse = tl.where(has, (m_i + tl.log2(l_use)) * 0.6931471805599453, float("-inf"))
    tl.store(Out + q_row[:, None] * D + d[None, :], out.to(Out.dtype.element_ty), mask=row_ok[:, None])
    tl.store(Lse + q_row, lse, mask=row_ok)


def _kv_operands(k, v, sub_n: int, tma: bool):
    """K/V as the kernels take them: the tensors, or (tma) tensor descriptors over the
    [B * S, G * D] view with [sub_n, D] boxes. Keys past S inside a batch read the next batch's
    rows (past B * S: zeros); the kernels mask those keys (j < S) before they count."""
    if not tma:
        return k, v
    from triton.tools.tensor_descriptor import TensorDescriptor

    B, S, G, D = k.shape
    return tuple(TensorDescriptor.from_tensor(x.view(B * S, G * D), [sub_n, D]) for x in (k, v))


# Triton versions whose Gluon (an experimental API that changes between releases) the sm90
# kernels were written and tested against
_GLUON_TRITON = ("3.6.",)


@functools.cache
def _gluon(capability_major: int):
    """model.msa.gluon_kernels on Hopper (capability 9) with a Triton whose Gluon they were tested
    against, else None: the Triton kernels run (with a warning where an sm90 GPU could have
    used the Gluon ones)."""
    if capability_major != 9:
        return None
    if not triton.__version__.startswith(_GLUON_TRITON):
        warnings.warn(f"MSA: the sm90 Gluon kernels are tested with triton {'/'.join(_GLUON_TRITON)}x only, "
                      f"not {triton.__version__}; using the Triton kernels", stacklevel=3)
        return None
    try:
        from model.msa import gluon_kernels
    except (ImportError, AttributeError) as e:
        warnings.warn(f"MSA: the sm90 Gluon kernels do not import with triton {triton.__version__} ({e}); "
                      "using the Triton kernels", stacklevel=3)
        return None
    return gluon_kernels


def _gluon_for(x: torch.Tensor):
    """`_gluon` for the device of x (None on CPU)."""
    return _gluon(torch.cuda.get_device_capability(x.device)[0]) if x.is_cuda else None


def _attn_fwd(q, k, v, sel32, plan: Plan, block_size: int, scale: float, cfg: AttnConfig):
    """Launcher: q [B, S, Hq, D], k/v [B, S, G, D] -> out [B, S, Hq, D], lse [B, S, Hq] fp32."""
    B, S, Hq, D = q.shape
    G = k.shape[2]
    K = sel32.shape[-1]
    gluon_kernels = _gluon_for(q) if cfg.fwd_gluon and plan.block_m == 128 else None
    if gluon_kernels is not None and gluon_kernels.supported(q, block_size):
        return gluon_kernels.attn_fwd(q, k, v, sel32, plan.union, plan.count, plan.n_tiles, plan.block_m,
                                      block_size, scale * LOG2E)
    out = torch.empty_like(q)
    lse = torch.empty(B, S, Hq, dtype=torch.float32, device=q.device)
    BN = _pow2(block_size)
    sub_n = min(cfg.fwd_sub_n, BN)
    kd, vd = _kv_operands(k, v, sub_n, cfg.fwd_tma)
    grid = (plan.n_tiles, B * G)
    _msa_attn_fwd_kernel[grid](
        q, kd, vd, sel32, plan.union, plan.count, out, lse,
        S, block_size, plan.n_tiles, plan.union.shape[-1], scale * LOG2E,
        G=G, HPG=Hq // G, D=D, TOPK=K, TOPK_P2=_pow2(K, 1),
        BLOCK_M=plan.block_m, BLOCK_N=BN, SUB_N=sub_n, DOT_PREC=_dot_precision(q.dtype),
        SKIP_MASK=cfg.skip_mask, TMA=cfg.fwd_tma,
        num_warps=cfg.fwd_warps, num_stages=cfg.fwd_stages,
    )
    return out, lse


# --------------------------------------------------------------------------------------------
# Sparse attention backward
# --------------------------------------------------------------------------------------------


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
    dK32, dV32,  # [B, S, G, D] fp32 (written only when ATOMIC_KV)
    S, block_size, n_tiles, W, qk_scale2, sm_scale,
    G: tl.constexpr, HPG: tl.constexpr, D: tl.constexpr, TOPK: tl.constexpr, TOPK_P2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SUB_N: tl.constexpr, DOT_PREC: tl.constexpr,
    ATOMIC_KV: tl.constexpr, SKIP_MASK: tl.constexpr, TMA: tl.constexpr,
):
    tile, bg, b, g, t_first, n, row_ok, t, d, q_row, q, kk, sel = _row_tile(
        Q, Sel, S, G, HPG, D, TOPK, TOPK_P2, BLOCK_M)
    do = tl.load(dO + q_row[:, None] * D + d[None, :], mask=row_ok[:, None], other=0.0)
    lse2 = tl.load(Lse + q_row, mask=row_ok, other=0.0) * 1.4426950408889634  # [BLOCK_M]
    delta = tl.load(Delta + q_row, mask=row_ok, other=0.0)

    dq = tl.zeros([BLOCK_M, D], tl.float32)
    jj = tl.arange(0, SUB_N)
    u_base, cnt = _plan_row(Count, bg, tile, n_tiles, W)
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


@triton.jit
def _msa_attn_bwd_dkdv_kernel(
    Q, K, V, dO, Sel, Lse, Delta,
    Tiles, ItemKey, ItemStart, ItemEnd,  # KV-outer work list (see _kv_items)
    dK32, dV32,  # [B, S, G, D] fp32, accumulated with one add per program
    S, block_size, n_blocks, qk_scale2, sm_scale,
    G: tl.constexpr, HPG: tl.constexpr, D: tl.constexpr, TOPK: tl.constexpr, TOPK_P2: tl.constexpr,
    BLOCK_M: tl.constexpr, SUB_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
):
    item = tl.program_id(0)
    key = tl.load(ItemKey + item)
    start = tl.load(ItemStart + item)
    end = tl.load(ItemEnd + item)
    bg = key // n_blocks
    kb = key % n_blocks
    b = bg // G
    g = bg % G
    d = tl.arange(0, D)
    jj = tl.arange(0, BLOCK_N)
    j = kb * block_size + jj
    kv_ok = (jj < block_size) & (j < S)
    kv_row = (b.to(tl.int64) * S + j) * G + g
    k = tl.load(K + kv_row[:, None] * D + d[None, :], mask=kv_ok[:, None], other=0.0)  # [BLOCK_N, D]
    v = tl.load(V + kv_row[:, None] * D + d[None, :], mask=kv_ok[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, D], tl.float32)
    dv = tl.zeros([BLOCK_N, D], tl.float32)
    kk = tl.arange(0, TOPK_P2)
    mm = tl.arange(0, SUB_M)
    for i in range(start, end):
        tile = tl.load(Tiles + i)
        for m0 in tl.static_range(0, BLOCK_M, SUB_M):
            n = tile * BLOCK_M + m0 + mm  # [SUB_M]
            row_ok = n < S * HPG
            t = n // HPG
            h = g * HPG + n % HPG
            q_row = (b.to(tl.int64) * S + t) * (G * HPG) + h
            q = tl.load(Q + q_row[:, None] * D + d[None, :], mask=row_ok[:, None], other=0.0)  # [SUB_M, D]
            do = tl.load(dO + q_row[:, None] * D + d[None, :], mask=row_ok[:, None], other=0.0)
            lse2 = tl.load(Lse + q_row, mask=row_ok, other=0.0) * 1.4426950408889634
            delta = tl.load(Delta + q_row, mask=row_ok, other=0.0)
            sel = tl.load(Sel + ((bg.to(tl.int64) * S + t) * TOPK)[:, None] + kk[None, :],
                          mask=row_ok[:, None] & (kk[None, :] < TOPK), other=-1)
            hit = tl.max(tl.where(sel == kb, 1, 0), axis=1) > 0
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale2  # [SUB_M, BLOCK_N]
            keep = hit[:, None] & (j[None, :] <= t[:, None]) & kv_ok[None, :]
            p = tl.where(keep, tl.exp2(s - lse2[:, None]), 0.0)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PREC)
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)  # [SUB_M, BLOCK_N]
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PREC)
    ptr = kv_row[:, None] * D + d[None, :]
    tl.atomic_add(dK32 + ptr, dk * sm_scale, mask=kv_ok[:, None], sem="relaxed")
    tl.atomic_add(dV32 + ptr, dv, mask=kv_ok[:, None], sem="relaxed")


def _attn_bwd(dout, dlse, q, k, v, out, lse, sel32, plan: Plan, block_size, scale, cfg: AttnConfig):
    """Launcher: -> dq [B, S, Hq, D], dk, dv [B, S, G, D]."""
    B, S, Hq, D = q.shape
    G = k.shape[2]
    K = sel32.shape[-1]
    hpg = Hq // G
    BN = _pow2(block_size)
    dout = dout.contiguous()
    dlse = dlse.contiguous() if dlse is not None else None
    dq = torch.empty_like(q)
    dk32 = torch.zeros(B, S, G, D, dtype=torch.float32, device=q.device)
    dv32 = torch.zeros_like(dk32)
    gluon_kernels = _gluon_for(q) if cfg.bwd_gluon and not cfg.kv_outer and plan.block_m == 128 else None
    if gluon_kernels is not None and gluon_kernels.bwd_supported(q, block_size):
        # delta is formed inside the kernel, from the dout rows it loads anyway
        gluon_kernels.attn_bwd_dq(q, k, v, out, dout, dlse, sel32, plan.union, plan.count, plan.n_tiles,
                                  plan.block_m, block_size, lse, dq, dk32, dv32, scale * LOG2E, scale)
        return dq, dk32.to(k.dtype), dv32.to(v.dtype)
    R = B * S * Hq
    delta = torch.empty(B, S, Hq, dtype=torch.float32, device=q.device)
    _msa_bwd_delta_kernel[(triton.cdiv(R, 64),)](
        out, dout, dlse if dlse is not None else delta, delta, R,
        D=D, BLOCK_R=64, HAS_DLSE=dlse is not None, num_warps=4,
    )
    prec = _dot_precision(q.dtype)
    common = dict(G=G, HPG=hpg, D=D, TOPK=K, TOPK_P2=_pow2(K, 1), BLOCK_M=plan.block_m, DOT_PREC=prec)
    sub_n = min(cfg.dq_sub_n, BN)
    kd, vd = _kv_operands(k, v, sub_n, cfg.dq_tma)
    _msa_attn_bwd_dq_kernel[(plan.n_tiles, B * G)](
        q, kd, vd, dout, sel32, plan.union, plan.count, lse, delta, dq, dk32, dv32,
        S, block_size, plan.n_tiles, plan.union.shape[-1], scale * LOG2E, scale,
        BLOCK_N=BN, SUB_N=sub_n, ATOMIC_KV=not cfg.kv_outer, SKIP_MASK=cfg.dq_skip_mask,
        TMA=cfg.dq_tma,
        num_warps=cfg.dq_warps, num_stages=cfg.dq_stages, **common,
    )
    if cfg.kv_outer:
        n_blocks = triton.cdiv(S, block_size)
        tiles, item_key, start, end = _kv_items(plan, n_blocks, cfg.dkdv_chunk)
        if item_key.numel() > 0:
            _msa_attn_bwd_dkdv_kernel[(item_key.numel(),)](
                q, k, v, dout, sel32, lse, delta, tiles, item_key, start, end, dk32, dv32,
                S, block_size, n_blocks, scale * LOG2E, scale,
                SUB_M=min(cfg.dkdv_sub_m, plan.block_m), BLOCK_N=BN,
                num_warps=cfg.dkdv_warps, num_stages=cfg.dkdv_stages, **common,
            )
    return dq, dk32.to(k.dtype), dv32.to(v.dtype)


# --------------------------------------------------------------------------------------------
# autograd.Function and entry point
# --------------------------------------------------------------------------------------------


class _MSAAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, block_indices, block_size, scale, cfg):
        B, S, Hq, D = q.shape
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        sel32 = block_indices.to(torch.int32).contiguous()  # [B, G, S, K]
        plan = _build_plan(sel32, S, Hq // k.shape[2], cfg.block_m, block_size)
        out, lse = _attn_fwd(q, k, v, sel32, plan, block_size, scale, cfg)
        ctx.save_for_backward(q, k, v, out, lse, sel32, plan.union, plan.count)
        ctx.meta = (block_size, scale, cfg, plan.block_m, plan.n_tiles)
        ctx.set_materialize_grads(False)  # an unused lse passes dlse=None, not zeros
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, sel32, union, count = ctx.saved_tensors
        block_size, scale, cfg, block_m, n_tiles = ctx.meta
        plan = Plan(block_m, n_tiles, union, count)
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv = _attn_bwd(dout, dlse, q, k, v, out, lse, sel32, plan, block_size, scale, cfg)
        return dq, dk, dv, None, None, None, None


def _config_for(device: torch.device, dtype: torch.dtype) -> AttnConfig:
    if device.type != "cuda":
        return _CPU_CONFIG
    return _CUDA_FP32_CONFIG if dtype == torch.float32 else AttnConfig()


def triton_msa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         block_indices: torch.Tensor, block_size: int,
                         softmax_scale: float | None = None, return_lse: bool = False,
                         config: AttnConfig | None = None):
    """Exact attention of each query over the keys of its token's selected blocks (j <= t).

    Args:
        q: [B, S, Hq, D]; k, v: [B, S, G, D]; head h reads group g = h // (Hq // G).
        block_indices: [B, G, S, K] integer block ids per (token, group), -1 = unused slot.
        block_size: keys per block; softmax_scale: None -> D ** -0.5.
        return_lse: also return the log-sum-exp of the scaled scores.
        config: tile sizes (benchmarks only); None -> the default for the device.

    Returns:
        out [B, S, Hq, D] in q's dtype, and lse [B, S, Hq] fp32 when return_lse. Differentiable
        in q, k, v (and through lse). A row with no selected key gives out 0, lse -inf.
    """
    B, S, Hq, D = q.shape
    G = k.shape[2]
    if Hq % G != 0:
        raise ValueError(f"query heads {Hq} must be a multiple of the KV heads {G}")
    if D not in (16, 32, 64, 128, 256):
        raise ValueError(f"head dim {D} not supported by the Triton kernels (16, 32, 64, 128, 256)")
    if block_indices.shape[:3] != (B, G, S):
        raise ValueError(f"block_indices has shape {tuple(block_indices.shape)}; expected {(B, G, S)} + (K,)")
    scale = D**-0.5 if softmax_scale is None else float(softmax_scale)
    cfg = config or _config_for(q.device, q.dtype)
    out, lse = _MSAAttention.apply(q, k, v, block_indices, block_size, scale, cfg)
    return (out, lse) if return_lse else out


# --------------------------------------------------------------------------------------------
# Indexer-loss terms: attention mass per selected block, index block scores of the selected blocks
# --------------------------------------------------------------------------------------------


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
    tile, bg, b, g, t_first, n, row_ok, t, d, q_row, q, kk, sel = _row_tile(
        Q, Sel, S, G, HPG, D, TOPK, TOPK_P2, BLOCK_M)
    lse2 = tl.load(Lse + q_row, mask=row_ok, other=0.0) * 1.4426950408889634  # [BLOCK_M] log2 units

    mass = tl.zeros([BLOCK_M, TOPK_P2], tl.float32)
    jj = tl.arange(0, SUB_N)
    u_base, cnt = _plan_row(Count, bg, tile, n_tiles, W)
    NSUB: tl.constexpr = BLOCK_N // SUB_N
    for it in range(0, cnt * NSUB):
        kb, j0, j, kv_ok = _plan_step(Union, u_base, it, jj, block_size, S, NSUB, SUB_N)  # j, kv_ok [SUB_N]
        k = tl.load(K + ((b.to(tl.int64) * S + j) * G + g)[:, None] * D + d[None, :],
                    mask=kv_ok[:, None], other=0.0)  # [SUB_N, D]
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)  # [BLOCK_M, SUB_N] unscaled
        p = tl.exp2(s * qk_scale2 - lse2[:, None])
        is_kb = sel == kb  # [BLOCK_M, TOPK_P2]
        hit = tl.max(is_kb.to(tl.int32), axis=1) > 0
        need = _step_needs_mask(hit, kb, j0, t_first, block_size, SKIP_MASK, SUB_N, BLOCK_N)
        if need:
            keep = hit[:, None] & (j[None, :] <= t[:, None]) & kv_ok[None, :]
            p = tl.where(keep, p, 0.0)
        mass += tl.where(is_kb, tl.sum(p, axis=1)[:, None], 0.0)
    o_row = (bg.to(tl.int64) * S * HPG + n) * TOPK
    tl.store(Mass + o_row[:, None] + kk[None, :], mass, mask=row_ok[:, None] & (kk[None, :] < TOPK))


def _block_mass(q, k, lse, sel32, block_size: int, scale: float, cfg: AttnConfig) -> torch.Tensor:
    """Launcher: q [B, S, Hq, D], k [B, S, G, D], lse [B, S, Hq] -> per-head mass [B, G, S, HPG, K] fp32."""
    B, S, Hq, D = q.shape
    G = k.shape[2]
    K = sel32.shape[-1]
    hpg = Hq // G
    plan = _build_plan(sel32, S, hpg, cfg.block_m, block_size)
    mass = torch.empty(B, G, S, hpg, K, dtype=torch.float32, device=q.device)
    BN = _pow2(block_size)
    _msa_block_mass_kernel[(plan.n_tiles, B * G)](
        q, k, sel32, plan.union, plan.count, lse, mass,
        S, block_size, plan.n_tiles, plan.union.shape[-1], scale * LOG2E,
        G=G, HPG=hpg, D=D, TOPK=K, TOPK_P2=_pow2(K, 1),
        BLOCK_M=plan.block_m, BLOCK_N=BN, SUB_N=min(cfg.fwd_sub_n, BN), DOT_PREC=_dot_precision(q.dtype),
        SKIP_MASK=cfg.skip_mask, num_warps=cfg.fwd_warps, num_stages=cfg.fwd_stages,
    )
    return mass


def triton_attention_block_mass(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor,
                                block_indices: torch.Tensor, block_size: int, softmax_scale: float,
                                config: AttnConfig | None = None) -> torch.Tensor:
    """p_main of the indexer loss (no gradient), `reference.attention_block_mass` with q_offset 0.

    Args:
        q: [B, S, Hq, D]; k: [B, S, G, D]; lse: [B, S, Hq] fp32 of `triton_msa_attention` on the
            same inputs; block_indices: [B, G, S, K], -1 = unused slot.

    Returns:
        fp32 [B, G, S, K]: per slot the sum over the block's keys j <= t of
        exp(scale * q.k_j - lse), averaged over the group's heads, renormalised over the slots.
    """
    D = q.shape[-1]
    if D not in (16, 32, 64, 128, 256):
        raise ValueError(f"head dim {D} not supported by the Triton kernels (16, 32, 64, 128, 256)")
    cfg = config or _config_for(q.device, q.dtype)
    with torch.no_grad():
        sel32 = block_indices.to(torch.int32).contiguous()
        mass = _block_mass(q.contiguous(), k.contiguous(), lse.float().contiguous(), sel32, block_size,
                           float(softmax_scale), cfg)  # [B, G, S, HPG, K]
        return _renormalise(mass.mean(3))


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
    # key order and only a strictly larger max replaces: ties keep the lowest position.
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
    u_base, cnt = _plan_row(Count, bg, tile, n_tiles, W)
    NSUB: tl.constexpr = BLOCK_N // SUB_N
    for it in range(0, cnt * NSUB):
        kb = tl.load(Union + u_base + it // NSUB)
        j0 = (it % NSUB) * SUB_N
        j = kb * block_size + j0 + jj  # [SUB_N]
        kv_ok = (j0 + jj < block_size) & (j < SK)
        k = tl.load(IK + (b.to(tl.int64) * SK + j)[:, None] * DI + d[None, :],
                    mask=kv_ok[:, None], other=0.0)  # [SUB_N, DI]
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)  # [BLOCK_T, SUB_N] fp32
        s = tl.where((j[None, :] <= t[:, None]) & kv_ok[None, :], s, float("-inf"))
        m = tl.max(s, axis=1)  # [BLOCK_T]
        pos = tl.min(tl.where(s == m[:, None], j[None, :], 1 << 30), axis=1)
        upd = (sel == kb) & (m[:, None] > best)
        best = tl.where(upd, m[:, None], best)
        arg = tl.where(upd, pos[:, None], arg)
    ok = t_ok[:, None] & (kk[None, :] < TOPK)
    tl.store(Score + s_row[:, None] + kk[None, :], best, mask=ok)
    tl.store(Arg + s_row[:, None] + kk[None, :], arg.to(tl.int64), mask=ok)


def _block_scores(index_q, index_k, sel32, block_size: int, q_offset: int):
    """Launcher: -> scores fp32 and argmax key positions int64 (-1: none), both [B, G, S, K]."""
    B, S, G, _ = index_q.shape
    K = sel32.shape[-1]
    iq, ik = _index_operands(index_q, index_k)
    tile = _select_tile(iq)
    plan = _build_plan(sel32, S, 1, tile["block_t"], block_size, q_offset)
    scores = torch.empty(B, G, S, K, dtype=torch.float32, device=iq.device)
    argmax = torch.empty(B, G, S, K, dtype=torch.int64, device=iq.device)
    BN = _pow2(block_size)
    _msa_block_scores_kernel[(plan.n_tiles, B * G)](
        iq, ik, sel32, plan.union, plan.count, scores, argmax,
        S, q_offset, block_size, plan.n_tiles, plan.union.shape[-1],
        G=G, DI=iq.shape[-1], TOPK=K, TOPK_P2=_pow2(K, 1), BLOCK_T=plan.block_m, BLOCK_N=BN,
        SUB_N=min(tile["sub_n"], BN), DOT_PREC=_dot_precision(iq.dtype),
        num_warps=tile["num_warps"], num_stages=tile["num_stages"],
    )
    return scores, argmax


@triton.jit
def _msa_block_scores_bwd_kernel(IQ, IK, ARGMAX, DS, DIQ, DIK, S, SK, G: tl.constexpr, DI: tl.constexpr,
                                 TOPK: tl.constexpr, BLOCK_T: tl.constexpr):
    """Each score's gradient to its argmax key (the reference's `_BlockMaxScores.backward`) for
    BLOCK_T tokens of one (b, g): d index_q[t, g] = sum_k ds * index_k[argmax], and
    d index_k[argmax] += ds * index_q[t, g] (fp32 atomics: many queries share an argmax key)."""
    tile = tl.program_id(0)
    bg = tl.program_id(1)
    b = bg // G
    g = bg % G
    t = tile * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < S
    d = tl.arange(0, DI)
    row = (b * S + t).to(tl.int64)  # token rows of [B * S, G, DI]
    iq = tl.load(IQ + (row * G + g)[:, None] * DI + d[None, :], mask=t_ok[:, None], other=0.0).to(tl.float32)
    diq = tl.zeros([BLOCK_T, DI], tl.float32)
    slot = (bg.to(tl.int64) * S + t) * TOPK  # [B, G, S, K] rows
    for k in range(TOPK):
        pos = tl.load(ARGMAX + slot + k, mask=t_ok, other=-1)
        hit = t_ok & (pos >= 0)
        w = tl.where(hit, tl.load(DS + slot + k, mask=hit, other=0.0), 0.0)
        key_row = b.to(tl.int64) * SK + tl.maximum(pos, 0)
        keys = tl.load(IK + key_row[:, None] * DI + d[None, :], mask=hit[:, None], other=0.0).to(tl.float32)
        diq += w[:, None] * keys
        tl.atomic_add(DIK + key_row[:, None] * DI + d[None, :], w[:, None] * iq, mask=hit[:, None], sem="relaxed")
    tl.store(DIQ + (row * G + g)[:, None] * DI + d[None, :], diq.to(DIQ.dtype.element_ty), mask=t_ok[:, None])


class _BlockScores(torch.autograd.Function):
    """Forward and backward by kernels. The backward sends each score's gradient to its one
    argmax key, like the reference's `_BlockMaxScores.backward`, from the saved (index_q,
    index_k, argmax)."""

    @staticmethod
    def forward(ctx, index_q, index_k, block_indices, block_size, q_offset):
        sel32 = block_indices.to(torch.int32).contiguous()
        scores, argmax = _block_scores(index_q, index_k, sel32, block_size, q_offset)
        ctx.save_for_backward(index_q, index_k, argmax)
        return scores

    @staticmethod
    def backward(ctx, d_scores):
        index_q, index_k, argmax = ctx.saved_tensors
        B, S, G, Di = index_q.shape
        Sk, K = index_k.shape[1], argmax.shape[-1]
        if Di & (Di - 1):  # the kernel's tiles are powers of two wide
            return _BlockMaxScores.backward(ctx, d_scores)
        iq, ik = index_q.contiguous(), index_k.contiguous()
        d_iq = torch.empty_like(iq)
        d_ik = torch.zeros(B, Sk, Di, dtype=torch.float32, device=ik.device)
        block_t = 32
        if B * S:
            _msa_block_scores_bwd_kernel[(triton.cdiv(S, block_t), B * G)](
                iq, ik, argmax.contiguous(), d_scores.float().contiguous(), d_iq, d_ik, S, Sk,
                G=G, DI=Di, TOPK=K, BLOCK_T=block_t, num_warps=4,
            )
        return d_iq, d_ik.to(index_k.dtype), None, None, None


def triton_msa_block_scores(index_q: torch.Tensor, index_k: torch.Tensor, block_indices: torch.Tensor,
                            block_size: int, q_offset: int = 0) -> torch.Tensor:
    """Index block scores of the selected blocks (`reference.msa_block_scores`).

    Args:
        index_q: [B, S, G, Di]; index_k: [B, q_offset + S, Di]; block_indices: [B, G, S, K]
            global block ids, -1 = unused; query row i is token q_offset + i.

    Returns:
        fp32 [B, G, S, K]: max over the block's keys j <= t of index_q[t, g] . index_k[j]
        (fp32 accumulation), -inf at -1 slots and at blocks with no such key. Differentiable in
        index_q and index_k: the gradient goes to the lowest-position argmax key.
    """
    return _BlockScores.apply(index_q, index_k, block_indices, block_size, q_offset)
