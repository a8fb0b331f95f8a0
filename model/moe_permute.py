"""MoE token permutation without atomics when every token has the same number of experts.

Drop-in replacements for megatron-core 0.16.1's `moe_utils.permute` and `moe_utils.unpermute`
(same signatures, same results) on their unfused path (`moe_permute_fusion=False`, i.e. no
Transformer Engine). Upstream `unpermute` sums each token's k expert outputs with one
`scatter_add_`/`index_add_` of [N, h] rows into [T, h] (atomics: 43.6 ms at 128K tokens of M2's
layer on an H100), and `permute`'s backward (`index_select`'s) is the same reduction. When no
token is dropped every token has exactly k copies, so both reductions are a gather of the
token's k rows and a sum over them, and the other two directions are plain gathers:

    permute    forward   y[i] = x[token(i)]             gather
               backward  dx[t] = sum_j dy[row(t, j)]    gather + sum
    unpermute  forward   y[t] = sum_j x[row(t, j)]      gather + sum
               backward  dx[i] = dy[token(i)]           gather

The sums accumulate in fp32 (torch's reduction accumulator for bf16/fp16) and round once to
the input dtype. The permuted rows keep upstream's order (grouped by expert, tokens ascending
within an expert), so the expert GEMMs see the same input.

When the fast path runs (decided on the host from arguments, no device sync):

- `permute`: not `fused`, not `drop_and_pad`, and `num_out_tokens` a Python int equal to T * k
  with 1 <= k <= E. MoEAlltoAllTokenDispatcher passes the int `routing_map.size(0) *
  moe_router_topk` exactly when routing is dropless (no capacity factor, no router padding)
  and the counted total, a tensor, otherwise. That each token really has k experts is then
  checked with an asynchronous device assert: a routing map that breaks it fails loudly
  (on CUDA, as a device-side assert) instead of being permuted wrongly. The flex dispatcher's
  DeepEP path passes an int total for a map with unequal counts; it would hit that assert
  whenever the total divides by T, so these functions are for the alltoall dispatcher.
- `unpermute`: not `fused`, not `drop_and_pad`, and `sorted_indices` is the very tensor that the
  fast `permute` returned (the dispatchers hand permute's result back to unpermute); the copy
  layout computed there is found by the tensor's identity and lives as long as that tensor.

Everything else runs upstream's functions.

Legend: T tokens, E experts, k experts per token, N = T * k permuted rows, h hidden.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.transformer.moe import moe_utils
from torch.utils.weak import WeakIdKeyDictionary

# Bound at import, before anyone replaces the dispatcher's names with ours.
_upstream_permute = moe_utils.permute
_upstream_unpermute = moe_utils.unpermute

# Most bytes of gathered copies one step of `_sum_copies` holds (upstream holds none: it adds
# in place), so the extra memory stays small next to the [N, h] permuted tokens.
_SUM_CHUNK_BYTES = 256 << 20


@dataclass(frozen=True)
class _Layout:
    """Where each token's copies sit among the permuted rows."""

    rows_Tk: torch.Tensor  # permuted row of each token's j-th expert (experts ascending)
    probs_index_N: torch.Tensor  # each permuted row's flat index into the [T, E] probs
    num_experts: int


# sorted_indices returned by the fast `permute` -> its layout, for `unpermute`.
_LAYOUTS = WeakIdKeyDictionary()


