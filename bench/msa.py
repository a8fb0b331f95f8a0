"""MSA on one GPU: our Triton kernels (index scoring + top-k selection + sparse attention) against
(a) dense causal attention through F.scaled_dot_product_attention and (b) FlexAttention given
the same per-token selection. Head layout `--heads`/`--groups`: M2's 48 query / 8 KV heads (the
default) or the released M3's 64 / 4 (MiniMax's own MSA kernels support only that one); d 128,
bf16, block 128, top-16.

    python bench/msa.py                       # check, then 8K/32K/128K + 1M, writes bench/results
    python bench/msa.py --heads 64 --groups 4 # M3's layout: msa_<gpu>_<date>_h64g4.json|md
    python bench/msa.py --compare A.json B.json [--out-md FILE]   # two layouts side by side (no GPU)
    python bench/msa.py --variants --sizes 131072 --no-baselines --no-1m   # tile-size study
    python bench/msa.py --variants --baseline-sizes 131072 --flex-kinds realistic --stem NAME
        # round 2's final run: sweep, then every size, SDPA and Flex at 128K only

Prints a table last; writes JSON + markdown to --out (default bench/results) as
msa_<gpu>_<date>.json|md. FLOP conventions: sparse attention fwd = 4 * S * 2048 * d * Hq (2048
keys per token), dense causal fwd = 2 * S^2 * d * Hq, fwd+bwd = 3.5 x fwd, index = S^2 * Di * G.

Selections: "realistic" = index queries that follow a random walk along the sequence plus noise
(neighbouring tokens select nearly the same blocks); "random" = independent random index queries
and keys. Both go through our selection kernel; the mean union of selected blocks per 128-query
block (what FlexAttention's block mask must visit) and per our 128-row tile are reported.

Ours run through the API (`model.msa`) as training runs them: model/msa/dispatch.py picks the sm90
Gluon kernels on Hopper and the Triton ones elsewhere; the check and `--variants` force backends
and tiles with `msa_backends`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # before CUDA starts

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import triton  # noqa: E402

from model.msa import (  # noqa: E402
    attention_block_mass,
    indexer_kl_loss,
    msa_attention,
    msa_attention_with_lse,
    msa_attention_with_mass,
    msa_backends,
    msa_block_scores,
    msa_select,
    msa_select_with_scores,
)
from model.msa.dispatch import attention_backends, select_backend  # noqa: E402
from model.msa.ops import attention as attention_ops  # noqa: E402
from model.msa.ops import common  # noqa: E402
from model.msa.ops import indexer as indexer_ops  # noqa: E402
from model.msa.ops import select as select_ops  # noqa: E402
from model.msa.ops.common import LOG2E, AttnConfig  # noqa: E402
from model.msa.ops.plan import build_plan  # noqa: E402

HQ, G, D, DI, BS, TOPK = 48, 8, 128, 128, 128, 16
"""HQ and G are the head layout (set from --heads/--groups before anything runs)."""
DT = torch.bfloat16


def timeit(fn, budget_s=2.0, max_reps=20, min_reps=3, idle_s=1.0):
    """Median of CUDA-event timings (ms) after `idle_s` of idle GPU and one warm-up call, so that
    every timing starts from the same rested GPU (without it, the same forward timed 16.4 ms in
    the variant sweep and 17.6-18.9 ms right after a second of the selection kernel)."""
    torch.cuda.synchronize()
    time.sleep(idle_s)
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    est = time.perf_counter() - t0
    reps = int(max(min_reps, min(max_reps, budget_s / max(est, 1e-6))))
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def gpu_state():
    """SM clock (MHz), power (W) and temperature (C) now, from nvidia-smi (None where absent):
    logged next to timings, since a GPU at its power limit runs slower clocks."""
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm,power.draw,temperature.gpu",
                              "--format=csv,noheader,nounits", "-i", "0"], capture_output=True, text=True,
                             timeout=10).stdout.split(",")
        return dict(sm_mhz=float(out[0]), watts=float(out[1]), temp_c=float(out[2]))
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return None


def peak_gb(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


def index_inputs(S, kind, seed):
    """index_q [1, S, G, DI], index_k [1, S, DI] in bf16."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    ik = torch.randn(1, S, DI, device="cuda", generator=g)
    if kind == "random":
        iq = torch.randn(1, S, G, DI, device="cuda", generator=g)
    else:
        # unit-scale random walk (step 0.05 per token: it decorrelates over ~400 tokens) + noise
        walk = torch.randn(1, S, G, DI, device="cuda", generator=g).mul_(0.05).cumsum_(1)
        walk += torch.randn(1, 1, G, DI, device="cuda", generator=g) * 3
        iq = walk + 0.3 * torch.randn(1, S, G, DI, device="cuda", generator=g)
        del walk
    return iq.to(DT), ik.to(DT)


