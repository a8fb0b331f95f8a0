"""HF checkpoints in and out (convert/, model/hf/): against transformers' MiniMaxM2ForCausalLM.

Every tensor of the reference model is random (transformers initialises norms to ones and the
expert bias to zeros, which would hide a swapped or dropped norm or bias). Imports run in this
process at tp1 (the `dist` fixture); the multi-process layouts are checked by importing under
torchrun and comparing checkpoints (docs/checkpoints.md).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import zlib
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from conftest import REPO, tiny_model_config
from safetensors.torch import load_file, save_file

from convert import exporter, importer
from convert.__main__ import main as convert_main
from convert.progress import Progress
from model.config import AttentionConfig, MSAConfig
from model.describe import compose_model
from model.hf import ConvertError
from model.hf import load as hf_load
from model.hf.config import hf_config, model_config_from_hf
from model.hf.names import is_quantized_linear, rules
from model.hf.safetensors import (
    Planned,
    SafetensorsDir,
    ShardWriter,
    dequantize_fp8,
    quantize_fp8,
)
from parallel import gather
from parallel.config import ParallelConfig
from pretrain import checkpoint

TINY_HF = {
    "vocab_size": 128, "hidden_size": 64, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 16, "num_local_experts": 4, "num_experts_per_tok": 2, "rotary_dim": 8,
    "max_position_embeddings": 256, "bos_token_id": 1, "eos_token_id": 2,
}
RTOL = 1e-5


def random_hf_model(seed: int = 0, **config):
    """A tiny MiniMaxM2ForCausalLM with every parameter and buffer random: norm weights around 1,
    the expert bias around 0 (large enough to change the routing)."""
    torch.manual_seed(seed)
    model = transformers.MiniMaxM2ForCausalLM(transformers.MiniMaxM2Config(**{**TINY_HF, **config})).eval()
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if "inv_freq" in name:
                continue
            if "norm" in name:
                tensor.copy_(1.0 + 0.4 * (torch.rand_like(tensor) - 0.5))
            elif "e_score_correction_bias" in name:
                tensor.copy_(0.2 * torch.randn_like(tensor))
            else:
                tensor.copy_(0.15 * torch.randn_like(tensor))
    return model


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """The random model and its two saved layouts: released (per-expert w1/w2/w3, what
    save_pretrained writes by default) and fused (save_original_format=False)."""
    model = random_hf_model()
    root = tmp_path_factory.mktemp("hf")
    model.save_pretrained(root / "released")
    model.save_pretrained(root / "fused", save_original_format=False)
    return model, root


def tokens_and_positions(seed: int = 3, batch: int = 2, seq: int = 37):
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, TINY_HF["vocab_size"], (batch, seq), generator=generator)
    return tokens, torch.arange(seq).unsqueeze(0).expand(batch, -1)


def import_in_process(hf_dir: Path, overrides=(), dtype: str = "fp32", seed: int = 5):
    """(model config, chunks) filled from hf_dir at tp1 in this process."""
    model, config = importer.derive_model(hf_dir, list(overrides))
    chunks = importer.build_chunks(importer.run_config(model, ParallelConfig(), dtype))
    importer.fill(chunks, model, hf_dir, config, seed=seed, progress="off")
    return model, chunks


def our_logits(chunk, tokens, positions):
    """[b, s, vocab] logits of the main model. megatron's GPTModel with MTP modules runs only
    with labels (and then returns losses): the main head's output is its output layer's last
    call, with the loss on materialised logits (model.cross_entropy=fused; the default chunked
    loss builds none)."""
    chunk.eval()
    if not chunk.config.mtp_num_layers:
        with torch.no_grad():
            return chunk(tokens, positions, None)
    calls = []
    hook = chunk.output_layer.register_forward_hook(lambda module, args, out: calls.append(out[0]))
    cross_entropy, chunk.cross_entropy = chunk.cross_entropy, "fused"
    try:
        with torch.no_grad():
            chunk(tokens, positions, None, labels=tokens)
    finally:
        hook.remove()
        chunk.cross_entropy = cross_entropy
    return calls[-1].transpose(0, 1)


def assert_close(ours, ref, rtol=RTOL):
    err = ((ours.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
    assert err < rtol, f"max abs diff / max abs = {err:.3g}"


def read_dir(directory: Path) -> dict[str, torch.Tensor]:
    source = SafetensorsDir(directory)
    return {name: source.read(name) for name in source.infos}


# ---- config.json ---------------------------------------------------------------------------


def test_released_config_derives_m2_230b():
    released = json.loads((REPO / "tests" / "data" / "minimax_m2_config.json").read_text())
    assert model_config_from_hf(released, name="m2_230b") == compose_model(["model=m2_230b"])


def test_written_config_is_the_released_one():
    """hf_config(m2_230b) writes the released field values and transformers reads it back."""
    released = json.loads((REPO / "tests" / "data" / "minimax_m2_config.json").read_text())
    m2 = compose_model(["model=m2_230b"])
    written = hf_config(m2, dtype="bfloat16", fp8=True)
    assert {k: written[k] for k in written if k in released} == {k: released[k] for k in written if k in released}
    assert model_config_from_hf(written, name="m2_230b") == m2
    config = transformers.MiniMaxM2Config(**written)
    assert config.rope_parameters["partial_rotary_factor"] == 0.5 and config.rope_parameters["rope_theta"] == 5e6


@pytest.mark.parametrize("field, value", [
    ("tie_word_embeddings", True), ("hidden_act", "gelu"), ("scoring_func", "softmax"),
    ("qk_norm_type", "per_head"), ("shared_intermediate_size", 1536), ("mtp_transformer_layers", 2),
])
def test_unsupported_config_fields_are_named(field, value):
    released = json.loads((REPO / "tests" / "data" / "minimax_m2_config.json").read_text())
    with pytest.raises(ConvertError, match=field):
        model_config_from_hf({**released, field: value}, name="x")


# ---- import ----------------------------------------------------------------------------------


def test_every_key_of_the_model_has_exactly_one_rule(dist):
    """names.rules lists exactly the (key, expert index) pieces megatron checkpoints, for a dense
    model and one with MSA layers, both with MTP, and one whose MTP modules run MSA too."""
    msa = {"attention": AttentionConfig(type="msa", dense_layers=[0]), "msa": MSAConfig(block_size=16, topk=2, index_head_dim=16)}
    mtp_msa = {**msa, "attention": AttentionConfig(type="msa", dense_layers=[0], mtp="msa")}
    for model in (tiny_model_config(), tiny_model_config(**msa), tiny_model_config(**mtp_msa)):
        chunks = importer.build_chunks(importer.run_config(model, ParallelConfig(), "fp32"))
        built = set(gather.local_keys(chunks))
        mapped = {(r.key, (e,) if r.experts else ()) for r in rules(model)
                  for e in (range(r.experts) if r.experts else [None])}
        assert built == mapped


@pytest.mark.parametrize("layout", ["released", "fused"])
def test_import_gives_the_hf_logits(hf, dist, layout):
    model, root = hf
    _, (chunk,) = import_in_process(root / layout)
    tokens, positions = tokens_and_positions()
    with torch.no_grad():
        ref = model(tokens).logits
    assert_close(our_logits(chunk, tokens, positions), ref)


def test_export_reloads_in_transformers_with_equal_logits(hf, dist, tmp_path):
    """HF -> our checkpoint (through save) -> HF: every tensor comes back bitwise, and
    transformers' logits from the export equal the original's."""
    model, root = hf
    derived, config = importer.derive_model(root / "released", [])
    saved = importer.import_hf(root / "released", tmp_path / "ckpt", parallel=ParallelConfig(), model=derived,
                               hf_config=config, dtype="fp32", progress="off")
    out = exporter.export_hf(saved, tmp_path / "hf", dtype="fp32", max_shard_bytes=100_000, progress="off")
    assert len(list(out.glob("model-*.safetensors"))) > 1  # several shards, through the index
    original = load_file(root / "released" / "model.safetensors")
    exported = read_dir(out)
    assert exported.keys() == original.keys()
    assert all(torch.equal(exported[k], original[k]) for k in original)
    reloaded = transformers.MiniMaxM2ForCausalLM.from_pretrained(out).eval()
    tokens, _ = tokens_and_positions()
    with torch.no_grad():
        assert_close(reloaded(tokens).logits, model(tokens).logits)


def test_imported_checkpoint_loads_for_training(hf, dist, tmp_path):
    """pretrain.checkpoint.load reads the import into freshly built chunks: the HF logits."""
    model, root = hf
    derived, config = importer.derive_model(root / "released", [])
    saved = importer.import_hf(root / "released", tmp_path, parallel=ParallelConfig(), model=derived,
                               hf_config=config, dtype="fp32", progress="off")
    chunks = importer.build_chunks(importer.run_config(derived, ParallelConfig(), "fp32"))
    progress = checkpoint.load(saved, chunks, None, config={"model": dataclasses.asdict(derived)})
    assert progress["iteration"] == 0 and not progress["optimizer"] and progress["scheduler"] is None
    tokens, positions = tokens_and_positions()
    with torch.no_grad():
        assert_close(our_logits(chunks[0], tokens, positions), model(tokens).logits)


def test_checkpoint_carries_the_derived_model_config(hf, dist, tmp_path):
    _, root = hf
    derived, config = importer.derive_model(root / "fused", ["model.moe_router_bias_update_rate=0.002"])
    saved = importer.import_hf(root / "fused", tmp_path, parallel=ParallelConfig(), model=derived, hf_config=config,
                               dtype="bf16", progress="off")
    marker = json.loads((saved / checkpoint.MARKER).read_text())
    assert marker["config"]["model"] == dataclasses.asdict(derived)
    assert marker["config"]["model"]["moe_router_bias_update_rate"] == 0.002
    assert all(md.properties.dtype in (torch.bfloat16, torch.float32)
               for md in exporter.DistCheckpoint(saved).tensors.values())
    with pytest.raises(ConvertError, match="exists"):
        importer.check(root / "fused", tmp_path, derived, config)


def test_a_layout_that_does_not_fit_is_one_line_before_any_process_group(hf, tmp_path, caplog):
    _, root = hf
    with caplog.at_level(logging.ERROR, logger="convert"):
        assert convert_main(["import-hf", "--hf", str(root / "released"), "--out", str(tmp_path), "parallel.tp=3"]) == 2
    (error,) = [r.getMessage() for r in caplog.records if r.name == "convert"]
    assert "parallel.tp" in error and "\n" not in error


def test_overrides_may_not_change_what_config_json_fixes(hf):
    _, root = hf
    with pytest.raises(ConvertError, match="model.hidden_size"):
        importer.derive_model(root / "released", ["model.hidden_size=128"])


def test_missing_mtp_modules_are_initialised_as_for_training(hf, dist, caplog):
    """A config.json with MTP modules and no MTP tensors (the released M2): imported main model,
    MTP initialised by the trainer's layout-independent init (and logged)."""
    model, root = hf
    hf_dir = root / "released"
    config = json.loads((hf_dir / "config.json").read_text())
    with_mtp = root / "released_mtp"
    with_mtp.mkdir(exist_ok=True)
    (with_mtp / "model.safetensors").write_bytes((hf_dir / "model.safetensors").read_bytes())
    (with_mtp / "config.json").write_text(json.dumps({**config, "use_mtp": True, "num_mtp_modules": 2}))
    with caplog.at_level(logging.INFO, logger="convert"):
        derived, (chunk,) = import_in_process(with_mtp, seed=11)
    assert derived.mtp_num_layers == 2
    assert any("mtp" in r.getMessage() and "initialised" in r.getMessage() for r in caplog.records)
    fresh = importer.build_chunks(importer.run_config(derived, ParallelConfig(), "fp32"))
    mtp_keys = {r.key for r in rules(derived) if r.group == "mtp"}
    gather.layout_independent_init(fresh, seed=11, std=derived.init_method_std, num_layers=derived.num_layers, keys=mtp_keys)
    ours, expected = gather.full_tensors([chunk], grads=False), gather.full_tensors(fresh, grads=False)
    assert all(torch.equal(ours[k], expected[k]) for k in mtp_keys)
    tokens, positions = tokens_and_positions()
    with torch.no_grad():
        assert_close(our_logits(chunk, tokens, positions), model(tokens).logits)


