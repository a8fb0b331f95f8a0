"""M2 layers as megatron-core ModuleSpecs.

The backend (Transformer Engine or megatron-core's local modules) is chosen once, by
pretrain/settings.py `resolve`; everything else is a spec tree built from that backend's provider. Variants
(the MSA attention of later layers, grouped experts) swap specs here, never `if`s in forward.
"""

from __future__ import annotations

from megatron.core.models.backends import BackendSpecProvider, LocalSpecProvider
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_mtp_block_spec_for_backend
from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec_for_backend
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
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
from model.norm import LayerQKNorm, RMSNorm


def te_available() -> bool:
    """True when Transformer Engine's PyTorch modules import (they need CUDA)."""
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # TE raises assorted errors on machines without CUDA
        return False
    return True


class LocalBackend(LocalSpecProvider):
    """megatron-core's local modules, with an RMSNorm that works under sequence parallelism,
    fused SDPA core attention (model/attention.py) and grouped expert GEMMs (model/experts.py)."""

    def layer_norm(self, rms_norm: bool = False, for_qk: bool = False) -> type:
        return RMSNorm  # M2 uses RMSNorm everywhere, MTP's norms included

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


def backend_provider(backend: str) -> BackendSpecProvider:
    if backend == "te":
        from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

        return TESpecProvider()
    return LocalBackend()


def m2_layer_spec(
    provider: BackendSpecProvider, num_experts: int, grouped_gemm: bool, msa: MSAConfig | None = None
) -> ModuleSpec:
    """One M2 layer: RMSNorm -> GQA with per-layer QK-norm and partial RoPE -> RMSNorm -> MoE.
    With `msa`, the attention is MSA: the same projections and norms, the MSA core attention and
    the index branch."""
    fused_norm = provider.fuse_layernorm_and_linear()
    if fused_norm:
        input_layernorm, linear_qkv = IdentityOp, provider.column_parallel_layer_norm_linear()
    else:
        input_layernorm, linear_qkv = provider.layer_norm(rms_norm=True), provider.column_parallel_linear()
    common = dict(
        linear_qkv=linear_qkv,
        linear_proj=provider.row_parallel_linear(),
        q_layernorm=ModuleSpec(module=LayerQKNorm, params={"which": "q"}),
        k_layernorm=ModuleSpec(module=LayerQKNorm, params={"which": "k"}),
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
                indexer=ModuleSpec(module=MSAIndexer, params={"msa": msa}),
                # The index branch reads the post-input-norm hidden states on every backend:
                # where linear_qkv holds the norm, the attention's input is the raw residual.
                index_input=FusedInputNorm if fused_norm else IdentityOp,
                **common,
            ),
        )
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=input_layernorm,
            self_attention=attention,
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=provider.layer_norm(rms_norm=True),
            mlp=get_moe_module_spec_for_backend(provider, num_experts, grouped_gemm),
            mlp_bda=get_bias_dropout_add,
            # Local checkpoints load into the TE layout, where the input norm lives in linear_qkv.
            sharded_state_dict_keys_map=(
                {} if fused_norm else {"input_layernorm.": "self_attention.linear_qkv.layer_norm_"}
            ),
        ),
    )


def decoder_block_spec(
    config: TransformerConfig, model: ModelConfig, backend: str, vp_stage: int | None = None
) -> TransformerBlockSubmodules:
    """The layers of this pipeline stage (and virtual stage): dense or MSA attention per layer."""
    provider = backend_provider(backend)
    dense = m2_layer_spec(provider, config.num_moe_experts, config.moe_grouped_gemm)
    sparse = m2_layer_spec(provider, config.num_moe_experts, config.moe_grouped_gemm, model.msa)
    msa_layers = set(model.msa_layers())
    layers = [sparse if i in msa_layers else dense for i in range(config.num_layers)]
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage)
    count = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(
        layer_specs=layers[offset : offset + count], layer_norm=provider.layer_norm(rms_norm=True)
    )


def mtp_block_spec(config: TransformerConfig, backend: str, vp_stage: int | None = None):
    """The MTP modules (None on stages that hold none); each wraps one M2 layer with dense
    attention."""
    if not config.mtp_num_layers:
        return None
    provider = backend_provider(backend)
    layer = m2_layer_spec(provider, config.num_moe_experts, config.moe_grouped_gemm)
    return get_gpt_mtp_block_spec_for_backend(config, layer, provider, vp_stage=vp_stage)
