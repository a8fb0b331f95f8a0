"""Peak host memory of `convert import-hf` on a full-width MiniMax-M2 checkpoint in block FP8.

    python bench/hf_import_memory.py --dir /scratch/hf_mem [--layers 2] [--experts 256] [--keep]

1. Writes a synthetic HF checkpoint: config.json of `model=m2_230b` with `--layers` layers (no MTP
   modules, whose three extra MoE layers would not fit this measurement's 24 GB machine), every
   Linear weight random e4m3 with random 128x128 tile scales, embeddings, lm_head and norms bf16,
   in 5 GiB shards, streamed tensor by tensor (model/hf/safetensors.py ShardWriter).
2. Imports it to bf16 in a child process, `python -m convert import-hf`, which logs its
   ru_maxrss after reading (`import: ...`) and at the end (`wrote ...`, after the save).
3. Compares with the expectation: the process's own shard (every parameter and buffer of the
   built model in bf16, counted by model.describe on the meta device) plus the largest tensor the
   import holds at once (the bf16 embedding or lm_head; an FP8 weight is held dequantised in
   fp32, far smaller), plus the interpreter's baseline (torch + megatron imported, measured by
   the same command on a tiny checkpoint).

Prints a table and writes bench/results/hf_import_memory_cpu_<date>.json. A program, not a test:
it writes ~10 GB and ~17 GB to disk and needs ~19 GB of memory at full width.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from model.describe import compose_model, count
from model.hf.config import FP8_BLOCK, hf_config
from model.hf.names import is_quantized_linear, rules
from model.hf.safetensors import SCALE_SUFFIX, Planned, ShardWriter

GIB = 2**30


def synthetic_checkpoint(directory: Path, model, seed: int = 0) -> int:
    """Write the FP8 checkpoint of `model`; returns its bytes."""
    generator = torch.Generator().manual_seed(seed)
    plan = []
    for rule in rules(model):
        for name, shape in rule.hf_tensors():
            if is_quantized_linear(name):
                plan.append(Planned(name, torch.float8_e4m3fn, shape))
                plan.append(Planned(name + SCALE_SUFFIX, torch.float32, tuple(-(-n // b) for n, b in zip(shape, FP8_BLOCK))))
            elif name.endswith("e_score_correction_bias"):
                plan.append(Planned(name, torch.float32, shape))
            else:
                plan.append(Planned(name, torch.bfloat16, shape))
    writer = ShardWriter(directory, plan, max_shard_bytes=5 * GIB)
    for item in plan:
        if item.dtype == torch.float8_e4m3fn:
            raw = torch.randint(0, 256, item.shape, dtype=torch.uint8, generator=generator)
            raw[(raw & 0x7F) == 0x7F] = 0  # e4m3fn's NaN codes
            tensor = raw.view(torch.float8_e4m3fn)
        elif item.name.endswith(SCALE_SUFFIX):
            tensor = (torch.rand(item.shape, generator=generator) + 0.5) * 1e-3
        elif "norm" in item.name:
            tensor = torch.ones(item.shape, dtype=torch.bfloat16)
        else:
            tensor = (torch.randn(item.shape, generator=generator) * 0.02).to(item.dtype)
        writer.write(item.name, tensor)
        del tensor
    writer.close()
    config = hf_config(model, dtype="bfloat16", fp8=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return writer.total_bytes


def run_import(hf_dir: Path, out: Path) -> dict:
    """Import in a child process: its two ru_maxrss lines (GiB), its VmHWM sampled twice a second
    (a cross-check), and the wall time.

    Linux carries a process's peak RSS across fork and exec into ru_maxrss, so the child reports
    at least this process's RSS when it was started: main() keeps this process small (the
    synthetic checkpoints are written by children of their own)."""
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "convert", "import-hf", "--hf", str(hf_dir), "--out", str(out), "--progress", "lines"]
    # Not a process group of this process's (model.describe's count starts one): a fresh one.
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    with tempfile.TemporaryFile("w+") as output:
        child = subprocess.Popen(cmd, cwd=REPO, stdout=output, stderr=subprocess.STDOUT, text=True,
                                 env={**env, "PYTHONPATH": str(REPO)})
        hwm = 0
        while child.poll() is None:
            try:
                status = Path(f"/proc/{child.pid}/status").read_text()
                hwm = max(hwm, int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024)
            except (OSError, AttributeError):
                pass
            time.sleep(0.5)
        output.seek(0)
        log = output.read()
    if child.returncode:
        raise SystemExit(f"import failed ({child.returncode}):\n{log[-8000:]}")
    after_read = float(re.search(r"import: .*ru_maxrss ([\d.]+) GiB", log).group(1))
    at_end = float(re.search(r"wrote .*ru_maxrss ([\d.]+) GiB", log).group(1))
    return {"ru_maxrss_after_read_gib": after_read, "ru_maxrss_at_end_gib": at_end,
            "vmhwm_sampled_gib": round(hwm / GIB, 3), "wall_s": round(time.perf_counter() - start, 1),
            "log": [line for line in log.splitlines() if " INFO " in line]}


def generate(directory: Path, overrides: list[str]) -> int:
    """synthetic_checkpoint in a child process (this one stays small, see run_import); its bytes."""
    code = ("import sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]); import hf_import_memory as b; "
            "from model.describe import compose_model; "
            "print(b.synthetic_checkpoint(Path(sys.argv[2]), compose_model(sys.argv[3:])))")
    result = subprocess.run([sys.executable, "-c", code, str(REPO / "bench"), str(directory), *overrides],
                            cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
                            check=False)
    if result.returncode:
        raise SystemExit(f"generating {directory} failed:\n{result.stderr[-6000:]}")
    return int(result.stdout.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", type=Path, required=True, help="scratch directory (~30 GB free at full width)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--keep", action="store_true", help="keep the synthetic and imported checkpoints")
    args = parser.parse_args()
    overrides = ["model=m2_230b", f"model.num_layers={args.layers}", f"model.num_experts={args.experts}",
                 "model.mtp_num_layers=0", f"model.name=m2_synthetic_{args.layers}l_{args.experts}e"]
    tiny = ["model=m2_230b", "model.num_layers=1", "model.num_experts=8", "model.moe_router_topk=2",
            "model.hidden_size=64", "model.num_attention_heads=4", "model.num_query_groups=2", "model.kv_channels=16",
            "model.moe_ffn_hidden_size=32", "model.vocab_size=128", "model.mtp_num_layers=0"]
    hf_dir, out = args.dir / "hf", args.dir / "ckpt"
    for path in (hf_dir, out, args.dir / "hf_tiny", args.dir / "ckpt_tiny"):
        shutil.rmtree(path, ignore_errors=True)
    generate(args.dir / "hf_tiny", tiny)
    baseline = run_import(args.dir / "hf_tiny", args.dir / "ckpt_tiny")["ru_maxrss_at_end_gib"]
    start = time.perf_counter()
    hf_bytes = generate(hf_dir, overrides)
    generate_s = time.perf_counter() - start
    measured = run_import(hf_dir, out)

    model = compose_model(overrides)
    params = sum(count(model).values())
    shard = params * 2 + model.num_layers * model.num_experts * 4  # bf16 parameters, the fp32 expert bias
    largest = model.vocab_size * model.hidden_size * 2  # embedding / lm_head, bf16, read whole
    expected = baseline + (shard + largest) / GIB
    record = {
        "what": "peak RSS of python -m convert import-hf, synthetic block-FP8 MiniMax-M2 at full width -> bf16, tp1",
        "date": datetime.date.today().isoformat(),
        "model": dataclasses.asdict(model),
        "hf_checkpoint_gib": round(hf_bytes / GIB, 3),
        "generate_s": round(generate_s, 1),
        "own_shard_gib": round(shard / GIB, 3),
        "largest_tensor_gib": round(largest / GIB, 3),
        "baseline_gib": baseline,
        "expected_gib": round(expected, 3),
        **measured,
        "versions": {"torch": torch.__version__, "python": sys.version.split()[0]},
    }
    print(f"{'':32}{'GiB':>10}")
    for key in ("hf_checkpoint_gib", "own_shard_gib", "largest_tensor_gib", "baseline_gib", "expected_gib",
                "ru_maxrss_after_read_gib", "ru_maxrss_at_end_gib", "vmhwm_sampled_gib"):
        print(f"{key:32}{record[key]:>10.2f}")
    print(f"{'import wall time (s)':32}{record['wall_s']:>10.1f}")
    results = REPO / "bench" / "results" / f"hf_import_memory_cpu_{record['date']}.json"
    results.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {results}")
    if not args.keep:
        for path in (hf_dir, out, args.dir / "hf_tiny", args.dir / "ckpt_tiny"):
            shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    main()
