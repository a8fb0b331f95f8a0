"""config.json of a MiniMax-M2 or MiniMax-M3 checkpoint <-> our `ModelConfig`.

MiniMax-M3 (`_m3_from_hf`, `_m3_hf_config`): the text model of the released vision-language
checkpoint (`model_type: minimax_m3_vl`, the LLM's fields under `text_config`) or of a text-only
`MiniMaxM3VLForCausalLM` saved by transformers (`model_type: minimax_m3_vl_text`, the fields at
the top). Both spellings of each field are read: the release's (`moe_layer_freq`,
`sparse_attention_config.sparse_*`, `rope_theta` / `partial_rotary_factor` at the top,
`num_nextn_predict_layers`) and transformers' (`mlp_layer_types`, `layer_types`, `index_*`,
`rope_parameters`). The rotary fraction is `rope_parameters.partial_rotary_factor` as
transformers reads it (it ignores `rotary_dim` for M3); a config with only `rotary_dim` gets
`rotary_dim / head_dim` and a warning. An export writes the text-only form. Which form an
export writes follows the model: Gemma norms (model.norm_style=gemma) are M3's, else M2's
(`hf_family`, which names the keys that neither form can express).

The M2 part:

Derived from config.json (the fields that fix the architecture): layers, hidden size, heads, KV
heads, head dim, rotary fraction (`rotary_dim` / head dim, or `partial_rotary_factor`), RoPE
theta, RMSNorm eps, experts, top-k, expert width, vocab, max positions, MTP modules
(`num_mtp_modules` when `use_mtp`), and MSA layers from M3's `sparse_attention_config`. The
training-only fields (init std, balancing rate, losses, backend) keep our defaults:
`initializer_range` and `router_aux_loss_coef` are transformers' training settings, not M2's.
Fields that name an architecture we do not build (tied embeddings, another activation, softmax
routing, per-head QK-norm, shared experts, linear attention, RoPE scaling) are errors.

The config.json we write is the released one's field set (`rope_theta` and `rotary_dim` rather
than transformers 5's `rope_parameters`; transformers reads both), plus M3's
`sparse_attention_config` when the model has MSA layers, `quantization_config` for FP8, and
our `mtp_sparse_attention` when the MTP modules run MSA (model.attention.mtp=msa: their index
branches are written under the MTP layers' names; transformers skips MTP modules).
Field names follow transformers' `MiniMaxM2Config`, the released config.json as vLLM's
`models/minimax_m2.py` reads it (`rotary_dim`, `scoring_func`, `use_routing_bias`,
`num_mtp_modules`) and, for sparse attention, vLLM's `models/minimax_m3.py` (read in the
baidu/vLLM-Kunlun copy: `sparse_num_index_heads`, `sparse_index_dim`, `sparse_attention_freq`,
`sparse_disable_index_value`) with transformers' `MiniMaxM3VLTextConfig` (`sparse_block_size`,
`sparse_topk_blocks`, `sparse_local_block`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from model.config import SWIGLU_OAI_ALPHA, SWIGLU_OAI_LIMIT, WEIGHT_KEYS, AttentionConfig, ModelConfig, MSAConfig
from model.hf import ConvertError

log = logging.getLogger("convert")

ARCHITECTURE = "MiniMaxM2ForCausalLM"
MODEL_TYPE = "minimax_m2"
M3, M2 = "m3", "m2"
M3_ARCHITECTURE = "MiniMaxM3VLForCausalLM"
M3_MODEL_TYPE = "minimax_m3_vl"
"""The released vision-language checkpoint; its LLM's config is `text_config`."""
M3_TEXT_MODEL_TYPE = "minimax_m3_vl_text"
"""transformers' text-only MiniMax-M3 (MiniMaxM3VLForCausalLM)."""
MTP_SPARSE = "mtp_sparse_attention"
"""Ours, in either form: true when the MTP modules' layers run MSA (model.attention.mtp=msa) and
their index branches are among the tensors. Neither release has it (their MTP attention is dense)."""
FP8_BLOCK = (128, 128)
FP8_NOT_CONVERTED = ["gate", "e_score_correction_bias", "lm_head"]
"""Modules the released FP8 checkpoint keeps in higher precision (its modules_to_not_convert)."""


