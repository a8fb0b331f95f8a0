"""Brute-force oracles of the MSA tests (and of bench/msa.py's check), plain PyTorch: S x S masks
and attention, and the attention kernels' plan in torch ops. Nothing here is for production:
model/msa/reference.py is the chunked CPU path.

Legend: B batch, S tokens, Hq query heads, G GQA groups, hpg = Hq // G heads per group, D head
dim, K top-k slots, bs block size, nb = ceil(S / bs) key blocks.
"""

from __future__ import annotations

import math

import torch


def dense_reference(q, k, v, block_indices, block_size, scale):
    """fp64 dense attention with mask[b, g, t, j] = (j <= t) and block j // bs in the token's
    selection. q [B, S, Hq, D], k/v [B, S, G, D] -> out [B, S, Hq, D], lse [B, S, Hq]."""
    B, S, Hq, D = q.shape
    G = k.shape[2]
    hpg = Hq // G
    blk = torch.arange(S, device=q.device) // block_size
    sel = block_indices.to(q.device)
    mask = (sel[..., None] == blk).any(3)  # [B, G, S, S]
    mask &= torch.ones(S, S, dtype=torch.bool, device=q.device).tril()
    mask = mask.repeat_interleave(hpg, dim=1)  # [B, Hq, S, S]
    qh = q.double().transpose(1, 2)
    kh = k.double().repeat_interleave(hpg, dim=2).transpose(1, 2)
    vh = v.double().repeat_interleave(hpg, dim=2).transpose(1, 2)
    s = (qh @ kh.transpose(-1, -2)) * scale
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, -1)  # [B, Hq, S]
    p = torch.where(mask, torch.exp(s - lse[..., None]), 0.0)
    out = (p @ vh).transpose(1, 2)
    return out, lse.transpose(1, 2)


def selection_mask(block_indices: torch.Tensor, seq_len: int, block_size: int) -> torch.Tensor:
    """bool [B, G, S, S]: key j is attended by token t (j's block is selected and j <= t)."""
    B, G, S, K = block_indices.shape
    assert S == seq_len, (S, seq_len)
    nb = math.ceil(S / block_size)
    picked = torch.zeros(B, G, S, nb + 1, dtype=torch.bool, device=block_indices.device)
    picked.scatter_(-1, torch.where(block_indices < 0, nb, block_indices).long(), True)  # -1: spare column
    key_blk = torch.arange(S, device=block_indices.device) // block_size
    causal = torch.ones(S, S, dtype=torch.bool, device=block_indices.device).tril()
    return picked[..., key_blk] & causal


def row_tile_plan(block_indices: torch.Tensor, seq_len: int, hpg: int, block_m: int, block_size: int,
                  q_offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention kernels' plan (`model.msa.ops.plan.build_plan`), in torch ops.

    Row tile i of group g holds the flattened (token, head) rows n = t * hpg + hh in
    [i * block_m, (i + 1) * block_m), T = cdiv(seq_len * hpg, block_m) tiles; query t sits at key
    position q_offset + t. block_indices [B, G, S, K] int32 -> union [B, G, T, W] int32 with
    W = tt * K, tt = cdiv(block_m, hpg) + 1: the ascending distinct block ids the tile's tokens
    selected, -1 slots and blocks after the tile's last token's own block dropped, then zeros;
    count [B, G, T] int32: how many ids each row holds.
    """
    B, G, _, K = block_indices.shape
    dev = block_indices.device
    n_tiles = (seq_len * hpg + block_m - 1) // block_m
    tt = (block_m + hpg - 1) // hpg + 1  # most tokens a tile can touch
    n0 = torch.arange(n_tiles, device=dev) * block_m
    t_lo = n0 // hpg
    t_hi = torch.clamp((n0 + block_m - 1) // hpg, max=seq_len - 1)
    tok = torch.minimum(t_lo[:, None] + torch.arange(tt, device=dev)[None, :], t_hi[:, None])
    cand = block_indices[:, :, tok, :].reshape(B, G, n_tiles, tt * K)  # [B, G, T, tt*K]
    # a block after the tile's last token's own block has no key j <= t for any of its rows
    last = ((t_hi + q_offset) // block_size).to(torch.int32)[None, None, :, None]
    big = torch.iinfo(torch.int32).max
    cand = torch.where((cand < 0) | (cand > last), big, cand)
    srt = cand.sort(dim=-1).values
    first = torch.ones_like(srt, dtype=torch.bool)
    first[..., 1:] = srt[..., 1:] != srt[..., :-1]
    first &= srt != big
    count = first.sum(-1, dtype=torch.int32)
    width = tt * K
    pos = torch.where(first, first.cumsum(-1) - 1, width)  # later copies go to a spare column
    union = torch.zeros(B, G, n_tiles, width + 1, dtype=torch.int32, device=dev)
    union.scatter_(-1, pos, srt)
    return union[..., :width].contiguous(), count


def dense_masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor, softmax_scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention with an explicit [B, G, S, S] key mask, S x S memory.

    q [B, S, Hq, D], k and v [B, S, G, D] -> out [B, S, Hq, D], lse [B, S, Hq], in the inputs' dtype.
    """
    B, S, Hq, D = q.shape
    G = k.shape[2]
    scale = D**-0.5 if softmax_scale is None else softmax_scale
    q_g = q.view(B, S, G, Hq // G, D).permute(0, 2, 3, 1, 4)  # [B, G, hpg, S, D]
    logits = torch.einsum("bghtd,bjgd->bghtj", q_g, k) * scale
    logits = logits.masked_fill(~keep[:, :, None], -math.inf)
    lse = logits.logsumexp(-1)  # [B, G, hpg, S]
    out = torch.einsum("bghtj,bjgd->bghtd", torch.softmax(logits, -1), v)
    # [B, G, hpg, S, ...] -> [B, S, Hq, ...]
    return out.permute(0, 3, 1, 2, 4).reshape(B, S, Hq, D), lse.permute(0, 3, 1, 2).reshape(B, S, Hq)
