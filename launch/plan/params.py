"""Parameters on one rank of each pipeline stage, counted from the real model.

The model (model/builder.py) is built once on the meta device with the layout of one process;
megatron marks each parameter it splits over tensor parallelism (`tensor_model_parallel`, set by
its Column/RowParallelLinear and VocabParallelEmbedding, and by our LayerQKNorm). A rank holds a
TP-marked parameter / tp (expert weights / expert-TP), 1/ep of the experts, every unmarked
parameter whole (norms, router, MSA index branch), and the decoder layers of its pipeline stage;
the first stage holds the embedding, the last the final norm, output layer, MTP modules and, with
MTP under pp > 1, its own embedding copy (megatron's GPTModel builds one for MTP).
`tests/test_plan.py` checks this against real multi-rank builds. Building each rank's modules
instead would need megatron's process groups for world sizes that one process cannot create.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from model.config import ModelConfig
from parallel.config import ParallelConfig


@dataclass(frozen=True)
class Param:
    """One parameter of the whole model (tp = pp = ep = 1) and how megatron splits it."""

    name: str
    numel: int
    part: str
    """model.describe's bucket (embedding, attention, experts, ...)."""
    tp_split: bool
    """megatron's `tensor_model_parallel`: split over TP (expert weights: over expert TP)."""
    expert: bool
    """A routed expert's weight: 1/ep of them per rank."""
    layer: int | None
    """Decoder layer index (0-based), None outside the decoder layers."""


@dataclass(frozen=True)
class StageParams:
    """Parameters on one rank of a pipeline stage."""

    by_part: dict[str, float]
    """Per model.describe part (embedding, attention, experts, router, mtp, output, ...);
    parts the stage does not hold are absent."""
    dense: float
    """Everything but the routed experts' weights."""
    expert: float
    """The routed experts' weights."""

    @property
    def total(self) -> float:
        return self.dense + self.expert


_PARAMS: dict[str, tuple[Param, ...]] = {}


def model_parameters(model: ModelConfig) -> tuple[Param, ...]:
    """Every parameter of GPTModel built by model/builder.py on the meta device (no memory);
    cached per model config."""
    key = repr(model)
    if key not in _PARAMS:
        _PARAMS[key] = _build_parameters(model)
    return _PARAMS[key]


def _no_init(weight: torch.Tensor) -> None:
    """An init_method that leaves the (meta) weight as it is."""


def _build_parameters(model: ModelConfig) -> tuple[Param, ...]:
    from megatron.core import parallel_state

    from model.builder import build_model, transformer_config
    from model.describe import part_of
    from parallel import setup

    parallel = ParallelConfig(distributed_backend="gloo")
    owns_group = not torch.distributed.is_initialized()
    if owns_group:
        setup.init_distributed(parallel)
    owns_state = not parallel_state.model_parallel_is_initialized()
    if owns_state:
        setup.init_model_parallel(parallel, seed=0)
    try:
        # perform_initialization stays on: megatron's init is what marks the TP-split weights.
        # The init functions do nothing: on the meta device there are no values to draw, and
        # dispatching ~33K normal_ calls through the meta device took 45 of 57 s for m2_230b.
        config = transformer_config(model, parallel, cpu=True)
        config.init_method = config.output_layer_init_method = config.embedding_init_method = _no_init
        with torch.device("meta"):
            (gpt,) = build_model(model, config, backend="local")
    finally:
        if owns_state and not owns_group:
            parallel_state.destroy_model_parallel()
        if owns_group:
            setup.destroy()
    params = []
    for name, p in gpt.named_parameters():
        layer = int(name.split(".")[2]) if name.startswith("decoder.layers.") else None
        params.append(Param(name, p.numel(), part_of(name), bool(getattr(p, "tensor_model_parallel", False)),
                            ".mlp.experts." in name, layer))
    return tuple(params)


def stage_of_layer(layer: int, model: ModelConfig, parallel: ParallelConfig) -> int:
    """Pipeline stage holding decoder layer `layer` (megatron's even split, interleaved with vpp)."""
    chunks = parallel.pp * (parallel.vpp or 1)
    return (layer // (model.num_layers // chunks)) % parallel.pp


def on_stage(p: Param, stage: int, model: ModelConfig, parallel: ParallelConfig) -> bool:
    last = parallel.pp - 1
    if p.layer is not None:
        return stage_of_layer(p.layer, model, parallel) == stage
    if p.name.startswith("embedding."):
        return stage == 0 or (stage == last and model.mtp_num_layers > 0)
    return stage == last  # final norm, output layer, MTP modules


def rank_numel(p: Param, parallel: ParallelConfig) -> float:
    """Elements of `p` on one rank that holds it."""
    if p.expert:
        return p.numel / parallel.ep / (parallel.expert_tp if p.tp_split else 1)
    return p.numel / parallel.tp if p.tp_split else p.numel


def stage_parameters(model: ModelConfig, parallel: ParallelConfig, stage: int) -> StageParams:
    """Parameters on one rank of `stage`."""
    by_part, dense, expert = Counter(), 0.0, 0.0
    for p in model_parameters(model):
        if on_stage(p, stage, model, parallel):
            n = rank_numel(p, parallel)
            by_part[p.part] += n
            if p.expert:
                expert += n
            else:
                dense += n
    return StageParams(dict(by_part), dense, expert)
