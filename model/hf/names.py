"""HF tensor names <-> our checkpoint keys, with the transform of each.

Our names are megatron-core's checkpoint keys (`sharded_state_dict`): independent of the
parallel layout (global layer numbers, experts as a prepended axis of the key, the input norm as
`self_attention.linear_qkv.layer_norm_weight` on both backends), so one table serves every
layout. `rules(model, layout)` lists, for every key of the model, the HF tensors it is made of:

| our key (per layer L, expert E) | HF tensor, released layout | transform |
| --- | --- | --- |
| embedding.word_embeddings.weight | model.embed_tokens.weight | |
| decoder.layers.L.self_attention.linear_qkv.layer_norm_weight | model.layers.L.input_layernorm.weight | |
| ...self_attention.linear_qkv.weight | ...self_attn.{q,k,v}_proj.weight | per KV group g: [q heads of g; k_g; v_g] |
| ...self_attention.q_layernorm.weight / k_layernorm | ...self_attn.q_norm.weight / k_norm (full width) | |
| ...self_attention.linear_proj.weight | ...self_attn.o_proj.weight | |
| ...pre_mlp_layernorm.weight | ...post_attention_layernorm.weight | |
| ...mlp.router.weight | ...block_sparse_moe.gate.weight | |
| ...mlp.router.expert_bias (fp32) | ...block_sparse_moe.e_score_correction_bias | |
| ...mlp.experts.experts.linear_fc1.weight [E] | ...block_sparse_moe.experts.E.w1.weight, w3 | [w1; w3] (gate, up) |
| ...mlp.experts.experts.linear_fc2.weight [E] | ...block_sparse_moe.experts.E.w2.weight | |
| ...self_attention.indexer.linear_q / linear_k (MSA) | ...self_attn.index_q_proj / index_k_proj | |
| ...self_attention.indexer.q_norm / k_norm (MSA) | ...self_attn.index_q_norm / index_k_norm | M3 form: w_hf = w_ours - 1 |
| decoder.final_layernorm.weight | model.norm.weight | |
| output_layer.weight | lm_head.weight | |
| mtp.layers.D.{enorm,hnorm,eh_proj}.weight | model.layers.{N+D}.{enorm,hnorm,eh_proj}.weight | |
| mtp.layers.D.final_layernorm.weight | model.layers.{N+D}.shared_head.norm.weight | |
| mtp.layers.D.transformer_layer.* | model.layers.{N+D}.* as a decoder layer | |

The fused transformers layout (`save_pretrained(save_original_format=False)`) differs in the MoE
block only: `mlp.experts.gate_up_proj` [E, 2I, H] (gate rows first) and `mlp.experts.down_proj`
[E, H, I], `mlp.gate.weight`, `mlp.e_score_correction_bias`.

MiniMax-M3 (`M3_RELEASED`, `M3_TEXT`) differs from M2's table in these rows (the released form,
then transformers' names of a text-only MiniMaxM3VLForCausalLM):

| our key | M3 released (under `language_model.`) | M3 text-only (transformers) |
| --- | --- | --- |
| embedding / final norm / output | language_model.model.embed_tokens, .model.norm, language_model.lm_head | model.embed_tokens, model.norm, lm_head |
| ...self_attention.q_layernorm / k_layernorm [head dim] | ...self_attn.q_norm / k_norm | same |
| ...self_attention.indexer.linear_q / linear_k / q_norm / k_norm | ...self_attn.index_q_proj / index_k_proj / index_q_norm / index_k_norm | ...self_attn.indexer.q_proj / k_proj / q_norm / k_norm |
| ...mlp.router.weight / expert_bias | ...block_sparse_moe.gate.weight / e_score_correction_bias | ...mlp.gate.weight / mlp.gate.e_score_correction_bias |
| ...mlp.experts.experts.linear_fc1 / fc2 [E] | ...block_sparse_moe.experts.E.w1, w3 / w2 | ...mlp.experts.gate_up_proj / down_proj [E, ...] |
| ...mlp.shared_experts.linear_fc1 / fc2 | ...block_sparse_moe.shared_experts.gate_proj, up_proj / down_proj | ...mlp.shared_experts.gate_up_proj / down_proj |
| dense layer: ...mlp.linear_fc1.layer_norm_weight | ...post_attention_layernorm | same |
| dense layer: ...mlp.linear_fc1 / fc2 | ...mlp.gate_proj, up_proj / down_proj | ...mlp.gate_up_proj / down_proj |
| mtp.layers.D.* (ours: neither form has public MTP names) | language_model.mtp.layers.D.* | mtp.layers.D.* |

Every M3 norm is Gemma-form in both (our GemmaRMSNorm stores the same w: copied). The release
also holds the vision model (`vision_tower.*`, `multi_modal_projector.*`, `patch_merge_mlp.*`),
which the import skips (`SKIPPED`). Sources: transformers 5.25's `minimax_m3_vl` modeling and its
`conversion_mapping.py` entry (the renames from the release to its names) and Megatron-Bridge's
`models/minimax_m3/minimax_m3_bridge.py` (the same release names; it maps no indexer or MTP).
transformers ignores `mtp.*` tensors on load (`_keys_to_ignore_on_load_unexpected`).

Sources checked: megatron-core's `SelfAttention.get_query_key_value_tensors` (the qkv rows of
group g are its q heads, then k_g, then v_g) and its SwiGLU (`silu(first half) * second half`,
the checkpoint key holding all gate rows before all up rows whatever the TP split);
transformers' `MiniMaxM2` model and `conversion_mapping.py` (mixtral entries: w1/w3 -> gate_up
in that order); vLLM's `models/minimax_m2.py` loader (w1 = gate, w3 = up, w2 = down; q/k/v into
qkv_proj; layers from `num_hidden_layers` to `+ num_mtp_modules` are MTP and skipped) and
Megatron-Bridge's `minimax_m2_bridge.py` (same table for the main model; the full-width QK-norm
weight sliced per TP rank as our LayerQKNorm's is). MSA index names are MiniMax-M3's release as
vLLM's `models/minimax_m3.py` reads them (read in the baidu/vLLM-Kunlun copy; transformers'
`conversion_mapping.py` minimax_m3_vl entries agree): `self_attn.index_q_proj`, `index_k_proj`,
`index_q_norm`, `index_k_norm`, no index value/output projections. M3's norms are Gemma-style
`x_normed * (1 + w)`, ours `w * x_normed`, hence the -1/+1: exact in any float format for
weights in [0.5, 2] (Sterbenz). MTP names follow DeepSeek-V3's
HF convention as vLLM's `models/deepseek_mtp.py` reads it (`model.layers.{N+D}.` holding
enorm, hnorm, eh_proj, shared_head.norm and the layer's own tensors; eh_proj acts on
[enorm(embedding); hnorm(hidden)], megatron's order too). DeepSeek's per-module copies of the
embedding and output head (`embed_tokens`, `shared_head.head`) are not written: our MTP modules
share the main model's.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from model.config import ModelConfig
from model.hf import ConvertError
from model.hf.safetensors import (
    FP8_DTYPES,
    SCALE_SUFFIX,
    SafetensorsDir,
    dequantize_fp8,
)

RELEASED, FUSED = "released", "fused"
M3_RELEASED, M3_TEXT = "m3_released", "m3_text"
LAYOUTS = (RELEASED, FUSED, M3_RELEASED, M3_TEXT)
M3_LAYOUTS = (M3_RELEASED, M3_TEXT)
SKIPPED = ("vision_tower.", "multi_modal_projector.", "patch_merge_mlp.")
"""Name prefixes of the released M3's vision model: not part of the text model, skipped on import."""

