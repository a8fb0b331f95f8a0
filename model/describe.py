"""`python -m model.describe model=NAME [overrides]`: parameter breakdown of a model config.

Counts the parameters of the real megatron-core modules, built on the meta device (no memory),
with the layout of one process. The last line is JSON.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import torch

from model.config import ModelConfig

PARTS = ("embedding", "output", "attention", "indexer", "experts", "shared_experts", "dense_mlp", "router", "norms", "mtp")


def part_of(name: str) -> str:
    """The breakdown bucket of a parameter name of GPTModel."""
    if name.startswith("mtp."):
        return "mtp"
    if name.startswith("embedding."):
        return "embedding"
    if name.startswith("output_layer."):
        return "output"
    if ".self_attention.indexer." in name:  # MSA's index branch, its norms included
        return "indexer"
    leaf = name.rsplit(".", 2)[-2] if "." in name else name
    if "norm" in leaf:
        return "norms"
    if ".mlp.experts." in name:
        return "experts"
    if ".mlp.shared_experts." in name:
        return "shared_experts"
    if ".mlp.linear_fc" in name:  # a dense layer's MLP
        return "dense_mlp"
    if ".mlp.router." in name:
        return "router"
    if ".self_attention." in name:
        return "attention"
    raise ValueError(f"unclassified parameter {name}")


def count(model_cfg: ModelConfig) -> dict[str, int]:
    """Parameters per part, from GPTModel built on the meta device."""
    from megatron.core import parallel_state

    from model.builder import build_model, transformer_config
    from parallel import setup
    from parallel.config import ParallelConfig

    parallel = ParallelConfig(distributed_backend="gloo")
    owns_group = not torch.distributed.is_initialized()
    if owns_group:
        setup.init_distributed(parallel)
    if not parallel_state.model_parallel_is_initialized():
        setup.init_model_parallel(parallel, seed=0)
    config = transformer_config(model_cfg, parallel, cpu=True)
    config.perform_initialization = False
    try:
        with torch.device("meta"):
            (model,) = build_model(model_cfg, config, backend="local")
    finally:
        if owns_group:
            setup.destroy()
    parts = Counter({p: 0 for p in PARTS})
    for name, param in model.named_parameters():
        parts[part_of(name)] += param.numel()
    return dict(parts)


def summary(model_cfg: ModelConfig, parts: dict[str, int]) -> dict[str, int]:
    total = sum(parts.values())
    without_mtp = total - parts["mtp"]
    active_experts = parts["experts"] * model_cfg.moe_router_topk // model_cfg.num_experts
    active = without_mtp - parts["experts"] + active_experts
    return {
        **parts,
        "total": total,
        "total_without_mtp": without_mtp,
        "active": active,
        "active_non_embedding": active - parts["embedding"] - parts["output"],
    }


def compose_model(overrides: list[str]) -> ModelConfig:
    """The ModelConfig of `model=NAME model.key=value ...`: conf/model/NAME.yaml on the schema,
    composed by Hydra on its own (no run config around it)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    ConfigStore.instance().store(group="model", name="model_schema", node=ModelConfig)
    conf = Path(__file__).resolve().parent.parent / "conf"
    # `model=NAME` picks an option of the run config's defaults list; alone it is an addition.
    overrides = [f"+{arg}" if arg.startswith("model=") else arg for arg in overrides]
    if not any(arg.startswith("+model=") for arg in overrides):
        overrides.insert(0, "+model=tiny")
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose(overrides=overrides)
    return OmegaConf.to_object(cfg.model)


def main(argv: list[str]) -> None:
    from parallel import patches

    patches.apply()
    model_cfg = compose_model(argv)
    stats = summary(model_cfg, count(model_cfg))
    shared = " + 1 shared" if model_cfg.moe_shared_expert_ffn_hidden_size else ""
    dense = f" ({len(model_cfg.dense_mlp_layers)} dense-MLP)" if model_cfg.dense_mlp_layers else ""
    print(f"model {model_cfg.name}: {model_cfg.num_layers} layers{dense}, {model_cfg.num_experts} experts{shared} "
          f"top-{model_cfg.moe_router_topk}, {model_cfg.mtp_num_layers} MTP modules")
    for key, value in stats.items():
        print(f"  {key:<22}{value:>18,}  {value / 1e9:9.3f}B")
    print(json.dumps({"model": model_cfg.name, **stats}))


if __name__ == "__main__":
    main(sys.argv[1:])
