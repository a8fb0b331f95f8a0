"""model/norm.py's Triton RMSNorm (rms_norm, and RMSNorm / LayerQKNorm on the kernel path)
against fp64: outputs, input and weight gradients at odd widths and row counts. Without a
GPU in the TRITON_INTERPRET=1 child (fp32, fp16); on CUDA with bf16 at M2's widths."""

from __future__ import annotations

import pytest
import torch

from conftest import (CUDA, KERNEL_DEVICE, KERNEL_TOL, interpreter_launcher, kernel_test,
                      run_under_triton_interpreter)
from model import norm

DEV = KERNEL_DEVICE
TOL = KERNEL_TOL


@interpreter_launcher
def test_kernels_under_triton_interpreter():
    run_under_triton_interpreter(__file__)


def _reference(x, w, dy, eps):
    x = x.double().requires_grad_(True)
    w = w.double().requires_grad_(True)
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w
    y.backward(dy.double())
    return y.detach(), x.grad, w.grad


def _case(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 3
    x[0, 0] = 0.0  # an all-zero row: rstd = 1/sqrt(eps)
    w = 1 + 0.5 * torch.randn(shape[-1], generator=g)
    dy = torch.randn(shape, generator=g)
    return (t.to(device=DEV, dtype=dtype) for t in (x, w, dy))


def _check(y, dx, dw, ref, dtype):
    for got, want in zip((y, dx, dw), ref):
        torch.testing.assert_close(got.double(), want, rtol=TOL[dtype], atol=TOL[dtype] * want.abs().max().item())


@kernel_test
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else []))
@pytest.mark.parametrize("shape", [(7, 3, 300), (1, 2, 64), (37, 1, 1000)])
def test_rms_norm_matches_reference(shape, dtype):
    x, w, dy = _case(shape, dtype)
    xg = x.clone().requires_grad_(True)
    wg = w.clone().requires_grad_(True)
    y = norm.rms_norm(xg, wg, 1e-6)
    y.backward(dy)
    assert y.dtype == dtype and xg.grad.dtype == dtype and wg.grad.dtype == dtype
    _check(y, xg.grad, wg.grad, _reference(x, w, dy, 1e-6), dtype)


@pytest.mark.gpu(reason="needs CUDA: M2's widths (hidden 3072, q 6144) at 4K tokens in bf16")
@pytest.mark.parametrize("width", [3072, 6144, 1024])
def test_rms_norm_at_m2_widths_cuda(width):
    test_rms_norm_matches_reference((4096, 1, width), torch.bfloat16)


@kernel_test
def test_modules_take_the_kernel_path(dist):
    """RMSNorm and LayerQKNorm (tp=1) on the kernel path equal the fp64 formula."""
    from conftest import tiny_model_config
    from model.builder import transformer_config
    from parallel.config import ParallelConfig

    tconfig = transformer_config(tiny_model_config(), ParallelConfig(), cpu=not CUDA)
    x, w, dy = _case((5, 2, 4, 16), torch.float32)
    for module, inp in ((norm.RMSNorm(tconfig, 16, eps=1e-6), x),
                        (norm.LayerQKNorm(tconfig, 16, eps=1e-6, which="q"), x)):
        module.to(DEV)
        width = inp.shape[-1] if isinstance(module, norm.RMSNorm) else inp.shape[-2] * inp.shape[-1]
        weight = w[:16] if width == 16 else w.repeat(4)
        with torch.no_grad():
            module.weight.copy_(weight)
        xg = inp.clone().requires_grad_(True)
        y = module(xg)
        y.backward(dy)
        flat = (lambda t: t) if width == 16 else (lambda t: t.reshape(5, 2, width))
        ref = _reference(flat(inp), weight, flat(dy), 1e-6)
        _check(flat(y), flat(xg.grad), module.weight.grad, ref, torch.float32)


def _gemma_case(dtype=torch.float32):
    """(module input, M3 weight w (the module's), the scale 1 + w, dy): w around 0."""
    x, w, dy = _case((5, 2, 4, 16), dtype, seed=3)
    return x, w[:16] - 1.0, w[:16], dy


def _check_gemma(dist, device):
    from conftest import tiny_model_config
    from model.builder import transformer_config
    from parallel.config import ParallelConfig

    tconfig = transformer_config(tiny_model_config(norm_style="gemma"), ParallelConfig(), cpu=not CUDA)
    module = norm.GemmaRMSNorm(tconfig, 16, eps=1e-6).to(device)
    assert torch.equal(module.weight.detach().cpu(), torch.zeros(16))  # starts as the identity scale
    x, w, scale, dy = _gemma_case()
    with torch.no_grad():
        module.weight.copy_(w.to(device))
    xg = x.to(device).clone().requires_grad_(True)
    y = module(xg)  # per head, as M3's QK-norm
    y.backward(dy.to(device))
    _check(y, xg.grad, module.weight.grad, _reference(x, scale, dy, 1e-6), torch.float32)


@kernel_test
def test_gemma_norm_takes_the_kernel_path(dist):
    """GemmaRMSNorm on the kernel path: x / rms(x) * (1 + w), gradients of x and w (fp64)."""
    _check_gemma(dist, DEV)


def test_gemma_norm_pytorch_path(dist):
    """GemmaRMSNorm off the kernel path (CPU): the same formula and gradients."""
    _check_gemma(dist, "cpu")