@pytest.mark.parametrize("mtp", ["dense", "msa"])
def test_msa_override_initialises_the_index_branches(hf, mtp):
    """Turning layers of a dense checkpoint into MSA layers (to train their index branches), with
    the MTP modules' layers too (model.attention.mtp=msa); the config declares 2 MTP modules whose
    tensors the checkpoint lacks, as the released M2's."""
    _, root = hf
    source = root / "released"
    with_mtp = root / "released_mtp_config"
    with_mtp.mkdir(exist_ok=True)
    (with_mtp / "model.safetensors").write_bytes((source / "model.safetensors").read_bytes())
    config = json.loads((source / "config.json").read_text())
    (with_mtp / "config.json").write_text(json.dumps({**config, "use_mtp": True, "num_mtp_modules": 2}))
    derived, config = importer.derive_model(with_mtp, [
        "model.attention.type=msa", "model.attention.dense_layers=[0]", "model.msa.index_head_dim=16",
        f"model.attention.mtp={mtp}"])
    plan, _ = hf_load.plan(derived, config, SafetensorsDir(with_mtp))
    groups = {"indexer.1", "mtp"} | ({"mtp_indexer.0", "mtp_indexer.1"} if mtp == "msa" else set())
    assert {r.group for r in rules(derived)} == groups | {"main"}
    assert plan.init_keys == {r.key for r in rules(derived) if r.group in groups}


