"""model/cross_entropy.py against fp64 cross entropy: loss and logits gradient, per token
weights, odd sizes, a vocabulary longer than one kernel chunk, large and -inf logits; the
PyTorch path here, the Triton kernels in the TRITON_INTERPRET=1 child (fp32, fp16) or on CUDA
(bf16 too); vocabulary shards over two gloo ranks; and the model's loss and every gradient
against megatron-core's vocab_parallel_cross_entropy.

The chunked output layer + loss (`linear_cross_entropy`) against the logits materialised and
F.cross_entropy: loss and the gradients of the hidden states and the weight, token counts that
are not a multiple of the chunk, one chunk (logits kept) and many (recomputed), fp32 and bf16;
vocabulary shards over two gloo ranks with and without sequence parallelism; the tiny model's
loss, MTP values and every gradient against model.cross_entropy=fused; and that no
[tokens, vocab] tensor is created in forward or backward (every op's outputs, the saved
tensors, the allocation peak)."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.multiprocessing as mp

from conftest import (CUDA, INTERPRET, KERNEL_DEVICE, free_port, interpreter_launcher, kernel_test,
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


def _model_loss_and_grads(model, tokens, cross_entropy: str, chunk_tokens: int = 4096):
    """The tiny model's per-token loss, megatron's per-depth MTP values and every parameter
    gradient under model.cross_entropy=`cross_entropy`."""
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    model.zero_grad(set_to_none=True)
    model.cross_entropy, model.loss_chunk_tokens = cross_entropy, chunk_tokens
    pos = torch.arange(tokens.shape[1]).expand_as(tokens)
    labels = torch.roll(tokens, -1, dims=1)
    loss_mask = (torch.arange(tokens.numel()).view_as(tokens) % 5 != 0).float()  # masked tokens too
    MTPLossLoggingHelper.tracker.clear()
    try:
        loss = model(tokens, pos, None, labels=labels, loss_mask=loss_mask)
        (loss * loss_mask).sum().backward()
        mtp = MTPLossLoggingHelper.tracker["values"].clone()
    finally:  # megatron's process-wide loss tracker, sized by this model's MTP depth
        MTPLossLoggingHelper.tracker.clear()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), mtp, grads


@pytest.mark.skipif(INTERPRET, reason="model-level comparison runs in the parent process")
@pytest.mark.skipif(CUDA, reason="build_tiny builds on the host, and with CUDA present megatron's "
                                 "rotary embedding puts its tables on the GPU")
def test_model_loss_and_grads_match_megatron_cross_entropy(build_tiny):
    """The tiny model (main head and two MTP heads) with model.cross_entropy=fused gives
    megatron's per-token loss, MTP values and every parameter gradient."""
    cfg, _, model = build_tiny()
    tokens = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    loss_f, mtp_f, grads_f = _model_loss_and_grads(model, tokens, "fused")
    loss_m, mtp_m, grads_m = _model_loss_and_grads(model, tokens, "megatron")
    assert abs(loss_m.mean().item() - math.log(cfg.vocab_size)) < 0.5
    torch.testing.assert_close(loss_f, loss_m, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(mtp_f, mtp_m, rtol=1e-6, atol=1e-6)
    assert grads_f.keys() == grads_m.keys()
    for name in grads_m:
        torch.testing.assert_close(grads_f[name], grads_m[name], rtol=1e-4, atol=1e-6, msg=name)


# ---- the chunked output layer + loss --------------------------------------------------------


def _linear_case(s=37, b=3, h=24, vocab=1001, dtype=torch.float32, device="cpu", seed=0):
    """Hidden states, an output weight (logits of a few units, one token's target far ahead),
    labels, a per-token upstream gradient with masked (zero) tokens."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(s, b, h, generator=g)
    weight = torch.randn(vocab, h, generator=g) * 0.5
    labels = torch.randint(0, vocab, (s, b), generator=g)
    grad = torch.rand(s, b, generator=g)
    grad[::4, 0] = 0.0
    return (hidden.to(device=device, dtype=dtype), weight.to(device=device, dtype=dtype), labels.to(device),
            grad.to(device))


def _linear_reference(hidden, weight, labels, grad, exact: bool):
    """The logits materialised, then F.cross_entropy: in fp64 (`exact`), or as megatron's output
    layer and loss run in the inputs' dtype (logits in it, the loss in fp32)."""
    dtype = torch.float64 if exact else hidden.dtype
    x = hidden.detach().to(dtype).requires_grad_(True)
    w = weight.detach().to(dtype).requires_grad_(True)
    logits = torch.matmul(x, w.t())
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).to(torch.float64 if exact else torch.float32),
                                             labels.flatten(), reduction="none").view(labels.shape)
    loss.backward(grad.to(loss.dtype))
    return loss.detach(), x.grad, w.grad


def _linear_ours(hidden, weight, labels, grad, **kwargs):
    x = hidden.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    loss = ce.linear_cross_entropy(x, w, labels, **kwargs)
    loss.backward(grad)
    return loss.detach(), x.grad, w.grad


