"""Shared fixtures: a one-process gloo group with megatron-core's parallel state, tiny models,
and a launcher for multi-process gloo tests."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from model.config import ModelConfig  # noqa: E402
from parallel import patches, setup  # noqa: E402
from parallel.config import ParallelConfig  # noqa: E402

patches.apply()  # as the entry points do


def _fix_interpreter_index() -> None:
    """Workaround for triton/runtime/interpreter.py `_patch_lang_tensor` (Triton 3.6): its
    `__index__` is `int(self.handle.data)` on a 1-element array, which NumPy >= 2.4 refuses, so
    every `range(<tensor>)` loop fails in the interpreter. Same patch, via `.reshape(-1)[0]`.
    Applied in the TRITON_INTERPRET=1 child pytests that run our kernels without a GPU."""
    from triton.runtime import interpreter

    if getattr(interpreter._patch_lang_tensor, "_msa_fixed", False):
        return
    upstream = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        upstream(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._msa_fixed = True
    interpreter._patch_lang_tensor = patched


if os.environ.get("TRITON_INTERPRET") == "1":
    _fix_interpreter_index()


_MARKEXPR = ""
CPU_MODELS_BESIDE_CUDA = ("builds megatron models on CPU, which megatron moves to the GPU in part: on a GPU machine "
                          "run it in the CPU suite, CUDA_VISIBLE_DEVICES= python -m pytest -m 'not gpu'")


def pytest_configure(config):
    global _MARKEXPR
    _MARKEXPR = config.option.markexpr


def pytest_collection_modifyitems(config, items):
    """Markers (pyproject.toml): a `multiproc` or `slurm` test is also `slow`; a `gpu` test is
    skipped without CUDA, with the reason its marker gives. Where CUDA exists, a test that builds
    megatron models on CPU (the `dist` fixture; neither `gpu` nor `kernel`) is skipped: megatron
    moves tensors of a CPU model to the current CUDA device (RotaryEmbedding.get_emb its
    frequencies), so on a GPU machine the CPU suite runs with CUDA hidden."""
    cuda = torch.cuda.is_available()
    for item in items:
        if item.get_closest_marker("multiproc") or item.get_closest_marker("slurm"):
            item.add_marker(pytest.mark.slow)
        gpu = item.get_closest_marker("gpu")
        if gpu is not None and not cuda:
            item.add_marker(pytest.mark.skip(reason=gpu.kwargs.get("reason", "needs a CUDA GPU")))
        if cuda and gpu is None and not item.get_closest_marker("kernel") and "dist" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.skip(reason=CPU_MODELS_BESIDE_CUDA))


# Triton kernel tests: on a GPU they run in this process; without one they run in a child
# pytest under TRITON_INTERPRET=1 (fp32/fp16 on CPU tensors), started by each kernel test
# file's `test_kernels_under_triton_interpreter` (marked `interpreter_launcher`).
CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_HAVE_TRITON = importlib.util.find_spec("triton") is not None
_IN_PARENT = not CUDA and not INTERPRET
_kernel_skip = pytest.mark.skipif(
    _IN_PARENT or not _HAVE_TRITON,
    reason="no GPU: runs in the TRITON_INTERPRET=1 child of test_kernels_under_triton_interpreter")


def kernel_test(fn):
    """A Triton kernel test: on CUDA in this process, without a GPU in the interpreter child."""
    return pytest.mark.kernel(_kernel_skip(fn))


interpreter_launcher = pytest.mark.skipif(
    not _IN_PARENT or not _HAVE_TRITON, reason="this process runs the kernel tests itself")
KERNEL_DEVICE = "cuda" if CUDA else "cpu"
KERNEL_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # vs fp64


KERNEL_TEST_FILES = ("test_msa_triton.py", "test_cross_entropy.py", "test_rope.py", "test_swiglu.py", "test_norm.py")
"""The files whose kernel tests run in the TRITON_INTERPRET=1 child (one child for all of them:
its start-up, torch and megatron imported again, costs more than most of their tests)."""
_INTERPRETER_RUN: dict[str, subprocess.CompletedProcess] = {}


def run_under_triton_interpreter(test_file: str) -> None:
    """Fail with the child's output if any of `test_file`'s tests failed in the child pytest
    that runs KERNEL_TEST_FILES with TRITON_INTERPRET=1 (Triton decides interpreter vs compiler
    when a function is decorated, triton.language's own helpers included, and megatron imports
    triton before any test module). The child starts at the first call and selects with this
    run's marker expression (`-m "not slow"` runs the fast cases), multi-process tests left out."""
    name = Path(test_file).name
    assert name in KERNEL_TEST_FILES, f"{name}: add it to conftest.KERNEL_TEST_FILES"
    if "result" not in _INTERPRETER_RUN:
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        # Multi-process tests run in this process only: the vocabulary-parallel arithmetic around
        # the kernels is the same code, and under the interpreter they cost 2.5x (25 s)
        select = ["-m", f"not multiproc and ({_MARKEXPR})" if _MARKEXPR else "not multiproc"]
        files = [str(Path(__file__).parent / f) for f in KERNEL_TEST_FILES]
        _INTERPRETER_RUN["result"] = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", *select, *files],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    res = _INTERPRETER_RUN["result"]
    if res.returncode in (0, 5):  # passed, or every case deselected by the marker expression
        return
    mine = [line for line in res.stdout.splitlines() if line.startswith(("FAILED", "ERROR")) and name in line]
    crashed = not any(line.startswith(("FAILED", "ERROR")) for line in res.stdout.splitlines())
    assert not mine and not crashed, "\n".join(mine) + "\n" + res.stdout[-6000:] + res.stderr[-3000:]


