"""Dense core attention of the local backend: PyTorch's fused scaled_dot_product_attention.

megatron-core's local `DotProductAttention` materialises the [b, h, s, s] scores and repeats k
and v to every query head; `SDPAttention` takes the same constructor and forward arguments and
hands the work to `F.scaled_dot_product_attention`, which on CUDA runs flash / cuDNN /
memory-efficient kernels (O(s) memory, the log-sum-exp kept for backward) and on CPU its
flash-style kernel. GQA goes in as is (`enable_gqa=True`): backends that support it read each
k/v head once for its group of query heads; the others expand k/v inside SDPA.

Context parallelism: with `parallel_state.get_context_parallel_world_size() > 1` each rank holds
a load-balanced slice of the sequence and attention runs as ring attention over the CP group
(`parallel.context_parallel.ring_attention`).

Legend: s sequence (this rank's), b batch, h query heads, g KV groups, d head dim (all per TP rank).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.utils import divide


class SDPAttention(MegatronModule):
    """Drop-in for megatron's local `DotProductAttention`: q [s, b, h, d], k and v [s, b, g, d]
    (after QK-norm and RoPE) -> [s, b, h*d]. Causal or with megatron's boolean mask (True =
    masked out); no attention bias, no packed sequences."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        assert config.softmax_type == "vanilla", "SDPAttention has no softmax offset"
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        tp = parallel_state.get_tensor_model_parallel_world_size() if pg_collection is None else pg_collection.tp.size()
        self.heads = divide(config.num_attention_heads, tp)
        self.groups = divide(config.num_query_groups, tp)
        head_dim = config.kv_channels
        self.softmax_scale = 1.0 / math.sqrt(head_dim) if softmax_scale is None else softmax_scale
        if config.apply_query_key_layer_scaling:  # megatron's scaling: 1/(sqrt(d) * layer)
            self.softmax_scale /= self.layer_number
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        assert packed_seq_params is None, "SDPAttention does not support packed sequences"
        assert attention_bias is None, "SDPAttention does not support an attention bias"
        s, b = query.shape[:2]
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        if parallel_state.get_context_parallel_world_size() > 1:
            from parallel.context_parallel import ring_attention

            assert mask_type == AttnMaskType.causal, "context parallelism supports causal attention only"
            out_bshd = ring_attention(
                query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1),
                cp_group=parallel_state.get_context_parallel_group(), softmax_scale=self.softmax_scale,
            )
            return out_bshd.transpose(0, 1).reshape(s, b, -1)
        causal = mask_type == AttnMaskType.causal
        # Causal layers ignore the mask, as Transformer Engine's attention does: the mask
        # megatron builds for a causal GPT is the causal mask itself.
        mask = None if causal or attention_mask is None else ~attention_mask
        dropout = self.dropout if self.training else 0.0
        q_bhsd, k_bgsd, v_bgsd = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        with tensor_parallel.get_cuda_rng_tracker().fork() if dropout > 0 else contextlib.nullcontext():
            out_bhsd = F.scaled_dot_product_attention(
                q_bhsd, k_bgsd, v_bgsd, attn_mask=mask, dropout_p=dropout, is_causal=causal,
                scale=self.softmax_scale, enable_gqa=self.groups != self.heads,
            )
        return out_bhsd.permute(2, 0, 1, 3).reshape(s, b, -1)



def causal_attention_with_lse(q_bshd: torch.Tensor, k_bsgd: torch.Tensor, v_bsgd: torch.Tensor,
                              softmax_scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal GQA attention that also returns the log-sum-exp SDPA computes anyway.

    q [B, S, Hq, D], k and v [B, S, G, D] -> out [B, S, Hq, D] (differentiable in q, k, v) and
    lse [B, S, Hq] fp32 of the scaled scores (no gradient), or None where no flash kernel
    returns it (CUDA in fp32): then out comes from plain SDPA. The lse lets the MSA dense
    warm-up compute its indexer target in one pass over the keys instead of two.
    """
    scale = q_bshd.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    q, k, v = (t.transpose(1, 2) for t in (q_bshd, k_bsgd, v_bsgd))  # [B, heads, S, D]
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        # FlashAttention-2 reads the G k/v heads for their groups of query heads itself.
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True, False, scale=scale)[:2]
    elif q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, scale=scale)
    else:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=k.shape[1] != q.shape[1])
        return out.transpose(1, 2), None
    return out.transpose(1, 2), lse.detach().transpose(1, 2)
