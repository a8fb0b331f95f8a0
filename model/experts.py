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

On CUDA the SwiGLU and the routing-probability multiply run as one Triton kernel each way
(`swiglu_probs`): fp32 inside, one rounding to fc1's dtype; PyTorch runs them as ~6 kernels
over bf16/fp32 copies of the [T, 2f] activations.

Legend: T routed token copies on this rank (grouped by expert), E local experts, h hidden,
f expert ffn width on this expert-TP rank.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.moe.experts import SequentialMLP

from model.triton_support import tl, triton, use_triton


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
        if self.config.gated_linear_unit and self.config.activation_func is F.silu and use_triton(fc1_TF2):
            return swiglu_probs(fc1_TF2, probs_T1)
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



def swiglu_probs(fc1_T2f: torch.Tensor, probs_T1: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up * prob for fc1 = [gate | up] ([T, 2f]) and prob [T, 1], computed in fp32
    and returned in fc1's dtype; differentiable in fc1 and prob (Triton kernels)."""
    return _SwiGLUProbs.apply(fc1_T2f, probs_T1)


class _SwiGLUProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fc1_T2f, probs_T1):
        fc1_T2f = fc1_T2f.contiguous()
        probs_T = probs_T1.reshape(-1).contiguous()
        t, f2 = fc1_T2f.shape
        out_Tf = torch.empty(t, f2 // 2, device=fc1_T2f.device, dtype=fc1_T2f.dtype)
        if t:
            _swiglu_fwd[(triton.cdiv(t, _ROWS),)](fc1_T2f, probs_T, out_Tf, t, f2 // 2, ROWS=_ROWS,
                                                  BLOCK=triton.next_power_of_2(f2 // 2))
        ctx.save_for_backward(fc1_T2f, probs_T)
        ctx.probs_shape, ctx.probs_dtype = probs_T1.shape, probs_T1.dtype
        return out_Tf

    @staticmethod
    def backward(ctx, dout_Tf):
        fc1_T2f, probs_T = ctx.saved_tensors
        t, f2 = fc1_T2f.shape
        dfc1_T2f = torch.empty_like(fc1_T2f)
        dprobs_T = torch.empty(t, device=fc1_T2f.device, dtype=torch.float32)
        if t:
            _swiglu_bwd[(triton.cdiv(t, _ROWS),)](fc1_T2f, probs_T, dout_Tf.contiguous(), dfc1_T2f, dprobs_T, t,
                                                  f2 // 2, ROWS=_ROWS, BLOCK=triton.next_power_of_2(f2 // 2))
        return dfc1_T2f, dprobs_T.to(ctx.probs_dtype).view(ctx.probs_shape)


_ROWS = 4  # rows per program

if triton is not None:

    @triton.jit
    def _swiglu_tile(FC1, P, T, F, ROWS: tl.constexpr, BLOCK: tl.constexpr):
        """This program's ROWS rows: the mask, the fc1 offsets, [F]-wide offsets, and gate, up
        and prob in fp32."""
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK)
        ok = (rows < T)[:, None] & (cols < F)[None, :]
        base = rows.to(tl.int64)[:, None] * (2 * F) + cols[None, :]
        out_offs = rows.to(tl.int64)[:, None] * F + cols[None, :]
        gate = tl.load(FC1 + base, mask=ok, other=0.0).to(tl.float32)
        up = tl.load(FC1 + base + F, mask=ok, other=0.0).to(tl.float32)
        p = tl.load(P + rows, mask=rows < T, other=0.0).to(tl.float32)
        return rows, ok, base, out_offs, gate, up, p

    @triton.jit
    def _swiglu_fwd(FC1, P, OUT, T, F, ROWS: tl.constexpr, BLOCK: tl.constexpr):
        rows, ok, base, out_offs, gate, up, p = _swiglu_tile(FC1, P, T, F, ROWS, BLOCK)
        out = gate * tl.sigmoid(gate) * up * p[:, None]
        tl.store(OUT + out_offs, out.to(OUT.dtype.element_ty), mask=ok)

    @triton.jit
    def _swiglu_bwd(FC1, P, DOUT, DFC1, DP, T, F, ROWS: tl.constexpr, BLOCK: tl.constexpr):
        rows, ok, base, out_offs, gate, up, p = _swiglu_tile(FC1, P, T, F, ROWS, BLOCK)
        dout = tl.load(DOUT + out_offs, mask=ok, other=0.0).to(tl.float32)
        sig = tl.sigmoid(gate)
        silu = gate * sig
        tl.store(DP + rows, tl.sum(dout * silu * up, axis=1), mask=rows < T)
        dact = dout * p[:, None]
        tl.store(DFC1 + base, (dact * up * sig * (1.0 + gate * (1.0 - sig))).to(DFC1.dtype.element_ty), mask=ok)
        tl.store(DFC1 + base + F, (dact * silu).to(DFC1.dtype.element_ty), mask=ok)
