"""The launchers' view of a `pretrain` command line: the same Hydra overrides, composed with the
same configs, validated before anything is submitted."""

from __future__ import annotations

import re
import warnings

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pretrain.config import ClusterConfig, RunConfig, register, repo_conf_dir

# megatron-core warns at import about optional Apex / Transformer Engine; pretrain filters the same.
warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine).*not installed.*")
warnings.filterwarnings("ignore", message=r".*Falling back to Torch Norm.*")
warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"megatron\..*")

# Slurm's --time formats: minutes, minutes:seconds, hours:minutes:seconds, days-hours,
# days-hours:minutes, days-hours:minutes:seconds.
_SLURM_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

CONFIG_ERRORS = (ValueError, HydraException, OmegaConfBaseException)
"""What bad user input raises while composing and checking: the message names the key."""


def config_error(e: Exception) -> str:
    """The message of a CONFIG_ERRORS exception (a dataclass's ValueError inside OmegaConf's)."""
    cause = e.__cause__ if isinstance(e, OmegaConfBaseException) and e.__cause__ else e
    return f"config error: {cause}"


def split_flags(argv: list[str], prefix: str) -> tuple[dict[str, str], list[str]]:
    """`prefix.key=value` arguments (the launcher's own options) and the rest (Hydra overrides,
    passed on unchanged)."""
    own, rest = {}, []
    for arg in argv:
        if arg.startswith(prefix + ".") and "=" in arg:
            key, value = arg[len(prefix) + 1 :].split("=", 1)
            own[key] = value
        else:
            rest.append(arg)
    return own, rest


def compose_run(overrides: list[str]) -> RunConfig:
    """The typed RunConfig `python -m pretrain <overrides>` would run with (each group's
    __post_init__ validates it). Hydra flags (`--cfg`, `-m`, ...) are not overrides: rejected."""
    flags = [a for a in overrides if a.startswith("-")]
    if flags:
        raise ValueError(f"{flags}: pass Hydra overrides only (key=value); flags are not launched")
    register()
    with initialize_config_dir(config_dir=str(repo_conf_dir()), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    run: RunConfig = OmegaConf.to_object(cfg)
    check_cluster(run.cluster)
    return run


def slurm_time_seconds(value: str) -> int:
    """Seconds of a Slurm --time string; ValueError if Slurm would not accept it."""
    m = _SLURM_TIME.match(value.strip())
    if not m:
        raise ValueError(f"cluster.time={value!r} is not a Slurm time (e.g. 04:00:00, 2-00:00:00, 90)")
    days, a, b, c = m.groups()
    if days is not None:  # days-hours[:minutes[:seconds]]
        return int(days) * 86400 + int(a) * 3600 + int(b or 0) * 60 + int(c or 0)
    if c is not None:  # hours:minutes:seconds
        return int(a) * 3600 + int(b) * 60 + int(c)
    return int(a) * 60 + int(b or 0)  # minutes[:seconds]


def check_cluster(c: ClusterConfig) -> None:
    """The launchers' checks of the `cluster` group (ClusterConfig.__post_init__ checks the rest)."""
    limit = slurm_time_seconds(c.time)
    if not 0 < c.signal_seconds < min(limit, 65536):
        raise ValueError(
            f"cluster.signal_seconds={c.signal_seconds} must be positive and below the time limit "
            f"cluster.time={c.time!r} ({limit} s) and Slurm's maximum 65535"
        )
    if not 0 < c.rdzv_port < 65536:
        raise ValueError(f"cluster.rdzv_port={c.rdzv_port} is not a TCP port")
    bad = [k for k in c.env if not _ENV_NAME.match(k)]
    if bad:
        raise ValueError(f"cluster.env: {bad} are not environment variable names")
    if any(ch.isspace() for ch in c.logs_dir):
        raise ValueError(
            f"cluster.logs_dir={c.logs_dir!r} contains whitespace, which #SBATCH --output cannot "
            "hold; pick a path without spaces"
        )
    bad = [a for a in c.sbatch_args if not a.startswith("-")]
    if bad:
        raise ValueError(f"cluster.sbatch_args: {bad} are not options (e.g. --qos=high)")
    if c.gpu_memory_gib is not None and not c.gpu_memory_gib > 0:
        raise ValueError(f"cluster.gpu_memory_gib={c.gpu_memory_gib} must be positive (or null)")


def world_size(c: ClusterConfig) -> int:
    """Processes in the job: nodes * gpus_per_node."""
    return c.nodes * c.gpus_per_node


def checked_layout(run: RunConfig):
    """The layout on the job's world size (cluster.nodes * cluster.gpus_per_node), by the
    trainer's own rules (pretrain/settings.py `check_layout`); ValueError naming the key when
    the layout cannot run."""
    from pretrain.settings import check_layout

    return check_layout(run, world_size(run.cluster))


def batch_problem(run: RunConfig, layout) -> str | None:
    """Why the trainer would refuse the batch sizes in this layout (its own rule,
    pretrain/settings.py `microbatches`), or None."""
    from pretrain.settings import microbatches

    try:
        microbatches(run, layout)
    except ValueError as e:
        return f"{e} (dp = {world_size(run.cluster)} processes / (parallel.tp*parallel.pp*parallel.cp))"
    return None
