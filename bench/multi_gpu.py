"""Issue #8's multi-GPU runs, each through the real entry point (`torchrun -m pretrain`):

    python bench/multi_gpu.py equivalence --gpus 2        # tp2, ep2, pp2, cp2 (MSA ring), tp2+ep2 vs one GPU
    python bench/multi_gpu.py equivalence --gpus 4        # the same layouts doubled (tp4, ep4, ..., tp2+ep2+dp)
    python bench/multi_gpu.py ep-throughput --gpus 1,2,4,8  # proxy_1gpu, EP over N GPUs: tokens/s, MFU
    python bench/multi_gpu.py cp-scaling --gpus 2,4,8 --seqs 262144,524288,1048576  # one MSA layer, ring CP
    python bench/multi_gpu.py equivalence --gpus 2 --smoke  # model=tiny on CPU (gloo), to check the driver

Every run writes metrics.jsonl (one record per iteration, `train.log_interval=1`) under --work;
this driver reads it back:
- equivalence: each layout against the one-process run of the same model and batch (the
  layouts start from the same weights, parallel/gather.py `layout_independent_init`): the largest
  relative difference of the per-iteration LM loss, against --tol (bf16: reduction order only).
  proxy_1gpu is shortened to 2 layers + 1 MTP layer at 4K tokens, 8 sequences per step; the cp2
  case runs MSA in both layers, and so does its one-process reference.
- ep-throughput: proxy_1gpu at 4K, 8 micro-batches per GPU, EP over all N GPUs (data parallel
  for the dense part); tokens/s, TFLOP/s/GPU and MFU averaged over the iterations after --skip.
- cp-scaling: one MSA layer (8K vocab, no MTP, full recompute) at each length over N GPUs with
  parallel.cp=N; step time, tokens/s and the logging rank's peak allocated memory. The share of
  the ring's communication hidden under compute is bench/cp_msa.py's per-step compute next to
  these step times (not derived here).

Results: JSON + markdown in --out (bench/results) as multi_gpu_<what>_<gpu>_<date>.*, with the
GPU kind, count and library versions.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
COMMON = ["train.log_interval=1", "train.eval_interval=0", "checkpoint.save=false", "checkpoint.load=null",
          "logger.wandb.mode=disabled", "logger.console=lines"]
PROXY_SHORT = ["model=proxy_1gpu", "model.num_layers=2", "model.mtp_num_layers=1", "train.seq_length=4096",
               "train.micro_batch_size=1", "train.global_batch_size=8"]
SMOKE = ["model=tiny", "model.num_layers=2", "train.seq_length=256", "train.micro_batch_size=1",
         "train.global_batch_size=4"]
MSA_EVERYWHERE = ["model.attention.type=msa", "model.attention.dense_layers=[]"]


def layouts(gpus: int) -> dict[str, list[str]]:
    """name -> overrides of each equivalence case on `gpus` processes."""
    half = gpus // 2
    return {
        f"tp{gpus}": [f"parallel.tp={gpus}"],
        f"ep{gpus}": [f"parallel.ep={gpus}"],
        "pp2" + (f"_dp{half}" if half > 1 else ""): ["parallel.pp=2"],
        f"cp{gpus}_msa": [f"parallel.cp={gpus}", *MSA_EVERYWHERE],
        # on 2 GPUs the experts are not also split over TP (etp=1: EP runs across the TP pair)
        "tp2_ep2" + (f"_dp{half}" if half > 1 else "_etp1"): ["parallel.tp=2", "parallel.ep=2"]
        + ([] if half > 1 else ["parallel.etp=1"]),
    }


def train(name: str, overrides: list[str], nproc: int, work: Path, timeout: int) -> list[dict]:
    """Run one training job; its metrics.jsonl records (raises with the job's output tail)."""
    run_dir = work / name
    cmd = [sys.executable, "-m"]
    if nproc > 1:
        cmd += ["torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m"]
    cmd += ["pretrain", f"hydra.run.dir={run_dir}", *COMMON, *overrides]
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHELASTIC")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    metrics = run_dir / "metrics.jsonl"
    if result.returncode or not metrics.exists():
        raise RuntimeError(f"{name} failed ({result.returncode}): " + (result.stdout + result.stderr)[-3000:])
    return [json.loads(line) for line in metrics.read_text().splitlines()]


def losses(records: list[dict]) -> dict[int, float]:
    return {r["iteration"]: r["lm_loss"] for r in records if "lm_loss" in r}


def mean_after(records: list[dict], key: str, skip: int) -> float | None:
    values = [r[key] for r in records if r["iteration"] > skip and r.get(key) is not None]
    return sum(values) / len(values) if values else None


def equivalence(args, work: Path) -> list[dict]:
    base = SMOKE if args.smoke else PROXY_SHORT
    iters = [f"train.iters={args.iters}"]
    references = {}
    rows = []
    for name, extra in layouts(args.gpus[0]).items():
        msa = [o for o in extra if o in MSA_EVERYWHERE]
        key = "msa" if msa else "dense"
        if key not in references:
            references[key] = losses(train(f"one_{key}", [*base, *iters, *msa], 1, work, args.timeout))
        try:
            got = losses(train(name, [*base, *iters, *extra], args.gpus[0], work, args.timeout))
        except RuntimeError as error:
            rows.append(dict(layout=name, overrides=extra, error=str(error)[-1500:]))
            continue
        want = references[key]
        diffs = {i: abs(got[i] - want[i]) / abs(want[i]) for i in want if i in got}
        worst = max(diffs.values()) if diffs and len(diffs) == len(want) else float("inf")
        rows.append(dict(layout=name, overrides=extra, reference=f"one process, {key}", losses=got,
                         reference_losses=want, max_rel_diff=worst, passed=worst <= args.tol))
    return rows


def ep_throughput(args, work: Path) -> list[dict]:
    rows = []
    for n in args.gpus:
        base = SMOKE if args.smoke else ["model=proxy_1gpu", "train.seq_length=4096", "train.micro_batch_size=1"]
        extra = [f"parallel.ep={n}", f"train.global_batch_size={8 * n}", f"train.iters={args.iters}"]
        try:
            records = train(f"ep{n}", [*base, *extra], n, work, args.timeout)
        except RuntimeError as error:
            rows.append(dict(gpus=n, overrides=extra, error=str(error)[-1500:]))
            continue
        rows.append(dict(gpus=n, overrides=extra, tokens_per_s=mean_after(records, "tokens_per_s", args.skip),
                         tflops_per_gpu=mean_after(records, "tflops_per_gpu", args.skip),
                         mfu=mean_after(records, "mfu", args.skip),
                         max_allocated_gib=mean_after(records, "memory_max_allocated_gib", args.skip)))
    return rows


def cp_scaling(args, work: Path) -> list[dict]:
    rows = []
    layer = ["model=tiny"] if args.smoke else ["model=proxy_1gpu", "model.vocab_size=8192", "train.recompute=full"]
    layer += ["model.num_layers=1", "model.mtp_num_layers=0", *MSA_EVERYWHERE,
              "train.micro_batch_size=1", "train.global_batch_size=1", f"train.iters={args.iters}"]
    for n in args.gpus:
        for seq in args.seqs:
            extra = [f"parallel.cp={n}", f"train.seq_length={seq}", f"model.max_position_embeddings={seq}"]
            try:
                records = train(f"cp{n}_s{seq}", [*layer, *extra], n, work, args.timeout)
            except RuntimeError as error:
                rows.append(dict(gpus=n, seq=seq, overrides=extra, error=str(error)[-1500:]))
                continue
            rows.append(dict(gpus=n, seq=seq, overrides=extra, iter_time_s=mean_after(records, "iter_time_s", args.skip),
                             tokens_per_s=mean_after(records, "tokens_per_s", args.skip),
                             max_allocated_gib=mean_after(records, "memory_max_allocated_gib", args.skip)))
    return rows


def markdown(what: str, meta: dict, rows: list[dict]) -> str:
    lines = [f"# Multi-GPU {what}, {meta['gpus_seen']} x {meta['device']}, {meta['date']}", "",
             f"torch {meta['torch']}, CUDA {meta['cuda']}, NCCL {meta['nccl']}; command: `{meta['command']}`", ""]
    if not rows:
        return "\n".join(lines)
    keys = [k for k in rows[0] if k not in ("losses", "reference_losses")]
    lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        lines.append("| " + " | ".join(_cell(r.get(k)) for k in keys) + " |")
    return "\n".join(lines) + "\n"


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return " ".join(map(str, v))
    return str(v).replace("|", "/").replace("\n", " ")[:200]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["equivalence", "ep-throughput", "cp-scaling"])
    ap.add_argument("--gpus", default="2", help="comma-separated process counts (equivalence: the first)")
    ap.add_argument("--seqs", default="262144,524288,1048576", help="cp-scaling: context lengths")
    ap.add_argument("--iters", type=int, default=6)
    ap.add_argument("--skip", type=int, default=2, help="iterations left out of the averages (warm-up)")
    ap.add_argument("--tol", type=float, default=2e-2, help="equivalence: largest relative loss difference")
    ap.add_argument("--smoke", action="store_true", help="model=tiny at small sizes (CPU, gloo)")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per training job")
    ap.add_argument("--work", default=None, help="run directories (default: a temporary directory)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = ap.parse_args()
    args.gpus = [int(g) for g in args.gpus.split(",")]
    args.seqs = [int(s) for s in args.seqs.split(",")]
    if args.smoke:
        args.seqs = [512]

    import torch

    cuda = torch.cuda.is_available()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        rows = {"equivalence": equivalence, "ep-throughput": ep_throughput, "cp-scaling": cp_scaling}[args.what](args, work)
    meta = dict(device=torch.cuda.get_device_name() if cuda else "cpu", gpus_seen=torch.cuda.device_count() if cuda else 0,
                torch=torch.__version__, cuda=torch.version.cuda,
                nccl=".".join(map(str, torch.cuda.nccl.version())) if cuda else None,
                date=datetime.date.today().isoformat(), command=" ".join(["python bench/multi_gpu.py", *sys.argv[1:]]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "cpu" if not cuda else meta["device"].lower().split()[1] if len(meta["device"].split()) > 1 else "gpu"
    stem = out / f"multi_gpu_{args.what}_{tag}_{meta['date']}"
    stem.with_suffix(".json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    stem.with_suffix(".md").write_text(markdown(args.what, meta, rows))
    print(markdown(args.what, meta, rows))
    failed = [r for r in rows if "error" in r or r.get("passed") is False]
    if failed:
        sys.exit(f"{len(failed)} case(s) failed or out of tolerance: {[r.get('layout', r.get('gpus')) for r in failed]}")


if __name__ == "__main__":
    main()
