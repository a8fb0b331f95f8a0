"""parallel/patches.py: every runtime patch of megatron-core and torch, against upstream.

For each patch: its upstream target exists, upstream still needs it (when such a test starts
failing, upstream changed: update or delete the patch), and the patch works. The CPU patches
are shown both ways on this machine (upstream fails without them, works with them). For the
patches that apply on CUDA without Apex/TE: upstream still falls back to its local unfused
functions without Apex/TE, and ours compute the same. For the fast paths: the names megatron's
callers look up still hold upstream's unfused functions (tests/test_rope.py and
tests/test_moe_permute.py compare ours with those functions, outputs and gradients). And the
machinery: install raises on a missing target, apply() is idempotent, remove() restores, and
only entry points apply.
"""

from __future__ import annotations

import ast
import inspect
import types

import numpy as np
import pytest
import torch

from conftest import REPO, tiny_model_config
from parallel import patches
from parallel.patches import PATCHES, Patch, Replacement, UpstreamChanged, installed, removed

CUDA = torch.cuda.is_available()
cpu_only = pytest.mark.skipif(CUDA, reason="CPU patches apply only without CUDA")


def test_every_patch_is_described_and_installed_where_needed():
    assert set(PATCHES) == {
        "current_device", "rng_tracker", "streams", "causal_mask", "te_general_gemm",
        "fp32_optimizer", "grad_clip", "schedules", "all_to_all_splits", "pp_embedding_cuda",
        "jit_fuser", "cp_rope", "uneven_all_gather", "rope", "moe_permute", "meta_affine_init",
        "aux_loss_scale", "multi_tensor", "fused_adamw", "te_stateless_fp8_checkpoint",
    }
    for name, p in PATCHES.items():
        assert p.name == name
        assert "megatron/core" in p.upstream or "torch.cuda" in p.upstream, name
        assert p.why, name
        assert p.needed.__doc__, f"{name}: its condition says when and why in a docstring"
        assert p.installed == p.needed(), f"{name}: installed by apply() exactly where needed"


def test_every_upstream_target_exists():
    """Every name a patch replaces exists upstream (those a patch adds aside), also for the
    patches this machine does not need."""
    for name, p in PATCHES.items():
        if p.needed is patches.with_te and not patches.with_te():
            continue  # megatron defines its TE modules only where TE imports (tests/test_te.py there)
        with removed(name):
            for r in (Replacement(*r) for r in p.make()):
                assert r.adds or hasattr(r.owner, r.attr), f"{name}: {r.owner}.{r.attr}"


def test_install_raises_on_a_missing_target():
    owner = types.SimpleNamespace(kept=1)
    renamed = Patch("renamed", "megatron/core/x.py f", "why", lambda: [(owner, "kept", 2), (owner, "f", 3)],
                    patches.every_machine)
    with pytest.raises(UpstreamChanged, match=r"patch 'renamed'.*has no attribute 'f'.*megatron/core/x.py f"):
        renamed.install()
    assert owner.kept == 1 and not renamed.installed  # nothing half-installed
    gone = Patch("gone", "megatron/core/y.py g", "why", lambda: [(owner, "g", owner.g)], patches.every_machine)
    with pytest.raises(UpstreamChanged, match=r"patch 'gone'.*megatron/core/y.py g"):
        gone.install()
    adds = Patch("adds", "megatron/core/z.py h", "why", lambda: [Replacement(owner, "h", None, adds=True)],
                 patches.every_machine)
    adds.install()
    assert owner.h is None
    adds.remove()
    assert not hasattr(owner, "h")


def test_remove_restores():
    class Base:
        def f(self):
            return "base"

    class Child(Base):
        pass

    p = Patch("p", "megatron/core/x.py Base.f", "why", lambda: [(Child, "f", lambda self: "patched")],
              patches.every_machine)
    p.install()
    assert Child().f() == "patched"
    p.remove()
    assert Child().f() == "base" and "f" not in vars(Child)  # inherited again, not copied down
    for name, p in PATCHES.items():
        saved = list(p._saved)
        with removed(name):
            for owner, attr, old in saved:
                assert vars(owner).get(attr, patches._MISSING) is old, f"{name}: {attr}"
        assert p.installed == bool(saved)


def test_apply_is_idempotent():
    def current():
        return {name: [getattr(owner, attr) for owner, attr, _ in p._saved] for name, p in PATCHES.items()}

    before = current()
    patches.apply()
    patches.apply()
    assert current() == before


