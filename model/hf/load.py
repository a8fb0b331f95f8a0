"""Fill built model chunks (any parallel layout) from a Hugging Face checkpoint.

What `convert import-hf` does between building and saving, and what training does to start from
HF weights: check the checkpoint against the model (names.plan_import, headers only), then set
every piece this rank holds from the full tensor of its key (parallel.gather.fill_local_shards
with names.HFReader), and initialise as the trainer does (parallel.gather.layout_independent_init)
the groups the checkpoint lacks as a whole: MTP modules, the index branches of layers that
config.json does not declare sparse (layers turned into MSA layers by the run's model config),
and those of MTP modules run with MSA (model.attention.mtp=msa).
A released MiniMax-M3's vision model is skipped (the plan says how many tensors).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from model.config import ModelConfig
from model.hf.config import family, fp8_block, model_config_from_hf
from model.hf.names import HFReader, ImportPlan, detect_layout, plan_import
from model.hf.safetensors import SafetensorsDir
from parallel import gather


def plan(model: ModelConfig, hf_config: dict, source: SafetensorsDir) -> tuple[ImportPlan, tuple[int, int]]:
    """(what the checkpoint provides for `model`, its FP8 tile); ConvertError naming the tensor
    when a tensor is missing, unexpected or mis-shaped."""
    declared_sparse = set(model_config_from_hf(hf_config, name="-").msa_layers())
    block = fp8_block(hf_config)

    def initialisable(group: str) -> bool:
        if group == "mtp" or group.startswith("mtp_indexer."):
            return True  # no config.json field declares MTP modules' attention sparse
        return group.startswith("indexer.") and int(group.split(".")[1]) not in declared_sparse

    layout = detect_layout(source.infos, family(hf_config))
    return plan_import(model, source, layout=layout, fp8_block=block, initialisable=initialisable), block


def load(chunks, model: ModelConfig, hf_dir: Path, hf_config: dict, *, seed: int,
         on_start: Callable[[int, int], None] = lambda tensors, nbytes: None,
         on_read: Callable[[int, int], None] = lambda tensors, nbytes: None) -> ImportPlan:
    """Set every tensor of this rank's `chunks` (built for `model`, whose shape config.json
    `hf_config` fixes) from the checkpoint in `hf_dir`, or initialise it from `seed` as the
    trainer would where the checkpoint holds none of its group. `on_start(tensors, bytes)` gets
    what this rank will read, `on_read` each read. Returns the plan (its `notes` say what was
    initialised)."""
    source = SafetensorsDir(hf_dir)
    import_plan, block = plan(model, hf_config, source)
    reader = HFReader(source, import_plan, block)
    costs = [reader.cost(key, lead) for key, lead in gather.local_keys(chunks)]
    on_start(sum(c[0] for c in costs), sum(c[1] for c in costs))
    reader.on_read = on_read
    gather.fill_local_shards(chunks, reader.full_tensor)
    if import_plan.init_keys:
        gather.layout_independent_init(chunks, seed=seed, std=model.init_method_std,
                                       num_layers=model.num_layers, keys=import_plan.init_keys)
    return import_plan
