"""What launch.plan predicts, measured on this machine: one process trains a config with the real
Trainer and reports the bytes of its weights, gradients and optimizer state (every tensor, by
storage), the activations autograd saved for backward (saved-tensor hooks), and the peak memory
of a training step (CUDA: torch.cuda.max_memory_allocated; CPU: torch's allocator events recorded
by the profiler, replayed in order).

    python -m launch.measure <the same Hydra overrides as pretrain>          # one process
    torchrun --nproc-per-node 2 -m launch.measure parallel.tp=2 ...          # one record per rank

Prints one JSON list, a record per rank (rank, pipeline stage, parameters, bytes). The global
batch must be one micro-batch per data-parallel rank, so that the saved activations of a step
are those of one micro-batch. tests/test_plan.py compares this with the plan of small configs
on CPU; bench/plan_vs_measured.py does it on a GPU.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

from launch.compose import compose_run

GIB = 1024**3


def _storage(t: torch.Tensor) -> tuple[int, int]:
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


def state_bytes(trainer) -> dict[str, int]:
    """Bytes of the model's weights, its gradient buffers and the optimizer's own tensors
    (fp32 master copies, Adam moments), each storage counted once."""
    seen: set[int] = set()

    def total(tensors) -> int:
        n = 0
        for t in tensors:
            ptr, size = _storage(t)
            if ptr not in seen:
                seen.add(ptr)
                n += size
        return n

    chunks = trainer.model
    weights = total(p for c in chunks for p in c.parameters())
    grads = total(b.grad_data for c in chunks for b in c.buffers + c.expert_parallel_buffers)
    optimizer_tensors = []
    for opt in getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer]):
        inner = opt.optimizer
        optimizer_tensors += [p for group in inner.param_groups for p in group["params"]]
        optimizer_tensors += [v for state in inner.state.values() for v in state.values()
                              if isinstance(v, torch.Tensor) and v.numel() > 1]
    return {"weights": weights, "grads": grads, "optimizer": total(optimizer_tensors)}


@contextmanager
def saved_tensor_meter(exclude: set[int]):
    """Counts the bytes of every storage autograd saves for backward during the forward pass, once
    each, except those in `exclude` (parameters, buffers). Yields a dict whose "bytes" is filled in.

    What backward itself saves (a recomputed layer, a context-parallel ring step rebuilt to take
    its gradients) is transient, planned as a buffer, not an activation: it is freed step by step,
    its addresses are reused, and counting it made the total depend on the allocator."""
    seen, result = set(exclude), {"bytes": 0}

    def pack(t: torch.Tensor):
        if torch._C._current_graph_task_id() != -1:  # inside backward
            return t
        ptr, size = _storage(t)
        if ptr not in seen:
            seen.add(ptr)
            result["bytes"] += size
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield result


@contextmanager
def cpu_peak_meter():
    """Peak of the bytes allocated by torch on CPU (above what was live before), from the
    profiler's memory events: each op's own allocations at its start, frees in order."""
    from torch.profiler import ProfilerActivity, profile

    result = {"peak": 0}
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        yield result
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    result["peak"] = peak


def measure(overrides: list[str]) -> list[dict]:
    from megatron.core import parallel_state

    from parallel import setup
    from pretrain.trainer import Trainer

    run = compose_run(overrides)
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(run, Path(run_dir), resolved_config={})
        if trainer.num_microbatches != 1:
            raise ValueError(
                f"train.global_batch_size={run.train.global_batch_size} must be train.micro_batch_size * dp "
                f"= {run.train.micro_batch_size * trainer.layout.dp}: one micro-batch per step, so that the "
                "step's saved activations are one micro-batch's"
            )
        trainer.train_step()  # the first step creates the optimizer state
        state = state_bytes(trainer)
        exclude = {_storage(p)[0] for c in trainer.model for p in c.parameters()}
        exclude |= {_storage(b)[0] for c in trainer.model for b in c.module.buffers()}
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            with saved_tensor_meter(exclude) as saved:
                trainer.train_step()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            with cpu_peak_meter() as meter, saved_tensor_meter(exclude) as saved:
                trainer.train_step()
            peak = sum(state.values()) + meter["peak"]
        trainer.monitor.close(exit_code=0)
        record = {
            "rank": torch.distributed.get_rank(),
            "stage": parallel_state.get_pipeline_model_parallel_rank(),
            "device": trainer.device.type,
            "params": sum(p.numel() for c in trainer.model for p in c.parameters()),
            **state,
            "activations": saved["bytes"],
            "peak": peak,
        }
        records = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(records, record)
    setup.destroy()
    return records


def main(argv: list[str]) -> int:
    from parallel import patches

    patches.apply()
    records = measure(argv)
    if records[0]["rank"] == 0 and int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(records))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
