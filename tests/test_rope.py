"""model/rope.py's Triton RoPE against megatron-core's own `_apply_rotary_pos_emb_bshd` run in
fp64: outputs and input gradients at odd sizes, partial and full rotary, mscale != 1, freqs
whose two halves differ, strided inputs and gradients, outputs poisoned with NaN before the
kernel writes them. Kernels run in the TRITON_INTERPRET=1 child without a GPU (fp32, fp16),
on CUDA directly (bf16 too, and M2's q and k shapes). Every case outside the kernel's
conditions must return exactly upstream's result."""

from __future__ import annotations

import pytest
import torch
from megatron.core.models.common.embeddings import rope_utils
from megatron.core.transformer import TransformerConfig

from conftest import (CUDA, KERNEL_DEVICE, KERNEL_TOL, interpreter_launcher, kernel_test,
                      run_under_triton_interpreter)
from model import rope

DEV = KERNEL_DEVICE
TOL = KERNEL_TOL
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])


@interpreter_launcher
def test_kernels_under_triton_interpreter():
    run_under_triton_interpreter(__file__)


def _config(**fields) -> TransformerConfig:
    """The RoPE switches upstream reads, on a real TransformerConfig."""
    config = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4)
    for name, value in fields.items():
        setattr(config, name, value)
    return config


class _OneRankGroup:
    """A context-parallel group of one, for upstream's packed-sequence path."""

    def size(self):
        return 1

    def rank(self):
        return 0


def _case(s, b, h, d, rot, dtype, seed=0):
    """t_sbhd, freqs_s11r with unrelated halves and angles up to ~60 rad, dy_sbhd."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(s, b, h, d, generator=g) * 2
    freqs = (torch.rand(s, 1, 1, rot, generator=g) - 0.5) * 120
    dy = torch.randn(s, b, h, d, generator=g)
    return t.to(DEV, dtype), freqs.to(DEV), dy.to(DEV, dtype)


def _reference(t, freqs, dy, mscale):
    t = t.double().requires_grad_(True)
    y = rope_utils._apply_rotary_pos_emb_bshd(t, freqs.double(), mscale=mscale)
    y.backward(dy.double())
    return y.detach(), t.grad


def _poisoned_empty(monkeypatch):
    """torch.empty fills with NaN, so an element the kernel forgets to write fails the test."""
    empty = torch.empty

    def poisoned(*args, **kwargs):
        out = empty(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    monkeypatch.setattr(torch, "empty", poisoned)


def _run_kernel(t, freqs, dy, mscale, monkeypatch):
    _poisoned_empty(monkeypatch)
    tg = t.detach().requires_grad_(True)
    y = rope.apply_rotary_pos_emb(tg, freqs, _config(), mscale=mscale)
    assert type(y.grad_fn).__name__ == "_RotaryPosEmbBackward", "the kernel path was not taken"
    y.backward(dy)
    monkeypatch.undo()
    return y, tg.grad


def _check(got, want, dtype):
    for g, w in zip(got, want):
        assert g.dtype == dtype and g.shape == w.shape
        torch.testing.assert_close(g.double(), w, rtol=TOL[dtype], atol=TOL[dtype] * w.abs().max().item())


@kernel_test
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rot", [8, 16])
@pytest.mark.parametrize("mscale", [1.0, 0.7])
def test_rope_matches_upstream_fp64(rot, mscale, dtype, monkeypatch):
    t, freqs, dy = _case(7, 3, 5, 16, rot, dtype)
    got = _run_kernel(t, freqs, dy, mscale, monkeypatch)
    _check(got, _reference(t, freqs, dy, mscale), dtype)


@kernel_test
@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_strided_inputs(dtype, monkeypatch):
    """k as megatron slices it out of the fused QKV projection (heads and tokens strided), a
    freqs view with strides, [b, s]-transposed gradients; d and rot/2 not powers of two."""
    t, freqs, dy = _case(7, 3, 5, 20, 12, dtype, seed=1)
    t_strided = torch.cat([t, torch.zeros_like(t)], dim=-1)[..., :20]
    dy_strided = dy.transpose(0, 1).contiguous().transpose(0, 1)
    freqs_strided = torch.stack([freqs, freqs], dim=-1)[..., 0]
    assert not t_strided.is_contiguous() and not dy_strided.is_contiguous() and freqs_strided.stride(-1) == 2
    got = _run_kernel(t_strided, freqs_strided, dy_strided, 0.7, monkeypatch)
    _check(got, _reference(t, freqs, dy, 0.7), dtype)


@kernel_test
def test_rope_many_heads(monkeypatch):
    """More heads than one program's tile (128 at d=16): two tiles, the second mostly masked."""
    t, freqs, dy = _case(3, 2, 131, 16, 8, torch.float32, seed=5)
    got = _run_kernel(t, freqs, dy, 0.7, monkeypatch)
    _check(got, _reference(t, freqs, dy, 0.7), torch.float32)