# ---- errors ----------------------------------------------------------------------------------


def _variant(root: Path, name: str, edit, config_edit=None) -> Path:
    """A copy of the released tiny checkpoint with its tensors (and config) edited."""
    source = root / "released"
    tensors = load_file(source / "model.safetensors")
    edit(tensors)
    target = root / name
    target.mkdir(exist_ok=True)
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((source / "config.json").read_text())
    (target / "config.json").write_text(json.dumps(config_edit(config) if config_edit else config))
    return target


@pytest.mark.parametrize("case, edit, config_edit, message", [
    ("missing", lambda t: t.pop("model.layers.1.self_attn.k_norm.weight"), None,
     r"missing tensor\(s\) model\.layers\.1\.self_attn\.k_norm\.weight"),
    ("missing_expert", lambda t: t.pop("model.layers.0.block_sparse_moe.experts.3.w3.weight"), None,
     r"missing tensor\(s\) model\.layers\.0\.block_sparse_moe\.experts\.3\.w3\.weight"),
    ("unexpected", lambda t: t.update({"model.layers.0.self_attn.sinks": torch.zeros(4)}), None,
     r"unexpected tensor\(s\) model\.layers\.0\.self_attn\.sinks"),
    ("unknown_mtp", lambda t: t.update({"model.layers.2.enorm.weight": torch.ones(64)}), None,
     r"unexpected tensor\(s\) model\.layers\.2\.enorm\.weight"),
    ("misshaped", lambda t: t.update({"model.layers.1.block_sparse_moe.experts.2.w2.weight": torch.zeros(64, 31)}), None,
     r"tensor model\.layers\.1\.block_sparse_moe\.experts\.2\.w2\.weight has shape \[64, 31\].*needs \[64, 32\]"),
    ("fp8_without_scale", lambda t: t.update({"model.layers.0.self_attn.o_proj.weight":
                                              t["model.layers.0.self_attn.o_proj.weight"].to(torch.float8_e4m3fn)}), None,
     r"model\.layers\.0\.self_attn\.o_proj\.weight is FP8 but the checkpoint has no .*weight_scale_inv"),
    ("partial_mtp", lambda t: t.update({"model.layers.2.enorm.weight": torch.ones(64)}),
     lambda c: {**c, "use_mtp": True, "num_mtp_modules": 1},
     r"missing MTP tensor\(s\) model\.layers\.2\.hnorm\.weight"),
])
def test_bad_checkpoints_are_errors_naming_the_tensor(hf, tmp_path, caplog, case, edit, config_edit, message):
    _, root = hf
    bad = _variant(root, case, edit, config_edit)
    model, config = importer.derive_model(bad, [])
    with pytest.raises(ConvertError, match=message):
        importer.check(bad, tmp_path, model, config)
    # The command line says it in one line and exits 2 (before starting any process group).
    with caplog.at_level(logging.ERROR, logger="convert"):
        assert convert_main(["import-hf", "--hf", str(bad), "--out", str(tmp_path / "out")]) == 2
    errors = [r.getMessage() for r in caplog.records if r.name == "convert" and r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0] and re.search(message, errors[0])


