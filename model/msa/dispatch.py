"""Which implementation runs each MSA op: decided here, per op and call, and nowhere else.

- `reference` (model.msa.reference, chunked PyTorch): tensors not on CUDA, installs whose Triton
  kernels do not import, and what the kernels do not compute: attention with 0 < q_offset < S,
  the block mass with any query offset, the KL loss over rows of more than `_KL_MAX_SLOTS` slots.
- `triton` (the kernels of model.msa.ops): CUDA tensors. The attention kernels have no query
  offset; attention with q_offset >= S (context parallelism's ring steps against an earlier
  shard) runs them on the queries put after the keys (`attention_after_keys`).
- `sm90` (the Gluon kernels of model.msa.ops.*_sm90) instead of `triton` on Hopper (compute
  capability 9) with a Triton they were tested with (`_GLUON_TRITON`), where they import and
  take the inputs: bf16/fp16, head dim 64 or 128 (index head dim padded), blocks of 16 .. 128
  keys, 128-row attention tiles, and blocks of more than 32 keys for the attention backward. An
  sm90 GPU that cannot use them warns once and runs the Triton kernels.

The attention's forward and backward are chosen separately, both when the forward runs (the
backward runs on autograd's thread, outside any `msa_backends` block). The launchers run what
they are told.

`msa_backends` forces backends, and the attention's tiles, inside a `with` block: the tests
compare the kernels with each other and with the reference (the Triton ones on CPU tensors under
TRITON_INTERPRET=1), the benchmark times variants.

Legend: B batch, S tokens (queries), Hq query heads, G groups, D head dim, Di index head dim,
K top-k slots, bs block size.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import types
import warnings
from typing import TYPE_CHECKING

import torch

from model.msa import reference
from model.triton_support import INTERPRET

if TYPE_CHECKING:
    from model.msa.ops.common import AttnConfig

BACKENDS = ("reference", "triton", "sm90")

# Triton versions whose Gluon (an experimental API that changes between releases) the sm90
# kernels were written and tested against
_GLUON_TRITON = ("3.6.",)


@dataclasses.dataclass(frozen=True)
class _Forced:
    select: str | None = None
    attention: str | None = None
    attention_bwd: str | None = None
    block_mass: str | None = None
    block_scores: str | None = None
    kl_loss: str | None = None
    attention_config: AttnConfig | None = None


_FORCED = contextvars.ContextVar("msa_backends", default=_Forced())


@contextlib.contextmanager
def msa_backends(*, select: str | None = None, attention: str | None = None, attention_bwd: str | None = None,
                 block_mass: str | None = None, block_scores: str | None = None, kl_loss: str | None = None,
                 attention_config: AttnConfig | None = None):
    """Inside the block, run MSA's ops on the given backends ("reference", "triton", "sm90";
    None: chosen per call as usual). Nested blocks override what they name.

    Args:
        select: `msa_select`.
        attention: `msa_attention*`, forward and backward (unless attention_bwd says otherwise).
        attention_bwd: the attention backward alone ("triton" or "sm90": the forward's kernels
            must be the Triton or sm90 ones too).
        block_mass, block_scores, kl_loss: `attention_block_mass`, `msa_block_scores`,
            `indexer_kl_loss` ("reference" or "triton").
        attention_config: the Triton attention kernels' tiles (`model.msa.ops.common.AttnConfig`;
            None: the default for the device and dtype).

    A forced kernel backend that cannot run the call (no CUDA and no TRITON_INTERPRET=1, not an
    sm90 GPU or inputs the sm90 kernels do not take, a query offset the kernels lack) raises
    ValueError rather than running something else.
    """
    given = dict(select=select, attention=attention, attention_bwd=attention_bwd, block_mass=block_mass,
                 block_scores=block_scores, kl_loss=kl_loss)
    for op, backend in given.items():
        allowed = {"attention_bwd": ("triton", "sm90"), "block_mass": ("reference", "triton"),
                   "block_scores": ("reference", "triton"), "kl_loss": ("reference", "triton")}.get(op, BACKENDS)
        if backend is not None and backend not in allowed:
            raise ValueError(f"msa_backends({op}={backend!r}): expected one of {allowed} or None")
    given["attention_config"] = attention_config
    outer = _FORCED.get()
    token = _FORCED.set(dataclasses.replace(outer, **{k: v for k, v in given.items() if v is not None}))
    try:
        yield
    finally:
        _FORCED.reset(token)


def select_backend(index_q: torch.Tensor, block_size: int) -> str:
    """The backend `select` runs for these index queries [B, S, G, Di]."""
    forced = _FORCED.get().select
    if forced == "reference" or (forced is None and not _on_kernels(index_q)):
        return "reference"
    return _kernel_backend(forced, index_q, "select", lambda sm90: sm90.select.supported(index_q, block_size))


def select(index_q: torch.Tensor, index_k: torch.Tensor, block_size: int, topk: int, local_blocks: int,
           q_offset: int) -> torch.Tensor:
    """`model.msa.api.msa_select` (arguments checked there) on its backend."""
    backend = select_backend(index_q, block_size)
    if backend == "reference":
        return reference.msa_select(index_q, index_k, block_size, topk, local_blocks, q_offset)
    ops = _sm90_for(index_q).select if backend == "sm90" else _kernels().select
    return ops.select(index_q, index_k, block_size, topk, local_blocks, q_offset)


def select_with_scores(index_q: torch.Tensor, index_k: torch.Tensor, block_size: int, topk: int,
                       local_blocks: int, q_offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`model.msa.api.msa_select_with_scores` (arguments checked there): -> block ids, then their
    scores by `block_scores` (a second pass over the selected blocks only: keeping them in the
    selection's pass made the Triton selection 2x slower, see `model.msa.ops.select`)."""
    with torch.no_grad():
        blocks = select(index_q, index_k, block_size, topk, local_blocks, q_offset)
    return blocks, block_scores(index_q, index_k, blocks, block_size, q_offset)


