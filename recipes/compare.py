"""Compare CE, label smoothing and MaxSup: run a recipe per method and seed, then tabulate mean ± sd and plot.

Launch commands (from the repository root):

    # Default: CE, LS 0.1, MaxSup 0.1->0.2, seeds 0 1 2 on the embedded causal-LM task
    python recipes/compare.py --task clm --output_dir outputs/compare-clm

    # The embedded translation task; extra recipe flags go after `--`
    python recipes/compare.py --task translation --output_dir outputs/compare-translation -- --num_train_epochs 8

    # Each run under accelerate (e.g. 2 CPU processes, or your GPU config)
    python recipes/compare.py --task clm --launcher "accelerate launch --config_file recipes/configs/cpu_2proc.yaml"

    # Only re-tabulate finished runs
    python recipes/compare.py --task clm --output_dir outputs/compare-clm --report_only

Resumable: a run whose metrics.json exists is not run again. Writes into --output_dir: results.md, results.csv,
reliability.png, logit_gaps.png, training_curves.png, and one folder per method and seed with the run's own outputs.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def parse(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", choices=["clm", "translation"], default="clm", help="Which recipe to run.")
    parser.add_argument("--methods", nargs="+", default=["ce", "ls:0.1", "maxsup:0.1-0.2"],
                        help="Arms: ce, ls:EPS, maxsup:ALPHA or maxsup:ALPHA-ALPHA_END (linear ramp).")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="Seeds per arm.")
    parser.add_argument("--output_dir", default=None, help="Default: outputs/compare-<task>.")
    parser.add_argument("--launcher", default=None,
                        help="Command prefix for each run, e.g. 'accelerate launch --config_file ...'. Default: this "
                             "Python interpreter.")
    parser.add_argument("--report_only", action="store_true", help="Do not run anything; tabulate what exists.")
    args = parser.parse_args(argv)
    args.output_dir = Path(args.output_dir or f"outputs/compare-{args.task}")
    args.extra = extra
    return args


def run_one(args, spec, seed: int) -> Path:
    run_dir = args.output_dir / spec.slug / f"seed{seed}"
    if (run_dir / "metrics.json").is_file():
        print(f"[compare] {spec.name} seed {seed}: done already, skipping", flush=True)
        return run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "run.json").write_text(json.dumps({"method": spec.name, "seed": seed, "spec": spec.__dict__}))
    prefix = shlex.split(args.launcher) if args.launcher else [sys.executable]
    command = prefix + [str(HERE / f"{args.task}.py"), "--output_dir", str(run_dir), "--seed", str(seed)]
    command += spec.recipe_flags() + list(args.extra)
    print(f"[compare] {spec.name} seed {seed}: {shlex.join(command)}", flush=True)
    started = time.time()
    with open(run_dir / "stdout.log", "w") as log:
        result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
    if result.returncode != 0:
        tail = (run_dir / "stdout.log").read_text()[-3000:]
        raise SystemExit(f"[compare] run failed ({result.returncode}) in {run_dir}:\n{tail}")
    print(f"[compare] {spec.name} seed {seed}: {time.time() - started:.0f} s", flush=True)
    return run_dir


def report(output_dir: Path, order: list[str]) -> dict:
    """Tabulate and plot every finished run under `output_dir`: the requested methods first, in `order`, then any
    other method found there (a directory shared by two sweeps is reported whole)."""
    from hf_smooth.plots import plot_logit_gaps, plot_reliability
    from hf_smooth.report import load_runs, plot_training_curves, pool_diagnostics, summarize, to_csv, to_markdown

    runs = load_runs(output_dir)
    if not runs:
        raise SystemExit(f"No finished runs under {output_dir}.")
    found = list(dict.fromkeys(run.method for run in runs))
    summary = summarize(runs, order=[m for m in order if m in found] + [m for m in found if m not in order])
    (output_dir / "results.md").write_text(to_markdown(summary))
    (output_dir / "results.csv").write_text(to_csv(summary))
    pooled, missing = {}, []
    for method in summary["methods"]:
        states = []
        for run in (r for r in runs if r.method == method):
            state = run.diagnostics()
            if state is None:
                missing.append(str(run.path))
            else:
                states.append(state)
        if states:
            pooled[method] = pool_diagnostics(states)  # the plots pool the bins over seeds
    if missing:
        print(f"[compare] no diagnostics.json (left out of the calibration plots) in: {', '.join(missing)}", flush=True)
    if pooled:
        plot_reliability(pooled, output_dir / "reliability.png")
        plot_logit_gaps(pooled, output_dir / "logit_gaps.png")
    plot_training_curves(runs, output_dir / "training_curves.png")
    print(to_markdown(summary), flush=True)
    return summary


def main(argv=None):
    from hf_smooth.report import MethodSpec

    args = parse(argv)
    try:
        specs = [MethodSpec.parse(text) for text in args.methods]
    except ValueError as error:
        raise SystemExit(f"--methods: {error}") from None
    slugs = [spec.slug for spec in specs]
    if len(set(slugs)) != len(slugs):
        # Two spellings of one arm (ls:0.1 and ls:0.10) share a run folder: the second would silently reuse the first.
        raise SystemExit(f"--methods {' '.join(args.methods)} names the same arm twice ({', '.join(slugs)}).")
    if len(set(args.seeds)) != len(args.seeds):
        raise SystemExit(f"--seeds {' '.join(map(str, args.seeds))} repeats a seed; each seed is one run.")
    started = time.time()
    if not args.report_only:
        for spec in specs:
            for seed in args.seeds:
                run_one(args, spec, seed)
    summary = report(args.output_dir, [spec.name for spec in specs])
    print(f"[compare] total {time.time() - started:.0f} s; tables in {args.output_dir}/results.md", flush=True)
    return summary


if __name__ == "__main__":
    main()