# ---- FP8 ---------------------------------------------------------------------------------------


def _dequantize_by_tiles(q: torch.Tensor, scale: torch.Tensor, block) -> torch.Tensor:
    """The reference: each tile's e4m3 values times its scale, tile by tile, in fp32."""
    out = torch.empty(q.shape, dtype=torch.float32)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            rows, cols = slice(i * block[0], (i + 1) * block[0]), slice(j * block[1], (j + 1) * block[1])
            out[rows, cols] = q[rows, cols].float() * scale[i, j]
    return out


def test_fp8_block_dequantisation_is_exact_and_quantisation_within_e4m3():
    torch.manual_seed(0)
    w = torch.randn(300, 200) * torch.logspace(-3, 1, 200)  # tiles of very different ranges
    w[:128, :128] = 0.0  # an all-zero tile
    q, scale = quantize_fp8(w, (128, 128))
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (3, 2) and scale.dtype == torch.float32
    back = dequantize_fp8(q, scale, (128, 128))
    assert torch.equal(back, _dequantize_by_tiles(q, scale, (128, 128)))
    tile_scale = scale.repeat_interleave(128, 0)[:300].repeat_interleave(128, 1)[:, :200]
    assert ((back - w).abs() <= w.abs() * 2**-4 + tile_scale * 2**-9).all()
    assert torch.equal(back[:128, :128], torch.zeros(128, 128))


