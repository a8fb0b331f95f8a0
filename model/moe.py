"""The MoE block with its token dispatch recomputed in backward (train.recompute_modules has
moe_dispatch).

The experts' first GEMM keeps its input for backward: the dispatched token copies, top-k times
the block's input ([R, h], R = tokens x top-k on this rank; 8 x 128K x 3072 bf16 = 6 GiB per
layer of proxy_1gpu at 128K, the largest MoE term after the experts' own). `DispatchRecomputeMoELayer`
runs megatron's MoELayer steps (route, preprocess, dispatch, experts, combine, postprocess)
with the dispatch (permutation, all-to-all, expert-TP gather, sort by local expert) inside
megatron's `CheckpointWithoutOutput`: the dispatched tokens (and their routing weights) are
freed once the block's output exists and rebuilt, by dispatching again from the block's input,
when backward reaches that output. The block keeps its input ([T, h]) instead. The rebuild is a
gather of R rows (plus the all-to-all under expert parallelism): cheap next to megatron's `moe`
recompute, which reruns the experts' GEMMs too. Same values, so the same gradients.

Legend: T tokens of the block's input on this rank, R routed copies, h hidden.
"""

from __future__ import annotations

import torch
from megatron.core import tensor_parallel
from megatron.core.transformer.moe.moe_layer import MoELayer


class DispatchRecomputeMoELayer(MoELayer):
    """megatron's MoELayer whose dispatched tokens are rebuilt in backward instead of kept."""

    def forward(self, hidden_states: torch.Tensor, intermediate_tensors=None, padding_mask=None):
        """MoELayer.forward (megatron/core/transformer/moe/moe_layer.py) without its CUDA-graph
        partial capture, the shared expert's overlap with the dispatch and latent projections
        (M2 and M3 use none of them); a shared expert runs beside, as megatron runs it."""
        if intermediate_tensors is not None or not (self.training and torch.is_grad_enabled()):
            return super().forward(hidden_states, intermediate_tensors, padding_mask)
        assert not (self.shared_expert_overlap or self.config.moe_latent_size or self.moe_layer_recompute)
        if padding_mask is not None:
            padding_mask = padding_mask.transpose(0, 1).bool()
        shared_output = self.shared_experts_compute(hidden_states)  # None without a shared expert
        probs, routing_map = self.route(hidden_states, padding_mask)
        # fp8=None, not the default False: megatron tests `fp8 is not None` (needs TE otherwise)
        checkpoint = tensor_parallel.CheckpointWithoutOutput(fp8=self.config.fp8)
        dispatched_Rh, permuted_probs_R = checkpoint.checkpoint(self._dispatch, hidden_states, probs, routing_map)
        expert_output, mlp_bias = self.experts(dispatched_Rh, self._tokens_per_expert, permuted_probs_R)
        assert mlp_bias is None
        output = self.token_dispatcher.combine_preprocess(expert_output)
        output = self.postprocess(self.combine(output), shared_output)
        # Rebuilt when the block output's gradient exists: before any backward of the experts,
        # whose own moe_act recompute (a hook on their output) reads the routing weights.
        checkpoint.discard_output_and_register_recompute(output)
        return output, mlp_bias

    def _dispatch(self, hidden_states, probs, routing_map):
        """The block's input [T, h] -> the tokens each local expert gets [R, h] and their routing
        weights [R]; the tokens per expert go to `_tokens_per_expert` (not differentiable)."""
        tokens, probs = self.preprocess(hidden_states, probs, routing_map)
        tokens, probs = self.dispatch(tokens, probs)
        dispatched, self._tokens_per_expert, permuted_probs = self.token_dispatcher.dispatch_postprocess(tokens, probs)
        return dispatched, permuted_probs
