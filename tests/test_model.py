"""The M2 model built from megatron-core specs: forward, RoPE on half the head, MTP losses,
and the per-layer QK-norm against a plain reference at TP=1 and TP=2."""

from __future__ import annotations

import pytest

import math

import torch
import torch.multiprocessing as mp

from conftest import free_port
from model.norm import LayerQKNorm


def _batch(vocab: int, b: int = 2, s: int = 24, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (b, s), generator=g)
    return tokens, torch.arange(s).expand(b, s)


def test_forward_backward_is_finite_and_reaches_every_parameter(build_tiny):
    cfg, _, model = build_tiny()
    tokens, pos = _batch(cfg.vocab_size)
    loss = model(tokens, pos, None, labels=tokens)  # [b, s] per-token LM loss
    assert loss.shape == tokens.shape and torch.isfinite(loss).all()
    # An untrained model predicts about uniformly: loss near ln(vocab).
    assert abs(loss.mean().item() - math.log(cfg.vocab_size)) < 0.5
    loss.mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    # Experts that no token was routed to get no gradient; everything else must.
    assert all(".experts." in n for n in missing), missing


def test_structure_matches_m2(build_tiny):
    cfg, tconfig, model = build_tiny()
    layer = model.decoder.layers[0]
    attn = layer.self_attention
    assert isinstance(attn.q_layernorm, LayerQKNorm) and isinstance(attn.k_layernorm, LayerQKNorm)
    # Per-layer (full-width) norms, not per-head: one weight over all heads.
    assert attn.q_layernorm.weight.numel() == cfg.num_attention_heads * cfg.kv_channels
    assert attn.k_layernorm.weight.numel() == cfg.num_query_groups * cfg.kv_channels
    router = layer.mlp.router
    assert router.score_function == "sigmoid" and router.expert_bias is not None
    assert not router.expert_bias.requires_grad  # a buffer updated by the balancing rule
    assert len(layer.mlp.experts.local_experts) == cfg.num_experts
    assert not hasattr(layer.mlp, "shared_experts") or layer.mlp.shared_experts is None
    assert model.share_embeddings_and_output_weights is False
    assert model.embedding.word_embeddings.weight.data_ptr() != model.output_layer.weight.data_ptr()
    assert len(model.mtp.layers) == cfg.mtp_num_layers


def _rotate_half_reference(x: torch.Tensor, pos: torch.Tensor, rot_dim: int, theta: float):
    """Plain partial RoPE: rotate-half on the first rot_dim dims of each head, rest untouched."""
    inv_freq = 1.0 / theta ** (torch.arange(0, rot_dim, 2, dtype=torch.float64) / rot_dim)
    ang = pos[:, None].double() * inv_freq[None, :]  # [s, rot/2]
    ang = torch.cat([ang, ang], -1)[:, None, None, :]  # [s, 1, 1, rot]
    xr, xp = x[..., :rot_dim].double(), x[..., rot_dim:]
    x1, x2 = xr.chunk(2, -1)
    rotated = xr * ang.cos() + torch.cat([-x2, x1], -1) * ang.sin()
    return torch.cat([rotated.to(x.dtype), xp], -1)


