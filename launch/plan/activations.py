"""What one rank keeps for backward in one micro-batch, and its short-lived buffers.

Saved activations follow, tensor by tensor, what autograd saves for backward in the modules this
project builds (the formulas below; checked against torch's saved-tensor hooks on CPU in
tests/test_plan.py). The plan multiplies them by the micro-batches a 1F1B (or interleaved)
pipeline keeps in flight (`inflight_microbatches`); under full recompute each layer keeps its
input only, plus one layer rebuilt during backward.

Legend: T tokens of a micro-batch on this rank (micro_batch_size * seq_length / cp), Tsp = T / tp
under sequence parallelism, e bytes per activation element, h hidden, Q = heads*d/tp and
K = groups*d/tp widths of q and of k (or v) on this rank, R routed token copies on this rank.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from model.config import ModelConfig

PARTS = ("attention", "msa_index", "moe_routing", "moe_dispatch", "moe_experts", "embedding", "mtp", "logits")
"""The parts saved activations are reported by, in the order they are summed: a layer's
attention block (with MSA: its core) and MSA index branch, its MoE block's routing, dispatched
token copies and experts; the first stage's token ids; the last stage's MTP modules and logits."""


@dataclass(frozen=True)
class Shape:
    """Sizes of one micro-batch on one rank."""

    mbs: int
    s: int
    """Tokens of a sequence on this rank (seq_length / cp)."""
    seq: int
    """Tokens of the whole sequence (keys an index head scores under CP)."""
    tp: int
    sp: bool
    etp: int
    ep: int
    e: int
    """Bytes per activation element (2 bf16, 4 fp32)."""
    backend: str
    cuda: bool
    deterministic: bool
    """torch deterministic algorithms: MoE's combine and routing keep index tensors they otherwise would not."""

    @property
    def T(self) -> int:
        return self.mbs * self.s

    @property
    def Tsp(self) -> float:
        return self.T / self.tp if self.sp else self.T


def _rmsnorm(width: float, tokens: float, x: Shape | None = None) -> float:
    """Our RMSNorm (and LayerQKNorm): on CUDA the Triton kernel (model/norm.py) keeps its input
    and 1/rms; the PyTorch path (CPU, and LayerQKNorm under TP > 1) the fp32 input, the fp32
    normalised value and 1/rms. Pass x (the shape) where the kernel path can run."""
    if x is not None and x.cuda and x.backend == "local":
        return tokens * (x.e * width + 4)
    return tokens * (8 * width + 4)


def _rope_tables(m: ModelConfig, x: Shape, rot: int) -> float:
    """What RoPE keeps for backward, for q and k: on CUDA (model/rope.py's kernel) the fp32
    angles, shared; elsewhere megatron's fp32 cos and sin of each."""
    return (2 if x.cuda and x.backend == "local" else 4) * x.s * rot * 4


