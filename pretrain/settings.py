"""What a run's config resolves to on a machine: module backend, precision, determinism,
optimizer sharding, the checked parallel layout, and megatron's recompute and FP8 fields.

The trainer resolves for the machine it runs on (`Machine.this()`), the launchers and the
planner for the cluster they submit to (`Machine.of_cluster`); both call the functions here, so
what the plan assumes is what training does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from model.config import ModelConfig
from model.specs import te_available
from parallel.setup import Layout, layout_for, microbatches_per_step
from pretrain.config import ClusterConfig, RunConfig, TrainConfig
from pretrain.hardware import CPU


@dataclass(frozen=True)
class Machine:
    """What the nodes of a run have."""

    cuda: bool
    """GPUs."""
    te: bool
    """Transformer Engine's PyTorch modules import."""
    apex_or_te: bool
    """Apex or Transformer Engine: megatron-core's fused optimizer kernels (its distributed
    optimizer needs them, see `resolve`)."""

    @classmethod
    def this(cls) -> Machine:
        """This process's machine."""
        from megatron.core.optimizer import distrib_optimizer

        return cls(cuda=torch.cuda.is_available(), te=te_available(), apex_or_te=distrib_optimizer.HAVE_APEX_OR_TE)

    @classmethod
    def of_cluster(cls, cluster: ClusterConfig) -> Machine:
        """The nodes of `cluster`: GPU nodes are taken to run an NVIDIA PyTorch container
        (Transformer Engine and Apex installed), `cluster.gpu=cpu` nodes to have neither."""
        gpu = cluster.gpu != CPU
        return cls(cuda=gpu, te=gpu, apex_or_te=gpu)


@dataclass(frozen=True)
class RunSettings:
    """The run's config resolved on a machine."""

    backend: str
    """Module backend: te or local."""
    precision: str
    """bf16 or fp32."""
    deterministic: bool
    """torch deterministic algorithms and megatron's deterministic mode."""
    distributed_optimizer: bool
    """Optimizer state sharded over data-parallel ranks (megatron's distributed optimizer)."""
    notes: tuple[str, ...] = ()
    """Settings asked for that this machine does not honour, and why (to be logged)."""

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.precision == "bf16" else torch.float32


def resolve(run: RunConfig, machine: Machine) -> RunSettings:
    """`model.backend`, `train.precision`, `train.deterministic` and `optim.distributed` on
    `machine`; ValueError naming the key when the machine cannot run them."""
    backend = run.model.backend
    if backend == "auto":
        backend = "te" if machine.te else "local"
    elif backend == "te" and not machine.te:
        raise ValueError(
            "model.backend=te but transformer_engine.pytorch does not import: install the `te` "
            "extra (pip install '.[te]') on a CUDA machine, or set model.backend=local"
        )
    t = run.train
    precision = t.precision if t.precision != "auto" else ("bf16" if machine.cuda else "fp32")
    deterministic = t.deterministic if t.deterministic is not None else not machine.cuda
    notes = []
    distributed = run.optim.distributed and machine.cuda
    if distributed and not machine.apex_or_te:
        # megatron/core/optimizer/distrib_optimizer.py DistributedOptimizer.state_dict asserts
        # that the torch Adam state holds exactly one `step`, which fails on the fresh
        # optimizer a resume loads into (seen on an H100, megatron-core 0.16.1).
        distributed = False
        notes.append(
            "optim.distributed=true needs Apex or Transformer Engine with megatron-core 0.16.1 (its "
            "distributed optimizer cannot reload checkpoints without them): using the non-distributed "
            "optimizer (same math, Adam state replicated over data-parallel ranks)"
        )
    return RunSettings(backend, precision, deterministic, distributed, tuple(notes))


def check_layout(run: RunConfig, world: int) -> Layout:
    """The parallel layout of `run` on `world` processes; ValueError naming the keys when it
    cannot run (`microbatches` checks the batch sizes in it)."""
    m = run.model
    msa = bool(m.msa_layers())
    layout = layout_for(
        run.parallel, world, seq_length=run.train.seq_length, num_layers=m.num_layers,
        num_attention_heads=m.num_attention_heads, num_query_groups=m.num_query_groups,
        num_experts=m.num_experts, moe_ffn_hidden_size=m.moe_ffn_hidden_size, vocab_size=m.vocab_size,
        cp_block=m.msa.block_size if msa else None,
    )
    if layout.cp > 1 and msa and m.msa.mode != "sparse":
        raise ValueError(
            f"model.msa.mode={m.msa.mode} with parallel.cp={layout.cp}: the dense warm-up's indexer "
            "target (full attention mass per block) is not context parallel; warm up with "
            "parallel.cp=1, or use model.msa.mode=sparse"
        )
    return layout


def microbatches(run: RunConfig, layout: Layout) -> int:
    """Micro-batches per step of each data-parallel rank; ValueError naming the keys when the
    global batch does not split into them."""
    t = run.train
    return microbatches_per_step(t.global_batch_size, t.micro_batch_size, run.parallel, layout)


