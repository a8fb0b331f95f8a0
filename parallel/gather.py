"""Full parameters and gradients of a model in any parallel layout, under layout-independent
names: the harness that compares parallel layouts with the single-process run; and the
initialisation that makes every layout start from the same weights.

Each rank describes its pieces with megatron-core's `sharded_state_dict()` metadata (the one
dist_checkpointing reshards with): the checkpoint key, the global shape and this rank's offset
in it, and a replica id that is all zeros on exactly one holder of each piece. Keys do not
depend on the layout (expert keys carry global expert indices, layer numbers are global under
PP/VPP), so they are the canonical names. Gradients are DDP's `main_grad`, which has its
parameter's shape, so a gradient is placed exactly like its parameter.

Everything is gathered on rank 0: meant for tests and debugging of small models.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections.abc import Callable
from pathlib import Path

import torch
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

# (key, global shape, global offset, prepended axes, is main replica, local tensor)
Piece = tuple[str, tuple[int, ...], tuple[int, ...], int, bool, torch.Tensor]
# (checkpoint key, index on its prepended axes, full shape without them) -> full tensor, or None
FullTensorOf = Callable[[str, tuple[int, ...], tuple[int, ...]], "torch.Tensor | None"]
BUILT_CONSTANT = ("norm.weight", "norm_weight", "expert_bias")
"""Checkpoint keys whose built value is a constant, not a random draw: norm weights (ones) and
the router's expert bias (zeros)."""


def full_tensors(chunks, *, grads: bool) -> dict[str, torch.Tensor] | None:
    """{checkpoint key: full tensor} of the parameters (and buffers such as the router's expert
    bias), or of the parameters' gradients, on rank 0 (None elsewhere). Collective.

    `chunks` are the model chunks of this rank (DDP-wrapped or not; several under VPP). Copies
    of a piece held by several ranks (data-parallel replicas, TP-replicated weights, the last
    pipeline stage's copy of the embedding) must agree: an AssertionError names the key if not.
    """
    if grads:
        sharded = any(getattr(getattr(c, "ddp_config", None), "use_distributed_optimizer", False) for c in chunks)
        assert not sharded, (
            "the distributed optimizer reduce-scatters gradients: each rank holds only its shard "
            "of main_grad; gather gradients with optim.distributed=false"
        )
    pieces = [_piece(st, tensor) for st, tensor in _local_shards(chunks, grads)]
    gathered = [None] * torch.distributed.get_world_size() if torch.distributed.get_rank() == 0 else None
    torch.distributed.gather_object(pieces, gathered, dst=0)
    if gathered is None:
        return None
    return _assemble([p for rank_pieces in gathered for p in rank_pieces])


def dump(chunks, path: Path) -> None:
    """Write {"params": ..., "grads": ...} (full tensors, see `full_tensors`) to `path` on rank 0.
    Collective."""
    params = full_tensors(chunks, grads=False)
    grads = full_tensors(chunks, grads=True)
    if params is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"params": params, "grads": grads}, path)


@torch.no_grad()
def fill_local_shards(chunks, full_tensor_of: FullTensorOf) -> None:
    """Set every piece of every checkpoint key held by this rank from the key's full tensor.

    `full_tensor_of(key, lead, shape)` returns the full tensor of `key` (shape = the key's global
    shape without its prepended axes) at index `lead` on the prepended axes (the global expert
    index of an expert weight, () otherwise), or None to leave the pieces as built. This rank
    keeps its slice, so the same function fills any layout. Consecutive pieces of one (key,
    lead) (the two halves of a SwiGLU fc1, checkpointed apart) share one call; at most one full
    tensor is held at a time.
    """
    held, held_for = None, None
    for st, tensor in _local_shards(chunks, grads=False):
        prepend = st.prepend_axis_num
        lead, rest = tuple(st.global_offset[:prepend]), st.global_offset[prepend:]
        if held_for != (st.key, lead):
            held = None  # dropped before the next one is made
            held = full_tensor_of(st.key, lead, tuple(st.global_shape[prepend:]))
            held_for = (st.key, lead)
        if held is None:
            continue
        assert tuple(held.shape) == tuple(st.global_shape[prepend:]), (st.key, held.shape, st.global_shape)
        index = tuple(slice(o, o + n) for o, n in zip(rest, st.local_shape))  # local_shape has no prepended axes
        tensor.copy_(held[index].reshape(tensor.shape))


def local_keys(chunks) -> list[tuple[str, tuple[int, ...]]]:
    """(checkpoint key, index on its prepended axes) of every piece on this rank, each once."""
    seen = {}
    for st, _ in _local_shards(chunks, grads=False):
        seen[(st.key, tuple(st.global_offset[: st.prepend_axis_num]))] = None
    return list(seen)


