"""Functional API of MSA (MiniMax sparse attention): what the layer calls, with the contracts.

Sparse mode, per layer:
    idx, scores = msa_select_with_scores(index_q, index_k, block_size=bs, topk=K)  # [B, G, S, K]
    out, lse, p_main = msa_attention_with_mass(q, k, v, idx, block_size=bs)        # p_main: no grad
    loss = indexer_kl_loss(p_main, scores, idx >= 0)
(`msa_select_with_scores` is `msa_select` then `msa_block_scores`; `msa_attention_with_mass` is
`msa_attention_with_lse` then `attention_block_mass`, in one pass where the kernels run.)
Dense warm-up (full attention elsewhere; the indexer learns the full distribution):
    p_main = dense_block_mass(q, k, block_size=bs)                             # [B, G, S, nb]
    scores = dense_block_scores(index_q, index_k, block_size=bs)               # [B, G, S, nb]
    loss = indexer_kl_loss(p_main, scores, dense_block_valid(S, bs, device))

`msa_select`, `msa_attention*`, the sparse indexer-loss terms `attention_block_mass` and
`msa_block_scores`, and `indexer_kl_loss` check their arguments here and run where
`model.msa.dispatch` sends them: the Triton kernels of model.msa.ops on CUDA (their sm90 Gluon
versions on Hopper), the chunked PyTorch reference (model.msa.reference) elsewhere and for what
the kernels do not compute (attention with 0 < q_offset < S, the block mass with a query offset,
the KL loss over rows of more than 4096 slots); `msa_backends` forces a
backend. The dense warm-up helpers are chunked PyTorch on any device.

Legend: B batch, S tokens, Hq query heads, G GQA groups (KV heads, index query heads), D head
dim, Di index head dim (128), K top-k slots, bs block size, nb = ceil(S / bs) key blocks.
Head h belongs to group h // (Hq // G).
"""

from __future__ import annotations

import torch

from model.msa import dispatch, reference


def msa_select(
    index_q: torch.Tensor, index_k: torch.Tensor, *, block_size: int, topk: int, local_blocks: int = 1,
    q_offset: int = 0,
) -> torch.Tensor:
    """Pick K key blocks per token and GQA group from the index branch (no gradient).

    Args:
        index_q: [B, S, G, Di] index queries, already normed and rotated; any float dtype.
        index_k: [B, S, Di] the shared index key, already normed and rotated.
        block_size: keys per block.
        topk: K, blocks per token and group, the local blocks included.
        local_blocks: the blocks t//bs - local_blocks + 1 .. t//bs (clipped at 0), always taken.
        q_offset: the queries are tokens q_offset .. q_offset + S - 1 of a longer sequence whose
            first q_offset + S index keys `index_k` holds ([B, q_offset + S, Di]); t below is
            the token's position in that sequence, block ids count from its start. Context
            parallelism selects this way.

    Returns:
        int64 [B, G, S, K]. Block score(t, g, b) = max over keys j <= t of block b of
        index_q[t, g] . index_k[j] in fp32 (no scale, no softmax). Besides the local blocks, the
        slots take the highest-scoring other blocks b <= t//bs, ties to the lower id. Each row
        lists its ids ascending, then -1 for unused slots (tokens with fewer than K valid blocks).
    """
    _check_select(index_q, index_k, block_size, topk, local_blocks, q_offset)
    return dispatch.select(index_q, index_k, block_size, topk, local_blocks, q_offset)


