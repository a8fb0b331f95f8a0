"""Does FP8 train like bf16? Loss curves of one recipe in bf16 and in each FP8 recipe Hopper
runs (issue #18 item 3), one training run per invocation, and the comparison of the saved curves.

    python bench/fp8_convergence.py --case bf16 --seed 1       # ~4 min on an H200 (200 steps)
    python bench/fp8_convergence.py --case bf16 --seed 2       # the second seed: the noise floor
    python bench/fp8_convergence.py --case delayed             # FP8, seed 1 (the paired bf16 run)
    python bench/fp8_convergence.py --case tensorwise
    python bench/fp8_convergence.py --case blockwise
    python bench/fp8_convergence.py --compare                  # the pass/fail table, no GPU
    python bench/fp8_convergence.py --lrs 3e-4,6e-4,1.2e-3 --steps 50   # learning-rate sweep (bf16)
    python bench/fp8_convergence.py --model tiny --steps 3 --case bf16  # CPU smoke run

Each run is `python -m pretrain experiment=proxy_1gpu_h200` (--recipe) in a child process for
--steps optimizer steps (logging every step, no checkpoints, no evaluation), from the seed's
initial weights and data order; FP8 cases add `train.fp8=<format> train.fp8_recipe=<recipe>`
(hybrid, i.e. e4m3 forward and e5m2 gradients, for delayed and tensorwise scaling; e4m3 for
blockwise, as DeepSeek-V3 trained and Transformer Engine defaults). The per-step curve (LM loss,
each MTP loss, the indexer loss, gradient norm, learning rate, tokens/s) is written as JSON to
--out/fp8_convergence_<tag>/<case>-s<seed>.json with the run's config and the library versions.
--model NAME runs model=NAME with its defaults instead of the recipe (on CPU: fp32, local backend).

--compare reads every curve in --out/fp8_convergence_<tag>/ and writes the table to
--out/fp8_convergence_<tag>.json|md: per FP8 run, the mean of its last 20 steps' LM loss and of
each MTP loss against the bf16 run of the same seed. Pass: every one within --bar (1.5%). The two
bf16 seeds' difference is the noise floor (with a floor above the bar the comparison cannot
tell, and says so).

--lrs trains bf16 once per learning rate for --steps steps (one command; the decay keeps the
200-step schedule's horizon, `optim.decay_iters`, so the first steps are those of the full run)
and prints, per learning rate, the final loss and the largest rise of the LM loss above its best
so far (a spike), to choose the recipe's optim.lr.

Legend: s seed; the tag defaults to <gpu>_<date>.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

FP8_CASES = {"delayed": "hybrid", "tensorwise": "hybrid", "blockwise": "e4m3"}
"""FP8 recipe -> train.fp8 format."""
CASES = ("bf16", *FP8_CASES)
QUIET = ["checkpoint.save=false", "checkpoint.load=null", "logger.wandb.mode=disabled", "logger.console=lines",
         "train.log_interval=1", "train.eval_interval=0"]
CURVE_KEYS = ("lm_loss", "indexer_loss", "grad_norm", "lr", "tokens_per_s", "skipped_iters")
WINDOW = 20
"""Steps at the end of a run whose mean losses are compared."""


def run_overrides(args, case: str, seed: int, extra: list[str]) -> list[str]:
    """The `python -m pretrain` overrides of one run."""
    base = [f"model={args.model}"] if args.model else [f"experiment={args.recipe}"]
    fp8 = [f"train.fp8={FP8_CASES[case]}", f"train.fp8_recipe={case}"] if case in FP8_CASES else []
    return [*base, *QUIET, f"train.iters={args.steps}", f"train.seed={seed}", *fp8, *args.overrides, *extra]


def train(overrides: list[str]) -> dict:
    """One `python -m pretrain` run in a child process: its per-step records and resolved config."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    with tempfile.TemporaryDirectory() as run_dir:
        started = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", "pretrain", f"hydra.run.dir={run_dir}", *overrides],
                                cwd=REPO, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - started
        if result.returncode:
            sys.exit(f"the run failed (exit {result.returncode}): {' '.join(overrides)}\n{result.stderr[-4000:]}")
        records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
        config = (Path(run_dir) / "config.yaml").read_text()
    curve = [{k: v for k, v in r.items() if k in CURVE_KEYS or k.startswith("mtp_") or k == "iteration"}
             for r in records if "lm_loss" in r]
    return dict(curve=curve, config_yaml=config, wall_s=wall)


def versions() -> dict:
    cuda = torch.cuda.is_available()
    out = dict(device=torch.cuda.get_device_name() if cuda else "cpu", torch=torch.__version__,
               cuda=torch.version.cuda, date=datetime.date.today().isoformat())
    try:
        import transformer_engine

        out["transformer_engine"] = transformer_engine.__version__
    except Exception:  # not installed, or no CUDA
        out["transformer_engine"] = None
    return out