def read_config(directory: Path) -> dict:
    path = Path(directory) / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as e:
        raise ConvertError(f"{path}: missing; a Hugging Face checkpoint directory has a config.json") from e
    except (OSError, ValueError) as e:
        raise ConvertError(f"{path}: unreadable ({e})") from e


def _require(config: dict, key: str):
    if key not in config:
        raise ConvertError(f"config.json has no {key!r}, which a MiniMax-M2 or -M3 config must give")
    return config[key]


def _unsupported(field: str, value, wanted, model: str = "MiniMax-M2") -> ConvertError:
    return ConvertError(f"config.json {field}={value!r}: only {wanted!r} is supported (the {model} architecture)")


def _check_fields(config: dict, checks: list[tuple[str, object]], model: str) -> None:
    """ConvertError for the first field present with another value than the one we build."""
    for field, wanted in checks:
        if field in config and config[field] != wanted:
            raise _unsupported(field, config[field], wanted, model)


def _rope(config: dict) -> tuple[float, float | None]:
    """(theta, partial_rotary_factor or None) from rope_parameters or the top-level fields."""
    rope = config.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        raise _unsupported("rope_parameters.rope_type", rope["rope_type"], "default")
    theta = rope.get("rope_theta", config.get("rope_theta"))
    if theta is None:
        raise ConvertError("config.json gives neither rope_theta nor rope_parameters.rope_theta")
    return theta, rope.get("partial_rotary_factor", config.get("partial_rotary_factor"))


def family(config: dict) -> str:
    """m3 or m2: which model a config.json describes (ConvertError for another model_type)."""
    model_type = config.get("model_type", MODEL_TYPE)
    if model_type in (M3_MODEL_TYPE, M3_TEXT_MODEL_TYPE):
        return M3
    if model_type != MODEL_TYPE:
        raise ConvertError(
            f"config.json model_type={model_type!r}: only {MODEL_TYPE!r}, {M3_MODEL_TYPE!r} and "
            f"{M3_TEXT_MODEL_TYPE!r} (MiniMax-M2, MiniMax-M3) are supported"
        )
    return M2


def model_config_from_hf(config: dict, *, name: str) -> ModelConfig:
    """The ModelConfig that config.json describes (ConvertError naming the field when it
    describes something else)."""
    if family(config) == M3:
        fields = _m3_from_hf(config.get("text_config", config) if config["model_type"] == M3_MODEL_TYPE else config)
        fields["name"] = name
        _mtp_attention(fields, config.get("text_config", config))
        try:
            return ModelConfig(**fields)
        except ValueError as e:
            raise ConvertError(f"config.json describes an invalid model: {e}") from e
    checks = [
        ("hidden_act", "silu"), ("tie_word_embeddings", False), ("scoring_func", "sigmoid"),
        ("use_routing_bias", True), ("use_qk_norm", True), ("qk_norm_type", "per_layer"),
        ("attention_bias", False), ("shared_intermediate_size", 0), ("sliding_window", None),
        ("routed_scaling_factor", 1.0),
    ]
    _check_fields(config, checks, "MiniMax-M2")
    if any(kind != 1 for kind in config.get("attn_type_list") or []):
        raise ConvertError("config.json attn_type_list has linear-attention layers (0); MiniMax-M2 has full attention (1) only")
    heads = _require(config, "num_attention_heads")
    head_dim = config.get("head_dim") or _require(config, "hidden_size") // heads
    theta, fraction = _rope(config)
    if config.get("rotary_dim") is not None:
        fraction = config["rotary_dim"] / head_dim
    mtp = 0
    if config.get("use_mtp", bool(config.get("num_mtp_modules"))):
        mtp = config.get("num_mtp_modules", 0)
        if config.get("mtp_transformer_layers", 1) != 1:
            raise _unsupported("mtp_transformer_layers", config["mtp_transformer_layers"], 1)
    fields = {
        "name": name,
        "num_layers": _require(config, "num_hidden_layers"),
        "hidden_size": _require(config, "hidden_size"),
        "num_attention_heads": heads,
        "num_query_groups": _require(config, "num_key_value_heads"),
        "kv_channels": head_dim,
        "rotary_percent": 1.0 if fraction is None else float(fraction),
        "rotary_base": float(theta),
        "norm_epsilon": float(_require(config, "rms_norm_eps")),
        "num_experts": _require(config, "num_local_experts"),
        "moe_router_topk": _require(config, "num_experts_per_tok"),
        "moe_ffn_hidden_size": _require(config, "intermediate_size"),
        "mtp_num_layers": mtp,
        "vocab_size": _require(config, "vocab_size"),
        "eod_token_id": _eos(config),
    }
    if "max_position_embeddings" in config:
        fields["max_position_embeddings"] = config["max_position_embeddings"]
    sparse = config.get("sparse_attention_config")
    if sparse:
        fields.update(_msa_from_hf(sparse, config))
    _mtp_attention(fields, config)
    try:
        return ModelConfig(**fields)
    except ValueError as e:
        raise ConvertError(f"config.json describes an invalid model: {e}") from e


