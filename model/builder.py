"""Build the M2 or M3 model: our configs -> megatron-core TransformerConfig -> GPTModel chunks.

M3's differences from M2 are megatron-core options where megatron computes exactly M3's formula:
the shared expert (`moe_shared_expert_intermediate_size`), the routed scaling
(`moe_router_topk_scaling_factor`, applied to the renormalised weights), dense-MLP layers
(`moe_layer_freq` as a list, `ffn_hidden_size` the dense width), SwiGLU-OAI (`quick_gelu` with
`activation_func_clamp_value` 7 and `glu_linear_offset` 1: min(gate, 7) * sigmoid(1.702 *
min(gate, 7)) * (clamp(up, -7, 7) + 1)), per-head QK-norm (`qk_layernorm`: its gradient is
summed over TP), and Gemma norms for TE's modules (`layernorm_zero_centered_gamma`); model/specs.py
plugs in our modules for the rest.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.config_logger import has_config_logger_enabled
from megatron.core.fusions.fused_bias_geglu import quick_gelu
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer import TransformerConfig

from model.config import SWIGLU_OAI_LIMIT, ModelConfig
from model.cross_entropy import linear_cross_entropy, vocab_parallel_cross_entropy
from model.specs import decoder_block_spec, mtp_block_spec
from parallel.config import ParallelConfig


def transformer_config(
    model: ModelConfig,
    parallel: ParallelConfig,
    *,
    params_dtype: torch.dtype = torch.float32,
    cpu: bool = not torch.cuda.is_available(),
    deterministic: bool = False,
    extra: dict | None = None,
) -> TransformerConfig:
    """The megatron-core config of an M2 or M3 model under a parallel layout; `extra` adds fields
    (the run's recompute and FP8 settings, pretrain/settings.py `megatron_settings`)."""
    bf16 = params_dtype == torch.bfloat16
    oai = model.activation == "swiglu_oai"
    return TransformerConfig(
        # shape
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        kv_channels=model.kv_channels,
        # megatron's MLP sizes its fc2 from ffn_hidden_size: the dense layers' width where there are
        # dense layers (experts and the shared expert take their own)
        ffn_hidden_size=model.dense_ffn_hidden_size if model.dense_mlp_layers else model.moe_ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_epsilon,
        layernorm_zero_centered_gamma=model.norm_style == "gemma",
        gated_linear_unit=True,
        activation_func=quick_gelu if oai else F.silu,
        activation_func_clamp_value=SWIGLU_OAI_LIMIT if oai else None,
        glu_linear_offset=1.0 if oai else 0.0,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model.init_method_std,
        # megatron's flag means per-head norms (M3) whose grads it sums over TP; M2's per-layer
        # LayerQKNorm is plugged in by the spec and its weight is TP-sharded.
        qk_layernorm=model.qk_norm == "per_head",
        # MoE: sigmoid router, expert bias for selection only, renormalised unbiased weights
        num_moe_experts=model.num_experts,
        moe_router_topk=model.moe_router_topk,
        moe_ffn_hidden_size=model.moe_ffn_hidden_size,
        moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        # frozen routers keep their expert bias (model.msa.train_only_indexer)
        moe_router_bias_update_rate=0.0 if model.msa.train_only_indexer else model.moe_router_bias_update_rate,
        moe_router_dtype="fp32",
        moe_router_topk_scaling_factor=(
            None if model.moe_routed_scaling_factor == 1.0 else model.moe_routed_scaling_factor
        ),
        moe_shared_expert_intermediate_size=model.moe_shared_expert_ffn_hidden_size or None,
        moe_layer_freq=[int(i not in model.dense_mlp_layers) for i in range(model.num_layers)] if model.dense_mlp_layers else 1,
        moe_router_load_balancing_type="seq_aux_loss" if model.moe_aux_loss_coeff > 0 else "none",
        moe_aux_loss_coeff=model.moe_aux_loss_coeff,
        moe_token_dispatcher_type="alltoall",
        moe_grouped_gemm=model.moe_grouped_gemm,
        # MTP
        mtp_num_layers=model.mtp_num_layers or None,
        mtp_loss_scaling_factor=model.mtp_loss_scaling_factor,
        # parallel layout
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        virtual_pipeline_model_parallel_size=parallel.vpp,
        expert_model_parallel_size=parallel.ep,
        expert_tensor_parallel_size=parallel.expert_tp,
        context_parallel_size=parallel.cp,
        sequence_parallel=parallel.sequence_parallel,
        # precision
        params_dtype=params_dtype,
        bf16=bf16,
        pipeline_dtype=params_dtype,
        # fused CUDA kernels only where CUDA is
        use_cpu_initialization=cpu,
        gradient_accumulation_fusion=False,
        # megatron's fused softmax is a separately compiled extension (NGC containers have it)
        masked_softmax_fusion=not cpu and importlib.util.find_spec("scaled_masked_softmax_cuda") is not None,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        moe_permute_fusion=False,
        deterministic_mode=deterministic,
        cuda_graph_scope=[],  # upstream default "full" is deprecated and warns
        # Checkpoints key every layer's tensors by its global layer number instead of stacking
        # all layers' copies of one parameter: dense and MSA layers hold different parameters,
        # and a dense checkpoint (an imported M2) must load into a model with MSA layers
        # (megatron-core plans to drop the stacked form: transformer_block.py sharded_state_dict).
        hetereogenous_dist_checkpoint=True,
        **(extra or {}),
    )


class M2Model(GPTModel):
    """megatron-core's GPTModel whose output layer and language-model loss (main and MTP heads)
    are model.cross_entropy's: chunked (default; no [s, b, V] logits when labels are given),
    fused, or megatron's own."""

    def __init__(self, *args, cross_entropy: str, loss_chunk_tokens: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.cross_entropy = cross_entropy
        self.loss_chunk_tokens = loss_chunk_tokens

    def _postprocess(self, hidden_states, input_ids, position_ids, labels, *args, **kwargs):
        """megatron's `_postprocess` (megatron/core/models/gpt/gpt_model.py) unchanged: the MTP
        modules, each depth's rolled labels and loss mask, MTPLossLoggingHelper's per-depth
        values, the MTP loss scaling through MTPLossAutoScaler, the main loss. With
        model.cross_entropy=chunked and labels (training and evaluation), only the output layer
        differs while it runs: each of its calls returns its input and weight (`_OutputLayerInput`)
        instead of logits, and `compute_language_model_loss`, which megatron calls on each
        output straight away, runs the output layer and the loss together, chunk by chunk
        (model/cross_entropy.py `linear_cross_entropy`). Without labels (or in inference, or
        with megatron's config logger, which records the logits) it returns megatron's logits."""
        inference = kwargs.get("inference_context") is not None and not self.training
        if (self.cross_entropy != "chunked" or labels is None or inference or not self.post_process
                or has_config_logger_enabled(self.config)):
            return super()._postprocess(hidden_states, input_ids, position_ids, labels, *args, **kwargs)
        layer = self.output_layer
        assert layer.bias is None and not self.config.defer_embedding_wgrad_compute
        layer.forward = functools.partial(_OutputLayerInput.of, layer)  # this instance, this call only
        try:
            return super()._postprocess(hidden_states, input_ids, position_ids, labels, *args, **kwargs)
        finally:
            del layer.forward  # back to ColumnParallelLinear.forward

    def compute_language_model_loss(self, labels: torch.Tensor, logits) -> torch.Tensor:
        """Per-token loss [b, s] of logits [s, b, V/tp] (or of the output layer's input, under
        model.cross_entropy=chunked) against labels [b, s]."""
        if isinstance(logits, _OutputLayerInput):
            loss_sb = linear_cross_entropy(
                logits.hidden_sbh, logits.weight, labels.transpose(0, 1), tp_group=logits.tp_group,
                sequence_parallel=logits.sequence_parallel, chunk_tokens=self.loss_chunk_tokens)
        elif self.cross_entropy == "megatron":
            return super().compute_language_model_loss(labels, logits)
        else:
            loss_sb = vocab_parallel_cross_entropy(logits, labels.transpose(0, 1), self.pg_collection.tp)
        return loss_sb.transpose(0, 1).contiguous()


@dataclass(frozen=True)
class _OutputLayerInput:
    """What the output layer (a ColumnParallelLinear without bias) would multiply, handed to the
    loss in place of its logits [s, b, V/tp] (see M2Model._postprocess)."""

    hidden_sbh: torch.Tensor
    """Its input: [s, b, h], or this rank's [s/tp, b, h] under sequence parallelism."""
    weight: torch.Tensor
    """[V/tp, h], this rank's vocabulary shard."""
    sequence_parallel: bool
    tp_group: torch.distributed.ProcessGroup | None

    @classmethod
    def of(cls, layer, input_, weight=None, runtime_gather_output=None):
        """ColumnParallelLinear.forward's signature and (output, bias) result."""
        gather = layer.gather_output if runtime_gather_output is None else runtime_gather_output
        assert not gather, "the chunked loss takes vocabulary shards, not gathered logits"
        return cls(input_, layer.weight if weight is None else weight, layer.sequence_parallel, layer.tp_group), None


def build_model(model: ModelConfig, config: TransformerConfig, backend: str,
                recompute: tuple[str, ...] = ()) -> list[GPTModel]:
    """This rank's model chunks: one per virtual pipeline stage (one without VPP). `recompute`:
    the selective recompute modules our specs run (pretrain/settings.py `model_recompute`;
    megatron's own are in `config`). With model.msa.train_only_indexer, every parameter but the
    MSA index branches' is frozen (requires_grad False: DDP and the optimizer leave it out)."""
    vpp = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    stages = list(range(vpp)) if vpp else [None]
    chunks = [
        M2Model(
            cross_entropy=model.cross_entropy,
            loss_chunk_tokens=model.loss_chunk_tokens,
            config=config,
            transformer_layer_spec=decoder_block_spec(config, model, backend, vp_stage=stage, recompute=recompute),
            vocab_size=model.vocab_size,
            max_sequence_length=model.max_position_embeddings,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
            share_embeddings_and_output_weights=False,
            position_embedding_type="rope",
            rotary_percent=model.rotary_percent,
            rotary_base=int(model.rotary_base),
            mtp_block_spec=mtp_block_spec(config, model, backend, vp_stage=stage, recompute=recompute),
            vp_stage=stage,
        )
        for stage in stages
    ]
    if model.msa.train_only_indexer:
        for chunk in chunks:
            for name, param in chunk.named_parameters():
                param.requires_grad_(".self_attention.indexer." in name)
    return chunks