def attention_activations(m: ModelConfig, x: Shape, msa: bool) -> dict[str, float]:
    """One layer's attention block: input norm, projections, QK-norm, RoPE tables, core attention
    (`attention`), and in an MSA layer (`msa`) its index branch (`msa_index`). Neither SDPA nor
    flash attention keeps S x S scores: both grow linearly with the sequence."""
    h, d, e, T = m.hidden_size, m.kv_channels, x.e, x.T
    heads, groups = m.num_attention_heads // x.tp, m.num_query_groups // x.tp
    Q, K = heads * d, groups * d
    rot = int(d * m.rotary_percent)
    common = (
        (_rmsnorm(h, x.Tsp, x) if x.backend == "local" else x.Tsp * (e * h + 4))  # TE fuses it into linear_qkv
        + x.Tsp * h * e  # linear_qkv's input (megatron saves the sequence-parallel shard)
        # per-layer QK-norm over all local heads (the kernel only without TP: the sum of
        # squares is all-reduced between its halves)
        + _rmsnorm(Q, T, x if x.tp == 1 else None) + _rmsnorm(K, T, x if x.tp == 1 else None)
        + _rope_tables(m, x, rot)
        + T * Q * e  # linear_proj's input, the attention output
    )
    out = {"attention": common}
    if not msa:
        if x.backend == "local":
            # SDPA (model/attention.py): the rotated q and k, v (a view that keeps the whole
            # qkv projection output alive), its own output and the fp32 log-sum-exp per head.
            out["attention"] += T * (3 * Q + 3 * K) * e + T * heads * 4
        else:
            # flash / cuDNN attention (TE): the rotated q and k, v (a view that keeps the whole
            # qkv projection output alive) and the fp32 log-sum-exp per head.
            out["attention"] += T * (2 * Q + 3 * K) * e + T * heads * 4
        return out
    # MSA core (model/msa). The Triton kernel keeps contiguous copies of q, k, v and its output,
    # fp32 lse per head and int32 block ids; the CPU reference keeps q, k, v (whose parent is the
    # whole qkv projection output), lse and int64 block ids.
    ms = m.msa
    topk, Di = ms.topk, ms.index_head_dim
    if x.cuda:
        out["attention"] += T * (2 * Q + 2 * K) * e + T * heads * 4 + T * groups * topk * 4
    else:
        out["attention"] += T * (2 * Q + 3 * K) * e + T * heads * 4 + T * groups * topk * 8
    # The index branch: its input gathered over the sequence-parallel ranks; the index q/k norms
    # (an fp32 run keeps the whole index-q projection, of all groups, as the norm's input); the
    # RoPE tables; for the indexer loss the rotated index q and k, the argmax key of each
    # selected block (int64), and the KL loss's saved tensors: on CUDA the block scores' int32
    # ids and the KL kernel's fp32 gradient in the scores; the reference's autograd keeps the
    # fp32 log-probabilities and target masses, and masks.
    q_norm = _rmsnorm(groups * Di, T, x)
    if e == 4:
        q_norm += T * (m.num_query_groups - groups) * Di * 4
    index = (
        (T * h * e if x.sp and x.tp > 1 else 0.0)
        + q_norm + _rmsnorm(Di, T, x)
        + _rope_tables(m, x, int(Di * m.rotary_percent))
        + T * (groups * Di + Di) * e
        + (T * groups * topk * (8 + 4 + 4) if x.cuda else T * groups * topk * (8 + 4 + 4 + 2) + T * groups)
    )
    out["msa_index"] = index
    return out


def moe_activations(m: ModelConfig, x: Shape) -> dict[str, float]:
    """One layer's MoE block: pre-MLP norm, router, dispatch, experts (SwiGLU). On the local
    backend with model.moe_grouped_gemm, model/experts.py: its SwiGLU keeps one [R, f] tensor
    less than megatron's MLP, and the grouped GEMMs keep the stacked expert weights."""
    h, e, E, k = m.hidden_size, x.e, m.num_experts, m.moe_router_topk
    f = m.moe_ffn_hidden_size / x.etp
    R = x.Tsp * k * x.etp  # routed copies: balanced all-to-all, then gathered over expert TP
    norm = _rmsnorm(h, x.Tsp, x) if x.backend == "local" else x.Tsp * (e * h + 4)
    routing = (
        norm
        + x.Tsp * h * 4  # router input (the router runs in fp32)
        + x.Tsp * (4 * E + 12 * k + 4)  # sigmoid scores, top-k ids (int64) and weights
        + x.Tsp * (5 * E + 8 * k)  # routing map, probabilities per expert, permutation ids
    )
    dispatch = R * h * e  # the permuted token copies the experts' fc1 reads
    if x.deterministic:
        # the deterministic combine (index_add_) keeps the expert outputs; the router its row ids
        dispatch += R * h * e
        routing += x.Tsp * 8
    # fc1 output (gate|up), the activation's intermediates, fc2's input, the routing weight
    experts = R * (6 * f * e + 4)
    if x.backend == "local" and m.moe_grouped_gemm:
        # model/experts.py: on CUDA the fused SwiGLU x prob keeps only fc1's output and the
        # weight; the stacked expert weights stay alive for the grouped GEMMs' backward
        experts = R * ((3 if x.cuda else 5) * f * e + 4) + 3 * (m.num_experts / x.ep) * f * h * e
    return {"moe_routing": routing, "moe_dispatch": dispatch, "moe_experts": experts}


