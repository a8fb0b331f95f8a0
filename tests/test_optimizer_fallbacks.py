"""pretrain/optimizer_fallbacks.py: the stand-ins for megatron's local multi-tensor fallbacks
and the fused AdamW switch give the same numbers as the plain computations."""

from __future__ import annotations

import torch

from pretrain import optimizer_fallbacks as fb


def _tensors(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).to(dtype) for shape in ((7, 3), (11,), (5, 2, 3), (1,))]


def test_l2_norm_is_the_norm_over_all_tensors():
    ts = _tensors() + [t.to(torch.bfloat16) for t in _tensors(1)]
    norm, per_tensor = fb.foreach_l2_norm(2048 * 32, None, [ts], False)
    expected = torch.sqrt(sum((t.double() ** 2).sum() for t in ts))
    assert norm.shape == (1,) and norm.dtype == torch.float32 and per_tensor is None
    torch.testing.assert_close(norm.double()[0], expected, rtol=1e-6, atol=0)


def test_scale_in_place_copy_and_scaled_copy():
    ts = _tensors()
    ref = [t.clone() for t in ts]
    fb.foreach_scale(0, None, [ts, ts], 0.25)  # clipping: [grads, grads]
    for t, r in zip(ts, ref):
        torch.testing.assert_close(t, r * 0.25, rtol=0, atol=0)
    dst = [torch.empty_like(t, dtype=torch.bfloat16) for t in ts]
    fb.foreach_scale(0, None, [ts, dst], 1.0)  # main fp32 weights -> bf16 model weights
    for d, t in zip(dst, ts):
        assert torch.equal(d, t.to(torch.bfloat16))
    fb.foreach_scale(0, None, [ts, dst], 3.0)
    for d, t in zip(dst, ts):
        assert torch.equal(d, (t * 3.0).to(torch.bfloat16))


class _Wrapped:  # megatron's optimizers hold the torch optimizer as .optimizer
    def __init__(self, opt):
        self.optimizer = opt


def test_fuse_adam_gives_the_foreach_update_and_reloads():
    params = [torch.nn.Parameter(t) for t in _tensors()]
    twins = [torch.nn.Parameter(t.clone()) for t in _tensors()]
    groups = lambda ps: [dict(params=ps[:2], weight_decay=0.1), dict(params=ps[2:], weight_decay=0.0)]  # noqa: E731
    plain = torch.optim.AdamW(groups(params), lr=1e-2, foreach=True)
    fused = torch.optim.AdamW(groups(twins), lr=1e-2)
    assert fb.fuse_adam(_Wrapped(fused)) == 1
    assert all(g["fused"] for g in fused.param_groups)
    for step in range(3):
        for p, q in zip(params, twins):
            grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(step))
            p.grad, q.grad = grad, grad.clone()
        plain.step()
        fused.step()
    for p, q in zip(params, twins):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)
    # a checkpoint written by the fused optimizer loads into a fresh, fused one
    again = torch.optim.AdamW(groups([torch.nn.Parameter(q.detach().clone()) for q in twins]), lr=1e-2)
    fb.fuse_adam(_Wrapped(again))
    again.load_state_dict(fused.state_dict())
    assert all(s["step"].item() == 3 for s in again.state.values())