def _calls_apply(path) -> bool:
    """Whether the file calls `patches.apply()` (not just names it)."""
    tree = ast.parse(path.read_text())
    return any(
        isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "apply"
        and isinstance(node.func.value, ast.Name) and node.func.value.id == "patches"
        for node in ast.walk(tree)
    )


def test_only_entry_points_apply():
    """apply() is called by the entry points (and test processes), never by library code."""
    callers = {str(path.relative_to(REPO)) for path in REPO.rglob("*.py") if _calls_apply(path)}
    assert callers == {
        "pretrain/__main__.py", "pretrain/evaluate.py", "convert/__main__.py", "model/describe.py", "launch/plan/__main__.py", "launch/measure.py",
        "bench/train_throughput.py", "bench/plan_vs_measured.py",
        "tests/conftest.py", "tests/test_model.py", "tests/test_patches.py",
    }


@cpu_only
def test_jit_fuser():
    """The functions megatron compiles with jit_fuser that our runs call are the undecorated
    originals; torch.compile elsewhere stays on (torch._dynamo is not disabled)."""
    from megatron.core import jit

    assert jit.jit_fuser is torch.compile  # upstream still compiles its fused helpers
    targets = patches.jit_fused_targets()
    with removed("jit_fuser"):
        assert all(hasattr(getattr(owner, attr), "_torchdynamo_orig_callable") for owner, attr in targets)
    assert not any(hasattr(getattr(owner, attr), "_torchdynamo_orig_callable") for owner, attr in targets)
    assert not torch._dynamo.config.disable
    from torch._dynamo.utils import counters

    frames = counters["frames"]["total"]
    assert torch.equal(torch.compile(lambda x: x * 2 + 1, backend="eager")(torch.ones(3)), torch.full((3,), 3.0))
    assert counters["frames"]["total"] > frames  # dynamo traced it


@cpu_only
def test_a_training_step_compiles_nothing(build_tiny):
    """No jit_fuser function our model calls is left out of JIT_FUSED (it would be compiled by
    Inductor at its first call)."""
    from torch._dynamo.utils import counters

    cfg, _, model = build_tiny()
    tokens = torch.randint(0, cfg.vocab_size, (2, 16))
    frames = counters["frames"]["total"]
    model(tokens, torch.arange(16)[None].expand(2, -1), None, labels=tokens).sum().backward()
    assert counters["frames"]["total"] == frames


@cpu_only
def test_current_device():
    with removed("current_device"), pytest.raises((AssertionError, RuntimeError)):
        torch.cuda.current_device()
    assert torch.zeros(1, device=torch.cuda.current_device()).device.type == "cpu"


@cpu_only
def test_rng_tracker(dist):
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker, model_parallel_cuda_manual_seed

    with removed("rng_tracker"), pytest.raises((AssertionError, RuntimeError)):
        model_parallel_cuda_manual_seed(7)
    model_parallel_cuda_manual_seed(7)
    tracker = get_cuda_rng_tracker()
    before = torch.get_rng_state()
    with tracker.fork():
        a = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), before)  # the default stream is untouched
    model_parallel_cuda_manual_seed(7)
    with tracker.fork():
        assert torch.equal(torch.rand(3), a)  # the tracked stream is reproducible
    with tracker.fork():
        assert not torch.equal(torch.rand(3), a)  # and advances
    model_parallel_cuda_manual_seed(1)


@cpu_only
def test_streams():
    with removed("streams"), pytest.raises((AssertionError, RuntimeError)):
        torch.cuda.Stream()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        pass
    stream.record_event().synchronize()
    torch.cuda.synchronize()


@cpu_only
def test_causal_mask():
    from megatron.core.fusions import fused_softmax

    with removed("causal_mask"), pytest.raises((AssertionError, RuntimeError)):
        fused_softmax.get_default_causal_mask(5)
    mask = fused_softmax.get_default_causal_mask(5)
    assert torch.equal(mask, torch.ones(5, 5).triu(1).bool())


@pytest.mark.skipif(not patches.no_te(), reason="Transformer Engine defines te_general_gemm")
def test_te_general_gemm():
    from megatron.core.transformer.moe.moe_utils import router_gating_linear

    device = "cuda" if CUDA else "cpu"
    x, w = torch.randn(5, 8, device=device), torch.randn(3, 8, device=device)
    with removed("te_general_gemm"), pytest.raises(NameError):
        router_gating_linear(x, w, None, torch.float32)
    torch.testing.assert_close(router_gating_linear(x, w, None, torch.float32), x @ w.t())


