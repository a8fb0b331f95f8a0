"""`python -m launch.plan [plan.<option>=<value> ...] <the same Hydra overrides as pretrain>`:
what one GPU of a layout holds, and how long a step takes, before asking for the GPUs.

Prints, per GPU of the fullest pipeline stage: parameters, weights, gradients and optimizer state;
activations by part, without recompute (or with train.recompute=selective) and with full
recompute; the largest transient buffer; and FLOPs per step (pretrain/flops.py) with the step
time at `plan.mfu`. The last line is JSON.

Where the numbers come from:
- Parameters: the real model (model/builder.py) built once on the meta device with the layout of
  one process; megatron marks each parameter it splits over tensor parallelism
  (`tensor_model_parallel`, set by its Column/RowParallelLinear and VocabParallelEmbedding, and
  by our LayerQKNorm). A rank holds a TP-marked parameter / tp (expert weights / expert-TP),
  1/ep of the experts, every unmarked parameter whole (norms, router, MSA index branch), and the
  decoder layers of its pipeline stage; the first stage holds the embedding, the last the final
  norm, output layer, MTP modules and, with MTP under pp > 1, its own embedding copy (megatron's
  GPTModel builds one for MTP). `tests/test_plan.py` checks this against real multi-rank builds.
- State: bf16 weights 2 B, fp32 main grads 4 B (megatron DDP, grad_reduce_in_fp32), fp32 master
  weights 4 B + Adam moments 8 B, the last two sharded over data parallelism by the distributed
  optimizer (dense parameters over dp*cp, experts over the expert data-parallel group). fp32
  runs (CPU) keep no master copy. FP8 (train.fp8) is not modelled: weights count at `precision`.
- Activations: what autograd saves for backward in one micro-batch, tensor by tensor, for the
  modules this project builds (formulas below; checked against torch's saved-tensor hooks on CPU
  in tests/test_plan.py), times the micro-batches a 1F1B (or interleaved) pipeline keeps in flight.
  Full recompute keeps each layer's input only, plus one layer rebuilt during backward.

Legend: T tokens of a micro-batch on this rank (micro_batch_size * seq_length / cp), Tsp = T / tp
under sequence parallelism, e bytes per activation element, h hidden, Q = heads*d/tp and
K = groups*d/tp widths of q and of k (or v) on this rank, R routed token copies on this rank.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections import Counter
from dataclasses import dataclass

import torch

from launch.compose import (
    CONFIG_ERRORS, batch_problem, checked_layout, compose_run, config_error, split_flags,
)
from model.config import ModelConfig
from parallel.config import ParallelConfig
from pretrain.config import RunConfig
from pretrain.flops import train_flops_per_token
from pretrain.hardware import GPUS
from pretrain.settings import Machine, resolve

GIB = 1024**3
RECOMPUTE = ("none", "selective", "full")

def gpu_memory_gib(cluster) -> float | None:
    """cluster.gpu_memory_gib, else the size of cluster.gpu; None when unknown (cpu)."""
    if cluster.gpu_memory_gib is not None:
        return cluster.gpu_memory_gib
    return GPUS[cluster.gpu].memory_gib if cluster.gpu in GPUS else None


@dataclass
class PlanOptions:
    """Planner-only settings, given as plan.<key>=<value> before or among the overrides."""

    mfu: float = 0.4
    """Model FLOPs utilisation the step time is estimated at."""
    recompute: str | None = None
    """Activation recompute that decides `fits`: none, selective (train.recompute_modules) or
    full; null = the run's train.recompute."""
    headroom_gib: float = 4.0
    """Memory per GPU outside torch's allocations: CUDA context, NCCL buffers, fragmentation."""

    def __post_init__(self):
        if not 0 < self.mfu <= 1:
            raise ValueError(f"plan.mfu={self.mfu} must be in (0, 1]")
        if self.recompute is not None and self.recompute not in RECOMPUTE:
            raise ValueError(f"plan.recompute={self.recompute!r}: choose one of {RECOMPUTE}")
        if self.headroom_gib < 0:
            raise ValueError(f"plan.headroom_gib={self.headroom_gib} must be >= 0")

    @classmethod
    def from_flags(cls, flags: dict[str, str]) -> PlanOptions:
        fields = {f.name: f.type for f in dataclasses.fields(cls)}
        unknown = sorted(set(flags) - set(fields))
        if unknown:
            raise ValueError(f"unknown planner options {['plan.' + k for k in unknown]}: choose from "
                             f"{['plan.' + k for k in fields]}")
        values = {}
        for key, raw in flags.items():
            try:
                values[key] = float(raw) if fields[key] == "float" else raw
            except ValueError:
                raise ValueError(f"plan.{key}={raw!r} is not a number") from None
        return cls(**values)


