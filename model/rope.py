"""Rotary position embedding (RoPE) applied by one Triton kernel per direction.

`apply_rotary_pos_emb` is a drop-in for megatron-core 0.16.1's
`megatron/core/models/common/embeddings/rope_utils.py` `apply_rotary_pos_emb` (same signature,
the same result up to rounding) for CUDA without Transformer Engine. Upstream's unfused path
(`_apply_rotary_pos_emb_bshd`) runs about six element-wise kernels plus two `torch.cat` (the
rotate-half, and joining the rotated and pass-through dims under partial rotary) in each
direction; here each direction reads t once and writes the result once, computing cos and sin
from `freqs` in fp32 in the kernel.

The kernel takes the common case: the bshd layout with rotate-half (not interleaved) rotation
of the first rot_dim dims of each head and a freqs row per position. Every other case (packed
thd sequences, interleaved or multi-latent RoPE, TE's fused RoPE, ...) goes to upstream.

Legend: s sequence, b batch, h heads, d head dim, r = rot_dim (the rotated leading dims of d).
"""

from __future__ import annotations

import torch
from megatron.core.models.common.embeddings import rope_utils
from megatron.core.transformer import TransformerConfig

from model.triton_support import tl, triton, use_triton

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def apply_rotary_pos_emb(
    t: torch.Tensor,
    freqs: torch.Tensor,
    config: TransformerConfig,
    cu_seqlens: torch.Tensor | None = None,
    mscale: float = 1.0,
    cp_group: torch.distributed.ProcessGroup = None,
) -> torch.Tensor:
    """megatron-core's `apply_rotary_pos_emb`, on a Triton kernel where `_takes_kernel` says.

    t_sbhd [s, b, h, d] and freqs_s11r [s, 1, 1, r] (r <= d, even): the first r dims of each head
    become t1 * cos(f1) * mscale - t2 * sin(f1) * mscale and t2 * cos(f2) * mscale + t1 *
    sin(f2) * mscale (t1, f1 the first r/2 dims, t2, f2 the next r/2), the other d - r dims pass
    through; the result is [s, b, h, d] in t's dtype. Upstream rounds cos and sin to t's dtype
    before multiplying; the kernel keeps them, and the products, in fp32.

    On the kernel path cp_group is unused (upstream reads it only for packed sequences, but
    with cp_group=None asks parallel_state for the context-parallel group first).
    """
    if _takes_kernel(t, freqs, config, cu_seqlens, mscale):
        return _RotaryPosEmb.apply(t, freqs, float(mscale))
    return rope_utils.apply_rotary_pos_emb(
        t, freqs, config, cu_seqlens=cu_seqlens, mscale=mscale, cp_group=cp_group
    )


def _takes_kernel(t, freqs, config, cu_seqlens, mscale) -> bool:
    """Whether this is the case the kernel implements: upstream's unfused bshd path with a
    freqs row per position, rotate-half, and a gradient for t only."""
    return (
        use_triton(t)
        and cu_seqlens is None
        and not config.apply_rope_fusion
        and not config.rotary_interleaved
        and not config.multi_latent_attention
        and isinstance(mscale, (int, float))
        and t.dtype in _KERNEL_DTYPES
        and t.dim() == 4
        and freqs.dim() == 4
        and freqs.is_floating_point()
        and not freqs.requires_grad  # the kernel gives no gradient for freqs
        and freqs.device == t.device
        and freqs.shape[0] == t.shape[0]
        and freqs.shape[1] == freqs.shape[2] == 1
        and freqs.shape[3] % 2 == 0
        and 0 < freqs.shape[3] <= t.shape[3]
    )


class _RotaryPosEmb(torch.autograd.Function):
    """Forward rotates by the angle freqs; backward applies the transposed rotation (the
    rotation by minus the angle when both halves of freqs agree) and passes the rest through."""

    @staticmethod
    def forward(ctx, t_sbhd, freqs_s11r, mscale):
        ctx.save_for_backward(freqs_s11r)
        ctx.mscale = mscale
        return _rope(t_sbhd, freqs_s11r, mscale, backward=False)

    @staticmethod
    def backward(ctx, dy_sbhd):
        (freqs_s11r,) = ctx.saved_tensors
        return _rope(dy_sbhd, freqs_s11r, ctx.mscale, backward=True), None, None


