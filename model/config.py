"""The `model` config group: the shape of an M2- or M3-family MoE transformer."""

from __future__ import annotations

from dataclasses import dataclass, field

BACKENDS = ("auto", "local", "te")
CROSS_ENTROPY = ("chunked", "fused", "megatron")
ATTENTION_TYPES = ("dense", "msa")
MSA_MODES = ("sparse", "dense_warmup")
NORM_STYLES = ("rms", "gemma")
QK_NORMS = ("per_layer", "per_head")
ACTIVATIONS = ("swiglu", "swiglu_oai")
SWIGLU_OAI_LIMIT = 7.0
"""SwiGLU-OAI (MiniMax-M3, GPT-OSS): gate clamped above at this value, up clamped to +-it."""
SWIGLU_OAI_ALPHA = 1.702
"""SwiGLU-OAI's sigmoid gain: gate * sigmoid(1.702 * gate) (megatron's quick_gelu)."""
WEIGHT_KEYS = (
    "num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
    "rotary_percent", "rotary_base", "norm_epsilon", "norm_style", "qk_norm", "activation",
    "num_experts", "moe_router_topk", "moe_ffn_hidden_size", "moe_shared_expert_ffn_hidden_size",
    "moe_routed_scaling_factor", "dense_mlp_layers", "dense_ffn_hidden_size", "vocab_size",
)
"""ModelConfig fields the weights fix (parameter shapes, and what they were trained with): a run
or a conversion takes them from the weights, never from an override."""


@dataclass
class AttentionConfig:
    """Which attention each layer runs."""

    type: str = "dense"
    """dense = full causal attention in every layer; msa = MSA sparse attention except in `dense_layers`."""
    dense_layers: list[int] = field(default_factory=lambda: [0, 1, 2])
    """With type=msa: layers (0-based) that keep full attention (M3 keeps the first 3 dense)."""
    mtp: str = "dense"
    """The MTP modules' layers: dense = full causal attention; msa = MSA like the decoder's MSA
    layers (type=msa only). At long context an MTP module's full attention costs what a dense
    decoder layer's does: at 128K on one H200 ~1.7 s of a proxy_1gpu step's 1.98 s of attention
    (bench/results/train_throughput_long_h200_2026-12-04.md). The released M2/M3 weights hold no
    MTP tensors, so this is a training choice."""


@dataclass
class MSAConfig:
    """MSA: per token and GQA group, exact attention over the top-k key blocks an index branch picks."""

    mode: str = "sparse"
    """sparse = attend to the selected blocks; dense_warmup = full attention while the index
    branch learns the full attention distribution (before sparse training, or to convert a dense
    checkpoint)."""
    block_size: int = 128
    """Keys per block."""
    topk: int = 16
    """Blocks per token and group, the local block included (16 x 128 = 2048 keys)."""
    local_blocks: int = 1
    """The query's own block(s), always selected."""
    index_head_dim: int = 128
    """Width of each index head (one query head per GQA group, one shared key head)."""
    indexer_loss_coeff: float = 1.0
    """Weight of the KL indexer loss added to the total loss (it trains only the index branch)."""
    train_only_indexer: bool = False
    """Train the index branches alone: every other parameter is frozen and the routers' expert
    bias is not updated (stage 1 of converting a dense checkpoint: with mode=dense_warmup)."""

    def __post_init__(self):
        if self.mode not in MSA_MODES:
            raise ValueError(f"model.msa.mode={self.mode!r}: choose one of {MSA_MODES}")
        for key in ("block_size", "topk", "local_blocks", "index_head_dim"):
            if getattr(self, key) < 1:
                raise ValueError(f"model.msa.{key}={getattr(self, key)} must be >= 1")
        if self.local_blocks > self.topk:
            raise ValueError(
                f"model.msa.local_blocks={self.local_blocks} exceeds model.msa.topk={self.topk}"
            )
        if self.index_head_dim % 2:
            raise ValueError(f"model.msa.index_head_dim={self.index_head_dim} must be even (RoPE)")


