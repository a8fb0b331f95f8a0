"""Every runtime patch of megatron-core 0.16.1 and torch: the one place we change upstream code.

Each `Patch` names the upstream file and function it works around, why, the condition under
which it applies (`needed`, a function whose docstring says when and why), and its
replacements. `apply()` installs the patches this machine needs; the entry points call it once,
before they build anything (`python -m pretrain`, `model.describe`, `launch.plan`,
`launch.measure`, the bench scripts that build models in-process, tests/conftest.py), and library
code never does.
`Patch.install` raises `UpstreamChanged`, naming the target, when an upstream name it replaces
does not exist: an upstream rename must not silently patch nothing. tests/test_patches.py checks
every patch: its target exists upstream, upstream still needs it (so that a fixed upstream tells
us to delete the patch), and it works.

The patches by condition:
- no CUDA: megatron-core hard-codes CUDA (device placement, streams, the RNG tracker, the fp32
  optimizer and gradient clipping, the schedules' token counter, expert all-to-all split sizes,
  the pipeline embedding copy, RoPE under context parallelism), gloo lacks NCCL's uneven
  all-gather, and the megatron functions our runs call that `jit_fuser` compiles (JIT_FUSED)
  would cost Inductor start-up time on CPU: those run eagerly, torch.compile stays on for the
  rest of the process. GPU runs execute these parts of megatron-core unmodified.
- no Transformer Engine (any device): `te_general_gemm`, a name megatron reads but defines only
  when TE imports.
- every machine: the fast paths, `model/rope.py` and `model/moe_permute.py` in place of
  megatron's unfused RoPE and MoE permutation; each decides per call and runs upstream's
  function where its fast path does not apply; the meta-device build of launch.plan, which
  only marks the TP-split weights instead of splitting master weights with no values. And the
  MoE aux-loss scale, which upstream cannot set after a backward outside its schedule left it
  0-dim.
- Transformer Engine: its stateless FP8 recipes (current scaling, blockwise) save an empty
  module state, which megatron's grouped expert linear cannot split into per-expert entries.
- CUDA without Apex or TE: foreach stand-ins for the optimizer's multi-tensor fallbacks, and
  torch's fused AdamW (megatron's optimizer module sees a `torch.optim` whose Adam/AdamW are
  built with fused=True).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import torch

CPU = torch.device("cpu")


class UpstreamChanged(RuntimeError):
    """A patch's upstream target is gone or changed: update the patch, or delete it."""


class Replacement(NamedTuple):
    """`owner.attr = new`, undone by `Patch.remove`."""

    owner: Any
    attr: str
    new: Any
    adds: bool = False
    """The name may be absent upstream and the patch defines it (instead of an error)."""


@dataclass
class Patch:
    """Attribute replacements that work around one upstream assumption."""

    name: str
    upstream: str
    """Upstream file and function the patch works around."""
    why: str
    """What goes wrong, or runs slowly, without it."""
    make: Callable[[], list[Replacement]]
    """Returns the replacements; called at install time (lazy imports)."""
    needed: Callable[[], bool]
    """Whether this machine needs the patch (its docstring says when and why)."""
    _saved: list[tuple[Any, str, Any]] = field(default_factory=list)

    @property
    def installed(self) -> bool:
        return bool(self._saved)

    def install(self) -> None:
        """Replace the attributes (idempotent); UpstreamChanged when a target does not exist."""
        if self._saved:
            return
        try:
            replacements = [Replacement(*r) for r in self.make()]
        except (AttributeError, ImportError) as e:
            raise UpstreamChanged(f"patch {self.name!r}: upstream {self.upstream} is not there ({e})") from e
        for r in replacements:
            if not r.adds and not hasattr(r.owner, r.attr):
                raise UpstreamChanged(
                    f"patch {self.name!r}: {_name_of(r.owner)} has no attribute {r.attr!r} (upstream: "
                    f"{self.upstream}): upstream changed; update or delete the patch"
                )
        for r in replacements:
            # The owner's own entry, so that removing restores an inherited or lazy name as it was.
            self._saved.append((r.owner, r.attr, vars(r.owner).get(r.attr, _MISSING)))
            setattr(r.owner, r.attr, r.new)

    def remove(self) -> None:
        for owner, attr, old in reversed(self._saved):
            if old is _MISSING:
                delattr(owner, attr)
            else:
                setattr(owner, attr, old)
        self._saved.clear()


_MISSING = object()


def _name_of(owner) -> str:
    if isinstance(owner, type):
        return f"{owner.__module__}.{owner.__qualname__}"
    return getattr(owner, "__name__", repr(owner))


PATCHES: dict[str, Patch] = {}


def no_cuda() -> bool:
    """No CUDA: megatron-core's CUDA-only calls need host stand-ins."""
    return not torch.cuda.is_available()


