"""Checkpoints through megatron-core dist_checkpointing, written atomically.

A checkpoint is the directory `<checkpoint.dir>/iter_<7 digits>`. It is written as
`iter_<n>.tmp` by every rank, then rank 0 writes `m2_checkpoint.json` (the completeness
marker) and renames the directory to its final name. A directory without the marker, or still
named `.tmp`, is a save that was killed: it is never loaded, and it is reported.

Contents: model and optimizer (sharded, so a checkpoint loads into another parallel layout),
scheduler, every rank's RNG states, iteration, consumed samples (the data position), the W&B
run id, and the resolved config. A weights-only checkpoint (`save` without optimizer and
scheduler: what `convert import-hf` writes) holds the model, the RNG states and the config.
A checkpoint of either `model.backend` loads into the other (the same tensor keys); the module
extra states one holds and the other lacks (Transformer Engine's FP8 metadata) start fresh.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedObject
from torch.distributed.checkpoint.api import CheckpointException

from model.config import ModelConfig
from pretrain import schedule

log = logging.getLogger("pretrain")

MARKER = "m2_checkpoint.json"
# transformer_engine/pytorch/_extra_state.py: TE (2.20) loads a pickled extra state only with it
_UNSAFE_PICKLE = "NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE"
_NAME = re.compile(r"^iter_(\d{7})$")
# Model config fields that fix parameter shapes: a checkpoint cannot load across a change in them.
SHAPE_KEYS = (
    "num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "kv_channels", "qk_norm",
    "num_experts", "moe_ffn_hidden_size", "moe_shared_expert_ffn_hidden_size", "dense_mlp_layers",
    "dense_ffn_hidden_size", "mtp_num_layers", "vocab_size",
)


class CheckpointError(RuntimeError):
    """A checkpoint that exists but cannot be used: corrupt, incomplete or incompatible."""


@dataclass
class Found:
    """What `scan` finds in a checkpoint directory."""

    complete: list[Path]
    """Complete checkpoints, oldest first."""
    incomplete: list[Path]
    """Directories left by saves that did not finish."""


def checkpoint_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def scan(directory: Path) -> Found:
    complete, incomplete = [], []
    if directory.is_dir():
        for entry in sorted(directory.iterdir()):
            if not entry.is_dir():
                continue
            if _NAME.match(entry.name) and (entry / MARKER).is_file():
                complete.append(entry)
            elif entry.name.startswith("iter_"):
                incomplete.append(entry)
    complete.sort(key=lambda p: int(_NAME.match(p.name).group(1)))
    return Found(complete, incomplete)


def iteration_of(path: Path) -> int:
    """The iteration a checkpoint directory (iter_<n>) was saved at."""
    match = _NAME.match(path.name)
    assert match, f"{path} is not named like a checkpoint"
    return int(match.group(1))


def resolve_load(load: str | None, directory: Path) -> Path | None:
    """`checkpoint.load` -> the checkpoint to resume from (None = start fresh)."""
    if load is None:
        return None
    if load != "auto":
        path = Path(load).expanduser()
        if not (path / MARKER).is_file():
            raise CheckpointError(
                f"checkpoint.load={load!r}: {path} is not a complete checkpoint (no {MARKER}); "
                f"point it at an iter_* directory written by a finished save, or use auto"
            )
        return path
    found = scan(directory)
    for path in found.incomplete:
        log.warning("ignoring incomplete checkpoint %s (a save that did not finish)", path)
    return found.complete[-1] if found.complete else None


def _rng_state() -> dict[str, Any]:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    state = {"cpu": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def _unwrap(chunk):
    """The GPTModel of a model chunk: DDP wraps it in training, `convert import-hf` saves it bare."""
    return getattr(chunk, "module", chunk)


def _sharded_state_dict(model, optimizer, *, rng: dict | None, loading: bool) -> dict:
    """The sharded part: model chunks, optimizer (None: left out), and this rank's RNG states."""
    # The MTP stage ties its embedding copy to the first stage's through this group.
    metadata = {"dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True)}
    modules = [_unwrap(chunk) for chunk in model]
    if len(modules) == 1:
        model_sd = {"model": modules[0].sharded_state_dict(metadata=metadata)}
    else:
        model_sd = {f"model{i}": m.sharded_state_dict(metadata=metadata) for i, m in enumerate(modules)}
    state = dict(model_sd)
    if optimizer is not None:
        # Without the prefix, optimizer state is keyed by parameter alone, so it loads into
        # layouts that split experts and dense parameters into other numbers of optimizers.
        # The distributed optimizer (GPU) writes its state in model space, gathered over DP,
        # so it too loads into any layout.
        # Nested per chunk: under VPP the chunks' dicts share local names (decoder.layers.0...).
        state["optimizer"] = optimizer.sharded_state_dict(
            model_sd, is_loading=loading,
            metadata={"chained_optim_avoid_prefix": True, "distrib_optim_sharding_type": "fully_reshardable"},
        )
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    state["rng"] = ShardedObject("rng_state", rng, (world,), (rank,), replica_id=0)
    return state


def save(
    directory: Path,
    iteration: int,
    model,
    optimizer,
    scheduler,
    *,
    consumed_samples: int,
    wandb_run_id: str | None,
    config: dict,
    keep: int | None,
) -> Path:
    """Write `iter_<iteration>` atomically (collective over all ranks); prune to `keep` newest.
    With optimizer and scheduler None, the checkpoint holds the weights only."""
    final = directory / checkpoint_name(iteration)
    tmp = directory / (final.name + ".tmp")
    rank0 = torch.distributed.get_rank() == 0
    if rank0:
        if tmp.exists():  # left by a save of this iteration that was killed
            shutil.rmtree(tmp)
        if final.exists():  # re-saving an iteration after resuming from an older checkpoint
            shutil.rmtree(final)
        tmp.mkdir(parents=True)
    torch.distributed.barrier()
    start = time.perf_counter()
    # Adam has no state before the first step; a fresh optimizer is what loading it would give.
    with_optimizer = iteration > 0 and optimizer is not None
    state = _sharded_state_dict(model, optimizer if with_optimizer else None, rng=_rng_state(), loading=False)
    if scheduler is not None:
        state["scheduler"] = schedule.state(scheduler)
    state["progress"] = {
        "iteration": iteration,
        "consumed_samples": consumed_samples,
        "wandb_run_id": wandb_run_id,
        "world_size": torch.distributed.get_world_size(),
        "optimizer": with_optimizer,
    }
    state["config"] = config
    dist_checkpointing.save(state, str(tmp))
    torch.distributed.barrier()
    if rank0:
        marker = {"iteration": iteration, "saved_at": time.time(), "config": config}
        _write_durable(tmp / MARKER, json.dumps(marker, indent=1))
        os.replace(tmp, final)
        _fsync_dir(directory)
        if keep:
            for old in scan(directory).complete[:-keep]:
                shutil.rmtree(old)
    torch.distributed.barrier()
    log.debug("saved checkpoint %s in %.1f s", final, time.perf_counter() - start)
    return final


def load(path: Path, model, optimizer, *, config: dict) -> dict:
    """Load `path` into model/optimizer/RNG; return its progress record, with the scheduler's
    saved state under "scheduler" (None in a weights-only checkpoint: pretrain/schedule.py
    `resume` applies it)."""
    marker = path / MARKER
    if not marker.is_file():
        raise CheckpointError(f"{path}: no {MARKER}, so the save that wrote it did not finish")
    try:
        saved = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{marker}: unreadable ({e}); the checkpoint is corrupt") from e
    _check_compatible(marker, saved["config"]["model"], config["model"])
    _check_files(path)
    try:
        common = dist_checkpointing.load_common_state_dict(str(path))
        same_world = common["progress"]["world_size"] == torch.distributed.get_world_size()
        # RNG streams are per rank: restored only into the same number of ranks.
        with_optimizer = common["progress"].get("optimizer", True)
        state = _sharded_state_dict(
            model, optimizer if with_optimizer else None,
            rng=_rng_state() if same_world else None, loading=True,
        )
        if not same_world:
            del state["rng"]
        fresh = _drop_absent_extra_states(state, path)
        state = dist_checkpointing.load(state, str(path))
    except CheckpointError:
        raise
    except torch.distributed.DistBackendError:
        raise  # another rank failed first; its message is the one to read
    # Damaged files raise many types; torch DCP's CheckpointException is a BaseException.
    except (Exception, CheckpointException) as e:
        raise CheckpointError(
            f"{path}: could not be read ({_describe(e)}); the checkpoint is corrupt or "
            "was written by an incompatible version. Delete it (an older one in the directory "
            "will be used) or set checkpoint.load to another checkpoint"
        ) from e
    if fresh:
        log.warning("%s: %d module extra states (Transformer Engine's FP8 scaling metadata) are not in "
                    "the checkpoint (written by the other model.backend?): they start fresh", path, fresh)
    for i, chunk in enumerate(model):
        try:
            result = _unwrap(chunk).load_state_dict(state["model" if len(model) == 1 else f"model{i}"], strict=False)
        except RuntimeError as e:
            if _UNSAFE_PICKLE not in str(e):
                raise
            raise CheckpointError(
                f"{path}: Transformer Engine refuses to unpickle the FP8 delayed-scaling state in it "
                f"(amax histories; train.fp8_recipe=delayed stores them as pickles). For a checkpoint "
                f"your own run wrote, set {_UNSAFE_PICKLE}=1 in the environment and resume"
            ) from e
        # dist_checkpointing loaded every tensor asked for; only dropped extra states can be missing
        bad = [k for k in result.missing_keys if not k.endswith("_extra_state")] + list(result.unexpected_keys)
        assert not bad, f"{path}: keys not loaded: {bad}"
    if "optimizer" in state:
        _fit_optimizer_chain(state["optimizer"], optimizer, common["optimizer"], path)
        optimizer.load_state_dict(state["optimizer"])
    if "rng" in state:
        _set_rng_state(state["rng"])
    return {**state["progress"], "scheduler": state.get("scheduler")}


def load_weights(path: Path, model) -> tuple[list[str], list[str]]:
    """Load the model weights of the complete checkpoint `path` (written in any layout, weights-
    only or not) into `model`, for a run that starts from them (checkpoint.init_from): no
    optimizer, schedule, RNG or progress. Parameters the checkpoint lacks keep their values.
    Returns (missing: keys of `model` the checkpoint lacks, unused: model keys of the
    checkpoint that `model` has no place for). Collective."""
    marker = path / MARKER
    if not marker.is_file():
        raise CheckpointError(f"{path}: no {MARKER}, so it is not a complete checkpoint of this project")
    _check_files(path)
    from megatron.core.dist_checkpointing.dict_utils import extract_matching_values, nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedBase
    from torch.distributed.checkpoint import FileSystemReader

    stored = set(FileSystemReader(str(path)).read_metadata().state_dict_metadata)
    full = _sharded_state_dict(model, None, rng=None, loading=True)
    del full["rng"]
    # Weights only: the ShardedObjects (Transformer Engine's FP8 extra state) start fresh.
    tensors, _ = extract_matching_values(full, lambda v: isinstance(v, ShardedBase) and not _is_object(v))
    present, absent = extract_matching_values(tensors, lambda v: v.key in stored)
    # over all ranks: each holds only its own stage's (and shard's) tensors
    local = ({v.key for v in nested_values(absent)}, {v.key for v in nested_values(tensors)})
    every = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(every, local)
    missing = sorted(set().union(*(m for m, _ in every)))
    wanted = set().union(*(w for _, w in every))
    unused = sorted(k for k in stored if _is_model_key(k) and k not in wanted)
    try:
        loaded = dist_checkpointing.load(present, str(path))
    except torch.distributed.DistBackendError:
        raise
    except (Exception, CheckpointException) as e:
        raise CheckpointError(f"{path}: could not be read ({_describe(e)})") from e
    for i, chunk in enumerate(model):
        name = "model" if len(model) == 1 else f"model{i}"
        result = _unwrap(chunk).load_state_dict(loaded.get(name, {}), strict=False)
        unexpected = [k for k in result.unexpected_keys]
        assert not unexpected, f"{path}: loaded keys with no parameter: {unexpected}"
    return missing, unused


def _drop_absent_extra_states(state: dict, path: Path) -> int:
    """Remove from the model part of `state` the module extra states (ShardedObjects, e.g.
    Transformer Engine's FP8 scaling metadata) that the checkpoint does not hold, so that a
    checkpoint written by the local backend resumes on Transformer Engine (whose modules have
    extra states the local ones lack); the TE modules keep their fresh state. Returns how many."""
    from megatron.core.dist_checkpointing.dict_utils import extract_matching_values, nested_values
    from torch.distributed.checkpoint import FileSystemReader

    stored = set(FileSystemReader(str(path)).read_metadata().state_dict_metadata)
    dropped = 0
    for name in [k for k in state if k.startswith("model")]:
        absent, kept = extract_matching_values(
            state[name], lambda v: _is_object(v) and v.key.endswith("_extra_state") and v.unique_key not in stored
        )
        state[name] = kept
        dropped += sum(1 for _ in nested_values(absent))
    return dropped


def _is_object(entry) -> bool:
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return isinstance(entry, ShardedObject)


def _is_model_key(key: str) -> bool:
    """A model tensor's key in a checkpoint (not optimizer state, RNG or an extra-state object)."""
    return not key.startswith(("optimizer.", "rng_state")) and "_extra_state" not in key


def _fit_optimizer_chain(loaded: dict, optimizer, saved: dict, path: Path) -> None:
    """Workaround: reshape the loaded optimizer state when the checkpoint was written with a
    different number of chained optimizers (parallel.ep changed between 1 and more).

    megatron-core 0.16.1 `get_megatron_optimizer` (optimizer/__init__.py) chains a dense and an
    expert optimizer when parallel.ep > 1 (expert gradients are then reduced over the
    expert-data-parallel group), but builds one optimizer for all parameters when ep = 1.
    Optimizer tensors are keyed by parameter and reshard, but the non-tensor part (param-group
    hyper-parameters, the Adam step) sits under `{0: ..., 1: ...}` in one case and at the top in the other; loaded
    across that change, `MegatronOptimizer._filter_and_reorder_param_groups` (optimizer.py)
    finds groups without hyper-parameters (KeyError 'pre_wd_mult') or `ChainedOptimizer.
    load_state_dict` finds the wrong number of entries. Here the groups take the running
    optimizer's hyper-parameters (the scheduler state loaded next sets lr and weight decay) and
    every optimizer gets the saved step (ChainedOptimizer keeps one step for all)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    subs = optimizer.chained_optimizers
    saved_subs = [saved[k] for k in sorted(saved)] if all(isinstance(k, int) for k in saved) else [saved]
    if len(saved_subs) == len(subs):
        return
    if any(isinstance(o, DistributedOptimizer) for o in subs):
        raise CheckpointError(
            f"{path}: written with {len(saved_subs)} chained optimizer(s), this layout has "
            f"{len(subs)} (parallel.ep changed between 1 and >1); moving the distributed "
            "optimizer's state across that change is not supported: keep parallel.ep=1, or "
            "parallel.ep > 1, as in the checkpoint"
        )
    step = _inner(saved_subs[0]).get("state", {}).get("common_step")  # one for all (chained)
    chained = len(subs) > 1
    for key in [k for k in loaded if isinstance(k, int) != chained]:
        del loaded[key]  # the saved layout's entries
    current = [loaded[i] for i in range(len(subs))] if chained else [loaded]
    for sub_state, sub in zip(current, subs):
        inner = _inner(sub_state)
        assert len(inner["param_groups"]) == len(sub.optimizer.param_groups)
        for group, live in zip(inner["param_groups"], sub.optimizer.param_groups):
            group.update({k: v for k, v in live.items() if k != "params"})
        if step is not None:
            inner["state"]["common_step"] = step


def _inner(optimizer_state: dict) -> dict:
    """The torch optimizer's state inside megatron's (Float16Optimizer nests it under 'optimizer')."""
    inner = optimizer_state.get("optimizer")
    return inner if isinstance(inner, dict) else optimizer_state


def _describe(e: BaseException) -> str:
    """One line for a load failure; DCP's CheckpointException carries per-rank tracebacks."""
    if isinstance(e, CheckpointException) and e.failures:
        rank, failure = sorted(e.failures.items())[0]
        inner = failure[0] if isinstance(failure, tuple) else failure  # (exception, stack)
        return f"rank {rank}: {type(inner).__name__}: {inner}"
    return f"{type(e).__name__}: {e}"


def _check_files(path: Path) -> None:
    """Every tensor file the checkpoint's metadata names exists and is long enough: a truncated
    or missing shard is reported by name before the collective load starts."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        metadata = FileSystemReader(str(path)).read_metadata()
    except Exception as e:
        raise CheckpointError(f"{path / '.metadata'}: unreadable ({type(e).__name__}: {e})") from e
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        file = path / name
        have = file.stat().st_size if file.is_file() else None
        if have is None or have < size:
            raise CheckpointError(
                f"{file}: {'missing' if have is None else f'truncated ({have} of {size} bytes)'}; "
                "the checkpoint is corrupt. Delete it (an older one in the directory will be "
                "used) or set checkpoint.load to another checkpoint"
            )


def _check_compatible(marker: Path, saved: dict, current: dict) -> None:
    # a key newer than the checkpoint has its default there (what the older model computed)
    defaults = dataclasses.asdict(ModelConfig())
    diffs = [f"model.{k}: checkpoint {saved.get(k, defaults[k])} != config {current.get(k)}"
             for k in SHAPE_KEYS if saved.get(k, defaults[k]) != current.get(k)]
    if diffs:
        raise CheckpointError(
            f"{marker}: the checkpoint does not fit the configured model ("
            + "; ".join(diffs) + "). Use the checkpoint's model config, or another checkpoint.dir"
        )
    (have, have_mtp), (want, want_mtp) = _index_branches(saved), _index_branches(current)
    lacking = ([f"decoder layers {sorted(want - have)}"] if want - have else []) \
        + (["the MTP modules"] if want_mtp and not have_mtp else [])
    if lacking:
        attention = {**defaults["attention"], **(saved.get("attention") or {})}
        raise CheckpointError(
            f"{marker}: the checkpoint has no MSA index branch in {' and '.join(lacking)}, which the "
            f"configured model runs with MSA. Resume with the settings that wrote it (model.attention.type="
            f"{attention['type']} model.attention.dense_layers={attention['dense_layers']} model.attention.mtp="
            f"{attention['mtp']}), or start a new run from its weights with checkpoint.init_from={marker.parent} "
            "(index branches it lacks are initialised)"
        )


def _index_branches(model: dict) -> tuple[set[int], bool]:
    """(the decoder layers with an MSA index branch, whether the MTP modules have one) of a saved
    or configured model config (keys an older checkpoint lacks: their defaults)."""
    defaults = dataclasses.asdict(ModelConfig())
    attention = {**defaults["attention"], **(model.get("attention") or {})}
    if attention["type"] != "msa":
        return set(), False
    layers = model.get("num_layers", defaults["num_layers"])
    mtp = attention["mtp"] == "msa" and model.get("mtp_num_layers", defaults["mtp_num_layers"]) > 0
    return {i for i in range(layers) if i not in attention["dense_layers"]}, mtp


def _write_durable(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
