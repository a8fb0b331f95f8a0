"""MiniMax-M3's text model (#19) against transformers 5.25's `minimax_m3_vl`.

The reference is a tiny MiniMaxM3VLForCausalLM with every tensor random (transformers starts
the Gemma norms at 0, the identity, and the expert bias at 0, which would hide a dropped +1 or a
swapped norm), eager attention, layer 0 a dense MLP with full attention and layers 1-3 MoE with
MSA, blocks of 8 and top-2 at 64 tokens so that the sparse layers select (16 of up to 64 keys).
It is saved as transformers saves a text-only model (`minimax_m3_vl_text`, its own names) and in
the released form (the vision-language MiniMaxM3SparseForConditionalGeneration with a tiny vision
tower: the LLM under `language_model.`, release names). Imports run in this process at tp1;
tests/test_hf_layouts.py runs the parallel layouts. The modules M3 adds are checked against
plain PyTorch formulas, outputs and gradients; the M2 models are checked unchanged.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
from conftest import REPO, tiny_model_config
from safetensors.torch import load_file

from convert import exporter, importer
from model.config import AttentionConfig, ModelConfig, MSAConfig
from model.describe import compose_model
from model.hf import ConvertError
from model.hf.config import hf_config, model_config_from_hf
from model.hf.names import M3_RELEASED, M3_TEXT, is_quantized_linear, rules
from model.hf.safetensors import SafetensorsDir, dequantize_fp8
from parallel import gather
from parallel.config import ParallelConfig
from test_convert import assert_close, our_logits

LAYERS = [0, 1, 1, 1]
"""moe_layer_freq and sparse_attention_freq of the tiny model: layer 0 dense, 1-3 MoE + MSA (4
layers: two pipeline stages)."""
TINY_M3 = {
    "vocab_size": 128, "hidden_size": 64, "intermediate_size": 32, "num_hidden_layers": 4,
    "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 16, "num_local_experts": 4,
    "num_experts_per_tok": 2, "dense_intermediate_size": 48, "shared_intermediate_size": 24,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
    "moe_layer_freq": LAYERS, "max_position_embeddings": 256, "bos_token_id": 1, "eos_token_id": 2,
    "sparse_attention_config": {"sparse_attention_freq": LAYERS, "sparse_block_size": 8, "sparse_topk_blocks": 2,
                                "sparse_index_dim": 16, "sparse_num_index_heads": 2},
}
S = 64
"""Tokens per sequence: 8 blocks of 8, each token attends to at most 2."""
TINY_VISION = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
               "patch_size": 2, "image_size": 8}
NEAR_TIE = 1e-6


def random_m3(seed: int = 0):
    """The tiny MiniMaxM3VLForCausalLM (eager attention) with every parameter and buffer random:
    Gemma norm weights 0.2 * randn (around the identity, so a missing 1 + w shows), the expert
    bias large enough to change the routing."""
    torch.manual_seed(seed)
    config = transformers.MiniMaxM3VLTextConfig(**TINY_M3)
    config._attn_implementation = "eager"
    model = transformers.MiniMaxM3VLForCausalLM(config).eval()
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if "inv_freq" in name:
                continue
            scale = 0.2 if "norm" in name or "e_score_correction_bias" in name else 0.15
            tensor.copy_(scale * torch.randn_like(tensor))
    return model


def save_released(model, directory):
    """`model`'s text weights in the released vision-language checkpoint (a tiny random vision
    tower and projector beside them), as transformers saves MiniMaxM3SparseForConditionalGeneration."""
    config = transformers.MiniMaxM3VLConfig(text_config=TINY_M3, vision_config=TINY_VISION, projector_hidden_size=32)
    vl = transformers.MiniMaxM3SparseForConditionalGeneration(config)
    vl.model.language_model.load_state_dict(model.model.state_dict())
    vl.lm_head.load_state_dict(model.lm_head.state_dict())
    vl.save_pretrained(directory)


@pytest.fixture(scope="module")
def m3(tmp_path_factory):
    """(the random model, a directory holding it as `text` and `released`)."""
    model = random_m3()
    root = tmp_path_factory.mktemp("m3")
    model.save_pretrained(root / "text")
    save_released(model, root / "released")
    return model, root


def tokens_and_positions(seed: int = 3, batch: int = 2):
    tokens = torch.randint(0, TINY_M3["vocab_size"], (batch, S), generator=torch.Generator().manual_seed(seed))
    return tokens, torch.arange(S).unsqueeze(0).expand(batch, -1)


def import_in_process(hf_dir, overrides=(), dtype: str = "fp32", seed: int = 5):
    model, config = importer.derive_model(hf_dir, list(overrides))
    chunks = importer.build_chunks(importer.run_config(model, ParallelConfig(), dtype))
    importer.fill(chunks, model, hf_dir, config, seed=seed, progress="off")
    return model, chunks


def read_dir(directory) -> dict[str, torch.Tensor]:
    source = SafetensorsDir(directory)
    return {name: source.read(name) for name in source.infos}


# ---- config.json -------------------------------------------------------------------------------


def test_released_config_derives_m3_preview():
    released = json.loads((REPO / "tests" / "data" / "minimax_m3_config.json").read_text())
    derived = model_config_from_hf(released, name="m3_preview")
    assert derived == compose_model(["model=m3_preview"])
    assert derived.dense_mlp_layers == [0, 1, 2] and derived.msa_layers() == list(range(3, 60))


def test_written_config_reads_back_in_transformers_and_ours():
    m3 = compose_model(["model=m3_preview"])
    written = hf_config(m3, dtype="bfloat16", fp8=False)
    assert written["model_type"] == "minimax_m3_vl_text" and written["architectures"] == ["MiniMaxM3VLForCausalLM"]
    assert model_config_from_hf(written, name="m3_preview") == m3
    config = transformers.MiniMaxM3VLTextConfig(**{k: v for k, v in written.items() if k != "architectures"})
    assert config.rope_parameters["partial_rotary_factor"] == 0.5
    assert config.mlp_layer_types[:4] == ["dense"] * 3 + ["sparse"]
    assert config.layer_types[2:4] == ["full_attention", "minimax_m3_sparse"]
    assert (config.index_n_heads, config.index_block_size, config.index_topk_blocks) == (4, 128, 16)


def test_rotary_dim_without_the_factor_is_used_with_a_warning(caplog):
    text = {**TINY_M3, "model_type": "minimax_m3_vl_text", "rms_norm_eps": 1e-6, "rotary_dim": 8}
    del text["rope_parameters"]
    text["rope_theta"] = 1e4
    with caplog.at_level(logging.WARNING, logger="convert"):
        assert model_config_from_hf(text, name="x").rotary_percent == 0.5
    assert any("rotary_dim" in r.getMessage() and "partial_rotary_factor" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("field, value", [
    ("swiglu_limit", 10.0), ("swiglu_alpha", 1.0), ("hidden_act", "gelu"), ("qk_norm_type", "per_layer"),
    ("use_gemma_norm", False), ("n_shared_experts", 2), ("tie_word_embeddings", True),
])
def test_unsupported_m3_fields_are_named(field, value):
    released = json.loads((REPO / "tests" / "data" / "minimax_m3_config.json").read_text())
    released["text_config"][field] = value
    with pytest.raises(ConvertError, match=field):
        model_config_from_hf(released, name="x")


def test_an_m3_model_without_a_shared_expert_has_no_hf_form():
    model = tiny_model_config(norm_style="gemma", qk_norm="per_head", activation="swiglu_oai")
    with pytest.raises(ConvertError, match="moe_shared_expert_ffn_hidden_size"):
        hf_config(model, dtype="bfloat16", fp8=False)
    with pytest.raises(ConvertError, match="model.activation"):
        hf_config(tiny_model_config(activation="swiglu_oai"), dtype="bfloat16", fp8=False)


# ---- import --------------------------------------------------------------------------------------


def test_every_key_of_the_m3_model_has_exactly_one_rule(m3, dist):
    """names.rules lists exactly the (key, expert) pieces megatron checkpoints, MTP included, in
    both M3 layouts."""
    _, root = m3
    model, _ = importer.derive_model(root / "text", ["model.mtp_num_layers=1"])
    chunks = importer.build_chunks(importer.run_config(model, ParallelConfig(), "fp32"))
    built = set(gather.local_keys(chunks))
    for layout in (M3_TEXT, M3_RELEASED):
        mapped = {(r.key, (e,) if r.experts else ()) for r in rules(model, layout)
                  for e in (range(r.experts) if r.experts else [None])}
        assert built == mapped


@pytest.mark.parametrize("form", ["text", "released"])
def test_import_gives_transformers_logits_with_sparse_layers(m3, dist, caplog, form):
    """Both forms import to transformers' logits (eager, its sparse mask); the released one
    skips the vision model with one log line."""
    model, root = m3
    with caplog.at_level(logging.INFO, logger="convert"):
        derived, (chunk,) = import_in_process(root / form)
    assert derived.msa_layers() == [1, 2, 3] and derived.dense_mlp_layers == [0] and derived.norm_style == "gemma"
    skipped = [r.getMessage() for r in caplog.records if "vision model" in r.getMessage()]
    if form == "released":
        assert len(skipped) == 1 and "vision_tower.*" in skipped[0] and "patch_merge_mlp.*" in skipped[0]
    else:
        assert not skipped
    tokens, positions = tokens_and_positions()
    with torch.no_grad():
        ref = model(tokens).logits
    assert_close(our_logits(chunk, tokens, positions), ref)


def _transformers_selections(model, tokens):
    """{layer: (indexer input [B, S, H], block indices [B, G, S, K])} of transformers' sparse layers."""
    seen = {}
    hooks = [
        layer.self_attn.indexer.register_forward_hook(
            lambda module, args, out, i=i: seen.__setitem__(i, (args[0].detach(), out.detach())))
        for i, layer in enumerate(model.model.layers) if layer.self_attn.indexer is not None
    ]
    try:
        with torch.no_grad():
            model(tokens)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def test_selection_equals_transformers_indexer(m3, dist):
    """Our index branch and msa_select on the imported weights pick, per (token, group), the
    same set of blocks as MiniMaxM3VLIndexer (near-ties, score gaps within 1e-6, are reported,
    not failed), and the selections are really sparse."""
    from model.msa import dense_block_scores, msa_select

    model, root = m3
    derived, (chunk,) = import_in_process(root / "text")
    tokens, _ = tokens_and_positions(seed=4)
    m = derived.msa
    near_ties = []
    rotary = chunk.rotary_pos_emb(S)
    for layer, (x_bsh, theirs_bgsk) in _transformers_selections(model, tokens).items():
        indexer = chunk.decoder.layers[layer].self_attention.indexer
        with torch.no_grad():
            index_q, index_k = indexer(x_bsh.transpose(0, 1).contiguous(), rotary)
            ours_bgsk = msa_select(index_q, index_k, block_size=m.block_size, topk=m.topk, local_blocks=m.local_blocks)
            scores = dense_block_scores(index_q, index_k, block_size=m.block_size)  # [B, G, S, nb]
        assert ours_bgsk.shape == theirs_bgsk.shape
        for b, g, t in itertools.product(*map(range, ours_bgsk.shape[:3])):
            ours = {i for i in ours_bgsk[b, g, t].tolist() if i >= 0}
            theirs = {i for i in theirs_bgsk[b, g, t].tolist() if i >= 0}
            if ours == theirs:
                continue
            row = scores[b, g, t]
            gap = (row[sorted(ours - theirs)].min() - row[sorted(theirs - ours)].max()).abs().item()
            assert gap <= NEAR_TIE, f"layer {layer} (b {b}, g {g}, t {t}): ours {ours}, transformers {theirs}, gap {gap:.3g}"
            near_ties.append((layer, b, g, t, gap))
        assert (ours_bgsk >= 0).sum(-1).max() == m.topk and S // m.block_size > m.topk  # sparse
    if near_ties:  # shown in pytest's warnings summary
        warnings.warn(f"selections differ only by near-ties within {NEAR_TIE} (layer, b, g, t, gap): {near_ties}")