def _mtp_attention(fields: dict, config: dict) -> None:
    """model.attention.mtp=msa where config.json says so (MTP_SPARSE); dense otherwise."""
    if config.get(MTP_SPARSE):
        fields["attention"] = dataclasses.replace(fields.get("attention", AttentionConfig()), mtp="msa")


def _eos(config: dict) -> int | None:
    """config.json's eos_token_id (the first of a list): the end-of-document token."""
    eos = config.get("eos_token_id")
    return eos[0] if isinstance(eos, list) and eos else eos


def _msa_from_hf(sparse: dict, config: dict) -> dict:
    layers = config["num_hidden_layers"]
    freq = sparse.get("sparse_attention_freq")
    if freq is None or len(freq) != layers:
        raise ConvertError(f"config.json sparse_attention_config.sparse_attention_freq must list all {layers} layers (0 dense, 1 sparse)")
    heads = sparse.get("sparse_num_index_heads", config["num_key_value_heads"])
    if heads != config["num_key_value_heads"]:
        raise ConvertError(
            f"config.json sparse_attention_config.sparse_num_index_heads={heads}: our MSA has one index "
            f"head per KV group ({config['num_key_value_heads']})"
        )
    if not all(sparse.get("sparse_disable_index_value") or [1]):
        raise ConvertError("config.json sparse_attention_config.sparse_disable_index_value has 0s: index value/output projections are not supported")
    defaults = MSAConfig()
    msa = MSAConfig(
        block_size=sparse.get("sparse_block_size", defaults.block_size),
        topk=sparse.get("sparse_topk_blocks", defaults.topk),
        local_blocks=sparse.get("sparse_local_block", defaults.local_blocks),
        index_head_dim=sparse.get("sparse_index_dim", defaults.index_head_dim),
    )
    dense = [i for i, f in enumerate(freq) if not f]
    return {"attention": AttentionConfig(type="msa", dense_layers=dense), "msa": msa}