# ---- parameters ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Param:
    """One parameter of the whole model (tp = pp = ep = 1) and how megatron splits it."""

    name: str
    numel: int
    part: str
    """model.describe's bucket (embedding, attention, experts, ...)."""
    tp_split: bool
    """megatron's `tensor_model_parallel`: split over TP (expert weights: over expert TP)."""
    expert: bool
    """A routed expert's weight: 1/ep of them per rank."""
    layer: int | None
    """Decoder layer index (0-based), None outside the decoder layers."""


_PARAMS: dict[str, tuple[Param, ...]] = {}


def model_parameters(model: ModelConfig) -> tuple[Param, ...]:
    """Every parameter of GPTModel built by model/builder.py on the meta device (no memory);
    cached per model config."""
    key = repr(model)
    if key not in _PARAMS:
        _PARAMS[key] = _build_parameters(model)
    return _PARAMS[key]


def _build_parameters(model: ModelConfig) -> tuple[Param, ...]:
    from megatron.core import parallel_state

    from model.builder import build_model, transformer_config
    from model.describe import part_of
    from parallel import setup

    parallel = ParallelConfig(distributed_backend="gloo")
    owns_group = not torch.distributed.is_initialized()
    if owns_group:
        setup.init_distributed(parallel)
    owns_state = not parallel_state.model_parallel_is_initialized()
    if owns_state:
        setup.init_model_parallel(parallel, seed=0)
    try:
        # perform_initialization stays on: megatron's init is what marks the TP-split weights,
        # and on the meta device it allocates and computes nothing.
        config = transformer_config(model, parallel, cpu=True)
        with torch.device("meta"):
            (gpt,) = build_model(model, config, backend="local")
    finally:
        if owns_state and not owns_group:
            parallel_state.destroy_model_parallel()
        if owns_group:
            setup.destroy()
    params = []
    for name, p in gpt.named_parameters():
        layer = int(name.split(".")[2]) if name.startswith("decoder.layers.") else None
        params.append(Param(name, p.numel(), part_of(name), bool(getattr(p, "tensor_model_parallel", False)),
                            ".mlp.experts." in name, layer))
    return tuple(params)


