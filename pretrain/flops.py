"""Model FLOPs per training token, the peak FLOP/s of this device, and MFU from the two.

Only matmuls count (2*m*n*k for an [m, k] x [k, n] product); norms, RoPE, softmax, the routing
top-k and the loss are left out, as in Megatron's and PaLM's MFU. docs/metrics.md derives every
term; `tests/test_monitor.py` checks them against torch's FLOP counter on the real model.
"""

from __future__ import annotations

import functools
import logging
import math
import time

import torch

from model.config import ModelConfig
from pretrain.config import ClusterConfig
from pretrain.hardware import gpu_of_device

log = logging.getLogger("pretrain")


def msa_keys_per_token(seq_length: int, block_size: int, topk: int) -> float:
    """Keys an MSA query attends to, averaged over the positions of a sequence: every causal key
    while the token has at most `topk` blocks behind it, else topk - 1 full blocks plus its own
    block up to itself."""
    t = torch.arange(seq_length, dtype=torch.float64)
    full = (t // block_size + 1) <= topk
    keys = torch.where(full, t + 1, (topk - 1) * block_size + t % block_size + 1)
    return keys.mean().item()


def forward_flops_per_token(model: ModelConfig, seq_length: int) -> dict[str, float]:
    """Forward matmul FLOPs of one token of a `seq_length` sequence, by term, each summed over
    the main model's layers and the MTP modules (docs/metrics.md has one table row per term)."""
    h, d, vocab = model.hidden_size, model.kv_channels, model.vocab_size
    heads, groups = model.num_attention_heads, model.num_query_groups
    layers = model.num_layers + model.mtp_num_layers  # every MTP module holds one full layer
    moe_layers = len(model.moe_layers()) + model.mtp_num_layers  # MTP modules are MoE
    msa_layers = len(model.msa_layers()) + (model.mtp_num_layers if model.mtp_msa() else 0)
    m = model.msa
    msa_keys = msa_keys_per_token(seq_length, m.block_size, m.topk) if msa_layers else 0.0
    return {
        "qkv_proj": layers * 2 * h * (heads + 2 * groups) * d,
        # QK^T and PV, 2*d each per (query, key) pair and head: over the causal half (a token
        # attends to seq_length/2 keys on average) in dense layers, over the selected keys in
        # MSA layers.
        "attention": ((layers - msa_layers) * (seq_length / 2) + msa_layers * msa_keys) * 2 * 2 * d * heads,
        "out_proj": layers * 2 * heads * d * h,
        "router": moe_layers * 2 * h * model.num_experts,
        # SwiGLU: gate and up (h -> ffn each) and down (ffn -> h), for each of the top-k experts
        "experts": moe_layers * model.moe_router_topk * 3 * 2 * h * model.moe_ffn_hidden_size,
        # M3: the shared expert of every MoE layer, the dense MLP of the dense layers
        "shared_expert": moe_layers * 3 * 2 * h * model.moe_shared_expert_ffn_hidden_size,
        "dense_mlp": len(model.dense_mlp_layers) * 3 * 2 * h * model.dense_ffn_hidden_size,
        "mtp_eh_proj": model.mtp_num_layers * 2 * (2 * h) * h,
        "logits": (1 + model.mtp_num_layers) * 2 * h * vocab,  # each MTP depth has its own logits
        # MSA's index branch: projections (one query head per group, one key head), scoring of
        # every causal key by every index head, and the block scores of the selected keys that
        # the indexer loss differentiates.
        "index_proj": msa_layers * 2 * h * (groups + 1) * m.index_head_dim,
        "index_scoring": msa_layers * 2 * (seq_length / 2) * m.index_head_dim * groups,
        "index_block_scores": msa_layers * 2 * msa_keys * m.index_head_dim * groups,
    }


# Selection is discrete: the index scores of all keys are computed forward only.
_FORWARD_ONLY = ("index_scoring",)


def train_flops_per_token(model: ModelConfig, seq_length: int) -> float:
    """Model FLOPs of one training token: forward + backward, the backward twice the forward
    (the gradients of a matmul's input and of its weight are one matmul each), except for the
    terms that have no backward."""
    terms = forward_flops_per_token(model, seq_length)
    return sum(v if k in _FORWARD_ONLY else 3 * v for k, v in terms.items())


def peak_tflops(cluster: ClusterConfig, device: torch.device) -> float:
    """Peak TFLOP/s of one device, the denominator of MFU.

    `cluster.peak_tflops` when set. Otherwise on CUDA the dense bf16 peak of the device's name
    (pretrain/hardware.py; NaN and a warning for a GPU not in the table), and on CPU this CPU's
    measured fp32 matmul rate with the current torch threads, so MFU means something there too.
    """
    if cluster.peak_tflops is not None:
        return cluster.peak_tflops
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        gpu = gpu_of_device(name)
        if gpu is not None:
            return gpu.peak_bf16_tflops
        log.warning("no peak FLOP/s known for %r: set cluster.peak_tflops to get MFU", name)
        return math.nan
    if device.type == "cpu":
        return cpu_matmul_tflops()
    log.warning("no peak FLOP/s known for device %s: set cluster.peak_tflops to get MFU", device)
    return math.nan


@functools.cache
def cpu_matmul_tflops(size: int = 1024, repeats: int = 5) -> float:
    """Best fp32 TFLOP/s of `repeats` [size, size] x [size, size] matmuls on this CPU (measured
    once per process, then cached)."""
    a = torch.randn(size, size)
    b = torch.randn(size, size)
    torch.mm(a, b)  # warm-up: thread pool and caches
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e12


def throughput(tokens_per_s: float, flops_per_token: float, gpus: int, peak: float) -> tuple[float, float]:
    """(model TFLOP/s per GPU, MFU as a fraction of `peak` TFLOP/s) of a run processing
    `tokens_per_s` tokens per second over all `gpus`; MFU is NaN when the peak is unknown."""
    tflops_per_gpu = tokens_per_s * flops_per_token / gpus / 1e12
    mfu = tflops_per_gpu / peak if peak > 0 else math.nan
    return tflops_per_gpu, mfu