COPY, QKV, GLU, EXPERT, FUSED_EXPERT, M3_NORM = "copy", "qkv", "glu", "expert", "fused_expert", "m3_norm"


@dataclass(frozen=True)
class Rule:
    """How one checkpoint key is made of HF tensors."""

    key: str
    kind: str
    hf: tuple[str, ...]
    """HF tensor names; per-expert names hold `{e}`."""
    shape: tuple[int, ...]
    """The key's global shape, without the expert axis."""
    experts: int = 0
    """Size of the prepended expert axis (0: none)."""
    parts: tuple[int, ...] = ()
    """qkv: rows of q, k and v per KV group; glu: rows of gate and up."""
    groups: int = 1
    """qkv: KV groups."""
    group: str = "main"
    """main, mtp, indexer.<layer> or mtp_indexer.<depth> (the index branch of an MTP module's MSA
    layer): a group that may be absent from an HF checkpoint as a whole."""

    @property
    def full_shape(self) -> tuple[int, ...]:
        """The key's global shape in a checkpoint: [experts,] shape."""
        return ((self.experts,) if self.experts else ()) + self.shape

    def hf_tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """The HF names and shapes this key is made of."""
        if self.kind == QKV:
            return [(name, (rows * self.groups, *self.shape[1:])) for name, rows in zip(self.hf, self.parts)]
        if self.kind == GLU:
            return [(name.format(e=e), (rows, *self.shape[1:]))
                    for e in (range(self.experts) if self.experts else [None]) for name, rows in zip(self.hf, self.parts)]
        if self.kind == EXPERT:
            return [(self.hf[0].format(e=e), self.shape) for e in range(self.experts)]
        if self.kind == FUSED_EXPERT:
            return [(self.hf[0], (self.experts, *self.shape))]
        return [(self.hf[0], self.shape)]

    def sources(self, expert: int | None) -> list[tuple[str, int | None]]:
        """(HF name, index along its first dim or None) read for one expert (None: the whole key)."""
        if self.kind == FUSED_EXPERT:
            return [(self.hf[0], expert)]
        return [(name.format(e=expert) if self.experts else name, None) for name in self.hf]

    def to_ours(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """The key's tensor (one expert's slice for expert keys) from `sources`' tensors."""
        if self.kind == QKV:
            per_group = [t.reshape(self.groups, -1, t.shape[-1]) for t in tensors]
            return torch.cat(per_group, dim=1).reshape(self.shape)
        if self.kind == GLU:
            return torch.cat(tensors, dim=0)
        if self.kind == M3_NORM:
            return tensors[0].float() + 1.0
        (tensor,) = tensors
        return tensor

    def to_hf(self, tensor: torch.Tensor, expert: int | None = None) -> list[tuple[str, torch.Tensor]]:
        """(HF name, tensor) of the released layout for the key's tensor (one expert's slice)."""
        names = [name.format(e=expert) if self.experts else name for name in self.hf]
        if self.kind == QKV:
            per_group = tensor.reshape(self.groups, sum(self.parts), -1).split(list(self.parts), dim=1)
            return [(n, t.reshape(-1, t.shape[-1])) for n, t in zip(names, per_group)]
        if self.kind == GLU:
            return list(zip(names, tensor.split(list(self.parts), dim=0)))
        if self.kind == M3_NORM:
            return [(names[0], tensor.float() - 1.0)]
        assert self.kind in (COPY, EXPERT, FUSED_EXPERT), self.kind
        return [(names[0], tensor)]  # a fused expert tensor: expert `expert`'s row of it


def rules(model: ModelConfig, layout: str = RELEASED) -> list[Rule]:
    """Every checkpoint key of `model` (main model, MSA index branches, MTP modules) and its HF
    tensors in `layout`, in the order the released checkpoint lists them.

    Decoder layers are keyed one by one, `decoder.layers.<i>.<name>` (model/builder.py sets
    megatron's `hetereogenous_dist_checkpoint`), MTP modules per module."""
    assert layout in LAYOUTS, layout
    h, v, n = model.hidden_size, model.vocab_size, model.num_layers
    msa = set(model.msa_layers())
    top = {M3_RELEASED: "language_model.model.", M3_TEXT: "model."}.get(layout, "model.")
    head = {M3_RELEASED: "language_model.lm_head.weight"}.get(layout, "lm_head.weight")
    out = [Rule("embedding.word_embeddings.weight", COPY, (top + "embed_tokens.weight",), (v, h))]
    for i in range(n):
        out += _layer(model, layout, f"decoder.layers.{i}.", f"{top}layers.{i}.", "main",
                      indexer=f"indexer.{i}" if i in msa else None, dense_mlp=i in model.dense_mlp_layers)
    out += [
        Rule("decoder.final_layernorm.weight", COPY, (top + "norm.weight",), (h,)),
        Rule("output_layer.weight", COPY, (head,), (v, h)),
    ]
    for d in range(model.mtp_num_layers):
        ours = f"mtp.layers.{d}."
        theirs = {M3_RELEASED: f"language_model.mtp.layers.{d}.", M3_TEXT: f"mtp.layers.{d}."}.get(layout, f"model.layers.{n + d}.")
        out += [
            Rule(ours + "enorm.weight", COPY, (theirs + "enorm.weight",), (h,), group="mtp"),
            Rule(ours + "hnorm.weight", COPY, (theirs + "hnorm.weight",), (h,), group="mtp"),
            Rule(ours + "eh_proj.weight", COPY, (theirs + "eh_proj.weight",), (h, 2 * h), group="mtp"),
        ]
        out += _layer(model, layout, ours + "transformer_layer.", theirs, "mtp",
                      indexer=f"mtp_indexer.{d}" if model.mtp_msa() else None, dense_mlp=False)
        out.append(Rule(ours + "final_layernorm.weight", COPY, (theirs + "shared_head.norm.weight",), (h,), group="mtp"))
    return out


def _layer(model: ModelConfig, layout: str, ours: str, theirs: str, group: str, indexer: str | None,
           dense_mlp: bool) -> list[Rule]:
    h, d, g = model.hidden_size, model.kv_channels, model.num_query_groups
    q_rows, kv_rows = model.num_attention_heads * d, g * d
    per_head = model.qk_norm == "per_head"
    a, t = ours + "self_attention.", theirs + "self_attn."
    out = [
        Rule(a + "linear_qkv.layer_norm_weight", COPY, (theirs + "input_layernorm.weight",), (h,), group=group),
        Rule(a + "linear_qkv.weight", QKV, (t + "q_proj.weight", t + "k_proj.weight", t + "v_proj.weight"),
             (q_rows + 2 * kv_rows, h), parts=(q_rows // g, d, d), groups=g, group=group),
        Rule(a + "q_layernorm.weight", COPY, (t + "q_norm.weight",), (d if per_head else q_rows,), group=group),
        Rule(a + "k_layernorm.weight", COPY, (t + "k_norm.weight",), (d if per_head else kv_rows,), group=group),
        Rule(a + "linear_proj.weight", COPY, (t + "o_proj.weight",), (h, q_rows), group=group),
    ]
    if indexer is not None:
        i = model.msa.index_head_dim
        # M3's index norms are Gemma-form; ours are too in a Gemma model, else w * x (M3_NORM: +-1)
        norm = COPY if model.norm_style == "gemma" else M3_NORM
        x = t + "indexer." if layout == M3_TEXT else t + "index_"  # indexer.q_proj or index_q_proj
        out += [
            Rule(a + "indexer.linear_q.weight", COPY, (f"{x}q_proj.weight",), (g * i, h), group=indexer),
            Rule(a + "indexer.linear_k.weight", COPY, (f"{x}k_proj.weight",), (i, h), group=indexer),
            Rule(a + "indexer.q_norm.weight", norm, (f"{x}q_norm.weight",), (i,), group=indexer),
            Rule(a + "indexer.k_norm.weight", norm, (f"{x}k_norm.weight",), (i,), group=indexer),
        ]
    m = ours + "mlp."
    if dense_mlp:
        f = model.dense_ffn_hidden_size
        out.append(Rule(m + "linear_fc1.layer_norm_weight", COPY, (theirs + "post_attention_layernorm.weight",), (h,), group=group))
        b = theirs + "mlp."
        return out + [_glu(m + "linear_fc1.weight", layout, b, f, h, group),
                      Rule(m + "linear_fc2.weight", COPY, (b + "down_proj.weight",), (h, f), group=group)]
    out.append(Rule(ours + "pre_mlp_layernorm.weight", COPY, (theirs + "post_attention_layernorm.weight",), (h,), group=group))
    e, f = model.num_experts, model.moe_ffn_hidden_size
    if layout in (RELEASED, M3_RELEASED):
        b = theirs + "block_sparse_moe."
        out += [
            Rule(m + "router.weight", COPY, (b + "gate.weight",), (e, h), group=group),
            Rule(m + "router.expert_bias", COPY, (b + "e_score_correction_bias",), (e,), group=group),
            Rule(m + "experts.experts.linear_fc1.weight", GLU, (b + "experts.{e}.w1.weight", b + "experts.{e}.w3.weight"),
                 (2 * f, h), experts=e, parts=(f, f), group=group),
            Rule(m + "experts.experts.linear_fc2.weight", EXPERT, (b + "experts.{e}.w2.weight",), (h, f),
                 experts=e, group=group),
        ]
    else:
        b = theirs + "mlp."
        bias = b + ("gate.e_score_correction_bias" if layout == M3_TEXT else "e_score_correction_bias")
        out += [
            Rule(m + "router.weight", COPY, (b + "gate.weight",), (e, h), group=group),
            Rule(m + "router.expert_bias", COPY, (bias,), (e,), group=group),
            Rule(m + "experts.experts.linear_fc1.weight", FUSED_EXPERT, (b + "experts.gate_up_proj",), (2 * f, h),
                 experts=e, group=group),
            Rule(m + "experts.experts.linear_fc2.weight", FUSED_EXPERT, (b + "experts.down_proj",), (h, f),
                 experts=e, group=group),
        ]
    if model.moe_shared_expert_ffn_hidden_size:
        f = model.moe_shared_expert_ffn_hidden_size
        b = theirs + ("block_sparse_moe." if layout in (RELEASED, M3_RELEASED) else "mlp.") + "shared_experts."
        out += [_glu(m + "shared_experts.linear_fc1.weight", layout, b, f, h, group),
                Rule(m + "shared_experts.linear_fc2.weight", COPY, (b + "down_proj.weight",), (h, f), group=group)]
    return out


def _glu(key: str, layout: str, prefix: str, f: int, h: int, group: str) -> Rule:
    """A dense GLU's fc1 [gate; up]: two tensors in the released forms, one in transformers'."""
    if layout in (RELEASED, M3_RELEASED):
        return Rule(key, GLU, (prefix + "gate_proj.weight", prefix + "up_proj.weight"), (2 * f, h), parts=(f, f), group=group)
    return Rule(key, COPY, (prefix + "gate_up_proj.weight",), (2 * f, h), group=group)


def detect_layout(names, family: str = "m2") -> str:
    """The layout of an HF checkpoint's tensor names. M2 (`family` m2): released (per-expert
    w1/w2/w3 under block_sparse_moe) or fused (transformers' mlp.experts). M3: m3_released (the
    LLM under language_model.) or m3_text (transformers' text-only names)."""
    if family == "m3":
        return M3_RELEASED if any(n.startswith("language_model.") for n in names) else M3_TEXT
    released = any(".block_sparse_moe." in n for n in names)
    fused = any(".mlp.experts." in n or ".mlp.gate." in n for n in names)
    if released and fused:
        raise ConvertError("the checkpoint mixes the released layout (block_sparse_moe.*) and transformers' fused one (mlp.experts.*)")
    return FUSED if fused else RELEASED


def is_quantized_linear(name: str) -> bool:
    """Whether the released FP8 checkpoint stores this HF tensor as block FP8: every Linear weight
    except its modules_to_not_convert (the router gate, lm_head; the expert bias, embeddings and
    norms are not Linear weights), and the fused expert weights of M3's text-only form
    ([E, out, in], tiles per expert)."""
    return name.endswith(("_proj.weight", ".w1.weight", ".w2.weight", ".w3.weight",
                          ".experts.gate_up_proj", ".experts.down_proj"))


@dataclass
class ImportPlan:
    """What an HF checkpoint provides for a model."""

    rules: dict[str, Rule]
    """checkpoint key -> its rule, for what is read from the HF checkpoint."""
    init_keys: set[str]
    """Keys the HF checkpoint does not hold, to be initialised (a whole group absent)."""
    notes: list[str]
    """What was initialised, and why (to be logged)."""
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)
    """Tensors of the checkpoint deliberately not read (M3's vision model), per name prefix."""

    def skipped_note(self) -> str | None:
        """One line saying what was skipped (None when nothing was)."""
        if not self.skipped:
            return None
        parts = ", ".join(f"{prefix}* {count}" for prefix, count in self.skipped.items())
        return f"skipped {sum(self.skipped.values())} tensors of the vision model ({parts}): the text model only"

    def rule(self, key: str, lead: tuple[int, ...]) -> tuple[Rule, int | None]:
        """The rule of a piece at `lead` (its prepended-axis index: the expert) and its expert (or None)."""
        assert key in self.rules, f"{key} {lead}: a key of the built model that model/hf/names.py does not map"
        rule = self.rules[key]
        assert len(lead) == (1 if rule.experts else 0), (key, lead)
        return rule, lead[0] if lead else None


def _listing(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def plan_import(model: ModelConfig, source: SafetensorsDir, *, layout: str, fp8_block: tuple[int, int],
                initialisable: Callable[[str], bool]) -> ImportPlan:
    """Match the checkpoint's tensors against `model`'s keys, from the shard headers alone (every
    rank reaches the same verdict before reading any data). Raises ConvertError naming the
    tensor when one is missing, unexpected or of the wrong shape, or an FP8 weight's scales are
    missing or mis-shaped. A group (`mtp`, `indexer.<layer>`) wholly absent is initialised where
    `initialisable(group)` allows it. In M3 layouts the vision model's tensors (`SKIPPED`) are
    counted and left out."""
    present = {}
    scales = []
    skipped: dict[str, int] = {}
    for name, info in source.infos.items():
        prefix = next((p for p in SKIPPED if name.startswith(p)), None) if layout in M3_LAYOUTS else None
        if prefix is not None:
            skipped[prefix] = skipped.get(prefix, 0) + 1
        elif name.endswith(SCALE_SUFFIX):
            scales.append(name)
        else:
            present[name] = info
    for name in scales:
        base = name[: -len(SCALE_SUFFIX)]
        if base not in present or present[base].dtype not in FP8_DTYPES:
            raise ConvertError(f"tensor {name}: FP8 scales of {base}, which is not an FP8 tensor of this checkpoint")
    for name, info in present.items():
        if info.dtype in FP8_DTYPES:
            scale = source.infos.get(name + SCALE_SUFFIX)
            if scale is None:
                raise ConvertError(f"tensor {name} is FP8 but the checkpoint has no {name + SCALE_SUFFIX}")
            tiles = (*info.shape[:-2], *(math.ceil(n / b) for n, b in zip(info.shape[-2:], fp8_block)))
            if len(info.shape) < 2 or tuple(scale.shape) != tiles:
                raise ConvertError(
                    f"tensor {name + SCALE_SUFFIX} has shape {list(scale.shape)}; {name} {list(info.shape)} in "
                    f"{fp8_block[0]}x{fp8_block[1]} tiles needs {list(tiles)}"
                )
    all_rules = rules(model, layout)
    by_group: dict[str, list[Rule]] = {}
    for rule in all_rules:
        by_group.setdefault(rule.group, []).append(rule)
    expected: dict[str, tuple[int, ...]] = {}
    used, init_keys, notes = {}, set(), []
    for group, group_rules in by_group.items():
        names = {name: shape for rule in group_rules for name, shape in rule.hf_tensors()}
        expected.update(names)
        found = [n for n in names if n in present]
        if not found and group != "main" and initialisable(group):
            init_keys.update(rule.key for rule in group_rules)
            notes.append(f"{group}: the checkpoint holds none of its {len(names)} tensors; initialised as for training")
            continue
        missing = [n for n in names if n not in present]
        if missing:
            what = {"main": "", "mtp": "MTP "}.get(group, "MSA index ")
            raise ConvertError(
                f"missing {what}tensor(s) {_listing(missing)} (the model config derived from config.json "
                f"expects {len(names)} in group {group!r}, the checkpoint holds {len(found)}): the checkpoint is "
                "incomplete or not of this model"
            )
        used.update({rule.key: rule for rule in group_rules})
    unexpected = sorted(set(present) - set(expected))
    if unexpected:
        raise ConvertError(
            f"unexpected tensor(s) {_listing(unexpected)}: no key of the model derived from config.json "
            "takes them (a different architecture, extra MTP layers, or model.* overrides that drop a part)"
        )
    for name, shape in expected.items():
        info = present.get(name)
        if info is None:
            continue
        if tuple(info.shape) != tuple(shape):
            raise ConvertError(f"tensor {name} has shape {list(info.shape)}, the model derived from config.json needs {list(shape)}")
        if not info.dtype.is_floating_point:
            raise ConvertError(f"tensor {name} has dtype {info.dtype}, not a floating-point type")
    return ImportPlan(rules=used, init_keys=init_keys, notes=notes, skipped=skipped)


class HFReader:
    """Full tensors of checkpoint keys, read from an HF checkpoint (FP8 dequantised in fp32)."""

    def __init__(self, source: SafetensorsDir, plan: ImportPlan, fp8_block: tuple[int, int]):
        self.source = source
        self.plan = plan
        self.block = fp8_block
        self.on_read: Callable[[int, int], None] = lambda tensors, nbytes: None
        """Called with (tensors, bytes) after each read: the progress display."""

    def cost(self, key: str, lead: tuple[int, ...]) -> tuple[int, int]:
        """(tensors, bytes) read for `full_tensor(key, lead, ...)`; (0, 0) for keys to initialise."""
        if key in self.plan.init_keys:
            return 0, 0
        rule, expert = self.plan.rule(key, lead)
        tensors = nbytes = 0
        for name, index in rule.sources(expert):
            for part in (name, name + SCALE_SUFFIX):
                info = self.source.infos.get(part)
                if info is not None:
                    tensors += 1
                    nbytes += info.nbytes // (info.shape[0] if index is not None else 1)
        return tensors, nbytes

    def full_tensor(self, key: str, lead: tuple[int, ...], shape: tuple[int, ...]) -> torch.Tensor | None:
        """The full tensor of `key` at `lead` on its prepended axes (the expert), or None for a
        key to initialise. The signature `parallel.gather.fill_local_shards`
        calls."""
        if key in self.plan.init_keys:
            return None
        rule, expert = self.plan.rule(key, lead)
        tensors = [self._read(name, index) for name, index in rule.sources(expert)]
        out = rule.to_ours(tensors)
        assert tuple(out.shape) == tuple(shape), (key, out.shape, shape)
        return out

    def _read(self, name: str, index: int | None) -> torch.Tensor:
        tensor = self.source.read(name, index)
        count, nbytes = 1, tensor.numel() * tensor.element_size()
        if tensor.dtype in FP8_DTYPES:  # plan_import checked that the scales exist and fit
            scale = self.source.read(name + SCALE_SUFFIX, index)
            count, nbytes = 2, nbytes + scale.numel() * scale.element_size()
            tensor = dequantize_fp8(tensor, scale, self.block)
        self.on_read(count, nbytes)
        return tensor
