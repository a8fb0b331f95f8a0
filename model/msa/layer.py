"""MSA inside a megatron-core layer.

`MSASelfAttention` is megatron's GQA `SelfAttention` plus the index branch: the main branch
(projections, per-layer QK-norm, partial RoPE, output projection) is unchanged, and the
`MSACoreAttention` that replaces the dense core attention attends only to the key blocks the
index branch selected. The index branch reads the layer input after the layer's input norm
(RMSNorm), detached from the main graph, so the LM loss never reaches it; it learns from the KL
indexer loss alone, which is attached to the attention output with megatron's aux-loss
autoscaler (scaled like the LM loss per micro-batch).

Where the input norm is fused into `linear_qkv` (Transformer Engine's LayerNormLinear), the
layer's `input_layernorm` is an identity and the attention receives the raw residual stream;
the spec then gives the index branch `FusedInputNorm`, the same norm with linear_qkv's weight,
so that both backends (and transformers' M3) index the post-norm hidden states.

Legend: s sequence, b batch, h query heads, g KV groups, d head dim, i index head dim,
k top-k slots, n key blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from model.attention import causal_attention_with_lse
from model.config import MSAConfig
from model.msa import (
    dense_block_mass,
    dense_block_scores,
    dense_block_valid,
    indexer_kl_loss,
    msa_attention,
    msa_attention_with_mass,
    msa_select,
    msa_select_with_scores,
    selection_recall,
)
from model.norm import RMSNorm, apply_rms_norm
from model.rope import apply_rotary_pos_emb
from model.msa.cp import msa_sparse_context_parallel


class MSAIndexer(MegatronModule):
    """The index branch: one query head per GQA group and one shared key head, each RMS-normed
    (`norm`: RMSNorm, or M3's GemmaRMSNorm) and given the layer's partial RoPE on the same
    leading dims as the main heads (transformers' MiniMaxM3VLIndexer rotates the first rotary
    dims of each index head with the main branch's cos/sin, as here).

    Under tensor parallelism the branch is replicated (it is small: hidden x (g+1) x i) and each
    rank keeps the index heads of its own KV groups. A rank's indexer loss then covers only its
    groups, so every index-branch gradient is partial and is summed over the TP group by
    megatron's finalize_model_grads (the `sequence_parallel` attribute is its flag for "sum this
    replicated parameter's gradient over TP"; sequence parallelism is always on with TP here).
    """

    def __init__(self, config: TransformerConfig, msa: MSAConfig, norm: type = RMSNorm):
        super().__init__(config=config)
        self.groups = config.num_query_groups  # all of them: the branch is replicated over TP
        self.dim = msa.index_head_dim
        device = None if config.use_cpu_initialization or not torch.cuda.is_available() else torch.cuda.current_device()
        self.linear_q = torch.nn.Linear(config.hidden_size, self.groups * self.dim, bias=False, device=device, dtype=config.params_dtype)
        self.linear_k = torch.nn.Linear(config.hidden_size, self.dim, bias=False, device=device, dtype=config.params_dtype)
        if config.perform_initialization:
            for linear in (self.linear_q, self.linear_k):
                config.init_method(linear.weight)
        self.q_norm = norm(config, self.dim, eps=config.layernorm_epsilon)
        self.k_norm = norm(config, self.dim, eps=config.layernorm_epsilon)
        for param in self.parameters():
            setattr(param, "sequence_parallel", config.sequence_parallel)
        tp = parallel_state.get_tensor_model_parallel_world_size()
        local = self.groups // tp
        first = parallel_state.get_tensor_model_parallel_rank() * local
        self.local_groups = slice(first, first + local)

    def forward(self, x_sbh: torch.Tensor, rotary_pos_emb: torch.Tensor | None):
        """x [s, b, hidden] (detached, full sequence) -> index_q [b, s, g_local, i], index_k [b, s, i]."""
        s, b, _ = x_sbh.shape
        q_sbgi = self.linear_q(x_sbh).view(s, b, self.groups, self.dim)[:, :, self.local_groups]
        q_sbgi = self.q_norm(q_sbgi)
        k_sb1i = self.k_norm(self.linear_k(x_sbh).view(s, b, 1, self.dim))
        if rotary_pos_emb is not None:
            q_freqs, k_freqs = rotary_pos_emb if isinstance(rotary_pos_emb, tuple) else (rotary_pos_emb,) * 2
            q_sbgi = apply_rotary_pos_emb(q_sbgi, q_freqs, config=self.config)
            k_sb1i = apply_rotary_pos_emb(k_sb1i, k_freqs, config=self.config)
        return q_sbgi.transpose(0, 1), k_sb1i[:, :, 0].transpose(0, 1)


class FusedInputNorm(torch.nn.Module):
    """The layer's input norm for the index branch where the backend fuses that norm into
    `linear_qkv` (Transformer Engine's LayerNormLinear: the attention then receives the raw
    residual stream): RMSNorm with linear_qkv's own weight and epsilon, in fp32 like the norm
    module of the local backend, `x * (1 + w)` where the norm is zero-centred (M3's Gemma
    norms). The weight is read detached: the index branch learns only from its own loss, and
    the norm weight belongs to the main branch."""

    def forward(self, x_sbh: torch.Tensor, linear_qkv: torch.nn.Module) -> torch.Tensor:
        assert linear_qkv.normalization == "RMSNorm"
        weight = linear_qkv.layer_norm_weight.detach()
        if linear_qkv.zero_centered_gamma:
            weight = 1.0 + weight.float()
        return apply_rms_norm(x_sbh, weight, linear_qkv.eps)


@dataclass
class MSASelfAttentionSubmodules(SelfAttentionSubmodules):
    indexer: ModuleSpec | type | None = None
    index_input: ModuleSpec | type = IdentityOp
    """Called as (attention input, linear_qkv) -> what the index branch reads, the post-norm
    hidden states: IdentityOp where the attention input already is (a separate input_layernorm),
    `FusedInputNorm` where linear_qkv holds the input norm."""


class MSASelfAttention(SelfAttention):
    """GQA self-attention whose core attention is MSA; owns the index branch."""

    def __init__(self, config: TransformerConfig, submodules: MSASelfAttentionSubmodules, layer_number: int, **kwargs):
        super().__init__(config, submodules, layer_number, **kwargs)
        assert isinstance(self.core_attention, MSACoreAttention)
        self.indexer = build_module(submodules.indexer, config=config)
        self.index_input = build_module(submodules.index_input)

    def forward(self, hidden_states, attention_mask, *args, rotary_pos_emb=None, **kwargs):
        # Detached: selection is discrete and the index branch learns only from its KL loss.
        x_sbh = self.index_input(hidden_states.detach(), self.linear_qkv)
        if self.config.sequence_parallel:
            from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

            x_sbh = gather_from_sequence_parallel_region(x_sbh)
        self.core_attention.index = self.indexer(x_sbh, rotary_pos_emb)
        return super().forward(hidden_states, attention_mask, *args, rotary_pos_emb=rotary_pos_emb, **kwargs)

    def _checkpointed_attention_forward(self, query, key, value, attention_mask, rotary_pos_emb=None,
                                        attn_mask_type=None, attention_bias=None, packed_seq_params=None):
        """Selective recompute of the core attention (train.recompute_modules has core_attn).

        megatron's version reruns `self.core_attention` in backward, when `index` has long been
        consumed (and, with several micro-batches in flight, replaced by a later one's): bind
        this call's index branch output to the first run and to the rerun. The first run has
        no grad, so the indexer loss is attached once, by the rerun; its gradient reaches the
        index branch through the bound tensors' graph."""
        index = self.core_attention.index
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type

        def run(q, k, v):
            self.core_attention.index = index
            return self.core_attention(q, k, v, attention_mask, attn_mask_type=mask_type,
                                       attention_bias=attention_bias, packed_seq_params=packed_seq_params)

        return tensor_parallel.checkpoint(run, False, query, key, value)


class MSACoreAttention(MegatronModule):
    """Takes megatron's [s, b, h, d] q/k/v (after QK-norm and RoPE) and the index branch's
    output; returns [s, b, h*d] like megatron's core attentions."""

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type=None,
                 attention_type: str = "self", *, msa: MSAConfig, **kwargs):
        super().__init__(config=config)
        self.msa = msa
        self.layer_number = layer_number
        self.index: tuple[torch.Tensor, torch.Tensor] | None = None
        # Indexer losses since the last `pop_indexer_loss`, summed on the device (a host sync
        # per layer and micro-batch would stall the launch queue mid-forward).
        self._loss_sum: torch.Tensor | float = 0.0
        self._loss_count = 0
        # Evaluation (pretrain/evaluate.py eval.indexer_recall): the full attention mass inside
        # the selected blocks, summed on the device, and the rows it covers.
        self.measure_recall = False
        self._recall_sum: torch.Tensor | float = 0.0
        self._recall_count = 0
        # Under context parallelism the sparse path runs on the CP ring (model/msa/cp.py).
        cp = parallel_state.get_context_parallel_world_size()
        self.cp_group = parallel_state.get_context_parallel_group() if cp > 1 else None

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        assert packed_seq_params is None, "MSA does not support packed sequences"
        index_q, index_k = self.index
        self.index = None
        q_bshd, k_bsgd, v_bsgd = (t.transpose(0, 1) for t in (query, key, value))
        if self.measure_recall and not self.training:
            self._measure_recall(q_bshd, k_bsgd, index_q, index_k)
        m = self.msa
        if m.mode == "sparse" and self.cp_group is not None:
            with_loss = self.training and torch.is_grad_enabled()
            ring_out = msa_sparse_context_parallel(
                q_bshd, k_bsgd, v_bsgd, index_q, index_k, block_size=m.block_size, topk=m.topk,
                local_blocks=m.local_blocks, cp_group=self.cp_group, indexer_loss=with_loss,
            )
            out_bshd = ring_out.out
            if with_loss:
                out_bshd = self._attach_indexer_loss(out_bshd, ring_out.p_main, ring_out.scores, ring_out.blocks >= 0)
        elif m.mode == "sparse" and self.training and torch.is_grad_enabled():
            # the indexer loss's terms from the selection's and the attention's own passes where
            # their Triton kernels run (model/msa/dispatch.py)
            blocks_bgsk, scores = msa_select_with_scores(index_q, index_k, block_size=m.block_size, topk=m.topk,
                                                         local_blocks=m.local_blocks)
            out_bshd, _, p_main = msa_attention_with_mass(q_bshd, k_bsgd, v_bsgd, blocks_bgsk, block_size=m.block_size)
            out_bshd = self._attach_indexer_loss(out_bshd, p_main, scores, blocks_bgsk >= 0)
        elif m.mode == "sparse":
            with torch.no_grad():
                blocks_bgsk = msa_select(index_q, index_k, block_size=m.block_size, topk=m.topk, local_blocks=m.local_blocks)
            out_bshd = msa_attention(q_bshd, k_bsgd, v_bsgd, blocks_bgsk, block_size=m.block_size)
        elif self.training and torch.is_grad_enabled():
            # SDPA's own log-sum-exp (None where no kernel returns it) saves dense_block_mass a pass.
            out_bshd, lse_bsh = causal_attention_with_lse(q_bshd, k_bsgd, v_bsgd)
            p_main = dense_block_mass(q_bshd.detach(), k_bsgd.detach(), block_size=m.block_size, lse=lse_bsh)
            scores = dense_block_scores(index_q, index_k, block_size=m.block_size)
            valid = dense_block_valid(query.shape[0], m.block_size, device=scores.device)
            out_bshd = self._attach_indexer_loss(out_bshd, p_main, scores, valid)
        else:
            out_bshd = _dense_causal_attention(q_bshd, k_bsgd, v_bsgd)
        s, b = query.shape[0], query.shape[1]
        return out_bshd.transpose(0, 1).reshape(s, b, -1)

    def pop_recall(self) -> tuple[torch.Tensor | float, int]:
        """(sum, rows) of the indexer recall measured since the last call (see `selection_recall`)."""
        out = (self._recall_sum, self._recall_count)
        self._recall_sum, self._recall_count = 0.0, 0
        return out

    def _measure_recall(self, q_bshd, k_bsgd, index_q, index_k) -> None:
        m = self.msa
        assert self.cp_group is None, "recall needs the whole sequence's attention (context parallelism splits it)"
        with torch.no_grad():
            p_dense = dense_block_mass(q_bshd, k_bsgd, block_size=m.block_size)
            blocks = msa_select(index_q, index_k, block_size=m.block_size, topk=m.topk, local_blocks=m.local_blocks)
            total, rows = selection_recall(p_dense, blocks, block_size=m.block_size)
        self._recall_sum = total + self._recall_sum
        self._recall_count += rows

    def pop_indexer_loss(self) -> tuple[torch.Tensor | float, int]:
        """(sum, count) of this layer's indexer losses (one per training micro-batch) since the
        last call; the sum stays on the device."""
        out = (self._loss_sum, self._loss_count)
        self._loss_sum, self._loss_count = 0.0, 0
        return out

    def _attach_indexer_loss(self, out, p_main, scores, valid):
        loss = indexer_kl_loss(p_main, scores, valid)  # mean over this rank's groups
        self._loss_sum = loss.detach().float() + self._loss_sum
        self._loss_count += 1
        # The loss's gradient enters backward through the attention output, scaled like the
        # LM loss of this micro-batch (megatron sets the scale per micro-batch). Each TP rank
        # holds 1/tp of the groups and the index gradients are summed over TP: divide by tp so
        # the sum is the gradient of the mean over all groups. Under CP each rank's loss is the
        # mean over its tokens and gradients are averaged over CP, which is already the mean
        # over all tokens; megatron's schedule multiplies the aux-loss scale by cp: undo it.
        tp = parallel_state.get_tensor_model_parallel_world_size()
        cp = parallel_state.get_context_parallel_world_size()
        return MoEAuxLossAutoScaler.apply(out, loss * (self.msa.indexer_loss_coeff / (tp * cp)))


def _dense_causal_attention(q_bshd, k_bsgd, v_bsgd):
    """Full causal GQA attention (dense warm-up) through SDPA, in [b, s, h, d]."""
    groups = k_bsgd.shape[2]
    out = F.scaled_dot_product_attention(
        q_bshd.transpose(1, 2), k_bsgd.transpose(1, 2), v_bsgd.transpose(1, 2),
        is_causal=True, enable_gqa=groups != q_bshd.shape[2],
    )
    return out.transpose(1, 2)
