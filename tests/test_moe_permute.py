"""model/moe_permute.py against megatron-core's `permute`/`unpermute` on CPU: permuted rows,
probs and sorted indices identical; unpermuted tokens and every gradient (hidden states,
permuted tokens, probs, an expert weight between the two) equal within fp32 rounding or bf16
tolerance; the fallback to upstream for drop_and_pad and unequal expert counts."""

from __future__ import annotations

import pytest
import torch
from megatron.core.transformer.moe import moe_utils
from megatron.core.transformer.moe.moe_utils import get_capacity

from model import moe_permute

# tokens, hidden, experts, topk, experts that receive no token
CASES = {
    "odd": (37, 24, 6, 3, ()),
    "unused_experts": (29, 20, 8, 2, (1, 5)),
    "all_experts": (5, 8, 4, 4, ()),
    "top1": (11, 16, 5, 1, (0, 3)),
}
TOL = {torch.float32: {"rtol": 1e-5, "atol": 1e-5}, torch.bfloat16: {"rtol": 2e-2, "atol": 3e-2}}


def _routing(tokens, experts, topk, unused, seed=0):
    """A router's outputs: routing map [T, E] with topk experts per token (none on `unused`),
    and probs [T, E] fp32, nonzero everywhere so that a wrongly selected prob shows."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(tokens, experts, generator=g)
    scores[:, list(unused)] = float("-inf")
    routing_map = torch.zeros(tokens, experts, dtype=torch.bool)
    routing_map.scatter_(1, scores.topk(topk, dim=1).indices, True)
    probs = 0.1 + torch.rand(tokens, experts, generator=g)
    return routing_map, probs


def _randn(*shape, dtype=torch.float32, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _leaf(t):
    return None if t is None else t.clone().requires_grad_(True)


def _grads(loss, *leaves):
    loss.backward()
    return [None if t is None else t.grad for t in leaves]


def _close(got, want, dtype):
    if want is None:
        assert got is None
        return
    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got.float(), want.float(), **TOL[dtype])


def _run_permute(permute, x, routing_map, probs, num_out_tokens):
    """permute's outputs and the gradients of a random linear loss w.r.t. tokens and probs."""
    x, probs = _leaf(x), _leaf(probs)
    y, y_probs, indices = permute(x, routing_map, probs=probs, num_out_tokens=num_out_tokens)
    loss = (y.float() * _randn(*y.shape, seed=2)).sum()
    if y_probs is not None:
        loss = loss + (y_probs * _randn(*y_probs.shape, seed=3)).sum()
    return (y, y_probs, indices, *_grads(loss, x, probs))


def _run_unpermute(unpermute, permuted, indices, restore_shape, probs, routing_map):
    """unpermute's output and the gradients of a random linear loss w.r.t. its inputs."""
    permuted, probs = _leaf(permuted), _leaf(probs)
    out = unpermute(permuted, indices, restore_shape, probs=probs, routing_map=routing_map)
    loss = (out.float() * _randn(*out.shape, seed=4)).sum()
    return (out, *_grads(loss, permuted, probs))