def union_stats(sel, S):
    """Mean number of distinct selected blocks per 128-query block and per our 128-row tile."""
    B, Gs, _, K = sel.shape
    nqb = math.ceil(S / 128)
    pad = nqb * 128 - S
    x = F.pad(sel, (0, 0, 0, pad), value=-1).view(B, Gs, nqb, 128 * K)
    nkb = math.ceil(S / BS)
    per_qblock = 0.0
    for g0 in range(Gs):  # group by group keeps the one-hot small at 1M
        oh = torch.zeros(B, nqb, nkb + 1, dtype=torch.bool, device=sel.device)
        oh.scatter_(-1, torch.where(x[:, g0] < 0, nkb, x[:, g0]), True)
        per_qblock += oh[..., :nkb].sum(-1).float().mean().item() / Gs
    plan = build_plan(sel.to(torch.int32), S, HQ // G, 128, BS)
    return per_qblock, plan.count.float().mean().item()


def select_reference(iq, ik, bs, topk, local_blocks=1):
    """Dense fp32 block scores + stable sort (for the GPU check at a mid size)."""
    B, S, Gs, _ = iq.shape
    sc = torch.einsum("bsgd,bjd->bgsj", iq.float(), ik.float())
    sc = sc.masked_fill(~torch.ones(S, S, dtype=torch.bool, device=iq.device).tril(), float("-inf"))
    nb = math.ceil(S / bs)
    sc = F.pad(sc, (0, nb * bs - S), value=float("-inf")).view(B, Gs, S, nb, bs).amax(-1)
    own = (torch.arange(S, device=iq.device) // bs)[:, None]
    blk = torch.arange(nb, device=iq.device)[None, :]
    sc = torch.where((blk <= own) & (blk > own - local_blocks), float("inf"), sc)
    sc = torch.where(blk <= own, sc, float("-inf"))
    order = torch.sort(sc, dim=-1, descending=True, stable=True)
    ids = torch.where(order.values[..., :topk] > float("-inf"), order.indices[..., :topk], nb + 1)
    ids = ids.sort(-1).values
    return torch.where(ids > nb, -1, ids)


def check(log):
    """bf16 kernels vs fp64 dense reference at a mid size, M2 tile shapes (bs 128, d 128, 6 heads
    per group, top-16); selection vs reference on exactly-representable inputs."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from msa_oracles import dense_reference  # noqa: E402

    torch.manual_seed(0)
    S, Gs, Hq = 3000, 2, 12
    iq = (torch.randint(-4, 5, (1, S, Gs, DI), device="cuda") / 4).to(DT)
    ik = (torch.randint(-4, 5, (1, S, DI), device="cuda") / 4).to(DT)
    sel = msa_select(iq, ik, block_size=BS, topk=TOPK)
    ref = select_reference(iq, ik, BS, TOPK)
    sel_ok = torch.equal(sel, ref)
    q = torch.randn(1, S, Hq, D, device="cuda", dtype=DT, requires_grad=True)
    k = torch.randn(1, S, Gs, D, device="cuda", dtype=DT, requires_grad=True)
    v = torch.randn(1, S, Gs, D, device="cuda", dtype=DT, requires_grad=True)
    # smoothly varying index queries: tiles share blocks, so the unmasked path runs too
    walk = (torch.randn(1, S, Gs, DI, device="cuda") * 0.05).cumsum(1) + torch.randn(1, 1, Gs, DI, device="cuda")
    sel = msa_select(walk.to(DT), torch.randn_like(ik), block_size=BS, topk=TOPK)
    dout = torch.randn_like(q)
    sel_sub = {n: torch.equal(select_ops.select(iq, ik, BS, TOPK, 1, sub_n=n), ref) for n in (64, 128)}
    sel_ok = sel_ok and all(sel_sub.values())
    res = {"select_exact": sel_ok}
    checks = {  # name: msa_backends arguments ("default": on sm90 the Gluon kernels)
        "default": dict(attention_config=AttnConfig()),
        "pointer_sub128": dict(attention="triton", attention_config=AttnConfig(
            fwd_sub_n=128, fwd_stages=2, fwd_tma=False, dq_sub_n=64, dq_stages=2, dq_tma=False)),
        "tma_sub64": dict(attention="triton", attention_config=AttnConfig(
            fwd_sub_n=64, fwd_stages=3, fwd_tma=True, dq_sub_n=64, dq_stages=2, dq_tma=True)),
    }
    for cname, kernels in checks.items():
        for x in (q, k, v):
            x.grad = None
        with msa_backends(**kernels):
            out = msa_attention(q, k, v, sel, block_size=BS)
        out.backward(dout)
        qr, kr, vr = (x.detach().double().requires_grad_() for x in (q, k, v))
        out_r, _ = dense_reference(qr, kr, vr, sel, BS, D**-0.5)
        out_r.backward(dout.double())
        for name, a, b in (("out", out, out_r), ("dq", q.grad, qr.grad), ("dk", k.grad, kr.grad),
                           ("dv", v.grad, vr.grad)):
            err = ((a.double() - b).norm() / b.norm()).item()
            res[f"{name}_{cname}"] = err
    # fp32 inputs (the CUDA fp32 tiles, exact fp32 products): the bar is rel. error < 1e-4
    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    out = msa_attention(q32, k32, v32, sel, block_size=BS)
    out.backward(dout.float())
    qr, kr, vr = (x.detach().double().requires_grad_() for x in (q, k, v))
    out_r, _ = dense_reference(qr, kr, vr, sel, BS, D**-0.5)
    out_r.backward(dout.double())
    fp32 = {f"{name}_fp32": ((a.double() - b).norm() / b.norm()).item() for name, a, b in (
        ("out", out, out_r), ("dq", q32.grad, qr.grad), ("dk", k32.grad, kr.grad), ("dv", v32.grad, vr.grad))}
    sel32_ok = torch.equal(msa_select(iq.float(), ik.float(), block_size=BS, topk=TOPK), ref)
    log(f"check (bf16 vs fp64, S={S}, Hq={Hq}, G={Gs}): {res}; fp32: {fp32}, fp32 select exact {sel32_ok}")
    errs = [v for kk, v in res.items() if kk != "select_exact"]
    res.update(fp32, select_fp32_exact=sel32_ok)
    res["pass"] = (sel_ok and sel32_ok and all(math.isfinite(e) and e < 1.5e-2 for e in errs)
                   and all(math.isfinite(e) and e < 1e-4 for e in fp32.values()))
    return res


def ours_fns(q, k, v, iq, ik, dout, kernels):
    """Selection, forward and forward+backward through the API; `kernels`: the attention's
    `msa_backends` arguments (backends and tiles)."""
    holder = {}

    def select():
        holder["sel"] = msa_select(iq, ik, block_size=BS, topk=TOPK)

    select()

    def fwd():
        with msa_backends(**kernels):
            return msa_attention(q, k, v, holder["sel"], block_size=BS)

    def fwdbwd():
        out = fwd()
        torch.autograd.grad(out, (q, k, v), dout)

    return holder, select, fwd, fwdbwd


def indexer_terms(q, k, v, iq, ik, sel, dout):
    """The MSA layer's training step with and without the indexer-loss terms, in one process
    (`layer_ms`: selection + attention fwd+bwd; `layer_with_indexer_ms`: the selection with the
    selected blocks' scores, the attention with the block mass from its own forward, the KL loss,
    and the backward of both, as model/msa/layer.py runs them; `indexer_ratio` = the second over
    the first, issue #20's bar <= 1.10), then the terms alone (ms): the block mass as a separate
    pass, the attention forward with / without its mass, the block scores forward and fwd+bwd,
    the KL loss fwd+bwd by its kernel and by the reference's autograd."""
    iq, ik = (x.detach().requires_grad_() for x in (iq, ik))

    def layer(with_terms: bool):
        def run():
            if not with_terms:
                out = msa_attention(q, k, v, msa_select(iq, ik, block_size=BS, topk=TOPK), block_size=BS)
                torch.autograd.grad(out, (q, k, v), dout)
                return
            blocks, scores = msa_select_with_scores(iq, ik, block_size=BS, topk=TOPK)
            out, _, p_main = msa_attention_with_mass(q, k, v, blocks, block_size=BS)
            loss = indexer_kl_loss(p_main, scores, blocks)
            torch.autograd.grad((out, loss), (q, k, v, iq, ik), (dout, torch.ones_like(loss)))
        return run

    with torch.no_grad():
        _, lse = msa_attention_with_lse(q, k, v, sel, block_size=BS)

    def attn_fwd(with_mass: bool):
        def run():
            with torch.no_grad():
                (msa_attention_with_mass if with_mass else msa_attention_with_lse)(q, k, v, sel, block_size=BS)
        return run

    def mass():
        return attention_block_mass(q.detach(), k.detach(), lse, sel, block_size=BS)

    def scores():
        return msa_block_scores(iq, ik, sel, block_size=BS)

    def scores_fb():
        sc = scores()
        torch.autograd.grad(sc, (iq, ik), torch.where(torch.isfinite(sc), 1.0, 0.0))

    # the block scores backward kernel alone
    sel32 = sel.to(torch.int32).contiguous()
    iq_k, ik_k = common.index_operands(iq.detach(), ik.detach())
    _, argmax, plan = indexer_ops.block_scores_argmax(iq_k, ik_k, sel32, BS, 0)
    d_sc = torch.randn(sel.shape, device="cuda")

    def scores_bwd():
        indexer_ops.block_scores_backward(iq_k, ik_k, sel32, argmax, d_sc, plan, BS)

    # the KL loss fwd+bwd on the layer's p_main and scores: the kernel against the reference's
    # autograd
    with torch.no_grad():
        p_main = msa_attention_with_mass(q, k, v, sel, block_size=BS)[2]
        sc = msa_block_scores(iq, ik, sel, block_size=BS)

    def kl(backend):
        def run():
            x = sc.detach().requires_grad_()
            with msa_backends(kl_loss=backend):
                torch.autograd.grad(indexer_kl_loss(p_main, x, sel), x)
        return run

    t_kl, t_kl_ref = timeit(kl("triton"), 1.0), timeit(kl("reference"), 1.0)
    del p_main, sc
    t_bwd = timeit(scores_bwd, 1.0)
    t_base, t_full = timeit(layer(False), 2.0), timeit(layer(True), 2.0)
    t_f, t_fm = timeit(attn_fwd(False), 1.0), timeit(attn_fwd(True), 1.0)
    t_m, t_s, t_sfb = timeit(mass, 1.0), timeit(scores, 1.0), timeit(scores_fb, 1.0)
    return dict(layer_ms=round(t_base, 3), layer_with_indexer_ms=round(t_full, 3),
                indexer_ratio=round(t_full / t_base, 4),
                attn_fwd_ms=round(t_f, 3), attn_fwd_with_mass_ms=round(t_fm, 3), block_mass_ms=round(t_m, 3),
                block_scores_fwd_ms=round(t_s, 3), block_scores_fwdbwd_ms=round(t_sfb, 3),
                block_scores_bwd_kernel_ms=round(t_bwd, 3), kl_fwdbwd_ms=round(t_kl, 3),
                kl_reference_fwdbwd_ms=round(t_kl_ref, 3),
                indexer_terms_separate_ms=round(t_m + t_sfb, 3))


def sdpa_backend(log):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(1, HQ, 1024, D, device="cuda", dtype=DT, requires_grad=True)
    k = torch.randn(1, G, 1024, D, device="cuda", dtype=DT, requires_grad=True)
    for be in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION):
        try:
            with sdpa_kernel(be):
                o = F.scaled_dot_product_attention(q, k, k, is_causal=True, enable_gqa=True)
                o.sum().backward()
            torch.cuda.synchronize()
            return be, True
        except Exception as e:  # noqa: BLE001 - try the next backend
            log(f"sdpa backend {be} with enable_gqa: {type(e).__name__}: {str(e)[:120]}")
    return SDPBackend.FLASH_ATTENTION, False


def flex_setup(sel, S):
    """BlockMask = union of the selected blocks per 128-query block (per head), mask_mod = the
    per-token selection, looked up in a bit table [B, G, S, words] (one bit per key block)."""
    from torch.nn.attention.flex_attention import BlockMask

    B, Gs, _, K = sel.shape
    nqb = nkb = math.ceil(S / 128)
    x = F.pad(sel, (0, 0, 0, nqb * 128 - S), value=-1).view(B, Gs, nqb, 128 * K)
    oh = torch.zeros(B, Gs, nqb, nkb + 1, dtype=torch.bool, device=sel.device)
    oh.scatter_(-1, torch.where(x < 0, nkb, x), True)
    oh = oh[..., :nkb]
    kv_num = oh.sum(-1, dtype=torch.int32)
    kv_idx = torch.argsort((~oh).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    hpg = HQ // Gs
    kv_num = kv_num.repeat_interleave(hpg, 1).contiguous()
    kv_idx = kv_idx.repeat_interleave(hpg, 1).contiguous()
    nw = math.ceil(nkb / 32)
    words = torch.zeros(B, Gs, S, nw, dtype=torch.int64, device=sel.device)
    valid = sel >= 0
    s = torch.where(valid, sel, 0)
    bit = torch.where(valid, torch.ones_like(s) << (s % 32), 0)
    words.scatter_add_(-1, s // 32, bit)  # selections are distinct per row: add == or
    table = words

    def mask_mod(b, h, q_idx, kv_idx_):
        blk = kv_idx_ // 128
        w = table[b, h // hpg, q_idx, blk // 32]
        return (((w >> (blk % 32)) & 1) == 1) & (kv_idx_ <= q_idx)

    bm = BlockMask.from_kv_blocks(kv_num, kv_idx, BLOCK_SIZE=128, mask_mod=mask_mod, seq_lengths=(S, S))
    return bm


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="8192,32768,131072")
    ap.add_argument("--no-1m", action="store_true")
    ap.add_argument("--no-baselines", action="store_true")
    ap.add_argument("--baselines", default="sdpa,flex", help="which of sdpa,flex to time")
    ap.add_argument("--baseline-sizes", default=None, help="sizes for the baselines (default --sizes)")
    ap.add_argument("--kinds", default="realistic,random", help="selections ours is timed on")
    ap.add_argument("--flex-kinds", default="realistic,random", help="selections Flex is timed on")
    ap.add_argument("--stem", default=None, help="output file name without suffix")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--variants", action="store_true", help="time tile-size variants of our kernels")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--heads", type=int, default=48, help="query heads (M2 48, M3 64)")
    ap.add_argument("--groups", type=int, default=8, help="KV heads = GQA groups = index query heads (M2 8, M3 4)")
    ap.add_argument("--compare", nargs=2, metavar="JSON", default=None,
                    help="print two result files (e.g. the 48/8 and 64/4 runs) side by side and exit")
    ap.add_argument("--out-md", default=None, help="with --compare: also write the table to this file")
    args = ap.parse_args()
    if args.compare:
        table = compare(*(json.loads(Path(f).read_text()) for f in args.compare))
        print(table)
        if args.out_md:
            Path(args.out_md).write_text(table + "\n")
        return
    if args.heads % args.groups:
        ap.error(f"--heads {args.heads} must be a multiple of --groups {args.groups} (GQA)")
    global HQ, G
    HQ, G = args.heads, args.groups
    lines = []

    def log(msg):
        print(msg, flush=True)
        lines.append(msg)

    props = torch.cuda.get_device_properties(0)
    gpu = props.name
    meta = dict(gpu=gpu, torch=torch.__version__, triton=triton.__version__,
                cuda=torch.version.cuda, date=datetime.date.today().isoformat(),
                config=dict(Hq=HQ, G=G, D=D, Di=DI, block=BS, topk=TOPK, dtype="bf16", batch=1,
                            attn_defaults=AttnConfig().__dict__))
    log(f"{gpu}  torch {torch.__version__}  triton {triton.__version__}  cuda {torch.version.cuda}")
    results = dict(meta=meta, rows=[], variants=[])
    if not args.no_check:
        results["check"] = check(log)
        if not results["check"]["pass"]:
            log("CHECK FAILED: timings below are of wrong kernels")

    sizes = [int(s) for s in args.sizes.split(",") if s]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = "h100" if "H100" in gpu else gpu.replace(" ", "_").lower()
    layout = "" if (HQ, G) == (48, 8) else f"_h{HQ}g{G}"
    stem = out_dir / (args.stem or f"msa_{tag}_{meta['date']}{layout}")

    def save():
        table = render(results)
        stem.with_suffix(".json").write_text(json.dumps(results, indent=1))
        stem.with_suffix(".md").write_text(
            f"# MSA benchmark, {gpu}, {meta['date']}\n\ntorch {meta['torch']}, triton {meta['triton']}, "
            f"CUDA {meta['cuda']}; Hq {HQ}, G {G}, d {D}, block {BS}, top-{TOPK}, bf16, batch 1; "
            f"SDPA: {results['meta'].get('sdpa', '-')}; ours: {results['meta'].get('ours_config', '-')}\n\n"
            f"{table}\n\nlog:\n\n```\n" + "\n".join(lines) + "\n```\n")
        return table

    def row(**kw):
        kw["gpu_after"] = gpu_state()
        results["rows"].append(kw)
        log(json.dumps(kw))

    def inputs(S):
        torch.manual_seed(S)
        q = torch.randn(1, S, HQ, D, device="cuda", dtype=DT, requires_grad=True)
        k = torch.randn(1, S, G, D, device="cuda", dtype=DT, requires_grad=True)
        v = torch.randn(1, S, G, D, device="cuda", dtype=DT, requires_grad=True)
        return q, k, v, torch.randn_like(q)

    # B: loop-order / tile variants at the largest size, realistic selection; keep the fastest
    kernels = dict(attention_config=AttnConfig())  # msa_backends arguments of the attention
    if args.variants:
        S = max(sizes)
        q, k, v, dout = inputs(S)
        iq, ik = index_inputs(S, "realistic", seed=S)
        sel = msa_select(iq, ik, block_size=BS, topk=TOPK)
        del iq, ik
        kernels = variants(results, log, q, k, v, sel, dout, 4 * S * BS * TOPK * D * HQ, S, "realistic")
        del q, k, v, dout, sel
        torch.cuda.empty_cache()
    probe = torch.empty(1, 1, G, DI, device="cuda", dtype=DT)
    select_used = ("gluon sm90, 256-token tiles" if select_backend(probe, BS) == "sm90"
                   else dict(common.SELECT_TILE))
    with msa_backends(**kernels):
        attention_used = attention_backends(torch.empty(1, 1, HQ, D, device="cuda", dtype=DT), BS)
    results["meta"]["ours_config"] = dict(kernels["attention_config"].__dict__, select=select_used,
                                          attention=dict(zip(("fwd", "bwd"), attention_used)))
    log(f"ours: {kernels} attention (fwd, bwd) {attention_used} select {select_used}")
    save()

    # C: ours, every size, both selections (1M: realistic only)
    sels = {}
    for S in sizes + ([] if args.no_1m else [1 << 20]):
        big = S >= 1 << 20
        q, k, v, dout = inputs(S)
        attn_f = 4 * S * BS * TOPK * D * HQ
        index_f = S * S * DI * G
        for kind in args.kinds.split(","):
            if big and kind == "random":
                continue
            iq, ik = index_inputs(S, kind, seed=S + (kind == "random"))
            holder, select, fwd, fwdbwd = ours_fns(q, k, v, iq, ik, dout, kernels)
            ub, ut = union_stats(holder["sel"], S)
            budget = 1.0 if not big else 0.1
            t_sel = timeit(select, budget, min_reps=2 if big else 3)
            t_f = timeit(fwd, budget)
            t_fb = timeit(fwdbwd, budget)
            mem_fb = peak_gb(lambda: (select(), fwdbwd()))
            terms = indexer_terms(q, k, v, iq, ik, holder["sel"], dout) if kind == "realistic" and not big else {}
            row(S=S, sel=kind, method="ours", union_qblock=round(ub, 2), union_tile=round(ut, 2),
                select_ms=round(t_sel, 3), select_tflops=round(index_f / t_sel / 1e9, 1),
                fwd_ms=round(t_f, 3), fwdbwd_ms=round(t_fb, 3),
                total_fwd_ms=round(t_sel + t_f, 3), total_fwdbwd_ms=round(t_sel + t_fb, 3),
                attn_fwd_tflops=round(attn_f / t_f / 1e9, 1),
                attn_fwdbwd_tflops=round(3.5 * attn_f / t_fb / 1e9, 1), peak_gb_fwdbwd=round(mem_fb, 2),
                **terms)
            if not big:
                sels[(S, kind)] = (holder["sel"], ub)
            # the closures hold q/k/v/dout and the index inputs: drop them, or they stay
            # allocated into the next size's (and the baselines') peak memory
            iq = ik = holder = select = fwd = fwdbwd = None
        del q, k, v, dout
        torch.cuda.empty_cache()
        save()

    if args.no_baselines:
        log(save())
        return

    # D: dense causal attention (SDPA), E: FlexAttention with the same selections
    from torch.nn.attention import sdpa_kernel
    from torch.nn.attention.flex_attention import flex_attention

    be, gqa = sdpa_backend(log)
    results["meta"]["sdpa"] = f"{be.name}, {'enable_gqa=True' if gqa else f'k/v repeated to {HQ} heads'}"
    log(f"sdpa: {results['meta']['sdpa']}")
    base_sizes = [int(x) for x in (args.baseline_sizes or args.sizes).split(",") if x]
    for S in base_sizes if "sdpa" in args.baselines else []:
        q, k, v, dout = inputs(S)
        dense_f = 2 * S * S * D * HQ
        qd = q.detach().transpose(1, 2).requires_grad_()
        kd = k.detach().transpose(1, 2).requires_grad_()
        vd = v.detach().transpose(1, 2).requires_grad_()
        if not gqa:
            kd = kd.repeat_interleave(HQ // G, 1).detach().requires_grad_()
            vd = vd.repeat_interleave(HQ // G, 1).detach().requires_grad_()
        dod = dout.transpose(1, 2)

        def d_fwd():
            with sdpa_kernel(be):
                return F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, enable_gqa=gqa)

        def d_fb():
            torch.autograd.grad(d_fwd(), (qd, kd, vd), dod)

        tf, tfb = timeit(d_fwd, 1.5), timeit(d_fb, 2.5)
        row(S=S, sel="-", method="sdpa", fwd_ms=round(tf, 3), fwdbwd_ms=round(tfb, 3),
            dense_fwd_tflops=round(dense_f / tf / 1e9, 1),
            dense_fwdbwd_tflops=round(3.5 * dense_f / tfb / 1e9, 1),
            peak_gb_fwdbwd=round(peak_gb(d_fb), 2))
        q = k = v = dout = qd = kd = vd = dod = None
        torch.cuda.empty_cache()
        save()

    flex = torch.compile(flex_attention, dynamic=False)
    # the H100 default tiles of torch 2.11 ask for 256 KB of shared memory here and do not
    # compile; these are the sm90 defaults with one pipeline stage fewer, then a smaller fallback
    flex_opts = [dict(BLOCK_M=128, BLOCK_N=64, num_stages=2, BLOCK_M1=64, BLOCK_N1=128,
                      BLOCK_M2=128, BLOCK_N2=64),
                 dict(BLOCK_M=64, BLOCK_N=64, num_stages=1, BLOCK_M1=64, BLOCK_N1=64,
                      BLOCK_M2=64, BLOCK_N2=64)]
    for S in base_sizes if "flex" in args.baselines else []:
        q, k, v, dout = inputs(S)
        attn_f = 4 * S * BS * TOPK * D * HQ
        qf = q.detach().transpose(1, 2).contiguous().requires_grad_()
        kf = k.detach().transpose(1, 2).contiguous().requires_grad_()
        vf = v.detach().transpose(1, 2).contiguous().requires_grad_()
        dof = dout.transpose(1, 2).contiguous()
        for kind in args.flex_kinds.split(","):
            sel, ub = sels[(S, kind)]
            bm = flex_setup(sel, S)

            def f_fwd():
                return flex(qf, kf, vf, block_mask=bm, enable_gqa=True, kernel_options=flex_opts[0])

            def f_fb():
                torch.autograd.grad(f_fwd(), (qf, kf, vf), dof)

            t0 = time.perf_counter()
            while True:
                try:
                    f_fb()
                    break
                except Exception as e:  # noqa: BLE001 - tiles that do not fit: next option
                    log(f"flex {flex_opts[0]} failed: {type(e).__name__}: {str(e)[-200:]}")
                    if len(flex_opts) == 1:
                        raise
                    flex_opts.pop(0)
                    torch._dynamo.reset()
            results["meta"]["flex_kernel_options"] = flex_opts[0]
            torch.cuda.synchronize()
            log(f"flex compile+first run S={S} {kind}: {time.perf_counter() - t0:.1f} s")
            with msa_backends(**kernels):
                o_ours = msa_attention(q.detach(), k.detach(), v.detach(), sel, block_size=BS)
            o_flex = f_fwd().transpose(1, 2)
            agree = ((o_flex.float() - o_ours.float()).norm() / o_ours.float().norm()).item()
            tf, tfb = timeit(f_fwd), timeit(f_fb)
            row(S=S, sel=kind, method="flex", union_qblock=round(ub, 2), fwd_ms=round(tf, 3),
                fwdbwd_ms=round(tfb, 3), attn_fwd_tflops=round(attn_f / tf / 1e9, 1),
                attn_fwdbwd_tflops=round(3.5 * attn_f / tfb / 1e9, 1),
                peak_gb_fwdbwd=round(peak_gb(f_fb), 2), rel_diff_vs_ours=round(agree, 5))
            bm = o_ours = o_flex = None
        q = k = v = dout = qf = kf = vf = dof = None
        torch.cuda.empty_cache()
        save()
    log(save())
    log(f"wrote {stem}.json/.md")


def variants(results, log, q, k, v, sel, dout, attn_f, S, kind):
    """Tile / loop / load variants of the three kernels (bench/NOTES_msa.md). The forward
    variants are chosen by forward time, the dq variants by fwd+bwd time with the default
    forward, the selection tile by its time; returns the combined `msa_backends` arguments of
    the attention (backends and tiles)."""
    tiles = AttnConfig(fwd_sub_n=128, fwd_stages=2, fwd_tma=True, dq_sub_n=64, dq_stages=2, dq_tma=False)
    fwd_kernels = {  # name: the forward's backend (the round-2 sweep of 64-key steps lost: NOTES)
        "fwd sub128 s2 tma (Triton)": dict(attention="triton"),
        "fwd gluon sm90 (warp-specialised)": dict(attention="sm90"),
    }
    dq_kernels = {  # name: the backward's backend, with the default forward
        "dq sub64 s2 pointers, static inner loop (Triton)": dict(attention_bwd="triton"),
        "dq gluon sm90 (warp-specialised)": dict(attention_bwd="sm90"),
    }

    def run(name, kernels, with_bwd):
        try:
            def fwd():
                with msa_backends(**kernels, attention_config=tiles):
                    return msa_attention(q, k, v, sel, block_size=BS)

            def fb():
                torch.autograd.grad(fwd(), (q, k, v), dout)

            tf = timeit(fwd, 1.0)
            r = dict(S=S, sel=kind, variant=name, fwd_ms=round(tf, 3), attn_fwd_tflops=round(attn_f / tf / 1e9, 1))
            if with_bwd:
                tfb = timeit(fb, 1.0)
                r.update(bwd_ms=round(tfb - tf, 3), fwdbwd_ms=round(tfb, 3))
        except Exception as e:  # noqa: BLE001 - a variant that does not compile (or run here) is a result too
            r = dict(S=S, sel=kind, variant=name, error=f"{type(e).__name__}: {str(e)[:200]}")
        results["variants"].append(r)
        log(json.dumps(r))
        return r

    best_fwd = min(((run(n, f, False).get("fwd_ms", 1e9), n) for n, f in fwd_kernels.items()))
    best_dq = min(((run(n, f, True).get("bwd_ms", 1e9), n) for n, f in dq_kernels.items()))
    best = {**fwd_kernels[best_fwd[1]], **dq_kernels[best_dq[1]]}
    run("best fwd + best dq", best, True)
    iq, ik = index_inputs(S, kind, seed=S + (kind == "random"))
    sel_best = None
    sel32 = sel.to(torch.int32)
    t = timeit(lambda: build_plan(sel32, S, HQ // G, 128, BS), 1.0)
    r = dict(S=S, sel=kind, variant="plan build alone (part of every forward)", plan_ms=round(t, 3))
    results["variants"].append(r)
    log(json.dumps(r))
    plan = build_plan(sel32, S, HQ // G, 128, BS)
    r = dict(S=S, sel=kind, variant="dq kernel with / without its dk/dv atomics (without: dk, dv wrong)",
             **{f"dq_atomic_{a}_ms": round(timeit(lambda: dq_kernel(q, k, v, dout, sel32, plan, a), 1.0), 3)
                for a in (True, False)})
    results["variants"].append(r)
    log(json.dumps(r))
    fwd_launchers = {"triton": attention_ops}
    if attention_backends(q, BS)[0] == "sm90":
        from model.msa.ops import attention_sm90

        fwd_launchers["gluon sm90"] = attention_sm90
    for name, launchers in fwd_launchers.items():
        t = timeit(lambda: launchers.attn_fwd(q, k, v, sel32, plan, BS, D**-0.5, AttnConfig()), 1.0)
        r = dict(S=S, sel=kind, variant=f"fwd kernel alone, plan prebuilt ({name})", fwd_ms=round(t, 3),
                 attn_fwd_tflops=round(attn_f / t / 1e9, 1))
        results["variants"].append(r)
        log(json.dumps(r))
    iqp, ikp = common.index_operands(iq, ik)
    if select_backend(iqp, BS) == "sm90":
        from model.msa.ops import select_sm90

        for bt, ns in ((128, 4), (256, 3)):
            t = timeit(lambda: select_sm90.select(iqp, ikp, BS, TOPK, 1, 0, num_stages=ns, block_t=bt), 1.0)
            r = dict(S=S, sel=kind, variant=f"select gluon sm90 (warp-specialised), {bt} tokens, {ns} stages",
                     select_ms=round(t, 3),
                     select_tflops=round(S * S * DI * G / t / 1e9, 1))
            results["variants"].append(r)
            log(json.dumps(r))
    for bt, w, st, sn in ((128, 8, 3, 64),):
        name = f"select block_t{bt} w{w} s{st} sub{sn} (Triton)"
        try:
            t = timeit(lambda: select_ops.select(iq, ik, BS, TOPK, 1, block_t=bt, num_warps=w, num_stages=st,
                                                 sub_n=sn), 1.0)
            r = dict(S=S, sel=kind, variant=name, select_ms=round(t, 3),
                     select_tflops=round(S * S * DI * G / t / 1e9, 1))
            if sel_best is None or t < sel_best[0]:
                sel_best = (t, dict(block_t=bt, num_warps=w, num_stages=st, sub_n=sn))
        except Exception as e:  # noqa: BLE001
            r = dict(S=S, sel=kind, variant=name, error=str(e)[:200])
        results["variants"].append(r)
        log(json.dumps(r))
    if sel_best is not None:
        common.SELECT_TILE.update(sel_best[1])
    scores_tiles(results, log, iqp, ikp, sel32, S, kind)
    return dict(best, attention_config=tiles)


def scores_tiles(results, log, iq, ik, sel32, S, kind):
    """The block scores forward (`indexer.block_scores_argmax`) at token tile x warps x stages x
    key step, each checked equal to the default tile's scores and argmax keys."""
    want = indexer_ops.block_scores_argmax(iq, ik, sel32, BS, 0)[:2]
    for bt, w, st, sn in ((128, 8, 3, 64), (128, 8, 3, 128), (128, 8, 2, 128), (128, 4, 3, 64), (128, 4, 2, 128),
                          (128, 8, 4, 32), (64, 4, 3, 64), (64, 4, 3, 128), (256, 8, 2, 64)):
        tile = dict(block_t=bt, num_warps=w, num_stages=st, sub_n=sn)
        name = f"block scores fwd block_t{bt} w{w} s{st} sub{sn}"
        try:
            def run():
                return indexer_ops.block_scores_argmax(iq, ik, sel32, BS, 0, tile=tile)

            got = run()[:2]
            r = dict(S=S, sel=kind, variant=name, scores_fwd_ms=round(timeit(run, 0.6), 3),
                     equal=all(torch.equal(a, b) for a, b in zip(got, want)))
        except Exception as e:  # noqa: BLE001 - a tile that does not compile (shared memory) is a result too
            r = dict(S=S, sel=kind, variant=name, error=f"{type(e).__name__}: {str(e)[:200]}")
        results["variants"].append(r)
        log(json.dumps(r))


def dq_kernel(q, k, v, dout, sel32, plan, atomic_kv):
    """The dq kernel alone as `attn_bwd` launches it (lse/delta: placeholders of the right
    shape; attribution of its time only)."""
    Sq = q.shape[1]
    lse = torch.zeros(1, Sq, HQ, device="cuda")
    dq = torch.empty_like(q)
    dk32 = torch.zeros(1, Sq, G, D, device="cuda")
    dv32 = torch.zeros_like(dk32)
    attention_ops._msa_attn_bwd_dq_kernel[(plan.n_tiles, G)](
        q, k, v, dout, sel32, plan.union, plan.count, lse, lse, dq, dk32, dv32,
        Sq, BS, plan.n_tiles, plan.union.shape[-1], D**-0.5 * LOG2E, D**-0.5,
        BLOCK_N=BS, SUB_N=64, ATOMIC_KV=atomic_kv, SKIP_MASK=False, TMA=False, G=G, HPG=HQ // G, D=D,
        TOPK=TOPK, TOPK_P2=TOPK, BLOCK_M=128, DOT_PREC="tf32", num_warps=8, num_stages=2)


def render(results):
    hdr = ("| S | selection | method | union/qblock | select ms | fwd ms | fwd+bwd ms | total fwd ms "
           "| total fwd+bwd ms | attn fwd TFLOP/s | fwd+bwd TFLOP/s | peak GiB (fwd+bwd) |")
    out = [hdr, "|" + "---|" * 12]
    for r in results["rows"]:
        tfl = r.get("attn_fwd_tflops", r.get("dense_fwd_tflops", ""))
        tflb = r.get("attn_fwdbwd_tflops", r.get("dense_fwdbwd_tflops", ""))
        if r["method"] == "sdpa":
            tfl, tflb = f"{tfl} (dense)", f"{tflb} (dense)"
        out.append(
            f"| {r['S']} | {r['sel']} | {r['method']} | {r.get('union_qblock', '-')} | "
            f"{r.get('select_ms', '-')} | {r['fwd_ms']} | {r['fwdbwd_ms']} | "
            f"{r.get('total_fwd_ms', r['fwd_ms'])} | {r.get('total_fwdbwd_ms', r['fwdbwd_ms'])} | "
            f"{tfl} | {tflb} | {r.get('peak_gb_fwdbwd', '-')} |")
    return "\n".join(out)


COMPARED = (("select_ms", "select ms"), ("fwd_ms", "fwd ms"), ("fwdbwd_ms", "fwd+bwd ms"),
            ("total_fwdbwd_ms", "total fwd+bwd ms"), ("attn_fwdbwd_tflops", "fwd+bwd TFLOP/s"))


def compare(a: dict, b: dict) -> str:
    """Markdown table of two runs' rows side by side, matched by (S, selection, method): each
    timing of layout A | layout B | B / A. The layouts (Hq/G) and GPUs head the columns."""
    def label(r):
        c = r["meta"]["config"]
        return f"{c['Hq']}/{c['G']} ({r['meta']['gpu']}, {r['meta']['date']})"

    def key(row):
        return row["S"], row["sel"], row["method"]

    rows_b = {key(r): r for r in b["rows"]}
    la, lb = label(a), label(b)
    head = ["S", "selection", "method"]
    for _, name in COMPARED:
        head += [f"{name} A", f"{name} B", "B/A"]
    out = [f"A = {la}, B = {lb}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for ra in a["rows"]:
        rb = rows_b.get(key(ra))
        if rb is None:
            continue
        cells = [str(ra["S"]), ra["sel"], ra["method"]]
        for field, _ in COMPARED:
            va, vb = ra.get(field), rb.get(field)
            ratio = f"{vb / va:.2f}" if isinstance(va, (int, float)) and isinstance(vb, (int, float)) and va else "-"
            cells += ["-" if va is None else str(va), "-" if vb is None else str(vb), ratio]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


if __name__ == "__main__":
    main()
