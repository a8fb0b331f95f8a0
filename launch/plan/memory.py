"""The plan: what one GPU of each pipeline stage holds, and how long a step takes.

State per parameter on a rank: bf16 weights 2 B, fp32 main grads 4 B (megatron DDP,
grad_reduce_in_fp32), fp32 master weights 4 B + Adam moments 8 B, the last two sharded over data
parallelism by the distributed optimizer (dense parameters over dp*cp, experts over the expert
data-parallel group). fp32 runs (CPU) keep no master copy. FP8 (train.fp8) is not modelled:
weights count at `precision`. Activations are activations.py's, times the micro-batches in
flight; the step time is pretrain/flops.py's FLOPs at `plan.mfu` of the GPU's peak
(pretrain/hardware.py). Precision, backend, determinism and optimizer sharding are what
pretrain/settings.py resolves for the cluster's nodes, as the trainer does for its own.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from launch.compose import batch_problem, checked_layout
from launch.plan.activations import (
    Buffer, Shape, all_to_all_bytes, head_activations, inflight_microbatches, layer_activations,
    mtp_module_activations, selective_recompute, stage_activations, transient_buffers,
)
from launch.plan.params import StageParams, model_parameters, stage_of_layer, stage_parameters
from model.config import ModelConfig
from parallel.setup import Layout
from pretrain.config import ClusterConfig, RunConfig
from pretrain.flops import train_flops_per_token
from pretrain.hardware import CPU, GPUS
from pretrain.settings import Machine, RunSettings, microbatches, resolve

GIB = 1024**3
RECOMPUTE = ("none", "selective", "full")


@dataclass(frozen=True)
class PlanOptions:
    """Planner-only settings, given as plan.<key>=<value> before or among the overrides."""

    mfu: float = 0.4
    """Model FLOPs utilisation the step time is estimated at."""
    recompute: str | None = None
    """Activation recompute that decides `fits`: none, selective (train.recompute_modules) or
    full; null = the run's train.recompute."""
    headroom_gib: float = 8.0
    """Memory per GPU outside torch's allocations: CUDA context, library workspaces and loaded
    kernels, NCCL buffers, fragmentation (7.7 GiB measured on one H200 with Transformer Engine,
    docs/launch.md; 4 GiB planned a 128K case as fitting that ran out of memory)."""

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


@dataclass(frozen=True)
class State:
    """Bytes of the model state on one rank."""

    weights: float
    grads: float
    optimizer: float
    """fp32 master weights (bf16 runs) and Adam moments, over the data-parallel ranks that
    share them."""

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer


@dataclass(frozen=True)
class StagePlan:
    """One GPU of a pipeline stage, in parameters and bytes."""

    stage: int
    layers: int
    """Decoder layers on the stage."""
    inflight: float
    """Micro-batches whose activations are alive at once (`inflight_microbatches`)."""
    params: StageParams
    state: State
    activations: dict[str, float]
    """Saved activations by part (activations.PARTS) without recompute, or with
    train.recompute=selective when that is the plan's recompute."""
    activations_recompute: dict[str, float]
    """The same with full recompute: `layer_inputs`, `rebuilt_layer`, the first stage's
    `embedding`, the last stage's `mtp` and `logits`."""
    transients: tuple[Buffer, ...]
    rebuilt_modules: float = 0.0
    """Selective recompute: what a layer's backward rebuilds beside the saved activations
    (`rebuilt_modules`); the peak holds it or the largest transient, whichever is larger."""

    @property
    def peak_transient(self) -> float:
        """The largest buffer alive at the activation peak."""
        return max((b.bytes for b in self.transients if b.at_peak), default=0.0)

    @property
    def total(self) -> float:
        """State, activations and the peak transient (or the rebuilt modules): the peak of a step
        without full recompute."""
        return self.state.total + sum(self.activations.values()) + max(self.peak_transient, self.rebuilt_modules)

    @property
    def total_recompute(self) -> float:
        """The same with full recompute."""
        return self.state.total + sum(self.activations_recompute.values()) + self.peak_transient


