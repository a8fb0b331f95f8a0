"""MSA under context parallelism: selection with global block ids, sparse attention on the ring.

Each rank holds two load-balanced chunks of c = S / (2*cp) tokens (parallel/context_parallel.py).
Chunks are whole blocks: seq_length must be divisible by 2*cp*block_size (parallel/setup.py
checks it), so no block straddles two ranks and a block lives in exactly one shard.

1. Index keys are all-gathered over the CP group (Di values per token; differentiable: the
   gradients of the indexer loss flow back to the key's owner) and put in global order. Each
   local chunk selects against the keys before it, with its global offset: global block ids, the
   global causal order, the local blocks on whichever rank holds them.
2. Main K/V go round the ring (`RingAttention`). Against the shard of rank src, a rank attends
   only to the blocks its tokens selected there, renumbered to the shard's local ids (-1 for
   the rest). Its own shard is the diagonal step: same layout as its queries, token-causal in
   the local blocks. Another rank's selected blocks are all earlier than the query (selection is
   causal and blocks are whole), so that step attends to every key of them (q_offset = Sl).
3. p_main of the indexer loss: each step also returns the attention mass per selected slot and
   head, normalised by the step's lse; the ring merges it with the output's weights, which
   gives the mass under the final lse. Heads are averaged and rows renormalised at the end.
4. The block scores of the selected blocks are local queries against the gathered index keys.

The indexer loss of a rank is the mean over its own rows; every rank has the same number of
rows, so the mean over the CP group is the CP=1 loss (the trainer's log averages over ranks;
model/msa/layer.py scales the gradient so that the data-parallel average over CP is exact).

Every op goes through `model.msa.api`, and `model.msa.dispatch` decides where it runs. On CUDA
the selection and the block scores run their kernels with the chunk's query offset; the
attention steps run the kernels (against another rank's shard, q_offset = Sl, with the queries
put after the keys: the attention kernels have no offset); p_main runs the block-mass kernel on
the rank's own shard and the PyTorch reference on the others (that kernel has no offset).

Legend: B batch, Sl local tokens, c = Sl / 2 tokens per chunk, Hq query heads, G groups,
hpg heads per group, D head dim, Di index head dim, K top-k slots, bs block size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from model.msa import (
    attention_block_mass,
    msa_attention_with_lse,
    msa_block_scores,
    msa_select,
)
from parallel.context_parallel import Ring, RingAttention, chunks_of


@dataclass
class CPSparseResult:
    out: torch.Tensor
    """[B, Sl, Hq, D] in q's dtype, differentiable in q, k, v."""
    blocks: torch.Tensor
    """int64 [B, G, Sl, K]: global block ids per local token, as `msa_select` on the full sequence."""
    p_main: torch.Tensor | None
    """fp32 [B, G, Sl, K]: the indexer loss's target (None without `indexer_loss`)."""
    scores: torch.Tensor | None
    """fp32 [B, G, Sl, K]: index block scores, differentiable in index_q, index_k (None without)."""


