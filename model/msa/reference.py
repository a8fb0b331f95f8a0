"""Plain-PyTorch MSA: the CPU path, and the reference that the kernels are tested against.

Everything is chunked over queries so that no S x S tensor is ever built: index scoring holds
[B, G, C, S] scores for a chunk of C queries, the sparse attention gathers only the selected key
blocks ([B, G, C, K * bs, D] for a chunk), and the dense warm-up mass streams over key chunks.
Chunk sizes follow `CHUNK_ELEMENTS` (`CUDA_CHUNK_ELEMENTS` on a GPU), so peak memory does not
grow with S^2 (S = 32K runs on CPU, slowly). The differentiable functions are `torch.autograd.Function`s whose backward is chunked
the same way and scatters key gradients with `index_add_`, so the backward is bounded too and
does O(S * K * bs) work, not O(S^2).

Keys are gathered a whole block at a time: k is viewed as a table with one row per (batch,
group, block) holding that block's bs x D values, and a chunk gathers rows with `index_select`
(and scatters their gradients with `index_add_`), which is far faster on CPU than gathering
single keys.

Legend (shape comments): B batch, S tokens, Hq query heads, G GQA groups (= KV heads = index
query heads), hpg = Hq // G heads per group, D head dim, Di index head dim, K top-k slots,
bs block size, nb = ceil(S / bs) key blocks, C queries in a chunk, N = K * bs gathered keys.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

CHUNK_ELEMENTS = 1 << 22
"""Target size (elements) of the largest per-chunk intermediate on the host: 16 MiB in fp32."""
CUDA_CHUNK_ELEMENTS = 1 << 26
"""The same on a GPU (256 MiB in fp32): each chunk is a handful of kernel launches, so chunks
sized for the host would leave a GPU running thousands of tiny launches per layer (M2's shape
gives 2 queries per chunk at 1 << 22)."""


def _budget(x: torch.Tensor) -> int:
    """Elements per chunk for tensors on x's device (read at call time: tests shrink them)."""
    return CUDA_CHUNK_ELEMENTS if x.is_cuda else CHUNK_ELEMENTS