def attention_backends(q: torch.Tensor, block_size: int, q_offset: int = 0) -> tuple[str, str]:
    """The backends (forward, backward) `attention` runs for queries q [B, S, Hq, D]."""
    forced = _FORCED.get()
    S = q.shape[1]
    on_kernels = _on_kernels(q) and (q_offset == 0 or q_offset >= S)
    if forced.attention == "reference" or (forced.attention is None and not on_kernels):
        if forced.attention_bwd is not None:
            raise ValueError(f"msa_backends(attention_bwd={forced.attention_bwd!r}): the forward runs the reference "
                             f"on {_describe(q)} at q_offset={q_offset}, and with it the reference backward")
        return "reference", "reference"
    if 0 < q_offset < S:
        raise ValueError(f"q_offset={q_offset} with S={S}: the attention kernels take q_offset 0 or >= S")

    def takes(direction):
        return lambda sm90: (_attention_config(q).block_m == 128
                             and getattr(sm90.attention, direction)(q, block_size))

    fwd = _kernel_backend(forced.attention, q, "attention", takes("supported"))
    bwd = _kernel_backend(forced.attention_bwd or forced.attention, q, "attention_bwd", takes("bwd_supported"))
    return fwd, bwd


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_indices: torch.Tensor, block_size: int,
              scale: float, q_offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`model.msa.api.msa_attention_with_lse` (arguments checked there) on its backends:
    -> out [B, S, Hq, D], lse [B, S, Hq] fp32."""
    fwd, bwd = attention_backends(q, block_size, q_offset)
    if fwd == "reference":
        return reference.msa_attention(q, k, v, block_indices, block_size, scale, q_offset)
    if q_offset:
        return attention_after_keys(q, k, v, block_indices, block_size, scale)
    return _kernels().attention.sparse_attention(q, k, v, block_indices, block_size, scale, _attention_config(q),
                                                 fwd=_launchers(q, fwd).attn_fwd, bwd=_launchers(q, bwd).attn_bwd)


def _launchers(q: torch.Tensor, backend: str) -> types.ModuleType:
    """The module whose attention launchers a kernel backend ("triton", "sm90") runs."""
    return _sm90_for(q).attention if backend == "sm90" else _kernels().attention


def attention_with_mass(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_indices: torch.Tensor,
                        block_size: int, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`model.msa.api.msa_attention_with_mass` (arguments checked there): -> out, lse and p_main
    [B, G, S, K]. Where the attention forward runs a kernel (Triton or sm90; block_mass not forced
    to the reference), that kernel computes the mass in its own pass; otherwise `attention` then
    `block_mass`."""
    fwd, bwd = attention_backends(q, block_size)
    if fwd != "reference" and _FORCED.get().block_mass in (None, "triton"):
        kernels = _kernels()
        out, lse, head_mass = kernels.attention.sparse_attention(
            q, k, v, block_indices, block_size, scale, _attention_config(q), fwd=_launchers(q, fwd).attn_fwd,
            bwd=_launchers(q, bwd).attn_bwd, mass=True)
        return out, lse, kernels.indexer.p_main_of(head_mass)
    out, lse = attention(q, k, v, block_indices, block_size, scale, 0)
    return out, lse, block_mass(q.detach(), k.detach(), lse.detach(), block_indices, block_size, scale, 0)


