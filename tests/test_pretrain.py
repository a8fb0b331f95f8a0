"""`python -m pretrain` end to end: the default run learns, torchrun TP=2 runs and agrees, and
bad input stops at start with a message naming the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import run_module, wandb_history, wandb_logs, wandb_run_record


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _train(tmp_path: Path, name: str, *overrides: str):
    run_dir = tmp_path / name
    result = run_module(["pretrain", f"hydra.run.dir={run_dir}", *overrides], cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return run_dir, _metrics(run_dir)


@pytest.mark.slow
def test_default_run_learns(tmp_path):
    """The README's main command (40 iterations on the tiny default): lm loss falls below
    0.8x its first value, every logged record has the documented keys."""
    run_dir, records = _train(tmp_path, "default", "train.iters=40", "train.log_interval=1")
    assert [r["iteration"] for r in records] == list(range(1, 41))
    for r in records:
        for key in ("iteration", "lm_loss", "mtp_1_loss", "mtp_2_loss", "indexer_loss", "grad_norm", "lr", "tokens_per_s"):
            assert key in r, key
    first, last = records[0]["lm_loss"], records[-1]["lm_loss"]
    assert last < 0.8 * first, (first, last)
    assert records[-1]["mtp_1_loss"] < records[0]["mtp_1_loss"]
    assert records[-1]["indexer_loss"] < 0.5 * records[0]["indexer_loss"]  # the MSA index branch learns
    assert "valid_loss" in records[19] and "valid_loss" in records[39]
    assert records[3]["lr"] == pytest.approx(3e-3)  # end of warm-up
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["model"]["name"] == "tiny" and config["train"]["iters"] == 40
    assert "${" not in (run_dir / "config.yaml").read_text()  # resolved
    # The default job logs to an offline W&B run inside the run directory.
    (log,) = wandb_logs(run_dir)
    assert wandb_run_record(log)["config"]["update"]["model"]["name"] == "tiny"
    history = wandb_history(log)
    assert sorted(history) == list(range(1, 41))
    logged = history[40]
    for key in ("train/lm_loss", "train/grad_norm", "perf/tokens_per_s", "perf/mfu", "train/mtp_1_loss"):
        assert key in logged, key
    assert logged["train/lm_loss"] == pytest.approx(records[-1]["lm_loss"])
    assert 0 < logged["perf/mfu"] < 1


BAD_INPUT = [
    (["train.iterz=3"], "iterz"),
    (["parallel.tp=3"], "parallel.tp"),
    (["parallel.ep=3"], "parallel.ep"),
    (["data.prefixes=[/nonexistent/corpus]", "data.tokenizer=/nonexistent/tokenizer.json"], "data.prefixes"),
    (["model.num_attention_heads=5"], "model.num_query_groups"),
    (["train.global_batch_size=6"], "train.global_batch_size"),
    (["model.backend=te"], "model.backend"),
    (["model.backend=local", "train.fp8=e4m3"], "train.fp8"),
    (["model.moe_grouped_gemm=false", "train.recompute=selective", "train.recompute_modules=[moe_act]"],
     "train.recompute_modules"),
    (["optim.schedule=wsd", "optim.wsd_decay_iters=100"], "optim.wsd_decay_iters"),
]


@pytest.mark.parametrize("overrides, expected", BAD_INPUT, ids=[case[1] for case in BAD_INPUT])
def test_bad_input_is_refused_before_anything_starts(tmp_path, overrides, expected):
    """The checks `python -m pretrain` runs before it builds anything (composition, the typed
    config, pretrain.__main__.preflight), in this process: the error names the key."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from pretrain.__main__ import preflight
    from pretrain.config import repo_conf_dir

    with pytest.raises((ValueError, HydraException, OmegaConfBaseException)) as e:
        with initialize_config_dir(config_dir=str(repo_conf_dir()), version_base="1.3"):
            cfg = compose("config", overrides=overrides)
        preflight(cfg, tmp_path / "run", overrides)
    cause = e.value.__cause__ if isinstance(e.value, OmegaConfBaseException) and e.value.__cause__ else e.value
    assert expected in str(cause), str(cause)


@pytest.mark.slow
def test_bad_input_ends_the_command_with_exit_2_and_no_traceback(tmp_path):
    result = run_module(["pretrain", f"hydra.run.dir={tmp_path}/run", "parallel.tp=3"], cwd=tmp_path, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 2 and "config error" in output and "parallel.tp" in output, output[-3000:]
    assert "Traceback" not in output
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.fixture
def fresh_model_parallel(dist):
    """megatron's model-parallel state torn down for code that builds its own (the Trainer, the
    evaluator), and the test session's restored afterwards."""
    import torch
    from megatron.core import parallel_state

    from parallel import setup
    from parallel.config import ParallelConfig

    deterministic = torch.are_deterministic_algorithms_enabled()
    parallel_state.destroy_model_parallel()
    yield
    parallel_state.destroy_model_parallel()
    setup.init_model_parallel(ParallelConfig(), seed=1)
    torch.use_deterministic_algorithms(deterministic)


def test_trainer_and_evaluator_in_process(tmp_path, fresh_model_parallel):
    """The Trainer of the tiny default (MSA layer, MTP) trains two steps and saves; the evaluator
    reads that checkpoint: what `python -m pretrain` and `python -m pretrain.evaluate` run, in
    this process (the fast loop's cover of pretrain/trainer.py, runtime.py and evaluate.py)."""
    import dataclasses
    import math

    from hydra import compose, initialize_config_dir
    from megatron.core import parallel_state
    from omegaconf import OmegaConf

    from data.config import DataConfig
    from pretrain.config import repo_conf_dir
    from pretrain.evaluate import evaluate
    from pretrain.trainer import Trainer

    overrides = ["train.iters=2", "train.log_interval=1", "train.seq_length=64", "train.global_batch_size=2", "train.micro_batch_size=1",
                 "train.eval_interval=0", "train.eval_iters=1", "logger.wandb.mode=disabled", "logger.console=lines",
                 f"checkpoint.dir={tmp_path / 'ckpt'}"]
    with initialize_config_dir(config_dir=str(repo_conf_dir()), version_base="1.3"):
        run = OmegaConf.to_object(compose("config", overrides=overrides))
    (tmp_path / "run").mkdir()  # Hydra makes the run directory
    trainer = Trainer(run, tmp_path / "run", resolved_config=OmegaConf.to_container(OmegaConf.structured(run)))
    assert trainer.fit() == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [1, 2] and all(math.isfinite(r["lm_loss"]) for r in records)
    assert "indexer_loss" in records[-1] and "mtp_1_loss" in records[-1]
    ckpt = tmp_path / "ckpt" / "iter_0000002"
    assert ckpt.is_dir()

    parallel_state.destroy_model_parallel()
    corpus = Path("~/.cache/m2-pretrain/stdlib-v1-4096").expanduser()
    run = dataclasses.replace(run, data=DataConfig(prefixes=[str(corpus / "stdlib")],
                                                    tokenizer=str(corpus / "tokenizer.json")))
    run.eval.max_tokens, run.eval.indexer_recall = 200, True
    result = evaluate(run, ckpt)
    assert result["windows"] == 4 and result["tokens"] == 256 and result["iteration"] == 2
    assert math.isfinite(result["loss"]) and result["indexer_recall"] is None  # 64 tokens: every block taken
