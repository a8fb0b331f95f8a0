"""model/cross_entropy.py against fp64 cross entropy: loss and logits gradient, per token
weights, odd sizes, a vocabulary longer than one kernel chunk, large and -inf logits; the
PyTorch path here, the Triton kernels in the TRITON_INTERPRET=1 child (fp32, fp16) or on CUDA
(bf16 too); vocabulary shards over two gloo ranks; and the model's loss and every gradient
against megatron-core's vocab_parallel_cross_entropy."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.multiprocessing as mp

from conftest import (CUDA, INTERPRET, free_port, interpreter_launcher, kernel_test,
                      run_under_triton_interpreter)
from model import cross_entropy as ce



@interpreter_launcher
def test_kernels_under_triton_interpreter():
    run_under_triton_interpreter(__file__)


def _case(s=5, b=3, vocab=4099, dtype=torch.float32, device="cpu", seed=0):
    """Logits with a wide range, a -inf entry and a row where the target is the max; labels;
    a per-token upstream gradient (as a loss mask / token count would give)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(s, b, vocab, generator=g) * 4
    logits[0, 0, 7] = 40.0
    logits[1, 1, 3] = float("-inf")
    labels = torch.randint(0, vocab, (s, b), generator=g)
    labels[0, 0] = 7
    grad = torch.rand(s, b, generator=g)
    grad[2, 0] = 0.0
    return logits.to(device=device, dtype=dtype), labels.to(device), grad.to(device)


def _reference(logits, labels, grad):
    x = logits.detach().double().requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(x.flatten(0, 1), labels.flatten(), reduction="none").view(labels.shape)
    loss.backward(grad.double())
    return loss.detach(), x.grad


def _ours(logits, labels, grad, tp_group=None):
    x = logits.clone().requires_grad_(True)
    loss = ce.vocab_parallel_cross_entropy(x, labels, tp_group)
    loss.backward(grad)
    return loss.detach(), x.grad


def _check(logits, labels, grad, *, grad_tol):
    loss, dx = _ours(logits, labels, grad)
    ref_loss, ref_dx = _reference(logits, labels, grad)
    assert loss.dtype == torch.float32 and dx.dtype == logits.dtype
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx.double(), ref_dx, rtol=grad_tol, atol=grad_tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pytorch_path_matches_reference(dtype, monkeypatch):
    if ce.triton is not None and INTERPRET:
        pytest.skip("this process routes CPU tensors through the Triton interpreter")
    monkeypatch.setattr(ce, "ROW_CHUNK_ELEMENTS", 4 * 4099)  # several row chunks, a ragged last one
    _check(*_case(dtype=dtype), grad_tol=1e-6 if dtype == torch.float32 else 4e-3)


@kernel_test
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else []))
def test_kernels_match_reference(dtype):
    device = "cuda" if CUDA else "cpu"
    tol = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 4e-3}[dtype]
    logits, labels, grad = _case(dtype=dtype, device=device)
    if dtype == torch.float16:
        logits = logits.clamp(min=-60000)  # keep -inf; fp16 holds the rest
    _check(logits, labels, grad, grad_tol=tol)


@pytest.mark.gpu(reason="needs CUDA: M2's vocabulary at a 4K-token micro-batch slice")
def test_kernels_at_m2_vocab_cuda():
    _check(*_case(s=64, b=2, vocab=200064, dtype=torch.bfloat16, device="cuda"), grad_tol=4e-3)


def _tp2_worker(rank: int, port: int, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    torch.distributed.init_process_group("gloo")
    logits, labels, grad = _case(vocab=2 * 1001)
    shard = logits[..., rank * 1001:(rank + 1) * 1001]
    results[rank] = _ours(shard, labels, grad, torch.distributed.group.WORLD)
    torch.distributed.destroy_process_group()


@pytest.mark.multiproc
def test_vocab_shards_over_two_ranks_match_full_vocabulary():
    """Each rank holds half the vocabulary; labels fall in both halves."""
    results = mp.Manager().dict()
    mp.spawn(_tp2_worker, args=(free_port(), results), nprocs=2, join=True)
    logits, labels, grad = _case(vocab=2 * 1001)
    ref_loss, ref_dx = _reference(logits, labels, grad)
    assert (labels < 1001).any() and (labels >= 1001).any()
    for rank in (0, 1):
        torch.testing.assert_close(results[rank][0].double(), ref_loss, rtol=1e-5, atol=1e-5)
    dx = torch.cat([results[0][1], results[1][1]], dim=-1)
    torch.testing.assert_close(dx.double(), ref_dx, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(INTERPRET, reason="model-level comparison runs in the parent process")
@pytest.mark.skipif(CUDA, reason="build_tiny builds on the host, and with CUDA present megatron's "
                                 "rotary embedding puts its tables on the GPU")
def test_model_loss_and_grads_match_megatron_cross_entropy(build_tiny):
    """The tiny model (main head and two MTP heads) with model.cross_entropy=fused gives
    megatron's per-token loss and every parameter gradient."""
    cfg, _, model = build_tiny()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (2, 24), generator=g)
    pos = torch.arange(24).expand(2, 24)

    def run(fused: bool):
        model.zero_grad(set_to_none=True)
        model.fused_cross_entropy = fused
        loss = model(tokens, pos, None, labels=tokens)
        loss.mean().backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss_f, grads_f = run(True)
    loss_m, grads_m = run(False)
    assert abs(loss_m.mean().item() - math.log(cfg.vocab_size)) < 0.5
    torch.testing.assert_close(loss_f, loss_m, rtol=1e-6, atol=1e-6)
    assert grads_f.keys() == grads_m.keys()
    for name in grads_m:
        torch.testing.assert_close(grads_f[name], grads_m[name], rtol=1e-4, atol=1e-6, msg=name)
