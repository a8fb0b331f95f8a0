"""M2 and M3 layers as megatron-core ModuleSpecs.

The backend (Transformer Engine or megatron-core's local modules) is chosen once, by
pretrain/settings.py `resolve`; everything else is a spec tree built from that backend's provider. Variants
swap specs here, never `if`s in forward: MSA or full attention per layer, a dense MLP or MoE per
layer, M2's per-layer QK-norm or M3's per-head one, M2's `w * x` norms or M3's `(1 + w) * x`
(GemmaRMSNorm locally, megatron's `layernorm_zero_centered_gamma` in TE's norms), grouped
experts, the shared expert (megatron's SharedExpertMLP, with our fused activation).
"""

from __future__ import annotations

import dataclasses

from megatron.core.models.backends import BackendSpecProvider, LocalSpecProvider
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_mtp_block_spec_for_backend
from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec_for_backend
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
    get_transformer_layer_offset,
)
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add

from model.config import ModelConfig, MSAConfig
from model.mlp import FusedGLUMLP, FusedSharedExpertMLP
from model.norm import GemmaRMSNorm, LayerQKNorm, RMSNorm


def te_available() -> bool:
    """True when Transformer Engine's PyTorch modules import (they need CUDA)."""
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # TE raises assorted errors on machines without CUDA
        return False
    return True


class LocalBackend(LocalSpecProvider):
    """megatron-core's local modules, with an RMSNorm that works under sequence parallelism
    (M3's Gemma form with `gemma`), fused SDPA core attention (model/attention.py) and grouped
    expert GEMMs (model/experts.py)."""

    def __init__(self, gemma: bool = False):
        self.norm = GemmaRMSNorm if gemma else RMSNorm

    def layer_norm(self, rms_norm: bool = False, for_qk: bool = False) -> type:
        return self.norm  # RMSNorm everywhere, MTP's norms included

    def core_attention(self) -> type:
        from model.attention import SDPAttention

        return SDPAttention

    def grouped_mlp_modules(self, moe_use_grouped_gemm: bool, moe_use_legacy_grouped_gemm: bool):
        # megatron's local GroupedMLP is deprecated and needs the grouped_gemm package; ours
        # keeps SequentialMLP's parameters and checkpoint layout.
        module, submodules = super().grouped_mlp_modules(False, False)  # SequentialMLP's
        if not moe_use_grouped_gemm:
            return module, submodules
        from model.experts import GroupedExperts

        return GroupedExperts, submodules


def backend_provider(backend: str, model: ModelConfig) -> BackendSpecProvider:
    """The module provider of `backend` for `model` (TE's norms take the Gemma form from
    megatron's config, model/builder.py)."""
    if backend == "te":
        from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

        return TESpecProvider()
    return LocalBackend(gemma=model.norm_style == "gemma")


