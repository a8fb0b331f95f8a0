"""Parallel layouts agree with the single-process run, and checkpoints move between layouts.

Every run starts from the same initial weights (the single-process run's
`checkpoint.save_initial` checkpoint, loaded through dist_checkpointing, which reshards it), so
with train.global_batch_size fixed each layout must give the single-process losses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_module

RUN = ["train.iters=3", "train.log_interval=1", "logger.wandb.mode=disabled"]


def _losses(run_dir: Path) -> dict[int, float]:
    return {
        r["iteration"]: r["lm_loss"]
        for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    }


def _run(run_dir: Path, *overrides: str, nproc: int | None = None) -> dict[int, float]:
    result = run_module(["pretrain", f"hydra.run.dir={run_dir}", *RUN, *overrides], cwd=run_dir.parent, nproc=nproc)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return _losses(run_dir)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The single-process run: its losses, and its initial checkpoint for the other layouts."""
    root = tmp_path_factory.mktemp("single")
    losses = _run(root / "run", "checkpoint.save_initial=true", "checkpoint.keep=null")
    return losses, root / "run" / "checkpoints" / "iter_0000000"


@pytest.mark.parametrize("layout", [["parallel.tp=2"], ["parallel.ep=2"], ["parallel.pp=2"]], ids=lambda o: o[0])
def test_two_process_layout_gives_single_process_losses(tmp_path, single, layout):
    losses, init = single
    got = _run(tmp_path / "run", *layout, f"checkpoint.load={init}", "checkpoint.save=false", nproc=2)
    assert got.keys() == losses.keys()
    for it in losses:
        assert got[it] == pytest.approx(losses[it], rel=1e-4), it


@pytest.mark.parametrize("before, after", [("parallel.tp=2", "parallel.tp=1"), ("parallel.pp=2", "parallel.pp=1")])
def test_checkpoint_reshards_and_continues(tmp_path, single, before, after):
    losses, init = single
    ckpt_dir = tmp_path / "ckpt"
    _run(tmp_path / "run", before, f"checkpoint.load={init}", f"checkpoint.dir={ckpt_dir}",
         "train.exit_interval=2", nproc=2)
    got = _run(tmp_path / "run", after, f"checkpoint.dir={ckpt_dir}")  # resumes iteration 2 -> 3
    assert got[3] == pytest.approx(losses[3], rel=1e-4)