def no_te() -> bool:
    """Transformer Engine does not import, on CPU and GPU alike."""
    try:
        from megatron.core.transformer.moe import moe_utils
    except ImportError:
        return False
    return not moe_utils.HAVE_TE


def every_machine() -> bool:
    """Every machine: the stand-in checks each call itself (device, layout, routing) and runs the
    upstream function wherever its fast path does not apply."""
    return True


def with_te() -> bool:
    """Transformer Engine imports: megatron builds its TE modules (TE >= 2.x behaviour)."""
    return not no_te()


def cuda_without_apex_or_te() -> bool:
    """CUDA without Apex or Transformer Engine: megatron's optimizer then runs its local,
    unfused fallbacks (on CPU the grad_clip and fp32_optimizer patches replace that path)."""
    if not torch.cuda.is_available():
        return False
    from megatron.core import optimizer

    return optimizer.USING_PYTORCH_OPTIMIZER


def patch(name: str, upstream: str, why: str, needed: Callable[[], bool] = no_cuda):
    def register(make):
        PATCHES[name] = Patch(name, upstream, why, make, needed)
        return make

    return register


def apply() -> None:
    """Install every patch this machine needs (idempotent). Called by the entry points only."""
    for p in PATCHES.values():
        if p.needed():
            p.install()


@contextlib.contextmanager
def _temporarily(name: str, installed: bool):
    p = PATCHES[name]
    was = p.installed
    (p.install if installed else p.remove)()
    try:
        yield
    finally:
        (p.install if was else p.remove)()


def removed(name: str):
    """Take one patch out for a `with` block (tests: upstream still needs it)."""
    return _temporarily(name, installed=False)


def installed(name: str):
    """Install one patch for a `with` block (tests: a patch this machine does not need works)."""
    return _temporarily(name, installed=True)


class _TorchAs:
    """`torch` (or one of its modules) as one upstream module sees it: the names in `overrides`
    replaced, everything else torch's own. Installed as that module's global `torch`, so only
    that module's calls change."""

    def __init__(self, base, **overrides):
        self._base = base
        self._overrides = overrides

    def __getattr__(self, name):
        if name in self._overrides:
            return self._overrides[name]
        return getattr(self._base, name)


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

    return [Replacement(moe_utils, "te_general_gemm", None, adds=True)]


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


def _on_host(factory):
    """A torch tensor factory whose device='cuda' calls build on the host."""

    def build(*args, **kwargs):
        if str(kwargs.get("device", "")).startswith("cuda"):
            kwargs["device"] = CPU
        return factory(*args, **kwargs)

    return build


@patch(
    "schedules",
    upstream="megatron/core/pipeline_parallel/schedules.py forward_backward_no_pipelining, "
    "forward_backward_pipelining_with_interleaving, forward_backward_pipelining_without_interleaving",
    why="each schedule counts tokens in torch.zeros([], device='cuda')",
)
def _schedules():
    from megatron.core.pipeline_parallel import schedules

    factories = ("zeros", "ones", "empty", "full", "tensor", "arange")
    return [(schedules, "torch", _TorchAs(torch, **{name: _on_host(getattr(torch, name)) for name in factories}))]


JIT_FUSED = (("megatron.core.transformer.moe.router", "TopKRouter._apply_expert_bias"),)
"""(module, qualified name) of each function megatron-core decorates with
`megatron.core.jit.jit_fuser` that our runs call (tests/test_patches.py fails if a tiny training
step compiles anything)."""


def jit_fused_targets() -> list[tuple[Any, str]]:
    """(owner, attribute) of each JIT_FUSED function."""
    import importlib

    out = []
    for module_name, qualname in JIT_FUSED:
        owner = importlib.import_module(module_name)
        *path, name = qualname.split(".")
        for part in path:
            owner = getattr(owner, part)
        out.append((owner, name))
    return out


def _uncompiled(owner, name: str):
    """The function torch.compile wrapped as `owner.name`."""
    compiled = getattr(owner, name)
    original = getattr(compiled, "_torchdynamo_orig_callable", None)
    if original is None:
        raise UpstreamChanged(
            f"patch 'jit_fuser': {_name_of(owner)}.{name} is no longer a torch.compile wrapper "
            "(upstream no longer decorates it with jit_fuser): drop it from JIT_FUSED"
        )
    return original


@patch(
    "jit_fuser",
    upstream="megatron/core/jit.py jit_fuser (= torch.compile), decorating the functions in "
    "JIT_FUSED: transformer/moe/router.py TopKRouter._apply_expert_bias",
    why="on CPU each decorated function is compiled by Inductor's C++ backend at first call: "
    "~15 s of start-up for a few element-wise ops; eager mode computes the same values. Only "
    "these functions go back to eager: torch.compile elsewhere in the process is untouched",
)
def _jit_fuser():
    return [(owner, name, _uncompiled(owner, name)) for owner, name in jit_fused_targets()]


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