def attention_after_keys(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_indices: torch.Tensor,
                         block_size: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`attention` with q_offset = S through the offset-free kernels: the queries become rows
    S .. 2S-1 of a sequence whose first S rows are the keys (the other rows are zeros that
    select nothing), so every selected key is earlier than every query."""
    Sl = q.shape[1]
    q, idx = (torch.cat([torch.full_like(x, fill), x], dim=d) for x, fill, d in ((q, 0, 1), (block_indices, -1, 2)))
    k, v = (torch.cat([x, torch.zeros_like(x)], dim=1) for x in (k, v))
    out, lse = attention(q, k, v, idx, block_size, scale, 0)
    return out[:, Sl:], lse[:, Sl:]


def block_mass(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, block_indices: torch.Tensor, block_size: int,
               scale: float, q_offset: int) -> torch.Tensor:
    """`model.msa.api.attention_block_mass` (arguments checked there) on its backend."""
    forced = _FORCED.get().block_mass
    backend = forced or ("triton" if _on_kernels(q) and not q_offset else "reference")
    if backend == "reference":
        return reference.attention_block_mass(q, k, lse, block_indices, block_size, scale, q_offset)
    if q_offset:
        raise ValueError(f"msa_backends(block_mass='triton'): the kernel has no query offset (q_offset={q_offset})")
    _check_kernels_run("block_mass", forced, q)
    return _kernels().indexer.block_mass(q, k, lse, block_indices, block_size, scale)


def block_scores(index_q: torch.Tensor, index_k: torch.Tensor, block_indices: torch.Tensor, block_size: int,
                 q_offset: int) -> torch.Tensor:
    """`model.msa.api.msa_block_scores` (arguments checked there) on its backend."""
    forced = _FORCED.get().block_scores
    backend = forced or ("triton" if _on_kernels(index_q) else "reference")
    if backend == "reference":
        return reference.msa_block_scores(index_q, index_k, block_indices, block_size, q_offset)
    if forced:
        _check_kernels_run("block_scores", forced, index_q)
    return _kernels().indexer.block_scores(index_q, index_k, block_indices, block_size, q_offset)


# slots per row the KL kernel takes in one tile (the sparse mode's K; the dense warm-up's nb up
# to 512K tokens at 128-key blocks); longer rows run the reference
_KL_MAX_SLOTS = 4096


def indexer_kl_loss(p_main: torch.Tensor, index_scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """`model.msa.api.indexer_kl_loss` (arguments checked there, valid bool) on its backend."""
    forced = _FORCED.get().kl_loss
    fits = index_scores.shape[-1] <= _KL_MAX_SLOTS
    backend = forced or ("triton" if _on_kernels(index_scores) and fits else "reference")
    if backend == "reference":
        return reference.indexer_kl_loss(p_main, index_scores, valid)
    if forced:
        if not fits:
            raise ValueError(f"msa_backends(kl_loss='triton'): rows of {index_scores.shape[-1]} slots; the kernel "
                             f"takes at most {_KL_MAX_SLOTS}")
        _check_kernels_run("kl_loss", forced, index_scores)
    return _kernels().indexer.indexer_kl_loss(p_main, index_scores, valid)


def _attention_config(q: torch.Tensor) -> AttnConfig:
    return _FORCED.get().attention_config or _kernels().common.attn_config_for(q.device, q.dtype)


def _on_kernels(x: torch.Tensor) -> bool:
    """Whether the kernels run on x unless a backend is forced: CUDA, and they import."""
    return x.is_cuda and _kernels() is not None


def _kernel_backend(forced: str | None, x: torch.Tensor, op: str, sm90_takes) -> str:
    """"triton" or "sm90" for an op whose kernels run on x: `forced`, once checked that it can
    run, else "sm90" where `sm90_takes(the sm90 modules)` says those kernels take the inputs."""
    if forced is not None:
        _check_kernels_run(op, forced, x)
    sm90 = _sm90_for(x) if forced in (None, "sm90") else None
    sm90_ok = sm90 is not None and sm90_takes(sm90)
    if forced == "sm90" and not sm90_ok:
        raise ValueError(f"msa_backends({op}='sm90'): the sm90 kernels do not run on {_describe(x)} here (they "
                         "need an sm90 GPU, bf16/fp16, head dim 64 or 128, blocks of 16 .. 128 keys (more than 32 "
                         "in the attention backward) and 128-row attention tiles)")
    return forced or ("sm90" if sm90_ok else "triton")


def _check_kernels_run(op: str, backend: str, x: torch.Tensor) -> None:
    """Raise where the kernels of a forced backend cannot run on x."""
    if _kernels() is None:
        raise ValueError(f"msa_backends({op}={backend!r}): the Triton kernels (model.msa.ops) do not import here")
    if not (x.is_cuda or INTERPRET):
        raise ValueError(f"msa_backends({op}={backend!r}): the kernels run on CUDA tensors, or on CPU tensors "
                         "under TRITON_INTERPRET=1")


def _describe(x: torch.Tensor) -> str:
    return f"{x.dtype} {x.device.type} tensors of shape {tuple(x.shape)}"


@functools.cache
def _kernels() -> types.SimpleNamespace | None:
    """The Triton kernels' modules, or None where they do not import (no Triton)."""
    try:
        from model.msa.ops import attention, common, indexer, select
    except ImportError:
        return None
    return types.SimpleNamespace(attention=attention, common=common, indexer=indexer, select=select)


@functools.cache
def _sm90(capability_major: int) -> types.SimpleNamespace | None:
    """The sm90 Gluon kernels' modules on Hopper (capability 9) with a Triton whose Gluon they
    were tested against, else None: the Triton kernels run (with a warning where an sm90 GPU
    could have used the Gluon ones)."""
    if capability_major != 9 or _kernels() is None:
        return None
    import triton

    if not triton.__version__.startswith(_GLUON_TRITON):
        warnings.warn(f"MSA: the sm90 Gluon kernels are tested with triton {'/'.join(_GLUON_TRITON)}x only, "
                      f"not {triton.__version__}; using the Triton kernels", stacklevel=2)
        return None
    try:
        from model.msa.ops import attention_sm90, select_sm90
    except (ImportError, AttributeError) as e:
        warnings.warn(f"MSA: the sm90 Gluon kernels do not import with triton {triton.__version__} ({e}); "
                      "using the Triton kernels", stacklevel=2)
        return None
    return types.SimpleNamespace(attention=attention_sm90, select=select_sm90)


def _sm90_for(x: torch.Tensor) -> types.SimpleNamespace | None:
    """`_sm90` for the device of x (None off CUDA)."""
    return _sm90(torch.cuda.get_device_capability(x.device)[0]) if x.is_cuda else None
