"""What the Triton kernels of MSA share: tile configurations, operand preparation, small helpers.

Legend: B batch, S tokens, G KV heads (= GQA groups = index query heads), Di index head dim,
DI = Di padded to a power of two.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class AttnConfig:
    """Tile sizes of the Triton attention kernels (the benchmark varies them; the defaults are
    the measured choice on H100). The sm90 Gluon kernels have tiles of their own and run only
    with block_m 128 (`model.msa.dispatch` decides which kernels run)."""

    block_m: int = 128  # rows (token, head) per query-outer tile, also the plan's tile
    fwd_warps: int = 8
    fwd_stages: int = 2
    fwd_sub_n: int = 128  # keys per step in the forward (64: a block in two steps, smaller stages)
    fwd_tma: bool = True  # forward K/V loads by tensor descriptors (TMA on Hopper)
    dq_sub_n: int = 64  # keys per step inside a block in the dq kernel
    dq_warps: int = 8
    dq_stages: int = 2
    dq_tma: bool = False  # the same in the dq kernel
    skip_mask: bool = True  # forward: skip the per-element mask where every row takes the block
    dq_skip_mask: bool = False  # the same in the dq loop (measured slower there: NOTES)


# CPU (interpreter tests): pointer loads; the TMA path has tests of its own
_CPU_CONFIG = AttnConfig(block_m=32, fwd_sub_n=32, fwd_tma=False, dq_sub_n=16)

# selection tile on CUDA: 128 tokens, 8 warps, 64-key steps (bench/NOTES_msa.md; the
# benchmark may override)
SELECT_TILE = dict(block_t=128, num_warps=8, num_stages=3, sub_n=64)


# fp32 inputs on CUDA (tests and checks, not training): tiles that fit shared memory at d 128
_SELECT_TILE_FP32 = dict(block_t=64, num_warps=4, num_stages=2, sub_n=32)
_CUDA_FP32_CONFIG = AttnConfig(block_m=64, fwd_warps=4, fwd_stages=2, fwd_sub_n=32, fwd_tma=False,
                               dq_sub_n=32, dq_warps=4, dq_stages=2, dq_tma=False)


def attn_config_for(device: torch.device, dtype: torch.dtype) -> AttnConfig:
    """The default tiles of the attention kernels (and the block mass) for tensors of this
    device and dtype."""
    if device.type != "cuda":
        return _CPU_CONFIG
    return _CUDA_FP32_CONFIG if dtype == torch.float32 else AttnConfig()


def select_tile(iq: torch.Tensor) -> dict:
    """Token tile of the kernels that score index queries against index keys."""
    if not iq.is_cuda:
        return dict(block_t=16, num_warps=4, num_stages=2, sub_n=16)
    # fp32 tiles take twice the shared memory
    return _SELECT_TILE_FP32 if iq.dtype == torch.float32 else SELECT_TILE


# block scores forward on CUDA in bf16/fp16 (`indexer.block_scores_argmax`): 128 tokens (its
# backward walks the same plan), 4 warps, 2 stages, 128-key steps; at 128K, 48/8 heads on the
# H200 2.14 ms against 2.35 with the selection's tile (bench/msa.py --variants, `scores_tiles`)
SCORES_TILE = dict(block_t=128, num_warps=4, num_stages=2, sub_n=128)


def scores_tile(iq: torch.Tensor) -> dict:
    """Token tile of the block scores forward (fp32 and the interpreter: the selection's)."""
    return SCORES_TILE if iq.is_cuda and iq.dtype != torch.float32 else select_tile(iq)


def pow2(x: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(x))


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: exact fp32 products (tf32 would move selections and miss 1e-5 tolerances);
    # bf16/fp16 inputs take the tensor cores natively whatever this says.
    return "ieee" if dtype == torch.float32 else "tf32"


def index_operands(index_q: torch.Tensor, index_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """index_q [B, S, G, Di], index_k [B, SK, Di] -> the same contiguous, in index_q's dtype, the
    head dim zero-padded to DI = a power of two (which leaves every score unchanged)."""
    Di = index_q.shape[-1]
    DI = pow2(Di)
    iq = index_q.contiguous()
    ik = index_k.contiguous().to(iq.dtype)
    if DI != Di:
        iq = torch.nn.functional.pad(iq, (0, DI - Di))
        ik = torch.nn.functional.pad(ik, (0, DI - Di))
    return iq, ik
