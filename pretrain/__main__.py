"""`python -m pretrain [hydra overrides]`: train an M2-family model on megatron-core."""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pretrain.config import RunConfig, register
from pretrain.resolvers import register_resolvers

log = logging.getLogger("pretrain")

# megatron-core warns once per module that imports Apex or Transformer Engine optionally; the
# backend line of the log says which one runs.
warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine).*not installed.*")
warnings.filterwarnings("ignore", message=r".*Falling back to Torch Norm.*")
warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"megatron\..*")
warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed\..*")

register()
register_resolvers()


def preflight(cfg: DictConfig, run_dir: Path, overrides: list[str], choices: dict | None = None):
    """Typed config, validated before anything heavy starts: bad input ends here, with the key.
    Returns the run config, with the model's shape taken from the weights it starts from, and
    that source (pretrain/weights.py)."""
    from parallel.setup import world_size_from_env
    from pretrain import schedule, weights
    from pretrain.settings import Machine, check_layout, megatron_settings, microbatches, resolve

    run: RunConfig = OmegaConf.to_object(cfg)  # each group's __post_init__ validates it
    source = weights.find_source(run, run_dir)
    if source is not None:
        explicit = weights.explicit_model_keys(run.model, choices or {}, overrides)
        run.model, notes = weights.adopt(run.model, source.model, explicit, source.path)
        for note in notes:
            log.info("%s", note)
    machine = Machine.this()
    microbatches(run, check_layout(run, world_size_from_env()))
    megatron_settings(run, resolve(run, machine), machine)  # FP8 needs TE; recompute's rules
    schedule.check(run.optim, run.train.iters)
    run.data.validate_paths()
    return run, source


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from pretrain.checkpoint import CheckpointError

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    try:
        run, source = preflight(cfg, run_dir, list(hydra_cfg.overrides.task), dict(hydra_cfg.runtime.choices))
    except (ValueError, OmegaConfBaseException, CheckpointError) as e:
        # A user error, not a bug: the message names the key; a traceback would bury it.
        cause = e.__cause__ if isinstance(e, OmegaConfBaseException) and e.__cause__ else e
        log.error("%s error: %s", "checkpoint" if isinstance(e, CheckpointError) else "config", cause)
        sys.exit(2)

    from parallel import patches
    from model.hf import ConvertError
    from pretrain.schedule import ScheduleMismatch
    from pretrain.trainer import Trainer  # heavy imports only once the config is known good

    patches.apply()
    resolved = OmegaConf.to_container(OmegaConf.structured(run), resolve=True)
    resolved.pop("defaults")  # the schema's, not a setting
    try:
        trainer = Trainer(run, run_dir, resolved, source=source)
    except (CheckpointError, ScheduleMismatch, ConvertError, ValueError) as e:
        # Checkpoints, weights or data that cannot be used: the message names the file or key.
        log.debug("start-up error", exc_info=e.__cause__ or e)  # hydra.verbose=pretrain shows it
        log.error("%s: %s", "checkpoint error" if isinstance(e, (CheckpointError, ScheduleMismatch)) else "error", e)
        sys.exit(2)
    if trainer.is_logging_rank:
        OmegaConf.save(OmegaConf.create(resolved), run_dir / "config.yaml")
        log.info("run directory: %s", run_dir)
    code = trainer.fit()
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