def megatron_settings(run: RunConfig, settings: RunSettings, machine: Machine) -> dict:
    """train.recompute* and train.fp8* as megatron TransformerConfig fields, after the checks
    of what Transformer Engine and FP8 cannot run in this layout (`check_te_and_fp8`)."""
    check_te_and_fp8(run, settings)
    return {**recompute_settings(run.train, run.model, machine), **fp8_settings(run.train, settings.backend)}


MODEL_RECOMPUTE_MODULES = ("moe_dispatch",)
"""train.recompute_modules that our specs run (model/moe.py), not megatron's TransformerConfig
(which rejects names it does not know): `model_recompute` hands them to the model builder."""


def model_recompute(train: TrainConfig) -> tuple[str, ...]:
    """The selective recompute modules the model builder applies (model/specs.py)."""
    if train.recompute != "selective":
        return ()
    return tuple(m for m in train.recompute_modules if m in MODEL_RECOMPUTE_MODULES)


def recompute_settings(train: TrainConfig, model: ModelConfig, machine: Machine) -> dict:
    """train.recompute -> megatron's recompute_granularity / method / num_layers / modules.

    selective reruns the named modules in backward: core_attn (SelfAttention checkpoints its
    core attention; MSA layers rebind their index branch output to each rerun, see
    model/msa/layer.py), moe_act (the experts' SwiGLU, output-discarding), moe_dispatch (ours,
    `model_recompute`: the dispatched tokens, output-discarding), layernorm (input and pre-MLP
    norms, output-discarding), moe (the whole MoE block). full keeps each layer's input and
    reruns the layer, MTP layers included."""
    if train.recompute == "none":
        return {}
    if train.recompute == "selective":
        if "moe" in train.recompute_modules and "moe_dispatch" in train.recompute_modules:
            raise ValueError(
                "train.recompute_modules has moe and moe_dispatch: moe already reruns the whole MoE "
                "block, dispatch included; keep one"
            )
        if "moe_act" in train.recompute_modules and not model.moe_grouped_gemm:
            raise ValueError(
                "train.recompute_modules has moe_act, which megatron runs only in grouped experts: "
                "set model.moe_grouped_gemm=true or drop moe_act"
            )
        if "layernorm" in train.recompute_modules and not machine.te:
            raise ValueError(
                "train.recompute_modules has layernorm, which needs Transformer Engine with "
                "megatron-core 0.16.1 (its TransformerLayer builds CheckpointWithoutOutput() whose "
                "default turns on the TE FP8 path): drop layernorm, or use train.recompute=full"
            )
        megatron = [m for m in train.recompute_modules if m not in MODEL_RECOMPUTE_MODULES]
        return dict(recompute_granularity="selective", recompute_modules=megatron)
    if model.mtp_num_layers and train.recompute_num_layers != 1:
        raise ValueError(
            f"train.recompute_num_layers={train.recompute_num_layers}: megatron recomputes MTP "
            "layers one at a time; set it to 1 (or model.mtp_num_layers=0)"
        )
    return dict(recompute_granularity="full", recompute_method="uniform",
                recompute_num_layers=train.recompute_num_layers)


def fp8_settings(train: TrainConfig, backend: str) -> dict:
    """train.fp8* -> megatron's fp8 fields. FP8 runs in Transformer Engine's linear layers and
    grouped experts (megatron's TransformerBlock opens the fp8 autocast per layer or around the
    block); the MSA core attention and its index branch are not TE modules (torch.nn.Linear,
    our kernels), so the autocast does not reach them and they stay bf16, as does SDPA/TE
    attention (fp8_dot_product_attention stays off)."""
    if train.fp8 is None:
        return {}
    if backend != "te":
        raise ValueError(
            f"train.fp8={train.fp8} needs Transformer Engine, but model.backend resolves to "
            f"{backend!r}: install the `te` extra on a CUDA machine and set model.backend=te "
            "(or auto), or set train.fp8=null"
        )
    edge = train.fp8_bf16_edge_layers
    delayed = {}
    if train.fp8_recipe == "delayed":
        # megatron's defaults (history 1, most recent) scale every tensor by the previous step's
        # amax alone; Transformer Engine's own DelayedScaling defaults, 1024 and max, are ours.
        delayed = dict(fp8_amax_history_len=train.fp8_amax_history_len,
                       fp8_amax_compute_algo=train.fp8_amax_compute_algo)
    return dict(
        fp8=train.fp8,
        fp8_recipe=train.fp8_recipe,
        first_last_layers_bf16=edge > 0,
        num_layers_at_start_in_bf16=max(edge, 1),
        num_layers_at_end_in_bf16=max(edge, 1),
        # grouped FP8 GEMMs need each expert's token count padded to the FP8 tile
        moe_router_padding_for_quantization=True,
        **delayed,
    )


# Transformer Engine (transformer_engine/pytorch/utils.py assert_dim_for_fp8_exec): an FP8 GEMM
# input needs its leading dims' product divisible by 8 and its last dim by 16 (weights too).
_FP8_ROWS, _FP8_COLS = 8, 16


