"""Runs you can trust: exact resume (stopped, preempted, or killed), atomic checkpoints, NaN
skipping, and clear errors for checkpoints that cannot be used. All through `python -m pretrain`."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, run_module, wandb_logs, wandb_run_record

pytestmark = pytest.mark.slow

SHORT = ["train.iters=6", "train.log_interval=1", "train.eval_interval=0", "logger.wandb.mode=disabled"]


def _train(run_dir: Path, *overrides: str, expect: int = 0) -> subprocess.CompletedProcess:
    result = run_module(["pretrain", f"hydra.run.dir={run_dir}", *SHORT, *overrides], cwd=run_dir.parent)
    assert result.returncode == expect, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def _losses(run_dir: Path) -> dict[int, tuple[float, float]]:
    """iteration -> (lm_loss, grad_norm), the last record of each iteration winning."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["iteration"]: (r["lm_loss"], r["grad_norm"]) for r in records}


def _assert_same_run(got: dict, want: dict) -> None:
    """Losses and grad norms per iteration: bitwise on CPU. On CUDA the MSA kernels add
    gradients with fp32 atomics, whose order changes from run to run, so values agree to ~1e-6
    relative there (a wrong resume moves them by far more)."""
    if not torch.cuda.is_available():
        assert got == want
        return
    assert got.keys() == want.keys()
    for iteration, values in want.items():
        assert got[iteration] == pytest.approx(values, rel=1e-5), iteration


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory) -> Path:
    """The run every resumed one must equal; it keeps its checkpoints (iterations 2, 4, 6)."""
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    _train(run_dir, "checkpoint.interval=2", "checkpoint.keep=null")
    return run_dir


@pytest.fixture(scope="module")
def uninterrupted(uninterrupted_run) -> dict[int, tuple[float, float]]:
    return _losses(uninterrupted_run)


def test_stop_and_resume_is_bitwise_exact(tmp_path, uninterrupted):
    """Also: checkpoint.keep=2 keeps the two newest of the checkpoints saved every iteration."""
    run_dir = tmp_path / "run"
    every = ["logger.wandb.mode=offline", "checkpoint.interval=1", "checkpoint.keep=2"]
    _train(run_dir, "train.exit_interval=3", *every)  # stops after saving iteration 3
    assert sorted(_losses(run_dir)) == [1, 2, 3]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["iter_0000002", "iter_0000003"]
    result = _train(run_dir, *every)  # the same command again resumes (checkpoint.load=auto)
    assert "resumed from" in result.stdout + result.stderr
    _assert_same_run(_losses(run_dir), uninterrupted)  # losses and grad norms, bitwise on CPU
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["iter_0000005", "iter_0000006"]
    # The resumed job continues the same W&B run: its id travels in the checkpoint.
    first, second = (wandb_run_record(records)["run_id"] for records in wandb_logs(run_dir))
    assert first == second


def _start(run_dir: Path, *overrides: str, **popen) -> subprocess.Popen:
    """`python -m pretrain` in the background, in its own process group (as a scheduler's job)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return subprocess.Popen([sys.executable, "-m", "pretrain", f"hydra.run.dir={run_dir}", *SHORT, *overrides],
                            cwd=run_dir.parent, env=env, start_new_session=True, **popen)


def _wait_until(done, proc: subprocess.Popen, what: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not done():
        assert proc.poll() is None, f"the run ended before {what}"
        assert time.time() < deadline, f"no {what} in {timeout} s"
        time.sleep(0.05)


def test_sigterm_saves_and_sigkill_loses_only_what_was_not_saved(tmp_path, uninterrupted):
    """SIGTERM (a scheduler's notice) saves the iteration it ends and exits 0; the same command
    resumes. SIGKILL (no notice) part-way through that run loses only the iterations after its
    last complete checkpoint; a save killed halfway is ignored, and reported. The run then ends
    with the uninterrupted run's losses and gradient norms."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    ckpts = run_dir / "checkpoints"
    every2 = ["checkpoint.interval=2", "checkpoint.keep=null"]
    proc = _start(run_dir, *every2, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = run_dir / "metrics.jsonl"
    _wait_until(lambda: metrics.exists() and metrics.read_text().strip(), proc, "a logged iteration")
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    stopped = max(_losses(run_dir))
    assert stopped < 4, f"SIGTERM arrived after iteration {stopped}: too late to kill the resumed run later"
    assert f"received SIGTERM: saved iteration {stopped}" in out
    assert (ckpts / f"iter_{stopped:07d}" / "m2_checkpoint.json").is_file()

    proc = _start(run_dir, *every2, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_until((ckpts / "iter_0000004").is_dir, proc, "checkpoint of iteration 4")
    # the whole process group, as Slurm kills a job's processes: the run's spawned helper
    # processes would otherwise outlive the test
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    completed = sorted(p.name for p in ckpts.iterdir() if (p / "m2_checkpoint.json").exists())
    assert "iter_0000004" in completed
    shutil.copytree(ckpts / completed[-1], ckpts / "iter_0000099.tmp")
    (ckpts / "iter_0000099.tmp" / "m2_checkpoint.json").unlink()
    result = _train(run_dir, *every2)
    log = result.stdout + result.stderr
    assert "ignoring incomplete checkpoint" in log and "iter_0000099.tmp" in log
    assert f"resumed from {ckpts / completed[-1]}" in log
    _assert_same_run(_losses(run_dir), uninterrupted)


def test_nan_steps_are_skipped_then_abort(tmp_path):
    """A NaN/Inf loss skips its step and the run goes on; train.max_skipped consecutive ones
    are tolerated, one more aborts with exit code 3."""
    run_dir = tmp_path / "run"
    result = _train(run_dir, "train.iters=8", "train.fault_nan_iters=[3,5,6,7]", "train.max_skipped=2",
                    "checkpoint.save=false", expect=3)
    records = {r["iteration"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}
    assert records[3]["skipped_iters"] == 1 and records[2]["skipped_iters"] == 0
    assert records[4]["skipped_iters"] == 1
    assert all(v == v for k, v in records[4].items() if isinstance(v, float))  # no NaN after the skip
    assert "aborting: 3 consecutive iterations had a NaN/Inf loss" in result.stdout + result.stderr
    assert max(records) == 7


def test_unusable_checkpoints_fail_clearly(tmp_path, uninterrupted_run):
    run_dir = tmp_path / "run"
    ckpt = run_dir / "checkpoints" / "iter_0000002"
    shutil.copytree(uninterrupted_run / "checkpoints" / ckpt.name, ckpt)

    result = _train(run_dir, "model.hidden_size=96", expect=2)
    log = result.stdout + result.stderr
    assert f"{ckpt}: the model's shape comes with the weights: model.hidden_size=96 but the weights have 128" in log
    assert "Traceback" not in log

    pristine = tmp_path / "pristine"
    shutil.copytree(ckpt, pristine)
    shard = sorted(ckpt.glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    result = _train(run_dir, expect=2)
    log = result.stdout + result.stderr
    assert f"{shard}: truncated" in log and "Traceback" not in log
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == [ckpt.name]  # never a silent fresh start

    shutil.rmtree(ckpt)
    shutil.copytree(pristine, ckpt)
    (ckpt / "common.pt").write_bytes(b"not a checkpoint")
    result = _train(run_dir, expect=2)
    log = result.stdout + result.stderr
    assert f"{ckpt}: could not be read" in log and "Traceback" not in log

    result = _train(run_dir, f"checkpoint.load={tmp_path}/missing", expect=2)
    assert "is not a complete checkpoint" in result.stdout + result.stderr