@patch(
    "rope",
    upstream="megatron/core/models/common/embeddings/rope_utils.py apply_rotary_pos_emb, as "
    "imported into megatron/core/transformer/attention.py (Attention.forward)",
    why="without Transformer Engine upstream's unfused RoPE runs ~6 element-wise kernels and two "
    "concatenations each way; model/rope.py runs one Triton kernel each way on CUDA (the MSA "
    "index branch calls model.rope directly)",
    needed=every_machine,
)
def _rope():
    from megatron.core.transformer import attention

    from model import rope

    return [(attention, "apply_rotary_pos_emb", rope.apply_rotary_pos_emb)]


@patch(
    "moe_permute",
    upstream="megatron/core/transformer/moe/moe_utils.py permute / unpermute, as imported into "
    "megatron/core/transformer/moe/token_dispatcher.py (MoEAlltoAllTokenDispatcher)",
    why="upstream's unfused unpermute (and permute's backward) sums each token's expert outputs "
    "with an atomic index_add_ (43.6 ms at 128K tokens on an H100); model/moe_permute.py gathers "
    "and sums each token's k copies in fp32 when routing is dropless",
    needed=every_machine,
)
def _moe_permute():
    from megatron.core.transformer.moe import token_dispatcher

    from model import moe_permute

    return [
        (token_dispatcher, "permute", moe_permute.permute),
        (token_dispatcher, "unpermute", moe_permute.unpermute),
    ]


def _meta_affine_init(original):
    """_initialize_affine_weight_cpu that, for a weight on the meta device (launch.plan's model,
    which has no values), only marks the weight as upstream does; real weights go to upstream."""

    def init(weight, output_size, input_size, per_partition_size, partition_dim, init_method, stride=1,
             return_master_weight=False, *, params_dtype=torch.float32, rank=None, world_size=None,
             skip_set_tensor_parallel_attributes=False):
        if not weight.is_meta:
            return original(weight, output_size, input_size, per_partition_size, partition_dim, init_method,
                            stride, return_master_weight, params_dtype=params_dtype, rank=rank,
                            world_size=world_size,
                            skip_set_tensor_parallel_attributes=skip_set_tensor_parallel_attributes)
        from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

        if not skip_set_tensor_parallel_attributes:
            set_tensor_model_parallel_attributes(weight, True, partition_dim, stride)
        if return_master_weight:
            return torch.empty(output_size, input_size, dtype=params_dtype, device="meta")
        return None

    init.__wrapped__ = original
    return init


@patch(
    "meta_affine_init",
    upstream="megatron/core/tensor_parallel/layers.py _initialize_affine_weight_cpu, as imported into "
    "megatron/core/transformer/moe/experts.py and megatron/core/extensions/transformer_engine.py",
    why="with use_cpu_initialization every linear layer builds a master weight, splits it and "
    "concatenates its slice: on the meta device (launch.plan counts the parameters of the real "
    "modules) that is ~33K concatenations through torch's reference decompositions for m2_230b, "
    "most of its build time; there are no values to copy, only the TP marks to set",
    needed=every_machine,
)
def _meta_init():
    from megatron.core.extensions import transformer_engine
    from megatron.core.tensor_parallel import layers
    from megatron.core.transformer.moe import experts

    fast = _meta_affine_init(layers._initialize_affine_weight_cpu)
    return [(module, "_initialize_affine_weight_cpu", fast) for module in (layers, experts, transformer_engine)]


