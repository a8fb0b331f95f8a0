"""The M2 -> MSA conversion recipe (conf/experiment/m2_to_msa_tiny.yaml) on the tiny CPU model,
end to end through the user's commands, measured.

    python bench/m2_to_msa_tiny.py                      # ~20 min on 2 cores
    python bench/m2_to_msa_tiny.py --dense-iters 6 --stage-iters 4 --eval-tokens 2048 --no-write  # smoke

1. "M2": the tiny model with dense attention, trained --dense-iters on the default corpus.
2. Stage 1 (experiment=m2_to_msa_tiny): from it, MSA on layer 1 (blocks of 16, top-4 of up to 16
   per token at 256 tokens), model.msa.mode=dense_warmup, only the index branch trains
   (model.msa.train_only_indexer): --stage-iters.
3. Stage 2: sparse attention, everything trains: --stage-iters.
4. The control: the dense model trained --stage-iters more with stage 2's schedule.
Each checkpoint is evaluated (python -m pretrain.evaluate) on held-out text (pip's vendored
sources, tokenized with the default corpus's tokenizer): the loss, and for MSA models the
indexer's recall (eval.indexer_recall: the full attention mass, head-averaged per group, inside
the selected blocks, over the tokens with more than top-k causal blocks).

Prints a table; writes JSON + markdown to --out as m2_to_msa_tiny_cpu_<date>.json|md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CORPUS = Path("~/.cache/m2-pretrain/stdlib-v1-4096").expanduser()
QUIET = ["logger.wandb.mode=disabled", "train.log_interval=10", "train.eval_interval=0"]
STAGE2 = ["optim.lr=1e-3", "optim.min_lr=1e-4", "optim.schedule=cosine", "optim.warmup_iters=10"]


def run(args: list[str], log: Path) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    start = time.time()
    result = subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True)
    log.write_text(result.stdout + result.stderr)
    if result.returncode:
        sys.exit(f"failed ({log}): {' '.join(args)}\n{result.stderr[-3000:]}")
    shown = " ".join(a for a in args if not a.startswith(("logger", "hydra", "/")))
    print(f"[{time.time() - start:5.0f} s] {shown[:200]}", flush=True)
    return result.stdout


def train(work: Path, name: str, *overrides: str) -> Path:
    ckpt = work / name
    run(["pretrain", f"hydra.run.dir={work}/run_{name}", f"checkpoint.dir={ckpt}", *QUIET, *overrides],
        work / f"{name}.log")
    return ckpt


def evaluate(work: Path, ckpt: Path, name: str, tokens: int, recall: bool) -> dict:
    out = run(["pretrain.evaluate", f"hydra.run.dir={work}/eval_{name}", f"checkpoint.dir={ckpt}",
               f"data.prefixes=[{work / 'heldout'}]", f"data.tokenizer={CORPUS / 'tokenizer.json'}",
               "train.seq_length=256", f"eval.max_tokens={tokens}", "eval.micro_batch_size=4",
               f"eval.indexer_recall={str(recall).lower()}"], work / f"eval_{name}.log")
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="/tmp/m2_to_msa_tiny")
    ap.add_argument("--dense-iters", type=int, default=300)
    ap.add_argument("--stage-iters", type=int, default=100)
    ap.add_argument("--eval-tokens", type=int, default=65536)
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    n = args.stage_iters

    dense = train(work, "dense", "model.attention.type=dense", f"train.iters={args.dense_iters}")
    heldout = sorted((Path(__import__("pip").__file__).parent / "_vendor").rglob("*.py"))
    run(["data.prepare", "--input", *map(str, heldout), "--tokenizer", str(CORPUS / "tokenizer.json"),
         "--output-prefix", str(work / "heldout")], work / "heldout.log")
    stage1 = train(work, "stage1", "experiment=m2_to_msa_tiny", f"checkpoint.init_from={dense}",
                   f"train.iters={n}", "checkpoint.save_initial=true", "checkpoint.keep=null")
    initial = work / "stage1_initial"
    initial.mkdir()
    shutil.copytree(stage1 / "iter_0000000", initial / "iter_0000000")
    stage2 = train(work, "stage2", "experiment=m2_to_msa_tiny", "model.msa.mode=sparse",
                   "model.msa.train_only_indexer=false", f"checkpoint.init_from={stage1}", f"train.iters={n}", *STAGE2)
    control = train(work, "control", "model.attention.type=dense", f"checkpoint.init_from={dense}",
                    f"train.iters={n}", *STAGE2)
    # the sparse model straight from the dense one, no stage 1: what the indexer's warm-up buys
    cold = train(work, "cold_sparse", "experiment=m2_to_msa_tiny", "model.msa.mode=sparse",
                 "model.msa.train_only_indexer=false", f"checkpoint.init_from={dense}", f"train.iters={n}", *STAGE2)

    rows = {
        "dense (the 'M2')": evaluate(work, dense, "dense", args.eval_tokens, False),
        "MSA initialised (before stage 1)": evaluate(work, initial, "initial", args.eval_tokens, True),
        "after stage 1 (indexer only, dense warm-up)": evaluate(work, stage1, "stage1", args.eval_tokens, True),
        "after stage 2 (sparse, all)": evaluate(work, stage2, "stage2", args.eval_tokens, True),
        "control: dense, same stage-2 training": evaluate(work, control, "control", args.eval_tokens, False),
        "no stage 1: sparse from the dense model": evaluate(work, cold, "cold", args.eval_tokens, True),
    }
    lines = ["| checkpoint | iteration | held-out loss | indexer recall |", "|---|---|---|---|"]
    for name, r in rows.items():
        recall = f"{r['indexer_recall']:.4f}" if r.get("indexer_recall") is not None else "-"
        lines.append(f"| {name} | {r['iteration']} | {r['loss']:.4f} | {recall} |")
    table = "\n".join(lines)
    print(table)
    if args.no_write:
        return
    date = datetime.date.today().isoformat()
    meta = {"date": date, "dense_iters": args.dense_iters, "stage_iters": n, "eval_tokens": args.eval_tokens,
            "seq_length": 256, "msa": "layer 1 of 2, blocks of 16, top-4 (64 of up to 256 keys)",
            "heldout": "pip's vendored sources, default-corpus tokenizer", "stage2_optim": STAGE2,
            "commands": "conf/experiment/m2_to_msa_tiny.yaml; this script"}
    stem = Path(args.out) / f"m2_to_msa_tiny_cpu_{date}"
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    stem.with_suffix(".md").write_text(f"# M2 -> MSA recipe, tiny, CPU ({date})\n\n`python bench/m2_to_msa_tiny.py`"
                                       f" ({json.dumps(meta)})\n\n{table}\n")
    print(f"wrote {stem}.json/.md")


if __name__ == "__main__":
    main()
