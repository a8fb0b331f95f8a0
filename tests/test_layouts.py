"""Parallel layouts train the same model as the single-process run, and checkpoints move
between layouts.

Every run goes through `python -m pretrain` (torchrun for several processes) with the same
train.global_batch_size and schedule (train.iters=4), and writes its full parameters and
gradients at every iteration (train.full_state_dump, gathered by parallel/gather.py under
layout-independent checkpoint keys). The single-process reference run saves a checkpoint at
every iteration. Each layout run starts from the reference's iteration-1 checkpoint (model and
Adam state, written by one process: so it also reshards tp1 -> tp2, ep1 -> ep2, ...), runs
iterations 2 and 3 and saves; a one-process run resumes from the pp2 x ep2 run's and runs
iteration 4. At every iteration, the LM loss, every gradient and
every parameter must be those of the reference. Parameters after an update test the optimizer too
(a lost Adam step or a misplaced expert's moments moves them by about the learning rate).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import model_layout, run_module, tiny_model_config
from parallel.config import ParallelConfig
from parallel.setup import microbatches_per_step

RUN = ["train.iters=4", "train.log_interval=1", "train.eval_iters=1", "logger.wandb.mode=disabled"]
FOUR_LAYERS = ("model.num_layers=4",)  # tiny has 2 layers: one per virtual stage needs 4

# Tolerances: fp32 on CPU; layouts only reorder sums. The worst tensor measured over all
# layouts is at 0.21 of its tolerance; a missing or doubled reduction errs by O(the tensor's
# largest value), a wrong Adam step or misplaced moments by O(learning rate = 1e-3).
LOSS_RTOL = 1e-4
GRAD_RTOL, GRAD_ATOL_OF_MAX = 1e-4, 1e-5  # atol scaled to the largest |grad| of the tensor
PARAM_RTOL, PARAM_ATOL = 1e-5, 2e-5


def _losses(run_dir: Path) -> dict[int, float]:
    return {
        r["iteration"]: r["lm_loss"]
        for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    }


def _state(run_dir: Path, iteration: int) -> dict[str, dict[str, torch.Tensor]]:
    return torch.load(run_dir / "dump" / f"iter_{iteration:07d}.pt")


def mismatches(ref: dict, got: dict) -> list[str]:
    """What differs between two full states (`parallel.gather.dump`), one line per tensor."""
    out = []
    for kind, rtol in (("params", PARAM_RTOL), ("grads", GRAD_RTOL)):
        if ref[kind].keys() != got[kind].keys():
            out.append(f"{kind}: keys differ: {sorted(ref[kind].keys() ^ got[kind].keys())}")
            continue
        for key, r in ref[kind].items():
            g = got[kind][key]
            atol = PARAM_ATOL if kind == "params" else GRAD_ATOL_OF_MAX * r.abs().max().item()
            if g.shape != r.shape or not torch.allclose(g, r, rtol=rtol, atol=atol):
                err = (g - r).abs().max().item() if g.shape == r.shape else float("nan")
                out.append(f"{kind} {key}: max |diff| {err:.3g}, max |ref| {r.abs().max().item():.3g}")
    return out


class Runs:
    """The runs of this module, each started once and shared by the tests that read it."""

    def __init__(self, root: Path):
        self.root = root
        self.done: dict[object, Path] = {}

    def _run(self, name: str, overrides: list[str], nproc: int | None) -> Path:
        run_dir = self.root / name
        result = run_module(
            ["pretrain", f"hydra.run.dir={run_dir}", *RUN, f"train.full_state_dump={run_dir / 'dump'}",
             *overrides],
            cwd=self.root, nproc=nproc,
        )
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
        return run_dir

    def reference(self, model: tuple[str, ...] = ()) -> Path:
        """One process, a checkpoint after every iteration."""
        key = ("reference", model)
        if key not in self.done:
            name = "_".join(["reference", *(o.replace("model.", "").replace("=", "") for o in model)])
            self.done[key] = self._run(
                name, [*model, "checkpoint.interval=1", "checkpoint.keep=null"], nproc=None
            )
        return self.done[key]

    def layout(self, name: str) -> Path:
        """LAYOUTS[name]: iterations 2-3 from the reference's iteration-1 checkpoint, then a
        checkpoint."""
        if name not in self.done:
            nproc, layout, model = LAYOUTS[name]
            start = self.reference(model) / "checkpoints" / "iter_0000001"
            self.done[name] = self._run(
                name, [*layout, *model, f"checkpoint.load={start}", "train.exit_interval=3"], nproc=nproc
            )
        return self.done[name]

    def from_scratch(self, name: str) -> Path:
        """LAYOUTS[name] from its own initialisation (no checkpoint): iteration 1."""
        nproc, layout, model = LAYOUTS[name]
        return self._run(f"scratch_{name}", [*layout, *model, "train.iters=1", "checkpoint.save=false"], nproc=nproc)

    def back_to_one(self, name: str) -> Path:
        """One process resuming from LAYOUTS[name]'s iteration-3 checkpoint: iteration 4."""
        start = self.layout(name) / "checkpoints" / "iter_0000003"
        return self._run(f"one_from_{name}", [f"checkpoint.load={start}", "checkpoint.save=false"], nproc=None)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return Runs(tmp_path_factory.mktemp("layouts"))