def rebuilt_modules(m: ModelConfig, x: Shape, layers: list[int], last: bool, selective: tuple[str, ...]) -> float:
    """Selective recompute: in a layer's backward its rerun modules are rebuilt (what they would
    have saved) while every earlier layer's saved activations are still alive; a rerun MoE block
    also refills its all-to-all buffer. The largest over the stage's layers and MTP modules (the
    full-recompute counterpart is `rebuilt_layer`)."""
    msa_layers = set(m.msa_layers())
    full = [layer_activations(m, x, i in msa_layers) for i in layers]
    if last and m.mtp_num_layers:
        full.append(layer_activations(m, x, msa=m.mtp_msa()))  # an MTP module's layer
    rebuilt = max((sum(a.values()) - sum(selective_recompute(m, x, a, selective).values()) for a in full),
                  default=0.0)
    if {"moe", "moe_dispatch"} & set(selective):
        rebuilt += all_to_all_bytes(m, x)
    if "moe" in selective and x.cuda and x.backend == "local" and m.moe_grouped_gemm:
        # the fused SwiGLU x prob (model/experts.py) keeps only fc1's output, so its backward
        # writes the gradient of that output [R, 2f] and then of the dispatched copies [R, h]
        # while the rebuilt block is still alive (the PyTorch path frees its intermediates as
        # their gradients appear). Measured on the H200, proxy_1gpu + MSA at 64K: 89.7 GiB
        # peak, 82.9 planned without these two
        R = x.Tsp * m.moe_router_topk * x.etp
        rebuilt += R * (2 * m.moe_ffn_hidden_size / x.etp + m.hidden_size) * x.e
    return rebuilt


@dataclass(frozen=True)
class Plan:
    """Everything the planner reports, in parameters, bytes, FLOPs and seconds."""

    run: RunConfig
    options: PlanOptions
    layout: Layout
    settings: RunSettings
    """Backend, precision, determinism and optimizer sharding on the cluster's nodes."""
    recompute: str
    """The recompute that decides `fits` (plan.recompute, else train.recompute)."""
    microbatches: int
    """Micro-batches per step of each data-parallel rank."""
    dp_dense: int
    """Ranks the distributed optimizer shards dense parameters over (dp * cp)."""
    dp_expert: int
    """Ranks it shards expert parameters over (the expert data-parallel group)."""
    stages: tuple[StagePlan, ...]
    model_params: int
    """Parameters of the whole model."""
    flops_per_token: float
    """Training FLOPs per token (pretrain/flops.py)."""
    tokens_per_step: int
    peak_tflops: float
    """Peak TFLOP/s of one GPU (NaN: unknown, no step time)."""
    capacity_gib: float | None
    """Memory of one GPU; None: unknown, no fit verdict."""
    needs: tuple[str, ...]
    """What the plan assumes that the run as configured does not do."""

    @property
    def worst(self) -> StagePlan:
        """The fullest stage under `recompute`."""
        return max(self.stages, key=self._memory)

    @property
    def memory_gib(self) -> float:
        """GiB per GPU of the fullest stage."""
        return self._memory(self.worst) / GIB

    @property
    def fits(self) -> bool | None:
        """memory_gib + plan.headroom_gib within capacity_gib; None without a capacity."""
        return None if self.capacity_gib is None else self.memory_gib + self.options.headroom_gib <= self.capacity_gib

    @property
    def step_flops(self) -> float:
        return self.flops_per_token * self.tokens_per_step

    @property
    def step_s(self) -> float:
        """Seconds per step at plan.mfu of every GPU's peak; NaN without a peak."""
        if not self.peak_tflops > 0:
            return math.nan
        return self.step_flops / (self.layout.world * self.peak_tflops * 1e12 * self.options.mfu)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.step_s if not math.isnan(self.step_s) else math.nan

    def _memory(self, stage: StagePlan) -> float:
        return stage.total_recompute if self.recompute == "full" else stage.total


