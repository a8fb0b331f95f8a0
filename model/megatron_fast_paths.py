"""Faster stand-ins for megatron-core 0.16.1 functions that run unfused without Transformer
Engine, installed by `model.builder.build_model` (every backend, every device: each stand-in
takes its fast path only where it applies and calls the upstream function otherwise).

Each entry: the upstream function, the module attribute that megatron's callers look up, and
ours.

- MoE token permutation, `megatron/core/transformer/moe/moe_utils.py permute / unpermute` as
  imported into `megatron/core/transformer/moe/token_dispatcher.py`: `model/moe_permute.py`
  (gathers and fp32 sums over each token's k copies instead of atomic index_add; dropless
  routing only).
- Rotary embeddings, `megatron/core/models/common/embeddings/rope_utils.py
  apply_rotary_pos_emb` as imported into `megatron/core/transformer/attention.py`:
  `model/rope.py` (one Triton kernel each way on CUDA, instead of ~6 element-wise ops and two
  concatenations; megatron's fused RoPE needs Transformer Engine). The MSA index branch calls
  `model.rope` directly.
"""

from __future__ import annotations

from model import moe_permute, rope


def install() -> None:
    """Replace the upstream names (idempotent)."""
    from megatron.core.transformer import attention
    from megatron.core.transformer.moe import token_dispatcher

    attention.apply_rotary_pos_emb = rope.apply_rotary_pos_emb
    token_dispatcher.permute = moe_permute.permute
    token_dispatcher.unpermute = moe_permute.unpermute