LAYOUTS = {  # name: (processes, layout, model overrides)
    "tp2": (2, ("parallel.tp=2",), ()),
    "pp2_vpp2": (2, ("parallel.pp=2", "parallel.vpp=2"), FOUR_LAYERS),
    "pp2_ep2": (4, ("parallel.pp=2", "parallel.ep=2"), ()),
    # The production grid (experiment=m2_230b_h100_4k, m3_msa_230b_1m_h100: tp > 1, experts over
    # EP with etp=1, so the expert data-parallel groups differ from the dense ones) with M3's
    # modules (per-head QK-norm with its gradient summed over TP, the shared expert and the dense
    # MLP split over TP, Gemma norms, SwiGLU-OAI experts split over EP, MSA's replicated index
    # branch), the loss in chunks of 100 tokens on TP vocabulary shards under sequence
    # parallelism, and the MoE dispatch (shared expert beside it) rebuilt in backward through the
    # expert-parallel all-to-all, against the reference's one-chunk loss without recompute
    "m3_tp2_etp1_ep2_chunks_recompute": (4, ("parallel.tp=2", "parallel.etp=1", "parallel.ep=2",
                                             "model.loss_chunk_tokens=100", "train.recompute=selective",
                                             "train.recompute_modules=[core_attn,moe_act,moe_dispatch]"),
                                         ("model=m3_tiny",)),
}
@pytest.mark.multiproc
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_trains_the_single_process_model(runs, name):
    """Losses, gradients and parameters of iterations 2-3 equal the reference's; the run started
    from a one-process checkpoint, so this also covers resharding 1 -> layout."""
    ref, got = runs.reference(LAYOUTS[name][2]), runs.layout(name)
    assert _losses(got).keys() == {2, 3}
    for it in (2, 3):
        assert _losses(got)[it] == pytest.approx(_losses(ref)[it], rel=LOSS_RTOL), it
        assert mismatches(_state(ref, it), _state(got, it)) == [], it


@pytest.mark.multiproc
@pytest.mark.parametrize("name", ["pp2_ep2"])
def test_layout_initialises_the_single_process_weights(runs, name):
    """A layout started from scratch (`torchrun ... parallel.ep=2`) holds the single-process
    initial weights (parallel/gather.py layout_independent_init; megatron's own initialisation
    depends on the pipeline stage and the expert-parallel rank): iteration 1's loss, gradients
    and updated parameters equal the reference's."""
    ref, got = runs.reference(), runs.from_scratch(name)
    assert _losses(got)[1] == pytest.approx(_losses(ref)[1], rel=LOSS_RTOL)
    assert mismatches(_state(ref, 1), _state(got, 1)) == []


@pytest.mark.multiproc
@pytest.mark.parametrize("name", ["pp2_ep2"])
def test_checkpoint_reshards_back_to_one_process(runs, name):
    """The layout run's checkpoint (model and Adam state) resumes in one process: iteration 4
    is the reference's iteration 4."""
    ref, got = runs.reference(), runs.back_to_one(name)
    assert _losses(got)[4] == pytest.approx(_losses(ref)[4], rel=LOSS_RTOL)
    assert mismatches(_state(ref, 4), _state(got, 4)) == []


@pytest.mark.multiproc
def test_comparison_catches_wrong_reductions(runs):
    """The tolerances above are not vacuous: a gradient missing half its tokens (a sequence-
    parallel norm not summed over TP), one expert's gradient on another's place, and an Adam
    update with the wrong bias correction are all reported."""
    ref = _state(runs.reference(), 3)
    before = _state(runs.reference(), 2)["params"]
    norm = "decoder.layers.0.pre_mlp_layernorm.weight"
    fc2 = "decoder.layers.0.mlp.experts.experts.linear_fc2.weight"
    emb = "embedding.word_embeddings.weight"

    def changed(kind: str, key: str, value: torch.Tensor) -> list[str]:
        got = {k: dict(v) for k, v in ref.items()}
        got[kind][key] = value
        return mismatches(ref, got)

    assert [norm in line for line in changed("grads", norm, ref["grads"][norm] / 2)] == [True]
    assert [fc2 in line for line in changed("grads", fc2, ref["grads"][fc2].roll(1, dims=0))] == [True]
    # The iteration-2 update made 1.5x as large (what a wrong Adam bias correction does).
    update = ref["params"][emb] - before[emb]
    assert [emb in line for line in changed("params", emb, ref["params"][emb] + 0.5 * update)] == [True]


def test_expert_tp_other_than_tp_needs_expert_parallelism():
    """With ep=1 megatron reduces expert gradients over the dense data-parallel group; under
    tp=2 etp=1 the two TP ranks' expert copies then diverge (parallel/gather.py reports the
    replicas differing), so the layout is refused at start."""
    model = tiny_model_config()
    with pytest.raises(ValueError, match=r"parallel\.etp=1 differs from parallel\.tp=2"):
        model_layout(ParallelConfig(tp=2, etp=1), model, 2, 64)
    assert model_layout(ParallelConfig(tp=2, etp=1, ep=2), model, 2, 64).etp == 1


def test_batch_must_split_into_enough_micro_batches():
    """The global batch splits into micro-batches per data-parallel rank, and the interleaved
    schedule (vpp) needs at least pp of them per step; both are refused at start, naming keys."""
    model = tiny_model_config(num_layers=4)
    layout = model_layout(ParallelConfig(pp=2, vpp=2), model, 2, 64)
    with pytest.raises(ValueError, match=r"parallel\.vpp needs at least parallel\.pp=2 micro-batches"):
        microbatches_per_step(2, 2, ParallelConfig(pp=2, vpp=2), layout)
    assert microbatches_per_step(4, 2, ParallelConfig(pp=2, vpp=2), layout) == 2
    dp2 = model_layout(ParallelConfig(), model, 2, 64)
    with pytest.raises(ValueError, match=r"train\.global_batch_size=6 must be a multiple of train\.micro_batch_size\*dp = 2\*2"):
        microbatches_per_step(6, 2, ParallelConfig(), dp2)