def selective_recompute(m: ModelConfig, x: Shape, layer: dict[str, float], modules) -> dict[str, float]:
    """A layer's saved activations under train.recompute=selective with `modules`: a rerun
    module keeps its inputs (moe: the MoE block's input; moe_act: the fc1 output; moe_dispatch:
    the MoE block's input instead of the dispatched copies; core_attn: q, k and the qkv output,
    not SDPA's output and log-sum-exp; layernorm: nothing of the two norms, whose inputs are
    kept anyway)."""
    out = dict(layer)
    h, e, heads = m.hidden_size, x.e, m.num_attention_heads / x.tp
    f = m.moe_ffn_hidden_size / x.etp
    R = x.Tsp * m.moe_router_topk * x.etp
    norm = _rmsnorm(h, x.Tsp, x) if x.backend == "local" else x.Tsp * (e * h + 4)
    if "moe" in modules:
        out.update(moe_routing=norm + x.Tsp * h * e, moe_dispatch=0.0, moe_experts=0.0)
    else:
        if "moe_act" in modules:
            weights = 3 * (m.num_experts / x.ep) * f * h * e if x.backend == "local" else 0.0
            out["moe_experts"] = R * (2 * f * e + 4) + weights
        if "moe_dispatch" in modules:  # model/moe.py: R copies dropped, the block's input kept
            out["moe_dispatch"] -= R * h * e - x.Tsp * h * e
    if "core_attn" in modules:
        out["attention"] -= x.T * heads * (m.kv_channels * e + 4)
    if "layernorm" in modules:
        out["attention"] -= norm
        if "moe" not in modules:
            out["moe_routing"] -= norm
    return out


def layer_activations(m: ModelConfig, x: Shape, msa: bool) -> dict[str, float]:
    return {**attention_activations(m, x, msa), **moe_activations(m, x)}


def logits_kept(m: ModelConfig, x: Shape) -> bool:
    """Whether each head's logits are kept from forward to backward: always with
    model.cross_entropy=fused (bf16 logits) or megatron (its fp32 softmax); with chunked only
    when the micro-batch's tokens on this rank fit one chunk (model.loss_chunk_tokens)."""
    return m.cross_entropy != "chunked" or x.T <= m.loss_chunk_tokens


def mtp_module_activations(m: ModelConfig, x: Shape, selective: tuple[str, ...] = ()) -> float:
    """One MTP module without full recompute: its transformer layer (dense attention, MSA with
    model.attention.mtp=msa; megatron builds it from the decoder's spec and config, so selective
    recompute applies to it too), its
    three norms (enorm, hnorm, the final norm) and eh_proj's input [embedding, hidden]."""
    h, e = m.hidden_size, x.e
    layer = layer_activations(m, x, msa=m.mtp_msa())
    if selective:
        layer = selective_recompute(m, x, layer, selective)
    return sum(layer.values()) + 3 * _rmsnorm(h, x.Tsp, x) + x.Tsp * 2 * h * e


def head_activations(m: ModelConfig, x: Shape, selective: tuple[str, ...] = (), full: bool = False) -> dict[str, float]:
    """The last stage's extras for one micro-batch: the MTP modules (under `selective` recompute
    of those modules, or `full` recompute: megatron checkpoints each MTP module's layer too,
    keeping its inputs, the embedding of the shifted tokens and the hidden state, which is the
    previous head's output-layer input, counted there) and the output layer and loss of every
    head (`logits`)."""
    h, e, V = m.hidden_size, x.e, m.vocab_size / x.tp
    heads = 1 + m.mtp_num_layers
    kept = x.Tsp * h * e if full else mtp_module_activations(m, x, selective)
    mtp = m.mtp_num_layers * (kept + x.T * 8)  # + the shifted token ids its embedding keeps
    megatron = m.cross_entropy == "megatron"
    logits = (
        _rmsnorm(h, x.Tsp, x)  # the decoder's final norm
        + heads * x.Tsp * h * e  # the output layer's input, per head
        # per head, cross entropy keeps the logits themselves (fused; chunked when one chunk
        # holds the micro-batch: model/cross_entropy.py) or megatron's fp32 softmax; chunked
        # over several chunks keeps none (recomputed in backward)
        + (heads * x.T * V * (4 if megatron else e) if logits_kept(m, x) else 0.0)
        + heads * x.T * (10 if megatron else 12)  # targets and masks, or targets and log-sum-exp
    )
    return {"mtp": mtp, "logits": logits}


