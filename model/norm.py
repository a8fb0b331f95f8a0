"""RMSNorm modules for the M2 layers.

`RMSNorm` replaces megatron-core's `WrappedTorchNorm` on the local backend: the wrapped
`torch.nn.RMSNorm` refuses sequence parallelism, while this one marks its weight so that
`finalize_model_grads` sums its gradient over the tensor-parallel group.

`GemmaRMSNorm` is M3's form of every norm, `x / rms(x) * (1 + w)` with w starting at 0 (the
weight M3 checkpoints store); the local backend builds it in place of `RMSNorm` for
model.norm_style=gemma, per head for M3's QK-norm (megatron's `qk_layernorm` slots give it the
head dim).

`LayerQKNorm` is M2's "per layer" QK-norm: one RMSNorm over the whole q projection
(heads x head_dim, 6144 wide in M2) and one over the whole k projection (1024 wide), not
megatron-core's per-head `qk_layernorm`. Under tensor parallelism each rank holds a slice of
the heads, so the mean square is summed over the TP group and the weight is sharded like the
projection.

On CUDA (and under Triton's interpreter) both run `rms_norm`: one Triton kernel per
direction, a row per program forward, and rows in strips backward with the weight gradient
summed per strip (the PyTorch version is ~8 element-wise kernels forward and ~12 backward over
fp32 copies). LayerQKNorm under TP > 1 keeps the PyTorch path (its sum of squares is
all-reduced between the two halves of the kernel).

Legend: s sequence, b batch, n heads on this rank, d head dim, M rows, N row width.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state

from model.triton_support import tl, triton, use_triton
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer import TransformerConfig


class RMSNorm(torch.nn.Module):
    """y = x / rms(x) * w over the last dim, computed in fp32."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6, **_):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(
            torch.ones(hidden_size, dtype=config.params_dtype, device=_init_device(config))
        )
        # A sequence-parallel input means each TP rank saw different tokens: the weight's
        # gradient is partial and finalize_model_grads must sum it over the TP group.
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return apply_rms_norm(x, self.weight, self.eps)


def apply_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., N] / rms(x) * weight [N], in fp32, returned in x's dtype: `rms_norm`'s kernel
    where Triton runs, the same math in PyTorch elsewhere."""
    if use_triton(x):
        return rms_norm(x, weight, eps)
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype)


class GemmaRMSNorm(RMSNorm):
    """y = x / rms(x) * (1 + w) over the last dim, in fp32 (1 + w formed in fp32, as
    transformers' MiniMaxM3VLRMSNorm does); w starts at 0."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6, **kwargs):
        super().__init__(config, hidden_size, eps, **kwargs)
        with torch.no_grad():
            self.weight.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = 1.0 + self.weight.float()
        if use_triton(x):
            return rms_norm(x, scale, self.eps)
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps) * scale).to(x.dtype)