def _m3_from_hf(text: dict) -> dict:
    """ModelConfig fields of an M3 text config (either spelling of each field)."""
    checks = [
        ("tie_word_embeddings", False), ("scoring_func", "sigmoid"), ("use_routing_bias", True),
        ("use_qk_norm", True), ("qk_norm_type", "per_head"), ("use_gemma_norm", True),
        ("attention_output_gate", False), ("norm_topk_prob", True), ("n_shared_experts", 1),
        ("swiglu_alpha", SWIGLU_OAI_ALPHA), ("swiglu_limit", SWIGLU_OAI_LIMIT), ("attention_bias", False),
    ]
    _check_fields(text, checks, "MiniMax-M3")
    # transformers saves "silu" for M3 (it computes SwiGLU-OAI inline); the release says swigluoai
    if text.get("hidden_act", "swigluoai") not in ("swigluoai", "silu"):
        raise _unsupported("hidden_act", text["hidden_act"], "swigluoai", "MiniMax-M3")
    layers = _require(text, "num_hidden_layers")
    heads = _require(text, "num_attention_heads")
    kv_heads = _require(text, "num_key_value_heads")
    head_dim = text.get("head_dim") or _require(text, "hidden_size") // heads
    theta, fraction = _rope(text)
    if fraction is None and text.get("rotary_dim") is not None:
        fraction = text["rotary_dim"] / head_dim
        log.warning("config.json has rotary_dim=%s but no partial_rotary_factor: rotating %s of %s dims (transformers "
                    "ignores rotary_dim for MiniMax-M3 and would rotate all of them)", text["rotary_dim"],
                    text["rotary_dim"], head_dim)
    dense_mlp = _per_layer(text, layers, "mlp_layer_types", {"dense": 0, "sparse": 1}, "moe_layer_freq")
    sparse = text.get("sparse_attention_config") or {}
    msa_freq = _per_layer(text, layers, "layer_types", {"full_attention": 0, "minimax_m3_sparse": 1},
                          "sparse_attention_config.sparse_attention_freq", sparse.get("sparse_attention_freq"), default=0)
    def index(flat: str, legacy: str, default):
        return sparse.get(legacy, text.get(flat, default))

    defaults = MSAConfig()
    index_heads = index("index_n_heads", "sparse_num_index_heads", kv_heads)
    if any(msa_freq) and index_heads != kv_heads:
        raise ConvertError(f"config.json index_n_heads={index_heads}: our MSA has one index head per KV group ({kv_heads})")
    if sparse.get("sparse_score_type", "max") != "max" or sparse.get("sparse_init_block", 0) != 0:
        raise ConvertError("config.json sparse_attention_config: only sparse_score_type=max and sparse_init_block=0 are supported")
    no_value = sparse.get("sparse_disable_index_value") or [1] * layers
    if any(f and not v for f, v in zip(msa_freq, no_value)):
        raise ConvertError("config.json sparse_attention_config.sparse_disable_index_value has 0s on sparse layers: "
                           "index value/output projections are not supported")
    shared = text.get("shared_intermediate_size", 0)
    fields = {
        "num_layers": layers,
        "hidden_size": _require(text, "hidden_size"),
        "num_attention_heads": heads,
        "num_query_groups": kv_heads,
        "kv_channels": head_dim,
        "rotary_percent": 1.0 if fraction is None else float(fraction),
        "rotary_base": float(theta),
        "norm_epsilon": float(_require(text, "rms_norm_eps")),
        "norm_style": "gemma",
        "qk_norm": "per_head",
        "activation": "swiglu_oai",
        "num_experts": _require(text, "num_local_experts"),
        "moe_router_topk": _require(text, "num_experts_per_tok"),
        "moe_ffn_hidden_size": _require(text, "intermediate_size"),
        "moe_shared_expert_ffn_hidden_size": shared,
        "moe_routed_scaling_factor": float(text.get("routed_scaling_factor", 1.0)),
        "dense_mlp_layers": [i for i, moe in enumerate(dense_mlp) if not moe],
        "dense_ffn_hidden_size": text.get("dense_intermediate_size", 0) if not all(dense_mlp) else 0,
        "mtp_num_layers": text.get("num_nextn_predict_layers", 0),
        "vocab_size": _require(text, "vocab_size"),
        "eod_token_id": _eos(text),
    }
    if "max_position_embeddings" in text:
        fields["max_position_embeddings"] = text["max_position_embeddings"]
    if any(msa_freq):
        fields["attention"] = AttentionConfig(type="msa", dense_layers=[i for i, f in enumerate(msa_freq) if not f])
        fields["msa"] = MSAConfig(
            block_size=index("index_block_size", "sparse_block_size", defaults.block_size),
            topk=index("index_topk_blocks", "sparse_topk_blocks", defaults.topk),
            local_blocks=index("index_local_blocks", "sparse_local_block", defaults.local_blocks),
            index_head_dim=index("index_head_dim", "sparse_index_dim", defaults.index_head_dim),
        )
    return fields


