"""What every process that runs the model sets up, the trainer and the evaluator alike: the
resolved settings, torch.distributed and megatron-core's groups, the megatron config, and the
model chunks with their layout-independent initial weights."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from megatron.core.transformer import TransformerConfig

from model.builder import build_model, transformer_config
from parallel import gather, setup
from parallel.setup import Layout
from pretrain.config import RunConfig
from pretrain.settings import Machine, RunSettings, check_layout, megatron_settings, model_recompute, resolve

log = logging.getLogger("pretrain")


@dataclass
class Runtime:
    machine: Machine
    settings: RunSettings
    device: torch.device
    layout: Layout
    tconfig: TransformerConfig


def start(run: RunConfig) -> Runtime:
    """Resolve the settings, start torch.distributed and megatron-core's model-parallel groups
    (seeded with train.seed) and build the megatron config."""
    machine = Machine.this()
    settings = resolve(run, machine)
    for note in settings.notes:
        log.warning(note)
    device = setup.init_distributed(run.parallel)
    layout = check_layout(run, torch.distributed.get_world_size())
    if settings.deterministic:
        torch.use_deterministic_algorithms(True)
    setup.init_model_parallel(run.parallel, run.train.seed)
    tconfig = transformer_config(
        run.model, run.parallel, params_dtype=settings.dtype, cpu=device.type == "cpu",
        deterministic=settings.deterministic, extra=megatron_settings(run, settings, machine),
    )
    return Runtime(machine, settings, device, layout, tconfig)


def build_chunks(run: RunConfig, rt: Runtime) -> list:
    """This rank's model chunks on its device, with the same initial weights in every layout
    (megatron's depend on pipeline stage and EP rank)."""
    chunks = build_model(run.model, rt.tconfig, rt.settings.backend, recompute=model_recompute(run.train))
    for chunk in chunks:
        chunk.to(rt.device)
    gather.layout_independent_init(
        chunks, seed=run.train.seed, std=run.model.init_method_std, num_layers=run.model.num_layers
    )
    return chunks
