"""Sharded safetensors, one tensor at a time, and block-FP8.

Reading parses each shard's header (8-byte little-endian length, then JSON: name -> dtype,
shape, byte range) and reads a tensor's bytes with plain file reads into a fresh tensor: nothing
is memory-mapped, so a process holds exactly the tensors it has read and not yet dropped (a
mapped shard's touched pages would count in its resident memory until unmapped). A row range of
the first dimension (one expert of a fused [E, ...] tensor) is read alone.

Writing is a stream: the shards are planned from the names, dtypes and shapes of all tensors
before any data exists (so each shard's header can be written first), then tensors arrive one at
a time in plan order and go straight to disk. The index `model.safetensors.index.json` is
written last.

Block FP8 (MiniMax-M2's release, DeepSeek-V3's scheme): a Linear weight `X.weight` [out, in] is
stored as float8 e4m3 with `X.weight_scale_inv` [ceil(out/128), ceil(in/128)] fp32, one scale
per 128x128 tile; the weight is e4m3 value * its tile's scale.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from model.hf import ConvertError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
SCALE_SUFFIX = "_scale_inv"
"""`X.weight` (FP8) has its scales in `X.weight_scale_inv`."""
FP8_MAX = 448.0
"""Largest finite float8 e4m3fn."""

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies in a shard."""

    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    """Byte offset of its data in the file."""

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def read_header(path: Path) -> dict[str, TensorInfo]:
    """The tensors of one safetensors file, by name."""
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
    except (OSError, struct.error, ValueError) as e:
        raise ConvertError(f"{path}: not a readable safetensors file ({e})") from e
    base = 8 + length
    infos = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if entry["dtype"] not in DTYPES:
            raise ConvertError(f"{path}: tensor {name} has dtype {entry['dtype']}, which this reader does not know")
        start, end = entry["data_offsets"]
        info = TensorInfo(name, path, DTYPES[entry["dtype"]], tuple(entry["shape"]), base + start)
        if end - start != info.nbytes:
            raise ConvertError(f"{path}: tensor {name} spans {end - start} bytes, its shape and dtype need {info.nbytes}")
        infos[name] = info
    return infos


class SafetensorsDir:
    """The tensors of an HF checkpoint directory, read one at a time.

    The directory holds `model.safetensors.index.json` (its `weight_map` names each tensor's
    shard) or a single `model.safetensors`. Every tensor the index names must be in its shard,
    and every tensor of a shard must be in the index.
    """

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        index = self.directory / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError) as e:
                raise ConvertError(f"{index}: unreadable or without a weight_map ({e})") from e
            files = sorted(set(weight_map.values()))
        elif (self.directory / SINGLE).is_file():
            weight_map, files = None, [SINGLE]
        else:
            raise ConvertError(f"{self.directory}: neither {INDEX} nor {SINGLE}; point --hf at a Hugging Face checkpoint")
        self.infos: dict[str, TensorInfo] = {}
        for file in files:
            path = self.directory / file
            if not path.is_file():
                raise ConvertError(f"{index}: names shard {file}, which is missing")
            for name, info in read_header(path).items():
                if weight_map is not None and weight_map.get(name) != file:
                    raise ConvertError(f"{path}: holds tensor {name}, which {INDEX} does not map to this shard")
                self.infos[name] = info
        for name, file in (weight_map or {}).items():
            if name not in self.infos:
                raise ConvertError(f"{index}: maps tensor {name} to {file}, which does not hold it")

    def read(self, name: str, index: int | None = None) -> torch.Tensor:
        """The tensor `name` as stored, or only its entry `index` along the first dimension."""
        info = self.infos[name]
        shape, offset = info.shape, info.offset
        if index is not None:
            assert 0 <= index < shape[0], (name, index, shape)
            shape = shape[1:]
            offset += index * math.prod(shape) * info.dtype.itemsize
        out = torch.empty(shape, dtype=info.dtype)
        buffer = memoryview(out.reshape(-1).view(torch.uint8).numpy())
        with open(info.file, "rb", buffering=0) as f:
            f.seek(offset)
            done = 0
            while done < len(buffer):
                n = f.readinto(buffer[done:])
                if not n:
                    raise ConvertError(f"{info.file}: ends inside tensor {name}; the shard is truncated")
                done += n
        return out


