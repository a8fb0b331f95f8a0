"""`python -m launch.torchrun <torchrun arguments>`: torchrun that passes SIGUSR1 on to its workers.

Slurm's `--signal=USR1@<seconds>` (preemption warning before the time limit) signals the job
step's processes. torchrun's agent does not handle SIGUSR1 by default, so the signal's default
action would kill the agent and orphan the workers before they can save. With
`--signals-to-handle ...,SIGUSR1` (torch >= 2.9) the agent instead forwards it and then shuts the
workers down itself: it SIGKILLs them after `--shutdown-timeout` and exits 1 even when every
worker saved and exited 0.

Here the agent keeps running: SIGUSR1 is re-sent to each worker process (only the worker, not
its process group: helper processes such as checkpoint writers have no handler), the trainer
finishes its step, saves and exits 0, and torchrun ends as for any clean exit, with status 0.
A worker that already got the signal from Slurm directly (proctrack signals every process of the
step) gets it twice; the trainer's flag is idempotent.
"""

from __future__ import annotations

import os
import signal

import psutil


def forward_to_workers(signum: int, frame=None) -> list[int]:
    """Send `signum` to this process's torchrun workers (children with LOCAL_RANK set);
    returns their pids."""
    sent = []
    for child in psutil.Process().children():
        try:
            if "LOCAL_RANK" not in child.environ():
                continue
            os.kill(child.pid, signum)
            sent.append(child.pid)
        except (psutil.Error, ProcessLookupError):  # exited meanwhile, or not ours to read
            continue
    return sent


def main() -> None:
    signal.signal(signal.SIGUSR1, forward_to_workers)
    from torch.distributed.run import main as torchrun_main

    torchrun_main()


if __name__ == "__main__":
    main()
