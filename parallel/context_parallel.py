"""Context parallelism: attention over a sequence split across the CP group, as a ring.

Layout (megatron's load-balanced split, `get_batch_on_this_cp_rank`): the sequence is cut into
2*cp chunks of c = S / (2*cp) tokens and rank r holds chunks r and 2cp-1-r, concatenated, so
every rank has the same S_local = 2c tokens and the same share of causal work.

The ring: each rank starts with its own K/V; at every step it sends the K/V it holds to rank
r+1 and receives rank r-1's, p2p, while it computes its queries against the K/V it holds. After
cp steps every query has met every shard; the partial outputs are merged with the log-sum-exp
rule. Backward passes the K/V round the ring again, with the dK/dV accumulated for each shard
travelling one step behind, so that after the last step every shard's dK/dV is back with its
owner. A step's backward recomputes its attention (as flash attention recomputes the
probabilities) and takes its gradient from the merged output's: with w = exp(lse_step - lse),
d out_step = w * d out and d lse_step = w * (d out . (out_step - out)).

`ring_attention` is full causal attention (the dense layers of the local backend); the MSA
layers use the same ring (`RingAttention`) with a step that attends only to the selected
blocks of the visiting shard (model/msa/cp.py).

Legend: B batch, S_local (Sl) this rank's tokens, Hq query heads, G KV groups, D head dim,
hpg = Hq // G heads per group, X extra per-head values merged like the output.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.distributed as dist

StepFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]
"""step(q, k, v, src) -> out [B, Sl, Hq, D], lse [B, Sl, Hq], both fp32 (fp64 for fp64 q): this rank's queries
against shard `src`'s K/V (lse -inf where nothing is attended); differentiable in q, k, v."""

ExtraFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]
"""extra(q, k, lse_step, src) -> [B, Sl, Hq, X]: values normalised by the step's lse (e.g.
attention mass per block), merged over steps with the output's weights (no gradient)."""


def chunks_of(rank: int, cp: int) -> tuple[int, int]:
    """The two global chunk ids (of 2*cp) that CP rank `rank` holds."""
    return rank, 2 * cp - 1 - rank