def test_rope_rotates_first_half_of_each_head(build_tiny):
    from megatron.core.models.common.embeddings.rotary_pos_embedding import apply_rotary_pos_emb

    cfg, tconfig, model = build_tiny()
    s, head_dim = 40, cfg.kv_channels
    freqs = model.rotary_pos_emb(s)  # [s, 1, 1, rot_dim]
    assert freqs.shape[-1] == head_dim // 2  # 50% of the head
    x = torch.randn(s, 2, cfg.num_attention_heads, head_dim)  # [s, b, n, d]
    got = apply_rotary_pos_emb(x, freqs, config=tconfig)
    want = _rotate_half_reference(x, torch.arange(s), head_dim // 2, cfg.rotary_base)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got[..., head_dim // 2 :], x[..., head_dim // 2 :])


def test_mtp_losses_are_recorded_per_depth(build_tiny):
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    cfg, _, model = build_tiny(mtp_num_layers=3)
    MTPLossLoggingHelper.tracker.clear()
    tokens, pos = _batch(cfg.vocab_size)
    model(tokens, pos, None, labels=tokens).mean().backward()
    values = MTPLossLoggingHelper.tracker["values"]
    assert values.shape == (3,)
    assert all(abs(v - math.log(cfg.vocab_size)) < 0.7 for v in values.tolist())
    # The MTP modules receive gradient through the scaled MTP loss.
    assert model.mtp.layers[2].eh_proj.weight.grad.abs().sum() > 0
    MTPLossLoggingHelper.tracker.clear()


def _qk_norm_reference(x_sbnd: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    s, b, n, d = x_sbnd.shape
    flat = x_sbnd.double().reshape(s, b, n * d)
    y = flat / torch.sqrt(flat.pow(2).mean(-1, keepdim=True) + eps) * w.double()
    return y.reshape(s, b, n, d)


def _qk_norm_case(seed: int = 0):
    """Odd sizes, a non-trivial weight and an upstream gradient."""
    g = torch.Generator().manual_seed(seed)
    s, b, n, d = 7, 3, 4, 16
    x = torch.randn(s, b, n, d, generator=g) * 3
    w = 1 + 0.5 * torch.randn(n * d, generator=g)
    dy = torch.randn(s, b, n, d, generator=g)
    return x, w, dy


def _run_qk_norm(x, w, dy, tconfig):
    norm = LayerQKNorm(tconfig, hidden_size=x.shape[-1], eps=1e-6, which="q")
    with torch.no_grad():
        norm.weight.copy_(w)
    x = x.clone().requires_grad_(True)
    y = norm(x)
    y.backward(dy)
    return y.detach(), x.grad, norm.weight.grad


def _reference_grads(x, w, dy):
    x = x.double().requires_grad_(True)
    w = w.double().requires_grad_(True)
    y = _qk_norm_reference(x, w, 1e-6)
    y.backward(dy.double())
    return y.detach(), x.grad, w.grad


def test_qk_norm_matches_reference_tp1(build_tiny):
    _, tconfig, _ = build_tiny()  # heads=4, head dim 16 as in the case below
    x, w, dy = _qk_norm_case()
    got = _run_qk_norm(x, w, dy, tconfig)
    for g, r in zip(got, _reference_grads(x, w, dy)):
        torch.testing.assert_close(g.double(), r, rtol=1e-5, atol=1e-6)


def _qk_norm_tp2_worker(rank: int, port: int, results):
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_RANK=str(rank))
    from conftest import tiny_model_config
    from model.builder import transformer_config
    from parallel import patches, setup
    from parallel.config import ParallelConfig

    patches.apply()
    torch.distributed.init_process_group("gloo")
    parallel = ParallelConfig(tp=2)
    setup.init_model_parallel(parallel, seed=1)
    tconfig = transformer_config(tiny_model_config(), parallel, cpu=True)
    x, w, dy = _qk_norm_case()
    n_local = x.shape[2] // 2
    heads = slice(rank * n_local, (rank + 1) * n_local)
    d = x.shape[-1]
    y, dx, dw = _run_qk_norm(
        x[:, :, heads], w[heads.start * d : heads.stop * d], dy[:, :, heads], tconfig
    )
    results[rank] = (y, dx, dw)
    setup.destroy()


@pytest.mark.multiproc
def test_qk_norm_matches_reference_tp2():
    """Each TP rank holds half the heads and half the weight; together they equal the full norm."""
    results = mp.Manager().dict()
    mp.spawn(_qk_norm_tp2_worker, args=(free_port(), results), nprocs=2, join=True)
    y = torch.cat([results[0][0], results[1][0]], dim=2)
    dx = torch.cat([results[0][1], results[1][1]], dim=2)
    dw = torch.cat([results[0][2], results[1][2]], dim=0)
    x, w, dy = _qk_norm_case()
    for g, r in zip((y, dx, dw), _reference_grads(x, w, dy)):
        torch.testing.assert_close(g.double(), r, rtol=1e-5, atol=1e-6)
