"""config.json of a MiniMax-M2 checkpoint <-> our `ModelConfig`.

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
`sparse_attention_config` when the model has MSA layers and `quantization_config` for FP8.
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
from pathlib import Path

from model.config import WEIGHT_KEYS, AttentionConfig, ModelConfig, MSAConfig
from model.hf import ConvertError

ARCHITECTURE = "MiniMaxM2ForCausalLM"
MODEL_TYPE = "minimax_m2"
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
        raise ConvertError(f"config.json has no {key!r}, which a MiniMax-M2 config must give")
    return config[key]


def _unsupported(field: str, value, wanted) -> ConvertError:
    return ConvertError(f"config.json {field}={value!r}: only {wanted!r} is supported (the MiniMax-M2 architecture)")


def model_config_from_hf(config: dict, *, name: str) -> ModelConfig:
    """The ModelConfig that config.json describes (ConvertError naming the field when it
    describes something else)."""
    if config.get("model_type", MODEL_TYPE) != MODEL_TYPE:
        raise _unsupported("model_type", config["model_type"], MODEL_TYPE)
    checks = [
        ("hidden_act", "silu"), ("tie_word_embeddings", False), ("scoring_func", "sigmoid"),
        ("use_routing_bias", True), ("use_qk_norm", True), ("qk_norm_type", "per_layer"),
        ("attention_bias", False), ("shared_intermediate_size", 0), ("sliding_window", None),
        ("routed_scaling_factor", 1.0),
    ]
    for field, wanted in checks:
        if field in config and config[field] != wanted:
            raise _unsupported(field, config[field], wanted)
    if any(kind != 1 for kind in config.get("attn_type_list") or []):
        raise ConvertError("config.json attn_type_list has linear-attention layers (0); MiniMax-M2 has full attention (1) only")
    heads = _require(config, "num_attention_heads")
    head_dim = config.get("head_dim") or _require(config, "hidden_size") // heads
    rope = config.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        raise _unsupported("rope_parameters.rope_type", rope["rope_type"], "default")
    theta = rope.get("rope_theta", config.get("rope_theta"))
    if theta is None:
        raise ConvertError("config.json gives neither rope_theta nor rope_parameters.rope_theta")
    fraction = rope.get("partial_rotary_factor", config.get("partial_rotary_factor"))
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
    try:
        return ModelConfig(**fields)
    except ValueError as e:
        raise ConvertError(f"config.json describes an invalid model: {e}") from e


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


def hf_config(model: ModelConfig, *, dtype: str, fp8: bool) -> dict:
    """config.json for `model` in the released MiniMax-M2 field set. `dtype`: bfloat16 or float32
    (of the non-FP8 tensors)."""
    layers = model.num_layers
    config = {
        "architectures": [ARCHITECTURE],
        "model_type": MODEL_TYPE,
        "vocab_size": model.vocab_size,
        "hidden_size": model.hidden_size,
        "intermediate_size": model.moe_ffn_hidden_size,
        "num_hidden_layers": layers,
        "num_attention_heads": model.num_attention_heads,
        "num_key_value_heads": model.num_query_groups,
        "head_dim": model.kv_channels,
        "hidden_act": "silu",
        "max_position_embeddings": model.max_position_embeddings,
        "rms_norm_eps": model.norm_epsilon,
        "rope_theta": model.rotary_base,
        "rotary_dim": round(model.kv_channels * model.rotary_percent),
        "num_local_experts": model.num_experts,
        "num_experts_per_tok": model.moe_router_topk,
        "scoring_func": "sigmoid",
        "use_routing_bias": True,
        "use_qk_norm": True,
        "qk_norm_type": "per_layer",
        "shared_intermediate_size": 0,
        "attn_type_list": [1] * layers,
        "use_mtp": model.mtp_num_layers > 0,
        "num_mtp_modules": model.mtp_num_layers,
        "mtp_transformer_layers": 1,
        "tie_word_embeddings": False,
        "torch_dtype": dtype,
    }
    if model.eod_token_id is not None:
        config["eos_token_id"] = model.eod_token_id
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
    if fp8:
        config["quantization_config"] = {
            "quant_method": "fp8",
            "fmt": "float8_e4m3fn",
            "activation_scheme": "dynamic",
            "weight_block_size": list(FP8_BLOCK),
            "modules_to_not_convert": list(FP8_NOT_CONVERTED),
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
