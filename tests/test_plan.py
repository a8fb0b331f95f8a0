"""`python -m launch.plan`: the memory plan against what real training steps measure on CPU
(launch.measure: every tensor of the weights, gradients and optimizer by storage, the saved
activations through autograd's hooks, the peak through torch's allocator events), per rank for
TP, PP, EP and CP (MSA) layouts; what the formulas say about attention (linear in the sequence,
MSA against dense) and CP's buffers; the recipes fit; the JSON line; errors name the key."""

from __future__ import annotations

import json
import math

import pytest

from conftest import REPO, run_module
from launch.compose import compose_run
from launch.plan import Plan, PlanOptions, plan
from launch.plan.__main__ import main
from launch.plan.activations import inflight_microbatches
from launch.plan.params import stage_parameters

QUIET = ["logger.wandb.mode=disabled"]
TOLERANCE = 0.15  # the peak: allocator events replayed on CPU
ACTIVATIONS_TOLERANCE = 0.05  # what forward saved, each storage once (backward's own saves excluded)


def _measure(tmp_path, overrides: list[str], nproc: int) -> list[dict]:
    result = run_module(["launch.measure", *QUIET, *overrides], cwd=tmp_path, nproc=nproc if nproc > 1 else None)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _plan(overrides: list[str], nproc: int, **options) -> Plan:
    run = compose_run([*QUIET, *overrides, "cluster.gpu=cpu", f"cluster.gpus_per_node={nproc}"])
    return plan(run, PlanOptions(**options))


@pytest.mark.parametrize(
    "nproc, overrides",
    [
        # the tiny default (MSA in layer 1, 2 MTP modules, here MSA too), one process
        (1, ["train.global_batch_size=4", "model.attention.mtp=msa"]),
        # selective recompute, MTP layer included, with the MoE dispatch rebuilt (model/moe.py);
        # the loss in chunks of 128 of the 1024 tokens: no logits kept, one chunk rebuilt in backward
        (1, ["train.global_batch_size=4", "train.recompute=selective",
             "train.recompute_modules=[core_attn,moe_act,moe_dispatch]", "model.loss_chunk_tokens=128"]),
        # selective recompute of the whole MoE block where it dominates (8 of 16 experts, an MTP
        # layer): the peak is a layer's backward with its MoE block rebuilt (`rebuilt_modules`)
        (1, ["train.micro_batch_size=1", "train.global_batch_size=1", "train.seq_length=1024",
             "model.attention.type=dense", "model.hidden_size=256", "model.num_experts=16", "model.moe_router_topk=8",
             "model.moe_ffn_hidden_size=256", "model.mtp_num_layers=1", "model.vocab_size=1024", "data.vocab_size=1024",
             "train.recompute=selective", "train.recompute_modules=[core_attn,moe]"]),
        # dense attention at S = 500 (the local backend's S x S scores dominate), no MTP, odd sizes
        (1, ["model.attention.type=dense", "model.mtp_num_layers=0", "model.hidden_size=96", "model.num_experts=6",
             "train.seq_length=500", "train.micro_batch_size=2", "train.global_batch_size=2"]),
        (2, ["parallel.pp=2", "train.global_batch_size=4"]),  # MTP and embedding copy on stage 1
        # sequence parallel, attention and dense weights split over TP, experts over EP (etp=1)
        (2, ["parallel.tp=2", "parallel.ep=2", "parallel.etp=1", "train.global_batch_size=4"]),
        # context-parallel MSA: the ring of parallel/context_parallel.py and model/msa/cp.py
        (2, ["parallel.cp=2", "train.global_batch_size=4"]),
    ],
    ids=["tiny", "tiny-selective-dispatch-loss-chunks", "moe-selective-rebuilt", "dense-s500-odd", "pp2", "tp2-ep2", "cp2-msa"],
)
@pytest.mark.multiproc
def test_plan_matches_measured_memory(tmp_path, nproc, overrides):
    """Per rank: parameters exactly (counted from the real modules, split as megatron splits
    them), weights + gradients + optimizer state within 1%, saved activations and the peak of a
    step within 15%."""
    measured = _measure(tmp_path, overrides, nproc)
    planned = _plan(overrides, nproc)
    assert len(measured) == nproc
    for rank in measured:
        stage = planned.stages[rank["stage"]]
        assert rank["params"] == stage.params.total, rank
        state = rank["weights"] + rank["grads"] + rank["optimizer"]
        assert stage.state.total == pytest.approx(state, rel=0.01)
        activations = sum(stage.activations.values())
        assert activations == pytest.approx(rank["activations"], rel=ACTIVATIONS_TOLERANCE), (activations, rank)
        assert stage.total == pytest.approx(rank["peak"], rel=TOLERANCE), (stage.total, rank)