def permute(
    tokens: torch.Tensor,
    routing_map: torch.Tensor,
    probs: torch.Tensor | None = None,
    num_out_tokens: int | None = None,
    fused: bool = False,
    drop_and_pad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Upstream's `permute`: tokens [T, h], routing_map [T, E] bool, probs [T, E] or None ->
    (permuted tokens [N, h], permuted probs [N] or None, sorted_indices [N], the token of each
    permuted row). Rows are grouped by expert, tokens ascending within an expert."""
    k = None if fused or drop_and_pad else _copies_per_token(routing_map, num_out_tokens)
    if k is None:
        return _upstream_permute(
            tokens,
            routing_map,
            probs=probs,
            num_out_tokens=num_out_tokens,
            fused=fused,
            drop_and_pad=drop_and_pad,
        )
    sorted_indices_N, layout = _layout(routing_map, k)
    _LAYOUTS[sorted_indices_N] = layout
    permuted_Nh = _Permute.apply(tokens, sorted_indices_N, layout.rows_Tk)
    permuted_probs_N = None
    if probs is not None:
        permuted_probs_N = probs.reshape(-1).index_select(0, layout.probs_index_N)
    return permuted_Nh, permuted_probs_N, sorted_indices_N


def unpermute(
    permuted_tokens: torch.Tensor,
    sorted_indices: torch.Tensor,
    restore_shape: torch.Size,
    probs: torch.Tensor | None = None,
    routing_map: torch.Tensor | None = None,
    fused: bool = False,
    drop_and_pad: bool = False,
) -> torch.Tensor:
    """Upstream's `unpermute`: permuted tokens [N, h] -> [T, h] (restore_shape), each token the
    sum of its copies, each copy first multiplied by its routing probability when probs [T, E]
    (with routing_map) is given; in permuted_tokens' dtype."""
    layout = None if fused or drop_and_pad else _LAYOUTS.get(sorted_indices)
    fast = layout is not None and restore_shape[0] == layout.rows_Tk.shape[0]
    if fast and probs is not None:
        # upstream selects the probs with routing_map; our index comes from the map permute saw
        probs_shape = (layout.rows_Tk.shape[0], layout.num_experts)
        fast = routing_map is not None and probs.shape == routing_map.shape == probs_shape
    if not fast:
        return _upstream_unpermute(
            permuted_tokens,
            sorted_indices,
            restore_shape,
            probs=probs,
            routing_map=routing_map,
            fused=fused,
            drop_and_pad=drop_and_pad,
        )
    input_dtype = permuted_tokens.dtype
    if probs is not None:
        # where and in which (promoted) dtype upstream multiplies: each copy, before the sum
        permuted_probs_N = probs.reshape(-1).index_select(0, layout.probs_index_N)
        permuted_tokens = permuted_tokens * permuted_probs_N.unsqueeze(-1)
    return _Unpermute.apply(permuted_tokens, sorted_indices, layout.rows_Tk).to(input_dtype)


def _copies_per_token(routing_map: torch.Tensor, num_out_tokens) -> int | None:
    """k when num_out_tokens is a host int T * k with 1 <= k <= E (the dispatcher's dropless
    count), else None."""
    num_tokens, num_experts = routing_map.shape
    if isinstance(num_out_tokens, bool) or not isinstance(num_out_tokens, int) or num_tokens == 0:
        return None
    k, rest = divmod(num_out_tokens, num_tokens)
    return k if rest == 0 and 1 <= k <= num_experts else None


def _layout(routing_map_TE: torch.Tensor, k: int) -> tuple[torch.Tensor, _Layout]:
    """Upstream's sorted_indices [N] and the copy layout of a routing map with k experts per
    token, from static-shaped ops (upstream's masked_select waits for the device)."""
    num_tokens, num_experts = routing_map_TE.shape
    torch._assert_async(
        (routing_map_TE.sum(dim=1) == k).all(),
        f"moe_permute: num_out_tokens says every token has {k} experts; the routing map disagrees",
    )
    # a stable descending sort puts each token's chosen experts first, in ascending order
    experts_Tk = routing_map_TE.to(torch.uint8).argsort(dim=1, descending=True, stable=True)[:, :k]
    experts_N = experts_Tk.reshape(-1)
    # sorting the copies (token-major) stably by expert gives upstream's row order
    copy_of_row_N = experts_N.argsort(stable=True)  # t * k + j of each permuted row
    rows_Tk = copy_of_row_N.argsort().view(num_tokens, k)
    sorted_indices_N = copy_of_row_N.div(k, rounding_mode="floor")
    probs_index_N = sorted_indices_N * num_experts + experts_N.index_select(0, copy_of_row_N)
    return sorted_indices_N, _Layout(rows_Tk, probs_index_N, num_experts)


def _sum_copies(x_Nh: torch.Tensor, rows_Tk: torch.Tensor) -> torch.Tensor:
    """[T, h]: row t is the sum of x's rows rows_Tk[t] (fp32 accumulation, one rounding), in
    steps of tokens so that the gathered copies stay under _SUM_CHUNK_BYTES."""
    num_tokens, k = rows_Tk.shape
    hidden = x_Nh.shape[1]
    out_Th = x_Nh.new_empty(num_tokens, hidden)
    step = max(1, _SUM_CHUNK_BYTES // max(1, k * hidden * x_Nh.element_size()))
    for start in range(0, num_tokens, step):
        rows_tk = rows_Tk[start : start + step]
        copies_tkh = x_Nh.index_select(0, rows_tk.reshape(-1)).view(rows_tk.shape[0], k, hidden)
        torch.sum(copies_tkh, dim=1, out=out_Th[start : start + step])
    return out_Th


class _Permute(torch.autograd.Function):
    """tokens [T, h] -> copies [N, h] in permuted order; backward sums each token's copies."""

    @staticmethod
    def forward(ctx, tokens_Th, sorted_indices_N, rows_Tk):
        ctx.save_for_backward(sorted_indices_N, rows_Tk)
        return tokens_Th.index_select(0, sorted_indices_N)

    @staticmethod
    def backward(ctx, grad_Nh):
        sorted_indices_N, rows_Tk = ctx.saved_tensors
        return _Unpermute.apply(grad_Nh, sorted_indices_N, rows_Tk), None, None


class _Unpermute(torch.autograd.Function):
    """copies [N, h] -> [T, h], each token the sum of its copies; backward gathers."""

    @staticmethod
    def forward(ctx, permuted_Nh, sorted_indices_N, rows_Tk):
        ctx.save_for_backward(sorted_indices_N, rows_Tk)
        return _sum_copies(permuted_Nh, rows_Tk)

    @staticmethod
    def backward(ctx, grad_Th):
        sorted_indices_N, rows_Tk = ctx.saved_tensors
        return _Permute.apply(grad_Th, sorted_indices_N, rows_Tk), None, None