# ---- export ----------------------------------------------------------------------------------------


def test_export_is_transformers_text_form_and_reloads_equal(m3, dist, tmp_path):
    """released -> ours -> export: transformers' text-only names, every tensor bitwise as
    transformers saved it, and transformers' logits from the export equal the original's."""
    model, root = m3
    derived, config = importer.derive_model(root / "released", [])
    saved = importer.import_hf(root / "released", tmp_path / "ckpt", parallel=ParallelConfig(), model=derived,
                               hf_config=config, dtype="fp32", progress="off")
    out = exporter.export_hf(saved, tmp_path / "hf", dtype="fp32", max_shard_bytes=20_000, progress="off")
    assert len(list(out.glob("model-*.safetensors"))) > 1
    written = json.loads((out / "config.json").read_text())
    assert written["model_type"] == "minimax_m3_vl_text"
    original, exported = load_file(root / "text" / "model.safetensors"), read_dir(out)
    assert exported.keys() == original.keys()
    assert all(torch.equal(exported[k], original[k]) for k in original)
    reloaded = transformers.MiniMaxM3VLForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    tokens, _ = tokens_and_positions()
    with torch.no_grad():
        assert_close(reloaded(tokens).logits, model(tokens).logits)


def test_fp8_export_reimports_as_its_dequantised_values(m3, dist, tmp_path):
    """Block FP8 export (fused expert tensors in tiles per expert): the FP8 tensors hold each
    weight within e4m3 precision, and re-importing gives exactly their dequantised values."""
    _, root = m3
    derived, config = importer.derive_model(root / "text", [])
    saved = importer.import_hf(root / "text", tmp_path / "ckpt", parallel=ParallelConfig(), model=derived,
                               hf_config=config, dtype="fp32", progress="off")
    out = exporter.export_hf(saved, tmp_path / "fp8", dtype="fp8", max_shard_bytes=20_000, progress="off")
    tensors, original = read_dir(out), load_file(root / "text" / "model.safetensors")
    quantized = [n for n in original if is_quantized_linear(n)]
    assert "model.layers.1.mlp.experts.gate_up_proj" in quantized and "model.layers.0.mlp.gate_up_proj.weight" in quantized
    dequantised = {}
    for name in quantized:
        assert tensors[name].dtype == torch.float8_e4m3fn
        scale = tensors[name + "_scale_inv"]
        assert scale.shape == (*original[name].shape[:-2], *(math.ceil(n / 128) for n in original[name].shape[-2:]))
        dequantised[name] = dequantize_fp8(tensors[name], scale, (128, 128))
        rows, cols = original[name].shape[-2:]
        tile_scale = scale.repeat_interleave(128, -2)[..., :rows, :].repeat_interleave(128, -1)[..., :cols]
        error = (dequantised[name] - original[name]).abs()
        assert (error <= original[name].abs() * 2**-4 + tile_scale * 2**-9).all(), name  # e4m3, subnormals
    _, (chunk,) = import_in_process(out)
    reference = tmp_path / "dequantised"
    reference.mkdir()
    from safetensors.torch import save_file

    save_file({n: dequantised.get(n, t.float()) for n, t in tensors.items() if not n.endswith("_scale_inv")},
              reference / "model.safetensors", metadata={"format": "pt"})
    (reference / "config.json").write_text(json.dumps({k: v for k, v in json.loads((out / "config.json").read_text()).items()
                                                        if k != "quantization_config"}))
    _, (expected,) = import_in_process(reference)
    a, b = gather.full_tensors([chunk], grads=False), gather.full_tensors([expected], grads=False)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b)