@pytest.mark.slow
def test_recipes_fit_on_h100():
    run = compose_run(["experiment=m2_230b_h100_4k"])
    p = plan(run, PlanOptions())
    assert p.layout.world == 128 and p.fits and not p.needs
    assert 40 < p.memory_gib < 79.65 - 4

    run = compose_run(["experiment=m3_msa_230b_1m_h100"])
    p = plan(run, PlanOptions())
    assert p.layout.world == 512 and p.layout.cp == 32 and p.fits and not p.needs
    assert p.recompute == "selective" and 40 < p.memory_gib < 79.65 - 4  # [core_attn,moe]
    assert not plan(run, PlanOptions(recompute="none")).fits  # 1M tokens do not fit without recompute
    assert compose_run(["experiment=m3_msa_230b_h100_1m"]) == run  # the earlier name composes it


@pytest.mark.slow
def test_cli_ends_with_json():
    result = run_module(["launch.plan", "model=m2_230b", "plan.mfu=0.5"], cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    summary = json.loads(lines[-1])
    for key in ("gpus", "memory_gib_per_gpu", "fits", "tokens_per_s_estimate"):
        assert key in summary, key
    # One process holds all 240B parameters: bf16 weights alone are 447 GiB.
    assert summary["gpus"] == 1 and summary["fits"] is False and summary["memory_gib_per_gpu"] > 400
    assert summary["params_per_gpu"] == pytest.approx(239.75e9, rel=0.001)
    # Step time is the FLOP count at the given MFU: 8 sequences of 256 tokens on one H100.
    tokens = 8 * 256
    seconds = summary["train_flops_per_token"] * tokens / (989e12 * 0.5)
    assert summary["tokens_per_s_estimate"] == pytest.approx(tokens / seconds, rel=1e-3)
    assert any("FP8: not modelled" in line for line in lines)


@pytest.mark.slow
def test_sharding_of_m2_230b_parameters():
    """The 4K recipe's ranks hold what megatron gives them: 4 of 256 experts per layer, TP
    quarters of attention and vocab, the embedding on both stages (MTP needs it on the last)."""
    run = compose_run(["experiment=m2_230b_h100_4k"])
    first = stage_parameters(run.model, run.parallel, 0).by_part
    last = stage_parameters(run.model, run.parallel, 1).by_part
    assert first["embedding"] == last["embedding"] == 200064 * 3072 / 4
    assert "output" not in first and last["output"] == 200064 * 3072 / 4
    assert first["experts"] == 31 * 4 * 3 * 3072 * 1536
    assert last["mtp"] > 0 and "mtp" not in first
    assert first["router"] == 31 * 256 * 3072  # replicated over TP


@pytest.mark.parametrize(
    "pp, vpp, microbatches, stage, expected",
    [
        (1, None, 8, 0, 1),
        (4, None, 8, 0, 4), (4, None, 8, 3, 1), (4, None, 2, 0, 2),
        # interleaved: (pp - 1 - stage) * 2 + (vpp - 1) * pp + 1 model chunks, each 1/vpp of the stage
        (4, 2, 8, 0, (3 * 2 + 4 + 1) / 2), (4, 2, 8, 3, (0 + 4 + 1) / 2),
    ],
)
def test_inflight_microbatches(pp, vpp, microbatches, stage, expected):
    assert inflight_microbatches(pp, vpp, microbatches, stage) == expected


def test_context_parallel_msa_is_planned():
    """Under cp=2 a rank keeps half the sequence's attention and MSA index activations, plus the
    ring's and MSA's buffers, sized from the config (fp32 on CPU, tp = 1)."""
    p = _plan(["parallel.cp=2", "train.global_batch_size=8"], nproc=2)
    whole = _plan(["train.global_batch_size=4"], nproc=1)  # the same micro-batch without CP
    assert p.layout.cp == 2 and not p.needs and p.settings.precision == "fp32"
    for part in ("attention", "msa_index"):
        assert p.worst.activations[part] == pytest.approx(whole.worst.activations[part] / 2, rel=1e-12), part

    m, mbs, seq, e = p.run.model, p.run.train.micro_batch_size, p.run.train.seq_length, 4
    T, kv = mbs * seq // 2, m.num_query_groups * m.kv_channels  # tokens of a rank's shard, width of k (or v)
    buffers = {b.name: (b.bytes, b.at_peak) for b in p.worst.transients}
    assert buffers["cp_ring"] == (2 * 2 * T * kv * e, True)  # k and v of the visiting shard, double-buffered
    assert buffers["cp_ring_backward"] == (2 * 2 * T * kv * (e + 4), False)  # plus the fp32 dK/dV
    assert buffers["cp_msa_index_keys"] == (mbs * seq * m.msa.index_head_dim * e, True)  # the whole sequence's
    assert buffers["cp_msa_block_mass"] == (T * m.num_attention_heads * m.msa.topk * 4, True)
    assert not {b.name for b in whole.worst.transients} & {"cp_ring", "cp_ring_backward", "cp_msa_index_keys",
                                                           "cp_msa_block_mass"}


@pytest.mark.parametrize("attention", ["dense", "msa"])
@pytest.mark.parametrize("backend", ["local", "te"])
def test_attention_activations_grow_linearly_with_the_sequence(backend, attention):
    """SDPA, flash attention and MSA keep no S x S scores: doubling S doubles what the layers'
    attention and MSA index branch save."""
    def saved(s: int) -> dict[str, float]:
        run = compose_run([f"model.backend={backend}", f"model.attention.type={attention}",
                           f"train.seq_length={s}", "cluster.gpus_per_node=1"])
        return plan(run, PlanOptions()).worst.activations

    short, long = saved(256), saved(512)
    parts = ("attention", "msa_index") if attention == "msa" else ("attention",)
    assert "msa_index" in short or attention == "dense"
    for part in parts:
        assert short[part] > 0 and long[part] == pytest.approx(2 * short[part], rel=1e-12), part


@pytest.mark.parametrize(
    "overrides, extra_per_token",
    [
        # CPU reference: q, k, v, lse and int64 block ids, where SDPA also keeps its output
        (["cluster.gpu=cpu", "cluster.gpu_memory_gib=16"], lambda Q, K, G, e: G * 8 - Q * e),
        # Triton kernel: contiguous q, k, v and out, lse and int32 block ids; SDPA keeps q, k, the
        # whole qkv output, its own output and lse
        (["model.backend=local"], lambda Q, K, G, e: G * 4 - (Q + K) * e),
        # against flash attention: q, k, the whole qkv output and lse
        (["model.backend=te"], lambda Q, K, G, e: G * 4 - K * e),
    ],
    ids=["cpu", "cuda-local", "cuda-te"],
)
def test_msa_layer_keeps_what_its_kernel_keeps(overrides, extra_per_token):
    """The tiny model's second layer with MSA instead of dense attention: its core keeps what
    the MSA kernel keeps instead of what SDPA or flash attention keeps (Q, K: q and k widths, G
    groups * topk block ids per token), and the index branch comes with it."""
    def saved(attention: str) -> Plan:
        run = compose_run([*overrides, f"model.attention.type={attention}", "cluster.gpus_per_node=1",
                           "train.global_batch_size=4"])
        return plan(run, PlanOptions())

    dense, msa = saved("dense"), saved("msa")
    m, t, e = msa.run.model, msa.run.train, 2 if msa.settings.precision == "bf16" else 4
    Q, K = m.num_attention_heads * m.kv_channels, m.num_query_groups * m.kv_channels
    extra = t.micro_batch_size * t.seq_length * extra_per_token(Q, K, m.num_query_groups * m.msa.topk, e)
    assert m.msa_layers() == [1]
    assert msa.worst.activations["attention"] - dense.worst.activations["attention"] == pytest.approx(extra, rel=1e-12)
    assert msa.worst.activations["msa_index"] > 0 and "msa_index" not in dense.worst.activations


@pytest.mark.parametrize(
    "argv, key",
    [
        (["plan.mfu=2"], "plan.mfu"),
        (["plan.recompute=some"], "plan.recompute"),
        (["plan.speed=1"], "plan.speed"),
        (["parallel.tp=3", "cluster.gpus_per_node=3"], "model.num_attention_heads"),
        (["parallel.ep=3"], "parallel.ep"),
    ],
)
def test_bad_input_names_the_key(capsys, argv, key):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert key in err and "Traceback" not in err


def test_unknown_gpu_memory_gives_no_fit_verdict():
    p = _plan(["train.global_batch_size=4"], nproc=1)
    assert p.fits is None and math.isnan(p.step_s)


def test_measure_meters_count_saved_tensors_and_the_allocation_peak():
    """launch.measure's meters (what the planner is checked against): the saved-tensor meter
    counts each storage autograd keeps in forward once, except the excluded ones, and nothing that
    backward saves while rebuilding a step; the CPU peak meter sees a
    transient allocation that is freed before the end."""
    import torch

    from launch.measure import cpu_peak_meter, saved_tensor_meter

    w = torch.randn(64, 64, requires_grad=True)
    x = torch.randn(32, 64)
    with saved_tensor_meter({w.untyped_storage().data_ptr()}) as saved:
        y = torch.tanh(x @ w)  # keeps x (w excluded) and tanh's output
        (y * y).sum().backward()  # y saved twice by mul: one storage
    assert saved["bytes"] == 32 * 64 * 4 * 2

    class Rebuilt(torch.autograd.Function):
        """Saves nothing in forward; backward rebuilds tanh to take its gradient (as a
        context-parallel ring step or a recomputed layer does): not an activation."""

        @staticmethod
        def forward(ctx, a):
            ctx.a = a.detach()
            return torch.tanh(a)

        @staticmethod
        def backward(ctx, grad):
            with torch.enable_grad():
                a = ctx.a.requires_grad_()
                return torch.autograd.grad(torch.tanh(a), a, grad)[0]

    a = torch.randn(32, 64, requires_grad=True)
    with saved_tensor_meter(set()) as saved:
        Rebuilt.apply(a).sum().backward()
    assert saved["bytes"] == 0 and a.grad is not None
    with cpu_peak_meter() as meter:
        big = torch.ones(1 << 20)  # 4 MiB
        del big
    assert meter["peak"] >= 4 << 20
