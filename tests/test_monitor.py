"""Where metrics go (pretrain/monitor.py) and the FLOPs behind MFU (pretrain/flops.py).

W&B runs are real offline runs, read back from their .wandb log with `wandb leet inspect --json`;
the progress bar runs in a pseudo-terminal; the FLOP formula is checked against torch's FLOP
counter on the real megatron-core model.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import time
from collections import Counter

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from conftest import REPO, wandb_history, wandb_logs, wandb_run_record

from pretrain import flops
from pretrain.config import ClusterConfig, LoggerConfig, RunConfig, WandbConfig
from pretrain.monitor import Monitor, console_line, memory_stats

CONFIG = {"model": {"name": "test", "hidden_size": 66}, "train": {"iters": 20, "seq_length": 37}}


def _cfg(mode: str = "offline", console: str = "lines") -> RunConfig:
    return RunConfig(logger=LoggerConfig(wandb=WandbConfig(mode=mode, project="test"), console=console))


def _record(iteration: int, **extra) -> dict:
    return {
        "iteration": iteration,
        "lm_loss": 5.0 - iteration / 10,
        "mtp_1_loss": 5.5 - iteration / 10,
        "grad_norm": 1.0 / iteration,
        "lr": 3e-4,
        "tokens_per_s": 1000.0 * iteration,
        "tflops_per_gpu": 0.5,
        "mfu": 0.01 * iteration,
        "skipped_iters": 0,
        **extra,
    }


@pytest.fixture
def no_wandb_env(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.chdir(tmp_path)  # W&B reads settings from the working directory


@pytest.mark.slow
def test_wandb_offline_run_has_config_and_metrics_at_their_steps(tmp_path, no_wandb_env):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with Monitor(_cfg(), run_dir, enabled=True, total_iters=20, resolved_config=CONFIG) as monitor:
        for it in (5, 10, 15):
            monitor.log(_record(it, **({"valid_loss": 4.2, "moe/max_load/L00-07": 1.25} if it == 15 else {})))
        run_id = monitor.wandb_run_id
    (records,) = wandb_logs(run_dir)
    run = wandb_run_record(records)
    assert run["run_id"] == run_id and run["project"] == "test" and run["display_name"] == "run"
    assert run["config"]["update"]["model"] == CONFIG["model"]
    assert run["config"]["update"]["train"] == CONFIG["train"]
    history = wandb_history(records)
    assert sorted(history) == [5, 10, 15]
    for it, item in history.items():
        assert item["train/lm_loss"] == pytest.approx(5.0 - it / 10)
        assert item["train/mtp_1_loss"] == pytest.approx(5.5 - it / 10)
        assert item["train/grad_norm"] == pytest.approx(1.0 / it)
        assert item["perf/tokens_per_s"] == pytest.approx(1000.0 * it)
        assert item["perf/mfu"] == pytest.approx(0.01 * it)
        assert item["train/lr"] == pytest.approx(3e-4)
    assert history[15]["valid/lm_loss"] == pytest.approx(4.2)
    assert history[15]["moe/max_load/L00-07"] == pytest.approx(1.25)  # unknown keys pass through
    assert "valid/lm_loss" not in history[10]
    assert any(r["type"] == "exit" and r["exit"].get("exit_code", 0) == 0 for r in records)
    jsonl = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in jsonl] == [5, 10, 15] and jsonl[2]["valid_loss"] == 4.2


def test_resumed_monitor_continues_the_same_wandb_run(tmp_path, no_wandb_env):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with Monitor(_cfg(), run_dir, enabled=True, total_iters=20) as first:
        first.log(_record(5))
        run_id = first.wandb_run_id
    assert run_id
    with Monitor(_cfg(), run_dir, enabled=True, total_iters=20, start_iteration=5, wandb_run_id=run_id) as second:
        assert second.wandb_run_id == run_id
        second.log(_record(10))
    before, after = wandb_logs(run_dir)
    assert wandb_run_record(before)["run_id"] == wandb_run_record(after)["run_id"] == run_id
    assert wandb_run_record(after)["resume"] is True
    assert sorted(wandb_history(before)) == [5] and sorted(wandb_history(after)) == [10]
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2  # appended


def test_wandb_mode_env_wins_and_other_ranks_write_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.chdir(tmp_path)
    logging_dir, quiet_dir = tmp_path / "rank0", tmp_path / "rank1"
    logging_dir.mkdir(), quiet_dir.mkdir()
    with Monitor(_cfg("offline"), logging_dir, enabled=True, total_iters=20, wandb_run_id="keepme") as m:
        m.log(_record(5))
        assert m.wandb_run_id == "keepme"  # kept for the checkpoint while W&B is off
    assert [p.name for p in logging_dir.iterdir()] == ["metrics.jsonl"]
    assert not (tmp_path / "wandb").exists()
    monkeypatch.delenv("WANDB_MODE")
    with Monitor(_cfg("offline"), quiet_dir, enabled=False, total_iters=20) as m:
        m.tick(5), m.log(_record(5)), m.event("checkpoint saved")
    assert list(quiet_dir.iterdir()) == []


def test_console_line_format(tmp_path, caplog, monkeypatch):
    record = {
        "iteration": 120, "lm_loss": 2.34561, "mtp_1_loss": 2.5, "mtp_2_loss": 2.61, "grad_norm": 0.8123,
        "lr": 3e-4, "tokens_per_s": 12345.4, "tflops_per_gpu": 412.34, "mfu": 0.41695, "skipped_iters": 0,
        "consumed_samples": 960, "memory_rss_gib": 1.5, "moe_max_load": 1.3, "valid_loss": 2.4,
    }
    assert console_line(record, 5000) == (
        "iteration 120/5000 | lm loss 2.3456 | mtp_1 loss 2.5000 | mtp_2 loss 2.6100 | grad norm 0.812 "
        "| lr 3.000e-04 | tokens/s 12345 | TFLOP/s/GPU 412.3 | MFU 41.7% | valid loss 2.4000"
    )
    partial = {"iteration": 7, "lm_loss": float("nan"), "grad_norm": 1.0, "mfu": float("nan"), "skipped_iters": 2}
    assert console_line(partial, 9) == "iteration 7/9 | lm loss nan | grad norm 1.000 | skipped 2"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    with caplog.at_level(logging.INFO, logger="pretrain"):
        with Monitor(_cfg(console="auto"), tmp_path, enabled=True, total_iters=5000) as m:  # not a TTY
            m.log(record)
            m.event("checkpoint saved")
    assert [r.getMessage() for r in caplog.records] == [console_line(record, 5000), "checkpoint saved"]


_BAR_SCRIPT = """
import logging, sys, time
from pathlib import Path
run_dir = Path(sys.argv[1])
logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="[%(name)s] %(message)s")
file = logging.FileHandler(run_dir / "pretrain.log")
logging.getLogger().addHandler(file)
from pretrain.config import ClusterConfig, LoggerConfig, RunConfig, WandbConfig
from pretrain.monitor import Monitor
cfg = RunConfig(logger=LoggerConfig(wandb=WandbConfig(mode="disabled"), console="auto"))
with Monitor(cfg, run_dir, enabled=True, total_iters=20) as monitor:
    for it in range(1, 21):
        time.sleep(0.03)
        monitor.tick(it)
        if it % 5 == 0:
            record = {"iteration": it, "lm_loss": 5.0 - it / 10, "grad_norm": 1.0}
            monitor.log({**record, "valid_loss": 4.25} if it == 20 else record)
        if it == 10:
            monitor.event("checkpoint saved at 10")