def test_our_mtp_modules_export_and_reimport_losslessly(m3, dist, tmp_path):
    """MTP modules (initialised: the preview ships none) are written under mtp.layers.D.*, which
    transformers ignores, and come back bitwise."""
    import dataclasses

    from pretrain import checkpoint

    model, root = m3
    derived, chunks = import_in_process(root / "text", ["model.mtp_num_layers=1"])
    saved = checkpoint.save(tmp_path / "ckpt", 0, chunks, None, None, consumed_samples=0, wandb_run_id=None,
                            config={"model": dataclasses.asdict(derived)}, keep=None)
    out = exporter.export_hf(saved, tmp_path / "hf", dtype="fp32", progress="off")
    assert json.loads((out / "config.json").read_text())["num_nextn_predict_layers"] == 1
    assert "mtp.layers.0.eh_proj.weight" in SafetensorsDir(out).infos
    again = import_in_process(out)[1]
    full, back = gather.full_tensors(chunks, grads=False), gather.full_tensors(again, grads=False)
    assert all(torch.equal(back[k], full[k]) for k in full)
    reloaded = transformers.MiniMaxM3VLForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    tokens, _ = tokens_and_positions()
    with torch.no_grad():
        assert_close(reloaded(tokens).logits, model(tokens).logits)


