"""Process groups: torch.distributed from the launcher's environment, then megatron-core's
model-parallel groups for the configured layout."""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch

from parallel.config import ParallelConfig


@dataclass(frozen=True)
class Layout:
    """Sizes of every parallel dimension of a run."""

    world: int
    tp: int
    pp: int
    cp: int
    ep: int
    etp: int
    dp: int
    """Data-parallel size of the dense part: world / (tp * pp * cp)."""


def layout_for(
    parallel: ParallelConfig,
    world: int,
    *,
    seq_length: int,
    num_layers: int,
    num_attention_heads: int,
    num_query_groups: int,
    num_experts: int,
    moe_ffn_hidden_size: int,
    vocab_size: int,
    cp_block: int | None = None,
) -> Layout:
    """Check the layout against the world size and the model's sizes; raise ValueError naming
    the keys. `cp_block`: keys per MSA block when the model has MSA layers (each context-parallel
    chunk must hold whole blocks), else None."""
    tp, pp, cp, ep, etp = parallel.tp, parallel.pp, parallel.cp, parallel.ep, parallel.expert_tp
    if world % (tp * pp * cp):
        raise ValueError(
            f"world size {world} is not divisible by parallel.tp*parallel.pp*parallel.cp = "
            f"{tp}*{pp}*{cp}: change the layout or the number of processes"
        )
    dp = world // (tp * pp * cp)
    if (dp * cp * tp) % (ep * etp):
        raise ValueError(
            f"parallel.ep*parallel.etp = {ep}*{etp} must divide the {dp * cp * tp} ranks of a pipeline "
            f"stage (dp*cp*tp = {dp}*{cp}*{tp}): lower parallel.ep or parallel.etp"
        )
    if num_attention_heads % tp:
        raise ValueError(f"model.num_attention_heads={num_attention_heads} is not divisible by parallel.tp={tp}")
    if num_query_groups % tp:
        raise ValueError(
            f"model.num_query_groups={num_query_groups} is not divisible by parallel.tp={tp}: "
            "the per-layer QK-norm needs whole KV heads on each rank; lower parallel.tp"
        )
    if num_experts % ep:
        raise ValueError(f"model.num_experts={num_experts} is not divisible by parallel.ep={ep}")
    if ep == 1 and etp != tp:
        # megatron-core marks expert weights for expert-data-parallel reduction only when ep > 1
        # (tensor_parallel/layers.py `allreduce`); otherwise it reduces them over the dense
        # data-parallel group, wrong for experts split differently from the dense layers.
        raise ValueError(
            f"parallel.etp={etp} differs from parallel.tp={tp} with parallel.ep=1: expert gradients "
            "would be reduced like dense ones (wrongly); set parallel.etp=null or parallel.ep > 1"
        )
    if moe_ffn_hidden_size % etp:
        raise ValueError(
            f"model.moe_ffn_hidden_size={moe_ffn_hidden_size} is not divisible by the expert "
            f"tensor parallel size {etp} (parallel.etp, or parallel.tp when etp is null)"
        )
    if vocab_size % tp:
        raise ValueError(f"model.vocab_size={vocab_size} is not divisible by parallel.tp={tp}")
    stages = pp * (parallel.vpp or 1)
    if num_layers % stages:
        raise ValueError(
            f"model.num_layers={num_layers} is not divisible by parallel.pp*parallel.vpp = {stages}"
        )
    if seq_length % (2 * cp if cp > 1 else 1) or (parallel.sequence_parallel and seq_length % tp):
        raise ValueError(
            f"train.seq_length={seq_length} must be divisible by 2*parallel.cp={2 * cp} (context "
            f"parallel chunks) and by parallel.tp={tp} under sequence parallelism"
        )
    if cp > 1 and cp_block is not None and seq_length % (2 * cp * cp_block):
        # model/msa/cp.py: every context-parallel chunk holds whole MSA blocks.
        raise ValueError(
            f"train.seq_length={seq_length} must be divisible by 2*parallel.cp*model.msa.block_size = "
            f"2*{cp}*{cp_block} = {2 * cp * cp_block}, so that no MSA block straddles two context-parallel "
            "ranks: change train.seq_length or parallel.cp"
        )
    return Layout(world=world, tp=tp, pp=pp, cp=cp, ep=ep, etp=etp, dp=dp)


def microbatches_per_step(global_batch: int, micro_batch: int, parallel: ParallelConfig, layout: Layout) -> int:
    """Micro-batches each data-parallel rank runs per step; ValueError naming the keys when the
    global batch does not split, or is too small for the interleaved pipeline schedule."""
    if global_batch % (micro_batch * layout.dp):
        raise ValueError(
            f"train.global_batch_size={global_batch} must be a multiple of "
            f"train.micro_batch_size*dp = {micro_batch}*{layout.dp}"
        )
    count = global_batch // (micro_batch * layout.dp)
    if parallel.vpp and count < layout.pp:
        # megatron's interleaved schedule runs micro-batches in groups of pp per virtual stage
        raise ValueError(
            f"parallel.vpp needs at least parallel.pp={layout.pp} micro-batches per step, "
            f"but train.global_batch_size / (train.micro_batch_size * dp) = {count}: "
            "raise train.global_batch_size or lower train.micro_batch_size"
        )
    return count


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(parallel: ParallelConfig) -> torch.device:
    """Start torch.distributed (torchrun's env:// or a one-process group) and pick the device."""
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    backend = parallel.distributed_backend
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if not torch.distributed.is_initialized():
        if "RANK" not in os.environ:  # plain `python -m pretrain`: a group of one
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        torch.distributed.init_process_group(
            backend=backend, timeout=datetime.timedelta(minutes=30),
            device_id=device if device.type == "cuda" else None,
        )
    return device


def init_model_parallel(parallel: ParallelConfig, seed: int) -> None:
    """megatron-core's groups for the layout, and its per-group RNG streams."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        virtual_pipeline_model_parallel_size=parallel.vpp,
        context_parallel_size=parallel.cp,
        expert_model_parallel_size=parallel.ep,
        expert_tensor_parallel_size=parallel.expert_tp,
        create_gloo_process_groups=False,
    )
    # torch's default generator is the data-parallel stream (the same on every rank);
    # megatron's tracker holds the per-TP-rank and per-EP-rank streams.
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def destroy() -> None:
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