def default_tag() -> str:
    meta = versions()
    gpu = meta["device"].lower()
    name = next((g for g in ("h200", "h100", "b200", "a100") if g in gpu), "gpu" if gpu != "cpu" else "cpu")
    return f"{name}_{meta['date']}"


def losses(curve: list[dict]) -> dict[str, float]:
    """Mean LM loss and each MTP loss over the last WINDOW steps (all of them if fewer)."""
    tail = curve[-WINDOW:]
    keys = ["lm_loss", *sorted(k for k in tail[0] if k.startswith("mtp_") and k.endswith("_loss"))]
    return {k: sum(r[k] for r in tail) / len(tail) for k in keys}


def largest_rise(curve: list[dict]) -> tuple[float, int | None]:
    """The largest rise of the LM loss above its lowest value so far, and the iteration."""
    best, rise, where = float("inf"), 0.0, None
    for r in curve:
        if r["lm_loss"] - best > rise:
            rise, where = r["lm_loss"] - best, r["iteration"]
        best = min(best, r["lm_loss"])
    return rise, where


def compare(curves: dict[str, dict], bar: float) -> dict:
    """The pass/fail table of item 3 from the saved runs ({"<case>-s<seed>": run})."""
    bf16 = {run["meta"]["seed"]: run for name, run in curves.items() if run["meta"]["case"] == "bf16"}
    table, floor = [], None
    seeds = sorted(bf16)
    if len(seeds) >= 2:
        a, b = losses(bf16[seeds[0]]["curve"]), losses(bf16[seeds[1]]["curve"])
        floor = {k: abs(b[k] - a[k]) / a[k] for k in a if k in b}
    for name, run in sorted(curves.items()):
        case, seed = run["meta"]["case"], run["meta"]["seed"]
        if case == "bf16":
            continue
        ref = bf16.get(seed)
        if ref is None:
            table.append(dict(run=name, verdict=f"no bf16 run with seed {seed}"))
            continue
        got, want = losses(run["curve"]), losses(ref["curve"])
        rel = {k: (got[k] - want[k]) / want[k] for k in want if k in got}
        ok = all(abs(v) <= bar for v in rel.values()) and len(rel) == len(want)
        finite = all(all(v == v and abs(v) != float("inf") for k, v in r.items() if k.endswith("loss"))
                     for r in run["curve"])
        verdict = "pass" if ok and finite else "FAIL"
        if floor and max(floor.values()) > bar:
            verdict += " (noise floor above the bar: inconclusive)"
        table.append(dict(run=name, reference=f"bf16-s{seed}", steps=len(run["curve"]), fp8=got, bf16=want,
                          relative=rel, skipped=run["curve"][-1].get("skipped_iters", 0),
                          tokens_per_s=_median_rate(run), bf16_tokens_per_s=_median_rate(ref), verdict=verdict))
    return dict(bar=bar, window=WINDOW, noise_floor=floor, bf16_seeds=seeds, rows=table)