# ---- the modules M3 adds, against plain PyTorch --------------------------------------------------


def _oai(fc1: torch.Tensor) -> torch.Tensor:
    """SwiGLU-OAI as transformers writes it."""
    gate, up = fc1.chunk(2, dim=-1)
    gate, up = gate.clamp(max=7.0), up.clamp(min=-7.0, max=7.0)
    return (up + 1.0) * gate * torch.sigmoid(1.702 * gate)


def _m3_layers(build_tiny):
    """A tiny M3 (layer 0 dense MLP, layer 1 MoE with a shared expert, routed scaling 2) with
    random weights large enough to reach the clamps."""
    cfg, _, model = build_tiny(norm_style="gemma", qk_norm="per_head", activation="swiglu_oai",
                               moe_shared_expert_ffn_hidden_size=24, moe_routed_scaling_factor=2.0,
                               dense_mlp_layers=[0], dense_ffn_hidden_size=40, mtp_num_layers=0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if "norm" in name else 0.5))
        for layer in model.decoder.layers:
            if hasattr(layer.mlp, "router"):
                layer.mlp.router.expert_bias.copy_(0.3 * torch.randn_like(layer.mlp.router.expert_bias))
    return cfg, model


def _grads(module, x):
    return [x.grad.clone()] + [p.grad.clone() for p in module.parameters()]