def test_fp8_import_equals_the_dequantised_weights(hf, dist):
    """Block-FP8 shards (tiles of 16 x 24: partial tiles on every edge) import as their
    dequantised values, exactly; the logits equal transformers' on those values."""
    _, root = hf
    block = [16, 24]
    fp8, dequantised = {}, {}

    def quantize(tensors):
        for name in list(tensors):
            if is_quantized_linear(name):
                q, scale = quantize_fp8(tensors[name], tuple(block))
                tensors[name], tensors[name + "_scale_inv"] = q, scale
                dequantised[name] = _dequantize_by_tiles(q, scale, block)
        fp8.update(tensors)

    quant = {"quant_method": "fp8", "fmt": "float8_e4m3fn", "activation_scheme": "dynamic",
             "weight_block_size": block, "modules_to_not_convert": ["gate", "e_score_correction_bias", "lm_head"]}
    fp8_dir = _variant(root, "fp8", quantize, lambda c: {**c, "quantization_config": quant})
    reference = {n: dequantised.get(n, t) for n, t in fp8.items() if not n.endswith("_scale_inv")}
    ref_dir = _variant(root, "dequantised", lambda t: (t.clear(), t.update(reference)))
    _, (from_fp8,) = import_in_process(fp8_dir)
    _, (from_ref,) = import_in_process(ref_dir)
    a, b = gather.full_tensors([from_fp8], grads=False), gather.full_tensors([from_ref], grads=False)
    assert all(torch.equal(a[k], b[k]) for k in b)
    ref_model = transformers.MiniMaxM2ForCausalLM.from_pretrained(ref_dir).eval()
    tokens, positions = tokens_and_positions()
    with torch.no_grad():
        assert_close(our_logits(from_fp8, tokens, positions), ref_model(tokens).logits)