def layout_independent_init(chunks, *, seed: int, std: float, num_layers: int, keys: set[str] | None = None) -> None:
    """Re-draw every randomly initialised weight so that it does not depend on the layout.

    megatron-core draws initial weights from per-rank RNG streams in build order, so a pipeline
    stage or an expert-parallel rank starts from other numbers than the single-process build.
    Here each weight is drawn from a generator seeded by (seed, checkpoint key, offsets on the
    key's prepended axes, e.g. the global expert index), as the full tensor of that key (one
    expert's, not all experts'), and this rank keeps its slice: every layout, and a resharded
    checkpoint, holds the same values. Normal(0, std); the projections that write into the
    residual stream (linear_proj, linear_fc2) get std / sqrt(2 * num_layers), as megatron's
    default output-layer init. Tensors built constant (norm weights: ones, the router's expert
    bias: zeros) are left as built. `keys`: only these checkpoint keys (default: all). Call on
    the built chunks before DDP wraps them and the optimizer copies them.
    """
    output_std = std / math.sqrt(2.0 * num_layers)
    device = next(getattr(chunks[0], "module", chunks[0]).parameters()).device

    def draw(key: str, lead: tuple[int, ...], shape: tuple[int, ...]) -> torch.Tensor | None:
        if (keys is not None and key not in keys) or key.endswith(BUILT_CONSTANT):
            return None
        generator = torch.Generator(device=device)
        generator.manual_seed((seed * 1_000_003 + zlib.crc32(f"{key}|{lead}".encode())) % (1 << 63))
        scale = output_std if key.endswith(("linear_proj.weight", "linear_fc2.weight")) else std
        return torch.randn(shape, generator=generator, device=device) * scale

    fill_local_shards(chunks, draw)


def _local_shards(chunks, grads: bool):
    """(ShardedTensor, the local tensor to gather for it) for every piece on this rank."""
    metadata = {"dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True)}
    for chunk in chunks:
        module = getattr(chunk, "module", chunk)  # DDP wraps the GPTModel
        grad_of = {id(p): p.main_grad for p in module.parameters() if getattr(p, "main_grad", None) is not None}
        for entry in nested_values(module.sharded_state_dict(metadata=metadata)):
            if isinstance(entry, ShardedTensorFactory):
                # e.g. the SwiGLU fc1 weight, checkpointed as two sharded halves
                if grads:
                    if id(entry.data) not in grad_of:
                        continue
                    entry = dataclasses.replace(entry, data=grad_of[id(entry.data)])
                for st in nested_values(entry.build()):
                    yield st, st.data
            elif isinstance(entry, ShardedTensor):
                if not grads:
                    yield entry, entry.data
                elif id(entry.data) in grad_of:
                    yield entry, grad_of[id(entry.data)]


def _piece(st: ShardedTensor, tensor: torch.Tensor) -> Piece:
    assert st.flattened_range is None, f"{st.key}: flattened shards are not model parameters"
    assert tuple(tensor.shape) == tuple(st.local_shape), (st.key, tensor.shape, st.local_shape)
    replica = st.replica_id if isinstance(st.replica_id, tuple) else (st.replica_id,)
    return (
        st.key, tuple(st.global_shape), tuple(st.global_offset), st.prepend_axis_num,
        all(r == 0 for r in replica), tensor.detach().to("cpu", copy=True),
    )


def _assemble(pieces: list[Piece]) -> dict[str, torch.Tensor]:
    full: dict[str, torch.Tensor] = {}
    covered: dict[str, torch.Tensor] = {}
    # Main replicas first, so that every other copy can be checked against them.
    for key, shape, offset, prepend, main, local in sorted(pieces, key=lambda p: not p[4]):
        if key not in full:
            full[key] = torch.empty(shape, dtype=local.dtype)
            covered[key] = torch.zeros(shape, dtype=torch.bool)
        index = tuple(slice(o, o + n) for o, n in zip(offset, (1,) * prepend + tuple(local.shape)))
        local = local.reshape(full[key][index].shape)
        if main:
            assert not covered[key][index].any(), f"{key}: two main replicas of the slice {index}"
            full[key][index] = local
            covered[key][index] = True
        else:
            assert covered[key][index].all(), f"{key}: a replica of the slice {index} has no main copy"
            assert torch.allclose(full[key][index], local, rtol=1e-6, atol=1e-9), (
                f"{key}: replicas of the slice {index} differ (max abs diff "
                f"{(full[key][index] - local).abs().max().item():.3g})"
            )
    for key, mask in covered.items():
        assert mask.all(), f"{key}: {int((~mask).sum())} of {mask.numel()} elements on no rank"
    return full