def plan(run: RunConfig, options: PlanOptions) -> Plan:
    """The plan of `run` on its cluster (`run.cluster`); ValueError naming the key when the
    layout or the batch sizes cannot run."""
    m, par, c, t = run.model, run.parallel, run.cluster, run.train
    layout = checked_layout(run)
    settings = resolve(run, Machine.of_cluster(c))
    problem = batch_problem(run, layout)
    if problem:
        raise ValueError(problem)
    steps = microbatches(run, layout)
    recompute = options.recompute or t.recompute
    needs = list(settings.notes)
    if recompute != t.recompute:
        needs.append(f"train.recompute={recompute} (the plan assumes it; the run has train.recompute={t.recompute})")
    selective = tuple(t.recompute_modules) if recompute == "selective" else ()
    e = 2 if settings.precision == "bf16" else 4
    dp_dense = layout.dp * layout.cp
    dp_expert = layout.world // (layout.pp * layout.ep * layout.etp)
    shape = Shape(mbs=t.micro_batch_size, s=t.seq_length // layout.cp, seq=t.seq_length, tp=layout.tp,
                  sp=par.sequence_parallel, etp=layout.etp, ep=layout.ep, e=e, backend=settings.backend,
                  cuda=c.gpu != CPU, deterministic=settings.deterministic)
    msa_layers = set(m.msa_layers())
    opt = (4 if e == 2 else 0) + 8  # fp32 master copy (bf16 runs only), Adam m and v
    shards = (dp_dense, dp_expert) if settings.distributed_optimizer else (1, 1)

    stages = []
    for stage in range(layout.pp):
        params = stage_parameters(m, par, stage)
        state = State(weights=params.total * e, grads=params.total * 4,
                      optimizer=params.dense * opt / shards[0] + params.expert * opt / shards[1])
        layers = [i for i in range(m.num_layers) if stage_of_layer(i, m, par) == stage]
        first, last = stage == 0, stage == layout.pp - 1
        inflight = inflight_microbatches(layout.pp, par.vpp, steps, stage)
        body = stage_activations(m, shape, layers, first=first, selective=selective)
        acts = {k: v * inflight for k, v in body.items()}
        # Full recompute: each layer keeps its input; one layer (decoder or MTP) is rebuilt at a
        # time in backward.
        rebuilt = [sum(layer_activations(m, shape, i in msa_layers).values()) for i in layers]
        if last and m.mtp_num_layers:
            rebuilt.append(mtp_module_activations(m, shape))
        recomputed = {"layer_inputs": len(layers) * inflight * shape.Tsp * m.hidden_size * e,
                      "rebuilt_layer": max(rebuilt, default=0.0)}
        if first:
            recomputed["embedding"] = acts["embedding"]
        if last:  # the MTP modules and the logits: one micro-batch
            acts.update(head_activations(m, shape, selective))
            recomputed.update(head_activations(m, shape, full=True))
        stages.append(StagePlan(
            stage=stage, layers=len(layers), inflight=inflight, params=params, state=state, activations=acts,
            activations_recompute=recomputed,
            transients=transient_buffers(m, shape, layout.cp, bool(msa_layers), last),
            rebuilt_modules=rebuilt_modules(m, shape, layers, last, selective) if selective else 0.0,
        ))

    return Plan(
        run=run, options=options, layout=layout, settings=settings, recompute=recompute, microbatches=steps,
        dp_dense=dp_dense, dp_expert=dp_expert, stages=tuple(stages),
        model_params=sum(p.numel for p in model_parameters(m)),
        flops_per_token=train_flops_per_token(m, t.seq_length), tokens_per_step=t.global_batch_size * t.seq_length,
        peak_tflops=gpu_peak_tflops(c), capacity_gib=gpu_memory_gib(c), needs=tuple(needs),
    )


def gpu_peak_tflops(cluster: ClusterConfig) -> float:
    """cluster.peak_tflops, else the dense bf16 peak of cluster.gpu; NaN on cpu."""
    if cluster.peak_tflops is not None:
        return cluster.peak_tflops
    return GPUS[cluster.gpu].peak_bf16_tflops if cluster.gpu in GPUS else math.nan


def gpu_memory_gib(cluster: ClusterConfig) -> float | None:
    """cluster.gpu_memory_gib, else the memory of cluster.gpu; None on cpu."""
    if cluster.gpu_memory_gib is not None:
        return cluster.gpu_memory_gib
    return GPUS[cluster.gpu].memory_gib if cluster.gpu in GPUS else None