def test_fp8_export_is_the_released_format_and_reimports_as_its_dequantised_values(hf, dist, tmp_path):
    _, root = hf
    derived, config = importer.derive_model(root / "released", [])
    saved = importer.import_hf(root / "released", tmp_path / "ckpt", parallel=ParallelConfig(), model=derived,
                               hf_config=config, dtype="fp32", progress="off")
    out = exporter.export_hf(saved, tmp_path / "fp8", dtype="fp8", progress="off")
    written = json.loads((out / "config.json").read_text())
    released = json.loads((REPO / "tests" / "data" / "minimax_m2_config.json").read_text())
    assert written["quantization_config"] == released["quantization_config"]
    tensors = read_dir(out)
    for name, tensor in tensors.items():
        if name.endswith("_scale_inv"):
            weight = tensors[name[: -len("_scale_inv")]]
            assert tensor.dtype == torch.float32
            assert tensor.shape == tuple(math.ceil(n / 128) for n in weight.shape)
        elif is_quantized_linear(name):
            assert tensor.dtype == torch.float8_e4m3fn and name + "_scale_inv" in tensors
        else:
            wanted = torch.float32 if name.endswith("e_score_correction_bias") else torch.bfloat16
            assert tensor.dtype == wanted, name  # router gate, lm_head, embeddings, norms
    _, (chunk,) = import_in_process(out)
    ours = {name: t for name, t in tensors.items() if not name.endswith("_scale_inv")}
    for name in ours:
        if is_quantized_linear(name):
            ours[name] = _dequantize_by_tiles(tensors[name], tensors[name + "_scale_inv"], (128, 128))
    expected_dir = _variant(root, "fp8_export_dequantised", lambda t: (t.clear(), t.update(ours)))
    _, (expected,) = import_in_process(expected_dir)
    a, b = gather.full_tensors([chunk], grads=False), gather.full_tensors([expected], grads=False)
    assert all(torch.equal(a[k], b[k]) for k in b)


# ---- our own MTP and MSA modules -----------------------------------------------------------------


def _random_chunks(model, seed: int = 0):
    """Chunks of `model` with every tensor random: norms in [0.75, 1.25], the expert bias around 0."""
    chunks = importer.build_chunks(importer.run_config(model, ParallelConfig(), "fp32"))

    def draw(key, lead, shape):
        generator = torch.Generator().manual_seed(seed + zlib.crc32(f"{key}{lead}".encode()))
        noise = torch.rand(shape, generator=generator) - 0.5
        if key.endswith(("norm.weight", "norm_weight")):
            return 1.0 + 0.5 * noise
        return 0.3 * noise

    gather.fill_local_shards(chunks, draw)
    return chunks


@pytest.mark.parametrize("mtp", ["dense", "msa"])
def test_our_mtp_and_msa_modules_export_and_reimport_losslessly(dist, tmp_path, mtp):
    model = tiny_model_config(
        name="ours", attention=AttentionConfig(type="msa", dense_layers=[0], mtp=mtp),
        msa=MSAConfig(block_size=16, topk=2, index_head_dim=16), mtp_num_layers=2,
    )
    chunks = _random_chunks(model)
    saved = checkpoint.save(tmp_path / "ckpt", 0, chunks, None, None, consumed_samples=0, wandb_run_id=None,
                            config={"model": dataclasses.asdict(model)}, keep=None)
    out = exporter.export_hf(saved, tmp_path / "hf", dtype="fp32", progress="off")
    written = json.loads((out / "config.json").read_text())
    assert written["num_mtp_modules"] == 2 and written["use_mtp"]
    assert written["sparse_attention_config"]["sparse_attention_freq"] == [0, 1]
    tensors = read_dir(out)
    full = gather.full_tensors(chunks, grads=False)
    # MTP under DeepSeek-V3's names after the decoder layers; index norms in M3's form.
    for name in ("model.layers.2.enorm.weight", "model.layers.2.hnorm.weight", "model.layers.3.eh_proj.weight",
                 "model.layers.3.shared_head.norm.weight", "model.layers.3.block_sparse_moe.experts.1.w2.weight",
                 "model.layers.1.self_attn.index_q_proj.weight", "model.layers.1.self_attn.index_k_proj.weight"):
        assert name in tensors
    assert torch.equal(tensors["model.layers.1.self_attn.index_k_norm.weight"],
                       full["decoder.layers.1.self_attention.indexer.k_norm.weight"] - 1.0)
    derived, (reimported,) = import_in_process(out)
    assert (derived.msa_layers(), derived.mtp_num_layers, derived.attention.mtp) == (model.msa_layers(), 2, mtp)
    # an MTP module's index branch under its layer's names, only where the MTP modules run MSA
    assert ("model.layers.3.self_attn.index_q_proj.weight" in tensors) == (mtp == "msa")
    assert written.get("mtp_sparse_attention", False) == (mtp == "msa")
    again = gather.full_tensors([reimported], grads=False)
    assert again.keys() == full.keys()
    assert all(torch.equal(again[k], full[k]) for k in full)


