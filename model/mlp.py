"""The dense MLP (M3's first layers) and the shared expert, with the fused GLU activation.

megatron-core's `MLP` and `SharedExpertMLP` (same parameters, checkpoint keys and TP layout)
whose activation runs model/experts.py's `glu` kernel (SwiGLU or M3's SwiGLU-OAI, one Triton
kernel each way, fp32 inside) where it applies; megatron's own unfused activation (~6
element-wise kernels over copies of the [s, b, 2f] activations) elsewhere, which computes the
same formula (its `glu` with `activation_func_clamp_value` and `glu_linear_offset`).

megatron's TransformerLayer passes its TP group only to an `MLP` spec it recognises by class and
logs "Unknown MLP type" for any other (then MLP takes the default TP group, the same group in our
runs); that notice is dropped for our dense layers below.

Legend: s sequence, b batch, h hidden, f ffn width on this TP rank.
"""

from __future__ import annotations

import logging

from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.moe.shared_experts import SharedExpertMLP

from model.experts import glu, glu_kind, glu_reference
from model.triton_support import use_triton


class FusedGLUMLP(MLP):
    """megatron's MLP whose gated activation is our fused kernel on its path. Returns
    (output [s, b, h], None) as MLP does without biases."""

    def forward(self, hidden_states, per_token_scale=None, **kwargs):
        kind = glu_kind(self.config)
        if kind is None or per_token_scale is not None or self.config.add_bias_linear:
            return super().forward(hidden_states, per_token_scale=per_token_scale, **kwargs)
        fc1_sb2f, _ = self.linear_fc1(hidden_states)
        act_sbf = glu(fc1_sb2f, kind) if use_triton(fc1_sb2f) else glu_reference(fc1_sb2f, self.config)
        return self.linear_fc2(act_sbf)


class FusedSharedExpertMLP(SharedExpertMLP, FusedGLUMLP):
    """megatron's shared expert (its forward calls MLP.forward, here FusedGLUMLP's)."""


class _DropUnknownMLPNotice(logging.Filter):
    """megatron's TransformerLayer names every MLP spec other than its own `MLP` unknown; ours
    (FusedGLUMLP, a subclass) build with the default TP group, which is the layer's."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Unknown MLP type")


logging.getLogger("megatron.core.transformer.transformer_layer").addFilter(_DropUnknownMLPNotice())
