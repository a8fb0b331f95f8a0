"""Training throughput through the real Trainer: dense (SDPA, cuDNN first) vs MSA attention at
long context, with the planner's peak beside the measured one, on the local backend, Transformer
Engine in bf16 and Transformer Engine in FP8.

    python bench/train_throughput.py                                  # proxy_1gpu, 16K/32K/128K, dense + MSA
    python bench/train_throughput.py --model tiny --seqs 256 --iters 2 # CPU smoke run
    python bench/train_throughput.py --seqs 4096 --attention dense -- train.recompute=selective
    python bench/train_throughput.py --seqs 4096 --attention dense --backends local,te --fp8 tensorwise

--backends picks the module backends (local: megatron-core's modules with ours; te: Transformer
Engine's, bf16); --fp8 RECIPE[,RECIPE] adds a Transformer Engine FP8 case per recipe (delayed,
tensorwise, blockwise on Hopper) to every length and attention. MFU is against the device's
dense bf16 peak (pretrain/hardware.py) whatever the precision, so FP8's gain shows as MFU above
the bf16 cases'. FP8 cases also report which GEMM modules ran in FP8 (forward hooks reading
Transformer Engine's FP8 state; the output layer, the router and MSA's index branch are not TE
modules and stay bf16) and the profiled step's kernels by name (`kernel_split`): FP8 and bf16
GEMMs, Transformer Engine's casts (quantize, cast-transpose) and its amax/scale updates.

Each case (context length x attention x selection) runs in its own process (fresh CUDA state,
an OOM ends only that case): it builds the Trainer of `model=<model>` with the case's
overrides, runs `--warmup` steps (compilation, autotuning, the optimizer state), times `--iters`
steps, profiles one more step with torch.profiler and one under cProfile. Reported per case
(a row names its dense layers, MTP depth, vocabulary and recompute): tokens/s, model TFLOP/s per
GPU and MFU (pretrain/flops.py: matmul FLOPs, MSA layers counted at the keys they attend, i.e.
the attention FLOPs MSA performs for its selections, not dense S/2; the GPU's peak from
pretrain/hardware.py), the peak of torch.cuda.max_memory_allocated over the timed steps and
launch.plan's peak for the same overrides (and their ratio), and the profiled step's device
time split into attention (core attention kernels), index (MSA index branch, selection and
indexer loss), moe_dispatch (router, permutation, token dispatch), experts (the expert GEMMs and
SwiGLU), output_loss (output layer and cross entropy of every head), optimizer (clip, Adam,
weight copies), grad_accum (gradients added into megatron's fp32 main grads) and rest. Forward
ops are attributed by the module they run in; backward ops by the forward op that recorded
their autograd node (the profiler's sequence numbers). The JSON also holds the top ops with
their input shapes, the device's idle gaps with the host ops open at each (`idle_gaps`), the
host profile (`host_profile`) and, for MSA, the blocks visited per 128-token tile (`mean_union`).

The Amdahl bound of an MSA row: the tokens/s of its step with the attention and index costs
removed, i.e. step time x (1 - (attention + index) / profiled device time), both measured in
that row's profiled step. However fast the sparse attention and its index branch get, the row
cannot train faster than that.

MSA cases run MSA in every decoder layer but `--dense-layers` (default 0, as the long-context
recipes keep the first layer dense); their MTP modules keep dense attention unless
`--mtp-attention msa` (`model.attention.mtp=msa`; each row's `mtp_attention`). `--selection` picks
the index branch as initialised (`model`: near-random selections, every query tile visits most
past blocks), coherent index queries (`coherent`, see `coherent_index_queries`: what a trained
index branch selects) or both. For proxy_1gpu each length tries, in order, no recompute, the
cheap selective reruns (core attention, expert activation, MoE dispatch), selective with the whole
MoE block, full recompute, and last (GPUs smaller than an H200) fewer layers, no MTP and a
smaller vocabulary; settings launch.plan says do not fit this GPU are skipped, and when a case
runs out of memory anyway every attention of that length reruns with the next. Dense and MSA
cases of one length share every setting but the attention.

Prints a table and writes JSON (config of each case, versions) to --out as
train_throughput_<device>_<date>.json, and a PNG of tokens/s and peak memory against the
context length beside it when matplotlib imports.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # as launch.slurm sets

import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

BASE = ["checkpoint.save=false", "checkpoint.load=null", "logger.wandb.mode=disabled", "logger.console=lines",
        "train.eval_interval=0", "train.micro_batch_size=1"]
# proxy_1gpu: the recompute settings each length tries in order (the full model: 4 layers, one
# MTP module, M2's 200K vocabulary), then smaller models for GPUs where none of them fits.
RECOMPUTE_LADDER = [
    [],
    ["train.recompute=selective", "train.recompute_modules=[core_attn,moe_act,moe_dispatch]"],
    ["train.recompute=selective", "train.recompute_modules=[core_attn,moe]"],
    ["train.recompute=full"],
]
SMALLER = [["model.mtp_num_layers=0", "model.vocab_size=32768", "train.recompute=full"],
           ["model.mtp_num_layers=0", "model.vocab_size=8192", "model.num_layers=1", "train.recompute=full"]]
CATEGORIES = ("attention", "index", "moe_dispatch", "experts", "output_loss", "optimizer", "grad_accum")
GIB = 1024**3


def settings(model: str, seq: int) -> list[list[str]]:
    """The overrides to try in order for one context length."""
    if model != "proxy_1gpu":
        return [["train.global_batch_size=1"]]
    batch = ["train.global_batch_size=8" if seq <= 4096 else "train.global_batch_size=1"]
    return [batch + s for s in RECOMPUTE_LADDER + SMALLER]


def attention_overrides(attention: str, dense_layers: str, mtp: str = "dense") -> list[str]:
    if attention == "dense":
        return ["model.attention.type=dense"]
    return ["model.attention.type=msa", f"model.attention.dense_layers=[{dense_layers}]", f"model.attention.mtp={mtp}"]


FP8_FORMAT = {"delayed": "hybrid", "tensorwise": "hybrid", "blockwise": "e4m3", "mxfp8": "e4m3"}
"""train.fp8 per recipe: e4m3 forward and e5m2 gradients for per-tensor scaling, e4m3 with blocks."""


def backend_overrides(backend: str) -> list[str]:
    """auto (the model config's), local, te (bf16) or te-fp8:<recipe>."""
    if backend == "auto":
        return []
    if backend.startswith("te-fp8:"):
        recipe = backend.split(":", 1)[1]
        return ["model.backend=te", f"train.fp8={FP8_FORMAT[recipe]}", f"train.fp8_recipe={recipe}"]
    return [f"model.backend={backend}"]


def case_overrides(model: str, seq: int, attention: str, setting: list[str], extra: list[str],
                   dense_layers: str = "0", backend: str = "auto", mtp: str = "dense") -> list[str]:
    return [f"model={model}", *BASE, f"train.seq_length={seq}", *setting, *attention_overrides(attention, dense_layers, mtp),
            *backend_overrides(backend), *extra]


def planned_peak(overrides: list[str]) -> tuple[float, bool | None]:
    """launch.plan's peak (GiB) of the case on this machine's GPU, and whether it fits it (None:
    no GPU, no verdict). The backend is the one the Trainer will resolve here."""
    from launch.compose import compose_run
    from launch.plan import PlanOptions, plan
    from model.specs import te_available
    from pretrain.hardware import gpu_of_device

    cluster = ["cluster.gpu=cpu"]
    if torch.cuda.is_available():
        gpu = gpu_of_device(torch.cuda.get_device_name())
        cluster = [f"cluster.gpu={gpu.key}"] if gpu else ["cluster.gpu=cpu"]
    backend = [] if any(o.startswith("model.backend=") for o in overrides) else [
        f"model.backend={'te' if te_available() else 'local'}"]
    run = compose_run([*overrides, *cluster, "cluster.gpus_per_node=1", *backend])
    p = plan(run, PlanOptions())
    return p.memory_gib, p.fits


# ---- one case, in its own process ---------------------------------------------------------


def _label_modules(model_chunks) -> list:
    """Forward hooks that open a profiler range `bench::<category>` around the modules of each
    category (the innermost range wins when they nest)."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    handles = []
    for chunk in model_chunks:
        for name, module in chunk.named_modules():
            if name.endswith(".core_attention"):
                category = "attention"
            elif name.endswith(".indexer"):
                category = "index"
            elif name.endswith(".mlp.experts"):
                category = "experts"
            elif isinstance(module, MoELayer):
                category = "moe_dispatch"
            elif name.endswith("output_layer"):
                category = "output_loss"
            else:
                continue
            ranges = []

            def enter(mod, args, category=category, ranges=ranges):
                rf = torch.profiler.record_function(f"bench::{category}")
                rf.__enter__()
                ranges.append(rf)

            def leave(mod, args, output, ranges=ranges):
                ranges.pop().__exit__(None, None, None)

            handles.append(module.register_forward_pre_hook(enter))
            handles.append(module.register_forward_hook(leave))
    return handles


@contextlib.contextmanager
def _label_loss_and_optimizer(trainer):
    """The language-model loss (main and MTP heads) as `bench::output_loss` and the optimizer
    step (grad-norm clip, Adam, copies to the bf16 weights) as `bench::optimizer`."""
    def unwrap(module):  # DDP -> Float16Module -> GPTModel
        while hasattr(module, "module"):
            module = module.module
        return module

    targets = [(unwrap(chunk), "compute_language_model_loss", "output_loss") for chunk in trainer.model]
    targets.append((trainer.optimizer, "step", "optimizer"))

    def labelled(fn, category):
        def run(*args, **kwargs):
            with torch.profiler.record_function(f"bench::{category}"):
                return fn(*args, **kwargs)
        return run

    for obj, name, category in targets:
        setattr(obj, name, labelled(getattr(obj, name), category))
    try:
        yield
    finally:
        for obj, name, _ in targets:
            delattr(obj, name)  # back to the class's method


def mean_union(blocks_bgsk: torch.Tensor, tile: int = 128) -> float:
    """Mean number of distinct key blocks selected by the tokens of one `tile`-token query tile
    (per GQA group): the blocks the sparse kernels visit for that tile."""
    B, G, S, K = blocks_bgsk.shape
    pad = -S % tile
    x = torch.nn.functional.pad(blocks_bgsk, (0, 0, 0, pad), value=-1).view(B, G, -1, tile * K)
    x = x.sort(dim=-1).values
    distinct = (x[..., 1:] != x[..., :-1]) & (x[..., 1:] >= 0)
    return (distinct.sum(-1) + (x[..., 0] >= 0)).float().mean().item()


def coherent_index_queries(model_chunks, seed: int = 0) -> list:
    """Forward hooks that make every MSA layer's index queries vary smoothly along the sequence:
    index_q <- walk + 0.3 * index_q, where walk is a unit-scale random walk (step 0.05 per
    token) plus a constant offset, as bench/msa.py's "realistic" selections and
    ../shared/design/msa.md prescribe for timing sparse attention. An index branch at
    initialisation selects nearly at random (every query tile then visits most past blocks);
    a trained one selects similar blocks for neighbouring tokens. Everything else runs as in
    training (the indexer's gradient flows through the 0.3 * index_q term)."""
    from model.msa.layer import MSAIndexer

    walks = {}

    def hook(module, args, output):
        iq, ik = output
        key = (tuple(iq.shape), iq.device, iq.dtype)
        if key not in walks:
            g = torch.Generator(device=iq.device).manual_seed(seed)
            b, s, groups, dim = iq.shape
            walk = torch.randn(b, s, groups, dim, device=iq.device, generator=g).mul_(0.05).cumsum_(1)
            walk += 3 * torch.randn(b, 1, groups, dim, device=iq.device, generator=g)
            walks[key] = walk.to(iq.dtype)
        return walks[key] + 0.3 * iq, ik

    return [m.register_forward_hook(hook) for chunk in model_chunks for m in chunk.modules()
            if isinstance(m, MSAIndexer)]


@contextlib.contextmanager
def _label_msa_index_functions(unions: list):
    """The index-branch work inside the MSA core attention (selection and block scores, the dense
    warm-up's terms, KL loss) as `bench::index` ranges: wraps the names model.msa.layer calls.
    The target mass of sparse training comes from the attention forward's own pass
    (msa_attention_with_mass) and counts as attention. Appends each selection's mean union per
    128-token tile to `unions`."""
    from model.msa import layer

    names = ("msa_select", "msa_select_with_scores", "dense_block_mass", "dense_block_scores", "indexer_kl_loss")
    originals = {n: getattr(layer, n) for n in names}
    selections = {originals["msa_select"]: lambda out: out, originals["msa_select_with_scores"]: lambda out: out[0]}

    def labelled(fn):
        def run(*args, **kwargs):
            with torch.profiler.record_function("bench::index"):
                out = fn(*args, **kwargs)
            if fn in selections:
                unions.append(mean_union(selections[fn](out)))
            return out
        return run

    for n, fn in originals.items():
        setattr(layer, n, labelled(fn))
    try:
        yield
    finally:
        for n, fn in originals.items():
            setattr(layer, n, fn)


def time_split(events, cuda: bool) -> dict[str, float]:
    """Seconds of device time (CPU time on CPU) per category over the profiled events."""
    from torch.autograd import DeviceType

    def own_time(e) -> float:
        return (e.self_device_time_total if cuda else e.self_cpu_time_total) / 1e6

    def ancestors(e):
        while e is not None:
            yield e
            e = e.cpu_parent

    # Forward: the innermost bench:: range (grad_accum: gradients added into megatron's
    # main_grad buffers by the AccumulateGrad hooks); every op inside it lends its category to the
    # autograd nodes it recorded (sequence numbers), which backward ops then inherit.
    by_seq: dict[int, str] = {}
    category_of = {}
    for e in events:
        label = next((a.name[len("bench::"):] for a in ancestors(e) if a.name.startswith("bench::")), None)
        category_of[id(e)] = label
        if label is not None and e.sequence_nr >= 0 and not e.is_async:
            by_seq.setdefault(e.sequence_nr, label)
    out = defaultdict(float)
    for e in events:
        if e.device_type != DeviceType.CPU:
            continue  # a kernel: its time is already its launching op's self device time
        label = category_of[id(e)]
        if label is None:
            node = next((a for a in ancestors(e) if a.name.startswith("autograd::engine::evaluate_function")), None)
            if node is not None and "AccumulateGrad" in node.name:
                label = "grad_accum"
            else:
                label = by_seq.get(node.sequence_nr) if node is not None else None
        out[label or "rest"] += own_time(e)
    return {k: out.get(k, 0.0) for k in (*CATEGORIES, "rest")}


def amdahl_shares(split: dict[str, float]) -> float:
    """The share of the profiled step's device time spent in attention and the MSA index branch:
    what the Amdahl bound removes."""
    total = sum(split.values())
    return (split["attention"] + split["index"]) / total if total > 0 else 0.0


def idle_gaps(events, count: int = 12, min_us: float = 200.0) -> dict:
    """Where the device waits on the host in the profiled step: the device's busy intervals
    (kernels and copies) merged, the idle time between the first and last of them, and the
    longest gaps with the host ops open when each began (outermost first), e.g. a sync
    (`aten::item`, `aten::nonzero`) or a stretch of host-side work."""
    from torch.autograd import DeviceType

    busy = sorted((e.time_range.start, e.time_range.end) for e in events if e.device_type != DeviceType.CPU)
    if not busy:
        return {}
    merged = [list(busy[0])]
    for start, end in busy[1:]:
        if start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    gaps = [(b[0] - a[1], a[1]) for a, b in zip(merged, merged[1:]) if b[0] - a[1] >= min_us]
    host = [e for e in events if e.device_type == DeviceType.CPU]

    def open_ops(t):
        inside = [e for e in host if e.time_range.start <= t < e.time_range.end]
        inside.sort(key=lambda e: e.time_range.start)
        return " > ".join(e.name[:60] for e in inside[-4:])

    span = merged[-1][1] - merged[0][0]
    return dict(
        device_span_s=span / 1e6,
        idle_s=sum(g for g, _ in gaps) / 1e6,
        gaps=[dict(ms=g / 1e3, at_ms=(t - merged[0][0]) / 1e3, host=open_ops(t))
              for g, t in sorted(gaps, reverse=True)[:count]],
    )


def host_profile(trainer, sync, count: int = 25) -> list[str]:
    """One more step under cProfile: the Python functions with the most own host time (where
    the host spends the step's idle gaps)."""
    import cProfile
    import io
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    trainer.train_step()
    sync()
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(count)
    return [line for line in out.getvalue().splitlines() if line.strip()][-count - 1:]


@contextlib.contextmanager
def _sdpa_priority(backends: str | None):
    """SDPA's backends in this order of priority (e.g. "cudnn,flash"), or torch's own choice."""
    if not backends:
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    names = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
    with sdpa_kernel([names[b] for b in backends.split(",")], set_priority=True):
        yield


_GEMM = ("gemm", "nvjet", "xmma", "cutlass")
"""Fragments of GEMM kernel names (cuBLAS/cuBLASLt, CUTLASS)."""
_FP8 = ("e4m3", "e5m2", "fp8", "f8f8")
"""Fragments naming an FP8 operand in a GEMM kernel's name."""
_TE_CAST = ("cast", "quantize", "transpose")
_TE_AMAX = ("amax", "scale")


def kernel_split(events, count: int = 6) -> dict:
    """The profiled step's device kernels by name: FP8 GEMMs, other GEMMs, Transformer Engine's
    casts to FP8 (quantize, cast+transpose), its amax and scale updates, its other kernels (e.g.
    fused norms); per class the device seconds, the number of launches and the `count` costliest
    names, so that the attribution (by name fragments, above) can be checked by eye."""
    from torch.autograd import DeviceType

    classes: dict[str, dict] = {}
    for e in events:
        if e.device_type == DeviceType.CPU:
            continue
        name = e.name.lower()
        te = "transformer_engine" in name or "nvte" in name
        if any(f in name for f in _GEMM):
            kind = "fp8_gemm" if any(f in name for f in _FP8) else "gemm"
        elif te and any(f in name for f in _TE_AMAX):
            kind = "te_amax_scale"
        elif te and any(f in name for f in _TE_CAST):
            kind = "te_cast"
        elif te:
            kind = "te_other"
        else:
            continue
        entry = classes.setdefault(kind, dict(s=0.0, launches=0, names={}))
        us = e.time_range.end - e.time_range.start
        entry["s"] += us / 1e6
        entry["launches"] += 1
        entry["names"][e.name[:140]] = entry["names"].get(e.name[:140], 0.0) + us / 1e3
    for entry in classes.values():
        entry["top_ms"] = dict(sorted(entry.pop("names").items(), key=lambda kv: -kv[1])[:count])
    return classes


def fp8_modules(model_chunks) -> tuple[list, dict[str, set[bool]]]:
    """Forward hooks on every GEMM module recording whether it ran in FP8: Transformer Engine's
    modules read TE's FP8 state, other linear layers (the output layer, the router's gating
    GEMM, MSA's index branch) never do. Returns (handles, {module name with layer numbers
    folded: the FP8 states seen})."""
    import re

    seen: dict[str, set[bool]] = defaultdict(set)
    handles = []
    try:
        from transformer_engine.pytorch.quantization import FP8GlobalStateManager
    except Exception:  # no TE: nothing runs in FP8
        FP8GlobalStateManager = None
    for chunk in model_chunks:
        for name, module in chunk.named_modules():
            te = type(module).__module__.startswith(("transformer_engine", "megatron.core.extensions.transformer_engine"))
            linear = isinstance(module, torch.nn.Linear) or type(module).__name__ in (
                "ColumnParallelLinear", "RowParallelLinear", "TopKRouter")
            if not (linear or (te and any(p.dim() == 2 for p in module.parameters(recurse=False)))):
                continue
            folded = re.sub(r"\.layers\.\d+\.", ".layers.*.", name.removeprefix("module.").removeprefix("module."))

            def hook(mod, args, folded=folded, te=te):
                seen[folded].add(bool(te and FP8GlobalStateManager is not None and FP8GlobalStateManager.is_fp8_enabled()))

            handles.append(module.register_forward_pre_hook(hook))
    return handles, seen


def _top_kernels(prof, cuda: bool, count: int = 40) -> list[dict]:
    """The profiled step's most expensive ops (by input shapes) by self device time (host time
    on CPU)."""
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    ops = sorted(prof.key_averages(group_by_input_shape=True), key=lambda e: getattr(e, attr), reverse=True)[:count]
    return [dict(name=e.key[:120], shapes=str(e.input_shapes)[:160], ms=getattr(e, attr) / 1e3, calls=e.count)
            for e in ops]


def run_case(overrides: list[str], warmup: int, iters: int, sdpa: str | None = None,
             selection: str = "model") -> dict:
    from launch.compose import compose_run
    from pretrain.flops import train_flops_per_token
    from pretrain.trainer import Trainer
    from parallel import setup

    total = warmup + iters + 2  # + the profiled step and the host-profiled step
    run = compose_run([*overrides, f"train.iters={total}"])
    t = run.train
    with tempfile.TemporaryDirectory() as run_dir, _sdpa_priority(sdpa):
        started = time.perf_counter()
        trainer = Trainer(run, Path(run_dir), resolved_config={})
        cuda = trainer.device.type == "cuda"
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        build_s = time.perf_counter() - started
        coherent = coherent_index_queries(trainer.model) if selection == "coherent" else []
        for _ in range(warmup):
            trainer.train_step()
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        losses = [trainer.train_step().lm_loss for _ in range(iters)]
        sync()
        step_s = (time.perf_counter() - start) / iters
        peak = torch.cuda.max_memory_allocated() if cuda else float("nan")
        activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
        handles = _label_modules(trainer.model)
        gemm_hooks, fp8_seen = fp8_modules(trainer.model)
        handles += gemm_hooks
        unions = []
        with (_label_msa_index_functions(unions), _label_loss_and_optimizer(trainer),
              torch.profiler.profile(activities=activities, record_shapes=True) as prof):
            trainer.train_step()
            sync()
        for h in handles + coherent:
            h.remove()
        split = time_split(prof.events(), cuda)
        kernels = kernel_split(prof.events()) if cuda else {}
        gaps = idle_gaps(prof.events()) if cuda else {}
        host = host_profile(trainer, sync)
        top = _top_kernels(prof, cuda)
        trainer.monitor.close(exit_code=0)
        tokens_per_s = t.global_batch_size * t.seq_length / step_s
        flops_per_token = train_flops_per_token(run.model, t.seq_length)
        peak_tflops = trainer.peak_tflops  # pretrain/flops.py peak_tflops: the GPU's dense bf16 peak
        tflops = tokens_per_s * flops_per_token / 1e12
        shares = amdahl_shares(split)
        backend = trainer.backend + (f"-fp8:{t.fp8_recipe}" if t.fp8 else "")
        record = dict(
            overrides=overrides, backend=backend, precision=trainer.settings.precision, fp8=t.fp8,
            fp8_recipe=t.fp8_recipe if t.fp8 else None, seq_length=t.seq_length, attention=run.model.attention.type,
            dense_layers=[i for i in range(run.model.num_layers) if i not in run.model.msa_layers()],
            num_layers=run.model.num_layers, mtp_num_layers=run.model.mtp_num_layers,
            mtp_attention="msa" if run.model.mtp_msa() else "dense",
            vocab_size=run.model.vocab_size, cross_entropy=run.model.cross_entropy, recompute=t.recompute,
            recompute_modules=list(t.recompute_modules) if t.recompute == "selective" else [],
            global_batch_size=t.global_batch_size,
            step_s=step_s, tokens_per_s=tokens_per_s, flops_per_token=flops_per_token, tflops=tflops,
            peak_tflops=peak_tflops, mfu=tflops / peak_tflops, peak_memory_gib=peak / GIB,
            attention_index_share=shares, amdahl_tokens_per_s=tokens_per_s / (1 - shares) if shares < 1 else math.inf,
            selection=selection if run.model.attention.type == "msa" else None,
            mean_union_per_tile=sum(unions) / len(unions) if unions else None,
            time_split_s=split, kernel_split=kernels,
            gemm_modules={"fp8": sorted(n for n, v in fp8_seen.items() if True in v),
                          "not_fp8": sorted(n for n, v in fp8_seen.items() if False in v)},
            device_idle=gaps, host_top=host, top_kernels=top, build_s=build_s, lm_losses=losses,
            sdpa_backends=sdpa or "torch default",
        )
    setup.destroy()
    return record


# ---- the driver ---------------------------------------------------------------------------


DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _child(case: dict) -> dict:
    # the driver's planner started (and ended) a one-process group: its address is not the child's
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(case)]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    lines = result.stdout.strip().splitlines()
    if result.returncode or not lines or not lines[-1].startswith("{"):
        oom = "OutOfMemoryError" in result.stderr or "CUDA out of memory" in result.stderr
        error = "out of memory" if oom else result.stderr.strip()[-2000:]
        return dict(overrides=case["overrides"], error=error)
    return json.loads(lines[-1])


def cases(attentions: str, selection: str, backends: list[str]) -> list[tuple[str, str, str]]:
    """(attention, selection, backend) per case: dense cases have no selection; MSA cases one per
    --selection (both: the model's own index branch, then coherent index queries); each on every
    backend."""
    out = []
    for attention in attentions.split(","):
        selections = ("model",) if attention != "msa" else ("model", "coherent") if selection == "both" else (selection,)
        out += [(attention, s, b) for s in selections for b in backends]
    return out


def _name(r: dict) -> str:
    return r["attention"] if r.get("selection") in (None, "model") else f"{r['attention']}:{r['selection']}"


def _recompute(r: dict) -> str:
    if r["recompute"] != "selective":
        return r["recompute"]
    return "sel:" + ",".join(r["recompute_modules"])


def backends_of(args) -> list[str]:
    """--backends, then a TE FP8 case per --fp8 recipe."""
    fp8 = [f"te-fp8:{r}" for r in args.fp8.split(",")] if args.fp8 else []
    return [*args.backends.split(","), *fp8]


def table(records: list[dict]) -> str:
    head = (f"{'seq':>7} {'attn':>12} {'backend':>16} {'dense':>6} {'L':>2} {'mtp':>3} {'vocab':>6} {'recompute':>28} "
            f"{'step s':>7} {'tokens/s':>9} {'bound':>9} {'TFLOP/s':>8} {'MFU':>6} {'peak GiB':>8} {'plan GiB':>8} "
            f"{'union':>6}  time split % " + "/".join(CATEGORIES) + "/rest")
    lines = [head]
    for r in records:
        if "error" in r:
            lines.append(f"{' '.join(r['overrides'])}: FAILED ({r['error'].splitlines()[-1] if r['error'] else '?'})")
            continue
        split = r["time_split_s"]
        total = sum(split.values()) or float("nan")
        shares = "/".join(f"{100 * split[k] / total:.0f}" for k in (*CATEGORIES, "rest"))
        union = f"{r['mean_union_per_tile']:.0f}" if r.get("mean_union_per_tile") is not None else "-"
        bound = f"{r['amdahl_tokens_per_s']:.0f}" if r["attention"] == "msa" else "-"
        dense = ",".join(map(str, r["dense_layers"])) if len(r["dense_layers"]) < r["num_layers"] else "all"
        planned = r.get("planned_peak_gib")
        lines.append(
            f"{r['seq_length']:>7} {_name(r):>12} {r.get('backend', '-'):>16} {dense or '-':>6} {r['num_layers']:>2} "
            f"{r['mtp_num_layers']:>3} {r['vocab_size']:>6} {_recompute(r):>28} {r['step_s']:>7.3f} "
            f"{r['tokens_per_s']:>9.0f} {bound:>9} {r['tflops']:>8.1f} {100 * r['mfu']:>5.1f}% "
            f"{r['peak_memory_gib']:>8.1f} {planned if planned is None else f'{planned:.1f}':>8} {union:>6}  {shares}"
        )
    by_seq = defaultdict(dict)
    for r in records:
        if "error" not in r:
            by_seq[(r["seq_length"], r.get("backend", "-"))][_name(r)] = r
    for (seq, backend), rows in sorted(by_seq.items()):
        for n, r in rows.items():
            if n.startswith("msa") and "dense" in rows:
                lines.append(f"S={seq} {backend}: {n} / dense tokens/s = {r['tokens_per_s'] / rows['dense']['tokens_per_s']:.2f}x "
                             f"(Amdahl bound {r['amdahl_tokens_per_s'] / rows['dense']['tokens_per_s']:.2f}x: "
                             f"attention + index {100 * r['attention_index_share']:.0f}% of the step)")
    lines += _backend_lines([r for r in records if "error" not in r])
    lines.append("bound: tokens/s with the step's measured attention and index time removed (MSA rows); "
                 "plan GiB: launch.plan's peak for the row's overrides")
    return "\n".join(lines)


def plot(records: list[dict], path: Path) -> Path | None:
    """tokens/s (with each MSA curve's Amdahl bound, dashed) and peak memory against the context
    length, a line per attention and selection; None (and a message) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib does not import: no PNG (pip install matplotlib)")
        return None
    rows = defaultdict(list)
    for r in records:
        if "error" not in r:
            rows[_name(r)].append(r)
    if not rows:
        print("no case trained: no PNG")
        return None
    fig, (speed, memory) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, rs in sorted(rows.items()):
        rs.sort(key=lambda r: r["seq_length"])
        seqs = [r["seq_length"] for r in rs]
        line, = speed.plot(seqs, [r["tokens_per_s"] for r in rs], marker="o", label=name)
        if name.startswith("msa"):
            speed.plot(seqs, [r["amdahl_tokens_per_s"] for r in rs], linestyle="--", color=line.get_color(),
                       label=f"{name} Amdahl bound")
        memory.plot(seqs, [r["peak_memory_gib"] for r in rs], marker="o", label=name, color=line.get_color())
        if all(r.get("planned_peak_gib") is not None for r in rs):
            memory.plot(seqs, [r["planned_peak_gib"] for r in rs], linestyle=":", color=line.get_color(),
                        label=f"{name} (launch.plan)")
    for ax, ylabel in ((speed, "tokens/s"), (memory, "peak memory (GiB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens per sequence")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    first = next(r for rs in rows.values() for r in rs)
    fig.suptitle(f"{first['overrides'][0]}: dense layers, MTP depth, vocabulary and recompute per row in the JSON")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _fits(setting_cases: list[list[str]]) -> tuple[list[float], bool]:
    """launch.plan's peaks of one setting's cases, and whether none is predicted not to fit."""
    planned = [planned_peak(overrides) for overrides in setting_cases]
    return [gib for gib, _ in planned], all(fits is not False for _, fits in planned)


def _backend_lines(records: list[dict]) -> list[str]:
    """Per length and attention: each backend's tokens/s against the local backend's and FP8's
    against TE bf16's; per FP8 case, where its GEMM time went and what ran in FP8."""
    lines = []
    groups = defaultdict(dict)
    for r in records:
        groups[(r["seq_length"], _name(r))][r.get("backend", "-")] = r
    for (seq, attention), by_backend in sorted(groups.items()):
        for backend, r in by_backend.items():
            for ref in ("local", "te"):
                if backend != ref and ref in by_backend and (ref == "local" or backend.startswith("te-fp8")):
                    ratio = r["tokens_per_s"] / by_backend[ref]["tokens_per_s"]
                    lines.append(f"S={seq} {attention}: {backend} / {ref} tokens/s = {ratio:.2f}x")
            if r.get("fp8"):
                k = r.get("kernel_split", {})
                ms = {c: 1e3 * k.get(c, {}).get("s", 0.0) for c in ("fp8_gemm", "gemm", "te_cast", "te_amax_scale")}
                lines.append(f"S={seq} {attention} {backend}: GEMMs fp8 {ms['fp8_gemm']:.1f} ms, other {ms['gemm']:.1f} ms; "
                             f"casts {ms['te_cast']:.1f} ms, amax/scale {ms['te_amax_scale']:.1f} ms; "
                             f"FP8 modules: {', '.join(r['gemm_modules']['fp8']) or 'none'}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("overrides", nargs="*", help="Hydra overrides added to every case (after `--`)")
    ap.add_argument("--model", default="proxy_1gpu")
    ap.add_argument("--seqs", default="16384,32768,131072", help="comma-separated context lengths")
    ap.add_argument("--attention", default="dense,msa", help="dense, msa or both")
    ap.add_argument("--dense-layers", default="0", help="MSA cases: the layers that keep dense attention, "
                                                         "comma-separated (empty: none)")
    ap.add_argument("--mtp-attention", default="dense", choices=["dense", "msa"],
                    help="MSA cases: the MTP modules' attention (model.attention.mtp)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--selection", default="both", choices=["model", "coherent", "both"],
                    help="MSA cases: the model's own index branch, coherent index queries "
                         "(coherent_index_queries), or a case of each")
    ap.add_argument("--sdpa", default="cudnn,flash",
                    help="SDPA backends by priority (default cudnn,flash; 'torch' for torch's own order)")
    ap.add_argument("--no-plan", action="store_true", help="do not ask launch.plan (no skipping, no planned peak)")
    ap.add_argument("--backends", default="auto",
                    help="comma-separated module backends: local, te (bf16); auto = the model config's")
    ap.add_argument("--fp8", help="comma-separated FP8 recipes (delayed, tensorwise, blockwise): a Transformer "
                                  "Engine FP8 case each")
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    from parallel import patches

    patches.apply()  # the child trains; the driver plans (megatron's model-parallel state on CPU too)
    if args.child:
        case = json.loads(args.child)
        print(json.dumps(run_case(case["overrides"], case["warmup"], case["iters"], case["sdpa"], case["selection"])))
        return

    sdpa = None if args.sdpa == "torch" else args.sdpa
    records, attempts = [], []
    write = _writer(args, records, attempts)
    for seq in (int(s) for s in args.seqs.split(",")):
        ladder = settings(args.model, seq)
        for setting in ladder:
            pairs = cases(args.attention, args.selection, backends_of(args))
            overrides = [case_overrides(args.model, seq, a, setting, args.overrides, args.dense_layers, b, args.mtp_attention)
                         for a, _, b in pairs]
            planned, fits = ([None] * len(pairs), True) if args.no_plan else _fits(overrides)
            if not fits and setting is not ladder[-1]:
                print(f"seq {seq} {' '.join(setting)}: launch.plan says it does not fit "
                      f"({', '.join(f'{g:.1f}' for g in planned)} GiB); next setting", flush=True)
                continue
            done = []
            for (attention, selection, backend), case_ov, gib in zip(pairs, overrides, planned):
                case = dict(overrides=case_ov, warmup=args.warmup, iters=args.iters, sdpa=sdpa, selection=selection)
                started = time.perf_counter()
                done.append({**_child(case), "planned_peak_gib": gib})
                print(f"[{time.perf_counter() - started:.0f} s] seq {seq} {attention} ({selection}) {backend} "
                      f"{' '.join(setting)}: "
                      + (f"FAILED ({done[-1]['error'][-200:]})" if "error" in done[-1]
                         else f"{done[-1]['tokens_per_s']:.0f} tokens/s"), flush=True)
                if "error" in done[-1]:
                    break
            oom = any(r.get("error") == "out of memory" for r in done)
            if oom and setting is not ladder[-1]:
                attempts += done  # a smaller setting follows: every attention reruns with it
                continue
            records += done
            break
        write()  # after every length, so a run cut short still leaves its finished cases
    print(table(records))
    path = write()
    print(f"wrote {path}")
    png = plot(records, path.with_suffix(".png"))
    if png:
        print(f"wrote {png}")


def _writer(args, records: list[dict], attempts: list[dict]):
    """A function that writes the cases so far as JSON to --out and returns the path."""
    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if cuda else "cpu"
    from pretrain.hardware import gpu_of_device

    try:
        import transformer_engine

        te_version = transformer_engine.__version__
    except Exception:  # not installed, or no CUDA
        te_version = None
    meta = dict(device=device, torch=torch.__version__, cuda=torch.version.cuda, transformer_engine=te_version,
                model=args.model, date=datetime.date.today().isoformat(), warmup=args.warmup, iters=args.iters,
                sdpa=args.sdpa, backends=backends_of(args), dense_layers_msa=args.dense_layers, argv=sys.argv[1:],
                peak_tflops_note="MFU against the GPU's dense bf16 peak (pretrain/hardware.py) on CUDA, FP8 cases "
                                 "included; the measured fp32 matmul rate on CPU",
                amdahl_note="amdahl_tokens_per_s = tokens_per_s / (1 - attention_index_share), the share of "
                            "attention + index in the profiled step's device time")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gpu = gpu_of_device(device) if cuda else None
    tag = "cpu" if not cuda else (gpu.key if gpu else "gpu")
    path = out / f"train_throughput_{tag}_{meta['date']}.json"

    def write() -> Path:
        path.write_text(json.dumps(dict(meta=meta, cases=records, out_of_memory_attempts=attempts), indent=1))
        return path

    return write


if __name__ == "__main__":
    main()