def test_transformers_loads_an_export_with_mtp_modules(dist, tmp_path):
    """transformers has no MTP modules: it loads the main model of an export that holds ours
    (vLLM's MiniMax-M2 loader skips the same layers), and its logits are our main model's."""
    model = tiny_model_config(name="ours", mtp_num_layers=1)
    (chunk,) = _random_chunks(model, seed=4)
    saved = checkpoint.save(tmp_path / "ckpt", 0, [chunk], None, None, consumed_samples=0, wandb_run_id=None,
                            config={"model": dataclasses.asdict(model)}, keep=None)
    out = exporter.export_hf(saved, tmp_path / "hf", dtype="fp32", progress="off")
    reloaded = transformers.MiniMaxM2ForCausalLM.from_pretrained(out).eval()
    tokens, positions = tokens_and_positions()
    with torch.no_grad():
        assert_close(our_logits(chunk, tokens, positions), reloaded(tokens).logits)


def test_export_reads_the_fp32_main_weights(hf, dist, tmp_path):
    """A bf16 checkpoint whose optimizer holds fp32 main weights exports those, not the bf16
    copies (megatron's mixed-precision optimizer keys: optimizer.state.fp32_param.<key>)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.optimizer import make_sharded_optimizer_tensor

    _, root = hf
    model, (bf16_chunk,) = import_in_process(root / "released", dtype="bf16")
    _, (fp32_chunk,) = import_in_process(root / "released", dtype="fp32")
    name_of = {id(p): n for n, p in bf16_chunk.named_parameters()}
    main = dict(fp32_chunk.named_parameters())

    class MainWeights:
        """Stands in for megatron's Float16Optimizer: its sharded_state_dict holds the fp32 copies."""

        def sharded_state_dict(self, model_sd, is_loading, metadata):
            entries = [e for e in nested_values(model_sd) if id(e.data) in name_of]
            return {"fp32": [make_sharded_optimizer_tensor(e, main[name_of[id(e.data)]].detach(), "optimizer.state.fp32_param")
                             for e in entries]}

    saved = checkpoint.save(tmp_path / "ckpt", 1, [bf16_chunk], MainWeights(), None, consumed_samples=0,
                            wandb_run_id=None, config={"model": dataclasses.asdict(model)}, keep=None)
    out = exporter.export_hf(saved, tmp_path / "hf", dtype="fp32", progress="off")
    exported, original = read_dir(out), load_file(root / "released" / "model.safetensors")
    assert all(torch.equal(exported[k], original[k]) for k in original)


# ---- files and display -----------------------------------------------------------------------------


def test_shard_writer_streams_bounded_shards_that_safetensors_reads(tmp_path):
    torch.manual_seed(0)
    tensors = {f"t{i}": torch.randn(10, i + 1).to(dtype) for i, dtype in
               enumerate([torch.float32, torch.bfloat16, torch.float32, torch.float8_e4m3fn, torch.bfloat16])}
    plan = [Planned(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    writer = ShardWriter(tmp_path, plan, max_shard_bytes=100)
    for name, tensor in tensors.items():
        writer.write(name, tensor)
    writer.close()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 4
    from_lib = {}
    for shard in sorted(set(index["weight_map"].values())):
        from_lib.update(load_file(tmp_path / shard))
    ours = SafetensorsDir(tmp_path)
    for name, tensor in tensors.items():
        assert torch.equal(from_lib[name].view(torch.uint8), tensor.view(torch.uint8))
        assert torch.equal(ours.read(name, 3).view(torch.uint8), tensor[3].view(torch.uint8))


def test_progress_lines_show_counts_rate_and_eta(caplog):
    with caplog.at_level(logging.INFO, logger="convert"):
        progress = Progress("import", 4, 4 * 2**20, mode="lines", interval_s=0.0)
        progress.advance(1, 2**20)
        summary = progress.close()
    line = caplog.records[-1].getMessage()
    assert "1/4 tensors" in line and "MiB/s" in line and "ETA" in line
    assert "ru_maxrss" in summary