def set_aux_loss_scale(scale: torch.Tensor) -> None:
    """Stands in for MoEAuxLossAutoScaler.set_loss_scale: copies into the process-wide scale in
    place where it can (upstream's reason: the tensor keeps its address), and replaces it where its
    shape, dtype or device differ from `scale`'s."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    current = MoEAuxLossAutoScaler.main_loss_backward_scale
    if current is None or (current.shape, current.dtype, current.device) != (scale.shape, scale.dtype, scale.device):
        MoEAuxLossAutoScaler.main_loss_backward_scale = scale
    else:
        current.copy_(scale)


@patch(
    "aux_loss_scale",
    upstream="megatron/core/transformer/moe/moe_utils.py MoEAuxLossAutoScaler.set_loss_scale",
    why="the aux-loss scale is process-wide: a backward outside the pipeline schedule (an earlier "
    "run, model or evaluation in this process) leaves it a 0-dim tensor, and the schedule's next "
    "set_loss_scale copies its 1-element scale into that in place ('output with shape [] doesn't "
    "match the broadcast shape [1]')",
    needed=every_machine,
)
def _aux_loss_scale():
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    return [(MoEAuxLossAutoScaler, "set_loss_scale", staticmethod(set_aux_loss_scale))]


def foreach_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """Stands in for utils.local_multi_tensor_l2_norm (amp_C.multi_tensor_l2norm's
    signature): the l2 norm over all tensors of tensor_lists[0], fp32, as a 1-element device
    tensor, without a host sync."""
    tensors = tensor_lists[0]
    norms = torch._foreach_norm(tensors, 2, dtype=torch.float32)
    return torch.linalg.vector_norm(torch.stack(norms)).reshape(1), None


def foreach_scale(chunk_size, noop_flag, tensor_lists, scale):
    """Stands in for utils.local_multi_tensor_scale (amp_C.multi_tensor_scale's signature):
    dst = src * scale for each pair of tensor_lists = [src, dst] (in place when they are the
    same tensors, a plain copy, with dtype conversion, when scale is 1)."""
    src, dst = tensor_lists
    if not src:
        return
    if all(s is d for s, d in zip(src, dst)):
        torch._foreach_mul_(dst, scale)
    elif scale == 1.0:
        torch._foreach_copy_(dst, src)
    else:
        torch._foreach_copy_(dst, torch._foreach_mul(src, scale))


@patch(
    "multi_tensor",
    upstream="megatron/core/utils.py local_multi_tensor_l2_norm and local_multi_tensor_scale, as "
    "megatron/core/optimizer/clip_grads.py l2_norm_impl / multi_tensor_scale_impl and "
    "optimizer/optimizer.py multi_tensor_scale_impl",
    why="without Apex or TE the gradient norm is a norm per tensor gathered with torch.tensor(list "
    "of CUDA scalars), a device-to-host sync per parameter tensor, and clipping and the fp32 -> "
    "bf16 weight copies are a multiply and a copy per tensor; torch._foreach_norm in fp32 on the "
    "device and torch._foreach_* scale/copy do the same arithmetic (0.14 s of a 1.53 s step was "
    "the optimizer, proxy_1gpu at 4K on an H100)",
    needed=cuda_without_apex_or_te,
)
def _multi_tensor():
    from megatron.core.optimizer import clip_grads, optimizer

    return [
        (clip_grads, "l2_norm_impl", foreach_l2_norm),
        (clip_grads, "multi_tensor_scale_impl", foreach_scale),
        (optimizer, "multi_tensor_scale_impl", foreach_scale),
    ]


def _fused(adam_cls: type) -> type:
    """`adam_cls` built with torch's fused kernel (fused=True, foreach=False): the same update,
    one kernel per step instead of several foreach passes; the step count lives on the device."""

    class Fused(adam_cls):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "fused": True, "foreach": False})

    Fused.__name__ = Fused.__qualname__ = f"Fused{adam_cls.__name__}"
    return Fused


@patch(
    "fused_adamw",
    upstream="megatron/core/optimizer/__init__.py _get_megatron_optimizer_based_on_param_groups, "
    "which builds torch.optim.AdamW (or Adam) without fused=True when USING_PYTORCH_OPTIMIZER",
    why="torch's default for CUDA parameters is its multi-tensor (foreach) Adam: several passes "
    "over the fp32 weights and moments where the fused kernel makes one",
    needed=cuda_without_apex_or_te,
)
def _fused_adamw():
    from megatron.core import optimizer

    optim = _TorchAs(torch.optim, Adam=_fused(torch.optim.Adam), AdamW=_fused(torch.optim.AdamW))
    return [(optimizer, "torch", _TorchAs(torch, optim=optim))]


def _split_extra_state_empty(upstream_split):
    """TEGroupedLinear._split_extra_state where an empty state (no FP8 state to save) goes to
    every expert's entry as is; anything else goes upstream."""

    def split(self, state):
        if isinstance(state, torch.Tensor) and state.numel() == 0:
            return [state] * self.num_gemms
        return upstream_split(self, state)

    split.__wrapped__ = upstream_split
    return split


@patch(
    "te_stateless_fp8_checkpoint",
    upstream="megatron/core/extensions/transformer_engine.py TEGroupedLinear._split_extra_state "
    "(called by _sharded_state_dict_grouped when a checkpoint is saved)",
    why="Transformer Engine 2.x saves the module state of a stateless FP8 recipe (tensorwise "
    "current scaling, blockwise) as an empty tensor; upstream decodes it to None and indexes it, "
    "so saving a checkpoint of an FP8 run with those recipes raises TypeError in the experts",
    needed=with_te,
)
def _te_stateless_fp8_checkpoint():
    from megatron.core.extensions import transformer_engine as te_ext

    grouped = te_ext.TEGroupedLinear
    return [(grouped, "_split_extra_state", _split_extra_state_empty(grouped._split_extra_state))]
