"""The weights a run starts from, and the model config that comes with them.

A run loads weights from its own newest checkpoint (resume), or else from
`checkpoint.init_from` (a checkpoint of this project, or hf:DIR). Either way the model's shape
comes with the weights: the keys in WEIGHT_KEYS are taken from the source's model config, and
one given on the command line that differs is an error naming the key. `mtp_num_layers`,
`max_position_embeddings`, the end-of-document token and the name are taken from the source
unless given (MTP modules the source lacks are initialised). Everything else (attention type and MSA settings, backend, loss
weights, router update rate, ...) is the run's own choice; where it differs from the source's,
the difference is logged.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from model.config import ModelConfig
from pretrain import checkpoint
from pretrain.config import RunConfig

log = logging.getLogger("pretrain")

WEIGHT_KEYS = (
    "num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "kv_channels", "num_experts",
    "moe_router_topk", "moe_ffn_hidden_size", "vocab_size", "rotary_percent", "rotary_base", "norm_epsilon",
)
"""Model config keys fixed by the weights: parameter shapes, and what the weights were trained with."""
SOURCE_DEFAULT_KEYS = ("name", "mtp_num_layers", "max_position_embeddings", "eod_token_id")
"""Keys taken from the source unless the command line gives them."""


@dataclass(frozen=True)
class Source:
    """Where a run's weights come from."""

    path: Path
    """A complete checkpoint directory (iter_*), or a Hugging Face checkpoint directory."""
    resume: bool
    """The run's own checkpoint (optimizer, schedule, progress too), not an init_from."""
    hf: bool
    """A Hugging Face checkpoint (init_from=hf:DIR)."""
    model: dict
    """The source's model config, as ModelConfig fields."""


def checkpoint_dir(run: RunConfig, run_dir: Path) -> Path:
    """checkpoint.dir, or checkpoints/ in the run directory."""
    return Path(run.checkpoint.dir).expanduser() if run.checkpoint.dir else run_dir / "checkpoints"


def find_source(run: RunConfig, run_dir: Path) -> Source | None:
    """The checkpoint the run will load: its own newest (checkpoint.load), else init_from, else None."""
    ckpt = run.checkpoint
    directory = checkpoint_dir(run, run_dir)
    own = checkpoint.resolve_load(ckpt.load, directory)
    if own is not None:
        return Source(own, resume=True, hf=False, model=saved_model_config(own))
    if ckpt.init_from is None:
        return None
    if ckpt.init_from.startswith("hf:"):
        from model import hf

        path = Path(ckpt.init_from.removeprefix("hf:")).expanduser().resolve()
        return Source(path, resume=False, hf=True, model=dataclasses.asdict(hf.model_config(path)))
    path = newest_complete(Path(ckpt.init_from).expanduser().resolve(), "checkpoint.init_from")
    if directory.resolve() in path.parents:
        raise ValueError(
            f"checkpoint.init_from={ckpt.init_from!r} lies inside checkpoint.dir ({directory}), whose "
            "checkpoints are this run's own: copy it elsewhere or point checkpoint.dir at another directory"
        )
    return Source(path, resume=False, hf=False, model=saved_model_config(path))


def newest_complete(path: Path, key: str) -> Path:
    """`path` if it is a complete checkpoint, else the newest complete one inside it."""
    if (path / checkpoint.MARKER).is_file():
        return path
    found = checkpoint.scan(path)
    if not found.complete:
        raise ValueError(
            f"{key}={str(path)!r}: neither a complete checkpoint (no {checkpoint.MARKER}) nor a "
            "directory holding one"
        )
    return found.complete[-1]


def saved_model_config(path: Path) -> dict:
    """The model config a complete checkpoint of this project was written with."""
    marker = path / checkpoint.MARKER
    try:
        return json.loads(marker.read_text())["config"]["model"]
    except (OSError, ValueError, KeyError) as e:
        raise checkpoint.CheckpointError(f"{marker}: no model config in it ({e}); the checkpoint is corrupt") from e


def explicit_model_keys(overrides: list[str]) -> set[str]:
    """The model config keys a command line sets (`model.key=value`); a model group choice
    (`model=NAME`) sets every key of the group."""
    keys = set()
    for override in overrides:
        key = override.lstrip("+~").split("=", 1)[0]
        if key == "model":
            keys |= {f.name for f in dataclasses.fields(ModelConfig)}
        elif key.startswith("model."):
            keys.add(key.removeprefix("model.").split(".")[0])
    return keys


def adopt(model: ModelConfig, source: dict, explicit: set[str], where: Path | str) -> tuple[ModelConfig, list[str]]:
    """`model` with the source's WEIGHT_KEYS (and SOURCE_DEFAULT_KEYS not in `explicit`);
    ValueError naming the keys that `explicit` sets to other values than the weights (at
    `where`) have. Returns the config and lines saying what was taken and what differs."""
    conflicts = [f"model.{k}={getattr(model, k)!r} but the weights have {source[k]!r}"
                 for k in WEIGHT_KEYS if k in explicit and getattr(model, k) != source[k]]
    if conflicts:
        raise ValueError(
            f"{where}: the model's shape comes with the weights: " + "; ".join(conflicts)
            + ". Drop these overrides (or the model=... choice), or start from other weights"
        )
    taken = {k: source[k] for k in WEIGHT_KEYS}
    taken |= {k: source[k] for k in SOURCE_DEFAULT_KEYS if k not in explicit and k in source}
    notes = [f"model.{k}: {getattr(model, k)!r} -> {v!r} (from the weights)"
             for k, v in taken.items() if getattr(model, k) != v]
    adopted = dataclasses.replace(model, **taken)
    mine = dataclasses.asdict(adopted)
    notes += [f"model.{k}: {mine[k]!r} here, {source[k]!r} in the weights' config"
              for k in sorted(mine) if k not in taken and k in source and mine[k] != source[k]]
    return adopted, notes
