"""Context parallelism: ring attention and MSA over CP ranks give the single-process results.

Layer-level checks run in CP=2 and CP=4 process groups on gloo, one group per CP size (spawned
once, every check inside): each rank computes the single-process reference on the full
sequence itself and compares its own load-balanced slice of the outputs and gradients.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import free_port
from parallel.context_parallel import Ring, ring_attention


def _spawn(cp: int, fn) -> None:
    port = free_port()
    mp.spawn(_init_and_run, args=(cp, port, fn), nprocs=cp, join=True)


def _init_and_run(rank: int, cp: int, port: int, fn) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=cp)
    try:
        fn(Ring(dist.group.WORLD))
    finally:
        dist.destroy_process_group()


def _local(x: torch.Tensor, ring: Ring) -> torch.Tensor:
    """This rank's load-balanced slice (dim 1) of a full-sequence tensor, as a new leaf."""
    pos = ring.positions(x.shape[1] // ring.size)
    return x.detach()[:, pos].clone().requires_grad_(x.requires_grad)


def _close(got: torch.Tensor, want: torch.Tensor, what: str, tol: float = 1e-10) -> None:
    err = (got - want).abs().max().item()
    assert err <= tol * max(1.0, want.abs().max().item()), f"{what}: max error {err}"


def _dense_reference(q, k, v):
    """Full causal GQA attention through SDPA: [B, S, Hq, D], [B, S, G, D] -> [B, S, Hq, D]."""
    hpg = q.shape[2] // k.shape[2]
    k, v = (x.repeat_interleave(hpg, dim=2).transpose(1, 2) for x in (k, v))
    return torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k, v, is_causal=True).transpose(1, 2)


def _check_dense_ring(ring: Ring) -> None:
    torch.manual_seed(0)
    B, Hq, G, D = 2, 6, 2, 8
    S = 7 * 2 * ring.size  # odd chunks of 7 tokens
    q = torch.randn(B, S, Hq, D, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, S, G, D, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, S, G, D, dtype=torch.float64, requires_grad=True)
    out = _dense_reference(q, k, v)
    d_out = torch.randn_like(out)
    out.backward(d_out)
    ql, kl, vl = (_local(x, ring) for x in (q, k, v))
    got = ring_attention(ql, kl, vl, cp_group=ring.group)
    got.backward(_local(d_out, ring))
    _close(got, _local(out, ring), "out")
    for name, mine, full in (("dq", ql, q), ("dk", kl, k), ("dv", vl, v)):
        _close(mine.grad, _local(full.grad, ring), name)


def _check_all(ring: Ring) -> None:
    _check_dense_ring(ring)


@pytest.mark.parametrize("cp", [2, 4])
def test_context_parallel_layers_match_single_process(cp):
    _spawn(cp, _check_all)
