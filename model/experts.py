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
over bf16/fp32 copies of the [T, 2f] activations. The same kernels compute M3's SwiGLU-OAI
(`kind="swiglu_oai"`: gate clamped above at 7, up to [-7, 7], (up + 1) * gate * sigmoid(1.702
gate), megatron's quick_gelu GLU with `activation_func_clamp_value` 7 and `glu_linear_offset` 1),
and, without probabilities, the dense MLP's and the shared expert's activation (`glu`, used by
model/mlp.py). `glu_reference` is the plain PyTorch form (megatron's MLP), used off the kernel
path.

Legend: T routed token copies on this rank (grouped by expert), E local experts, h hidden,
f expert ffn width on this expert-TP rank.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.fusions.fused_bias_geglu import quick_gelu
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.moe.experts import SequentialMLP

from model.config import SWIGLU_OAI_ALPHA, SWIGLU_OAI_LIMIT
from model.triton_support import tl, triton, use_triton

SWIGLU, SWIGLU_OAI = "swiglu", "swiglu_oai"


def glu_kind(config: TransformerConfig) -> str | None:
    """Which of our fused GLUs megatron's MLP activation of `config` is: swiglu (silu(gate) *
    up), swiglu_oai (quick_gelu with clamp 7 and offset 1), or None (another activation)."""
    if not config.gated_linear_unit:
        return None
    if config.activation_func is F.silu and config.activation_func_clamp_value is None and not config.glu_linear_offset:
        return SWIGLU
    if (config.activation_func is quick_gelu and config.activation_func_clamp_value == SWIGLU_OAI_LIMIT
            and config.glu_linear_offset == 1.0):
        return SWIGLU_OAI
    return None


def glu_reference(fc1: torch.Tensor, config: TransformerConfig) -> torch.Tensor:
    """megatron MLP's gated activation of fc1 = [gate | up] (the unfused PyTorch form)."""
    gate, up = torch.chunk(fc1, 2, dim=-1)
    if (limit := config.activation_func_clamp_value) is not None:
        gate = gate.clamp(max=limit)
        up = up.clamp(min=-limit, max=limit)
    return config.activation_func(gate) * (up + config.glu_linear_offset)


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
        """The GLU (SwiGLU or SwiGLU-OAI; or the plain activation) times the routing
        probability, in fc1's dtype, as megatron's MLP computes it."""
        kind = glu_kind(self.config)
        if kind is not None and use_triton(fc1_TF2):
            return swiglu_probs(fc1_TF2, probs_T1, kind)
        if self.config.gated_linear_unit:
            out = glu_reference(fc1_TF2, self.config)
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



def swiglu_probs(fc1_T2f: torch.Tensor, probs_T1: torch.Tensor, kind: str = SWIGLU) -> torch.Tensor:
    """GLU(fc1) * prob for fc1 = [gate | up] ([T, 2f]) and prob [T, 1], computed in fp32 and
    returned in fc1's dtype; differentiable in fc1 and prob (Triton kernels). kind: swiglu =
    silu(gate) * up; swiglu_oai = (clamp(up, -7, 7) + 1) * g * sigmoid(1.702 g), g = min(gate, 7)."""
    assert kind in (SWIGLU, SWIGLU_OAI), kind
    return _SwiGLUProbs.apply(fc1_T2f, probs_T1, kind == SWIGLU_OAI)


def glu(fc1_x2f: torch.Tensor, kind: str = SWIGLU) -> torch.Tensor:
    """GLU(fc1) of fc1 = [gate | up] ([..., 2f]) -> [..., f], as `swiglu_probs` without the
    probability (the dense MLP and the shared expert); differentiable in fc1 (Triton kernels)."""
    assert kind in (SWIGLU, SWIGLU_OAI), kind
    lead, f2 = fc1_x2f.shape[:-1], fc1_x2f.shape[-1]
    out = _SwiGLUProbs.apply(fc1_x2f.reshape(-1, f2), None, kind == SWIGLU_OAI)
    return out.view(*lead, f2 // 2)


class _SwiGLUProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fc1_T2f, probs_T1, oai):
        fc1_T2f = fc1_T2f.contiguous()
        has_probs = probs_T1 is not None
        t, f2 = fc1_T2f.shape
        probs_T = probs_T1.reshape(-1).contiguous() if has_probs else fc1_T2f.new_empty(0, dtype=torch.float32)
        out_Tf = torch.empty(t, f2 // 2, device=fc1_T2f.device, dtype=fc1_T2f.dtype)
        if t:
            _swiglu_fwd[(triton.cdiv(t, _ROWS),)](fc1_T2f, probs_T, out_Tf, t, f2 // 2, ROWS=_ROWS,
                                                  BLOCK=triton.next_power_of_2(f2 // 2), **_flags(oai, has_probs))
        ctx.save_for_backward(fc1_T2f, probs_T)
        ctx.oai, ctx.has_probs = oai, has_probs
        if has_probs:
            ctx.probs_shape, ctx.probs_dtype = probs_T1.shape, probs_T1.dtype
        return out_Tf

    @staticmethod
    def backward(ctx, dout_Tf):
        fc1_T2f, probs_T = ctx.saved_tensors
        t, f2 = fc1_T2f.shape
        dfc1_T2f = torch.empty_like(fc1_T2f)
        dprobs_T = torch.empty(t if ctx.has_probs else 0, device=fc1_T2f.device, dtype=torch.float32)
        if t:
            _swiglu_bwd[(triton.cdiv(t, _ROWS),)](fc1_T2f, probs_T, dout_Tf.contiguous(), dfc1_T2f, dprobs_T, t,
                                                  f2 // 2, ROWS=_ROWS, BLOCK=triton.next_power_of_2(f2 // 2),
                                                  **_flags(ctx.oai, ctx.has_probs))
        dprobs = dprobs_T.to(ctx.probs_dtype).view(ctx.probs_shape) if ctx.has_probs else None
        return dfc1_T2f, dprobs, None


_ROWS = 4  # rows per program


def _flags(oai: bool, has_probs: bool) -> dict:
    return dict(OAI=oai, HAS_PROBS=has_probs, LIMIT=SWIGLU_OAI_LIMIT, ALPHA=SWIGLU_OAI_ALPHA)


if triton is not None:

    @triton.jit
    def _swiglu_tile(FC1, P, T, F, ROWS: tl.constexpr, BLOCK: tl.constexpr, HAS_PROBS: tl.constexpr):
        """This program's ROWS rows: the mask, the fc1 offsets, [F]-wide offsets, and gate, up
        and prob (1 without probabilities) in fp32."""
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK)
        ok = (rows < T)[:, None] & (cols < F)[None, :]
        base = rows.to(tl.int64)[:, None] * (2 * F) + cols[None, :]
        out_offs = rows.to(tl.int64)[:, None] * F + cols[None, :]
        gate = tl.load(FC1 + base, mask=ok, other=0.0).to(tl.float32)
        up = tl.load(FC1 + base + F, mask=ok, other=0.0).to(tl.float32)
        if HAS_PROBS:
            p = tl.load(P + rows, mask=rows < T, other=0.0).to(tl.float32)
        else:
            p = tl.full([ROWS], 1.0, tl.float32)
        return rows, ok, base, out_offs, gate, up, p

    @triton.jit
    def _glu_parts(gate, up, OAI: tl.constexpr, LIMIT: tl.constexpr, ALPHA: tl.constexpr):
        """(act(gate), the linear factor, sigmoid of act's argument, act's input): SwiGLU's
        silu(gate) and up, or SwiGLU-OAI's g * sigmoid(ALPHA g) with g = min(gate, LIMIT) and
        clamp(up, +-LIMIT) + 1."""
        if OAI:
            g = tl.minimum(gate, LIMIT)
            sig = tl.sigmoid(ALPHA * g)
            lin = tl.minimum(tl.maximum(up, -LIMIT), LIMIT) + 1.0
        else:
            g = gate
            sig = tl.sigmoid(g)
            lin = up
        return g * sig, lin, sig, g

    @triton.jit
    def _swiglu_fwd(FC1, P, OUT, T, F, ROWS: tl.constexpr, BLOCK: tl.constexpr, OAI: tl.constexpr,
                    HAS_PROBS: tl.constexpr, LIMIT: tl.constexpr, ALPHA: tl.constexpr):
        rows, ok, base, out_offs, gate, up, p = _swiglu_tile(FC1, P, T, F, ROWS, BLOCK, HAS_PROBS)
        act, lin, sig, g = _glu_parts(gate, up, OAI, LIMIT, ALPHA)
        out = act * lin * p[:, None]
        tl.store(OUT + out_offs, out.to(OUT.dtype.element_ty), mask=ok)

    @triton.jit
    def _swiglu_bwd(FC1, P, DOUT, DFC1, DP, T, F, ROWS: tl.constexpr, BLOCK: tl.constexpr, OAI: tl.constexpr,
                    HAS_PROBS: tl.constexpr, LIMIT: tl.constexpr, ALPHA: tl.constexpr):
        rows, ok, base, out_offs, gate, up, p = _swiglu_tile(FC1, P, T, F, ROWS, BLOCK, HAS_PROBS)
        dout = tl.load(DOUT + out_offs, mask=ok, other=0.0).to(tl.float32)
        act, lin, sig, g = _glu_parts(gate, up, OAI, LIMIT, ALPHA)
        if HAS_PROBS:
            tl.store(DP + rows, tl.sum(dout * act * lin, axis=1), mask=rows < T)
        dact = dout * p[:, None]
        if OAI:
            # clamp passes the gradient where the input lies inside its bounds (ends included)
            dg = tl.where(gate <= LIMIT, sig * (1.0 + ALPHA * g * (1.0 - sig)), 0.0)
            dlin = tl.where((up >= -LIMIT) & (up <= LIMIT), 1.0, 0.0)
        else:
            dg = sig * (1.0 + g * (1.0 - sig))
            dlin = 1.0
        tl.store(DFC1 + base, (dact * lin * dg).to(DFC1.dtype.element_ty), mask=ok)
        tl.store(DFC1 + base + F, (dact * act * dlin).to(DFC1.dtype.element_ty), mask=ok)
