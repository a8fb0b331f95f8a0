"""`convert import-hf`: a Hugging Face MiniMax-M2 checkpoint -> a weights-only checkpoint of ours.

Each rank builds its part of the model in the requested layout as the trainer builds it
(pretrain.settings resolves the run, model.builder builds the chunks; on CPU, without a random
initialisation), fills every piece it holds from the HF tensors (parallel.gather
`fill_local_shards`: the full tensor of a checkpoint key is read, transformed by
model/hf/names.py and sliced), initialises what the HF checkpoint does not hold (MTP modules of
a released M2, index branches of layers converted to MSA) as training would, and saves with
pretrain.checkpoint at iteration 0, the derived model config included. A rank's peak memory is
its own shard plus one full tensor being read.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch
from megatron.core.dist_checkpointing.dict_utils import (
    dict_list_map_inplace,
    nested_values,
)
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from convert.progress import Progress, max_rss_bytes
from data.config import DataConfig
from model.builder import build_model, transformer_config
from model.config import ModelConfig
from model.hf import ConvertError
from model.hf import load as hf_load
from model.hf.config import check_overrides, model_config_from_hf, read_config
from model.hf.names import ImportPlan
from model.hf.safetensors import SafetensorsDir
from parallel.config import ParallelConfig
from pretrain import checkpoint
from pretrain.config import (
    CheckpointConfig,
    ClusterConfig,
    LoggerConfig,
    OptimConfig,
    RunConfig,
    TrainConfig,
)
from pretrain.settings import Machine, check_layout, megatron_settings, resolve

log = logging.getLogger("convert")


def derive_model(hf_dir: Path, overrides: list[str]) -> tuple[ModelConfig, dict]:
    """(the ModelConfig of the checkpoint's config.json with `model.*` overrides applied, the
    config.json). Overrides may set training fields (and turn layers into MSA layers, whose
    index branches are then initialised) but not what config.json fixes."""
    config = read_config(hf_dir)
    derived = model_config_from_hf(config, name=Path(hf_dir).resolve().name)
    model = _override(derived, overrides, "model", ModelConfig)
    check_overrides(derived, model)
    return model, config


def parallel_config(overrides: list[str]) -> ParallelConfig:
    """ParallelConfig from `parallel.*` overrides; gloo unless named (the import runs on CPU)."""
    return _override(ParallelConfig(distributed_backend="gloo"), overrides, "parallel", ParallelConfig)


def _override(base, overrides: list[str], group: str, schema):
    mine = [o[len(group) + 1:] for o in overrides if o.startswith(group + ".")]
    try:
        merged = OmegaConf.merge(OmegaConf.structured(base), OmegaConf.from_dotlist(mine))
        return OmegaConf.to_object(merged)
    except (OmegaConfBaseException, ValueError) as e:
        cause = e.__cause__ if isinstance(e, OmegaConfBaseException) and e.__cause__ else e
        raise ConvertError(f"{group} overrides {mine}: {cause}") from e


def run_config(model: ModelConfig, parallel: ParallelConfig, dtype: str) -> RunConfig:
    """The run the chunks are built for: the trainer's defaults, at the import precision."""
    return RunConfig(
        model=model, parallel=parallel, data=DataConfig(), optim=OptimConfig(),
        train=TrainConfig(precision=dtype), checkpoint=CheckpointConfig(), logger=LoggerConfig(),
        cluster=ClusterConfig(),
    )


def check_run(run: RunConfig, world: int) -> None:
    """The layout fits the model and `world` processes, the backend this machine (ValueError
    naming the key): before any process group starts."""
    resolve(_import_backend(run), Machine.this())
    check_layout(run, world)


def _import_backend(run: RunConfig) -> RunConfig:
    if run.model.backend == "auto":
        return dataclasses.replace(run, model=dataclasses.replace(run.model, backend="local"))
    return run


def build_chunks(run: RunConfig) -> list[torch.nn.Module]:
    """This rank's model chunks, built as the trainer builds them but on CPU and without a random
    initialisation (every tensor is then filled). model.backend=auto means local here: checkpoint
    keys do not depend on the backend (model/specs.py), and the local modules build on any host."""
    machine = Machine.this()
    run = _import_backend(run)
    settings = resolve(run, machine)
    check_layout(run, torch.distributed.get_world_size())
    config = transformer_config(
        run.model, run.parallel, params_dtype=settings.dtype, cpu=True, deterministic=settings.deterministic,
        extra=megatron_settings(run, settings, machine),
    )
    config.perform_initialization = False
    return build_model(run.model, config, settings.backend)