class Ring:
    """This rank's place in the CP group and the p2p exchange with its neighbours."""

    def __init__(self, group: dist.ProcessGroup):
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.next = dist.get_global_rank(group, (self.rank + 1) % self.size)
        self.prev = dist.get_global_rank(group, (self.rank - 1) % self.size)

    def source(self, step: int) -> int:
        """The CP rank whose shard this rank holds at `step`."""
        return (self.rank - step) % self.size

    def chunks(self, rank: int | None = None) -> tuple[int, int]:
        """The two global chunk ids a rank holds."""
        return chunks_of(self.rank if rank is None else rank, self.size)

    def positions(self, seq_local: int, device=None) -> torch.Tensor:
        """int64 [Sl]: the global positions of this rank's tokens."""
        c = seq_local // 2
        return torch.cat([torch.arange(i * c, (i + 1) * c, device=device) for i in self.chunks()])

    def exchange(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> list:
        """Send each `send` to the next rank and receive each `recv` from the previous one, in
        one batch (NCCL launches them together, so the ring cannot deadlock). Returns the works
        to wait on."""
        ops = []
        for send, recv in pairs:
            ops.append(dist.P2POp(dist.isend, send, self.next, self.group))
            ops.append(dist.P2POp(dist.irecv, recv, self.prev, self.group))
        return dist.batch_isend_irecv(ops) if ops else []


class RingAttention(torch.autograd.Function):
    """Ring over the CP group of `step`s; returns the merged out [B, Sl, Hq, D] in q's dtype,
    and the merged `extra` values (None without `extra`, never differentiable)."""

    @staticmethod
    def forward(ctx, q, k, v, ring: Ring, step: StepFn, extra: ExtraFn | None = None):
        kv = torch.stack([k, v]).contiguous()  # [2, B, Sl, G, D]: one message per step
        out = lse = acc = None
        for i in range(ring.size):
            recv = torch.empty_like(kv) if i < ring.size - 1 else None
            works = ring.exchange([(kv, recv)]) if recv is not None else []
            src = ring.source(i)
            out_i, lse_i = step(q, kv[0], kv[1], src)
            extra_i = extra(q, kv[0], lse_i, src) if extra is not None else None
            out, acc, lse = _merge(out, acc, lse, out_i, extra_i, lse_i)
            for w in works:
                w.wait()
            kv = recv
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.ring, ctx.step = ring, step
        if acc is not None:
            ctx.mark_non_differentiable(acc)
        return out.to(q.dtype), acc

    @staticmethod
    def backward(ctx, d_out, _d_extra):
        q, k, v, out, lse = ctx.saved_tensors
        ring, step = ctx.ring, ctx.step
        d_out = d_out.to(out.dtype)
        kv = torch.stack([k, v]).contiguous()
        dq = torch.zeros(q.shape, dtype=out.dtype, device=q.device)
        dkv = None  # the dK/dV accumulated for the shard held at the previous step
        for i in range(ring.size):
            pairs = []
            recv_kv = recv_dkv = None
            if i < ring.size - 1:
                recv_kv = torch.empty_like(kv)
                pairs.append((kv, recv_kv))
            if dkv is not None:
                recv_dkv = torch.empty_like(dkv)
                pairs.append((dkv, recv_dkv))
            works = ring.exchange(pairs)
            g_q, g_k, g_v = _step_grads(step, q, kv, ring.source(i), out, lse, d_out)
            dq += g_q
            local = torch.stack([g_k, g_v])
            for w in works:
                w.wait()
            # recv_dkv holds what ranks src .. r-1 accumulated for the shard now held here.
            dkv = local if recv_dkv is None else recv_dkv + local
            kv = recv_kv
        if ring.size > 1:
            own = torch.empty_like(dkv)
            for w in ring.exchange([(dkv, own)]):
                w.wait()
            dkv = own
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None


def _step_grads(step: StepFn, q, kv, src, out, lse, d_out):
    """Gradients of q and the shard's k, v from one recomputed step, in out's dtype (fp32 or fp64)."""
    with torch.enable_grad():
        q_ = q.detach().requires_grad_()
        k_ = kv[0].detach().requires_grad_()
        v_ = kv[1].detach().requires_grad_()
        out_i, lse_i = step(q_, k_, v_, src)
        w = _weight(lse_i, lse)  # [B, Sl, Hq]
        d_out_i = d_out * w[..., None]
        d_lse_i = w * (d_out * (out_i.detach().to(out.dtype) - out)).sum(-1)
        grads = torch.autograd.grad((out_i, lse_i), (q_, k_, v_), (d_out_i, d_lse_i), allow_unused=True)
    return [torch.zeros(x.shape, dtype=out.dtype, device=x.device) if g is None else g.to(out.dtype)
            for g, x in zip(grads, (q_, k_, v_))]


def _weight(lse_part: torch.Tensor, lse_total: torch.Tensor) -> torch.Tensor:
    """exp(lse_part - lse_total), 0 where the part attended nothing."""
    return torch.where(torch.isfinite(lse_part), torch.exp(lse_part - lse_total), 0.0)


def _merge(out, acc, lse, out_i, extra_i, lse_i):
    """Log-sum-exp merge of running (out, extra, lse) with one step's (fp32, fp64 stays fp64)."""
    acc_dtype = torch.promote_types(out_i.dtype, torch.float32)
    out_i, lse_i = out_i.to(acc_dtype), lse_i.to(acc_dtype)
    if out is None:
        return out_i, extra_i, lse_i
    new = torch.logaddexp(lse, lse_i)
    new = torch.where(torch.isfinite(new), new, lse)  # both -inf: stays -inf, weights 0
    w_old, w_new = _weight(lse, new), _weight(lse_i, new)
    out = out * w_old[..., None] + out_i * w_new[..., None]
    if acc is not None:
        acc = acc * w_old[..., None] + extra_i * w_new[..., None]
    return out, acc, new


def ring_attention(
    q_bshd: torch.Tensor,
    k_bsgd: torch.Tensor,
    v_bsgd: torch.Tensor,
    *,
    cp_group: dist.ProcessGroup,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """Full causal GQA attention over a sequence split across `cp_group`; differentiable.

    Args:
        q_bshd: [B, Sl, Hq, D], this rank's two load-balanced chunks (rank r: chunks r and
            2cp-1-r of the global sequence, Sl/2 tokens each), concatenated.
        k_bsgd, v_bsgd: [B, Sl, G, D] in the same layout; Hq % G == 0.
        cp_group: the context-parallel group (megatron's get_context_parallel_group()).
        softmax_scale: defaults to 1 / sqrt(D).

    Returns:
        [B, Sl, Hq, D] in q's dtype: each local token's causal attention over the keys of the
        whole sequence at global positions <= its own.
    """
    B, Sl, Hq, D = q_bshd.shape
    if k_bsgd.shape[:2] != (B, Sl) or k_bsgd.shape[3] != D or v_bsgd.shape != k_bsgd.shape or Hq % k_bsgd.shape[2]:
        raise ValueError(f"q {tuple(q_bshd.shape)}, k {tuple(k_bsgd.shape)}, v {tuple(v_bsgd.shape)}: "
                         "expected [B, Sl, Hq, D] and [B, Sl, G, D] with Hq % G == 0")
    if Sl % 2:
        raise ValueError(f"this rank holds {Sl} tokens: two equal chunks needed (seq_length % (2*cp))")
    ring = Ring(cp_group)
    scale = D**-0.5 if softmax_scale is None else float(softmax_scale)
    out, _ = RingAttention.apply(q_bshd, k_bsgd, v_bsgd, ring, _dense_step(ring, Sl, scale))
    return out


def _dense_step(ring: Ring, seq_local: int, scale: float) -> StepFn:
    """Causal attention against one shard. Chunks are whole, so outside the diagonal step a
    pair of chunks is either fully visible or not at all: against an earlier rank's shard all
    queries see its first chunk only; against a later rank's shard only the second local
    chunk sees anything (all of it)."""
    half = seq_local // 2

    def step(q, k, v, src):
        if src == ring.rank:
            pos = ring.positions(seq_local, q.device)
            return attend(q, k, v, scale, causal=pos[None, :] <= pos[:, None])
        if src < ring.rank:
            return attend(q, k[:, :half], v[:, :half], scale)
        out, lse = attend(q[:, half:], k, v, scale)
        return _pad_rows(out, lse, half)

    return step


def _pad_rows(out, lse, rows):
    """Prepend `rows` query rows that attended nothing: out 0, lse -inf."""
    out = torch.cat([out.new_zeros(out.shape[0], rows, *out.shape[2:]), out], dim=1)
    lse = torch.cat([lse.new_full((lse.shape[0], rows, lse.shape[2]), -math.inf), lse], dim=1)
    return out, lse


def attend(q, k, v, scale: float, causal: torch.Tensor | None = None):
    """Plain softmax attention with lse, differentiable; causal [Sq, Sk] bool keeps keys.

    q [B, Sq, Hq, D], k and v [B, Sk, G, D] -> out [B, Sq, Hq, D], lse [B, Sq, Hq], in fp32 (fp64
    stays fp64). Builds the [B, Hq, Sq, Sk] scores: the local backend's path, not a fused kernel.
    """
    B, Sq, Hq, D = q.shape
    G = k.shape[2]
    acc = torch.promote_types(q.dtype, torch.float32)
    q_g = q.to(acc).view(B, Sq, G, Hq // G, D)
    logits = torch.einsum("bqghd,bkgd->bghqk", q_g, k.to(acc)) * scale
    if causal is not None:
        logits = logits.masked_fill(~causal, -math.inf)
    lse = logits.logsumexp(-1)  # [B, G, hpg, Sq]; every row here keeps at least one key
    out = torch.einsum("bghqk,bkgd->bqghd", torch.exp(logits - lse[..., None]), v.to(acc))
    return out.reshape(B, Sq, Hq, D), lse.permute(0, 3, 1, 2).reshape(B, Sq, Hq)