def check_te_and_fp8(run: RunConfig, settings: RunSettings) -> None:
    """What Transformer Engine and FP8 cannot run in this run's layout, as a ValueError naming
    the keys, before any process group starts: the FP8 GEMM shapes on each rank (tensor, expert
    and context parallelism split them), the bf16 edge layers per pipeline stage, FP8 with
    megatron's output-discarding recompute, TE's context-parallel attention (cuDNN's fused
    attention only) and TE's attention under train.deterministic."""
    t, m, par = run.train, run.model, run.parallel
    if settings.backend == "te" and settings.deterministic and os.environ.get("NVTE_ALLOW_NONDETERMINISTIC_ALGO") != "0":
        raise ValueError(
            "train.deterministic=true with model.backend=te: Transformer Engine's attention runs "
            "deterministically only with NVTE_ALLOW_NONDETERMINISTIC_ALGO=0 in the environment "
            "(megatron refuses to build it otherwise): export it, or set train.deterministic=false"
        )
    dense_attention = (m.mtp_num_layers > 0 and not m.mtp_msa()) or len(m.msa_layers()) < m.num_layers
    if settings.backend == "te" and par.cp > 1 and dense_attention and os.environ.get("NVTE_FUSED_ATTN") == "0":
        raise ValueError(
            f"parallel.cp={par.cp} with model.backend=te: Transformer Engine's context-parallel "
            "attention (dense layers, MTP) runs only on cuDNN's fused attention, which "
            "NVTE_FUSED_ATTN=0 in the environment turns off: unset it, or set model.backend=local "
            "(our ring attention, parallel/context_parallel.py)"
        )
    if t.fp8 is None:
        return
    per_stage = m.num_layers // par.pp
    edge = t.fp8_bf16_edge_layers
    if edge > per_stage:
        raise ValueError(
            f"train.fp8_bf16_edge_layers={edge} exceeds the decoder layers of a pipeline stage "
            f"(model.num_layers / parallel.pp = {per_stage}): megatron counts them per stage; lower it"
        )
    if edge and 2 * edge >= m.num_layers:
        raise ValueError(
            f"train.fp8_bf16_edge_layers={edge} keeps all {m.num_layers} decoder layers in bf16 "
            "(the first and the last n each): lower it, or set train.fp8=null"
        )
    discarded = sorted({"moe_act", "layernorm"} & set(t.recompute_modules))
    if t.fp8_recipe == "delayed" and t.recompute == "selective" and discarded:
        raise ValueError(
            f"train.fp8_recipe=delayed with train.recompute_modules {discarded}: megatron cannot "
            "recompute these output-discarding modules under delayed scaling; use "
            "train.fp8_recipe=tensorwise or blockwise, or drop them from train.recompute_modules"
        )
    tp, etp, cp = par.tp, par.expert_tp, par.cp
    rows = t.seq_length * t.micro_batch_size // (cp * (tp if par.sequence_parallel else 1))
    if rows % _FP8_ROWS:
        raise ValueError(
            f"train.fp8 with {rows} tokens per rank (train.seq_length*train.micro_batch_size / "
            f"(parallel.cp*parallel.tp under sequence parallelism) = {t.seq_length}*{t.micro_batch_size}/"
            f"({cp}*{tp if par.sequence_parallel else 1})): Transformer Engine's FP8 GEMMs need a "
            f"multiple of {_FP8_ROWS}; change train.seq_length or the layout"
        )
    heads_d = m.num_attention_heads * m.kv_channels
    qkv = (m.num_attention_heads + 2 * m.num_query_groups) * m.kv_channels
    # (GEMM, its input width, its output rows on one rank, the keys that set them)
    gemms = [
        ("linear_qkv", m.hidden_size, qkv // tp, "model.hidden_size, model.num_attention_heads/num_query_groups/kv_channels, parallel.tp"),
        ("linear_proj", heads_d // tp, m.hidden_size, "model.num_attention_heads*model.kv_channels, parallel.tp"),
        ("experts fc1", m.hidden_size, 2 * m.moe_ffn_hidden_size // etp, "model.moe_ffn_hidden_size, parallel.etp"),
        ("experts fc2", m.moe_ffn_hidden_size // etp, m.hidden_size, "model.moe_ffn_hidden_size, parallel.etp"),
    ]
    if m.mtp_num_layers:
        gemms.append(("MTP eh_proj", 2 * m.hidden_size, m.hidden_size // tp, "model.hidden_size, parallel.tp"))
    for name, width, out_rows, keys in gemms:
        if width % _FP8_COLS or out_rows % _FP8_ROWS:
            raise ValueError(
                f"train.fp8: the {name} GEMM is [{out_rows} x {width}] on each rank; Transformer "
                f"Engine's FP8 GEMMs need the width a multiple of {_FP8_COLS} and the rows of "
                f"{_FP8_ROWS}: change {keys}, or set train.fp8=null"
            )

