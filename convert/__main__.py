"""`python -m convert import-hf|export-hf`: Hugging Face MiniMax-M2 checkpoints in and out.

    python -m convert import-hf --hf HF_DIR --out CKPT_DIR [--dtype bf16|fp32] [parallel.*=...] [model.*=...]
    torchrun --nproc-per-node N -m convert import-hf --hf HF_DIR --out CKPT_DIR parallel.tp=2 ...
    python -m convert export-hf --checkpoint CKPT_DIR [--iteration N] --out HF_DIR [--dtype bf16|fp32|fp8]

User errors (a bad checkpoint, a bad override) end with one line and exit code 2.
docs/checkpoints.md describes both directions.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path

from model.hf import ConvertError

log = logging.getLogger("convert")

warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine).*not installed.*")
warnings.filterwarnings("ignore", message=r".*Falling back to Torch Norm.*")
warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"megatron\..*")
warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed\..*")


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m convert", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import-hf", help="HF checkpoint -> weights-only checkpoint of ours (iteration 0)")
    imp.add_argument("--hf", type=Path, required=True, help="HF checkpoint directory (config.json, safetensors)")
    imp.add_argument("--out", type=Path, required=True, help="checkpoint directory to write iter_0000000 into")
    imp.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="weights dtype (default bf16)")
    imp.add_argument("--seed", type=int, default=1234, help="seed of the parts initialised rather than imported")
    imp.add_argument("--progress", choices=("auto", "bar", "lines"), default="auto")
    imp.add_argument("overrides", nargs="*", help="parallel.KEY=VALUE (the layout) and model.KEY=VALUE (training fields)")
    exp = sub.add_parser("export-hf", help="checkpoint of ours -> HF checkpoint (released MiniMax-M2 layout)")
    exp.add_argument("--checkpoint", type=Path, required=True, help="checkpoint directory (or one iter_* of it)")
    exp.add_argument("--iteration", type=int, default=None, help="iteration to export (default: the newest)")
    exp.add_argument("--out", type=Path, required=True, help="HF directory to write")
    exp.add_argument("--dtype", choices=("bf16", "fp32", "fp8"), default="bf16",
                     help="bf16 (default), fp32, or fp8 (block FP8 with weight_scale_inv, as released)")
    exp.add_argument("--max-shard-gb", type=float, default=5.0, help="largest shard in GiB (default 5)")
    exp.add_argument("--progress", choices=("auto", "bar", "lines"), default="auto")
    args = parser.parse_args(argv)
    if args.command == "import-hf":
        bad = [o for o in args.overrides if not o.startswith(("parallel.", "model.")) or "=" not in o]
        if bad:
            parser.error(f"overrides must be parallel.KEY=VALUE or model.KEY=VALUE: {bad}")
    return args


def _logging() -> None:
    rank = os.environ.get("RANK")
    prefix = f"[rank {rank}] " if rank is not None and os.environ.get("WORLD_SIZE", "1") != "1" else ""
    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s {prefix}%(levelname)s %(message)s", force=True)
    log.setLevel(logging.INFO)


def run_import(args: argparse.Namespace) -> None:
    from convert import importer
    from parallel import setup

    model, hf_config = importer.derive_model(args.hf, args.overrides)
    parallel = importer.parallel_config(args.overrides)
    # Before any process group starts: a bad checkpoint or layout ends here, in one line.
    importer.check(args.hf, args.out, model, hf_config)
    importer.check_run(importer.run_config(model, parallel, args.dtype), setup.world_size_from_env())
    setup.init_distributed(parallel)
    try:
        setup.init_model_parallel(parallel, args.seed)
        importer.import_hf(args.hf, args.out, parallel=parallel, model=model, hf_config=hf_config,
                           dtype=args.dtype, seed=args.seed, progress=args.progress)
    finally:
        setup.destroy()


def run_export(args: argparse.Namespace) -> None:
    from convert import exporter

    path = exporter.resolve_checkpoint(args.checkpoint, args.iteration)
    out = exporter.export_hf(path, args.out, dtype=args.dtype, max_shard_bytes=int(args.max_shard_gb * 2**30),
                             progress=args.progress)
    log.info("wrote %s from %s", out, path)


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    from parallel import patches

    patches.apply()
    try:
        (run_import if args.command == "import-hf" else run_export)(args)
    except (ConvertError, ValueError) as e:
        # A user error, not a bug: the message names the tensor or key; a traceback would bury it.
        log.debug("%s failed", args.command, exc_info=True)
        log.error("%s: %s", args.command, e)
        return 2
    return 0


if __name__ == "__main__":
    _logging()
    sys.exit(main())
