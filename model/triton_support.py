"""Whether our small Triton kernels (cross entropy, RMSNorm) run on a tensor.

They run on CUDA tensors, and on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1,
which the tests use without a GPU); elsewhere the callers use their PyTorch paths. Installs
without triton (CPU wheels on some platforms) get `triton = None`.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def use_triton(x: torch.Tensor) -> bool:
    """True where the kernels run on x (contiguous rows)."""
    return triton is not None and x.stride(-1) == 1 and (x.is_cuda or INTERPRET)