def _median_rate(run: dict) -> float | None:
    rates = sorted(r["tokens_per_s"] for r in run["curve"][1:] if "tokens_per_s" in r)  # the first includes start-up
    return rates[len(rates) // 2] if rates else None


def markdown(result: dict, meta: dict) -> str:
    lines = [f"# FP8 vs bf16 convergence ({meta['device']}, {meta['date']})", "",
             f"Mean of the last {result['window']} steps; pass: every loss within {100 * result['bar']:.1f}% "
             f"of the bf16 run of the same seed. torch {meta['torch']}, Transformer Engine "
             f"{meta['transformer_engine']}.", ""]
    if result["noise_floor"]:
        floor = ", ".join(f"{k} {100 * v:.2f}%" for k, v in result["noise_floor"].items())
        lines += [f"Noise floor (bf16 seeds {result['bf16_seeds'][0]} vs {result['bf16_seeds'][1]}): {floor}", ""]
    lines += ["| run | steps | loss | FP8 | bf16 | diff | tokens/s FP8 / bf16 | verdict |", "|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        if "fp8" not in row:
            lines.append(f"| {row['run']} | | | | | | | {row['verdict']} |")
            continue
        rate = (f"{row['tokens_per_s']:.0f} / {row['bf16_tokens_per_s']:.0f}"
                if row["tokens_per_s"] and row["bf16_tokens_per_s"] else "-")
        for i, (k, rel) in enumerate(row["relative"].items()):
            head = (row["run"], str(row["steps"])) if i == 0 else ("", "")
            tail = (rate, row["verdict"]) if i == 0 else ("", "")
            lines.append(f"| {head[0]} | {head[1]} | {k} | {row['fp8'][k]:.4f} | {row['bf16'][k]:.4f} | "
                         f"{100 * rel:+.2f}% | {tail[0]} | {tail[1]} |")
    return "\n".join(lines) + "\n"


def sweep(args, folder: Path) -> None:
    """bf16 at each of --lrs, --steps each, the 200-step schedule's horizon kept."""
    from launch.compose import compose_run

    base = compose_run([f"model={args.model}"] if args.model else [f"experiment={args.recipe}"])
    horizon = args.schedule_iters - base.optim.warmup_iters
    rows = []
    for lr in (float(x) for x in args.lrs.split(",")):
        min_lr = lr * base.optim.min_lr / base.optim.lr  # the recipe's decay ratio
        extra = [f"optim.lr={lr}", f"optim.min_lr={min_lr:g}", f"optim.decay_iters={horizon}"]
        overrides = run_overrides(args, "bf16", args.seed, extra)
        out = train(overrides)
        rise, where = largest_rise(out["curve"])
        final = losses(out["curve"])["lm_loss"]
        save(folder / f"sweep-lr{lr:g}.json", dict(case="bf16", seed=args.seed, lr=lr, overrides=overrides,
                                                    wall_s=out["wall_s"]), out)
        rows.append((lr, final, rise, where, out["wall_s"]))
        print(f"lr {lr:g}: final lm loss {final:.4f}, largest rise {rise:.3f} (iteration {where}), "
              f"{out['wall_s']:.0f} s", flush=True)
    print(f"\n{'lr':>9} {'final lm':>9} {'rise':>6} {'at':>4}  (rise: the LM loss above its best so far; "
          f"> {args.spike} is a spike)")
    for lr, final, rise, where, _ in rows:
        print(f"{lr:>9g} {final:>9.4f} {rise:>6.3f} {where or '-':>4}{'  SPIKE' if rise > args.spike else ''}")


def save(path: Path, meta: dict, out: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(meta={**versions(), **meta}, curve=out["curve"], config_yaml=out["config_yaml"]),
                               indent=1))
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("overrides", nargs="*", help="Hydra overrides added to every run (after `--`)")
    ap.add_argument("--case", choices=CASES, help="one run: bf16, or an FP8 recipe")
    ap.add_argument("--seed", type=int, default=1, help="train.seed (FP8 runs compare with the bf16 run of theirs)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--recipe", default="proxy_1gpu_h200", help="conf/experiment/<recipe>.yaml")
    ap.add_argument("--model", help="model=NAME with its defaults instead of --recipe (CPU smoke: tiny)")
    ap.add_argument("--compare", action="store_true", help="the pass/fail table of the saved runs")
    ap.add_argument("--bar", type=float, default=0.015, help="--compare: the largest relative difference that passes")
    ap.add_argument("--lrs", help="comma-separated learning rates: a bf16 sweep, --steps each")
    ap.add_argument("--schedule-iters", type=int, default=200, help="--lrs: the schedule length the decay keeps")
    ap.add_argument("--spike", type=float, default=0.5, help="--lrs: a rise of the LM loss (nats) that is a spike")
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    ap.add_argument("--tag", help="names the folder of curves (default <gpu>_<date>)")
    args = ap.parse_args()
    tag = args.tag or default_tag()
    folder = Path(args.out) / f"fp8_convergence_{tag}"
    if args.compare:
        curves = {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))
                  if not p.name.startswith("sweep-")}
        if not curves:
            sys.exit(f"no runs in {folder}: run --case first (or give --tag)")
        result = compare(curves, args.bar)
        meta = next(iter(curves.values()))["meta"]
        text = markdown(result, meta)
        print(text)
        (Path(args.out) / f"fp8_convergence_{tag}.json").write_text(json.dumps(dict(meta=meta, **result), indent=1))
        (Path(args.out) / f"fp8_convergence_{tag}.md").write_text(text)
        print(f"wrote {Path(args.out) / f'fp8_convergence_{tag}.md'} and .json")
        return
    if args.lrs:
        sweep(args, folder)
        return
    if args.case is None:
        ap.error("give --case, --compare or --lrs")
    overrides = run_overrides(args, args.case, args.seed, [])
    print(f"training: python -m pretrain {' '.join(overrides)}", flush=True)
    out = train(overrides)
    print(f"{args.case} seed {args.seed}: {len(out['curve'])} steps in {out['wall_s']:.0f} s; last {WINDOW}: "
          + ", ".join(f"{k} {v:.4f}" for k, v in losses(out["curve"]).items()))
    save(folder / f"{args.case}-s{args.seed}.json",
         dict(case=args.case, seed=args.seed, steps=args.steps, overrides=overrides, wall_s=out["wall_s"]), out)


if __name__ == "__main__":
    main()