def _assert_all_close(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    """fp32 against the formula: within 1e-5 of each tensor's largest magnitude."""
    assert len(got) == len(want)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-5 * b.abs().max().item())


def test_moe_layer_with_shared_expert_and_routed_scaling_equals_plain_reference(build_tiny):
    """The MoE layer (router with expert bias, SwiGLU-OAI grouped experts, routed x 2, plus the
    shared expert) equals the formula written out, output and every gradient."""
    cfg, model = _m3_layers(build_tiny)
    moe = model.decoder.layers[1].mlp
    x = torch.randn(11, 1, cfg.hidden_size, requires_grad=True)
    dy = torch.randn(11, 1, cfg.hidden_size)
    out, _ = moe(x)
    out.backward(dy)
    got = [out.detach()] + _grads(moe, x)
    for p in [x, *moe.parameters()]:
        p.grad = None
    h = x.view(-1, cfg.hidden_size)
    scores = torch.sigmoid(h.float() @ moe.router.weight.float().t())
    chosen = (scores + moe.router.expert_bias).topk(cfg.moe_router_topk, dim=-1).indices
    weights = scores.gather(1, chosen)
    weights = 2.0 * weights / weights.sum(-1, keepdim=True)
    experts = moe.experts.local_experts
    routed = torch.zeros_like(h)
    for k in range(cfg.moe_router_topk):
        for e, expert in enumerate(experts):
            rows = chosen[:, k] == e
            y = _oai(h[rows] @ expert.linear_fc1.weight.t()) @ expert.linear_fc2.weight.t()
            routed = routed.index_add(0, rows.nonzero()[:, 0], y * weights[rows, k : k + 1])
    shared = moe.shared_experts
    want = routed + _oai(h @ shared.linear_fc1.weight.t()) @ shared.linear_fc2.weight.t()
    want.view_as(x).backward(dy)
    assert (h @ moe.experts.local_experts[0].linear_fc1.weight.t()).abs().max() > 7  # the clamps act
    _assert_all_close(got, [want.view_as(x)] + _grads(moe, x))