def msa_select_with_scores(
    index_q: torch.Tensor, index_k: torch.Tensor, *, block_size: int, topk: int, local_blocks: int = 1,
    q_offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`msa_select` and `msa_block_scores` of its blocks in one call: -> block ids [B, G, S, K]
    (no gradient) and their scores fp32 [B, G, S, K] (differentiable in index_q and index_k, as
    `msa_block_scores`)."""
    _check_select(index_q, index_k, block_size, topk, local_blocks, q_offset)
    return dispatch.select_with_scores(index_q, index_k, block_size, topk, local_blocks, q_offset)


def _check_select(index_q, index_k, block_size, topk, local_blocks, q_offset) -> None:
    B, S, G, Di = index_q.shape
    if index_k.shape != (B, q_offset + S, Di):
        raise ValueError(
            f"index_k has shape {tuple(index_k.shape)}; expected {(B, q_offset + S, Di)} (one shared key head)"
        )
    _check_blocks(block_size, topk, local_blocks)
    if q_offset < 0:
        raise ValueError(f"q_offset={q_offset} must be >= 0")


def msa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_indices: torch.Tensor,
    *,
    block_size: int,
    softmax_scale: float | None = None,
    q_offset: int = 0,
) -> torch.Tensor:
    """Sparse attention over the selected key blocks; differentiable in q, k, v.

    Args:
        q: [B, S, Hq, D].
        k, v: [B, S, G, D].
        block_indices: [B, G, S, K] block ids from `msa_select` (-1 = unused; no duplicates).
        block_size: keys per block.
        softmax_scale: defaults to 1 / sqrt(D).
        q_offset: query t sits at key position q_offset + t (keys at 0 .. S-1); q_offset >= S
            makes every key of a selected block visible (context parallelism, a shard of earlier
            keys). q_offset > 0 needs S % block_size == 0; the kernels run q_offset >= S (with the
            queries put after the keys), 0 < q_offset < S runs the PyTorch reference.

    Returns:
        [B, S, Hq, D] in q's dtype (accumulated in fp32): exact softmax attention of q(t, h) over
        the keys j <= t of the blocks its group g = h // (Hq // G) selected; equal to dense
        attention with a mask keeping exactly those keys. A token with no such key gets 0.
    """
    return _attention(q, k, v, block_indices, block_size, softmax_scale, q_offset, return_lse=False)


def msa_attention_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_indices: torch.Tensor,
    *,
    block_size: int,
    softmax_scale: float | None = None,
    q_offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`msa_attention`, plus lse [B, S, Hq] fp32: log-sum-exp of the scaled scores over the
    attended keys (-inf for a token with none). Differentiable through out and lse."""
    return _attention(q, k, v, block_indices, block_size, softmax_scale, q_offset, return_lse=True)


def msa_attention_with_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_indices: torch.Tensor,
    *,
    block_size: int,
    softmax_scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`msa_attention_with_lse` and `attention_block_mass` of its result in one call:
    -> out, lse (differentiable, as `msa_attention_with_lse`) and p_main [B, G, S, K] fp32 (no
    gradient, as `attention_block_mass`). The Triton attention forward computes p_main in the
    same pass (the block mass kernel's second read of q and k is saved)."""
    scale = _attention_scale(q, k, v, block_indices, block_size, softmax_scale, 0)
    return dispatch.attention_with_mass(q, k, v, block_indices, block_size, scale)


def msa_block_scores(
    index_q: torch.Tensor, index_k: torch.Tensor, block_indices: torch.Tensor, *, block_size: int,
    q_offset: int = 0,
) -> torch.Tensor:
    """Index block scores of the selected blocks, to train the index branch.

    Args:
        index_q: [B, S, G, Di]; index_k: [B, q_offset + S, Di]; block_indices: [B, G, S, K];
            q_offset as in `msa_select`.

    Returns:
        fp32 [B, G, S, K]: max over keys j <= t of the block of index_q[t, g] . index_k[j],
        -inf at -1 slots. Differentiable in index_q and index_k; the max passes its gradient to
        the one argmax key of each (t, block), so the gradient is sparse.
    """
    B, S, G, Di = index_q.shape
    if index_k.shape != (B, q_offset + S, Di):
        raise ValueError(f"index_k has shape {tuple(index_k.shape)}; expected {(B, q_offset + S, Di)}")
    _check_indices(block_indices, B, G, S)
    return dispatch.block_scores(index_q, index_k, block_indices, block_size, q_offset)


def attention_block_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    lse: torch.Tensor,
    block_indices: torch.Tensor,
    *,
    block_size: int,
    softmax_scale: float | None = None,
    q_offset: int = 0,
) -> torch.Tensor:
    """p_main of the sparse indexer loss: the attention mass per selected block (no gradient).

    Args:
        q: [B, S, Hq, D]; k: [B, S, G, D]; lse: [B, S, Hq] from `msa_attention_with_lse` on the
            same q, k, block_indices, scale and q_offset; block_indices: [B, G, S, K].

    Returns:
        fp32 [B, G, S, K]: for each selected block, sum over its keys j <= t of
        exp(scale * q.k_j - lse), averaged over the group's heads, then renormalised to sum 1
        over the slots of (t, g). 0 at -1 slots.
    """
    B, S, Hq, D = q.shape
    _check_qk(q, k)
    if lse.shape != (B, S, Hq):
        raise ValueError(f"lse has shape {tuple(lse.shape)}; expected {(B, S, Hq)}")
    _check_indices(block_indices, B, k.shape[2], S)
    _check_offset(q_offset, S, block_size)
    scale = D**-0.5 if softmax_scale is None else softmax_scale
    return dispatch.block_mass(q, k, lse, block_indices, block_size, scale, q_offset)


def dense_block_mass(
    q: torch.Tensor, k: torch.Tensor, *, block_size: int, softmax_scale: float | None = None,
    lse: torch.Tensor | None = None,
) -> torch.Tensor:
    """p_main of the dense warm-up: full causal attention mass per key block (no gradient).

    Args:
        q: [B, S, Hq, D]; k: [B, S, G, D].
        lse: optional [B, S, Hq] fp32 log-sum-exp of the attention's scaled scores (e.g. from
            `model.attention.causal_attention_with_lse`): saves one of the two passes over keys.

    Returns:
        fp32 [B, G, S, nb]: for every token, the softmax mass of its full causal attention that
        falls on each key block, averaged over the group's heads (rows sum to 1; 0 for blocks
        after the token's block). Chunked: never builds an S x S tensor.
    """
    _check_qk(q, k)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    if lse is not None and lse.shape != q.shape[:3]:
        raise ValueError(f"lse has shape {tuple(lse.shape)}; expected {tuple(q.shape[:3])}")
    return reference.dense_block_mass(q, k, block_size, scale, lse)


def dense_block_scores(index_q: torch.Tensor, index_k: torch.Tensor, *, block_size: int) -> torch.Tensor:
    """Index block scores of every key block, for the dense warm-up; differentiable.

    Args:
        index_q: [B, S, G, Di]; index_k: [B, S, Di].

    Returns:
        fp32 [B, G, S, nb]: max over keys j <= t of block b of index_q[t, g] . index_k[j];
        -inf for blocks after t's block. Chunked: never builds an S x S tensor.
    """
    B, S, G, Di = index_q.shape
    if index_k.shape != (B, S, Di):
        raise ValueError(f"index_k has shape {tuple(index_k.shape)}; expected {(B, S, Di)}")
    return reference.dense_block_scores(index_q, index_k, block_size)


def dense_block_valid(seq_len: int, block_size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """bool [S, nb]: which blocks each token may attend (b <= t // bs); the dense-mode `valid`."""
    return reference.dense_block_valid(seq_len, block_size, device)


def indexer_kl_loss(p_main: torch.Tensor, index_scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Indexer loss: KL(p_main || p_index), averaged over the rows (b, g, t).

    Args:
        p_main: [B, G, S, K] target distribution (`attention_block_mass` or `dense_block_mass`);
            detached here.
        index_scores: [B, G, S, K] fp32 (`msa_block_scores` or `dense_block_scores`); the only
            input that receives a gradient.
        valid: which slots count. Either the int64 block_indices [B, G, S, K] of the sparse mode
            (valid = id >= 0), or a bool mask broadcastable to [B, G, S, K], e.g.
            `dense_block_valid(S, bs)` in the dense warm-up.

    Returns:
        Scalar fp32: sum over rows of sum_slots p_main * (log p_main - log p_index), divided by
        the number of rows B * G * S (every real row has at least one valid slot). p_index is the
        softmax of index_scores over the valid slots; slots with p_main = 0 contribute 0.
    """
    if p_main.shape != index_scores.shape:
        raise ValueError(f"p_main {tuple(p_main.shape)} and index_scores {tuple(index_scores.shape)} differ")
    if valid.dtype != torch.bool:
        if valid.is_floating_point():
            raise ValueError("valid must be a bool mask or the integer block_indices")
        valid = valid >= 0
    return dispatch.indexer_kl_loss(p_main, index_scores, valid)


def selection_recall(p_dense: torch.Tensor, block_indices: torch.Tensor, *, block_size: int) -> tuple[torch.Tensor, int]:
    """How much of the full attention the selection keeps: the indexer's recall.

    Args:
        p_dense: [B, G, S, nb] full causal attention mass per key block, averaged over the
            group's heads (`dense_block_mass`).
        block_indices: [B, G, S, K] the selection (`msa_select`), -1 = unused.

    Returns:
        (sum over (b, g, t) of the mass inside t's selected blocks, fp64 on the device; the number
        of those rows), over the tokens with more than K causal blocks (the others select every
        block: recall 1 by construction).
    """
    B, G, S, K = block_indices.shape
    kept = torch.gather(p_dense, -1, block_indices.clamp_min(0).long()) * (block_indices >= 0)
    counted = (torch.arange(S, device=p_dense.device) // block_size + 1) > K  # [S]
    total = (kept.sum(-1).double() * counted).sum()
    return total, B * G * int(counted.sum())


def _attention(q, k, v, block_indices, block_size, softmax_scale, q_offset, return_lse):
    scale = _attention_scale(q, k, v, block_indices, block_size, softmax_scale, q_offset)
    out, lse = dispatch.attention(q, k, v, block_indices, block_size, scale, q_offset)
    return (out, lse) if return_lse else out


def _attention_scale(q, k, v, block_indices, block_size, softmax_scale, q_offset) -> float:
    """Check the attention's arguments; the softmax scale (default 1 / sqrt(D))."""
    B, S, Hq, D = q.shape
    _check_qk(q, k)
    if v.shape != k.shape:
        raise ValueError(f"v has shape {tuple(v.shape)}; expected k's {tuple(k.shape)}")
    _check_indices(block_indices, B, k.shape[2], S)
    if block_size < 1:
        raise ValueError(f"block_size={block_size} must be >= 1")
    _check_offset(q_offset, S, block_size)
    return D**-0.5 if softmax_scale is None else float(softmax_scale)


def _check_blocks(block_size: int, topk: int, local_blocks: int) -> None:
    if block_size < 1 or topk < 1:
        raise ValueError(f"block_size={block_size} and topk={topk} must be >= 1")
    if not 0 <= local_blocks <= topk:
        raise ValueError(f"local_blocks={local_blocks} must be in [0, topk={topk}]")


def _check_offset(q_offset: int, S: int, block_size: int) -> None:
    if q_offset < 0 or (q_offset and S % block_size):
        raise ValueError(f"q_offset={q_offset} must be >= 0, and > 0 only with S={S} divisible by block_size={block_size}")


def _check_qk(q: torch.Tensor, k: torch.Tensor) -> None:
    B, S, Hq, D = q.shape
    if k.dim() != 4 or k.shape[:2] != (B, S) or k.shape[3] != D:
        raise ValueError(f"k has shape {tuple(k.shape)}; expected [B={B}, S={S}, G, D={D}]")
    if Hq % k.shape[2]:
        raise ValueError(f"{Hq} query heads do not split into {k.shape[2]} groups")


def _check_indices(block_indices: torch.Tensor, B: int, G: int, S: int) -> None:
    if block_indices.dim() != 4 or block_indices.shape[:3] != (B, G, S):
        raise ValueError(f"block_indices has shape {tuple(block_indices.shape)}; expected [B={B}, G={G}, S={S}, K]")
    if block_indices.is_floating_point():
        raise ValueError("block_indices must be an integer tensor")