class _SumOverGroup(torch.autograd.Function):
    """All-reduce (sum) in forward and backward.

    Each TP rank uses the summed value for its own slice of heads, so the loss depends on the
    sum through every rank: the gradient of the sum is the sum of the ranks' gradients.
    (megatron's reduce_from_tensor_model_parallel_region has an identity backward, which is
    right only when every rank consumes the reduced value identically.)
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        x = x.clone()
        torch.distributed.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone()
        torch.distributed.all_reduce(grad, group=ctx.group)
        return grad, None


class LayerQKNorm(torch.nn.Module):
    """RMSNorm over all heads of q (or k) of one token, correct under tensor parallelism.

    Plugs into megatron-core's `SelfAttention` `q_layernorm`/`k_layernorm` slots, which call it
    on [s, b, n, d] after the QKV projection and before RoPE. `which` picks the width:
    "q" = num_attention_heads * kv_channels, "k" = num_query_groups * kv_channels.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6, *, which: str, **_):
        super().__init__()
        assert which in ("q", "k"), which
        heads = config.num_attention_heads if which == "q" else config.num_query_groups
        tp = parallel_state.get_tensor_model_parallel_world_size()
        assert heads % tp == 0, f"{which} heads {heads} not divisible by TP {tp}"
        self.full_width = heads * hidden_size  # hidden_size is the head dim here
        self.eps = eps
        self.weight = torch.nn.Parameter(
            torch.ones(
                heads // tp * hidden_size, dtype=config.params_dtype, device=_init_device(config)
            )
        )
        # Sharded along dim 0 exactly like the heads of the projection it normalises.
        set_tensor_model_parallel_attributes(self.weight, is_parallel=True, dim=0, stride=1)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        """The weight is split over TP along dim 0 (like the heads), so checkpoints reshard it."""
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        state_dict = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(state_dict, prefix, {"weight": 0}, sharded_offsets)

    def forward(self, x_sbnd: torch.Tensor) -> torch.Tensor:
        s, b, n, d = x_sbnd.shape
        tp_group = parallel_state.get_tensor_model_parallel_group()
        if tp_group.size() == 1 and use_triton(x_sbnd):
            return rms_norm(x_sbnd.reshape(s, b, n * d), self.weight, self.eps).view(s, b, n, d)
        x32 = x_sbnd.float().reshape(s, b, n * d)
        sum_sq = x32.pow(2).sum(-1, keepdim=True)  # [s, b, 1]
        if tp_group.size() > 1:
            sum_sq = _SumOverGroup.apply(sum_sq, tp_group)
        y = x32 * torch.rsqrt(sum_sq / self.full_width + self.eps) * self.weight.float()
        return y.to(x_sbnd.dtype).reshape(s, b, n, d)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2 over the last dim) + eps) * weight, in fp32, returned in x's dtype;
    differentiable in x and weight (Triton kernels)."""
    return _RMSNorm.apply(x, weight, eps)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        n = x.shape[-1]
        x_MN = x.reshape(-1, n).contiguous()
        m = x_MN.shape[0]
        y_MN = torch.empty_like(x_MN)
        rstd_M = torch.empty(m, device=x.device, dtype=torch.float32)
        block, warps = _block(n)
        if m:
            _rms_norm_fwd[(m,)](x_MN, weight, y_MN, rstd_M, n, eps, BLOCK=block, num_warps=warps)
        ctx.save_for_backward(x_MN, weight, rstd_M)
        return y_MN.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x_MN, weight, rstd_M = ctx.saved_tensors
        m, n = x_MN.shape
        dy_MN = dy.reshape(m, n).contiguous()
        dx_MN = torch.empty_like(x_MN)
        strips = max(1, min(m, 4 * _processors(x_MN.device)))
        dw_part = torch.empty(strips, n, device=x_MN.device, dtype=torch.float32)
        block, warps = _block(n)
        if m:
            _rms_norm_bwd[(strips,)](dy_MN, x_MN, weight, rstd_M, dx_MN, dw_part, m, n, triton.cdiv(m, strips),
                                     BLOCK=block, num_warps=warps)
        else:
            dw_part.zero_()
        return dx_MN.view(dy.shape), dw_part.sum(0).to(weight.dtype), None


def _block(n: int) -> tuple[int, int]:
    block = triton.next_power_of_2(n)
    return block, min(16, max(4, block // 512))


def _processors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2


if triton is not None:

    @triton.jit
    def _rms_norm_fwd(X, W, Y, RSTD, N, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        inside = cols < N
        x = tl.load(X + row * N + cols, mask=inside, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / N + eps)
        w = tl.load(W + cols, mask=inside, other=0.0).to(tl.float32)
        tl.store(Y + row * N + cols, (x * rstd * w).to(Y.dtype.element_ty), mask=inside)
        tl.store(RSTD + row, rstd)

    @triton.jit
    def _rms_norm_bwd(DY, X, W, RSTD, DX, DW, M, N, rows_per_strip, BLOCK: tl.constexpr):
        strip = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        inside = cols < N
        w = tl.load(W + cols, mask=inside, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK], tl.float32)
        first = strip * rows_per_strip
        for i in range(0, rows_per_strip):
            row = (first + i).to(tl.int64)
            if row < M:
                x = tl.load(X + row * N + cols, mask=inside, other=0.0).to(tl.float32)
                g = tl.load(DY + row * N + cols, mask=inside, other=0.0).to(tl.float32)
                rstd = tl.load(RSTD + row)
                xhat = x * rstd
                gw = g * w
                c = tl.sum(gw * xhat, axis=0) / N
                tl.store(DX + row * N + cols, (rstd * (gw - xhat * c)).to(DX.dtype.element_ty), mask=inside)
                dw += g * xhat
        tl.store(DW + strip * N + cols, dw, mask=inside)


def _init_device(config: TransformerConfig) -> torch.device | int | None:
    # None = torch's default device, so a `with torch.device("meta")` build allocates nothing.
    if config.use_cpu_initialization or not torch.cuda.is_available():
        return None
    return torch.cuda.current_device()
