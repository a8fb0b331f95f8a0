"""The weights a run starts from, and the model config that comes with them.

A run loads weights from its own newest checkpoint (resume), or else from
`checkpoint.init_from` (a checkpoint of this project, or hf:DIR). Either way the model config
comes with the weights: the source's model config is the run's, except for the keys the run sets
itself (its command line, its experiment, or a model=NAME choice); among those, a key of
WEIGHT_KEYS (the shapes, and what the weights were trained with) that differs from the weights
is an error naming it, and any other difference (attention type and MSA settings, MTP depth,
backend, loss weights, ...) is the run's choice and is logged. MTP modules or MSA index
branches the source lacks are initialised.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from model.config import WEIGHT_KEYS, ModelConfig
from pretrain import checkpoint
from pretrain.config import RunConfig

log = logging.getLogger("pretrain")



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
        from model.hf.config import model_config_from_hf, read_config

        path = Path(ckpt.init_from.removeprefix("hf:")).expanduser().resolve()
        model = model_config_from_hf(read_config(path), name=path.name)
        return Source(path, resume=False, hf=True, model=dataclasses.asdict(model))
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
    """The model config a complete checkpoint of this project was written with; fields added
    since (M3's) take their defaults, which are what the older model computed (M2)."""
    marker = path / checkpoint.MARKER
    try:
        saved = json.loads(marker.read_text())["config"]["model"]
    except (OSError, ValueError, KeyError) as e:
        raise checkpoint.CheckpointError(f"{marker}: no model config in it ({e}); the checkpoint is corrupt") from e
    return {**dataclasses.asdict(ModelConfig()), **saved}


def explicit_model_keys(model: ModelConfig, choices: dict, overrides: list[str]) -> set[str]:
    """The model keys (dotted: `msa.topk`) the run sets itself rather than leaving to the config
    defaults: every key when it chose a model group other than the default (`model=NAME`, or an
    experiment's `override /model`), else those its command line (`model.key=value`) and its
    experiment's `model:` section set. `choices`: Hydra's group choices of the run."""
    if choices.get("model", DEFAULT_MODEL_GROUP) != DEFAULT_MODEL_GROUP:
        return set(_leaves(dataclasses.asdict(model)))
    keys = {o.lstrip("+~").split("=", 1)[0].removeprefix("model.") for o in overrides
            if o.lstrip("+~").startswith("model.")}
    experiment = choices.get("experiment")
    if experiment:
        recipe = OmegaConf.load(Path(__file__).resolve().parent.parent / "conf" / "experiment" / f"{experiment}.yaml")
        keys |= set(_leaves(OmegaConf.to_container(recipe.get("model") or OmegaConf.create({}))))
    return keys


DEFAULT_MODEL_GROUP = "tiny"
"""conf/config.yaml's model choice."""


def adopt(model: ModelConfig, source: dict, explicit: set[str], where: Path | str) -> tuple[ModelConfig, list[str]]:
    """The source's model config with the keys the run sets itself (`explicit`, dotted) taken
    from `model`; ValueError naming the WEIGHT_KEYS among them whose values differ from the
    weights' (at `where`). Returns the config and lines saying where it differs from `model`
    and from the source."""
    mine, theirs = _leaves(dataclasses.asdict(model)), _leaves(source)
    conflicts = [f"model.{k}={mine[k]!r} but the weights have {theirs[k]!r}"
                 for k in WEIGHT_KEYS if k in explicit and mine[k] != theirs[k]]
    if conflicts:
        raise ValueError(
            f"{where}: the model's shape comes with the weights: " + "; ".join(conflicts)
            + ". Drop these overrides (or the model=... choice), or start from other weights"
        )
    merged = {**mine, **{k: v for k, v in theirs.items() if k in mine and k not in explicit}}
    nested: dict = {}
    for key, value in merged.items():
        *parents, leaf = key.split(".")
        node = nested
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    adopted = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), nested))
    notes = [f"model.{k}: {mine[k]!r} -> {merged[k]!r} (from the weights' config)"
             for k in sorted(mine) if mine[k] != merged[k]]
    notes += [f"model.{k}: {merged[k]!r} here, {theirs[k]!r} in the weights' config"
              for k in sorted(merged) if k in theirs and merged[k] != theirs[k]]
    return adopted, notes


def _leaves(fields: dict, prefix: str = "") -> dict:
    """Nested config dict -> {dotted key: value}."""
    out = {}
    for k, v in fields.items():
        if isinstance(v, dict):
            out.update(_leaves(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