def layer_spec(
    provider: BackendSpecProvider, model: ModelConfig, config: TransformerConfig, *,
    msa: MSAConfig | None = None, dense_mlp: bool = False, recompute: tuple[str, ...] = (),
) -> ModuleSpec:
    """One layer: RMSNorm -> GQA with QK-norm (per layer or per head) and partial RoPE ->
    RMSNorm -> MoE (routed experts, and the shared expert when the config has one), or with
    `dense_mlp` a dense GLU MLP. With `msa`, the attention is MSA: the same projections and
    norms, the MSA core attention and the index branch. `recompute` has moe_dispatch: the MoE
    block rebuilds its dispatched tokens in backward (model/moe.py)."""
    fused_norm = provider.fuse_layernorm_and_linear()
    if fused_norm:
        input_layernorm, linear_qkv = IdentityOp, provider.column_parallel_layer_norm_linear()
    else:
        input_layernorm, linear_qkv = provider.layer_norm(rms_norm=True), provider.column_parallel_linear()
    if model.qk_norm == "per_head":
        q_norm = k_norm = provider.layer_norm(rms_norm=True, for_qk=True)
    else:
        q_norm = ModuleSpec(module=LayerQKNorm, params={"which": "q"})
        k_norm = ModuleSpec(module=LayerQKNorm, params={"which": "k"})
    common = dict(
        linear_qkv=linear_qkv,
        linear_proj=provider.row_parallel_linear(),
        q_layernorm=q_norm,
        k_layernorm=k_norm,
    )
    if msa is None:
        attention = ModuleSpec(
            module=SelfAttention,
            params={"attn_mask_type": AttnMaskType.causal},
            submodules=SelfAttentionSubmodules(core_attention=provider.core_attention(), **common),
        )
    else:
        from model.msa.layer import (
            FusedInputNorm, MSACoreAttention, MSAIndexer, MSASelfAttention, MSASelfAttentionSubmodules,
        )

        attention = ModuleSpec(
            module=MSASelfAttention,
            params={"attn_mask_type": AttnMaskType.causal},
            submodules=MSASelfAttentionSubmodules(
                # MSA runs its own kernels whatever the backend (TE has no sparse attention).
                core_attention=ModuleSpec(module=MSACoreAttention, params={"msa": msa}),
                # Our norms in the index branch on either backend, in the model's form.
                indexer=ModuleSpec(
                    module=MSAIndexer, params={"msa": msa, "norm": GemmaRMSNorm if model.norm_style == "gemma" else RMSNorm}
                ),
                # The index branch reads the post-input-norm hidden states on every backend:
                # where linear_qkv holds the norm, the attention's input is the raw residual.
                index_input=FusedInputNorm if fused_norm else IdentityOp,
                **common,
            ),
        )
    # Local checkpoints load into the TE layout, where the input norm lives in linear_qkv (and a
    # dense MLP's norm in its linear_fc1).
    keys_map = {} if fused_norm else {"input_layernorm.": "self_attention.linear_qkv.layer_norm_"}
    if dense_mlp:
        if fused_norm:
            pre_mlp_layernorm, linear_fc1 = IdentityOp, provider.column_parallel_layer_norm_linear()
        else:
            pre_mlp_layernorm, linear_fc1 = provider.layer_norm(rms_norm=True), provider.column_parallel_linear()
            keys_map["pre_mlp_layernorm."] = "mlp.linear_fc1.layer_norm_"
        mlp = ModuleSpec(
            module=FusedGLUMLP, params={"ffn_hidden_size": model.dense_ffn_hidden_size},
            submodules=MLPSubmodules(linear_fc1=linear_fc1, linear_fc2=provider.row_parallel_linear()),
        )
    else:
        pre_mlp_layernorm = provider.layer_norm(rms_norm=True)
        mlp = get_moe_module_spec_for_backend(provider, config.num_moe_experts, config.moe_grouped_gemm)
        mlp.submodules.shared_experts.module = FusedSharedExpertMLP  # built only with a shared expert
        if "moe_dispatch" in recompute:
            from model.moe import DispatchRecomputeMoELayer

            mlp = dataclasses.replace(mlp, module=DispatchRecomputeMoELayer)
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=input_layernorm,
            self_attention=attention,
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=pre_mlp_layernorm,
            mlp=mlp,
            mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map=keys_map,
        ),
    )


def decoder_block_spec(
    config: TransformerConfig, model: ModelConfig, backend: str, vp_stage: int | None = None,
    recompute: tuple[str, ...] = (),
) -> TransformerBlockSubmodules:
    """The layers of this pipeline stage (and virtual stage): full or MSA attention, MoE or a
    dense MLP, per layer."""
    provider = backend_provider(backend, model)
    msa_layers, dense_mlp_layers = set(model.msa_layers()), set(model.dense_mlp_layers)
    layers = [
        layer_spec(provider, model, config, msa=model.msa if i in msa_layers else None,
                   dense_mlp=i in dense_mlp_layers, recompute=recompute)
        for i in range(config.num_layers)
    ]
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage)
    count = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(
        layer_specs=layers[offset : offset + count], layer_norm=provider.layer_norm(rms_norm=True)
    )


def mtp_block_spec(config: TransformerConfig, model: ModelConfig, backend: str, vp_stage: int | None = None,
                   recompute: tuple[str, ...] = ()):
    """The MTP modules (None on stages that hold none); each wraps one MoE layer with full
    attention, or MSA with model.attention.mtp=msa."""
    if not config.mtp_num_layers:
        return None
    provider = backend_provider(backend, model)
    layer = layer_spec(provider, model, config, msa=model.msa if model.mtp_msa() else None, recompute=recompute)
    return get_gpt_mtp_block_spec_for_backend(config, layer, provider, vp_stage=vp_stage)