def _close_fp32(got, want, name=""):
    """Within 1e-6 of the fp64 reference's largest magnitude (fp32 rounding of sums over the
    vocabulary or the tokens: the materialised fp32 path is as far off)."""
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6 * want.abs().max().item(), msg=name)


def _check_linear(case, chunk_tokens, dtype):
    got = _linear_ours(*case, chunk_tokens=chunk_tokens)
    assert got[0].dtype == torch.float32 and got[1].dtype == got[2].dtype == dtype
    if dtype == torch.float32:
        want = _linear_reference(*case, exact=True)
        for a, b, name in zip(got, want, ("loss", "d hidden", "d weight")):
            _close_fp32(a, b, name)
    else:  # the same logits in the inputs' dtype; gradients within its rounding
        want = _linear_reference(*case, exact=False)
        tol = {torch.bfloat16: 1.6e-2, torch.float16: 2e-3}[dtype]
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5, msg="loss")
        for a, b, name in zip(got[1:], want[1:], ("d hidden", "d weight")):
            torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol * b.abs().max().item(), msg=name)


@pytest.mark.parametrize("chunk_tokens", [16, 111, 4096], ids=["ragged-chunks", "exactly-one-chunk", "one-chunk"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_cross_entropy_matches_reference(dtype, chunk_tokens, monkeypatch):
    """37 x 3 = 111 tokens: chunks of 16 (the last of 15), exactly one chunk of 111, one
    chunk with room to spare (its logits kept for backward)."""
    if ce.triton is not None and INTERPRET:
        pytest.skip("this process routes CPU tensors through the Triton interpreter")
    monkeypatch.setattr(ce, "ROW_CHUNK_ELEMENTS", 5 * 1001)  # the PyTorch row loop within a chunk too
    _check_linear(_linear_case(dtype=dtype), chunk_tokens, dtype)


def test_linear_cross_entropy_frozen_weight_and_bad_chunk():
    """A frozen output weight (model.msa.train_only_indexer) gets no gradient, the input its own."""
    hidden, weight, labels, grad = _linear_case(s=9, b=2)
    x = hidden.clone().requires_grad_(True)
    ce.linear_cross_entropy(x, weight, labels, chunk_tokens=4).backward(grad)
    _close_fp32(x.grad, _linear_reference(hidden, weight, labels, grad, exact=True)[1])
    with pytest.raises(ValueError, match="chunk_tokens"):
        ce.linear_cross_entropy(x, weight, labels, chunk_tokens=0)


@kernel_test
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else []))
def test_linear_cross_entropy_kernels_match_reference(dtype):
    """The Triton row statistics and softmax gradient, chunk by chunk."""
    _check_linear(_linear_case(s=13, b=3, dtype=dtype, device=KERNEL_DEVICE), 8, dtype)


@pytest.mark.gpu(reason="needs CUDA: M2's vocabulary, bf16, a micro-batch of several chunks")
def test_linear_cross_entropy_at_m2_vocab_cuda():
    _check_linear(_linear_case(s=1000, b=2, h=3072, vocab=200064, dtype=torch.bfloat16, device="cuda"), 512,
                  torch.bfloat16)


