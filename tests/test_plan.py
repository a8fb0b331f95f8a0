"""`python -m launch.plan`: the memory plan against what real training steps measure on CPU
(launch.measure: every tensor of the weights, gradients and optimizer by storage, the saved
activations through autograd's hooks, the peak through torch's allocator events), per rank for
TP, PP and EP layouts; the recipes fit; the JSON line; errors name the key."""

from __future__ import annotations

import json
import math

import pytest

from conftest import REPO, run_module
from launch import plan as planner
from launch.compose import compose_run

QUIET = ["logger.wandb.mode=disabled"]
TOLERANCE = 0.15


def _measure(tmp_path, overrides: list[str], nproc: int) -> list[dict]:
    result = run_module(["launch.measure", *QUIET, *overrides], cwd=tmp_path, nproc=nproc if nproc > 1 else None)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _plan(overrides: list[str], nproc: int, **options) -> dict:
    run = compose_run([*QUIET, *overrides, "cluster.gpu=cpu", f"cluster.gpus_per_node={nproc}"])
    return planner.plan(run, planner.PlanOptions(**options))


@pytest.mark.parametrize(
    "nproc, overrides",
    [
        # the tiny default (MSA in layer 1, 2 MTP modules), one process
        (1, ["train.global_batch_size=4"]),
        # dense attention at S = 512: the local backend's S x S scores dominate
        (1, ["model.attention.type=dense", "train.seq_length=512", "train.micro_batch_size=2",
             "train.global_batch_size=2"]),
        # no MTP, odd sizes
        (1, ["model.mtp_num_layers=0", "model.hidden_size=96", "model.num_experts=6", "train.seq_length=200",
             "train.micro_batch_size=3", "train.global_batch_size=3"]),
        (2, ["parallel.tp=2", "train.global_batch_size=4"]),  # sequence parallel
        (2, ["parallel.pp=2", "train.global_batch_size=4"]),  # MTP and embedding copy on stage 1
        (2, ["parallel.ep=2", "train.global_batch_size=8"]),
        (2, ["parallel.tp=2", "parallel.ep=2", "parallel.etp=1", "train.global_batch_size=4"]),
    ],
    ids=["tiny", "dense-s512", "no-mtp-odd", "tp2", "pp2", "ep2", "tp2-ep2"],
)
def test_plan_matches_measured_memory(tmp_path, nproc, overrides):
    """Per rank: parameters exactly (counted from the real modules, split as megatron splits
    them), weights + gradients + optimizer state within 1%, saved activations and the peak of a
    step within 15%."""
    measured = _measure(tmp_path, overrides, nproc)
    plan = _plan(overrides, nproc)
    assert len(measured) == nproc
    for rank in measured:
        stage = plan["stages"][rank["stage"]]
        assert rank["params"] == stage["params"]["dense"] + stage["params"].get("expert", 0), rank
        state = rank["weights"] + rank["grads"] + rank["optimizer"]
        assert sum(stage["state"].values()) == pytest.approx(state, rel=0.01)
        activations = sum(stage["activations"].values())
        assert activations == pytest.approx(rank["activations"], rel=TOLERANCE), (activations, rank)
        assert stage["total"] == pytest.approx(rank["peak"], rel=TOLERANCE), (stage["total"], rank)


def test_recipes_fit_on_h100():
    run = compose_run(["experiment=m2_230b_h100_4k"])
    p = planner.plan(run, planner.PlanOptions())
    assert p["layout"].world == 128 and p["fits"] and not p["needs"]
    assert 40 < p["memory_gib"] < 79.65 - 4

    run = compose_run(["experiment=m3_msa_230b_1m_h100"])
    p = planner.plan(run, planner.PlanOptions())
    assert p["layout"].world == 512 and p["layout"].cp == 32 and p["fits"] and not p["needs"]
    assert p["worst"]["total"] > p["worst"]["total_recompute"]  # recompute=full is what fits
    assert compose_run(["experiment=m3_msa_230b_h100_1m"]) == run  # the earlier name composes it


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


def test_sharding_of_m2_230b_parameters():
    """The 4K recipe's ranks hold what megatron gives them: 4 of 256 experts per layer, TP
    quarters of attention and vocab, the embedding on both stages (MTP needs it on the last)."""
    from launch.compose import compose_run

    run = compose_run(["experiment=m2_230b_h100_4k"])
    first = planner.stage_parameters(run.model, run.parallel, 0)
    last = planner.stage_parameters(run.model, run.parallel, 1)
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
    assert planner.inflight_microbatches(pp, vpp, microbatches, stage) == expected


def test_context_parallel_msa_is_planned():
    p = _plan(["parallel.cp=2", "train.global_batch_size=8"], nproc=2)
    assert p["layout"].cp == 2 and not p["needs"]
    assert "cp_msa_index_keys" in p["worst"]["transient"] and "cp_ring" in p["worst"]["transient"]


def test_local_attention_scores_grow_with_s_squared_flash_does_not():
    def scores(backend: str, s: int) -> float:
        run = compose_run([f"model.backend={backend}", f"train.seq_length={s}", "cluster.gpus_per_node=1"])
        return planner.plan(run, planner.PlanOptions())["worst"]["activations"]["attention_scores"]

    assert scores("local", 512) == pytest.approx(4 * scores("local", 256), rel=0.01)
    assert scores("te", 512) == 0


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
    assert planner.main(argv) == 2
    err = capsys.readouterr().err
    assert key in err and "Traceback" not in err


def test_unknown_gpu_memory_gives_no_fit_verdict():
    p = _plan(["train.global_batch_size=4"], nproc=1)
    assert p["fits"] is None and math.isnan(p["step_s"])
