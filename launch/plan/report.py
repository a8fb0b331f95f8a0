"""The plan as text (per GPU of the fullest stage, then the step) and as the one-line JSON summary."""

from __future__ import annotations

import dataclasses
import math

from launch.plan.memory import GIB, Plan


def _count(n: float) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def _gib(b: float) -> str:
    return f"{b / GIB:9.2f} GiB"


def report(p: Plan) -> str:
    run, lay, w, s = p.run, p.layout, p.worst, p.settings
    m, c, t = run.model, run.cluster, run.train
    lines = [
        (f"model {m.name}: {_count(p.model_params)} parameters; {lay.world} GPUs = {c.nodes} nodes x "
         f"{c.gpus_per_node} {c.gpu} ({'?' if p.capacity_gib is None else p.capacity_gib} GiB each)"),
        (f"layout tp={lay.tp} pp={lay.pp}{f' vpp={run.parallel.vpp}' if run.parallel.vpp else ''} cp={lay.cp} "
         f"ep={lay.ep} etp={lay.etp} dp={lay.dp}; sequence parallel {run.parallel.sequence_parallel}; "
         f"{s.backend} backend ({'TE fused attention' if s.backend == 'te' else 'SDPA attention, grouped experts'})"),
        (f"seq {t.seq_length}, micro-batch {t.micro_batch_size}, global batch {t.global_batch_size} "
         f"({p.microbatches} micro-batches per data-parallel rank); {s.precision}; "
         f"{'distributed' if s.distributed_optimizer else 'replicated'} optimizer (dense over dp*cp={p.dp_dense}, "
         f"experts over {p.dp_expert})"),
        "",
        f"per GPU, pipeline stage {w.stage} of {lay.pp} ({w.layers} layers, {w.inflight:g} micro-batches in flight):",
        f"  parameters      {_count(w.params.dense):>9} dense + {_count(w.params.expert)} experts",
        *(f"  {f.name:<16}{_gib(getattr(w.state, f.name))}" for f in dataclasses.fields(w.state)),
    ]
    first = "selective" if p.recompute == "selective" else "no recompute"
    lines.append(f"  activations       {first:>13}   full recompute")
    a, rc = w.activations, w.activations_recompute
    for k in sorted(dict.fromkeys([*a, *rc]), key=lambda k: -max(a.get(k, 0), rc.get(k, 0))):
        left = _gib(a[k]) if k in a else " " * 13
        lines.append(f"    {k:<16}{left}   {_gib(rc[k]) if k in rc else ''}")
    at_peak = [b for b in w.transients if b.at_peak]
    if at_peak:
        top = max(at_peak, key=lambda b: b.bytes)
        lines.append(f"  transient: {top.name:<13}{_gib(top.bytes)}   (the largest buffer alive at the activation peak)")
    if w.rebuilt_modules > w.peak_transient:
        lines.append(f"  rebuilt_modules  {_gib(w.rebuilt_modules)}   (selective recompute: a layer's rerun modules, "
                     "rebuilt in its backward; instead of the transient)")
    for b in w.transients:
        if not b.at_peak:
            lines.append(f"  (inside a layer, not at the peak: {b.name} {b.bytes / GIB:.2f} GiB)")
    lines.append(f"  total           {_gib(w.total)}   {_gib(w.total_recompute)}")
    if p.fits is not None:
        lines.append(f"  + headroom {p.options.headroom_gib:g} GiB vs {p.capacity_gib} GiB: "
                     f"{'fits' if p.fits else 'does NOT fit'} (recompute={p.recompute})")
    lines += [
        "",
        f"step: {p.flops_per_token / 1e9:.3g} GFLOP/token x {p.tokens_per_step:,} tokens = "
        f"{p.step_flops / 1e15:.3g} PFLOP; "
        + (f"at MFU {p.options.mfu:g} of {p.peak_tflops:g} TFLOP/s x {lay.world}: {p.step_s:.2f} s/step, "
           f"{p.tokens_per_s:,.0f} tokens/s" if not math.isnan(p.step_s)
           else f"no peak FLOP/s for {c.gpu}: set cluster.peak_tflops for a step time"),
        f"FP8: not modelled (train.fp8={t.fp8}); weights and activations counted in {s.precision}.",
        *(f"needs: {n}" for n in p.needs),
    ]
    return "\n".join(lines)


def _rounded(x: float, digits: int) -> float | None:
    return None if math.isnan(x) else round(x, digits)


def summary(p: Plan) -> dict:
    """The JSON line: what a script needs to compare layouts."""
    w, lay = p.worst, p.layout
    return {
        "gpus": lay.world,
        "memory_gib_per_gpu": round(p.memory_gib, 3),
        "fits": p.fits,
        "tokens_per_s_estimate": _rounded(p.tokens_per_s, 1),
        "step_time_s_estimate": _rounded(p.step_s, 4),
        "recompute": p.recompute,
        "memory_gib_per_gpu_no_recompute": round(w.total / GIB, 3),
        "memory_gib_per_gpu_full_recompute": round(w.total_recompute / GIB, 3),
        "gpu": p.run.cluster.gpu,
        "gpu_memory_gib": p.capacity_gib,
        "layout": {k: getattr(lay, k) for k in ("tp", "pp", "cp", "ep", "etp", "dp")},
        "worst_stage": w.stage,
        "params_per_gpu": round(w.params.total),
        "train_flops_per_token": p.flops_per_token,
        "needs": list(p.needs),
    }
