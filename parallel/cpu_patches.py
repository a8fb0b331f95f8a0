"""Everything needed to run megatron-core 0.16.1 with gloo on a machine without CUDA.

megatron-core hard-codes CUDA in a handful of places. Each patch below names the upstream
function it works around and why; `apply()` installs them all, once, and only when CUDA is
absent, so GPU runs execute megatron-core unmodified. tests/test_cpu_patches.py checks each
patch both ways: upstream still fails without it (so a fixed upstream tells us to delete the
patch) and works with it.

One patch is not about CUDA: `te_general_gemm` is needed wherever Transformer Engine is missing,
GPU machines included, so each patch carries the condition under which it applies.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

CPU = torch.device("cpu")


@dataclass
class Patch:
    """Attribute replacements that work around one upstream CUDA assumption."""

    upstream: str
    """Upstream file and function the patch works around."""
    why: str
    """What fails on CPU without it."""
    make: Callable[[], list[tuple[Any, str, Any]]]
    """Returns (owner, attribute, replacement) triples; called at apply time (lazy imports)."""
    needed: Callable[[], bool]
    """Whether this machine needs the patch."""
    _saved: list[tuple[Any, str, Any]] = field(default_factory=list)

    def install(self) -> None:
        if self._saved:
            return
        for owner, attr, new in self.make():
            self._saved.append((owner, attr, getattr(owner, attr, _MISSING)))
            setattr(owner, attr, new)

    def remove(self) -> None:
        for owner, attr, old in reversed(self._saved):
            if old is _MISSING:
                delattr(owner, attr)
            else:
                setattr(owner, attr, old)
        self._saved.clear()


_MISSING = object()


PATCHES: dict[str, Patch] = {}


def no_cuda() -> bool:
    return not torch.cuda.is_available()


def no_te() -> bool:
    try:
        from megatron.core.transformer.moe import moe_utils
    except ImportError:
        return False
    return not moe_utils.HAVE_TE


def patch(name: str, upstream: str, why: str, needed: Callable[[], bool] = no_cuda):
    def register(make):
        PATCHES[name] = Patch(upstream, why, make, needed)
        return make

    return register


def apply() -> None:
    """Install every patch this machine needs (none on a GPU machine with Transformer Engine)."""
    for p in PATCHES.values():
        if p.needed():
            p.install()


@contextlib.contextmanager
def removed(name: str):
    """Temporarily take one patch out (tests use it to show upstream still needs it)."""
    p = PATCHES[name]
    was = bool(p._saved)
    p.remove()
    try:
        yield
    finally:
        if was:
            p.install()


@patch(
    "current_device",
    upstream="torch.cuda.current_device, called by megatron/core (e.g. transformer/moe/router.py "
    "TopKRouter.__init__, distributed/param_and_grad_buffer.py _ParamAndGradBuffer.__init__, "
    "transformer/multi_token_prediction.py MTPLossLoggingHelper.save_loss_to_tracker)",
    why="megatron allocates buffers with device=torch.cuda.current_device(), which raises "
    "'Torch not compiled with CUDA enabled'",
)
def _current_device():
    return [(torch.cuda, "current_device", lambda: CPU)]


def _cpu_tracker_add(self, name, seed):
    """CudaRNGStatesTracker.add with the CPU generator standing in for the CUDA one."""
    self._is_initialized = True
    if seed in self.seeds_:
        raise Exception(f"seed {seed} already exists")
    if name in self.states_:
        raise Exception(f"rng state {name} already exists")
    self.seeds_.add(seed)
    orig = torch.get_rng_state()
    torch.manual_seed(seed)
    self.states_[name] = torch.get_rng_state()
    torch.set_rng_state(orig)


@contextlib.contextmanager
def _cpu_tracker_fork(self, name="model-parallel-rng"):
    """CudaRNGStatesTracker.fork on the CPU generator (upstream also warns whenever the CPU
    state changes inside the fork, which on CPU is every time)."""
    if name not in self.states_:
        raise Exception(f"rng state {name} is not added")
    orig = torch.get_rng_state()
    torch.set_rng_state(self.states_[name])
    try:
        yield
    finally:
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(orig)


@patch(
    "rng_tracker",
    upstream="megatron/core/tensor_parallel/random.py CudaRNGStatesTracker.add/.fork, "
    "_get_cuda_rng_state, _set_cuda_rng_state, model_parallel_cuda_manual_seed",
    why="the tensor/expert-parallel RNG streams are CUDA generator states "
    "(torch.cuda.get_rng_state raises without CUDA); on CPU they become CPU generator states",
)
def _rng_tracker():
    from megatron.core.tensor_parallel import random as mrandom

    return [
        (mrandom.CudaRNGStatesTracker, "add", _cpu_tracker_add),
        (mrandom.CudaRNGStatesTracker, "fork", _cpu_tracker_fork),
        (mrandom, "_get_cuda_rng_state", lambda *a, **k: torch.get_rng_state()),
        (mrandom, "_set_cuda_rng_state", lambda state, *a, **k: torch.set_rng_state(state)),
    ]


class _HostEvent:
    """A CUDA event stand-in: host work is already complete when recorded."""

    def synchronize(self) -> None:
        pass

    def wait(self, stream=None) -> None:
        pass

    def query(self) -> bool:
        return True


class _HostStream:
    """A CUDA stream stand-in: on CPU every op runs in order on the host."""

    def __new__(cls, *args, **kwargs):
        return super().__new__(cls)

    def wait_stream(self, other) -> None:
        pass

    def wait_event(self, event) -> None:
        pass

    def record_event(self, event=None) -> _HostEvent:
        return event or _HostEvent()

    def synchronize(self) -> None:
        pass

    def __eq__(self, other) -> bool:
        return isinstance(other, _HostStream)

    def __hash__(self) -> int:
        return 0


_HOST_STREAM = _HostStream()


@patch(
    "streams",
    upstream="torch.cuda.Stream/current_stream/stream/Event/synchronize, used by megatron/core/"
    "transformer/moe/token_dispatcher.py MoEAlltoAllTokenDispatcher.__init__ and "
    "._maybe_dtoh_and_synchronize, and pipeline_parallel/p2p_communication.py _communicate",
    why="the all-to-all dispatcher creates a device-to-host copy stream at construction "
    "(torch.cuda.Stream requires CUDA support); pipeline p2p calls torch.cuda.synchronize()",
)
def _streams():
    return [
        (torch.cuda, "Stream", _HostStream),
        (torch.cuda, "Event", _HostEvent),
        (torch.cuda, "current_stream", lambda device=None: _HOST_STREAM),
        (torch.cuda, "stream", lambda stream=None: contextlib.nullcontext()),
        (torch.cuda, "synchronize", lambda device=None: None),
    ]


@patch(
    "causal_mask",
    upstream="megatron/core/transformer/utils.py get_default_causal_mask (imported by "
    "megatron/core/fusions/fused_softmax.py FusedScaleMaskSoftmax.forward_torch_softmax)",
    why="the local attention's default causal mask is built with device='cuda'",
)
def _causal_mask():
    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer import utils

    def get_default_causal_mask(sq: int) -> torch.Tensor:
        return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)

    return [
        (utils, "get_default_causal_mask", get_default_causal_mask),
        (fused_softmax, "get_default_causal_mask", get_default_causal_mask),
    ]


@patch(
    "te_general_gemm",
    upstream="megatron/core/transformer/moe/moe_utils.py RouterGatingLinearFunction.forward/backward",
    why="the router's fp32 gating GEMM tests `te_general_gemm is not None`, but the name is only "
    "defined when Transformer Engine imports: NameError without TE, on CPU and GPU alike",
    needed=no_te,
)
def _te_general_gemm():
    from megatron.core.transformer.moe import moe_utils

    return [(moe_utils, "te_general_gemm", None)]


def _cpu_fp32_optimizer_init(self, optimizer, config, init_state_fn):
    from megatron.core.optimizer.optimizer import MegatronOptimizer

    MegatronOptimizer.__init__(self, optimizer, config, init_state_fn)
    self._scale = torch.tensor([1.0], dtype=torch.float)
    self.is_stub_optimizer = optimizer is None


@patch(
    "fp32_optimizer",
    upstream="megatron/core/optimizer/optimizer.py FP32Optimizer.__init__",
    why="the fp32 optimizer's constant loss scale is created with device='cuda'",
)
def _fp32_optimizer():
    from megatron.core.optimizer.optimizer import FP32Optimizer

    return [(FP32Optimizer, "__init__", _cpu_fp32_optimizer_init)]


def _cpu_grad_norm_fp32(grads_for_norm, norm_type=2, grad_stats_parallel_group=None):
    """get_grad_norm_fp32 on host tensors (no FSDP/DTensor grads on CPU)."""
    if isinstance(grads_for_norm, torch.Tensor):
        grads_for_norm = [grads_for_norm]
    norm_type = float(norm_type)
    if norm_type == float("inf"):
        total = torch.tensor([max((g.abs().max().item() for g in grads_for_norm), default=0.0)])
        torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.MAX, group=grad_stats_parallel_group)
        return total.item()
    total = torch.zeros(1, dtype=torch.float)
    for g in grads_for_norm:
        total += torch.linalg.vector_norm(g.float(), norm_type) ** norm_type
    torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.SUM, group=grad_stats_parallel_group)
    return total.item() ** (1.0 / norm_type)


def _cpu_clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """clip_grad_by_total_norm_fp32 without the CUDA-only dtype assert and overflow buffer."""
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr) for p in parameters if getattr(p, attr, None) is not None]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0:
        torch._foreach_mul_(grads, clip_coeff)


@patch(
    "grad_clip",
    upstream="megatron/core/optimizer/clip_grads.py get_grad_norm_fp32 and "
    "clip_grad_by_total_norm_fp32 (as imported into megatron/core/optimizer/optimizer.py)",
    why="the norm and overflow buffers are created with device='cuda' and clipping asserts "
    "grad.type() == 'torch.cuda.FloatTensor'",
)
def _grad_clip():
    from megatron.core.optimizer import clip_grads, optimizer

    return [
        (module, name, new)
        for module in (clip_grads, optimizer)
        for name, new in (
            ("get_grad_norm_fp32", _cpu_grad_norm_fp32),
            ("clip_grad_by_total_norm_fp32", _cpu_clip_grad_by_total_norm_fp32),
        )
    ]


class _HostTorch:
    """`torch` as seen by one upstream module, with device='cuda' factory calls sent to the host.

    Replaces the module's global name `torch`, so only that module's calls are redirected.
    """

    _FACTORIES = ("zeros", "ones", "empty", "full", "tensor", "arange")

    def __getattr__(self, name):
        real = getattr(torch, name)
        if name not in self._FACTORIES:
            return real

        def factory(*args, **kwargs):
            if str(kwargs.get("device", "")).startswith("cuda"):
                kwargs["device"] = CPU
            return real(*args, **kwargs)

        return factory


@patch(
    "schedules",
    upstream="megatron/core/pipeline_parallel/schedules.py forward_backward_no_pipelining, "
    "forward_backward_pipelining_with_interleaving, forward_backward_pipelining_without_interleaving",
    why="each schedule counts tokens in torch.zeros([], device='cuda')",
)
def _schedules():
    from megatron.core.pipeline_parallel import schedules

    return [(schedules, "torch", _HostTorch())]


@patch(
    "jit_fuser",
    upstream="megatron/core/jit.py jit_fuser (= torch.compile), decorating e.g. "
    "transformer/moe/router.py TopKRouter._apply_expert_bias",
    why="on CPU each decorated function is compiled by Inductor's C++ backend at first call: "
    "~15 s of start-up for a few element-wise ops; eager mode computes the same values",
)
def _jit_fuser():
    import torch._dynamo

    return [(torch._dynamo.config, "disable", True)]


def _host_split_sizes(tensor, as_numpy=False, record_stream=False):
    """maybe_move_tensor_to_cpu that also turns host tensors into numpy when asked."""
    if torch.is_tensor(tensor) and as_numpy:
        return tensor.cpu().numpy()
    return tensor


@patch(
    "all_to_all_splits",
    upstream="megatron/core/transformer/moe/moe_utils.py maybe_move_tensor_to_cpu (as used by "
    "token_dispatcher.py MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize)",
    why="the expert-parallel all-to-all split sizes become numpy only when they start on the GPU; "
    "on CPU they stay tensors and all_to_all_single rejects them as split sizes",
)
def _all_to_all_splits():
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    return [
        (moe_utils, "maybe_move_tensor_to_cpu", _host_split_sizes),
        (token_dispatcher, "maybe_move_tensor_to_cpu", _host_split_sizes),
    ]


def _without_tensor_cuda(fn):
    """Run `fn` with Tensor.cuda() returning the tensor itself (host tensors stay on the host)."""

    def wrapper(*args, **kwargs):
        real = torch.Tensor.cuda
        torch.Tensor.cuda = lambda self, *a, **k: self
        try:
            return fn(*args, **kwargs)
        finally:
            torch.Tensor.cuda = real

    wrapper.__wrapped__ = fn
    return wrapper


@patch(
    "pp_embedding_cuda",
    upstream="megatron/core/models/common/language_module/language_module.py "
    "LanguageModule.setup_embeddings_and_output_layer",
    why="under pipeline parallelism with MTP (or tied embeddings) the embedding copy on the last "
    "stage is moved with .cuda() before its all-reduce",
)
def _pp_embedding_cuda():
    from megatron.core.models.common.language_module.language_module import LanguageModule

    return [
        (
            LanguageModule,
            "setup_embeddings_and_output_layer",
            _without_tensor_cuda(LanguageModule.setup_embeddings_and_output_layer),
        )
    ]


def _host_pos_emb_on_this_cp_rank(pos_emb, seq_dim, cp_group):
    """get_pos_emb_on_this_cp_rank with the chunk ids on the embedding's own device."""
    if cp_group is None:
        raise ValueError("cp_group must be provided to get positional embedding per CP rank")
    cp_size, cp_rank = cp_group.size(), cp_group.rank()
    cp_idx = torch.tensor([cp_rank, 2 * cp_size - cp_rank - 1], device=pos_emb.device)
    pos_emb = pos_emb.view(*pos_emb.shape[:seq_dim], 2 * cp_size, -1, *pos_emb.shape[seq_dim + 1:])
    pos_emb = pos_emb.index_select(seq_dim, cp_idx)
    return pos_emb.view(*pos_emb.shape[:seq_dim], -1, *pos_emb.shape[seq_dim + 2:])


