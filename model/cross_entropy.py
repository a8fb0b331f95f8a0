"""Vocab-parallel cross entropy without an fp32 copy of the logits, and the output layer fused
with it, chunk by chunk, without the [tokens, vocab] logits.

`vocab_parallel_cross_entropy` takes the logits. megatron-core's `tensor_parallel.
vocab_parallel_cross_entropy` turns the [tokens, vocab] logits into fp32, shifts, exponentiates
and normalises them in place and keeps that fp32 softmax for backward; its backward scales it
and autograd casts it back to the logits' dtype. With M2's 200K vocabulary that is ~8 passes
over a 3.3 GB fp32 tensor per 4K-token micro-batch and head. Here the forward reads the logits
once (a row's max, sum of exponentials and target logit, in fp32) and keeps the logits
themselves (bf16) and the per-token log-sum-exp; the backward reads them once and writes the
gradient, `(softmax - onehot) * grad`, over the logits' storage (the output layer's backward
needs only its input and weight). Same math in fp32, one rounding to the logits' dtype, as
megatron's.

`linear_cross_entropy` takes the output layer's input and weight instead (what megatron's
ColumnParallelLinear would multiply) and walks the tokens in chunks of `chunk_tokens`: a chunk's
logits are computed (torch.matmul, in the input's dtype, as the output layer computes them),
reduced to the row statistics above and freed; backward recomputes them chunk by chunk, turns
them into their gradient in place and multiplies it into the input's and the weight's
gradients (the weight's accumulated in fp32 over the chunks). So at most one chunk's logits
exist at a time, at the price of the output layer's forward GEMM once more. A micro-batch of at
most `chunk_tokens` tokens is one chunk whose logits are kept for backward instead (no
recompute: they are no larger than the chunk a longer one holds).

Under tensor parallelism each rank holds a vocabulary shard: the row statistics are combined
over the TP group (max, then rescaled sums; the target logit comes from the rank that holds it).
`linear_cross_entropy` also does the output layer's communication: with sequence parallelism it
gathers the input's sequence shards over TP (and reduce-scatters the input's gradient), without
it all-reduces the input's gradient over TP, as ColumnParallelLinear does.

CUDA tensors run two Triton kernels (a row per program, the vocabulary in chunks); other
devices run the same computation in PyTorch, chunked over rows.

Legend: N tokens (s * b), V this rank's vocabulary shard, h hidden, C tokens of a chunk.
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
        tp, rank = _tp_size_rank(tp_group)
        x_NV = logits_sbv.reshape(s * b, vocab)
        local_N = _local_targets(labels_sb, rank, vocab)
        lse_N, target_N = _combine_over_tp(*_row_stats(x_NV, local_N), tp_group if tp > 1 else None)
        ctx.save_for_backward(logits_sbv, local_N, lse_N)
        return (lse_N - target_N).view(s, b)

    @staticmethod
    def backward(ctx, grad_sb):
        logits_sbv, local_N, lse_N = ctx.saved_tensors
        s, b, vocab = logits_sbv.shape
        x_NV = logits_sbv.view(s * b, vocab)
        _softmax_grad_(x_NV, local_N, lse_N, grad_sb.reshape(-1).float())
        return logits_sbv, None, None


def linear_cross_entropy(hidden_sbh: torch.Tensor, weight_vh: torch.Tensor, labels_sb: torch.Tensor, *,
                         tp_group: dist.ProcessGroup | None = None, sequence_parallel: bool = False,
                         chunk_tokens: int = 4096) -> torch.Tensor:
    """Per-token loss [s, b] (fp32) of the output layer `hidden @ weight.T` against labels
    [s, b] (global ids), never holding more than `chunk_tokens` tokens' logits.

    hidden [s, b, h] is the output layer's input on this rank: with `sequence_parallel` its
    shard [s / tp, b, h] of the sequence, gathered over `tp_group` here. weight [V, h] is this
    rank's vocabulary shard (rank r holds ids [r*V, (r+1)*V)). Differentiable in hidden and
    weight, with ColumnParallelLinear's gradients: the input's reduce-scattered over TP under
    sequence parallelism, all-reduced over TP otherwise; the weight's returned (megatron's
    gradient-accumulation fusion, which would add it into main_grad, is off in our config)."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens={chunk_tokens} must be >= 1")
    return _LinearCrossEntropy.apply(hidden_sbh, weight_vh, labels_sb, tp_group, sequence_parallel, chunk_tokens)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_sbh, weight_vh, labels_sb, tp_group, sequence_parallel, chunk_tokens):
        tp, rank = _tp_size_rank(tp_group)
        group = tp_group if tp > 1 else None
        sequence_parallel = sequence_parallel and tp > 1
        x_Nh = _gather_tokens(hidden_sbh, group) if sequence_parallel else hidden_sbh.reshape(-1, hidden_sbh.shape[-1])
        n, vocab = x_Nh.shape[0], weight_vh.shape[0]
        assert labels_sb.numel() == n, (labels_sb.shape, hidden_sbh.shape)
        local_N = _local_targets(labels_sb, rank, vocab)
        stats_3N = torch.empty(3, n, device=x_Nh.device, dtype=torch.float32)
        kept = None
        for rows in _token_chunks(n, chunk_tokens):
            logits_CV = torch.matmul(x_Nh[rows], weight_vh.t())  # [C, V], as the output layer computes it
            for out, stat in zip(stats_3N[:, rows], _row_stats(logits_CV, local_N[rows])):
                out.copy_(stat)
            if n <= chunk_tokens:
                kept = logits_CV  # the only chunk: kept for backward, not recomputed
        lse_N, target_N = _combine_over_tp(stats_3N[0], stats_3N[1], stats_3N[2], group)
        ctx.save_for_backward(hidden_sbh, weight_vh, local_N, lse_N, *([kept] if kept is not None else []))
        ctx.group, ctx.sequence_parallel, ctx.chunk_tokens = group, sequence_parallel, chunk_tokens
        return (lse_N - target_N).view(labels_sb.shape)

    @staticmethod
    def backward(ctx, grad_sb):
        hidden_sbh, weight_vh, local_N, lse_N, *kept = ctx.saved_tensors
        group, sequence_parallel = ctx.group, ctx.sequence_parallel
        x_Nh = _gather_tokens(hidden_sbh, group) if sequence_parallel else hidden_sbh.reshape(-1, hidden_sbh.shape[-1])
        n, vocab = x_Nh.shape[0], weight_vh.shape[0]
        want_x, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_N = grad_sb.reshape(-1).float()
        dx_Nh = torch.empty_like(x_Nh) if want_x else None
        chunks = list(_token_chunks(n, ctx.chunk_tokens))
        dw_vh = None
        if want_w and len(chunks) > 1:
            dw_vh = torch.zeros(vocab, x_Nh.shape[1], device=x_Nh.device, dtype=torch.float32)
        for rows in chunks:
            logits_CV = kept[0] if kept else torch.matmul(x_Nh[rows], weight_vh.t())
            _softmax_grad_(logits_CV, local_N[rows], lse_N[rows], grad_N[rows])  # now d loss / d logits
            if want_x:
                torch.matmul(logits_CV, weight_vh, out=dx_Nh[rows])
            if want_w and dw_vh is None:
                dw_vh = logits_CV.t().matmul(x_Nh[rows])
            elif want_w and x_Nh.dtype == torch.float32:
                dw_vh.addmm_(logits_CV.t(), x_Nh[rows])
            elif want_w:
                dw_vh += logits_CV.t().matmul(x_Nh[rows])
        if dw_vh is not None:
            dw_vh = dw_vh.to(weight_vh.dtype)
        dx = None
        if want_x and sequence_parallel:
            dx = _reduce_scatter_tokens(dx_Nh, hidden_sbh.shape, group)
        elif want_x:
            if group is not None:
                dist.all_reduce(dx_Nh, group=group)
            dx = dx_Nh.view(hidden_sbh.shape)
        return dx, dw_vh, None, None, None, None