@pytest.mark.gpu(reason="needs CUDA: the peak of the chunked loss at M2's vocabulary against the logits'")
def test_linear_cross_entropy_memory_cuda():
    """16K tokens, M2's vocabulary, bf16, chunks of 4096: the chunked forward + backward peaks
    under two chunks of logits, the weight gradient's buffers (fp32 accumulator, one bf16
    product, the bf16 result) and the input gradient; the logits + fused loss path above it
    (its bf16 logits alone are 6.1 GiB)."""
    n, h, vocab = 16384, 3072, 200064
    hidden, weight, labels, grad = _linear_case(s=n // 2, b=2, h=h, vocab=vocab, dtype=torch.bfloat16, device="cuda")
    x, w = hidden.requires_grad_(True), weight.requires_grad_(True)

    def peak_above_inputs(loss_fn) -> int:
        x.grad = w.grad = None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss_fn().backward(grad)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    chunked = peak_above_inputs(lambda: ce.linear_cross_entropy(x, w, labels, chunk_tokens=4096))
    fused = peak_above_inputs(lambda: ce.vocab_parallel_cross_entropy(torch.matmul(x, w.t()), labels))
    bound = 2 * 4096 * vocab * 2 + vocab * h * (4 + 2 + 2) + 2 * n * h * 2
    assert chunked < bound and chunked < fused, (chunked, bound, fused)


def _tp2_linear_worker(rank: int, port: int, sequence_parallel: bool, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    torch.distributed.init_process_group("gloo")
    hidden, weight, labels, grad = _linear_case(s=38, vocab=2 * 501)
    if sequence_parallel:
        hidden = hidden[rank * 19:(rank + 1) * 19]  # this rank's sequence shard
    shard = weight[rank * 501:(rank + 1) * 501]
    results[rank] = _linear_ours(hidden, shard, labels, grad, tp_group=torch.distributed.group.WORLD,
                                 sequence_parallel=sequence_parallel, chunk_tokens=16)
    torch.distributed.destroy_process_group()


@pytest.mark.multiproc
@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp2", "tp2-sp"])
def test_linear_cross_entropy_over_two_vocab_shards_matches_full_vocabulary(sequence_parallel):
    """Each rank holds half the output weight (ColumnParallelLinear's layout); under sequence
    parallelism also half the tokens' hidden states. Every rank's loss is the whole sequence's,
    its weight gradient its shard's rows, its input gradient the full one (all-reduced) or its
    sequence shard's (reduce-scattered)."""
    results = mp.Manager().dict()
    mp.spawn(_tp2_linear_worker, args=(free_port(), sequence_parallel, results), nprocs=2, join=True)
    case = _linear_case(s=38, vocab=2 * 501)
    loss, dx, dw = _linear_reference(*case, exact=True)
    assert (case[2] < 501).any() and (case[2] >= 501).any()
    for rank in (0, 1):
        got_loss, got_dx, got_dw = results[rank]
        _close_fp32(got_loss, loss, "loss")
        _close_fp32(got_dw, dw[rank * 501:(rank + 1) * 501], "d weight")
        _close_fp32(got_dx, dx[rank * 19:(rank + 1) * 19] if sequence_parallel else dx, "d hidden")


@pytest.mark.skipif(INTERPRET, reason="model-level comparison runs in the parent process")
@pytest.mark.skipif(CUDA, reason="build_tiny builds on the host")
@pytest.mark.parametrize("chunk_tokens", [7, 4096], ids=["chunks", "one-chunk"])
def test_model_chunked_loss_and_grads_match_fused(build_tiny, chunk_tokens):
    """The tiny model with two MTP heads and a loss mask: model.cross_entropy=chunked gives the
    per-token loss, megatron's per-depth MTP values and every parameter gradient of
    model.cross_entropy=fused (2 x 24 tokens in chunks of 7: the last one of 6)."""
    cfg, _, model = build_tiny()
    tokens = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    loss_f, mtp_f, grads_f = _model_loss_and_grads(model, tokens, "fused")
    loss_c, mtp_c, grads_c = _model_loss_and_grads(model, tokens, "chunked", chunk_tokens)
    assert mtp_f.shape == (2,) and (mtp_f > 0).all()
    torch.testing.assert_close(loss_c, loss_f, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(mtp_c, mtp_f, rtol=1e-6, atol=1e-6)
    assert grads_c.keys() == grads_f.keys() and "output_layer.weight" in grads_c
    for name, want in grads_f.items():  # chunks: the weight gradient summed in another order
        torch.testing.assert_close(grads_c[name], want, rtol=1e-5, atol=1e-6 * want.abs().max().item(), msg=name)


@pytest.mark.skipif(INTERPRET, reason="model-level comparison runs in the parent process")
@pytest.mark.skipif(CUDA, reason="build_tiny builds on the host")
def test_model_without_labels_returns_logits(build_tiny):
    """Without labels (inference, evaluation of logits) the chunked model returns megatron's
    logits [b, s, V]. (megatron-core 0.16.1 needs labels whenever MTP is on.)"""
    cfg, _, model = build_tiny(mtp_num_layers=0)
    tokens = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(24).expand(2, 24)
    assert model.cross_entropy == "chunked"
    with torch.no_grad():
        logits = model(tokens, pos, None)
        loss = model(tokens, pos, None, labels=tokens)
    assert logits.shape == (2, 24, cfg.vocab_size)
    want = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten(), reduction="none")
    torch.testing.assert_close(loss.flatten(), want, rtol=1e-6, atol=1e-6)


class _LargestOutput(torch.utils._python_dispatch.TorchDispatchMode):
    """The largest number of elements of any tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.slow
@pytest.mark.skipif(INTERPRET, reason="model-level measurement runs in the parent process")
@pytest.mark.skipif(CUDA, reason="build_tiny builds on the host")
def test_model_chunked_loss_holds_no_tokens_by_vocab_tensor(build_tiny):
    """A micro-batch of 2 x 600 tokens, vocabulary 8192 (the logits, 1200 x 8192, outweigh
    everything else): under model.cross_entropy=chunked no op of forward or backward returns a
    tensor of 600 x 8192 elements, autograd saves none, and the allocation peak of the step is
    below one fp32 copy of them (fused keeps one per head: three)."""
    from launch.measure import cpu_peak_meter

    cfg, _, model = build_tiny(vocab_size=8192, max_position_embeddings=1024)
    tokens = torch.randint(0, cfg.vocab_size, (2, 600), generator=torch.Generator().manual_seed(0))
    logits_numel = tokens.numel() * cfg.vocab_size
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    def step(cross_entropy: str):
        with cpu_peak_meter() as meter:
            _model_loss_and_grads(model, tokens, cross_entropy, chunk_tokens=64)
        return meter["peak"]

    with _LargestOutput() as largest, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _model_loss_and_grads(model, tokens, "chunked", chunk_tokens=64)
    assert largest.largest < logits_numel / 4 and max(saved) < logits_numel / 4, (largest.largest, max(saved))
    chunked, fused = step("chunked"), step("fused")
    assert chunked < logits_numel * 4 < 3 * logits_numel * 4 < fused, (chunked, fused, logits_numel * 4)