def _fp32_optimizer(param):
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.optimizer.optimizer import FP32Optimizer

    return FP32Optimizer(torch.optim.SGD([param], lr=0.1), OptimizerConfig(clip_grad=1.0), lambda *a: None)


@cpu_only
def test_fp32_optimizer():
    param = torch.nn.Parameter(torch.ones(3))
    with removed("fp32_optimizer"), pytest.raises((AssertionError, RuntimeError)):
        _fp32_optimizer(param)
    assert _fp32_optimizer(param).get_loss_scale().device.type == "cpu"


@cpu_only
def test_grad_clip(dist):
    from megatron.core.optimizer import clip_grads

    grads = [torch.full((4,), 3.0), torch.full((9,), 1.0)]  # norm sqrt(36 + 9) = sqrt(45)
    with removed("grad_clip"), pytest.raises((AssertionError, RuntimeError)):
        clip_grads.get_grad_norm_fp32(grads)
    assert clip_grads.get_grad_norm_fp32(grads) == pytest.approx(45**0.5)
    assert clip_grads.get_grad_norm_fp32(grads, norm_type=float("inf")) == 3.0
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    with removed("grad_clip"), pytest.raises(AssertionError):
        clip_grads.clip_grad_by_total_norm_fp32(params, max_norm=1.0, total_norm=45**0.5)
    clip_grads.clip_grad_by_total_norm_fp32(params, max_norm=1.0, total_norm=45**0.5)
    total = torch.cat([p.grad for p in params]).norm()
    assert total.item() == pytest.approx(1.0, rel=1e-5)


@cpu_only
def test_schedules(build_tiny, monkeypatch):
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    # process-wide state an earlier in-process step may have set to another shape
    monkeypatch.setattr(MoEAuxLossAutoScaler, "main_loss_backward_scale", None)

    cfg, _, model = build_tiny()
    tokens = torch.randint(0, cfg.vocab_size, (1, 16))
    pos = torch.arange(16)[None]

    def step(data_iterator, m):
        out = m(tokens, pos, None, labels=tokens)
        return out, lambda o: (o.sum(), torch.tensor(o.numel()), {"loss": o.sum().detach()})

    run = lambda: get_forward_backward_func()(  # noqa: E731
        forward_step_func=step, data_iterator=iter([None]), model=model, num_microbatches=1,
        seq_length=16, micro_batch_size=1, forward_only=True,
    )
    with removed("schedules"), pytest.raises((AssertionError, RuntimeError)):
        run()
    (out,) = run()
    assert torch.isfinite(out["loss"])


@cpu_only
def test_all_to_all_splits():
    from megatron.core.transformer.moe import token_dispatcher

    splits = torch.tensor([3, 1])
    with removed("all_to_all_splits"):
        assert torch.is_tensor(token_dispatcher.maybe_move_tensor_to_cpu(splits, as_numpy=True))
    got = token_dispatcher.maybe_move_tensor_to_cpu(splits, as_numpy=True)
    assert isinstance(got, np.ndarray) and got.tolist() == [3, 1]
    assert token_dispatcher.maybe_move_tensor_to_cpu(splits) is splits


@cpu_only
def test_pp_embedding_cuda():
    from megatron.core.models.common.language_module.language_module import LanguageModule

    patched = LanguageModule.setup_embeddings_and_output_layer
    assert ".cuda()" in inspect.getsource(patched.__wrapped__)  # upstream still moves with .cuda()
    seen = []
    wrapped = patches._without_tensor_cuda(lambda t: seen.append(t.cuda()))
    t = torch.ones(2)
    wrapped(t)
    assert seen[0] is t
    with pytest.raises((AssertionError, RuntimeError)):
        t.cuda()  # restored after the call


@cpu_only
def test_cp_rope(dist):
    from megatron.core.models.common.embeddings import rope_utils, rotary_pos_embedding

    emb = torch.arange(8.0)[:, None]
    group = torch.distributed.group.WORLD  # one rank: chunks 0 and 1 of 2, in order
    with removed("cp_rope"), pytest.raises((AssertionError, RuntimeError)):
        rope_utils.get_pos_emb_on_this_cp_rank(emb, 0, group)
    assert torch.equal(rotary_pos_embedding.get_pos_emb_on_this_cp_rank(emb, 0, group), emb)


