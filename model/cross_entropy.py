"""Vocab-parallel cross entropy without an fp32 copy of the logits.

megatron-core's `tensor_parallel.vocab_parallel_cross_entropy` turns the [tokens, vocab] logits
into fp32, shifts, exponentiates and normalises them in place and keeps that fp32 softmax for
backward; its backward scales it and autograd casts it back to the logits' dtype. With M2's
200K vocabulary that is ~8 passes over a 3.3 GB fp32 tensor per 4K-token micro-batch and head.
Here the forward reads the logits once (a row's max, sum of exponentials and target logit, in
fp32) and keeps the logits themselves (bf16) and the per-token log-sum-exp; the backward reads
them once and writes the gradient, `(softmax - onehot) * grad`, over the logits' storage (the
output layer's backward needs only its input and weight). Same math in fp32, one rounding to
the logits' dtype, as megatron's.

Under tensor parallelism each rank holds a vocabulary shard: the row statistics are combined
over the TP group (max, then rescaled sums; the target logit comes from the rank that holds it).

CUDA tensors run two Triton kernels (a row per program, the vocabulary in chunks); other
devices run the same computation in PyTorch, chunked over rows.

Legend: N tokens (s * b), V this rank's vocabulary shard.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from model.triton_support import tl, triton, use_triton

ROW_CHUNK_ELEMENTS = 1 << 24  # PyTorch path: rows per chunk x V kept under this many fp32 values


def vocab_parallel_cross_entropy(logits_sbv: torch.Tensor, labels_sb: torch.Tensor,
                                 tp_group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Per-token loss [s, b] (fp32) of logits [s, b, V] (this rank's vocabulary shard, rank r
    holding ids [r*V, (r+1)*V)) against labels [s, b] (global ids). Differentiable in the
    logits; the backward overwrites the logits' storage with their gradient."""
    return _CrossEntropy.apply(logits_sbv, labels_sb, tp_group)


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_sbv, labels_sb, tp_group):
        logits_sbv = logits_sbv.contiguous()  # the gradient is written over this storage
        s, b, vocab = logits_sbv.shape
        tp = dist.get_world_size(tp_group) if tp_group is not None and dist.is_initialized() else 1
        rank = dist.get_rank(tp_group) if tp > 1 else 0
        x_NV = logits_sbv.reshape(s * b, vocab)
        local_N = labels_sb.reshape(-1) - rank * vocab
        local_N = torch.where((local_N >= 0) & (local_N < vocab), local_N, -1)
        max_N, sumexp_N, target_N = _row_stats(x_NV, local_N)
        if tp > 1:
            global_max_N = max_N.clone()
            dist.all_reduce(global_max_N, op=dist.ReduceOp.MAX, group=tp_group)
            sumexp_N = sumexp_N * torch.exp(max_N - global_max_N)
            dist.all_reduce(sumexp_N, group=tp_group)
            dist.all_reduce(target_N, group=tp_group)
            max_N = global_max_N
        lse_N = max_N + torch.log(sumexp_N)
        ctx.save_for_backward(logits_sbv, local_N, lse_N)
        return (lse_N - target_N).view(s, b)

    @staticmethod
    def backward(ctx, grad_sb):
        logits_sbv, local_N, lse_N = ctx.saved_tensors
        s, b, vocab = logits_sbv.shape
        x_NV = logits_sbv.view(s * b, vocab)
        _softmax_grad_(x_NV, local_N, lse_N, grad_sb.reshape(-1).float())
        return logits_sbv, None, None


def _row_stats(x_NV: torch.Tensor, target_N: torch.Tensor):
    """fp32 per row: max, sum of exp(x - max), and x[target] (0 where target is -1)."""
    if use_triton(x_NV):
        n, vocab = x_NV.shape
        out = torch.empty(3, n, device=x_NV.device, dtype=torch.float32)
        if n:
            _row_stats_kernel[(n,)](x_NV, target_N, out[0], out[1], out[2], vocab, x_NV.stride(0), BLOCK=4096)
        return out[0], out[1], out[2]
    maxes, sums, targets = [], [], []
    for rows in _row_chunks(x_NV):
        x = x_NV[rows].float()
        t = target_N[rows]
        m = x.max(dim=-1).values
        maxes.append(m)
        sums.append(torch.exp(x - m[:, None]).sum(dim=-1))
        hit = x.gather(1, t.clamp(min=0)[:, None])[:, 0]
        targets.append(torch.where(t >= 0, hit, 0.0))
    return torch.cat(maxes), torch.cat(sums), torch.cat(targets)


def _softmax_grad_(x_NV: torch.Tensor, target_N: torch.Tensor, lse_N: torch.Tensor, grad_N: torch.Tensor) -> None:
    """x <- (exp(x - lse) - onehot(target)) * grad, row by row, computed in fp32."""
    if use_triton(x_NV):
        n, vocab = x_NV.shape
        if n:
            _softmax_grad_kernel[(n,)](x_NV, target_N, lse_N, grad_N, vocab, x_NV.stride(0), BLOCK=4096)
        return
    for rows in _row_chunks(x_NV):
        p = torch.exp(x_NV[rows].float() - lse_N[rows, None])
        t = target_N[rows]
        hit = (t >= 0)[:, None]
        p.scatter_add_(1, t.clamp(min=0)[:, None], -hit.float())
        x_NV[rows] = (p * grad_N[rows, None]).to(x_NV.dtype)


def _row_chunks(x_NV: torch.Tensor):
    n, vocab = x_NV.shape
    step = max(1, ROW_CHUNK_ELEMENTS // max(vocab, 1))
    for start in range(0, n, step):
        yield slice(start, min(start + step, n))


if triton is not None:

    @triton.jit
    def _row_stats_kernel(X, T, MAX, SUM, TGT, V, stride, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = X + row * stride
        cols = tl.arange(0, BLOCK)
        m = tl.full([BLOCK], float("-inf"), tl.float32)
        acc = tl.zeros([BLOCK], tl.float32)
        for start in range(0, V, BLOCK):
            x = tl.load(base + start + cols, mask=start + cols < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, x)
            # lanes that have seen only -inf keep 0 (exp2 of nan otherwise)
            scale = tl.where(m_new == float("-inf"), 0.0, tl.exp2((m - m_new) * 1.4426950408889634))
            acc = acc * scale + tl.where(m_new == float("-inf"), 0.0, tl.exp2((x - m_new) * 1.4426950408889634))
            m = m_new
        row_max = tl.max(m, axis=0)
        total = tl.sum(acc * tl.exp2((m - row_max) * 1.4426950408889634), axis=0)
        t = tl.load(T + row)
        hit = tl.load(base + tl.maximum(t, 0)).to(tl.float32)
        tl.store(MAX + row, row_max)
        tl.store(SUM + row, total)
        tl.store(TGT + row, tl.where(t >= 0, hit, 0.0))

    @triton.jit
    def _softmax_grad_kernel(X, T, LSE, G, V, stride, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = X + row * stride
        cols = tl.arange(0, BLOCK)
        lse = tl.load(LSE + row)
        g = tl.load(G + row)
        t = tl.load(T + row)
        for start in range(0, V, BLOCK):
            inside = start + cols < V
            x = tl.load(base + start + cols, mask=inside, other=0.0).to(tl.float32)
            p = tl.exp2((x - lse) * 1.4426950408889634) - tl.where(start + cols == t, 1.0, 0.0)
            tl.store(base + start + cols, (p * g).to(X.dtype.element_ty), mask=inside)