"""


def _run_in_pty(args: list[str], env: dict, timeout: float = 60) -> str:
    """Run a command with a 120-column pseudo-terminal as stdin/stdout/stderr; its output."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while True:
            ready, _, _ = select.select([master], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise TimeoutError(b"".join(chunks).decode(errors="replace"))
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
    finally:
        proc.kill() if proc.poll() is None else None
        proc.wait()
        os.close(master)
    assert proc.returncode == 0, b"".join(chunks).decode(errors="replace")
    return b"".join(chunks).decode("utf-8", errors="replace")


@pytest.mark.slow
def test_progress_bar_on_a_terminal(tmp_path):
    script = tmp_path / "bar.py"
    script.write_text(_BAR_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONIOENCODING": "utf-8", "WANDB_MODE": "disabled",
           "OMP_NUM_THREADS": "1"}
    out = _run_in_pty([sys.executable, str(script), str(tmp_path)], env)
    assert "\r" in out and "█" in out  # redrawn in place, with block characters
    assert "20/20" in out and "100%" in out and "ETA 00:00" in out
    assert "lm loss 3.0000" in out  # the latest loss in the bar's description
    assert "[pretrain] checkpoint saved at 10" in out  # events above the bar
    assert "valid loss 4.2500" in out  # records with a validation loss too
    assert "iteration 5/20" not in out  # the others only in the log file
    logged = (tmp_path / "pretrain.log").read_text()
    assert "iteration 5/20 | lm loss 4.5000 | grad norm 1.000" in logged and "checkpoint saved" in logged
    assert "█" not in logged


def test_memory_stats_on_cpu():
    stats = memory_stats(torch.device("cpu"))
    assert list(stats) == ["memory_rss_gib"] and 0.01 < stats["memory_rss_gib"] < 1024


# Odd sizes; rotary_percent 0.5 needs kv_channels / 2 even.
FLOP_MODEL = dict(
    num_layers=3, hidden_size=66, num_attention_heads=6, num_query_groups=3, kv_channels=12,
    num_experts=5, moe_router_topk=3, moe_ffn_hidden_size=21, mtp_num_layers=2, vocab_size=131,
)
# The local backend's SDPA (model/attention.py) runs torch's CPU flash kernel, which the counter
# has no formula for: count it as the full S x S products, 2 matmuls forward and 4 backward.
_ATTENTION_OPS = {"aten._scaled_dot_product_flash_attention_for_cpu",
                  "aten._scaled_dot_product_flash_attention_for_cpu_backward"}
_LINEAR_OPS = {"aten.mm", "aten.addmm"}


def _sdpa_flops(query_shape, key_shape, *args, matmuls: int, **kwargs) -> int:
    b, h, s_q, d = query_shape
    return matmuls * 2 * b * h * s_q * key_shape[2] * d


_SDPA_FORMULAS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, *a, **kw: _sdpa_flops(q, k, matmuls=2),
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda grad_out, q, k, *a, **kw: _sdpa_flops(q, k, matmuls=4),
}


