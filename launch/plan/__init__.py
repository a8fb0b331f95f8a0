"""`python -m launch.plan [plan.<option>=<value> ...] <the same Hydra overrides as pretrain>`:
what one GPU of a layout holds, and how long a step takes, before asking for the GPUs.

Prints, per GPU of the fullest pipeline stage: parameters, weights, gradients and optimizer state;
activations by part, without recompute (or with train.recompute=selective) and with full
recompute; the largest transient buffer; and FLOPs per step (pretrain/flops.py) with the step
time at `plan.mfu`. The last line is JSON.

Where the numbers come from, a module each:
- params.py: parameters per rank of each pipeline stage, from the real model built on the meta
  device and megatron's marks of what it splits.
- activations.py: what autograd saves for backward in one micro-batch, tensor by tensor, and the
  short-lived buffers beside it.
- memory.py: `plan()`, which adds the model state (weights, gradients, optimizer) and the
  micro-batches in flight, and returns a `Plan`.
- report.py: the text report and the JSON summary of a `Plan`; __main__.py the command line.
"""

from launch.plan.memory import Plan, PlanOptions, StagePlan, State, plan
from launch.plan.report import report, summary

__all__ = ["Plan", "PlanOptions", "StagePlan", "State", "plan", "report", "summary"]