def test_dense_mlp_equals_plain_reference(build_tiny):
    cfg, model = _m3_layers(build_tiny)
    mlp = model.decoder.layers[0].mlp
    x = torch.randn(9, 2, cfg.hidden_size, requires_grad=True)
    dy = torch.randn(9, 2, cfg.hidden_size)
    out, bias = mlp(x)
    assert bias is None
    out.backward(dy)
    got = [out.detach()] + _grads(mlp, x)
    for p in [x, *mlp.parameters()]:
        p.grad = None
    want = _oai(x @ mlp.linear_fc1.weight.t()) @ mlp.linear_fc2.weight.t()
    want.backward(dy)
    _assert_all_close(got, [want] + _grads(mlp, x))


M2_TINY_SHA256 = {"dense": "024a95f5aaa875e8", "msa": "81b5a256e1bb7672"}
"""sha256 (first 16 hex digits) of the names and initial values of the tiny M2 models built by
conftest.build_tiny, as commit 36cf245 (before M3) built them."""


def test_m2_models_are_unchanged(build_tiny):
    msa = {"attention": AttentionConfig(type="msa", dense_layers=[0]), "msa": MSAConfig(block_size=16, topk=2, index_head_dim=16)}
    for name, overrides in (("dense", {}), ("msa", msa)):
        _, tconfig, model = build_tiny(**overrides)
        digest = hashlib.sha256()
        for key, p in model.named_parameters():
            digest.update(key.encode())
            digest.update(p.detach().numpy().tobytes())
        assert digest.hexdigest()[:16] == M2_TINY_SHA256[name], name
        assert (tconfig.moe_layer_freq, tconfig.moe_shared_expert_intermediate_size, tconfig.qk_layernorm,
                tconfig.moe_router_topk_scaling_factor, tconfig.layernorm_zero_centered_gamma) == (1, None, False, None, False)


@pytest.mark.slow
def test_m3_preview_counts_equal_transformers_on_the_meta_device(dist):
    """model.describe's counts of model=m3_preview equal a transformers MiniMaxM3VLForCausalLM
    of the released config built on the meta device (which has no MTP), and the public figures
    (~427-428B total, ~23B active per token without embeddings)."""
    from model.describe import count, summary

    cfg: ModelConfig = compose_model(["model=m3_preview"])
    stats = summary(cfg, count(cfg))
    released = json.loads((REPO / "tests" / "data" / "minimax_m3_config.json").read_text())["text_config"]
    with torch.device("meta"):
        reference = transformers.MiniMaxM3VLForCausalLM(transformers.MiniMaxM3VLTextConfig(**{
            k: v for k, v in released.items() if k not in ("architectures", "model_type")}))
    total = sum(p.numel() for p in reference.parameters())
    experts = sum(p.numel() for n, p in reference.named_parameters() if ".mlp.experts." in n)
    embeddings = 2 * cfg.vocab_size * cfg.hidden_size
    assert stats["total_without_mtp"] == total
    assert stats["experts"] == experts
    assert stats["active_non_embedding"] == total - experts + experts * cfg.moe_router_topk // cfg.num_experts - embeddings
    assert abs(stats["total_without_mtp"] / 427.5e9 - 1) < 0.01
    assert abs(stats["active_non_embedding"] / 23.5e9 - 1) < 0.02