def _gather_uneven(rank: int, port: int, out: dict) -> None:
    """One rank of test_uneven_all_gather: rank r holds r + 2 rows of value r."""
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    patches.apply()
    from megatron.core.tensor_parallel import mappings

    group, sizes = torch.distributed.group.WORLD, [2, 3]
    rows = torch.full((sizes[rank], 4), float(rank))
    try:
        with removed("uneven_all_gather"):
            mappings._gather_along_first_dim(rows, group, output_split_sizes=sizes)
        out[rank] = "upstream gathered uneven splits on gloo"
        return
    except RuntimeError:
        pass
    got = mappings._gather_along_first_dim(rows, group, output_split_sizes=sizes)
    want = torch.cat([torch.zeros(2, 4), torch.ones(3, 4)])
    out[rank] = "ok" if torch.equal(got, want) else f"gathered {got.tolist()}"
    torch.distributed.destroy_process_group()


@pytest.mark.multiproc
@cpu_only
def test_uneven_all_gather():
    from conftest import free_port

    with torch.multiprocessing.Manager() as manager:
        out = manager.dict()
        torch.multiprocessing.spawn(_gather_uneven, args=(free_port(), out), nprocs=2)
        assert dict(out) == {0: "ok", 1: "ok"}


def test_fast_paths():
    """Megatron's attention and token dispatcher look up upstream's unfused RoPE and MoE
    permutation by these names; apply() puts ours there (equal to upstream's: tests/test_rope.py,
    tests/test_moe_permute.py)."""
    from megatron.core.models.common.embeddings import rope_utils
    from megatron.core.transformer import attention
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    from model import moe_permute, rope

    with removed("rope"), removed("moe_permute"):
        assert attention.apply_rotary_pos_emb is rope_utils.apply_rotary_pos_emb
        assert token_dispatcher.permute is moe_utils.permute
        assert token_dispatcher.unpermute is moe_utils.unpermute
    assert attention.apply_rotary_pos_emb is rope.apply_rotary_pos_emb
    assert token_dispatcher.permute is moe_permute.permute
    assert token_dispatcher.unpermute is moe_permute.unpermute
    # upstream's unfused paths, which our builder's config (no RoPE or permute fusion) runs
    assert "_apply_rotary_pos_emb_bshd(" in inspect.getsource(rope_utils.apply_rotary_pos_emb)
    assert "index_add_(" in inspect.getsource(moe_utils.unpermute)


def test_meta_affine_init(dist):
    """A linear layer built on the meta device (launch.plan) gets upstream's TP marks without
    upstream's master-weight split and concatenation; real weights get upstream's values."""
    from megatron.core.tensor_parallel import layers

    from model.builder import transformer_config
    from parallel.config import ParallelConfig

    config = transformer_config(tiny_model_config(), ParallelConfig(), cpu=True)
    assert "torch.cat(" in inspect.getsource(layers._initialize_affine_weight_cpu.__wrapped__)

    def build(device):
        torch.manual_seed(3)
        with torch.device(device):
            col = layers.ColumnParallelLinear(8, 12, config=config, init_method=torch.nn.init.normal_, bias=True)
            row = layers.RowParallelLinear(12, 8, config=config, init_method=torch.nn.init.normal_, bias=True,
                                           input_is_parallel=True, skip_bias_add=False)
        return col.weight, row.weight

    def marks(w):
        return (w.tensor_model_parallel, w.partition_dim, w.partition_stride, w.shape, w.device)

    fast = build("meta")
    with removed("meta_affine_init"):
        upstream = build("meta")
        upstream_real = build("cpu")
    assert [marks(w) for w in fast] == [marks(w) for w in upstream]
    real = build("cpu")
    assert all(torch.equal(a, b) and marks(a) == marks(b) for a, b in zip(real, upstream_real))