@pytest.mark.parametrize("with_probs", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
def test_permute_matches_upstream(case, dtype, with_probs):
    tokens, hidden, experts, topk, unused = CASES[case]
    routing_map, probs = _routing(tokens, experts, topk, unused)
    probs = probs if with_probs else None
    x = _randn(tokens, hidden, dtype=dtype)
    got = _run_permute(moe_permute.permute, x, routing_map, probs, tokens * topk)
    want = _run_permute(moe_utils.permute, x, routing_map, probs, tokens * topk)
    for g, w in zip(got[:3], want[:3]):  # rows, probs and sorted indices: gathers, so exact
        assert (g is None and w is None) or (g.dtype == w.dtype and torch.equal(g, w))
    for g, w in zip(got[3:], want[3:]):
        _close(g, w, dtype)


@pytest.mark.parametrize("with_probs", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
def test_unpermute_matches_upstream(case, dtype, with_probs):
    tokens, hidden, experts, topk, unused = CASES[case]
    routing_map, probs = _routing(tokens, experts, topk, unused)
    probs = probs if with_probs else None
    x = _randn(tokens, hidden, dtype=dtype)
    _, _, indices = moe_permute.permute(x, routing_map, num_out_tokens=tokens * topk)
    _, _, ref_indices = moe_utils.permute(x, routing_map, num_out_tokens=tokens * topk)
    permuted = _randn(tokens * topk, hidden, dtype=dtype, seed=5)  # expert outputs
    got = _run_unpermute(moe_permute.unpermute, permuted, indices, x.shape, probs, routing_map)
    want = _run_unpermute(moe_utils.unpermute, permuted, ref_indices, x.shape, probs, routing_map)
    for g, w in zip(got, want):
        _close(g, w, dtype)


def _dispatch_and_combine(permute, unpermute, x, routing_map, probs, weight, num_out_tokens):
    """The alltoall dispatcher's use (one rank): permute with probs, an expert that multiplies
    by its routing probability (as model/experts.py does), unpermute without probs."""
    x, probs, weight = _leaf(x), _leaf(probs), _leaf(weight)
    permuted, permuted_probs, indices = permute(x, routing_map, probs=probs, num_out_tokens=num_out_tokens)
    expert_out = ((permuted @ weight) * permuted_probs.unsqueeze(-1)).to(x.dtype)
    out = unpermute(expert_out, indices, x.shape, routing_map=routing_map)
    loss = (out.float() * _randn(*out.shape, seed=6)).sum()
    return (out, *_grads(loss, x, probs, weight))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
def test_dispatcher_round_trip_matches_upstream(case, dtype):
    tokens, hidden, experts, topk, unused = CASES[case]
    routing_map, probs = _routing(tokens, experts, topk, unused)
    x = _randn(tokens, hidden, dtype=dtype)
    weight = _randn(hidden, hidden, dtype=dtype, seed=7) / hidden**0.5
    args = (x, routing_map, probs, weight, tokens * topk)
    got = _dispatch_and_combine(moe_permute.permute, moe_permute.unpermute, *args)
    want = _dispatch_and_combine(moe_utils.permute, moe_utils.unpermute, *args)
    for g, w in zip(got, want):
        _close(g, w, dtype)


def test_sums_in_steps_of_tokens(monkeypatch):
    """Several steps of `_sum_copies`, the last one short, give upstream's results."""
    _, hidden, _, topk, _ = CASES["odd"]
    monkeypatch.setattr(moe_permute, "_SUM_CHUNK_BYTES", 4 * topk * hidden * 4)  # 4 tokens a step
    test_dispatcher_round_trip_matches_upstream("odd", torch.float32)


def test_bf16_sums_accumulate_in_fp32():
    """Token 0's copies 1 and 7 x 2^-9 sum to 1.0137: 1.015625 in bf16 when accumulated in fp32,
    1.0 when each addition rounds to bf16. Forward (unpermute) and backward (permute)."""
    tokens, topk = 3, 8
    routing_map = torch.ones(tokens, topk, dtype=torch.bool)
    x = torch.zeros(tokens, 4, dtype=torch.bfloat16, requires_grad=True)
    permuted, _, indices = moe_permute.permute(x, routing_map, num_out_tokens=tokens * topk)
    copies = torch.zeros(tokens * topk, 4, dtype=torch.bfloat16)
    token0 = (indices == 0).nonzero().flatten()
    copies[token0] = 2.0**-9
    copies[token0[3]] = 1.0
    out = moe_permute.unpermute(copies, indices, x.shape, routing_map=routing_map)
    assert out[0].tolist() == [1.015625] * 4 and out[1:].abs().sum() == 0
    permuted.backward(copies)
    assert x.grad[0].tolist() == [1.015625] * 4


class _Spy:
    """Counts calls to an upstream function and runs it."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


@pytest.fixture
def upstream_calls(monkeypatch):
    spies = {name: _Spy(getattr(moe_permute, name)) for name in ("_upstream_permute", "_upstream_unpermute")}
    for name, spy in spies.items():
        monkeypatch.setattr(moe_permute, name, spy)
    return lambda: (spies["_upstream_permute"].calls, spies["_upstream_unpermute"].calls)


def test_fast_path_does_not_call_upstream(upstream_calls):
    test_dispatcher_round_trip_matches_upstream("odd", torch.float32)
    assert upstream_calls() == (0, 0)


def test_drop_and_pad_falls_back(upstream_calls):
    tokens, hidden, experts, topk, unused = CASES["odd"]
    routing_map, probs = _routing(tokens, experts, topk, unused)
    capacity = get_capacity(num_tokens=tokens * topk, num_experts=experts, capacity_factor=0.5)
    x = _randn(tokens, hidden)
    kwargs = {"probs": probs, "num_out_tokens": capacity * experts, "drop_and_pad": True}
    got = moe_permute.permute(x, routing_map, **kwargs)
    want = moe_utils.permute(x, routing_map, **kwargs)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    expert_out = _randn(*got[0].shape, seed=5)
    kwargs = {"probs": probs, "routing_map": routing_map, "drop_and_pad": True}
    got = moe_permute.unpermute(expert_out, got[2], x.shape, **kwargs)
    torch.testing.assert_close(got, moe_utils.unpermute(expert_out, want[2], x.shape, **kwargs))
    assert upstream_calls() == (1, 1)


def _uneven_routing():
    """Odd case's routing map with token 0 on one expert only (two dropped copies)."""
    tokens, hidden, experts, topk, unused = CASES["odd"]
    routing_map, probs = _routing(tokens, experts, topk, unused)
    routing_map[0] = False
    routing_map[0, 2] = True
    return routing_map, probs, _randn(tokens, hidden)


@pytest.mark.parametrize("num_out_tokens", ["tensor", "none", "int"])
def test_unequal_counts_fall_back(upstream_calls, num_out_tokens):
    """num_out_tokens as the capacity-factor dispatcher passes it (the counted total, a tensor),
    None, or an int that is not T * k: upstream's functions, upstream's results."""
    routing_map, probs, x = _uneven_routing()
    total = routing_map.sum()
    num_out = {"tensor": total, "none": None, "int": int(total)}[num_out_tokens]
    got = _run_permute(moe_permute.permute, x, routing_map, probs, num_out)
    want = _run_permute(moe_utils.permute, x, routing_map, probs, num_out)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    expert_out = _randn(*got[0].shape, seed=5)
    got = _run_unpermute(moe_permute.unpermute, expert_out, got[2], x.shape, probs, routing_map)
    want = _run_unpermute(moe_utils.unpermute, expert_out, want[2], x.shape, probs, routing_map)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    assert upstream_calls() == (1, 1)


def test_unequal_counts_with_a_dropless_count_fail_loudly():
    """An int num_out_tokens = T * k is a promise of k experts per token; a map that breaks it
    trips the (on CPU, immediate) device assert instead of being permuted wrongly."""
    routing_map, probs, x = _uneven_routing()
    with pytest.raises(RuntimeError, match="routing map disagrees"):
        moe_permute.permute(x, routing_map, probs=probs, num_out_tokens=x.shape[0] * 3)


def test_unpermute_of_upstream_indices_falls_back(upstream_calls):
    tokens, hidden, experts, topk, unused = CASES["odd"]
    routing_map, probs = _routing(tokens, experts, topk, unused)
    x = _randn(tokens, hidden)
    _, _, indices = moe_utils.permute(x, routing_map, num_out_tokens=tokens * topk)
    expert_out = _randn(tokens * topk, hidden, seed=5)
    got = moe_permute.unpermute(expert_out, indices, x.shape, probs=probs, routing_map=routing_map)
    want = moe_utils.unpermute(expert_out, indices, x.shape, probs=probs, routing_map=routing_map)
    torch.testing.assert_close(got, want)
    assert upstream_calls() == (0, 1)