def stage_of_layer(layer: int, model: ModelConfig, parallel: ParallelConfig) -> int:
    """Pipeline stage holding decoder layer `layer` (megatron's even split, interleaved with vpp)."""
    chunks = parallel.pp * (parallel.vpp or 1)
    return (layer // (model.num_layers // chunks)) % parallel.pp


def on_stage(p: Param, stage: int, model: ModelConfig, parallel: ParallelConfig) -> bool:
    last = parallel.pp - 1
    if p.layer is not None:
        return stage_of_layer(p.layer, model, parallel) == stage
    if p.name.startswith("embedding."):
        return stage == 0 or (stage == last and model.mtp_num_layers > 0)
    return stage == last  # final norm, output layer, MTP modules


def rank_numel(p: Param, parallel: ParallelConfig) -> float:
    """Elements of `p` on one rank that holds it."""
    if p.expert:
        return p.numel / parallel.ep / (parallel.expert_tp if p.tp_split else 1)
    return p.numel / parallel.tp if p.tp_split else p.numel


def stage_parameters(model: ModelConfig, parallel: ParallelConfig, stage: int) -> dict[str, float]:
    """Parameters on one rank of `stage`: by model.describe part, plus `dense` and `expert` totals."""
    out = Counter()
    for p in model_parameters(model):
        if on_stage(p, stage, model, parallel):
            n = rank_numel(p, parallel)
            out[p.part] += n
            out["expert" if p.expert else "dense"] += n
    return dict(out)


# ---- activations --------------------------------------------------------------------------


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
    """One layer's attention block: input norm, projections, QK-norm, RoPE tables, core attention."""
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
    out = {"attention": common, "attention_scores": 0.0, "msa_index": 0.0}
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
    # selected block (int64), the fp32 log-probabilities and target masses, and masks.
    q_norm = _rmsnorm(groups * Di, T, x)
    if e == 4:
        q_norm += T * (m.num_query_groups - groups) * Di * 4
    index = (
        (T * h * e if x.sp and x.tp > 1 else 0.0)
        + q_norm + _rmsnorm(Di, T, x)
        + _rope_tables(m, x, int(Di * m.rotary_percent))
        + T * (groups * Di + Di) * e
        + T * groups * topk * (8 + 4 + 4 + 2) + T * groups
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
    module keeps its inputs (moe: the MoE block's input; moe_act: the fc1 output; core_attn:
    q, k and the qkv output, not SDPA's output and log-sum-exp; layernorm: nothing of the two
    norms, whose inputs are kept anyway)."""
    out = dict(layer)
    h, e, heads = m.hidden_size, x.e, m.num_attention_heads / x.tp
    f = m.moe_ffn_hidden_size / x.etp
    R = x.Tsp * m.moe_router_topk * x.etp
    norm = _rmsnorm(h, x.Tsp, x) if x.backend == "local" else x.Tsp * (e * h + 4)
    if "moe" in modules:
        out.update(moe_routing=norm + x.Tsp * h * e, moe_dispatch=0.0, moe_experts=0.0)
    elif "moe_act" in modules:
        weights = 3 * (m.num_experts / x.ep) * f * h * e if x.backend == "local" else 0.0
        out["moe_experts"] = R * (2 * f * e + 4) + weights
    if "core_attn" in modules:
        out["attention"] -= x.T * heads * (m.kv_channels * e + 4)
    if "layernorm" in modules:
        out["attention"] -= norm
        if "moe" not in modules:
            out["moe_routing"] -= norm
    return out


def layer_activations(m: ModelConfig, x: Shape, msa: bool) -> dict[str, float]:
    return {**attention_activations(m, x, msa), **moe_activations(m, x)}


def head_activations(m: ModelConfig, x: Shape) -> dict[str, float]:
    """The last stage's extras for one micro-batch: the MTP modules and all the logits."""
    h, e, V = m.hidden_size, x.e, m.vocab_size / x.tp
    heads = 1 + m.mtp_num_layers
    mtp_layer = layer_activations(m, x, msa=False)  # MTP modules keep dense attention
    mtp = m.mtp_num_layers * (
        sum(mtp_layer.values())
        + 3 * _rmsnorm(h, x.Tsp, x)  # enorm, hnorm, the module's final norm
        + x.Tsp * 2 * h * e  # eh_proj's input, [embedding, hidden]
        + x.T * 8  # the shifted token ids its embedding keeps
    )
    fused = m.cross_entropy == "fused"
    logits = (
        _rmsnorm(h, x.Tsp, x)  # the decoder's final norm
        + heads * x.Tsp * h * e  # the output layer's input, per head
        # per head, cross entropy keeps the logits themselves (fused, model/cross_entropy.py)
        # or megatron's fp32 softmax
        + heads * x.T * V * (e if fused else 4)
        + heads * x.T * (12 if fused else 10)  # targets and log-sum-exp, or targets and masks
    )
    return {"mtp": mtp, "logits": logits}


def stage_activations(m: ModelConfig, x: Shape, layers: list[int], first: bool, last: bool,
                      selective: tuple[str, ...] = ()) -> dict[str, float]:
    """Saved activations of one micro-batch through a stage's decoder `layers` (and the
    embedding's token ids on the first stage, the MTP modules and logits on the last), the
    layers under selective recompute of the `selective` modules."""
    msa_layers = set(m.msa_layers())
    out = Counter()
    for i in layers:
        layer = layer_activations(m, x, i in msa_layers)
        out.update(selective_recompute(m, x, layer, selective) if selective else layer)
    if first:
        out["embedding"] += x.T * 8  # token ids, kept by the embedding's backward
    if last:
        out.update(head_activations(m, x))
    return dict(out)


def transient_bytes(m: ModelConfig, x: Shape, cp: int, msa: bool, last: bool) -> dict[str, tuple[float, bool]]:
    """Short-lived buffers besides the saved activations: name -> (bytes, whether it can be
    alive at the activation peak, the end of a micro-batch's forward and the start of its
    backward). The plan adds the largest of those that can."""
    h, e, d = m.hidden_size, x.e, m.kv_channels
    K = m.num_query_groups // x.tp * d
    out = {
        # the routed copies in the all-to-all's send buffer (also the combine's in backward)
        "moe_all_to_all": (x.Tsp * m.moe_router_topk * x.etp * h * e, True),
    }
    if last and e < 4 and m.cross_entropy != "fused":
        # bf16 logits while megatron's cross entropy takes its fp32 copy, and their gradient in
        # backward (the fused one reads them in place and writes the gradient over them)
        out["logits"] = (x.T * m.vocab_size / x.tp * e, True)
    if cp > 1:
        out["cp_ring"] = (2 * 2 * x.T * K * e, True)  # k and v of the visiting shard, double-buffered
        # backward ring (parallel/context_parallel.py): k, v as above plus the fp32 dK/dV
        # accumulator travelling with them, double-buffered
        out["cp_ring_backward"] = (2 * 2 * x.T * K * (e + 4), False)
        if msa:
            # every rank scores its queries against the index keys of the whole sequence
            out["cp_msa_index_keys"] = (x.mbs * x.seq * m.msa.index_head_dim * e, True)
            # the indexer target: fp32 attention mass per selected block and head, merged over the ring
            out["cp_msa_block_mass"] = (x.T * m.num_attention_heads / x.tp * m.msa.topk * 4, True)
    if msa and not x.cuda:
        from model.msa.reference import CHUNK_ELEMENTS

        # The CPU reference gathers the selected blocks' k and v (and their logits) per chunk of
        # queries, inside the layer; the Triton kernel reads them in place.
        out["msa_selected_kv"] = (3 * CHUNK_ELEMENTS * 4, False)
    return out


def inflight_microbatches(pp: int, vpp: int | None, microbatches: int, stage: int) -> float:
    """Micro-batches of a stage's layers whose activations are alive at once (1F1B warm-up; with
    vpp, chunk-micro-batches of the interleaved schedule / vpp)."""
    if pp == 1:
        return 1.0
    if not vpp:
        return float(min(microbatches, pp - stage))
    units = min(microbatches * vpp, (pp - stage - 1) * 2 + (vpp - 1) * pp + 1)
    return units / vpp


# ---- the plan -----------------------------------------------------------------------------


def plan(run: RunConfig, options: PlanOptions) -> dict:
    """Everything the planner reports, in bytes, FLOPs and seconds."""
    m, par, c, t = run.model, run.parallel, run.cluster, run.train
    layout, needs = checked_layout(run), []
    settings = resolve(run, Machine.of_cluster(c))
    problem = batch_problem(run, layout)
    if problem:
        raise ValueError(problem)
    recompute = options.recompute or t.recompute
    if recompute != t.recompute:
        needs.append(f"train.recompute={recompute} (the plan assumes it; the run has train.recompute={t.recompute})")
    selective = tuple(t.recompute_modules) if recompute == "selective" else ()
    cpu = c.gpu == "cpu"
    precision, backend, distributed = settings.precision, settings.backend, settings.distributed_optimizer
    e = 2 if precision == "bf16" else 4
    dp_dense = layout.dp * layout.cp
    dp_expert = layout.world // (layout.pp * layout.ep * layout.etp)
    microbatches = t.global_batch_size // (t.micro_batch_size * layout.dp)
    deterministic = settings.deterministic
    shape = Shape(mbs=t.micro_batch_size, s=t.seq_length // layout.cp, seq=t.seq_length, tp=layout.tp,
                  sp=par.sequence_parallel, etp=layout.etp, ep=layout.ep, e=e, backend=backend, cuda=not cpu,
                  deterministic=deterministic)
    msa_layers = set(m.msa_layers())

    stages = []
    for stage in range(layout.pp):
        params = stage_parameters(m, par, stage)
        dense, expert = params.get("dense", 0.0), params.get("expert", 0.0)
        opt = (4 if e == 2 else 0) + 8  # fp32 master copy (bf16 runs only), Adam m and v
        state = {
            "weights": (dense + expert) * e,
            "grads": (dense + expert) * 4,
            "optimizer": dense * opt / (dp_dense if distributed else 1)
            + expert * opt / (dp_expert if distributed else 1),
        }
        layers = [i for i in range(m.num_layers) if stage_of_layer(i, m, par) == stage]
        last = stage == layout.pp - 1
        inflight = inflight_microbatches(layout.pp, par.vpp, microbatches, stage)
        body = stage_activations(m, shape, layers, first=stage == 0, last=False, selective=selective)
        acts = {k: v * inflight for k, v in body.items()}
        # Full recompute: each layer keeps its input; one layer is rebuilt at a time in backward.
        largest = max((sum(layer_activations(m, shape, i in msa_layers).values()) for i in layers), default=0.0)
        recomputed = {"layer_inputs": len(layers) * inflight * shape.Tsp * m.hidden_size * e,
                      "rebuilt_layer": largest, "embedding": acts.get("embedding", 0.0)}
        if last:  # the MTP modules and the logits: one micro-batch, not recomputed
            head = head_activations(m, shape)
            acts.update(head)
            recomputed.update(head)
        transient = transient_bytes(m, shape, layout.cp, bool(msa_layers), last)
        peak_transient = max((b for b, at_peak in transient.values() if at_peak), default=0.0)
        total = sum(state.values()) + sum(acts.values()) + peak_transient
        total_rc = sum(state.values()) + sum(recomputed.values()) + peak_transient
        stages.append(dict(stage=stage, layers=len(layers), params=params, state=state, activations=acts,
                           activations_recompute=recomputed, transient=transient, inflight=inflight,
                           total=total, total_recompute=total_rc))
    worst = max(stages, key=lambda s: s["total_recompute" if recompute == "full" else "total"])

    flops_per_token = train_flops_per_token(m, t.seq_length)
    tokens_per_step = t.global_batch_size * t.seq_length
    step_flops = flops_per_token * tokens_per_step
    peak = c.peak_tflops if c.peak_tflops is not None else (GPUS[c.gpu].peak_bf16_tflops if not cpu else math.nan)
    step_s = step_flops / (layout.world * peak * 1e12 * options.mfu) if peak and peak > 0 else math.nan
    chosen = worst["total_recompute" if recompute == "full" else "total"]
    capacity = gpu_memory_gib(c)
    memory_gib = chosen / GIB
    return dict(
        layout=layout, needs=needs, precision=precision, backend=backend, distributed=distributed, recompute=recompute,
        dp_dense=dp_dense, dp_expert=dp_expert, microbatches=microbatches, stages=stages, worst=worst,
        flops_per_token=flops_per_token, step_flops=step_flops, step_s=step_s, peak_tflops=peak,
        capacity_gib=capacity, memory_gib=memory_gib,
        fits=None if capacity is None else memory_gib + options.headroom_gib <= capacity,
        tokens_per_s=tokens_per_step / step_s if step_s == step_s else math.nan,
    )


def _count(n: float) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def report(run: RunConfig, options: PlanOptions, p: dict) -> str:
    m, c, t, lay = run.model, run.cluster, run.train, p["layout"]
    w = p["worst"]
    total_params = sum(x.numel for x in model_parameters(m))
    g = lambda b: f"{b / GIB:9.2f} GiB"  # noqa: E731
    lines = [
        f"model {m.name}: {_count(total_params)} parameters; {lay.world} GPUs = {c.nodes} nodes x "
        f"{c.gpus_per_node} {c.gpu} ({'?' if p['capacity_gib'] is None else p['capacity_gib']} GiB each)",
        f"layout tp={lay.tp} pp={lay.pp}{f' vpp={run.parallel.vpp}' if run.parallel.vpp else ''} cp={lay.cp} "
        f"ep={lay.ep} etp={lay.etp} dp={lay.dp}; sequence parallel {run.parallel.sequence_parallel}; "
        f"{p['backend']} backend ({'TE fused attention' if p['backend'] == 'te' else 'SDPA attention, grouped experts'})",
        f"seq {t.seq_length}, micro-batch {t.micro_batch_size}, global batch {t.global_batch_size} "
        f"({p['microbatches']} micro-batches per data-parallel rank); {p['precision']}; "
        f"{'distributed' if p['distributed'] else 'replicated'} optimizer (dense over dp*cp={p['dp_dense']}, "
        f"experts over {p['dp_expert']})",
        "",
        f"per GPU, pipeline stage {w['stage']} of {lay.pp} ({w['layers']} layers, "
        f"{w['inflight']:g} micro-batches in flight):",
        f"  parameters      {_count(w['params'].get('dense', 0)):>9} dense + {_count(w['params'].get('expert', 0))} experts",
    ]
    lines += [f"  {k:<16}{g(v)}" for k, v in w["state"].items()]
    first = "selective" if p["recompute"] == "selective" else "no recompute"
    lines.append(f"  activations       {first:>13}   full recompute")
    rc = w["activations_recompute"]
    for k in sorted(set(w["activations"]) | set(rc), key=lambda k: -max(w["activations"].get(k, 0), rc.get(k, 0))):
        a, b = w["activations"].get(k), rc.get(k)
        lines.append(f"    {k:<16}{g(a) if a is not None else ' ' * 13}   {g(b) if b is not None else ''}")
    at_peak = {k: b for k, (b, on) in w["transient"].items() if on}
    if at_peak:
        k = max(at_peak, key=at_peak.get)
        lines.append(f"  transient: {k:<13}{g(at_peak[k])}   (the largest buffer alive at the activation peak)")
    for k, (b, on) in w["transient"].items():
        if not on:
            lines.append(f"  (inside a layer, not at the peak: {k} {b / GIB:.2f} GiB)")
    lines.append(f"  total           {g(w['total'])}   {g(w['total_recompute'])}")
    if p["fits"] is not None:
        lines.append(f"  + headroom {options.headroom_gib:g} GiB vs {p['capacity_gib']} GiB: "
                     f"{'fits' if p['fits'] else 'does NOT fit'} (recompute={p['recompute']})")
    lines += [
        "",
        f"step: {p['flops_per_token'] / 1e9:.3g} GFLOP/token x {t.global_batch_size * t.seq_length:,} tokens = "
        f"{p['step_flops'] / 1e15:.3g} PFLOP; "
        + (f"at MFU {options.mfu:g} of {p['peak_tflops']:g} TFLOP/s x {lay.world}: {p['step_s']:.2f} s/step, "
           f"{p['tokens_per_s']:,.0f} tokens/s" if p["step_s"] == p["step_s"]
           else f"no peak FLOP/s for {c.gpu}: set cluster.peak_tflops for a step time"),
        f"FP8: not modelled (train.fp8={t.fp8}); weights and activations counted in {p['precision']}.",
        *(f"needs: {n}" for n in p["needs"]),
    ]
    return "\n".join(lines)


def summary(run: RunConfig, options: PlanOptions, p: dict) -> dict:
    w, lay = p["worst"], p["layout"]
    return {
        "gpus": lay.world,
        "memory_gib_per_gpu": round(p["memory_gib"], 3),
        "fits": p["fits"],
        "tokens_per_s_estimate": round(p["tokens_per_s"], 1) if p["tokens_per_s"] == p["tokens_per_s"] else None,
        "step_time_s_estimate": round(p["step_s"], 4) if p["step_s"] == p["step_s"] else None,
        "recompute": p["recompute"],
        "memory_gib_per_gpu_no_recompute": round(w["total"] / GIB, 3),
        "memory_gib_per_gpu_full_recompute": round(w["total_recompute"] / GIB, 3),
        "gpu": run.cluster.gpu,
        "gpu_memory_gib": p["capacity_gib"],
        "layout": {k: getattr(lay, k) for k in ("tp", "pp", "cp", "ep", "etp", "dp")},
        "worst_stage": w["stage"],
        "params_per_gpu": round(w["params"].get("dense", 0) + w["params"].get("expert", 0)),
        "train_flops_per_token": p["flops_per_token"],
        "needs": p["needs"],
    }


def main(argv: list[str]) -> int:
    from parallel import patches

    patches.apply()  # the parameter count builds the model (on the meta device)
    try:
        flags, overrides = split_flags(argv, "plan")
        options = PlanOptions.from_flags(flags)
        run = compose_run(overrides)
        p = plan(run, options)
    except CONFIG_ERRORS as e:
        print(config_error(e), file=sys.stderr)
        return 2
    print(report(run, options, p))
    print(json.dumps(summary(run, options, p)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
