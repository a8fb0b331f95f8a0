"""The memory planner (launch/plan/) against one GPU: proxy_1gpu at 4K context by default.

    python bench/plan_vs_measured.py                                   # proxy_1gpu, S = 4096
    python bench/plan_vs_measured.py train.seq_length=8192 model.backend=local

Runs two training steps of the config with the real Trainer (launch/measure.py) on this GPU and
measures torch.cuda.max_memory_allocated over the second step, the bytes of the weights, gradient
buffers and optimizer state (every tensor, by storage), and the activations autograd saved (Transformer
Engine modules that keep tensors outside autograd's saved-tensor hooks are missed there; the
peak is not affected). Plans the same overrides for this GPU (cluster.gpu from its name) and
prints both, part by part, with their ratio. Writes JSON (full config, versions) to --out
(default bench/results) as plan_vs_measured_<gpu>_<date>.json.

The global batch is one micro-batch (train.global_batch_size = train.micro_batch_size) so that
the measured activations are one micro-batch's, as planned. Not part of the test suite: the CPU
tests (tests/test_plan.py) hold the planner to 5% (activations) and 15% (peak) on small configs; this checks the GPU path
(bf16, TE or local backend, flash attention, the Triton MSA kernels).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # as launch.slurm sets

import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from launch.compose import compose_run  # noqa: E402
from launch.plan import PlanOptions, plan  # noqa: E402

DEFAULT = ["model=proxy_1gpu", "train.seq_length=4096", "train.micro_batch_size=1", "train.global_batch_size=1",
           "checkpoint.save=false", "logger.wandb.mode=disabled", "train.eval_interval=0"]
GIB = 1024**3


def gpu_key() -> str:
    """cluster.gpu of this device (pretrain/hardware.py), for its memory and peak."""
    from pretrain.hardware import gpu_of_device

    name = torch.cuda.get_device_name()
    gpu = gpu_of_device(name)
    if gpu is None:
        sys.exit(f"no cluster.gpu entry for {name!r}: add it to pretrain/hardware.py")
    return gpu.key


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("overrides", nargs="*", help="Hydra overrides after the defaults (proxy_1gpu, S=4096)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    ap.add_argument("--tag", default="", help="appended to the file name (several runs of one day)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU (the CPU comparison is tests/test_plan.py)")
    from parallel import patches

    patches.apply()  # the planner builds the model (on the meta device) in this process
    overrides = [*DEFAULT, *args.overrides]
    gpu = gpu_key()

    # The measurement runs in its own process: it initialises torch.distributed and CUDA state.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-m", "launch.measure", *overrides], cwd=REPO, env=env,
                            capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"launch.measure failed:\n{result.stderr[-4000:]}")
    (measured,) = json.loads(result.stdout.strip().splitlines()[-1])

    # Plan the backend the measurement ran: `model.backend=auto` plans Transformer Engine for
    # cluster nodes, but on this machine auto resolves to whatever imports here.
    from pretrain.settings import Machine, resolve

    backend = resolve(compose_run(overrides), Machine.this()).backend
    run = compose_run([*overrides, f"cluster.gpu={gpu}", "cluster.gpus_per_node=1", f"model.backend={backend}"])
    planned = plan(run, PlanOptions())
    stage = planned.stages[0]
    full = planned.recompute == "full"
    # under full recompute the layer rebuilt in backward is no activation forward saved
    acts = ({k: v for k, v in stage.activations_recompute.items() if k != "rebuilt_layer"} if full
            else stage.activations)
    rows = [
        ("weights", stage.state.weights, measured["weights"]),
        ("grads", stage.state.grads, measured["grads"]),
        ("optimizer", stage.state.optimizer, measured["optimizer"]),
        ("activations (saved)", sum(acts.values()), measured["activations"]),
        ("peak (max allocated)", stage.total_recompute if full else stage.total, measured["peak"]),
    ]
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  {' '.join(overrides)}")
    print(f"{'':24}{'planned GiB':>12}{'measured GiB':>14}{'plan/meas':>11}")
    for name, estimate, got in rows:
        print(f"{name:24}{estimate / GIB:12.2f}{got / GIB:14.2f}{estimate / got if got else float('nan'):11.3f}")
    print("planned activations by part (GiB): "
          + ", ".join(f"{k} {v / GIB:.2f}" for k, v in sorted(acts.items(), key=lambda kv: -kv[1])))

    try:
        import transformer_engine

        te_version = transformer_engine.__version__
    except Exception:  # not installed, or no CUDA build of it
        te_version = None
    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, cuda=torch.version.cuda,
                transformer_engine=te_version, date=datetime.date.today().isoformat(), overrides=overrides,
                backend=planned.settings.backend, precision=planned.settings.precision)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"plan_vs_measured_{gpu}_{meta['date']}{args.tag}.json"
    path.write_text(json.dumps(dict(
        meta=meta,
        config=json.loads(json.dumps(dataclasses.asdict(run), default=str)),
        rows=[dict(part=n, planned=p, measured=m) for n, p, m in rows],
        planned_activations=acts, planned_transients={b.name: b.bytes for b in stage.transients}, planned_rebuilt_modules=stage.rebuilt_modules,
        measured=measured,
    ), indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
