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


def preflight(cfg: DictConfig) -> RunConfig:
    """Typed config, validated before anything heavy starts: bad input ends here, with the key."""
    from parallel.setup import world_size_from_env
    from pretrain.settings import Machine, check_layout, megatron_settings, microbatches, resolve

    run: RunConfig = OmegaConf.to_object(cfg)  # each group's __post_init__ validates it
    machine = Machine.this()
    microbatches(run, check_layout(run, world_size_from_env()))
    megatron_settings(run, resolve(run, machine), machine)  # FP8 needs TE; recompute's rules
    run.data.validate_paths()
    return run


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    try:
        run = preflight(cfg)
    except (ValueError, OmegaConfBaseException) as e:
        # A user error, not a bug: the message names the key; a traceback would bury it.
        cause = e.__cause__ if isinstance(e, OmegaConfBaseException) and e.__cause__ else e
        log.error("config error: %s", cause)
        sys.exit(2)

    from parallel import patches
    from pretrain.checkpoint import CheckpointError
    from pretrain.trainer import Trainer  # heavy imports only once the config is known good

    patches.apply()

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    try:
        trainer = Trainer(run, run_dir, resolved)
    except CheckpointError as e:
        log.debug("checkpoint error", exc_info=e.__cause__ or e)  # hydra.verbose=pretrain shows it
        log.error("checkpoint error: %s", e)
        sys.exit(2)
    if trainer.is_logging_rank:
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
        log.info("run directory: %s", run_dir)
    code = trainer.fit()
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
