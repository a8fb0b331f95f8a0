"""What the sm90 Gluon kernels of MSA (`attention_sm90`, `select_sm90`) share: the dtypes they
take, the accumulator layout of one warpgroup's wgmma, and a TMA block load.

Legend: D head dim (or the padded index head dim), bs block size.
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import constexpr_function
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma

GL_DTYPE = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}


def takes(dtype: torch.dtype, width: int, block_size: int) -> bool:
    """Whether the sm90 kernels take inputs of this dtype and head width D (as the kernel sees
    it), with blocks of this many keys. The device (sm90) and the Triton version are
    `model.msa.dispatch`'s to check."""
    return dtype in GL_DTYPE and width in (64, 128) and 16 <= triton.next_power_of_2(block_size) <= 128


@constexpr_function
def wg_mma(n):
    """The accumulator layout of one warpgroup's wgmma of instruction width n: the rows (and so
    any row reduction) sit in the same threads whatever n is."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, n, 16])


@gluon.jit
def load_block(desc, smem, bar, row, col):
    mbarrier.expect(bar, desc.block_type.nbytes)
    tma.async_copy_global_to_shared(desc, [row, col], bar, smem)