def _rope(x_sbhd: torch.Tensor, freqs_s11r: torch.Tensor, mscale: float, backward: bool) -> torch.Tensor:
    """Launch the kernel over x_sbhd (any strides with a unit last one); a contiguous result."""
    if x_sbhd.stride(-1) != 1:
        x_sbhd = x_sbhd.contiguous()
    s, b, h, d = x_sbhd.shape
    rot = freqs_s11r.shape[-1]
    y_sbhd = torch.empty((s, b, h, d), dtype=x_sbhd.dtype, device=x_sbhd.device)
    if y_sbhd.numel() == 0:
        return y_sbhd
    block_r = triton.next_power_of_2(rot // 2)
    block_p = triton.next_power_of_2(d - rot) if d > rot else 0
    # A tile of heads of ~2K elements: M2's q (48 heads, d 128) in three programs per token.
    block_h = min(triton.next_power_of_2(h), max(1, 2048 // (2 * block_r + block_p)))
    grid = (s * b, triton.cdiv(h, block_h))
    _rope_kernel[grid](
        x_sbhd, freqs_s11r, y_sbhd, b, h, d, rot // 2,
        x_sbhd.stride(0), x_sbhd.stride(1), x_sbhd.stride(2), freqs_s11r.stride(0), freqs_s11r.stride(3),
        mscale, BACKWARD=backward, BLOCK_H=block_h, BLOCK_R=block_r, BLOCK_P=block_p, num_warps=4,
    )
    return y_sbhd


if triton is not None:

    @triton.jit
    def _rope_kernel(X, F, Y, B, H, D, HALF, stride_xs, stride_xb, stride_xh, stride_fs, stride_fd,
                     mscale, BACKWARD: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr,
                     BLOCK_P: tl.constexpr):
        """Y[s, b, heads of this tile] from X[s, b, same heads]: the 2x2 rotation of each
        (j, j + HALF) pair for j < HALF (its transpose if BACKWARD), a copy of dims >= 2 HALF."""
        row = tl.program_id(0)  # s * B + b
        pos = row // B
        heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        j = tl.arange(0, BLOCK_R)
        in_r = j < HALF
        f1 = tl.load(F + pos * stride_fs + j * stride_fd, mask=in_r, other=0.0).to(tl.float32)
        f2 = tl.load(F + pos * stride_fs + (j + HALF) * stride_fd, mask=in_r, other=0.0).to(tl.float32)
        cos1 = tl.cos(f1) * mscale
        cos2 = tl.cos(f2) * mscale
        if BACKWARD:
            sin_a = -tl.sin(f2) * mscale
            sin_b = -tl.sin(f1) * mscale
        else:
            sin_a = tl.sin(f1) * mscale
            sin_b = tl.sin(f2) * mscale

        x_row = X + pos.to(tl.int64) * stride_xs + (row % B).to(tl.int64) * stride_xb
        x_heads = heads[:, None].to(tl.int64) * stride_xh
        y_row = Y + row.to(tl.int64) * H * D
        y_heads = heads[:, None].to(tl.int64) * D
        in_h = heads[:, None] < H

        mask = in_h & in_r[None, :]
        x1 = tl.load(x_row + x_heads + j[None, :], mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_row + x_heads + HALF + j[None, :], mask=mask, other=0.0).to(tl.float32)
        y1 = x1 * cos1[None, :] - x2 * sin_a[None, :]
        y2 = x2 * cos2[None, :] + x1 * sin_b[None, :]
        tl.store(y_row + y_heads + j[None, :], y1.to(Y.dtype.element_ty), mask=mask)
        tl.store(y_row + y_heads + HALF + j[None, :], y2.to(Y.dtype.element_ty), mask=mask)

        if BLOCK_P > 0:
            p = 2 * HALF + tl.arange(0, BLOCK_P)
            mask_p = in_h & (p[None, :] < D)
            x_pass = tl.load(x_row + x_heads + p[None, :], mask=mask_p)
            tl.store(y_row + y_heads + p[None, :], x_pass, mask=mask_p)
