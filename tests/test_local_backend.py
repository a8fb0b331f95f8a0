"""The fast local backend: SDPA core attention and grouped expert GEMMs against megatron-core's
reference modules (outputs and every gradient), checkpoints moving between expert layouts,
activation recompute (exact on CPU, dense and MSA layers), the FP8 settings."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from megatron.core import dist_checkpointing
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

from model.attention import SDPAttention, causal_attention_with_lse
from model.builder import build_model, transformer_config
from model.experts import GroupedExperts, grouped_mm
from model.msa import dense_block_mass
from model.specs import te_available
from parallel.config import ParallelConfig
from pretrain.config import TrainConfig
from pretrain.settings import Machine, fp8_settings, model_recompute, recompute_settings
from conftest import run_module, tiny_model_config

cuda = pytest.mark.gpu(reason="needs a CUDA GPU (cuDNN/flash SDPA, torch._grouped_mm on Hopper)")


def _config(**overrides):
    return transformer_config(tiny_model_config(**overrides), ParallelConfig(), cpu=True)


def _grads(*tensors):
    return [t.grad.clone() for t in tensors]


@pytest.mark.parametrize("mask_type", [AttnMaskType.causal, AttnMaskType.padding])
def test_sdpa_equals_megatron_dot_product_attention(dist, mask_type):
    config = _config(num_attention_heads=6, num_query_groups=2, kv_channels=16)
    torch.manual_seed(0)
    s, b, h, g, d = 37, 2, 6, 2, 16
    q, k, v = (torch.randn(s, b, n, d, dtype=torch.float64) for n in (h, g, g))
    mask = None
    if mask_type == AttnMaskType.padding:  # True = masked out; every row keeps key 0
        mask = torch.rand(b, 1, s, s) < 0.4
        mask[..., 0] = False
    outs, grads = [], []
    for module in (SDPAttention(config, 1, mask_type, "self"), DotProductAttention(config, 1, mask_type, "self")):
        qkv = [t.clone().requires_grad_() for t in (q, k, v)]
        out = module(*qkv, mask)
        assert out.shape == (s, b, h * d)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        outs.append(out.detach())
        grads.append(_grads(*qkv))
    torch.testing.assert_close(outs[0], outs[1])
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want)


def _check_attention_with_lse(device: str, dtype: torch.dtype, tol: dict):
    """causal_attention_with_lse against fp64 attention with explicit scores: out, lse, the
    gradients of q, k, v; and dense_block_mass given that lse equals its own two-pass result."""
    torch.manual_seed(4)
    B, S, H, G, D = 2, 301, 6, 2, 64
    q, k, v = (torch.randn(B, S, n, D, device=device) for n in (H, G, G))
    qkv = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    out, lse = causal_attention_with_lse(*qkv)
    weights = torch.randn_like(out, dtype=torch.float32)
    (out.float() * weights).sum().backward()
    ref_qkv = [t.detach().double().requires_grad_() for t in qkv]
    q64, k64, v64 = (t.transpose(1, 2) for t in ref_qkv)
    k64, v64 = (t.repeat_interleave(H // G, dim=1) for t in (k64, v64))
    logits = (q64 @ k64.transpose(-1, -2)) * D**-0.5
    logits = logits.masked_fill(~torch.ones(S, S, dtype=torch.bool, device=device).tril(), float("-inf"))
    ref = (logits.softmax(-1) @ v64).transpose(1, 2)
    (ref * weights.double()).sum().backward()
    torch.testing.assert_close(out.double(), ref, **tol)
    if lse is not None:
        torch.testing.assert_close(lse.double(), logits.logsumexp(-1).transpose(1, 2), **tol)
        one_pass = dense_block_mass(qkv[0].detach(), qkv[1].detach(), block_size=16, lse=lse)
        two_pass = dense_block_mass(qkv[0].detach(), qkv[1].detach(), block_size=16)
        torch.testing.assert_close(one_pass, two_pass, rtol=1e-3, atol=1e-4)
    for got, want in zip(qkv, ref_qkv):
        torch.testing.assert_close(got.grad.double(), want.grad, **tol)


def test_attention_with_lse_and_one_pass_dense_block_mass():
    _check_attention_with_lse("cpu", torch.float32, dict(rtol=1e-4, atol=1e-5))


def _experts(config, cls):
    submodules = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
    pgs = ProcessGroupCollection.use_mpu_process_groups()
    return cls(config.num_moe_experts, config, submodules, pg_collection=pgs)


def _run_experts(module, x, counts, probs):
    x, probs = x.clone().requires_grad_(), probs.clone().requires_grad_()
    out, bias = module(x, counts, probs)
    assert bias is None
    (out.float() * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    params = dict(module.named_parameters())
    return out.detach().float(), [x.grad.float(), probs.grad.float()], {n: p.grad.float() for n, p in params.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32-loop", "bf16-grouped_mm"])
@pytest.mark.parametrize("moe_act_recompute", [False, True])
def test_grouped_experts_equal_sequential_mlp(dist, dtype, moe_act_recompute):
    """Same parameters and state-dict keys as SequentialMLP; same outputs and gradients, with an
    expert that gets no token. fp32 runs the matmul loop, bf16 torch._grouped_mm (CPU)."""
    config = _config(num_experts=5, hidden_size=24, moe_ffn_hidden_size=40)
    config.params_dtype = dtype
    if moe_act_recompute:
        config = copy.deepcopy(config)
        config.recompute_granularity, config.recompute_modules = "selective", ["moe_act"]
    torch.manual_seed(1)
    model_parallel_cuda_manual_seed(1)
    reference = _experts(config, SequentialMLP).to(dtype)
    grouped = _experts(config, GroupedExperts).to(dtype)
    assert grouped.activation_recompute == moe_act_recompute
    assert grouped.state_dict().keys() == reference.state_dict().keys()
    grouped.load_state_dict(reference.state_dict())
    counts = torch.tensor([7, 0, 13, 1, 10])
    x = torch.randn(int(counts.sum()), 24, dtype=dtype)
    probs = torch.rand(int(counts.sum()), dtype=dtype)
    want, want_in, want_w = _run_experts(reference, x, counts, probs)
    got, got_in, got_w = _run_experts(grouped, x, counts, probs)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got, want, **tol)
    for a, b in zip(got_in, want_in):
        torch.testing.assert_close(a, b, **tol)
    for name in want_w:
        torch.testing.assert_close(got_w[name], want_w[name], **tol)
    assert not got_w["local_experts.1.linear_fc1.weight"].any()  # the expert without tokens


def _check_grouped_mm(counts: list[int], k: int, n: int, device: str, atol_grad: float):
    """grouped_mm in bf16 against per-expert fp64 matmuls: output and both gradients."""
    torch.manual_seed(2)
    counts_t = torch.tensor(counts, device=device)
    x = torch.randn(sum(counts), k, device=device, dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(len(counts), n, k, device=device) * k**-0.5).bfloat16().requires_grad_()
    out = grouped_mm(x, w, counts_t)
    out.float().square().sum().backward()
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = torch.cat([xe @ we.t() for xe, we in zip(torch.split(x64, counts), w64)])
    ref.square().sum().backward()
    torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=2e-2, atol=atol_grad)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=2e-2, atol=atol_grad)


def test_grouped_mm_matches_per_expert_matmuls():
    _check_grouped_mm([3, 0, 9, 4], k=24, n=40, device="cpu", atol_grad=0.1)


def _build(model_cfg, train=None):
    torch.manual_seed(1)
    model_parallel_cuda_manual_seed(1)
    extra = recompute_settings(train, model_cfg, Machine.this()) if train is not None else None
    tconfig = transformer_config(model_cfg, ParallelConfig(), cpu=True, extra=extra)
    recompute = model_recompute(train) if train is not None else ()
    (model,) = build_model(model_cfg, tconfig, backend="local", recompute=recompute)
    return model


def test_checkpoints_move_between_sequential_and_grouped_experts(dist, tmp_path):
    sequential = _build(tiny_model_config(moe_grouped_gemm=False))
    grouped = _build(tiny_model_config(moe_grouped_gemm=True))
    assert any(isinstance(m, SequentialMLP) and not isinstance(m, GroupedExperts) for m in sequential.modules())
    assert any(isinstance(m, GroupedExperts) for m in grouped.modules())
    with torch.no_grad():  # make the two differ before the load
        for p in grouped.parameters():
            p.mul_(0.5).add_(0.1)
    want = sequential.sharded_state_dict()
    assert set(want) == set(grouped.sharded_state_dict())
    dist_checkpointing.save(want, str(tmp_path))
    loaded = dist_checkpointing.load(grouped.sharded_state_dict(), str(tmp_path))
    grouped.load_state_dict(loaded)
    for (name, a), (_, b) in zip(sequential.state_dict().items(), grouped.state_dict().items()):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), name


def _loss_and_grads(model, tokens):
    model.train()
    model.zero_grad()
    position_ids = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    labels = torch.roll(tokens, -1, dims=1)
    try:
        loss = model(tokens, position_ids, None, labels=labels).sum()
        loss.backward()
    finally:  # megatron's process-wide loss trackers, sized by this model's MTP depth
        MTPLossLoggingHelper.tracker.clear()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


RECOMPUTE_CASES = {
    "selective-all": dict(recompute="selective", recompute_modules=["core_attn", "moe_act"]),
    "selective-moe": dict(recompute="selective", recompute_modules=["moe"]),
    "selective-dispatch": dict(recompute="selective", recompute_modules=["moe_dispatch"]),
    # both output-discarding checkpoints in one MoE block: the dispatch's rebuilt first
    "selective-all-dispatch": dict(recompute="selective", recompute_modules=["core_attn", "moe_act", "moe_dispatch"]),
    "full": dict(recompute="full"),
}


@pytest.mark.parametrize("attention", ["dense", "msa-sparse", "msa-dense_warmup"])
@pytest.mark.parametrize("case", list(RECOMPUTE_CASES))
def test_recompute_is_exact(dist, attention, case):
    """Loss and every gradient (index branch included) equal the run without recompute."""
    overrides = dict(num_layers=2, mtp_num_layers=1)
    if attention != "dense":
        mode = attention.split("-")[1]
        overrides.update(attention=dict(type="msa", dense_layers=[0]),
                         msa=dict(mode=mode, block_size=8, topk=2, index_head_dim=16))
    from model.config import AttentionConfig, MSAConfig

    if "attention" in overrides:
        overrides["attention"] = AttentionConfig(**overrides["attention"])
        overrides["msa"] = MSAConfig(**overrides["msa"])
    model_cfg = tiny_model_config(**overrides)
    tokens = torch.randint(0, model_cfg.vocab_size, (2, 45), generator=torch.Generator().manual_seed(3))
    want_loss, want = _loss_and_grads(_build(model_cfg), tokens)
    got_loss, got = _loss_and_grads(_build(model_cfg, TrainConfig(**RECOMPUTE_CASES[case])), tokens)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=0)
    assert got.keys() == want.keys()
    if attention != "dense":
        assert any(".indexer." in n for n in got)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7, msg=name)


def test_moe_dispatch_recompute_frees_the_dispatched_tokens(dist):
    """train.recompute_modules=[moe_dispatch]: every MoE block (decoder and MTP) is model/moe.py's;
    after forward the tokens its experts read hold no memory (rebuilt in backward, where the
    gradients equal the run without recompute: test_recompute_is_exact)."""
    from model.moe import DispatchRecomputeMoELayer

    model_cfg = tiny_model_config(num_layers=2, mtp_num_layers=1)
    model = _build(model_cfg, TrainConfig(recompute="selective", recompute_modules=["moe_dispatch"]))
    layers = [m for m in model.modules() if isinstance(m, DispatchRecomputeMoELayer)]
    assert len(layers) == 3
    dispatched = []
    for layer in layers:
        layer.experts.register_forward_pre_hook(lambda mod, args: dispatched.append(args[0]))
    tokens = torch.randint(0, model_cfg.vocab_size, (2, 45), generator=torch.Generator().manual_seed(3))
    model.train()
    try:
        loss = model(tokens, torch.arange(45).expand_as(tokens), None, labels=tokens)
        assert len(dispatched) == 3 and all(t.untyped_storage().size() == 0 for t in dispatched)
        loss.sum().backward()
    finally:
        MTPLossLoggingHelper.tracker.clear()
    assert all(t.untyped_storage().size() == t.numel() * t.element_size() for t in dispatched)
    with pytest.raises(ValueError, match="moe and moe_dispatch"):
        recompute_settings(TrainConfig(recompute="selective", recompute_modules=["moe", "moe_dispatch"]),
                           model_cfg, Machine.this())


@pytest.mark.slow
def test_trainer_runs_with_recompute(tmp_path):
    """`python -m pretrain` on the tiny default (an MSA layer, MTP) with selective recompute of
    the MSA/dense core attention and the expert activation: trains, finite losses."""
    overrides = ["train.iters=2", "train.log_interval=1", "train.eval_interval=0", "checkpoint.save=false",
                 "logger.wandb.mode=disabled", "train.recompute=selective",
                 "train.recompute_modules=[core_attn,moe_act]"]
    result = run_module(["pretrain", f"hydra.run.dir={tmp_path}/run", *overrides], cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["lm_loss"] for r in records if "lm_loss" in r]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert all("indexer_loss" in r for r in records if "lm_loss" in r)


def test_fp8_settings_and_errors():
    with pytest.raises(ValueError, match="train.fp8"):
        fp8_settings(TrainConfig(fp8="e4m3"), backend="local")
    with pytest.raises(ValueError, match="train.fp8="):
        TrainConfig(fp8="e5m2")
    with pytest.raises(ValueError, match="train.fp8_recipe"):
        TrainConfig(fp8="e4m3", fp8_recipe="nvfp4")
    with pytest.raises(ValueError, match="train.fp8_bf16_edge_layers"):
        TrainConfig(fp8="hybrid", fp8_bf16_edge_layers=1)  # delayed scaling wraps the whole block
    with pytest.raises(ValueError, match="train.recompute="):
        TrainConfig(recompute="some")
    with pytest.raises(ValueError, match="train.recompute_modules"):
        TrainConfig(recompute="selective", recompute_modules=["mlp"])
    machine = Machine.this()
    with pytest.raises(ValueError, match="model.moe_grouped_gemm"):
        recompute_settings(TrainConfig(recompute="selective", recompute_modules=["moe_act"]),
                           tiny_model_config(moe_grouped_gemm=False), machine)
    no_te = Machine(cuda=False, te=False, apex_or_te=False)
    with pytest.raises(ValueError, match="train.recompute_modules has layernorm"):
        recompute_settings(TrainConfig(recompute="selective", recompute_modules=["layernorm"]),
                           tiny_model_config(), no_te)
    with pytest.raises(ValueError, match="train.recompute_num_layers"):
        recompute_settings(TrainConfig(recompute="full", recompute_num_layers=2), tiny_model_config(), machine)


@pytest.mark.gpu
@pytest.mark.skipif(not te_available(), reason="Transformer Engine does not import here (not installed, or no CUDA)")
@pytest.mark.parametrize("recipe", ["delayed", "tensorwise"])
def test_fp8_te_model_trains_a_step(dist, recipe):
    """The TE spec with FP8 runs forward and backward; the MSA layer's index branch stays a
    bf16 torch.nn.Linear (not a TE module, so FP8 autocast does not reach it)."""
    from model.config import AttentionConfig, MSAConfig

    cfg = tiny_model_config(hidden_size=128, kv_channels=32, moe_ffn_hidden_size=64, num_experts=4,
                            attention=AttentionConfig(type="msa", dense_layers=[0]),
                            msa=MSAConfig(block_size=16, topk=2, index_head_dim=32))
    train = TrainConfig(fp8="hybrid", fp8_recipe=recipe, precision="bf16")
    tconfig = transformer_config(cfg, ParallelConfig(), params_dtype=torch.bfloat16, cpu=False,
                                 extra=fp8_settings(train, backend="te"))
    assert tconfig.fp8 == "hybrid" and tconfig.fp8_recipe == recipe
    (model,) = build_model(cfg, tconfig, backend="te")
    model.cuda()
    tokens = torch.randint(0, cfg.vocab_size, (1, 128), device="cuda")
    loss, grads = _loss_and_grads(model, tokens)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads.values())
    indexer = next(m for n, m in model.named_modules() if n.endswith(".indexer"))
    assert type(indexer.linear_q) is torch.nn.Linear and indexer.linear_q.weight.dtype == torch.bfloat16


@cuda
def test_cuda_sdpa_equals_megatron_dot_product_attention(dist):
    """bf16 SDPA (flash/cuDNN) against megatron's unfused attention run in fp32."""
    config = _config(num_attention_heads=6, num_query_groups=2, kv_channels=128)
    torch.manual_seed(0)
    s, b, h, g, d = 1000, 2, 6, 2, 128
    q, k, v = (torch.randn(s, b, n, d, device="cuda") for n in (h, g, g))
    weights = torch.randn(s, b, h * d, device="cuda")
    results = []
    for module, dtype in ((SDPAttention(config, 1, AttnMaskType.causal, "self"), torch.bfloat16),
                          (DotProductAttention(config, 1, AttnMaskType.causal, "self"), torch.float32)):
        qkv = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        out = module(*qkv, None)
        (out.float() * weights).sum().backward()
        results.append([out.detach().float()] + [t.grad.float() for t in qkv])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2 * float(want.abs().max()))


@cuda
def test_cuda_attention_with_lse_and_one_pass_dense_block_mass():
    _check_attention_with_lse("cuda", torch.bfloat16, dict(rtol=3e-2, atol=3e-2))


@cuda
def test_cuda_grouped_mm_matches_per_expert_matmuls():
    _check_grouped_mm([300, 0, 917, 45], k=3072, n=1536, device="cuda", atol_grad=0.5)