@patch(
    "cp_rope",
    upstream="megatron/core/models/common/embeddings/rope_utils.py get_pos_emb_on_this_cp_rank "
    "(imported by rotary_pos_embedding.py RotaryEmbedding.forward and yarn_rotary_pos_embedding.py)",
    why="under context parallelism the RoPE table is sliced with chunk ids made by "
    "torch.tensor(..., pin_memory=True).cuda()",
)
def _cp_rope():
    from megatron.core.models.common.embeddings import rope_utils, rotary_pos_embedding, yarn_rotary_pos_embedding

    return [
        (module, "get_pos_emb_on_this_cp_rank", _host_pos_emb_on_this_cp_rank)
        for module in (rope_utils, rotary_pos_embedding, yarn_rotary_pos_embedding)
    ]


def _gather_uneven_by_padding(original):
    """_gather_along_first_dim with uneven `output_split_sizes` done as an equal-size all-gather
    of inputs padded to the largest split, then trimmed (gloo's all_gather needs equal sizes)."""

    def gather(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1:
            return original(input_, group, output_split_sizes, use_global_buffer)
        longest = max(output_split_sizes)
        padded = input_.new_zeros((longest, *input_.shape[1:]))
        padded[: input_.shape[0]] = input_
        pieces = [torch.empty_like(padded) for _ in output_split_sizes]
        torch.distributed.all_gather(pieces, padded, group=group)
        return torch.cat([piece[:n] for piece, n in zip(pieces, output_split_sizes)])

    gather.__wrapped__ = original
    return gather


@patch(
    "uneven_all_gather",
    upstream="megatron/core/tensor_parallel/mappings.py _gather_along_first_dim (with "
    "output_split_sizes, as the MoE token dispatcher gathers tokens over expert tensor parallelism)",
    why="gloo's all_gather rejects a list of unequal tensors ('All tensor operands to scatter/gather "
    "must have the same number of elements'); NCCL takes them",
)
def _uneven_all_gather():
    from megatron.core.tensor_parallel import mappings

    return [(mappings, "_gather_along_first_dim", _gather_uneven_by_padding(mappings._gather_along_first_dim))]
