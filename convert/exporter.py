"""`convert export-hf`: a checkpoint of ours -> Hugging Face MiniMax-M2 (released layout), or for
an M3 model (Gemma norms) a text-only MiniMax-M3 in transformers' names (MiniMaxM3VLForCausalLM,
model.hf.config.hf_family).

One process, whatever layout wrote the checkpoint: torch.distributed.checkpoint's metadata lists
every key with its global shape, and each key is read on its own (an expert weight one expert at
a time, from the pieces that hold it), mapped to HF names by model/hf/names.py and streamed into
shards of bounded size (model/hf/safetensors.py `ShardWriter`; M3's fused expert tensors
[E, ...] go in one expert's rows at a time). Peak memory is one key's full
tensor (one expert's for expert weights) and its HF tensors. The fp32 main weights are read where
the checkpoint holds them (megatron's optimizer state: `optimizer.state.fp32_param.<key>` of the
mixed-precision optimizer, `optimizer.state.param.<key>` of the distributed optimizer's
fully_reshardable format), else the model's weights.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import warnings
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import load as dcp_load
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadPlan
from torch.distributed.checkpoint.planner_helpers import (
    create_read_items_for_chunk_list,
)

from convert.progress import Progress
from model.config import ModelConfig
from model.hf import ConvertError
from model.hf.config import FP8_BLOCK, M3, hf_config, hf_family, model_config_from_dict
from model.hf.names import M3_TEXT, RELEASED, Rule, is_quantized_linear, rules
from model.hf.safetensors import SCALE_SUFFIX, Planned, ShardWriter, quantize_fp8
from pretrain import checkpoint

log = logging.getLogger("convert")

DTYPES = ("bf16", "fp32", "fp8")
MAIN_WEIGHT_PREFIXES = ("optimizer.state.fp32_param.", "optimizer.state.param.")
"""Where megatron's optimizers checkpoint the fp32 main copy of a parameter's key."""


class _CachedReader(FileSystemReader):
    """FileSystemReader that reads the (large) metadata file once, not once per key."""

    def __init__(self, path: Path):
        super().__init__(str(path))
        self._metadata = None

    def read_metadata(self):
        if self._metadata is None:
            self._metadata = super().read_metadata()
        return self._metadata


class _BoxPlanner(DefaultLoadPlanner):
    """Loads the box of one key that starts at `offsets` and has the destination tensor's shape,
    from the stored pieces `pieces` (those that overlap it)."""

    def __init__(self, offsets: tuple[int, ...], pieces: TensorStorageMetadata):
        super().__init__()
        self.offsets = offsets
        self.pieces = pieces

    def create_local_plan(self) -> LoadPlan:
        ((fqn, tensor),) = self.state_dict.items()
        box = ChunkStorageMetadata(offsets=torch.Size(self.offsets), sizes=tensor.shape)
        # Storage is looked up by (key, offsets); the index hints these items carry go unused.
        return LoadPlan(create_read_items_for_chunk_list(fqn, self.pieces, [box]))

    def lookup_tensor(self, index):
        return self.state_dict[index.fqn]  # the box itself; resolve_tensor narrows it to the item


class DistCheckpoint:
    """The tensors of a checkpoint of ours, read one key (or one entry of its leading axes) at
    a time, in one process."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.reader = _CachedReader(self.path)
        metadata = self.reader.read_metadata()
        self.tensors: dict[str, TensorStorageMetadata] = {
            key: md for key, md in metadata.state_dict_metadata.items() if isinstance(md, TensorStorageMetadata)
        }
        self._by_lead: dict[tuple[str, int], dict[tuple[int, ...], list[ChunkStorageMetadata]]] = {}

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.tensors[key].size)

    def read(self, key: str, lead: tuple[int, ...] = ()) -> torch.Tensor:
        """The tensor of `key`, or its entry `lead` on the leading axes (one expert), as stored."""
        md = self.tensors[key]
        shape = tuple(md.size)[len(lead):]
        out = torch.empty(shape, dtype=md.properties.dtype)
        box = out.view((1,) * len(lead) + shape)
        pieces = dataclasses.replace(md, chunks=self._pieces(key, lead))
        with warnings.catch_warnings():  # "torch.distributed is ... uninitialized": one process is the intent
            warnings.filterwarnings("ignore", message=r"torch\.distributed is disabled")
            dcp_load({key: box}, storage_reader=self.reader, planner=_BoxPlanner(tuple(lead) + (0,) * len(shape), pieces),
                     no_dist=True)
        return out

    def _pieces(self, key: str, lead: tuple[int, ...]) -> list[ChunkStorageMetadata]:
        """The stored pieces of `key` that hold entry `lead` of its leading axes. Indexed once per
        key: a key stacking all layers' experts has ~32K pieces at M2's size, too many to scan
        for each of its ~16K entries."""
        if not lead:
            return self.tensors[key].chunks
        index = self._by_lead.get((key, len(lead)))
        if index is None:
            index = self._by_lead[(key, len(lead))] = {}
            for chunk in self.tensors[key].chunks:
                spans = [range(o, o + n) for o, n in zip(chunk.offsets[: len(lead)], chunk.sizes[: len(lead)])]
                for position in itertools.product(*spans):
                    index.setdefault(position, []).append(chunk)
        return index[tuple(lead)]