def _per_layer(text: dict, layers: int, key: str, names: dict, legacy_key: str, legacy=None, default: int = 1) -> list[int]:
    """A per-layer 0/1 list from transformers' names (`key`) or the release's 0/1 list."""
    if text.get(key) is not None:
        unknown = sorted(set(text[key]) - set(names))
        if unknown or len(text[key]) != layers:
            raise ConvertError(f"config.json {key} must list all {layers} layers as one of {sorted(names)} (has {unknown or len(text[key])})")
        return [names[v] for v in text[key]]
    values = legacy if legacy is not None else text.get(legacy_key)
    if values is None:
        return [default] * layers
    if len(values) != layers:
        raise ConvertError(f"config.json {legacy_key} must list all {layers} layers (0 or 1 each)")
    return [int(bool(v)) for v in values]


def hf_family(model: ModelConfig) -> str:
    """m3 or m2: the HF form that can hold `model` (Gemma norms are M3's); ConvertError naming the
    keys that form cannot express."""
    if model.norm_style == "gemma":
        wanted = {"qk_norm": "per_head", "activation": "swiglu_oai"}
        bad = [f"model.{k}={getattr(model, k)!r} (M3 has {v!r})" for k, v in wanted.items() if getattr(model, k) != v]
        if not model.moe_shared_expert_ffn_hidden_size:
            bad.append("model.moe_shared_expert_ffn_hidden_size=0 (M3 has a shared expert)")
        form = M3
    else:
        wanted = {"qk_norm": "per_layer", "activation": "swiglu", "moe_shared_expert_ffn_hidden_size": 0,
                  "moe_routed_scaling_factor": 1.0, "dense_mlp_layers": []}
        bad = [f"model.{k}={getattr(model, k)!r} (M2 has {v!r})" for k, v in wanted.items() if getattr(model, k) != v]
        form = M2
    if bad:
        raise ConvertError(
            f"no Hugging Face form holds this model: with model.norm_style={model.norm_style!r} it would be "
            f"MiniMax-{form.upper()}'s, which cannot express " + ", ".join(bad)
        )
    return form


def hf_config(model: ModelConfig, *, dtype: str, fp8: bool) -> dict:
    """config.json for `model`: MiniMax-M2's released field set, or for an M3 model the text-only
    MiniMaxM3VLForCausalLM's (hf_family). `dtype`: bfloat16 or float32 (of the non-FP8 tensors)."""
    config = _m3_hf_config(model, dtype) if hf_family(model) == M3 else _m2_hf_config(model, dtype)
    if model.mtp_msa():
        config[MTP_SPARSE] = True
    if fp8:
        config["quantization_config"] = {
            "quant_method": "fp8",
            "fmt": "float8_e4m3fn",
            "activation_scheme": "dynamic",
            "weight_block_size": list(FP8_BLOCK),
            "modules_to_not_convert": list(FP8_NOT_CONVERTED),
        }
    return config


def _common_hf_config(model: ModelConfig, dtype: str) -> dict:
    """The config.json fields M2 and M3 name alike."""
    config = {
        "vocab_size": model.vocab_size,
        "hidden_size": model.hidden_size,
        "intermediate_size": model.moe_ffn_hidden_size,
        "num_hidden_layers": model.num_layers,
        "num_attention_heads": model.num_attention_heads,
        "num_key_value_heads": model.num_query_groups,
        "head_dim": model.kv_channels,
        "max_position_embeddings": model.max_position_embeddings,
        "rms_norm_eps": model.norm_epsilon,
        "rotary_dim": round(model.kv_channels * model.rotary_percent),
        "num_local_experts": model.num_experts,
        "num_experts_per_tok": model.moe_router_topk,
        "tie_word_embeddings": False,
        "torch_dtype": dtype,
    }
    if model.eod_token_id is not None:
        config["eos_token_id"] = model.eod_token_id
    return config