FALLBACKS = ("packed thd", "interleaved", "multi-latent", "per-batch freqs", "broadcast freqs",
             "freqs with grad", "fp64")


def _fallback_case(name):
    """t, freqs, config, kwargs outside the kernel's conditions, on the kernel's device."""
    t, freqs, _ = _case(7, 3, 5, 16, 8, torch.float16, seed=2)
    one = _OneRankGroup()
    cases = {
        "packed thd": (t[:, 0], freqs, _config(),
                       {"cu_seqlens": torch.tensor([0, 3, 7], dtype=torch.int32, device=DEV), "cp_group": one}),
        "interleaved": (t, freqs, _config(rotary_interleaved=True), {"cp_group": one}),
        "multi-latent": (t, freqs, _config(multi_latent_attention=True), {"cp_group": one}),
        # A freqs row per (s, b), as mRoPE gives.
        "per-batch freqs": (t, torch.rand(7, 3, 1, 8, device=DEV), _config(), {"cp_group": one}),
        "broadcast freqs": (t, freqs[:1], _config(), {"cp_group": one}),
        "freqs with grad": (t, freqs.clone().requires_grad_(True), _config(), {"cp_group": one}),
        "fp64": (t.double(), freqs, _config(), {"mscale": 0.7, "cp_group": one}),
    }
    return cases[name]


@pytest.mark.parametrize("name", FALLBACKS)
def test_fallback_is_upstream(name):
    """Outside the kernel's conditions, exactly upstream's result, gradients and all."""
    t, freqs, config, kwargs = _fallback_case(name)
    got_t = t.detach().requires_grad_(True)
    want_t = t.detach().requires_grad_(True)
    got = rope.apply_rotary_pos_emb(got_t, freqs, config, **kwargs)
    want = rope_utils.apply_rotary_pos_emb(want_t, freqs, config, **kwargs)
    assert type(got.grad_fn).__name__ != "_RotaryPosEmbBackward"
    assert torch.equal(got, want)
    dy = torch.randn_like(got)
    got.backward(dy)
    want.backward(dy)
    assert torch.equal(got_t.grad, want_t.grad)


def test_fallback_for_te_fusion_is_upstream():
    """apply_rope_fusion: upstream's TE path; without TE that asserts, or with mscale != 1
    warns and runs the unfused path."""
    t, freqs, _ = _case(7, 3, 5, 16, 8, torch.float32, seed=3)
    config = _config(apply_rope_fusion=True)
    if rope_utils.fused_apply_rotary_pos_emb is None:
        with pytest.raises(AssertionError, match="apply_rope_fusion is not available"):
            rope.apply_rotary_pos_emb(t, freqs, config, cp_group=_OneRankGroup())
    with pytest.warns(UserWarning, match="mscale"):
        got = rope.apply_rotary_pos_emb(t, freqs, config, mscale=0.7, cp_group=_OneRankGroup())
    assert torch.equal(got, rope_utils._apply_rotary_pos_emb_bshd(t, freqs, mscale=0.7))


@pytest.mark.gpu(reason="needs CUDA: M2's q [4096, 1, 48, 128] and k [4096, 1, 8, 128] "
                                     "in bf16 with rotary_percent 0.5")
@pytest.mark.parametrize("heads", [48, 8])
def test_rope_at_m2_shape_cuda(heads, monkeypatch):
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    freqs = RotaryEmbedding(128, 0.5, rotary_base=5_000_000, cp_group=_OneRankGroup())(4096)
    assert freqs.shape == (4096, 1, 1, 64)
    g = torch.Generator().manual_seed(4)
    t = torch.randn(4096, 1, heads, 128, generator=g).to(DEV, torch.bfloat16)
    dy = torch.randn(4096, 1, heads, 128, generator=g).to(DEV, torch.bfloat16)
    got = _run_kernel(t, freqs, dy, 1.0, monkeypatch)
    _check(got, _reference(t, freqs, dy, 1.0), torch.bfloat16)