def loss_chunk_buffer(m: ModelConfig, x: Shape) -> Buffer:
    """model.cross_entropy=chunked over several chunks: at the start of backward (the activation
    peak) one chunk's logits are rebuilt and turned into their gradient, the input's gradient
    [T, h] is filled and the weight's accumulated in an fp32 [V, h] buffer (plus each chunk's
    bf16 product; an fp32 run adds in place). The PyTorch path (CPU) also holds two fp32
    temporaries of up to model/cross_entropy.py's ROW_CHUNK_ELEMENTS each (softmax gradient)."""
    from model.cross_entropy import ROW_CHUNK_ELEMENTS

    h, e, V = m.hidden_size, x.e, m.vocab_size / x.tp
    chunk = min(m.loss_chunk_tokens, x.T) * V
    size = chunk * e + V * h * (4 + (e if e < 4 else 0)) + x.T * h * e
    if not x.cuda:
        size += 2 * min(chunk, ROW_CHUNK_ELEMENTS) * 4
    return Buffer("loss_chunk", size, True)


def stage_activations(m: ModelConfig, x: Shape, layers: list[int], first: bool,
                      selective: tuple[str, ...] = ()) -> dict[str, float]:
    """Saved activations of one micro-batch through a stage's decoder `layers` (and the
    embedding's token ids on the first stage), the layers under selective recompute of the
    `selective` modules, by part in `PARTS` order. The last stage's MTP modules and logits are
    `head_activations`."""
    msa_layers = set(m.msa_layers())
    out = Counter()
    for i in layers:
        layer = layer_activations(m, x, i in msa_layers)
        out.update(selective_recompute(m, x, layer, selective) if selective else layer)
    if first:
        out["embedding"] += x.T * 8  # token ids, kept by the embedding's backward
    return {k: out[k] for k in PARTS if k in out}


@dataclass(frozen=True)
class Buffer:
    """A short-lived buffer besides the saved activations."""

    name: str
    bytes: float
    at_peak: bool
    """Whether it can be alive at the activation peak (the end of a micro-batch's forward and
    the start of its backward); the plan adds the largest of those that can."""


def all_to_all_bytes(m: ModelConfig, x: Shape) -> float:
    """The routed copies in the MoE all-to-all's send buffer (also the combine's in backward)."""
    return x.Tsp * m.moe_router_topk * x.etp * m.hidden_size * x.e


def transient_buffers(m: ModelConfig, x: Shape, cp: int, msa: bool, last: bool) -> tuple[Buffer, ...]:
    """The short-lived buffers of a stage (`last`: the one with the logits) of a model with MSA
    layers (`msa`) under context parallelism `cp`."""
    h, e, d = m.hidden_size, x.e, m.kv_channels
    K = m.num_query_groups // x.tp * d
    out = [Buffer("moe_all_to_all", all_to_all_bytes(m, x), True)]
    if last and e < 4 and m.cross_entropy == "megatron":
        # bf16 logits while megatron's cross entropy takes its fp32 copy, and their gradient in
        # backward (ours read them in place and write the gradient over them)
        out.append(Buffer("logits", x.T * m.vocab_size / x.tp * e, True))
    if last and not logits_kept(m, x):
        out.append(loss_chunk_buffer(m, x))
    if cp > 1:
        out.append(Buffer("cp_ring", 2 * 2 * x.T * K * e, True))  # k and v of the visiting shard, double-buffered
        # backward ring (parallel/context_parallel.py): k, v as above plus the fp32 dK/dV
        # accumulator travelling with them, double-buffered
        out.append(Buffer("cp_ring_backward", 2 * 2 * x.T * K * (e + 4), False))
        if msa:
            # every rank scores its queries against the index keys of the whole sequence
            out.append(Buffer("cp_msa_index_keys", x.mbs * x.seq * m.msa.index_head_dim * e, True))
            # the indexer target: fp32 attention mass per selected block and head, merged over the ring
            out.append(Buffer("cp_msa_block_mass", x.T * m.num_attention_heads / x.tp * m.msa.topk * 4, True))
    if msa and not x.cuda:
        from model.msa.reference import CHUNK_ELEMENTS

        # The CPU reference gathers the selected blocks' k and v (and their logits) per chunk of
        # queries, inside the layer; the Triton kernel reads them in place.
        out.append(Buffer("msa_selected_kv", 3 * CHUNK_ELEMENTS * 4, False))
    return tuple(out)


def inflight_microbatches(pp: int, vpp: int | None, microbatches: int, stage: int) -> float:
    """Micro-batches of a stage's layers whose activations are alive at once (1F1B warm-up; with
    vpp, chunk-micro-batches of the interleaved schedule / vpp)."""
    if pp == 1:
        return 1.0
    if not vpp:
        return float(min(microbatches, pp - stage))
    units = min(microbatches * vpp, (pp - stage - 1) * 2 + (vpp - 1) * pp + 1)
    return units / vpp