def _m3_hf_config(model: ModelConfig, dtype: str) -> dict:
    """transformers' MiniMaxM3VLTextConfig fields (its own names), plus the release's names that
    other readers use (rotary_dim, num_nextn_predict_layers)."""
    layers = model.num_layers
    msa_layers = set(model.msa_layers())
    m = model.msa
    return {
        "architectures": [M3_ARCHITECTURE],
        "model_type": M3_TEXT_MODEL_TYPE,
        **_common_hf_config(model, dtype),
        "hidden_act": "swigluoai",
        "rope_parameters": {"rope_type": "default", "rope_theta": model.rotary_base,
                            "partial_rotary_factor": model.rotary_percent},
        "shared_intermediate_size": model.moe_shared_expert_ffn_hidden_size,
        "dense_intermediate_size": model.dense_ffn_hidden_size,
        "routed_scaling_factor": model.moe_routed_scaling_factor,
        "swiglu_alpha": SWIGLU_OAI_ALPHA,
        "swiglu_limit": SWIGLU_OAI_LIMIT,
        "mlp_layer_types": ["dense" if i in model.dense_mlp_layers else "sparse" for i in range(layers)],
        "layer_types": ["minimax_m3_sparse" if i in msa_layers else "full_attention" for i in range(layers)],
        "index_n_heads": model.num_query_groups,
        "index_head_dim": m.index_head_dim,
        "index_block_size": m.block_size,
        "index_topk_blocks": m.topk,
        "index_local_blocks": m.local_blocks,
        "num_nextn_predict_layers": model.mtp_num_layers,
    }


def _m2_hf_config(model: ModelConfig, dtype: str) -> dict:
    """The released MiniMax-M2 field set (+ M3's sparse_attention_config for MSA layers)."""
    layers = model.num_layers
    config = {
        "architectures": [ARCHITECTURE],
        "model_type": MODEL_TYPE,
        **_common_hf_config(model, dtype),
        "hidden_act": "silu",
        "rope_theta": model.rotary_base,
        "scoring_func": "sigmoid",
        "use_routing_bias": True,
        "use_qk_norm": True,
        "qk_norm_type": "per_layer",
        "shared_intermediate_size": 0,
        "attn_type_list": [1] * layers,
        "use_mtp": model.mtp_num_layers > 0,
        "num_mtp_modules": model.mtp_num_layers,
        "mtp_transformer_layers": 1,
    }
    msa_layers = set(model.msa_layers())
    if msa_layers:
        m = model.msa
        config["sparse_attention_config"] = {
            "sparse_attention_freq": [int(i in msa_layers) for i in range(layers)],
            "sparse_num_index_heads": model.num_query_groups,
            "sparse_index_dim": m.index_head_dim,
            "sparse_block_size": m.block_size,
            "sparse_topk_blocks": m.topk,
            "sparse_local_block": m.local_blocks,
            "sparse_disable_index_value": [1] * layers,
        }
    return config


def fp8_block(config: dict) -> tuple[int, int]:
    """The FP8 tile of a config.json with quantization_config (128 x 128 by default)."""
    quant = config.get("quantization_config") or {}
    if quant and quant.get("quant_method") != "fp8":
        raise _unsupported("quantization_config.quant_method", quant.get("quant_method"), "fp8")
    block = quant.get("weight_block_size") or list(FP8_BLOCK)
    return int(block[0]), int(block[1])


def check_overrides(derived: ModelConfig, final: ModelConfig) -> None:
    """An override may change training settings but not what config.json fixes."""
    changed = [f for f in WEIGHT_KEYS if getattr(derived, f) != getattr(final, f)]
    if changed:
        raise ConvertError(
            "model." + ", model.".join(changed) + " come from the checkpoint's config.json "
            f"({', '.join(f'{f}={getattr(derived, f)}' for f in changed)}); drop the override"
        )


def model_config_from_dict(fields: dict) -> ModelConfig:
    """A ModelConfig from its `dataclasses.asdict` form (the `model` entry of a checkpoint's config)."""
    fields = dict(fields)
    try:
        fields["attention"] = AttentionConfig(**fields.get("attention", {}))
        fields["msa"] = MSAConfig(**fields.get("msa", {}))
        known = {f.name for f in dataclasses.fields(ModelConfig)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ConvertError(f"the checkpoint's model config has fields this version does not know: {unknown}")
        return ModelConfig(**fields)
    except TypeError as e:
        raise ConvertError(f"the checkpoint's model config does not fit ModelConfig ({e})") from e