def msa_select(
    index_q: torch.Tensor, index_k: torch.Tensor, block_size: int, topk: int, local_blocks: int = 1,
    q_offset: int = 0,
) -> torch.Tensor:
    """Top-k key blocks per token and group, from the index branch.

    index_q [B, S, G, Di], index_k [B, q_offset + S, Di] -> block ids [B, G, S, K] (int64); query
    t sits at key position q_offset + t (a slice of a longer sequence, e.g. under context
    parallelism).
    Block score = max over the causal keys of the block of index_q . index_k in fp32. The
    `local_blocks` blocks ending at the token's own block are always taken; the other slots take
    the highest-scoring earlier blocks, ties to the lower block id. Each row holds its ids in
    ascending order followed by -1 for slots left unused (tokens with fewer than K valid blocks).
    """
    B, S, G, _ = index_q.shape
    nb = math.ceil(index_k.shape[1] / block_size)
    out = []
    with torch.no_grad():
        for s0, s1 in _chunks(S, _budget(index_q) // (B * G * nb * block_size)):
            t0 = q_offset + s0
            scores, _ = _dense_block_scores_chunk(index_q[:, s0:s1], index_k, t0, block_size)
            out.append(_topk_blocks(scores, t0, block_size, topk, local_blocks))
    return torch.cat(out, dim=2)


def msa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_indices: torch.Tensor,
    block_size: int,
    softmax_scale: float,
    q_offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact softmax attention of each token over the causal keys of its group's selected blocks.

    Query t sits at key position q_offset + t (q_offset >= S: every key of a selected block is
    earlier than every query).

    q [B, S, Hq, D], k and v [B, S, G, D], block_indices [B, G, S, K] (-1 = unused slot)
    -> out [B, S, Hq, D] in q's dtype, lse [B, S, Hq] fp32. Computed in fp32 (fp64 stays fp64).
    Differentiable in q, k, v, through out and lse. A token with no key to attend gets out 0
    and lse -inf.
    """
    return _SparseAttention.apply(q, k, v, block_indices, block_size, softmax_scale, q_offset)


def msa_block_scores(
    index_q: torch.Tensor, index_k: torch.Tensor, block_indices: torch.Tensor, block_size: int,
    q_offset: int = 0,
) -> torch.Tensor:
    """Index block scores of the selected blocks, differentiable in index_q and index_k.

    index_q [B, S, G, Di], index_k [B, q_offset + S, Di], block_indices [B, G, S, K] -> fp32
    [B, G, S, K], -inf at -1 slots; query t sits at key position q_offset + t. The max over a
    block's causal keys passes its gradient to the one argmax key.
    """
    return _BlockMaxScores.apply(index_q, index_k, block_indices, block_size, q_offset)


def dense_block_scores(index_q: torch.Tensor, index_k: torch.Tensor, block_size: int) -> torch.Tensor:
    """Index block scores of every key block, for the dense warm-up; differentiable.

    index_q [B, S, G, Di], index_k [B, S, Di] -> fp32 [B, G, S, nb]: max over the block's causal
    keys of index_q . index_k, -inf for blocks after the token's block. Gradient as in
    `msa_block_scores`.
    """
    return _BlockMaxScores.apply(index_q, index_k, None, block_size, 0)


def attention_block_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    lse: torch.Tensor,
    block_indices: torch.Tensor,
    block_size: int,
    softmax_scale: float,
    q_offset: int = 0,
) -> torch.Tensor:
    """Main-branch attention mass per selected block, head-averaged and renormalised (no grad).
    Query t sits at key position q_offset + t, as in `msa_attention`.

    q [B, S, Hq, D], k [B, S, G, D], lse [B, S, Hq] (of the attention that produced it),
    block_indices [B, G, S, K] -> fp32 [B, G, S, K]: sum over the block's causal keys of
    exp(scale * q.k - lse), averaged over the group's heads, divided by its sum over the slots.
    0 at -1 slots.
    """
    B, S, Hq, D = q.shape
    G = k.shape[2]
    K = block_indices.shape[-1]
    nb = math.ceil(S / block_size)
    acc = torch.promote_types(q.dtype, torch.float32)
    outs = []
    with torch.no_grad():
        k_table = _block_table(k.to(acc), block_size)
        for s0, s1 in _chunks(S, _budget(q) // (B * K * block_size * max(G * D, Hq))):
            q_c = _group_heads(q[:, s0:s1].to(acc), G)  # [B, G, hpg, C, D]
            lse_c = _group_heads(lse[:, s0:s1, :, None].to(acc), G)  # [B, G, hpg, C, 1]
            idx = block_indices[:, :, s0:s1]
            keep = _keep_mask(idx, q_offset + s0, block_size)  # [B, G, C, N]
            kg = _gather_blocks(k_table, idx, keep, nb)  # [B, G, C, N, D]
            logits = torch.einsum("bghcd,bgcnd->bghcn", q_c, kg) * softmax_scale
            p = torch.where(keep[:, :, None], torch.exp(logits - lse_c), 0.0)  # [B, G, hpg, C, N]
            mass = p.unflatten(-1, (K, block_size)).sum(-1).mean(2)  # [B, G, C, K]
            outs.append(_renormalise(mass.float()))
    return torch.cat(outs, dim=2)


def dense_block_mass(q: torch.Tensor, k: torch.Tensor, block_size: int, softmax_scale: float,
                     lse: torch.Tensor | None = None) -> torch.Tensor:
    """Full causal attention mass per key block, head-averaged, for the dense warm-up (no grad).

    q [B, S, Hq, D], k [B, S, G, D] -> fp32 [B, G, S, nb], 0 for blocks after the token's block,
    renormalised to sum 1 per row. Two passes over key chunks per query chunk (log-sum-exp, then
    mass), so only [B, Hq, C, N] scores exist at a time; one pass when the attention's own
    log-sum-exp `lse` [B, S, Hq] is given.
    """
    B, S, Hq, D = q.shape
    G = k.shape[2]
    nb = math.ceil(S / block_size)
    acc = torch.promote_types(q.dtype, torch.float32)
    key_chunk = block_size * max(1, 512 // block_size)
    out = torch.zeros(B, G, S, nb, dtype=torch.float32, device=q.device)
    with torch.no_grad():
        k32 = k.to(acc)
        for s0, s1 in _chunks(S, _budget(q) // (B * Hq * key_chunk)):
            q_c = _group_heads(q[:, s0:s1].to(acc), G) * softmax_scale  # [B, G, hpg, C, D]
            t = torch.arange(s0, s1, device=q.device)[:, None]  # [C, 1]
            key_spans = list(_chunks(s1, key_chunk))  # keys after the chunk's last query never count

            def masked_logits(j0: int, j1: int) -> tuple[torch.Tensor, torch.Tensor]:
                causal = torch.arange(j0, j1, device=q.device) <= t  # [C, N]
                logits = torch.einsum("bghcd,bngd->bghcn", q_c, k32[:, j0:j1])
                return torch.where(causal, logits, -math.inf), causal

            if lse is None:
                lse_c = torch.full(q_c.shape[:-1], -math.inf, dtype=acc, device=q.device)  # [B, G, hpg, C]
                for j0, j1 in key_spans:
                    lse_c = torch.logaddexp(lse_c, masked_logits(j0, j1)[0].logsumexp(-1))
            else:
                lse_c = _group_heads(lse[:, s0:s1, :, None].to(acc), G)[..., 0]  # [B, G, hpg, C]
            for j0, j1 in key_spans:
                logits, causal = masked_logits(j0, j1)
                p = torch.where(causal, torch.exp(logits - lse_c[..., None]), 0.0).mean(2)  # [B, G, C, N]
                p = F.pad(p, (0, -(j1 - j0) % block_size))  # j0 is block-aligned; j1 maybe not
                blocks = slice(j0 // block_size, math.ceil(j1 / block_size))
                out[:, :, s0:s1, blocks] = p.unflatten(-1, (-1, block_size)).sum(-1).float()
    return _renormalise(out)


def indexer_kl_loss(p_main: torch.Tensor, index_scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean over rows (b, g, t) of KL(p_main || softmax of index_scores over the valid slots).

    p_main, index_scores [B, G, S, K] (K = top-k slots, or nb blocks in the dense warm-up), valid
    bool broadcastable to them. p_main is detached; slots with p_main = 0 add nothing.
    """
    p = p_main.detach().float()
    log_q = torch.where(valid, index_scores.float(), -math.inf).log_softmax(-1)
    terms = torch.where(valid & (p > 0), p * (torch.log(p) - log_q), 0.0)
    # A row without any valid slot (none in real selections) would give NaN through log_softmax.
    terms = torch.where(valid.any(-1, keepdim=True), terms, 0.0)
    return terms.sum(-1).mean()


def dense_block_valid(seq_len: int, block_size: int, device=None) -> torch.Tensor:
    """bool [S, nb]: block b is causal for token t (b <= t // bs). Broadcasts against [B, G, S, nb]."""
    t_blk = torch.arange(seq_len, device=device) // block_size
    return torch.arange(math.ceil(seq_len / block_size), device=device) <= t_blk[:, None]


class _SparseAttention(torch.autograd.Function):
    """Chunked sparse attention; the backward recomputes the probabilities from lse (as flash
    attention does) and scatters dK, dV block rows into one buffer."""

    @staticmethod
    def forward(ctx, q, k, v, block_indices, block_size, scale, q_offset):
        B, S, Hq, D = q.shape
        G = k.shape[2]
        nb = math.ceil(S / block_size)
        acc = torch.promote_types(q.dtype, torch.float32)
        k_table, v_table = _block_table(k.to(acc), block_size), _block_table(v.to(acc), block_size)
        out = torch.empty_like(q)
        lse = torch.empty(B, S, Hq, dtype=acc, device=q.device)
        for s0, s1 in _chunks(S, _attention_chunk(q, G, block_indices.shape[-1], block_size)):
            idx = block_indices[:, :, s0:s1]
            q_g = _group_heads(q[:, s0:s1].to(acc), G)  # [B, G, hpg, C, D]
            keep = _keep_mask(idx, q_offset + s0, block_size)  # [B, G, C, N]
            kg = _gather_blocks(k_table, idx, keep, nb)  # [B, G, C, N, D]
            vg = _gather_blocks(v_table, idx, keep, nb)
            logits = _masked_logits(q_g, kg, keep, scale)  # [B, G, hpg, C, N]
            m = logits.amax(-1, keepdim=True)  # only stabilises exp
            m = torch.where(torch.isfinite(m), m, 0.0)
            p = torch.exp(logits - m)
            denom = p.sum(-1, keepdim=True)
            o = torch.einsum("bghcn,bgcnd->bghcd", p, vg) / torch.where(denom > 0, denom, 1.0)
            out[:, s0:s1] = _ungroup_heads(o)
            lse[:, s0:s1] = _ungroup_heads(m + torch.log(denom))[..., 0]  # -inf: nothing attended
        ctx.save_for_backward(q, k, v, block_indices, lse)
        ctx.block_size, ctx.scale, ctx.q_offset = block_size, scale, q_offset
        return out, lse.float()

    @staticmethod
    def backward(ctx, d_out, d_lse):
        q, k, v, block_indices, lse = ctx.saved_tensors
        bs, scale = ctx.block_size, ctx.scale
        B, S, Hq, D = q.shape
        G = k.shape[2]
        nb = math.ceil(S / bs)
        acc = lse.dtype
        k_table, v_table = _block_table(k.to(acc), bs), _block_table(v.to(acc), bs)
        dq = torch.empty(q.shape, dtype=acc, device=q.device)
        dk_table, dv_table = torch.zeros_like(k_table), torch.zeros_like(v_table)
        for s0, s1 in _chunks(S, _attention_chunk(q, G, block_indices.shape[-1], bs)):
            idx = block_indices[:, :, s0:s1]
            rows = _table_rows(idx, nb, G).reshape(-1)  # [B*G*C*K]
            q_g = _group_heads(q[:, s0:s1].to(acc), G)  # [B, G, hpg, C, D]
            do_g = _group_heads(d_out[:, s0:s1].to(acc), G)
            dlse_g = _group_heads(d_lse[:, s0:s1, :, None].to(acc), G)  # [B, G, hpg, C, 1]
            lse_g = _group_heads(lse[:, s0:s1, :, None], G)
            keep = _keep_mask(idx, ctx.q_offset + s0, bs)  # [B, G, C, N]
            kg = _gather_blocks(k_table, idx, keep, nb)  # [B, G, C, N, D]
            vg = _gather_blocks(v_table, idx, keep, nb)
            logits = _masked_logits(q_g, kg, keep, scale)
            # Exactly 0 where not attended, also in rows with lse = -inf (exp would give NaN).
            p = torch.where(keep[:, :, None], torch.exp(logits - lse_g), 0.0)  # [B, G, hpg, C, N]
            dp = torch.einsum("bghcd,bgcnd->bghcn", do_g, vg)
            # d lse / d logit_j = p_j, so lse's gradient joins the softmax one.
            ds = p * (dp - (p * dp).sum(-1, keepdim=True) + dlse_g) * scale
            dq[:, s0:s1] = _ungroup_heads(torch.einsum("bghcn,bgcnd->bghcd", ds, kg))
            dkg = torch.einsum("bghcn,bghcd->bgcnd", ds, q_g)  # [B, G, C, N, D]
            dvg = torch.einsum("bghcn,bghcd->bgcnd", p, do_g)
            dk_table.index_add_(0, rows, dkg.reshape(rows.numel(), -1))
            dv_table.index_add_(0, rows, dvg.reshape(rows.numel(), -1))
        dk = _unblock_table(dk_table, B, S, G, D, bs).to(k.dtype)
        dv = _unblock_table(dv_table, B, S, G, D, bs).to(v.dtype)
        return dq.to(q.dtype), dk, dv, None, None, None, None


class _BlockMaxScores(torch.autograd.Function):
    """Block-max index scores of the given blocks (block_indices) or of all blocks (None).

    Forward keeps the key position of each max; backward sends each score's gradient to that
    one key: d index_q[t, g] += d score * index_k[j*], d index_k[j*] += d score * index_q[t, g].
    """

    @staticmethod
    def forward(ctx, index_q, index_k, block_indices, block_size, q_offset):
        B, S, G, Di = index_q.shape
        nb = math.ceil(index_k.shape[1] / block_size)
        scores, argmax = [], []
        if block_indices is None:
            for s0, s1 in _chunks(S, _budget(index_q) // (B * G * nb * block_size)):
                sc, am = _dense_block_scores_chunk(index_q[:, s0:s1], index_k, s0, block_size)
                scores.append(F.pad(sc, (0, nb - sc.shape[-1]), value=-math.inf))
                argmax.append(F.pad(am, (0, nb - am.shape[-1]), value=-1))
        else:
            K = block_indices.shape[-1]
            ik_table = _block_table(index_k.float(), block_size)  # [B*nb, bs*Di]
            for s0, s1 in _chunks(S, _budget(index_q) // (B * G * K * block_size * Di)):
                idx = block_indices[:, :, s0:s1]
                keep = _keep_mask(idx, q_offset + s0, block_size)  # [B, G, C, N]
                kg = _gather_blocks(ik_table, idx, keep, nb)  # [B, G, C, N, Di]
                sc = torch.einsum("bcgd,bgcnd->bgcn", index_q[:, s0:s1].float(), kg)
                sc = torch.where(keep, sc, -math.inf)
                best = sc.unflatten(-1, (K, block_size)).max(-1)  # [B, G, C, K]
                scores.append(best.values)
                # A used slot may still hold no causal key (a block after the query's own).
                hit = best.values > -math.inf
                argmax.append(torch.where(hit, idx.long() * block_size + best.indices, -1))
        argmax = torch.cat(argmax, dim=2)  # [B, G, S, K]: key position of each max, -1 if none
        ctx.save_for_backward(index_q, index_k, argmax)
        return torch.cat(scores, dim=2)

    @staticmethod
    def backward(ctx, d_scores):
        index_q, index_k, argmax = ctx.saved_tensors
        B, S, G, Di = index_q.shape
        Sk = index_k.shape[1]
        K = argmax.shape[-1]
        ik = index_k.float().reshape(B * Sk, Di)
        d_iq = torch.empty(B, S, G, Di, dtype=torch.float32, device=index_q.device)
        d_ik = torch.zeros(B * Sk, Di, dtype=torch.float32, device=index_k.device)
        b = torch.arange(B, device=argmax.device)[:, None, None, None]
        for s0, s1 in _chunks(S, _budget(index_q) // (B * G * K * Di)):
            pos = argmax[:, :, s0:s1]  # [B, G, C, K]
            w = torch.where(pos >= 0, d_scores[:, :, s0:s1], 0.0)  # nothing flows into -inf slots
            rows = (b * Sk + pos.clamp_min(0)).reshape(-1)
            keys = ik.index_select(0, rows).view(*pos.shape, Di)  # [B, G, C, K, Di]
            d_iq[:, s0:s1] = torch.einsum("bgck,bgckd->bcgd", w, keys)
            iq_c = index_q[:, s0:s1].float().permute(0, 2, 1, 3)  # [B, G, C, Di]
            d_ik.index_add_(0, rows, (w[..., None] * iq_c[:, :, :, None]).reshape(-1, Di))
        return d_iq.to(index_q.dtype), d_ik.view(B, Sk, Di).to(index_k.dtype), None, None, None


def _chunks(n: int, size: int):
    """(start, end) of consecutive chunks of `size` (at least 1) covering range(n)."""
    size = max(1, size)
    for s0 in range(0, n, size):
        yield s0, min(s0 + size, n)


def _attention_chunk(q: torch.Tensor, G: int, K: int, block_size: int) -> int:
    """Queries per chunk: the gathered k and v, or the logits, stay near the chunk budget."""
    B, _, Hq, D = q.shape
    return _budget(q) // (B * K * block_size * max(2 * G * D, Hq))


def _group_heads(x: torch.Tensor, G: int) -> torch.Tensor:
    """[B, C, Hq, D] -> [B, G, hpg, C, D]: head h belongs to group h // hpg."""
    B, C, Hq, D = x.shape
    return x.view(B, C, G, Hq // G, D).permute(0, 2, 3, 1, 4)


def _ungroup_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, G, hpg, C, D] -> [B, C, Hq, D]."""
    B, G, hpg, C, D = x.shape
    return x.permute(0, 3, 1, 2, 4).reshape(B, C, G * hpg, D)


def _renormalise(mass: torch.Tensor) -> torch.Tensor:
    """Divide each row by its sum; an all-zero row stays zero."""
    total = mass.sum(-1, keepdim=True)
    return mass / torch.where(total > 0, total, 1.0)


def _block_table(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """Keys as one row per block: [B, S, G, D] -> [B*G*nb, bs*D]; [B, S, D] (shared) -> [B*nb, bs*D].

    The sequence is zero-padded to whole blocks; row (b*G + g)*nb + blk holds block blk of group g.
    """
    x = x[:, :, None] if x.dim() == 3 else x
    B, S, G, D = x.shape
    nb = math.ceil(S / block_size)
    x = F.pad(x, (0, 0, 0, 0, 0, nb * block_size - S))  # [B, nb*bs, G, D]
    return x.view(B, nb, block_size, G, D).permute(0, 3, 1, 2, 4).reshape(B * G * nb, block_size * D)


def _unblock_table(table: torch.Tensor, B: int, S: int, G: int, D: int, block_size: int) -> torch.Tensor:
    """Inverse of `_block_table`: [B*G*nb, bs*D] -> [B, S, G, D], dropping the padding."""
    nb = math.ceil(S / block_size)
    x = table.view(B, G, nb, block_size, D).permute(0, 2, 3, 1, 4).reshape(B, nb * block_size, G, D)
    return x[:, :S]


def _table_rows(block_indices: torch.Tensor, nb: int, table_groups: int) -> torch.Tensor:
    """Table rows of the blocks [B, G, C, K]; -1 slots read block 0 (the caller masks them)."""
    B, G = block_indices.shape[:2]
    b = torch.arange(B, device=block_indices.device)[:, None, None, None]
    g = torch.arange(G, device=block_indices.device)[None, :, None, None] if table_groups > 1 else 0
    return (b * table_groups + g) * nb + block_indices.long().clamp_min(0)


def _gather_blocks(table: torch.Tensor, block_indices: torch.Tensor, keep: torch.Tensor, nb: int) -> torch.Tensor:
    """The keys of the selected blocks: block_indices [B, G, C, K] -> [B, G, C, N, D].

    Keys the query does not attend (`keep` [B, G, C, N] false: later than the query, padding
    past S, -1 slots) are zeroed, so a NaN or inf stored there cannot leak through a product
    with a zero probability, forward or backward.
    """
    B, G, C, K = block_indices.shape
    rows = _table_rows(block_indices, nb, table.shape[0] // (B * nb))
    gathered = table.index_select(0, rows.reshape(-1)).view(B, G, C, keep.shape[-1], -1)
    return torch.where(keep[..., None], gathered, 0.0)


def _keep_mask(block_indices: torch.Tensor, s0: int, block_size: int) -> torch.Tensor:
    """bool [B, G, C, K*bs]: slot used and key position <= query position (s0 + c)."""
    C = block_indices.shape[2]
    offs = torch.arange(block_size, device=block_indices.device)
    pos = block_indices.long()[..., None] * block_size + offs  # [B, G, C, K, bs]
    t = torch.arange(s0, s0 + C, device=block_indices.device)[:, None, None]  # [C, 1, 1]
    return ((block_indices >= 0)[..., None] & (pos <= t)).flatten(-2)  # pos <= t < S: no padding


def _masked_logits(q_g, kg, keep, scale):
    """scale * q.k over the gathered keys [B, G, C, N, D], -inf where not attended: [B, G, hpg, C, N]."""
    logits = torch.einsum("bghcd,bgcnd->bghcn", q_g, kg) * scale
    return torch.where(keep[:, :, None], logits, -math.inf)


def _dense_block_scores_chunk(iq_c, index_k, s0, block_size):
    """Queries s0..s0+C against every block up to the chunk's last.

    -> fp32 scores [B, G, C, nbc] and the key position of each max (-1 for blocks after the
    query's block).
    """
    C = iq_c.shape[1]
    s1 = s0 + C
    n_keys = math.ceil(s1 / block_size) * block_size
    scores = torch.einsum("bcgd,bjd->bgcj", iq_c.float(), index_k[:, :s1].float())  # [B, G, C, s1]
    causal = torch.arange(s1, device=scores.device) <= torch.arange(s0, s1, device=scores.device)[:, None]
    scores = F.pad(torch.where(causal, scores, -math.inf), (0, n_keys - s1), value=-math.inf)
    best = scores.unflatten(-1, (-1, block_size)).max(-1)  # [B, G, C, nbc]
    pos = torch.arange(0, n_keys, block_size, device=scores.device) + best.indices
    return best.values, torch.where(best.values > -math.inf, pos, -1)


def _topk_blocks(scores, s0, block_size, topk, local_blocks):
    """Block scores [B, G, C, nbc] of queries s0.. -> left-packed ascending block ids [B, G, C, K]."""
    B, G, C, nbc = scores.shape
    dev = scores.device
    t_blk = (torch.arange(s0, s0 + C, device=dev) // block_size)[:, None]  # [C, 1]
    blk = torch.arange(nbc, device=dev)
    rank_key = torch.where(blk > t_blk - local_blocks, math.inf, scores)  # local blocks first
    rank_key = torch.where(blk <= t_blk, rank_key, -math.inf)
    # A stable descending sort keeps equal scores in block order: ties go to the lower id.
    order = torch.sort(rank_key, dim=-1, descending=True, stable=True).indices[..., :topk]
    if nbc < topk:
        order = F.pad(order, (0, topk - nbc), value=-1)
    n_valid = (t_blk + 1).clamp_max(topk)  # [C, 1]
    order = torch.where(torch.arange(topk, device=dev) < n_valid, order, -1)
    # Ascending ids, the -1 slots (mapped above every id for the sort) at the end.
    packed = torch.where(order < 0, nbc, order).sort(-1).values
    return torch.where(packed == nbc, -1, packed)