def test_aux_loss_scale():
    """A backward outside the schedule leaves megatron's process-wide aux-loss scale 0-dim;
    upstream's set_loss_scale then fails on the schedule's 1-element scale, ours replaces it
    (and still copies in place when the shapes agree)."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    def backward_outside_the_schedule():
        MoEAuxLossAutoScaler.main_loss_backward_scale = None
        x = torch.ones(2, requires_grad=True)
        MoEAuxLossAutoScaler.apply(x, torch.ones((), requires_grad=True)).sum().backward()
        assert MoEAuxLossAutoScaler.main_loss_backward_scale.shape == ()

    saved = MoEAuxLossAutoScaler.main_loss_backward_scale
    try:
        with removed("aux_loss_scale"):
            backward_outside_the_schedule()
            with pytest.raises(RuntimeError, match="doesn't match the broadcast shape"):
                MoEAuxLossAutoScaler.set_loss_scale(torch.full((1,), 0.5))
        backward_outside_the_schedule()
        MoEAuxLossAutoScaler.set_loss_scale(torch.full((1,), 0.5))
        scale = MoEAuxLossAutoScaler.main_loss_backward_scale
        assert scale.tolist() == [0.5]
        MoEAuxLossAutoScaler.set_loss_scale(torch.full((1,), 0.25))
        assert MoEAuxLossAutoScaler.main_loss_backward_scale is scale and scale.tolist() == [0.25]
    finally:
        MoEAuxLossAutoScaler.main_loss_backward_scale = saved


def _skip_with_apex_or_te():
    from megatron.core import optimizer

    if not optimizer.USING_PYTORCH_OPTIMIZER:
        pytest.skip("Apex or TE present: megatron runs their fused kernels, the patch does not apply")


def test_multi_tensor_upstream_falls_back_without_apex_or_te():
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads, optimizer

    _skip_with_apex_or_te()
    with removed("multi_tensor"):
        assert clip_grads.l2_norm_impl is utils.local_multi_tensor_l2_norm
        assert clip_grads.multi_tensor_scale_impl is utils.local_multi_tensor_scale
        assert optimizer.multi_tensor_scale_impl is utils.local_multi_tensor_scale
    with installed("multi_tensor"):
        assert clip_grads.l2_norm_impl is patches.foreach_l2_norm
        assert optimizer.multi_tensor_scale_impl is patches.foreach_scale


def _tensors(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).to(dtype) for shape in ((7, 3), (11,), (5, 2, 3), (1,))]


def test_l2_norm_is_the_norm_over_all_tensors():
    ts = _tensors() + [t.to(torch.bfloat16) for t in _tensors(1)]
    norm, per_tensor = patches.foreach_l2_norm(2048 * 32, None, [ts], False)
    expected = torch.sqrt(sum((t.double() ** 2).sum() for t in ts))
    assert norm.shape == (1,) and norm.dtype == torch.float32 and per_tensor is None
    torch.testing.assert_close(norm.double()[0], expected, rtol=1e-6, atol=0)


def test_scale_in_place_copy_and_scaled_copy():
    ts = _tensors()
    ref = [t.clone() for t in ts]
    patches.foreach_scale(0, None, [ts, ts], 0.25)  # clipping: [grads, grads]
    for t, r in zip(ts, ref):
        torch.testing.assert_close(t, r * 0.25, rtol=0, atol=0)
    dst = [torch.empty_like(t, dtype=torch.bfloat16) for t in ts]
    patches.foreach_scale(0, None, [ts, dst], 1.0)  # main fp32 weights -> bf16 model weights
    for d, t in zip(dst, ts):
        assert torch.equal(d, t.to(torch.bfloat16))
    patches.foreach_scale(0, None, [ts, dst], 3.0)
    for d, t in zip(dst, ts):
        assert torch.equal(d, (t * 3.0).to(torch.bfloat16))


def _megatron_adam(params):
    """The torch optimizer inside the one megatron-core builds for `params` (two groups, as
    megatron splits by weight decay)."""
    from megatron.core.optimizer import OptimizerConfig, _get_megatron_optimizer_based_on_param_groups

    groups = [dict(params=params[:2], weight_decay=0.1), dict(params=params[2:], weight_decay=0.0)]
    config = OptimizerConfig(optimizer="adam", lr=1e-2, weight_decay=0.1)
    return _get_megatron_optimizer_based_on_param_groups(config, [], groups).optimizer


def test_fused_adamw_gives_upstreams_update_and_reloads(dist):
    _skip_with_apex_or_te()
    params = [torch.nn.Parameter(t) for t in _tensors()]
    twins = [torch.nn.Parameter(t.clone()) for t in _tensors()]
    with removed("fused_adamw"):
        plain = _megatron_adam(params)
    assert type(plain) is torch.optim.AdamW and not plain.defaults["fused"]  # upstream: not fused
    with installed("fused_adamw"):
        fused = _megatron_adam(twins)
        again = _megatron_adam([torch.nn.Parameter(t.clone()) for t in _tensors()])
    assert isinstance(fused, torch.optim.AdamW)
    assert all(g["fused"] and g["foreach"] is False for g in fused.param_groups)
    for step in range(3):
        for p, q in zip(params, twins):
            grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(step))
            p.grad, q.grad = grad, grad.clone()
        plain.step()
        fused.step()
    for p, q in zip(params, twins):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)
    # a checkpoint written by the fused optimizer loads into a fresh, fused one
    again.load_state_dict(fused.state_dict())
    assert all(s["step"].item() == 3 for s in again.state.values())