def _tp_size_rank(tp_group) -> tuple[int, int]:
    tp = dist.get_world_size(tp_group) if tp_group is not None and dist.is_initialized() else 1
    return tp, (dist.get_rank(tp_group) if tp > 1 else 0)


def _local_targets(labels_sb: torch.Tensor, rank: int, vocab: int) -> torch.Tensor:
    """Labels as ids of this rank's vocabulary shard, -1 where another rank holds them. [N]"""
    local_N = labels_sb.reshape(-1) - rank * vocab
    return torch.where((local_N >= 0) & (local_N < vocab), local_N, -1)


def _combine_over_tp(max_N, sumexp_N, target_N, group):
    """Log-sum-exp and target logit of each row over the vocabulary shards of `group` (None:
    this rank holds the whole vocabulary)."""
    if group is not None:
        global_max_N = max_N.clone()
        dist.all_reduce(global_max_N, op=dist.ReduceOp.MAX, group=group)
        sumexp_N = sumexp_N * torch.exp(max_N - global_max_N)
        dist.all_reduce(sumexp_N, group=group)
        dist.all_reduce(target_N, group=group)
        max_N = global_max_N
    return max_N + torch.log(sumexp_N), target_N


def _token_chunks(n: int, chunk: int):
    for start in range(0, n, chunk):
        yield slice(start, min(start + chunk, n))


def _gather_tokens(x_sbh: torch.Tensor, group) -> torch.Tensor:
    """The sequence shards [s/tp, b, h] of the TP group, concatenated along s, as rows [N, h]."""
    tp = dist.get_world_size(group)
    out = torch.empty((tp * x_sbh.shape[0], *x_sbh.shape[1:]), device=x_sbh.device, dtype=x_sbh.dtype)
    dist.all_gather_into_tensor(out, x_sbh.contiguous(), group=group)
    return out.view(-1, x_sbh.shape[-1])


def _reduce_scatter_tokens(dx_Nh: torch.Tensor, shard_shape, group) -> torch.Tensor:
    """The sum over the TP group of each rank's [s, b, h] gradient, this rank's sequence shard."""
    out = torch.empty(shard_shape, device=dx_Nh.device, dtype=dx_Nh.dtype)
    dist.reduce_scatter_tensor(out, dx_Nh.view(-1, *shard_shape[1:]), group=group)
    return out


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
