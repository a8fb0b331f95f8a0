"""OmegaConf resolvers used by conf/config.yaml's hydra section."""

from __future__ import annotations

import os
import time

from omegaconf import OmegaConf


def run_name() -> str:
    """A run directory name every rank of a job agrees on.

    torchrun gives all ranks (on all nodes) the rendezvous id; Slurm the job id. A plain
    single-process run uses the start time.
    """
    rdzv = os.environ.get("TORCHELASTIC_RUN_ID")
    if rdzv and rdzv != "none":
        return f"torchrun-{rdzv}"
    if "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return f"slurm-{os.environ['SLURM_JOB_ID']}"
    return time.strftime("%Y-%m-%d_%H-%M-%S")


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def register_resolvers() -> None:
    OmegaConf.register_new_resolver("run_name", run_name, use_cache=True, replace=True)
    # Only rank 0 writes Hydra's .hydra/ snapshot; other ranks would race on the same files.
    OmegaConf.register_new_resolver(
        "hydra_subdir", lambda: ".hydra" if rank() == 0 else None, replace=True
    )
    OmegaConf.register_new_resolver(
        "rank_suffix", lambda: "" if rank() == 0 else f"-rank{rank()}", replace=True
    )