def dequantize_fp8(q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Block FP8 -> fp32: every element of q [..., out, in] times the scale of its
    block[0] x block[1] tile, scale_inv [..., ceil(out/b0), ceil(in/b1)]; exact products in fp32."""
    *lead, rows, cols = q.shape
    b0, b1 = block
    tiles = (math.ceil(rows / b0), math.ceil(cols / b1))
    assert tuple(scale_inv.shape) == (*lead, *tiles), (q.shape, scale_inv.shape, block)
    w = torch.zeros(*lead, tiles[0] * b0, tiles[1] * b1, dtype=torch.float32)
    w[..., :rows, :cols] = q.float()
    w = w.view(*lead, tiles[0], b0, tiles[1], b1) * scale_inv.float()[..., :, None, :, None]
    return w.view(*lead, tiles[0] * b0, tiles[1] * b1)[..., :rows, :cols].contiguous()


def quantize_fp8(w: torch.Tensor, block: tuple[int, int] = (128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] -> (e4m3 [out, in], scale_inv fp32 [ceil(out/b0), ceil(in/b1)]) with
    scale = tile amax / 448 (1 for an all-zero tile), so that dequantize_fp8 gives w back to e4m3
    precision."""
    rows, cols = w.shape
    b0, b1 = block
    tiles = (math.ceil(rows / b0), math.ceil(cols / b1))
    padded = torch.zeros(tiles[0] * b0, tiles[1] * b1, dtype=torch.float32)
    padded[:rows, :cols] = w.float()
    tiled = padded.view(tiles[0], b0, tiles[1], b1)
    amax = tiled.abs().amax(dim=(1, 3))
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (tiled / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.view(tiles[0] * b0, tiles[1] * b1)[:rows, :cols].contiguous(), scale


@dataclass(frozen=True)
class Planned:
    """A tensor to be written: its name, dtype and shape, known before its data."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class ShardWriter:
    """Writes planned tensors into shards of at most `max_shard_bytes` (a tensor larger than
    that gets a shard of its own), then the index.

    A tensor arrives whole or in rows of its first dimension (one expert of a fused [E, ...]
    tensor), rows in order. Data goes to disk in plan order: what arrives for a later tensor
    (the FP8 scales of a fused tensor whose rows are still coming) is held until its turn.
    Shards are named `model-<i>-of-<n>.safetensors` as `save_pretrained` names them.
    """

    def __init__(self, directory: Path, plan: list[Planned], max_shard_bytes: int):
        self.directory = Path(directory)
        self.shards: list[list[Planned]] = [[]]
        size = 0
        for item in plan:
            if self.shards[-1] and size + item.nbytes > max_shard_bytes:
                self.shards.append([])
                size = 0
            self.shards[-1].append(item)
            size += item.nbytes
        n = len(self.shards)
        self.names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.queue = [(shard, item) for shard, items in enumerate(self.shards) for item in items]
        self.position = 0
        self.rows_written = 0
        """Rows (of the first dimension) of the current tensor written so far."""
        self.pending: dict[str, list[torch.Tensor]] = {}
        self.file = None
        self.open_shard = -1
        self.total_bytes = sum(item.nbytes for item in plan)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write `tensor`, all of planned tensor `name` or its next row(s) of the first dimension."""
        self.pending.setdefault(name, []).append(tensor)
        while self.position < len(self.queue):
            shard, item = self.queue[self.position]
            pieces = self.pending.get(item.name)
            if not pieces:
                return
            if shard != self.open_shard:
                self._open(shard)
            for piece in pieces:
                rows = self._rows(item, piece)
                data = piece.detach().contiguous().reshape(-1).view(torch.uint8)
                self.file.write(memoryview(data.numpy()))
                self.rows_written += rows
            pieces.clear()
            total = item.shape[0] if item.shape else 1
            assert self.rows_written <= total, (item, self.rows_written)
            if self.rows_written < total:
                return
            del self.pending[item.name]
            self.position += 1
            self.rows_written = 0

    @staticmethod
    def _rows(item: Planned, piece: torch.Tensor) -> int:
        """Rows of `item`'s first dimension that `piece` holds: all of it, or one row."""
        assert piece.dtype == item.dtype, (item, piece.dtype)
        if tuple(piece.shape) == item.shape:
            return item.shape[0] if item.shape else 1
        assert tuple(piece.shape) == item.shape[1:], (item, piece.shape)
        return 1

    def _open(self, shard: int) -> None:
        if self.file is not None:
            self.file.close()
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for item in self.shards[shard]:
            header[item.name] = {"dtype": DTYPE_NAMES[item.dtype], "shape": list(item.shape),
                                 "data_offsets": [offset, offset + item.nbytes]}
            offset += item.nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # tensor data starts 8-byte aligned, as safetensors writes it
        self.directory.mkdir(parents=True, exist_ok=True)
        self.file = open(self.directory / self.names[shard], "wb")  # noqa: SIM115  (open across write() calls; close() ends it)
        self.file.write(struct.pack("<Q", len(encoded)) + encoded)
        self.open_shard = shard

    def close(self) -> None:
        """Finish the last shard and write the index; every planned tensor must have been written."""
        assert self.position == len(self.queue) and not self.pending, f"{len(self.queue) - self.position} planned tensors not written"
        if self.file is not None:
            self.file.close()
            self.file = None
        weight_map = {item.name: self.names[s] for s, items in enumerate(self.shards) for item in items}
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        tmp = self.directory / (INDEX + ".tmp")
        tmp.write_text(json.dumps(index, indent=2) + "\n")
        os.replace(tmp, self.directory / INDEX)
