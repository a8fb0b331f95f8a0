"""The plan of the query-outer MSA kernels: per row tile, the union of the key blocks its tokens
selected, and the @triton.jit helpers by which the attention, dq and block-mass kernels walk it.

Attention is query-outer over "row tiles": the (token, head) pairs of one group are flattened
(row n = t * HPG + hh), so a tile of BLOCK_M = 128 rows holds ~21 tokens x 6 heads and fills the
tensor-core M dimension without padding the 6 heads to 8 or 16. The tile visits the union of
its tokens' selected blocks (the plan, built once per forward by `_msa_plan_kernel`, which
takes a tile's distinct ids smallest first); each row keeps only the keys of blocks its own
token selected (j <= t), so results are exact per token. Neighbouring tokens select nearly the
same blocks, so the union is close to K. The block scores build a plan of one row per token
(HPG 1) with the query offset of context parallelism.

The helpers (`row_tile`, `plan_row`, `plan_step`, `step_needs_mask`) are inlined by the
compiler into each kernel that calls them.

Legend: B batch, S tokens, G KV heads (= GQA groups), Hq query heads, HPG = Hq // G query heads
per group, D head dim, K = TOPK selected blocks per token, bs block size, T = n_tiles row tiles
per group, W = (cdiv(BLOCK_M, HPG) + 1) * K plan width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from model.msa.ops.common import pow2


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
    # reductions element by element: ~50 ms per program, +36 s on the interpreter tests.)
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


def build_plan(sel32: torch.Tensor, S: int, hpg: int, block_m: int, block_size: int, q_offset: int = 0) -> Plan:
    """Launcher: sel32 [B, G, S, K] int32 -> Plan with W = tt * K, tt = cdiv(block_m, hpg) + 1
    (`row_tile_plan` in tests/msa_oracles.py builds the same with torch ops). Query t sits at key
    position q_offset + t (block scores under context parallelism)."""
    B, G, _, K = sel32.shape
    n_tiles = triton.cdiv(S * hpg, block_m)
    width = ((block_m + hpg - 1) // hpg + 1) * K
    union = torch.zeros(B, G, n_tiles, width, dtype=torch.int32, device=sel32.device)
    count = torch.empty(B, G, n_tiles, dtype=torch.int32, device=sel32.device)
    tokens = (block_m + hpg - 2) // hpg + 1  # most tokens in one tile (block_m at hpg 1, not tt)
    # one warp: a step's min is one warp reduction (no barrier); 16 ids per thread at M2's shape
    _msa_plan_kernel[(n_tiles, B * G)](
        sel32, union, count, S, q_offset, block_size, n_tiles, width,
        HPG=hpg, TOPK=K, BLOCK_M=block_m, N_CAND=pow2(tokens * K, 1), num_warps=1,
    )
    return Plan(block_m, n_tiles, union, count)


@triton.jit
def plan_row(Count, bg, tile, n_tiles, W):
    """Where tile `tile` of (b, g) = bg finds its visited blocks in the plan: the offset of its
    row of Union, and how many of them there are."""
    return (bg.to(tl.int64) * n_tiles + tile) * W, tl.load(Count + bg * n_tiles + tile)


@triton.jit
def plan_step(Union, u_base, it, jj, block_size, S, NSUB: tl.constexpr, SUB_N: tl.constexpr):
    """Step `it` of a row tile's walk over its plan (NSUB steps of SUB_N keys per block): the
    block kb, the step's first key offset j0 in it, its keys j [SUB_N] and which are real keys."""
    kb = tl.load(Union + u_base + it // NSUB)
    j0 = (it % NSUB) * SUB_N
    j = kb * block_size + j0 + jj
    kv_ok = (j0 + jj < block_size) & (j < S)
    return kb, j0, j, kv_ok


@triton.jit
def step_needs_mask(hit, kb, j0, t_first, block_size, SKIP_MASK: tl.constexpr, SUB_N: tl.constexpr,
                    BLOCK_N: tl.constexpr):
    """Whether a step needs the per-element mask (CUDA-core work per element): not where every
    row selected the block (hit [BLOCK_M]) and every key precedes the tile's first token."""
    need = True
    if SKIP_MASK:
        need = (tl.min(hit.to(tl.int32), axis=0) == 0) \
            | (kb * block_size + j0 + SUB_N - 1 > t_first) | (block_size != BLOCK_N)
    return need


@triton.jit
def row_tile(Q, Sel, S, G: tl.constexpr, HPG: tl.constexpr, D: tl.constexpr, TOPK: tl.constexpr,
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