def resolve_checkpoint(directory: Path, iteration: int | None) -> Path:
    """--checkpoint (a checkpoint directory, or one iter_* of it) and --iteration -> the iter_*
    directory to export."""
    directory = Path(directory)
    if iteration is None and (directory / checkpoint.MARKER).is_file():
        return directory
    if iteration is not None:
        path = directory / checkpoint.checkpoint_name(iteration)
        if not (path / checkpoint.MARKER).is_file():
            raise ConvertError(f"{path}: not a complete checkpoint (no {checkpoint.MARKER}); check --iteration")
        return path
    found = checkpoint.scan(directory)
    if not found.complete:
        raise ConvertError(f"{directory}: holds no complete checkpoint (iter_* with {checkpoint.MARKER})")
    return found.complete[-1]


def checkpoint_model(path: Path) -> ModelConfig:
    """The model config a checkpoint was written with (its marker's `config.model`)."""
    try:
        saved = json.loads((path / checkpoint.MARKER).read_text())["config"]["model"]
    except (OSError, ValueError, KeyError) as e:
        raise ConvertError(f"{path / checkpoint.MARKER}: no readable config.model ({e})") from e
    return model_config_from_dict(saved)


def _source_keys(ckpt: DistCheckpoint, model_rules: list[Rule]) -> dict[str, str]:
    """Rule key -> the checkpoint key to read it from (its fp32 main copy where present).
    ConvertError when a key is missing or the checkpoint holds model tensors we cannot name."""
    wanted = {rule.key for rule in model_rules}
    model_keys = {k for k in ckpt.tensors if not k.startswith("optimizer.")}
    unnamed = sorted(model_keys - wanted)
    if unnamed:
        raise ConvertError(f"the checkpoint holds {unnamed[:6]} ({len(unnamed)} keys) that no HF name maps; "
                           "is its config.model the model that wrote it?")
    missing = sorted(wanted - model_keys)
    if missing:
        raise ConvertError(f"the checkpoint lacks {missing[:6]} ({len(missing)} keys) of its own model config")
    source = {}
    for rule in model_rules:
        source[rule.key] = next((p + rule.key for p in MAIN_WEIGHT_PREFIXES if p + rule.key in ckpt.tensors), rule.key)
        if ckpt.shape(source[rule.key]) != rule.full_shape:
            raise ConvertError(f"checkpoint key {source[rule.key]} has shape {list(ckpt.shape(source[rule.key]))}, "
                               f"its model config needs {list(rule.full_shape)}")
    return source


def _hf_dtype(name: str, dtype: str) -> torch.dtype:
    if name.endswith("e_score_correction_bias") or dtype == "fp32":
        return torch.float32  # the expert bias is an fp32 buffer in training, kept exact
    return torch.float8_e4m3fn if dtype == "fp8" and is_quantized_linear(name) else torch.bfloat16


def _planned(model_rules: list[Rule], dtype: str) -> list[Planned]:
    out = []
    for rule in model_rules:
        for name, shape in rule.hf_tensors():
            out.append(Planned(name, _hf_dtype(name, dtype), shape))
            if out[-1].dtype == torch.float8_e4m3fn:  # tiles of the last two dims (per expert)
                tiles = (*shape[:-2], *(-(-n // b) for n, b in zip(shape[-2:], FP8_BLOCK)))
                out.append(Planned(name + SCALE_SUFFIX, torch.float32, tiles))
    return out


def export_hf(path: Path, out: Path, *, dtype: str = "bf16", max_shard_bytes: int = 5 * 2**30,
              progress: str = "auto") -> Path:
    """Write config.json, shards and index of the checkpoint `path` (an iter_* directory) to `out`."""
    assert dtype in DTYPES, dtype
    model = checkpoint_model(path)
    ckpt = DistCheckpoint(path)
    model_rules = rules(model, M3_TEXT if hf_family(model) == M3 else RELEASED)
    source = _source_keys(ckpt, model_rules)
    main = sum(source[k] != k for k in source)
    log.info("export: %d of %d keys from the fp32 main weights, the rest from the model weights", main, len(source))
    out = Path(out)
    if (out / "config.json").exists():
        raise ConvertError(f"{out / 'config.json'} exists: remove it or choose another --out")
    plan = _planned(model_rules, dtype)
    writer = ShardWriter(out, plan, max_shard_bytes)
    display = Progress("export", len(plan), writer.total_bytes, mode=progress)
    for rule in model_rules:
        for expert in range(rule.experts) if rule.experts else [None]:
            lead = () if expert is None else (expert,)
            for name, tensor in rule.to_hf(ckpt.read(source[rule.key], lead), expert):
                for item_name, item in _encode(name, tensor, dtype):
                    writer.write(item_name, item)
                    display.advance(1, item.numel() * item.element_size())
    writer.close()
    config = hf_config(model, dtype="float32" if dtype == "fp32" else "bfloat16", fp8=dtype == "fp8")
    tmp = out / "config.json.tmp"
    tmp.write_text(json.dumps(config, indent=2) + "\n")
    os.replace(tmp, out / "config.json")
    log.info("%s", display.close())
    return out


def _encode(name: str, tensor: torch.Tensor, dtype: str) -> list[tuple[str, torch.Tensor]]:
    """The stored form of one HF tensor: cast, or block FP8 and its scales."""
    target = _hf_dtype(name, dtype)
    if target == torch.float8_e4m3fn:
        q, scale = quantize_fp8(tensor, FP8_BLOCK)
        return [(name, q), (name + SCALE_SUFFIX, scale)]
    return [(name, tensor.to(target))]
