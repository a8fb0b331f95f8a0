"""M2's router on megatron-core's TopKRouter, against a plain reference: sigmoid scores in fp32,
the expert bias changes which experts are chosen but not their weights, the chosen unbiased
scores are renormalised to sum 1, and the bias moves by rate * sign(mean load - load)."""

from __future__ import annotations

import torch


def _reference_routing(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, k: int):
    scores = torch.sigmoid(x.double() @ weight.double().t())  # [t, e]
    chosen = torch.topk(scores + bias.double(), k, dim=-1).indices  # [t, k]
    picked = scores.gather(1, chosen)
    probs = torch.zeros_like(scores).scatter(1, chosen, picked / picked.sum(-1, keepdim=True))
    return probs, torch.zeros_like(scores, dtype=torch.bool).scatter(1, chosen, True)


def _router_and_input(build_tiny, seed: int = 0):
    cfg, tconfig, model = build_tiny(num_experts=7, moe_router_topk=3)
    router = model.decoder.layers[0].mlp.router
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(13, 2, cfg.hidden_size, generator=g)  # [s, b, h], odd sizes
    return cfg, tconfig, model, router, x


def test_router_matches_reference_and_bias_only_selects(build_tiny):
    cfg, _, _, router, x = _router_and_input(build_tiny)
    bias = torch.zeros(cfg.num_experts)
    bias[2] = 10.0  # forces expert 2 into every token's top-k
    bias[5] = -10.0  # keeps expert 5 out
    router.expert_bias.copy_(bias)
    with torch.no_grad():
        probs, routing_map = router(x)
    ref_probs, ref_map = _reference_routing(x.reshape(-1, cfg.hidden_size), router.weight, bias, cfg.moe_router_topk)
    assert torch.equal(routing_map, ref_map)
    torch.testing.assert_close(probs.double(), ref_probs, rtol=1e-5, atol=1e-6)
    assert routing_map[:, 2].all() and not routing_map[:, 5].any()
    # Weights are the unbiased scores renormalised: the +10 bias does not inflate expert 2.
    scores = torch.sigmoid(x.reshape(-1, cfg.hidden_size).double() @ router.weight.double().t())
    chosen = scores * ref_map
    torch.testing.assert_close(ref_probs[:, 2], chosen[:, 2] / chosen.sum(-1))
    torch.testing.assert_close(probs.sum(-1).double(), torch.ones(probs.shape[0], dtype=torch.float64))


def test_expert_bias_update_after_step(build_tiny):
    from megatron.core.distributed.finalize_model_grads import _update_router_expert_bias

    cfg, tconfig, model, router, x = _router_and_input(build_tiny, seed=1)
    router.local_tokens_per_expert.zero_()
    before = router.expert_bias.clone()
    _, routing_map = router(x)  # grad enabled: counts tokens for the balancing rule
    load = routing_map.sum(0).float()
    torch.testing.assert_close(router.local_tokens_per_expert.float(), load)
    _update_router_expert_bias([model], tconfig)
    expected = before + cfg.moe_router_bias_update_rate * torch.sign(load.mean() - load)
    torch.testing.assert_close(router.expert_bias, expected)
