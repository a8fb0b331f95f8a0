"""One test per CPU patch: upstream megatron-core still fails without it (when this starts
failing, upstream was fixed and the patch should be deleted), and works with it."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

from parallel import cpu_patches
from parallel.cpu_patches import PATCHES, removed

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU patches apply only without CUDA")


def test_every_patch_names_upstream_and_is_installed():
    assert set(PATCHES) == {
        "current_device", "rng_tracker", "streams", "causal_mask", "te_general_gemm",
        "fp32_optimizer", "grad_clip", "schedules", "all_to_all_splits", "pp_embedding_cuda",
        "jit_fuser", "cp_rope", "uneven_all_gather",
    }
    for name, p in PATCHES.items():
        assert "megatron/core" in p.upstream or "torch.cuda" in p.upstream, name
        assert p.why, name
        assert p._saved, f"{name} not installed by cpu_patches.apply()"


def test_current_device():
    with removed("current_device"), pytest.raises((AssertionError, RuntimeError)):
        torch.cuda.current_device()
    assert torch.zeros(1, device=torch.cuda.current_device()).device.type == "cpu"


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


def test_streams():
    with removed("streams"), pytest.raises((AssertionError, RuntimeError)):
        torch.cuda.Stream()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        pass
    stream.record_event().synchronize()
    torch.cuda.synchronize()


def test_causal_mask():
    from megatron.core.fusions import fused_softmax

    with removed("causal_mask"), pytest.raises((AssertionError, RuntimeError)):
        fused_softmax.get_default_causal_mask(5)
    mask = fused_softmax.get_default_causal_mask(5)
    assert torch.equal(mask, torch.ones(5, 5).triu(1).bool())


def test_te_general_gemm():
    from megatron.core.transformer.moe.moe_utils import router_gating_linear

    x, w = torch.randn(5, 8), torch.randn(3, 8)
    with removed("te_general_gemm"), pytest.raises(NameError):
        router_gating_linear(x, w, None, torch.float32)
    torch.testing.assert_close(router_gating_linear(x, w, None, torch.float32), x @ w.t())


def _fp32_optimizer(param):
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.optimizer.optimizer import FP32Optimizer

    return FP32Optimizer(torch.optim.SGD([param], lr=0.1), OptimizerConfig(clip_grad=1.0), lambda *a: None)


def test_fp32_optimizer():
    param = torch.nn.Parameter(torch.ones(3))
    with removed("fp32_optimizer"), pytest.raises((AssertionError, RuntimeError)):
        _fp32_optimizer(param)
    assert _fp32_optimizer(param).get_loss_scale().device.type == "cpu"


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


def test_schedules(build_tiny):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    cfg, tconfig, model = build_tiny()
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


def test_all_to_all_splits():
    from megatron.core.transformer.moe import token_dispatcher

    splits = torch.tensor([3, 1])
    with removed("all_to_all_splits"):
        assert torch.is_tensor(token_dispatcher.maybe_move_tensor_to_cpu(splits, as_numpy=True))
    got = token_dispatcher.maybe_move_tensor_to_cpu(splits, as_numpy=True)
    assert isinstance(got, np.ndarray) and got.tolist() == [3, 1]
    assert token_dispatcher.maybe_move_tensor_to_cpu(splits) is splits


def test_pp_embedding_cuda():
    from megatron.core.models.common.language_module.language_module import LanguageModule

    patched = LanguageModule.setup_embeddings_and_output_layer
    assert ".cuda()" in inspect.getsource(patched.__wrapped__)  # upstream still moves with .cuda()
    seen = []
    wrapped = cpu_patches._without_tensor_cuda(lambda t: seen.append(t.cuda()))
    t = torch.ones(2)
    wrapped(t)
    assert seen[0] is t
    with pytest.raises((AssertionError, RuntimeError)):
        t.cuda()  # restored after the call


def test_jit_fuser():
    from megatron.core import jit

    assert jit.jit_fuser is torch.compile  # upstream still compiles its fused helpers
    fused = torch.compile(lambda x: x * 2 + 1)
    import torch._dynamo.utils as dynamo_utils

    before = dict(dynamo_utils.counters["stats"])
    assert torch.equal(fused(torch.ones(3)), torch.full((3,), 3.0))
    assert dict(dynamo_utils.counters["stats"]) == before  # ran eagerly, nothing compiled
    with removed("jit_fuser"):
        assert torch._dynamo.config.disable is False


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
    cpu_patches.apply()
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


def test_uneven_all_gather():
    from conftest import free_port

    with torch.multiprocessing.Manager() as manager:
        out = manager.dict()
        torch.multiprocessing.spawn(_gather_uneven, args=(free_port(), out), nprocs=2)
        assert dict(out) == {0: "ok", 1: "ok"}