@dataclass
class ModelConfig:
    """An M2- or M3-shaped model. Defaults are MiniMax-M2 (`model=m2_230b`); `model=m3_preview`
    sets the fields that make it the released MiniMax-M3 text model."""

    name: str = "m2_230b"
    """Name shown in logs and W&B."""
    backend: str = "auto"
    """Module backend: `te` (Transformer Engine), `local` (megatron-core's own modules), `auto` (te when it imports)."""
    num_layers: int = 62
    """Transformer layers in the main model (MoE except dense_mlp_layers)."""
    hidden_size: int = 3072
    """Residual stream width."""
    num_attention_heads: int = 48
    """Query heads."""
    num_query_groups: int = 8
    """Key/value heads (GQA groups)."""
    kv_channels: int = 128
    """Head dim of q, k and v."""
    rotary_percent: float = 0.5
    """Fraction of each head's dims that RoPE rotates (M2: the first 64 of 128, rotate-half)."""
    rotary_base: float = 5_000_000.0
    """RoPE theta."""
    norm_epsilon: float = 1e-6
    """RMSNorm epsilon (layer norms and QK-norm)."""
    norm_style: str = "rms"
    """Every RMSNorm's scale: rms = w * x_normed (M2, w starts at 1), gemma = (1 + w) * x_normed
    (M3, w starts at 0)."""
    qk_norm: str = "per_layer"
    """QK-norm: per_layer = one RMSNorm over all heads of q (and of k) (M2), per_head = one over
    each head's dims, shared by the heads (M3)."""
    activation: str = "swiglu"
    """MLP activation: swiglu = silu(gate) * up (M2); swiglu_oai = (clamp(up, -7, 7) + 1) *
    g * sigmoid(1.702 g), g = min(gate, 7) (M3); gate and up halves not interleaved."""
    num_experts: int = 256
    """Routed experts per MoE layer."""
    moe_router_topk: int = 8
    """Experts per token."""
    moe_ffn_hidden_size: int = 1536
    """SwiGLU hidden width of one expert."""
    moe_shared_expert_ffn_hidden_size: int = 0
    """Hidden width of the shared expert every token passes through beside the routed ones
    (its output is added to theirs); 0 = no shared expert (M2)."""
    moe_routed_scaling_factor: float = 1.0
    """The routed experts' output (their renormalised weights) is multiplied by this (M3: 2)."""
    dense_mlp_layers: list[int] = field(default_factory=list)
    """Layers (0-based) with a dense SwiGLU MLP of width dense_ffn_hidden_size instead of MoE
    (M3: [0, 1, 2]); MTP modules are MoE."""
    dense_ffn_hidden_size: int = 0
    """Hidden width of the dense MLP of dense_mlp_layers."""
    moe_router_bias_update_rate: float = 1e-3
    """Aux-loss-free balancing: expert_bias += rate * sign(mean load - load) after each step."""
    moe_aux_loss_coeff: float = 0.0
    """Coefficient of the optional per-sequence balance loss (0 = off)."""
    moe_grouped_gemm: bool = True
    """Experts as grouped GEMMs (TE's TEGroupedMLP, or model/experts.py locally); false: one by one."""
    mtp_num_layers: int = 3
    """Multi-token-prediction modules (1 transformer layer each); 0 disables MTP."""
    mtp_loss_scaling_factor: float = 0.1
    """Weight of the MTP losses (their mean) added to the LM loss."""
    vocab_size: int = 200064
    """Embedding and output rows; the tokenizer's vocab must not exceed it."""
    eod_token_id: int | None = None
    """End-of-document token of the tokenizer the weights were trained with (config.json's
    eos_token_id: 200020 for M2); None = the tokenizer's <|endoftext|>."""
    max_position_embeddings: int = 196608
    """Longest sequence the model is configured for (RoPE table size)."""
    init_method_std: float = 0.006
    """Std of the normal init of linear weights."""
    cross_entropy: str = "chunked"
    """Output layer and language-model loss (main and MTP heads): chunked (model/cross_entropy.py
    `linear_cross_entropy`: the logits of `loss_chunk_tokens` tokens at a time, recomputed in
    backward, never [tokens, vocab]), fused (the output layer's logits, then model/cross_entropy.py
    `vocab_parallel_cross_entropy`: one read of them forward, one read+write backward, no fp32
    copy) or megatron (the logits, then tensor_parallel.vocab_parallel_cross_entropy)."""
    loss_chunk_tokens: int = 4096
    """With cross_entropy=chunked: tokens (of one micro-batch on one rank) whose logits exist at
    once. Memory (chunk x vocab/tp logits, in bf16) against GEMM size; a longer micro-batch pays
    the output layer's forward GEMM once more (the logits recomputed in backward), one of at most
    this many tokens keeps its logits for backward instead."""
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    """Dense or MSA attention, per layer."""
    msa: MSAConfig = field(default_factory=MSAConfig)
    """MSA settings (used by the layers that run MSA)."""

    def moe_layers(self) -> list[int]:
        """0-based indices of the decoder layers whose MLP is MoE."""
        return [i for i in range(self.num_layers) if i not in self.dense_mlp_layers]

    def msa_layers(self) -> list[int]:
        """0-based indices of the decoder layers that run MSA."""
        if self.attention.type != "msa":
            return []
        return [i for i in range(self.num_layers) if i not in self.attention.dense_layers]

    def mtp_msa(self) -> bool:
        """Whether the MTP modules' layers run MSA (model.attention.mtp=msa)."""
        return self.attention.mtp == "msa" and self.mtp_num_layers > 0  # (mtp=msa needs type=msa)

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"model.backend={self.backend!r}: choose one of {BACKENDS}")
        if self.cross_entropy not in CROSS_ENTROPY:
            raise ValueError(f"model.cross_entropy={self.cross_entropy!r}: choose one of {CROSS_ENTROPY}")
        if self.loss_chunk_tokens < 1:
            raise ValueError(f"model.loss_chunk_tokens={self.loss_chunk_tokens} must be >= 1")
        if self.cross_entropy != "chunked" and self.loss_chunk_tokens != ModelConfig.loss_chunk_tokens:
            raise ValueError(
                f"model.loss_chunk_tokens={self.loss_chunk_tokens} applies to model.cross_entropy=chunked only, "
                f"not {self.cross_entropy}: set model.cross_entropy=chunked or drop model.loss_chunk_tokens"
            )
        for key in ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                    "kv_channels", "num_experts", "moe_router_topk", "moe_ffn_hidden_size",
                    "vocab_size", "max_position_embeddings"):
            if getattr(self, key) <= 0:
                raise ValueError(f"model.{key}={getattr(self, key)} must be positive")
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(
                f"model.num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"model.num_query_groups={self.num_query_groups} (GQA)"
            )
        if self.moe_router_topk > self.num_experts:
            raise ValueError(
                f"model.moe_router_topk={self.moe_router_topk} exceeds model.num_experts={self.num_experts}"
            )
        rot = self.kv_channels * self.rotary_percent
        if not 0 < self.rotary_percent <= 1 or rot != int(rot) or int(rot) % 2:
            raise ValueError(
                f"model.rotary_percent={self.rotary_percent} must select an even number of the "
                f"model.kv_channels={self.kv_channels} head dims"
            )
        if self.eod_token_id is not None and not 0 <= self.eod_token_id < self.vocab_size:
            raise ValueError(
                f"model.eod_token_id={self.eod_token_id} is outside the vocabulary (model.vocab_size={self.vocab_size})"
            )
        for key, allowed in (("norm_style", NORM_STYLES), ("qk_norm", QK_NORMS), ("activation", ACTIVATIONS)):
            if getattr(self, key) not in allowed:
                raise ValueError(f"model.{key}={getattr(self, key)!r}: choose one of {allowed}")
        if self.moe_shared_expert_ffn_hidden_size < 0:
            raise ValueError(
                f"model.moe_shared_expert_ffn_hidden_size={self.moe_shared_expert_ffn_hidden_size} must be >= 0 (0: none)"
            )
        if self.moe_routed_scaling_factor <= 0:
            raise ValueError(f"model.moe_routed_scaling_factor={self.moe_routed_scaling_factor} must be positive")
        bad = [i for i in self.dense_mlp_layers if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(
                f"model.dense_mlp_layers={list(self.dense_mlp_layers)}: {bad} outside 0..{self.num_layers - 1} "
                f"(model.num_layers={self.num_layers})"
            )
        if self.dense_mlp_layers and self.dense_ffn_hidden_size <= 0:
            raise ValueError(
                f"model.dense_mlp_layers={list(self.dense_mlp_layers)} needs model.dense_ffn_hidden_size > 0 "
                f"(it is {self.dense_ffn_hidden_size})"
            )
        if not self.moe_layers():
            raise ValueError("model.dense_mlp_layers lists every layer: at least one layer must be MoE")
        if self.mtp_num_layers < 0:
            raise ValueError(f"model.mtp_num_layers={self.mtp_num_layers} must be >= 0")
        if self.attention.type not in ATTENTION_TYPES:
            raise ValueError(f"model.attention.type={self.attention.type!r}: choose one of {ATTENTION_TYPES}")
        if self.attention.mtp not in ("dense", "msa"):
            raise ValueError(f"model.attention.mtp={self.attention.mtp!r}: choose dense or msa")
        if self.attention.mtp == "msa" and self.attention.type != "msa":
            raise ValueError("model.attention.mtp=msa needs model.attention.type=msa (the MSA settings of model.msa)")
        if self.msa.train_only_indexer and not self.msa_layers():
            raise ValueError(
                "model.msa.train_only_indexer=true but no layer runs MSA: set model.attention.type=msa "
                "(and model.attention.dense_layers to the layers that stay dense)"
            )
        bad = [i for i in self.attention.dense_layers if not 0 <= i < self.num_layers]
        if self.attention.type == "msa" and bad:
            raise ValueError(
                f"model.attention.dense_layers={list(self.attention.dense_layers)}: {bad} outside "
                f"0..{self.num_layers - 1} (model.num_layers={self.num_layers})"
            )
        if self.attention.mtp == "msa" and not self.msa_layers():
            raise ValueError("model.attention.mtp=msa but model.attention.dense_layers lists every decoder layer: "
                             "MSA in the MTP modules only is not supported")
        if self.msa_layers() and self.msa.index_head_dim < int(rot):
            raise ValueError(
                f"model.msa.index_head_dim={self.msa.index_head_dim} is narrower than the {int(rot)} dims RoPE "
                f"rotates (model.kv_channels * model.rotary_percent): the index heads get the same rotation"
            )
