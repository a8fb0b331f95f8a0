"""`python -m model.describe`: counts from the real megatron-core modules (meta device)."""

from __future__ import annotations

import pytest

import json

from conftest import REPO, run_module, tiny_model_config
from model.describe import count, summary


def _analytic(cfg) -> dict[str, int]:
    """Parameter count of an M2 layer stack from the architecture table (no megatron)."""
    h, d = cfg.hidden_size, cfg.kv_channels
    q, kv = cfg.num_attention_heads * d, cfg.num_query_groups * d
    attention = h * (q + 2 * kv) + q * h
    expert = 3 * h * cfg.moe_ffn_hidden_size  # SwiGLU: gate+up, down
    router = cfg.num_experts * h
    layer_norms = 2 * h + q + kv  # input, pre-MLP, per-layer QK-norm
    layer = attention + cfg.num_experts * expert + router + layer_norms
    embedding = cfg.vocab_size * h
    main = cfg.num_layers * layer + h + 2 * embedding  # + final norm, embedding and output
    mtp = cfg.mtp_num_layers * (layer + 2 * h * h + 3 * h)  # + eh_proj, enorm/hnorm/final norm
    return {"total_without_mtp": main, "mtp": mtp}


def test_count_equals_analytic_formula(dist):
    for overrides in ({}, {"num_layers": 3, "num_experts": 5, "mtp_num_layers": 1}):
        cfg = tiny_model_config(**overrides)
        stats = summary(cfg, count(cfg))
        want = _analytic(cfg)
        assert stats["total_without_mtp"] == want["total_without_mtp"]
        assert stats["mtp"] == want["mtp"]


@pytest.mark.slow
def test_m2_230b_numbers():
    result = run_module(["model.describe", "model=m2_230b"], cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    stats = json.loads(result.stdout.strip().splitlines()[-1])
    assert abs(stats["total_without_mtp"] / 228.69e9 - 1) < 0.005
    assert abs(stats["active_non_embedding"] / 9.80e9 - 1) < 0.005
    assert stats["embedding"] == stats["output"] == 200064 * 3072
    assert stats["total"] == stats["total_without_mtp"] + stats["mtp"]
    assert abs(stats["attention"] / 62 / 44.04e6 - 1) < 0.001
