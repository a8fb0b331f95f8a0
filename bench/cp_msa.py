"""Context-parallel MSA on one GPU: what the ring must hide.

1. One MSA layer's sparse attention at S tokens (default 1M) on one GPU, CP=1: the selection kernel,
   and attention forward + backward; time and peak memory.
2. The ring's per-step work at CP-sized shards (S / cp tokens per rank, cp = 8, 16), simulated
   on one GPU exactly as model/msa/cp.py runs it (`sparse_step`): one rank's local queries
   against one visiting shard's K/V, over the blocks of that shard the realistic selection
   picked. Forward step = one step of the forward ring; fwd+bwd = what a step of the backward
   ring computes (it recomputes the step, then its gradient).
   Bytes per step: forward moves the shard's K and V (bf16); backward moves K, V and the fp32
   dK/dV accumulators. Needed link bandwidth = bytes / compute time of the step: above it, the
   ring cannot hide its communication behind compute.

    PYTHONPATH=/tmp/site:$PWD python bench/cp_msa.py                # 1M, cp 8 and 16
    python bench/cp_msa.py --seq 1024 --cps 2,4 --small --no-write   # the script on a CPU

Selections are the "realistic" kind of bench/msa.py (index queries on a random walk), selected
on the whole sequence and sliced per rank (CP selects the same blocks, by construction). The
index scoring, block scores and p_main of the indexer loss are not timed (under CP the selection
and the block scores run their kernels with the chunk's query offset, p_main the kernel on the
rank's own shard and the PyTorch reference on the others: model/msa/cp.py). Prints a table;
writes JSON to --out as cp_msa_<gpu>_<date>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.msa import msa_attention_with_lse, msa_select
from parallel.context_parallel import chunks_of
from model.msa.cp import shard_blocks, sparse_step

HQ, G, D, DI, BS, TOPK = 48, 8, 128, 128, 128, 16
SMALL = 4, 2, 16, 16, 16, 4
"""--small: a shape the CPU reference gets through, to try the script."""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=1 << 20)
    ap.add_argument("--cps", default="8,16")
    ap.add_argument("--rank", type=int, default=0, help="the simulated rank (0 holds the first and last chunk)")
    ap.add_argument("--no-layer", action="store_true", help="skip the CP=1 layer at --seq")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--small", action="store_true", help="tiny heads and blocks (CPU check of the script)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args()
    if args.small:
        global HQ, G, D, DI, BS, TOPK
        HQ, G, D, DI, BS, TOPK = SMALL
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    dt = torch.bfloat16 if cuda else torch.float32
    S = args.seq
    meta = dict(gpu=torch.cuda.get_device_name(0) if cuda else "cpu", torch=torch.__version__,
                cuda=torch.version.cuda, date=datetime.date.today().isoformat(),
                config=dict(seq=S, Hq=HQ, G=G, D=D, Di=DI, block=BS, topk=TOPK, dtype=str(dt), batch=1,
                            selection="realistic (bench/msa.py index_inputs)"))
    print(f"{meta['gpu']}  torch {torch.__version__}  S={S}", flush=True)
    torch.manual_seed(0)
    iq, ik = _index_inputs(S, dev)
    sel = msa_select(iq.to(dt), ik.to(dt), block_size=BS, topk=TOPK)  # [1, G, S, K] global ids
    del iq, ik
    results = dict(meta=meta, layer=None, steps=[])
    if not args.no_layer:
        results["layer"] = _layer(S, sel, dev, dt)
        print(json.dumps(results["layer"]), flush=True)
    for cp in (int(c) for c in args.cps.split(",")):
        results["steps"] += _ring_steps(S, cp, args.rank, sel, dev, dt)
    table = render(results)
    print(table)
    print(json.dumps(results))
    if not args.no_write:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        tag = "h100" if "H100" in meta["gpu"] else meta["gpu"].replace(" ", "_").lower()
        path = out / f"cp_msa_{tag}_{meta['date']}.json"
        path.write_text(json.dumps(results, indent=1))
        print(f"wrote {path}")


def _index_inputs(S, dev):
    """The realistic index inputs of bench/msa.py (CUDA), or the same recipe on the CPU."""
    if dev == "cuda":
        from bench.msa import index_inputs

        return index_inputs(S, "realistic", seed=0)
    walk = torch.randn(1, S, G, DI).mul_(0.05).cumsum_(1) + torch.randn(1, 1, G, DI) * 3
    return walk + 0.3 * torch.randn(1, S, G, DI), torch.randn(1, S, DI)


def _layer(S, sel, dev, dt):
    """CP=1 sparse attention of one layer at S tokens: forward, forward+backward, peak memory."""
    q = torch.randn(1, S, HQ, D, device=dev, dtype=dt, requires_grad=True)
    k, v = (torch.randn(1, S, G, D, device=dev, dtype=dt, requires_grad=True) for _ in range(2))
    d_out = torch.randn(1, S, HQ, D, device=dev, dtype=dt)

    def fwd():
        with torch.no_grad():
            msa_attention_with_lse(q, k, v, sel, block_size=BS)

    def fwd_bwd():
        out, _ = msa_attention_with_lse(q, k, v, sel, block_size=BS)
        torch.autograd.grad(out, (q, k, v), d_out)

    return dict(seq=S, fwd_ms=_time(fwd), fwd_bwd_ms=_time(fwd_bwd), peak_gib=_peak(fwd_bwd, dev))


def _ring_steps(S, cp, rank, sel, dev, dt):
    """Per-step compute of rank `rank` against every visiting shard (and its own)."""
    Sl = S // cp
    c = Sl // 2
    pos = torch.cat([torch.arange(i * c, (i + 1) * c) for i in chunks_of(rank, cp)]).to(dev)
    blocks = sel[:, :, pos]  # [1, G, Sl, K] this rank's selections, global ids
    q = torch.randn(1, Sl, HQ, D, device=dev, dtype=dt, requires_grad=True)
    k, v = (torch.randn(1, Sl, G, D, device=dev, dtype=dt, requires_grad=True) for _ in range(2))
    d_out = torch.randn(1, Sl, HQ, D, device=dev, dtype=dt)
    scale = D**-0.5
    kv_bytes = 2 * Sl * G * D * torch.finfo(dt).bits // 8
    rows = []
    for src in range(cp):
        picked = int((shard_blocks(blocks, chunks_of(src, cp), c // BS) >= 0).sum())

        def fwd(src=src):
            with torch.no_grad():
                sparse_step(q, k, v, blocks, rank, src, cp, BS, scale)

        def fwd_bwd(src=src):
            out, lse = sparse_step(q, k, v, blocks, rank, src, cp, BS, scale)
            torch.autograd.grad((out, lse), (q, k, v), (d_out, torch.zeros_like(lse)))

        f, fb = _time(fwd), _time(fwd_bwd)
        row = dict(cp=cp, seq_local=Sl, rank=rank, src=src, selected_slots=picked, fwd_ms=f, fwd_bwd_ms=fb,
                   fwd_bytes=kv_bytes, bwd_bytes=kv_bytes * 3,  # K, V + fp32 dK, dV
                   fwd_gb_s=kv_bytes / f / 1e6, bwd_gb_s=kv_bytes * 3 / fb / 1e6)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def _time(fn):
    if torch.cuda.is_available():
        from bench.msa import timeit

        return timeit(fn)
    fn()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _peak(fn, dev):
    if dev != "cuda":
        return None
    from bench.msa import peak_gb

    return peak_gb(fn)


def render(results) -> str:
    lines = []
    if results["layer"]:
        r = results["layer"]
        lines += [f"one MSA layer, CP=1, S={r['seq']}: fwd {r['fwd_ms']:.1f} ms, fwd+bwd {r['fwd_bwd_ms']:.1f} ms, "
                  f"peak {r['peak_gib'] if r['peak_gib'] is None else round(r['peak_gib'], 1)} GiB", ""]
    lines.append("| cp | S/cp | src | slots | fwd ms | fwd+bwd ms | fwd MB | bwd MB | fwd GB/s needed | bwd GB/s needed |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|")
    for r in results["steps"]:
        lines.append(f"| {r['cp']} | {r['seq_local']} | {r['src']}{' (own)' if r['src'] == r['rank'] else ''} | "
                     f"{r['selected_slots']} | {r['fwd_ms']:.2f} | {r['fwd_bwd_ms']:.2f} | {r['fwd_bytes'] / 1e6:.1f} | "
                     f"{r['bwd_bytes'] / 1e6:.1f} | {r['fwd_gb_s']:.1f} | {r['bwd_gb_s']:.1f} |")
    for cp in sorted({r["cp"] for r in results["steps"]}):
        visiting = [r for r in results["steps"] if r["cp"] == cp and r["src"] != r["rank"]]
        if visiting:
            worst_f = max(r["fwd_gb_s"] for r in visiting)
            worst_b = max(r["bwd_gb_s"] for r in visiting)
            mean_f = statistics.mean(r["fwd_gb_s"] for r in visiting)
            lines.append(f"\ncp={cp}: the ring needs {worst_f:.0f} GB/s per link in forward (mean over steps "
                         f"{mean_f:.0f}), {worst_b:.0f} GB/s in backward, to hide every step's transfer")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
