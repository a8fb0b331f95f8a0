"""Grouped expert GEMMs for the local backend, in SequentialMLP's parameter layout.

`GroupedExperts` is megatron-core's `SequentialMLP` (same submodules, parameters
`local_experts.<i>.linear_fc1.weight` [2f, h] and `local_experts.<i>.linear_fc2.weight` [h, f],
same `sharded_state_dict`, so checkpoints move between it, SequentialMLP and TEGroupedMLP) whose
forward runs all local experts as two grouped GEMMs over the permuted tokens instead of a Python
loop: the per-expert weights are stacked ([E, 2f, h], [E, h, f]) and multiplied with
`grouped_mm`. The stack costs one copy of the expert weights per forward (their gradients are
split back to each expert's parameter by autograd).

`grouped_mm` uses `torch._grouped_mm` where it runs forward and backward (bf16 on Hopper and
newer GPUs, bf16 on CPU) and a loop of matmuls elsewhere (fp32, older GPUs).

Legend: T routed token copies on this rank (grouped by expert), E local experts, h hidden,
f expert ffn width on this expert-TP rank.
"""

from __future__ import annotations

import torch
from megatron.core import tensor_parallel
from megatron.core.transformer.moe.experts import SequentialMLP


def grouped_mm(x_TK: torch.Tensor, w_ENK: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
    """Rows of expert e times w[e] transposed: x [T, K] (rows grouped by expert, in order) and
    w [E, N, K] -> [T, N]. tokens_per_expert [E] sums to T. Differentiable in x and w."""
    if _grouped_mm_runs(x_TK, w_ENK):
        offsets = torch.cumsum(tokens_per_expert.to(device=x_TK.device), 0).to(torch.int32)
        return torch._grouped_mm(x_TK, w_ENK.transpose(-2, -1), offs=offsets)
    counts = tokens_per_expert.tolist()
    return torch.cat([x @ w.t() for x, w in zip(torch.split(x_TK, counts), w_ENK)], dim=0)


def _grouped_mm_runs(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether torch._grouped_mm handles these operands, backward included: bf16 only (its fp32
    backward fails on CPU with torch 2.13), at least one row, CUDA from compute capability 9.0 (Hopper), and
    row strides that are multiples of 16 bytes."""
    if not hasattr(torch, "_grouped_mm") or x.dtype != torch.bfloat16 or w.dtype != torch.bfloat16:
        return False
    if x.shape[0] == 0 or x.shape[-1] % 8 or w.shape[-2] % 8:  # no rows: its backward fails on CPU
        return False
    if x.is_cuda:
        return torch.cuda.get_device_capability(x.device) >= (9, 0)
    return x.device.type == "cpu"


class GroupedExperts(SequentialMLP):
    """SequentialMLP's experts (SwiGLU, no bias) run as two grouped GEMMs.

    Megatron's `moe_act` selective recompute is honoured: the activation's output (the fc2
    input) is dropped after fc2 and recomputed from the fc1 output in backward.
    """

    def __init__(self, num_local_experts, config, submodules, pg_collection=None):
        super().__init__(num_local_experts, config, submodules, pg_collection=pg_collection)
        assert not self.config.add_bias_linear, "GroupedExperts has no expert biases"
        assert not self.config.moe_apply_probs_on_input
        self.activation_recompute = (
            self.config.recompute_granularity == "selective" and "moe_act" in self.config.recompute_modules
        )

    def _activation(self, fc1_TF2: torch.Tensor, probs_T1: torch.Tensor) -> torch.Tensor:
        """SwiGLU (or the plain activation) times the routing probability, in fc1's dtype, as
        megatron's MLP computes it."""
        if self.config.gated_linear_unit:
            gate, up = torch.chunk(fc1_TF2, 2, dim=-1)
            out = self.config.activation_func(gate) * up
        else:
            out = self.config.activation_func(fc1_TF2)
        return (out * probs_T1).to(fc1_TF2.dtype)

    def forward(self, permuted_local_hidden_states, tokens_per_expert, permuted_probs):
        x_Th = permuted_local_hidden_states
        if self.config.fp8 or self.config.fp4:  # FP8 experts are Transformer Engine's (TEGroupedMLP)
            return super().forward(x_Th, tokens_per_expert, permuted_probs)
        w1_E2fh = torch.stack([e.linear_fc1.weight for e in self.local_experts])
        w2_Ehf = torch.stack([e.linear_fc2.weight for e in self.local_experts])
        counts = tokens_per_expert.to(torch.int64)
        fc1_T2f = grouped_mm(x_Th, w1_E2fh, counts)
        probs_T1 = permuted_probs.unsqueeze(-1)
        if self.activation_recompute:
            # fp8=None, not the default False: megatron tests `fp8 is not None` (needs TE otherwise)
            checkpoint = tensor_parallel.CheckpointWithoutOutput(fp8=self.config.fp8)
            act_Tf = checkpoint.checkpoint(self._activation, fc1_T2f, probs_T1)
            out_Th = grouped_mm(act_Tf, w2_Ehf, counts)
            checkpoint.discard_output_and_register_recompute(out_Th)
        else:
            out_Th = grouped_mm(self._activation(fc1_T2f, probs_T1), w2_Ehf, counts)
        return out_Th, None

