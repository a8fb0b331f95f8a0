"""megatron-core 0.16.1's optimizer path on CUDA without Apex or Transformer Engine, made fast.

Without either, megatron falls back to
- `megatron/core/utils.py local_multi_tensor_l2_norm` for the gradient norm (as
  `clip_grads.l2_norm_impl`): a norm per tensor, gathered with `torch.tensor(list of CUDA
  scalars)`, i.e. a device-to-host copy and sync per parameter tensor;
- `local_multi_tensor_scale` (as `multi_tensor_scale_impl` in `optimizer/clip_grads.py` and
  `optimizer/optimizer.py`) for clipping and for copying the fp32 main weights into the bf16
  model weights after every step: a multiply and a copy per tensor;
- `torch.optim.AdamW` built without `fused=True` (`optimizer/__init__.py
  _get_megatron_optimizer_based_on_param_groups`): torch's multi-tensor (foreach) Adam, several
  passes over the fp32 weights and moments.

Measured on one H100 (bench/train_throughput.py, proxy_1gpu at 4K, 2.6B parameters) the
optimizer step took 0.14 s of a 1.53 s step. The replacements below do the same arithmetic:
the norm from `torch._foreach_norm` in fp32 on the device, scaling and copies with
`torch._foreach_*`, and torch's fused AdamW kernel. `pretrain.trainer.Trainer` applies them
where `needed()`; nothing changes on CPU (parallel/cpu_patches.py handles that) or where
Apex/TE provide megatron's fused kernels.
"""

from __future__ import annotations

import torch


def needed() -> bool:
    """CUDA without Apex or Transformer Engine (megatron then uses its local fallbacks)."""
    from megatron.core import optimizer

    return torch.cuda.is_available() and optimizer.USING_PYTORCH_OPTIMIZER


def foreach_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """Stands in for utils.local_multi_tensor_l2_norm (amp_C.multi_tensor_l2norm's
    signature): the l2 norm over all tensors of tensor_lists[0], fp32, as a 1-element device
    tensor, without a host sync."""
    tensors = tensor_lists[0]
    norms = torch._foreach_norm(tensors, 2, dtype=torch.float32)
    return torch.linalg.vector_norm(torch.stack(norms)).reshape(1), None


def foreach_scale(chunk_size, noop_flag, tensor_lists, scale):
    """Stands in for utils.local_multi_tensor_scale (amp_C.multi_tensor_scale's signature):
    dst = src * scale for each pair of tensor_lists = [src, dst] (in place when they are the
    same tensors, a plain copy, with dtype conversion, when scale is 1)."""
    src, dst = tensor_lists
    if not src:
        return
    if all(s is d for s, d in zip(src, dst)):
        torch._foreach_mul_(dst, scale)
    elif scale == 1.0:
        torch._foreach_copy_(dst, src)
    else:
        torch._foreach_copy_(dst, torch._foreach_mul(src, scale))


def apply() -> None:
    """Install the norm and scale stand-ins in megatron's optimizer modules."""
    from megatron.core.optimizer import clip_grads, optimizer

    clip_grads.l2_norm_impl = foreach_l2_norm
    clip_grads.multi_tensor_scale_impl = foreach_scale
    optimizer.multi_tensor_scale_impl = foreach_scale


def fuse_adam(megatron_optimizer) -> int:
    """Switch every torch AdamW inside a megatron (chained) optimizer to torch's fused kernel
    (same update; the step count then lives on the device). Returns how many were switched."""
    inner = getattr(megatron_optimizer, "chained_optimizers", [megatron_optimizer])
    switched = 0
    for opt in inner:
        torch_opt = getattr(opt, "optimizer", None)
        if not isinstance(torch_opt, torch.optim.Adam):  # AdamW subclasses Adam
            continue
        torch_opt.defaults.update(fused=True, foreach=False)
        for group in torch_opt.param_groups:
            group.update(fused=True, foreach=False)
        switched += 1
    return switched