def tiny_model_config(**overrides) -> ModelConfig:
    """The architecture of model=tiny, at test size."""
    fields = dict(
        name="test", backend="local", num_layers=2, hidden_size=64, num_attention_heads=4,
        num_query_groups=2, kv_channels=16, num_experts=4, moe_router_topk=2,
        moe_ffn_hidden_size=32, mtp_num_layers=2, vocab_size=128, max_position_embeddings=256,
        init_method_std=0.02,
    )
    fields.update(overrides)
    return ModelConfig(**fields)


def model_layout(parallel: ParallelConfig, model: ModelConfig, world: int, seq_length: int):
    """parallel.setup.layout_for with a model config's sizes (MSA blocks when it has MSA layers)."""
    return setup.layout_for(
        parallel, world, seq_length=seq_length, num_layers=model.num_layers,
        num_attention_heads=model.num_attention_heads, num_query_groups=model.num_query_groups,
        num_experts=model.num_experts, moe_ffn_hidden_size=model.moe_ffn_hidden_size,
        vocab_size=model.vocab_size, cp_block=model.msa.block_size if model.msa_layers() else None,
    )


@pytest.fixture(scope="session")
def dist():
    """torch.distributed (gloo, world of one) and megatron-core's groups for tp=pp=ep=1."""
    if not torch.distributed.is_initialized():
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        torch.distributed.init_process_group("gloo")
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        setup.init_model_parallel(ParallelConfig(), seed=1)
    yield


@pytest.fixture
def build_tiny(dist):
    """Build a tiny GPTModel (one chunk) on CPU in fp32: build_tiny(**ModelConfig overrides)."""
    from model.builder import build_model, transformer_config
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    def build(**overrides):
        cfg = tiny_model_config(**overrides)
        torch.manual_seed(1)
        model_parallel_cuda_manual_seed(1)
        tconfig = transformer_config(cfg, ParallelConfig(), cpu=True)
        (model,) = build_model(cfg, tconfig, backend="local")
        return cfg, tconfig, model

    return build


def watch_index_input(layer) -> dict:
    """Forward hooks on an MSA decoder layer: after a forward, seen["x"] is the layer's input
    hidden states and seen["index_in"] what its index branch read."""
    seen = {}

    def layer_input(module, args, kwargs):
        seen["x"] = kwargs["hidden_states"]

    def index_input(module, args):
        seen["index_in"] = args[0]

    layer.register_forward_pre_hook(layer_input, with_kwargs=True)
    layer.self_attention.indexer.register_forward_pre_hook(index_input)
    return seen


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_DIST_ENV = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}


def child_env(env: dict | None = None) -> dict[str, str]:
    """The environment of a child process that runs the project: this one's without the test
    process's own one-rank group (the `dist` fixture's MASTER_PORT etc.), the repo first on
    PYTHONPATH (a PYTHONPATH already set, e.g. packages installed with --target, stays)."""
    inherited = {k: v for k, v in os.environ.items() if k not in _DIST_ENV and not k.startswith("TORCHELASTIC")}
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**inherited, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", **(env or {})}


def run_module(args: list[str], *, cwd: Path, timeout: int = 600, nproc: int | None = None,
               env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python -m ...` (or torchrun with nproc processes) from the repo, capturing output."""
    cmd = [sys.executable, "-m"]
    if nproc:
        cmd += ["torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m"]
    return subprocess.run(cmd + args, cwd=cwd, env=child_env(env), capture_output=True, text=True,
                          timeout=timeout)


def wandb_logs(run_dir: Path) -> list[list[dict]]:
    """The records of each .wandb log under run_dir, oldest first, via `wandb leet inspect`."""
    files = sorted(run_dir.glob("wandb/*run-*/run-*.wandb"), key=lambda p: p.stat().st_mtime)
    logs = []
    for path in files:
        out = subprocess.run(
            [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(path)],
            capture_output=True, text=True, timeout=60, check=True,
        ).stdout
        logs.append([json.loads(line) for line in out.splitlines() if line.strip()])
    return logs


def wandb_history(records: list[dict]) -> dict[int, dict]:
    return {
        int(r["history"]["step"]["num"]): r["history"]["item"] for r in records if r["type"] == "history"
    }


def wandb_run_record(records: list[dict]) -> dict:
    (run,) = [r["run"] for r in records if r["type"] == "run"]
    return run
