"""MSA inside the megatron-core model: per-layer dense/MSA choice, full selection equals dense
attention, the index branch learns only from the KL indexer loss, dense warm-up, and the index
branch reads the post-input-norm hidden states whether the norm is fused into linear_qkv
(Transformer Engine's layout) or not."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import tiny_model_config, watch_index_input
from megatron.core.tensor_parallel import ColumnParallelLinear
from megatron.core.transformer.attention import SelfAttention
from model.config import AttentionConfig, MSAConfig
from pretrain import flops
from model.msa.layer import MSACoreAttention, MSASelfAttention
from model.norm import apply_rms_norm
from model.specs import LocalBackend


def _msa(**msa) -> dict:
    return dict(attention=AttentionConfig(type="msa", dense_layers=[0]),
                msa=MSAConfig(**{"block_size": 8, "topk": 2, "index_head_dim": 16, **msa}))


def _batch(vocab: int, s: int = 45):
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, vocab, (2, s), generator=g)
    return tokens, torch.arange(s).expand(2, s)


def _loss(model, tokens, pos):
    return model(tokens, pos, None, labels=tokens).mean()


def test_layers_choose_dense_or_msa(build_tiny):
    _, _, model = build_tiny(num_layers=3, **_msa())
    kinds = [type(layer.self_attention) for layer in model.decoder.layers]
    assert kinds == [SelfAttention, MSASelfAttention, MSASelfAttention]
    assert type(model.mtp.layers[0].transformer_layer.self_attention) is SelfAttention
    indexer = model.decoder.layers[1].self_attention.indexer
    assert indexer.linear_q.weight.shape == (2 * 16, 64)  # one index head per KV group
    assert indexer.linear_k.weight.shape == (16, 64)  # one shared key head


def test_selecting_every_block_equals_dense_attention(build_tiny):
    cfg, _, dense = build_tiny()
    _, _, msa = build_tiny(**_msa(topk=64))  # 64 blocks of 8 >= 45 tokens: everything selected
    missing, unexpected = msa.load_state_dict(dense.state_dict(), strict=False)
    assert not unexpected and all(".indexer." in k for k in missing)
    tokens, pos = _batch(cfg.vocab_size)
    msa.eval(), dense.eval()
    with torch.no_grad():
        torch.testing.assert_close(_loss(msa, tokens, pos), _loss(dense, tokens, pos), rtol=1e-5, atol=1e-5)


def _grads(model, tokens, pos, coeff: float):
    for layer in model.decoder.layers[1:]:
        layer.self_attention.core_attention.msa.indexer_loss_coeff = coeff
    model.zero_grad()
    _loss(model, tokens, pos).backward()
    return {n: (p.grad.clone() if p.grad is not None else None) for n, p in model.named_parameters()}


def test_index_branch_learns_only_from_the_indexer_loss(build_tiny):
    cfg, _, model = build_tiny(**_msa())
    tokens, pos = _batch(cfg.vocab_size)
    (core,) = [m for m in model.modules() if isinstance(m, MSACoreAttention)]
    without = _grads(model, tokens, pos, coeff=0.0)
    total, count = core.pop_indexer_loss()
    assert count == 1 and total > 0  # recorded even when it does not train
    assert core.pop_indexer_loss() == (0.0, 0)  # popped
    with_kl = _grads(model, tokens, pos, coeff=1.0)
    for name, grad in with_kl.items():
        if ".indexer." in name:
            assert without[name] is None or not without[name].any(), name  # the LM loss never reaches it
            assert grad is not None and grad.abs().sum() > 0, name
        elif grad is not None:
            torch.testing.assert_close(grad, without[name], rtol=0, atol=0)  # and the KL reaches nothing else


def test_dense_warmup_attends_fully_and_trains_the_indexer(build_tiny):
    cfg, _, dense = build_tiny()
    _, _, warm = build_tiny(**_msa(mode="dense_warmup"))
    warm.load_state_dict(dense.state_dict(), strict=False)
    tokens, pos = _batch(cfg.vocab_size)
    torch.testing.assert_close(_loss(warm, tokens, pos), _loss(dense, tokens, pos), rtol=1e-5, atol=1e-5)
    (core,) = [m for m in warm.modules() if isinstance(m, MSACoreAttention)]
    core.pop_indexer_loss()
    grads = _grads(warm, tokens, pos, coeff=1.0)
    assert core.pop_indexer_loss()[1] == 1
    assert grads["decoder.layers.1.self_attention.indexer.linear_q.weight"].abs().sum() > 0


@pytest.mark.parametrize("mtp", ["dense", "msa"])
def test_train_only_indexer_freezes_everything_but_the_index_branch(build_tiny, mtp):
    """model.msa.train_only_indexer (stage 1 of converting a dense checkpoint): only the index
    branches have gradients (with model.attention.mtp=msa, as model=m3_msa_230b sets, the MTP
    modules' too), and the routers' expert bias is not updated."""
    fields = _msa(mode="dense_warmup", train_only_indexer=True)
    fields["attention"] = AttentionConfig(type="msa", dense_layers=[0], mtp=mtp)
    cfg, tconfig, model = build_tiny(**fields)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".self_attention.indexer." in n for n in trainable)
    assert any(n.startswith("mtp.") for n in trainable) == (mtp == "msa")
    assert tconfig.moe_router_bias_update_rate == 0.0
    tokens, pos = _batch(cfg.vocab_size)
    _loss(model, tokens, pos).backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n in trainable)
    with pytest.raises(ValueError, match="model.msa.train_only_indexer=true but no layer runs MSA"):
        tiny_model_config(msa=MSAConfig(train_only_indexer=True))


def test_selection_recall_counts_the_full_attention_mass_kept():
    from model.msa import selection_recall

    # 1 batch, 1 group, 4 tokens, blocks of 1 key, top-2: tokens 2 and 3 have more than 2 blocks
    p = torch.tensor([[[[1.0, 0, 0, 0], [0.5, 0.5, 0, 0], [0.2, 0.3, 0.5, 0], [0.1, 0.2, 0.3, 0.4]]]])
    sel = torch.tensor([[[[0, -1], [0, 1], [1, 2], [0, 3]]]])
    total, rows = selection_recall(p, sel, block_size=1)
    assert rows == 2 and total.item() == pytest.approx(0.8 + 0.5)


class _FusedNormLinear(ColumnParallelLinear):
    """A CPU stand-in for Transformer Engine's LayerNormLinear as megatron's TE spec uses it
    (TELayerNormColumnParallelLinear): the layer's input RMSNorm lives in linear_qkv, as
    `layer_norm_weight` (zero-centred, `x * (1 + w)`, for M3's Gemma norms), and the layer's
    input_layernorm is an IdentityOp."""

    normalization = "RMSNorm"

    def __init__(self, input_size, output_size, *, config, **kwargs):
        super().__init__(input_size, output_size, config=config, **kwargs)
        self.eps = config.layernorm_epsilon
        self.zero_centered_gamma = config.layernorm_zero_centered_gamma
        start = torch.zeros if self.zero_centered_gamma else torch.ones
        self.layer_norm_weight = torch.nn.Parameter(start(input_size, dtype=config.params_dtype))

    def forward(self, x):
        weight = 1.0 + self.layer_norm_weight if self.zero_centered_gamma else self.layer_norm_weight
        return super().forward(apply_rms_norm(x, weight, self.eps))


class _FusedNormBackend(LocalBackend):
    def fuse_layernorm_and_linear(self) -> bool:
        return True

    def column_parallel_layer_norm_linear(self) -> type:
        return _FusedNormLinear


@pytest.fixture
def build_backend(dist, monkeypatch):
    """build_backend("local" | "fused", **ModelConfig overrides): the tiny model with the local
    backend's specs, or with the input norm fused into linear_qkv as on Transformer Engine."""
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from model import specs
    from model.builder import build_model, transformer_config
    from parallel.config import ParallelConfig

    upstream = specs.backend_provider
    monkeypatch.setattr(specs, "backend_provider", lambda b, model: _FusedNormBackend() if b == "fused" else upstream(b, model))

    def build(backend: str, **overrides):
        cfg = tiny_model_config(**overrides)
        torch.manual_seed(1)
        model_parallel_cuda_manual_seed(1)
        (model,) = build_model(cfg, transformer_config(cfg, ParallelConfig(), cpu=True), backend=backend)
        return cfg, model

    return build


def _input_norm_weight(layer) -> torch.Tensor:
    fused = getattr(layer.self_attention.linear_qkv, "layer_norm_weight", None)
    return fused if fused is not None else layer.input_layernorm.weight


@pytest.mark.parametrize("norm_style", ["rms", "gemma"])
@pytest.mark.parametrize("backend", ["local", "fused"])
def test_index_branch_reads_the_post_input_norm_hidden_states(build_backend, backend, norm_style):
    """The index branch's input is RMSNorm(layer input; the layer's input-norm weight, `1 + w`
    for M3's Gemma norms), whether the norm is a module of its own (local) or fused into
    linear_qkv (Transformer Engine)."""
    cfg, model = build_backend(backend, norm_style=norm_style, **_msa())
    layer = model.decoder.layers[1]
    assert isinstance(layer.self_attention, MSASelfAttention)
    with torch.no_grad():
        _input_norm_weight(layer).uniform_(0.5, 1.5)
    seen = watch_index_input(layer)
    tokens, pos = _batch(cfg.vocab_size)
    _loss(model, tokens, pos).backward()
    x = seen["x"].double()
    weight = _input_norm_weight(layer).double() + (1.0 if norm_style == "gemma" else 0.0)
    want = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_epsilon) * weight
    torch.testing.assert_close(seen["index_in"].double(), want, rtol=1e-5, atol=1e-6)
    assert not seen["index_in"].requires_grad


def test_fused_input_norm_layout_equals_local(build_backend, tmp_path):
    """A local checkpoint loaded into the fused-norm layout (the TE spec's: input norm inside
    linear_qkv) gives the same loss and every gradient, the index branch's and the MTP
    layer's included."""
    from megatron.core import dist_checkpointing

    overrides = dict(num_layers=2, mtp_num_layers=1, **_msa())
    cfg, local = build_backend("local", **overrides)
    _, fused = build_backend("fused", **overrides)
    assert isinstance(fused.decoder.layers[1].self_attention.linear_qkv, _FusedNormLinear)
    with torch.no_grad():
        for name, p in local.named_parameters():
            if name.endswith("layernorm.weight"):
                p.uniform_(0.5, 1.5)
    dist_checkpointing.save(local.sharded_state_dict(), str(tmp_path))
    fused.load_state_dict(dist_checkpointing.load(fused.sharded_state_dict(), str(tmp_path)))
    tokens, pos = _batch(cfg.vocab_size)
    results = []
    for model in (local, fused):
        model.zero_grad()
        loss = _loss(model, tokens, pos)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (want_loss, want), (got_loss, got) = results
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=0)
    rename = {n: n.replace("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight") for n in want}
    assert sorted(rename.values()) == sorted(got)
    assert any(".indexer." in n for n in want)
    for name, grad in want.items():
        torch.testing.assert_close(got[rename[name]], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_mtp_modules_run_msa_when_asked(build_tiny):
    """model.attention.mtp=msa: the MTP modules' layers are MSA layers (their index branch learns
    from its indexer loss), and the FLOPs count them as such."""
    cfg, _, model = build_tiny(attention=AttentionConfig(type="msa", dense_layers=[0], mtp="msa"),
                               msa=MSAConfig(block_size=8, topk=2, index_head_dim=16))
    assert cfg.mtp_num_layers > 0 and cfg.mtp_msa()
    assert all(type(m.transformer_layer.self_attention) is MSASelfAttention for m in model.mtp.layers)
    _loss(model, *_batch(cfg.vocab_size)).backward()
    for m in model.mtp.layers:
        assert m.transformer_layer.self_attention.indexer.linear_q.weight.grad.abs().sum() > 0
    dense_mtp = dataclasses.replace(cfg, attention=AttentionConfig(type="msa", dense_layers=[0]))
    got, want = flops.forward_flops_per_token(cfg, 4096), flops.forward_flops_per_token(dense_mtp, 4096)
    msa_layers = len(cfg.msa_layers())
    assert got["index_proj"] == want["index_proj"] * (msa_layers + cfg.mtp_num_layers) / msa_layers
    assert got["attention"] < want["attention"]
    with pytest.raises(ValueError, match="model.attention.mtp=msa needs model.attention.type=msa"):
        dataclasses.replace(cfg, attention=AttentionConfig(type="dense", mtp="msa"))
    with pytest.raises(ValueError, match="dense_layers lists every decoder layer"):
        dataclasses.replace(cfg, attention=AttentionConfig(type="msa", dense_layers=[0, 1], mtp="msa"))