def _counted(model, tokens, positions, *, backward: bool) -> Counter:
    counter = FlopCounterMode(display=False, custom_mapping=_SDPA_FORMULAS)
    with counter:
        loss = model(tokens, positions, None, labels=tokens)
        if backward:
            loss.sum().backward()
    by_op = Counter({str(op): n for op, n in counter.get_flop_counts()["Global"].items()})
    assert set(by_op) <= _ATTENTION_OPS | _LINEAR_OPS, by_op  # nothing else is a matmul
    return by_op


M3_FLOP_MODEL = dict(FLOP_MODEL, norm_style="gemma", qk_norm="per_head", activation="swiglu_oai",
                     moe_shared_expert_ffn_hidden_size=15, moe_routed_scaling_factor=2.0, dense_mlp_layers=[0],
                     dense_ffn_hidden_size=40)
"""M3's MLPs: a dense-MLP layer, shared experts in the MoE layers and the MTP modules."""


@pytest.mark.parametrize("shape", [FLOP_MODEL, M3_FLOP_MODEL], ids=["m2", "m3"])
def test_flops_per_token_match_the_flop_counter(build_tiny, shape):
    cfg, _, model = build_tiny(**shape)
    b, s = 3, 37
    tokens = torch.randint(0, cfg.vocab_size, (b, s), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(s).expand(b, s)
    terms = flops.forward_flops_per_token(cfg, s)
    linear = sum(v for k, v in terms.items() if k != "attention")

    with torch.no_grad():
        fwd = _counted(model, tokens, positions, backward=False)
    assert sum(fwd[op] for op in _LINEAR_OPS) == b * s * linear
    # The counter sees the full S x S product; the formula counts the causal half.
    assert sum(fwd[op] for op in _ATTENTION_OPS) / 2 == b * s * terms["attention"]

    train = _counted(model, tokens, positions, backward=True)
    assert sum(train[op] for op in _LINEAR_OPS) == 3 * b * s * linear
    model_flops = sum(train[op] for op in _LINEAR_OPS) + sum(train[op] for op in _ATTENTION_OPS) / 2
    assert model_flops == b * s * flops.train_flops_per_token(cfg, s)


def test_peak_tflops_on_cpu_is_measured_once_and_mfu_follows():
    cpu = torch.device("cpu")
    flops.cpu_matmul_tflops.cache_clear()
    first = flops.peak_tflops(ClusterConfig(), cpu)
    again = flops.peak_tflops(ClusterConfig(), cpu)
    assert first > 0 and again == first
    assert flops.cpu_matmul_tflops.cache_info().hits == 1
    assert flops.peak_tflops(ClusterConfig(peak_tflops=12.0), cpu) == 12.0
    tflops_per_gpu, mfu = flops.throughput(tokens_per_s=1e4, flops_per_token=6e8, gpus=2, peak=12.0)
    assert tflops_per_gpu == pytest.approx(3.0) and mfu == pytest.approx(0.25)
    assert math.isnan(flops.throughput(1e4, 6e8, 2, peak=float("nan"))[1])  # unknown peak
