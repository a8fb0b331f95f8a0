"""model/experts.py's fused SwiGLU x routing probability (swiglu_probs), its SwiGLU-OAI variant
(M3) and the probability-free `glu` against fp64: output and the gradients of fc1 and of the
probabilities, at odd sizes (rows not a multiple of the kernel's row tile, width not a power of
two), with gate and up beyond the OAI clamp. Without a GPU in the TRITON_INTERPRET=1 child
(fp32, fp16); on CUDA also bf16 at M2's expert width."""

from __future__ import annotations

import pytest
import torch

from conftest import (CUDA, KERNEL_DEVICE, KERNEL_TOL, interpreter_launcher, kernel_test,
                      run_under_triton_interpreter)
from model.experts import SWIGLU, SWIGLU_OAI, glu, swiglu_probs

DEV = KERNEL_DEVICE
TOL = KERNEL_TOL


@interpreter_launcher
def test_kernels_under_triton_interpreter():
    run_under_triton_interpreter(__file__)


def _reference(fc1, probs, dout, kind=SWIGLU):
    """fp64 GLU(fc1) * probs (probs None: no probabilities), as transformers writes M3's
    SwiGLU-OAI: gate.clamp(max=7), up.clamp(-7, 7), (up + 1) * gate * sigmoid(1.702 * gate)."""
    fc1 = fc1.double().requires_grad_(True)
    gate, up = fc1.chunk(2, dim=-1)
    if kind == SWIGLU_OAI:
        gate, up = gate.clamp(max=7.0), up.clamp(min=-7.0, max=7.0)
        out = (up + 1.0) * gate * torch.sigmoid(1.702 * gate)
    else:
        out = torch.nn.functional.silu(gate) * up
    if probs is None:
        out.backward(dout.double())
        return out.detach(), fc1.grad
    probs = probs.double().requires_grad_(True)
    out = out * probs
    out.backward(dout.double())
    return out.detach(), fc1.grad, probs.grad


@kernel_test
@pytest.mark.parametrize("kind", [SWIGLU, SWIGLU_OAI])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else []))
@pytest.mark.parametrize("rows,width", [(13, 24), (1, 40), (6, 1536)])
def test_swiglu_probs_matches_reference(rows, width, dtype, kind):
    g = torch.Generator().manual_seed(rows + width)
    fc1 = (torch.randn(rows, 2 * width, generator=g) * 3).to(DEV, dtype)  # some beyond the clamp at 7
    probs = torch.rand(rows, 1, generator=g).to(DEV)  # the router's fp32 probabilities
    dout = torch.randn(rows, width, generator=g).to(DEV, dtype)
    x = fc1.clone().requires_grad_(True)
    p = probs.clone().requires_grad_(True)
    out = swiglu_probs(x, p, kind)
    out.backward(dout)
    assert out.dtype == dtype and x.grad.dtype == dtype and p.grad.dtype == torch.float32
    for got, want in zip((out, x.grad, p.grad), _reference(fc1, probs, dout, kind)):
        torch.testing.assert_close(got.double(), want, rtol=TOL[dtype], atol=TOL[dtype] * want.abs().max().item())


@kernel_test
@pytest.mark.parametrize("kind", [SWIGLU, SWIGLU_OAI])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_glu_without_probabilities_matches_reference(dtype, kind):
    """The dense MLP's and the shared expert's activation: [s, b, 2f] in, [s, b, f] out."""
    g = torch.Generator().manual_seed(5)
    fc1 = (torch.randn(7, 3, 2 * 40, generator=g) * 4).to(DEV, dtype)
    dout = torch.randn(7, 3, 40, generator=g).to(DEV, dtype)
    x = fc1.clone().requires_grad_(True)
    out = glu(x, kind)
    out.backward(dout)
    assert out.shape == (7, 3, 40) and out.dtype == dtype
    for got, want in zip((out, x.grad), _reference(fc1, None, dout, kind)):
        torch.testing.assert_close(got.double(), want, rtol=TOL[dtype], atol=TOL[dtype] * want.abs().max().item())


@pytest.mark.gpu(reason="needs CUDA: M3's SwiGLU-OAI at its expert (3072) and dense-MLP (12288) widths in bf16")
@pytest.mark.parametrize("width", [3072, 12288])
def test_swiglu_oai_at_m3_widths_cuda(width):
    test_swiglu_probs_matches_reference(4096, width, torch.bfloat16, SWIGLU_OAI)
    g = torch.Generator().manual_seed(width)
    fc1 = (torch.randn(2048, 2 * width, generator=g) * 4).to("cuda", torch.bfloat16)
    dout = torch.randn(2048, width, generator=g).to("cuda", torch.bfloat16)
    x = fc1.clone().requires_grad_(True)
    out = glu(x, SWIGLU_OAI)
    out.backward(dout)
    for got, want in zip((out, x.grad), _reference(fc1, None, dout, SWIGLU_OAI)):
        torch.testing.assert_close(got.double(), want, rtol=TOL[torch.bfloat16],
                                   atol=TOL[torch.bfloat16] * want.abs().max().item())
