"""`python -m launch.slurm <the same Hydra overrides as pretrain>`: render and submit an sbatch job.

The job runs one task per node (`srun`), each a torchrun agent (`launch.torchrun`) that starts
`cluster.gpus_per_node` processes of `python -m pretrain <overrides>`; the agents meet through
torchrun's c10d rendezvous on the job's first node, keyed by the Slurm job id, so every rank on
every node gets the same run directory (`outputs/torchrun-<job id>`, pretrain/resolvers.py).

The layout is checked locally first (parallel.setup.layout_for with the job's world size), so an
impossible layout fails here, naming the key, not after hours in the queue.
`cluster.dry_run=true` prints the script; otherwise it is written to `cluster.logs_dir` and
submitted with sbatch, and the job id is printed. docs/launch.md has the details.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import time
from pathlib import Path

from launch.compose import CONFIG_ERRORS, batch_problem, checked_layout, compose_run, config_error
from parallel.setup import Layout
from pretrain.config import RunConfig

REPO = Path(__file__).resolve().parent.parent

# Environment every job gets (cluster.env overrides any of them). Why each:
BASE_ENV = {
    # InfiniBand verbs retry timeout 4.096 us * 2^22 = 17 s (NCCL's default 20 is ~4 s): rides out
    # short fabric hiccups on large jobs instead of failing the collective.
    "NCCL_IB_TIMEOUT": "22",
    # Warnings and errors from NCCL only; set INFO when debugging topology or hangs.
    "NCCL_DEBUG": "WARN",
    # On a collective timeout, dump PyTorch's NCCL flight recorder (the last collectives of
    # every rank) so a hang can be traced to the rank and the op (older torch reads
    # TORCH_NCCL_TRACE_BUFFER_SIZE).
    "TORCH_FR_BUFFER_SIZE": "2000",
    "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
    # Fewer fragmentation OOMs with MoE's varying token counts per expert.
    "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
    "PYTHONUNBUFFERED": "1",
}


def layout_env(run: RunConfig, layout: Layout) -> dict[str, str]:
    """Variables whose right value depends on the layout."""
    env = {}
    if run.cluster.gpu != "cpu" and (run.parallel.sequence_parallel or layout.cp > 1):
        # megatron overlaps sequence- and context-parallel communication with compute by
        # launching the communication first; with one hardware work queue the GPU starts kernels
        # in launch order, so the communication is not held back behind the GEMMs.
        env["CUDA_DEVICE_MAX_CONNECTIONS"] = "1"
    return env


def job_name(run: RunConfig) -> str:
    """cluster.job_name, else model.name; whitespace (which #SBATCH lines cannot hold) as _."""
    return "_".join((run.cluster.job_name or run.model.name).split())


def render(run: RunConfig, overrides: list[str], layout: Layout, workdir: Path) -> str:
    """The sbatch script for `python -m pretrain <overrides>` on run.cluster."""
    c = run.cluster
    name = job_name(run)
    q = shlex.quote
    sbatch = [
        f"--job-name={name}",
        f"--nodes={c.nodes}",
        "--ntasks-per-node=1",  # one torchrun agent per node; it starts the GPU processes
        *([f"--gpus-per-node={c.gpus_per_node}"] if c.gpu != "cpu" else []),
        "--exclusive",
        "--mem=0",  # all of each node's memory
        f"--time={c.time}",
        *([f"--partition={c.partition}"] if c.partition else []),
        *([f"--account={c.account}"] if c.account else []),
        # Preemption warning: SIGUSR1 to the job step's processes before the time limit.
        f"--signal=USR1@{c.signal_seconds}",
        f"--output={c.logs_dir}/%x-%j.out",
        f"--error={c.logs_dir}/%x-%j.err",
        *c.sbatch_args,
    ]
    bad = [opt for opt in sbatch if "\n" in opt]
    if bad:
        raise ValueError(f"{bad}: an #SBATCH option cannot contain a newline (cluster.* settings)")
    env = {**BASE_ENV, **layout_env(run, layout), **c.env}
    python = c.python or ("python" if c.container_image else sys.executable)
    # Shell words: the launcher's own variables are left for the batch shell to expand (the same
    # rendezvous id and endpoint on every node); everything from the config or the command line
    # is quoted, so that pretrain receives the overrides byte for byte.
    srun = [
        "srun", f"--nodes={c.nodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
        # A step gets one CPU per task unless told otherwise, and torchrun's workers inherit the
        # task's CPU binding: give the one task per node every CPU of the node.
        '--cpus-per-task="$SLURM_CPUS_ON_NODE"',
    ]
    if c.container_image:
        mounts = list(dict.fromkeys([*c.container_mounts, f"{REPO}:{REPO}", f"{workdir}:{workdir}"]))
        srun += [
            q(f"--container-image={c.container_image}"),
            q(f"--container-mounts={','.join(mounts)}"),
            q(f"--container-workdir={workdir}"),
        ]
    torchrun = [
        q(python), "-m launch.torchrun", f"--nnodes={c.nodes} --nproc-per-node={c.gpus_per_node}",
        f'--rdzv-backend=c10d --rdzv-id="$SLURM_JOB_ID" --rdzv-endpoint="$head_node:{c.rdzv_port}"',
        "-m pretrain",
    ]
    command = " \\\n    ".join([" ".join(srun), " ".join(torchrun), *(q(o) for o in overrides)])
    typed = " ".join(q(o) for o in overrides).replace("\n", "\\n")  # one comment line
    lines = [
        "#!/bin/bash",
        *(f"#SBATCH {opt}" for opt in sbatch),
        f"# Rendered by: python -m launch.slurm {typed}",
        f"# Layout: {c.nodes} nodes x {c.gpus_per_node} = {layout.world} processes; tp={layout.tp} "
        f"pp={layout.pp} cp={layout.cp} ep={layout.ep} etp={layout.etp} dp={layout.dp}",
        "set -euo pipefail",
        f"cd {q(str(workdir))}",
        f"export PYTHONPATH={q(str(REPO))}${{PYTHONPATH:+:$PYTHONPATH}}",
        *(f"export {k}={q(str(v))}" for k, v in env.items()),
        '# The c10d rendezvous store lives on the first node of the allocation.',
        'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)',
        f'echo "job $SLURM_JOB_ID: {c.nodes} nodes, head $head_node, run dir outputs/torchrun-$SLURM_JOB_ID'
        ' (unless hydra.run.dir is set)"',
        command,
        "",
    ]
    return "\n".join(lines)


def submit(script: str, run: RunConfig, workdir: Path) -> str:
    """Write the script under cluster.logs_dir and sbatch it; returns the job id."""
    logs = workdir / run.cluster.logs_dir
    logs.mkdir(parents=True, exist_ok=True)  # Slurm does not create --output's directory
    path = logs / f"{job_name(run)}-{time.strftime('%Y%m%d-%H%M%S')}.sbatch"
    path.write_text(script)
    result = subprocess.run(["sbatch", "--parsable", str(path)], cwd=workdir, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"sbatch {path} failed ({result.returncode}): {result.stderr.strip()}")
    return result.stdout.strip().split(";")[0]


def main(argv: list[str]) -> int:
    workdir = Path.cwd()
    try:
        run = compose_run(argv)
        layout = checked_layout(run)
        script = render(run, argv, layout, workdir)
    except CONFIG_ERRORS as e:
        print(config_error(e), file=sys.stderr)
        return 2
    problem = batch_problem(run, layout)
    if run.cluster.dry_run:
        if problem:
            print(f"warning: the job would stop at start: {problem}", file=sys.stderr)
        print(script, end="")
        return 0
    if problem:
        print(f"config error: {problem}", file=sys.stderr)
        return 2
    job_id = submit(script, run, workdir)
    print(job_id)
    print(f"logs: {run.cluster.logs_dir}/{job_name(run)}-{job_id}.out (.err); "
          f"run dir: outputs/torchrun-{job_id} unless hydra.run.dir is set", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