def check(hf_dir: Path, out: Path, model: ModelConfig, hf_config: dict) -> None:
    """Everything checkable before the model is built: the output is free, and the HF
    checkpoint's tensors fit `model` (ConvertError naming the tensor)."""
    target = Path(out) / checkpoint.checkpoint_name(0)
    if target.exists():
        raise ConvertError(f"{target} exists: remove it or choose another --out")
    hf_load.plan(model, hf_config, SafetensorsDir(hf_dir))


def fill(chunks, model: ModelConfig, hf_dir: Path, hf_config: dict, *, seed: int, progress: str = "auto") -> ImportPlan:
    """model.hf.load.load with a progress display (rank 0's) and the closing summary per rank."""
    display = None

    def start(tensors: int, nbytes: int) -> None:
        nonlocal display
        display = Progress("import", tensors, nbytes, mode=progress if torch.distributed.get_rank() == 0 else "off")

    import_plan = hf_load.load(chunks, model, hf_dir, hf_config, seed=seed, on_start=start,
                               on_read=lambda tensors, nbytes: display.advance(tensors, nbytes))
    summary = display.close()
    if torch.distributed.get_rank() == 0:
        if import_plan.skipped_note():
            log.info("%s", import_plan.skipped_note())
        for note in import_plan.notes:
            log.info("initialised, not imported: %s", note)
    log.info("rank %d: %s", torch.distributed.get_rank(), summary)
    return import_plan


def import_hf(hf_dir: Path, out: Path, *, parallel: ParallelConfig, model: ModelConfig, hf_config: dict,
              dtype: str = "bf16", seed: int = 1234, progress: str = "auto") -> Path:
    """Build, fill and save; torch.distributed and megatron's groups for `parallel` must be up.
    Returns the written checkpoint (`out`/iter_0000000)."""
    check(hf_dir, out, model, hf_config)
    run = run_config(model, parallel, dtype)
    chunks = build_chunks(run)
    import_plan = fill(chunks, model, hf_dir, hf_config, seed=seed, progress=progress)
    config = {
        "model": dataclasses.asdict(model),
        "parallel": dataclasses.asdict(parallel),
        "hf_import": {
            "source": str(Path(hf_dir).resolve()), "dtype": dtype, "seed": seed,
            "initialised": sorted(import_plan.init_keys),
        },
    }
    path = checkpoint.save(Path(out), 0, [_SavedChunk(c) for c in chunks], None, None, consumed_samples=0,
                           wandb_run_id=None, config=config, keep=None)
    log.info("rank %d: wrote %s (model %s, %s); ru_maxrss %.2f GiB", torch.distributed.get_rank(), path, model.name,
             dtype, max_rss_bytes() / 2**30)
    return path


class _SavedChunk:
    """A filled chunk as the import saves it: every checkpointed tensor in a storage of its own.

    megatron's writer clones each CPU tensor that is a view of a larger storage before writing
    (megatron/core/dist_checkpointing/strategies/filesystem_async.py,
    `FileSystemWriterAsync.prepare_write_data`), all of them before the first byte is written,
    and a SwiGLU fc1 weight is checkpointed as two views (its ShardedTensorFactory chunks it into
    gate and up). A plain save would so hold a second copy of two thirds of the expert weights.
    Here each fc1 weight is moved into two tensors of their own (one weight at a time, freeing
    the original), which is what megatron's factory would have built, so the checkpoint is the
    same. The chunk is unusable afterwards."""

    def __init__(self, chunk):
        self.chunk = chunk

    def sharded_state_dict(self, metadata=None):
        state = self.chunk.sharded_state_dict(metadata=metadata)
        dict_list_map_inplace(_own_storage, state)
        return state


def _own_storage(entry):
    if not isinstance(entry, ShardedTensorFactory):
        return entry
    pieces = entry.build()
    for piece in nested_values(pieces):
        assert isinstance(piece, ShardedTensor), piece
        piece.data = piece.data.clone()
    entry.data.data = torch.empty(0, dtype=entry.data.dtype)  # frees the original weight
    return pieces