def msa_sparse_context_parallel(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index_q: torch.Tensor,
    index_k: torch.Tensor,
    *,
    block_size: int,
    topk: int,
    local_blocks: int,
    cp_group: dist.ProcessGroup,
    indexer_loss: bool,
    softmax_scale: float | None = None,
) -> CPSparseResult:
    """Sparse MSA of this rank's tokens over the whole sequence split across `cp_group`.

    Args:
        q: [B, Sl, Hq, D]; k, v: [B, Sl, G, D]; index_q: [B, Sl, G, Di]; index_k: [B, Sl, Di];
            all this rank's two load-balanced chunks (Sl / 2 tokens each, a multiple of bs).
        indexer_loss: also compute p_main and the block scores for the KL indexer loss.
    """
    ring = Ring(cp_group)
    B, Sl, Hq, D = q.shape
    c = Sl // 2
    if Sl % 2 or c % block_size:
        raise ValueError(
            f"a context-parallel chunk of {c} tokens is not whole MSA blocks: train.seq_length must be "
            f"divisible by 2*parallel.cp*model.msa.block_size = 2*{ring.size}*{block_size}"
        )
    scale = D**-0.5 if softmax_scale is None else float(softmax_scale)
    keys = gather_sequence(index_k if indexer_loss else index_k.detach(), ring)  # [B, S, Di]
    offsets = [chunk * c for chunk in ring.chunks()]
    with torch.no_grad():
        blocks = torch.cat([
            msa_select(index_q[:, j * c:(j + 1) * c], keys[:, :o + c].detach(), block_size=block_size,
                       topk=topk, local_blocks=local_blocks, q_offset=o)
            for j, o in enumerate(offsets)
        ], dim=2)  # [B, G, Sl, K]

    def step(q_, k_, v_, src):
        return sparse_step(q_, k_, v_, blocks, ring.rank, src, ring.size, block_size, scale)

    def mass(q_, k_, lse, src):
        idx = shard_blocks(blocks, chunks_of(src, ring.size), c // block_size)
        return _mass_per_head(q_, k_, lse, idx, block_size, scale, 0 if src == ring.rank else Sl)

    out, merged = RingAttention.apply(q, k, v, ring, step, mass if indexer_loss else None)
    if not indexer_loss:
        return CPSparseResult(out, blocks, None, None)
    G, K = k.shape[2], blocks.shape[-1]
    p_main = merged.view(B, Sl, G, Hq // G, K).mean(3).permute(0, 2, 1, 3).float()  # [B, G, Sl, K]
    p_main = p_main / p_main.sum(-1, keepdim=True).clamp_min(torch.finfo(p_main.dtype).tiny)
    scores = torch.cat([
        msa_block_scores(index_q[:, j * c:(j + 1) * c], keys[:, :o + c], blocks[:, :, j * c:(j + 1) * c],
                         block_size=block_size, q_offset=o)
        for j, o in enumerate(offsets)
    ], dim=2)
    return CPSparseResult(out, blocks, p_main, scores)


def gather_sequence(x: torch.Tensor, ring: Ring) -> torch.Tensor:
    """[B, Sl, ...] load-balanced local chunks -> [B, S, ...] the whole sequence in order.
    Differentiable: each rank's gradient flows back to the rank that holds the tokens."""
    return _GatherSequence.apply(x, ring)


class _GatherSequence(torch.autograd.Function):
    """All-gather in global order; backward sums the gradients over the group (an all-reduce:
    gloo has no reduce-scatter, and index keys are small) and keeps this rank's chunks."""

    @staticmethod
    def forward(ctx, x, ring: Ring):
        ctx.ring = ring
        parts = [torch.empty_like(x) for _ in range(ring.size)]
        dist.all_gather(parts, x.contiguous(), group=ring.group)
        chunks = [None] * (2 * ring.size)
        for rank, part in enumerate(parts):
            first, second = ring.chunks(rank)
            chunks[first], chunks[second] = part.chunk(2, dim=1)
        return torch.cat(chunks, dim=1)

    @staticmethod
    def backward(ctx, grad):
        ring = ctx.ring
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ring.group)
        c = grad.shape[1] // (2 * ring.size)
        return torch.cat([grad[:, i * c:(i + 1) * c] for i in ring.chunks()], dim=1), None


def shard_blocks(blocks: torch.Tensor, chunks: tuple[int, int], blocks_per_chunk: int) -> torch.Tensor:
    """Global block ids [B, G, Sl, K] -> the local ids of the blocks in the shard made of global
    `chunks` (concatenated), -1 for blocks elsewhere. Slots keep their positions."""
    local = torch.full_like(blocks, -1)
    for j, chunk in enumerate(chunks):
        first = chunk * blocks_per_chunk
        inside = (blocks >= first) & (blocks < first + blocks_per_chunk)
        local = torch.where(inside, blocks - first + j * blocks_per_chunk, local)
    return local


def sparse_step(q, k, v, blocks, rank: int, src: int, cp: int, block_size: int, scale: float):
    """One ring step: rank's queries [B, Sl, Hq, D] against shard src's k, v [B, Sl, G, D], over
    the blocks of that shard they selected (`blocks`: global ids [B, G, Sl, K]).
    -> out [B, Sl, Hq, D], lse [B, Sl, Hq]; differentiable in q, k, v."""
    Sl = q.shape[1]
    idx = shard_blocks(blocks, chunks_of(src, cp), Sl // 2 // block_size)
    # another rank's selected blocks all precede the queries: every key of them is visible
    q_offset = 0 if src == rank else Sl
    return msa_attention_with_lse(q, k, v, idx, block_size=block_size, softmax_scale=scale, q_offset=q_offset)


def _mass_per_head(q, k, lse, idx, block_size, scale, q_offset) -> torch.Tensor:
    """Attention mass per selected slot for every head: [B, Sl, Hq, K], normalised by `lse`.

    `attention_block_mass` averages a group's heads; called on one head per group at a time
    (q [B, Sl, G, D]) it returns that head's mass. Its renormalisation changes nothing here:
    over the slots of this step the mass sums to 1 under the step's own lse."""
    B, Sl, Hq, D = q.shape
    G = k.shape[2]
    q_g = q.view(B, Sl, G, Hq // G, D)
    lse_g = lse.view(B, Sl, G, Hq // G)
    heads = [
        attention_block_mass(q_g[:, :, :, h].contiguous(), k, lse_g[..., h].contiguous(), idx,
                             block_size=block_size, softmax_scale=scale, q_offset=q_offset)
        for h in range(Hq // G)
    ]  # each [B, G, Sl, K]
    return torch.stack(heads, dim=2).permute(0, 3, 1, 2, 4).reshape(B, Sl, Hq, -1)
