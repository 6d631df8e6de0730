"""Compare CE, label smoothing and MaxSup: run a recipe per method and seed, then tabulate mean ± sd and plot.

Launch commands (from the repository root):

    # Default: CE, LS 0.1, MaxSup 0.1->0.2, seeds 0 1 2 on the embedded causal-LM task
    python recipes/compare.py --task clm --output_dir outputs/compare-clm

    # The embedded translation task; extra recipe flags go after `--`
    python recipes/compare.py --task translation --output_dir outputs/compare-translation -- --num_train_epochs 8

    # Each run under accelerate (e.g. 2 CPU processes, or your GPU config)
    python recipes/compare.py --task clm --launcher "accelerate launch --config_file recipes/configs/cpu_2proc.yaml"

    # Two runs at a time on a 2-core machine (each gets OMP_NUM_THREADS=1 unless you set it)
    python recipes/compare.py --task translation --jobs 2 --output_dir outputs/compare-translation

    # Only re-tabulate finished runs
    python recipes/compare.py --task clm --output_dir outputs/compare-clm --report_only

    # A table of some arms and seeds only (e.g. a one-seed epsilon sweep in the same folder), as sweep.md/.csv/*.png
    python recipes/compare.py --task translation --methods ce ls:0.05 ls:0.1 ls:0.15 ls:0.2 --seeds 0 \
        --report_only --report_name sweep --only_listed

Resumable: a finished run is not run again. A run counts as finished for this invocation when its folder holds a
valid metrics.json and a run.json recording the same recipe command (the recipe, `--seed`, the method's flags and
every flag after `--`, in order) and the same defaults for every recipe argument the command does not set (a default
changed in the recipe since the run changes what it computes). Otherwise (never finished, failed, metrics.json
truncated, run.json missing, a flag or a default changed) it runs again; the old folder is first moved, untouched, to `<method>/superseded/seed<k>-<time>/`, so
every recipe starts in an empty output_dir and nothing is deleted. Writes into --output_dir: results.md,
results.csv, reliability.png, logit_gaps.png, training_curves.png, and one folder per method and seed with the run's
own outputs, its stdout.log and run.json. Runs go seed by seed (every arm's seed 0 first), so an interrupted sweep
leaves whole seeds. With --jobs N, N recipes run at once; a failed run does not stop the others, and the
invocation exits with an error naming every failed run after the report of the finished ones. While a run runs, its
`<seed>.lock` beside the folder says who runs it: a second invocation on the same folder (here or on another machine
sharing it) leaves that run alone instead of moving it aside under the running recipe.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
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
    parser.add_argument("--jobs", type=int, default=1,
                        help="Runs at once (default 1). Each run gets OMP_NUM_THREADS = CPUs // jobs unless "
                             "OMP_NUM_THREADS is set.")
    parser.add_argument("--report_only", action="store_true", help="Do not run anything; tabulate what exists.")
    parser.add_argument("--only_listed", action="store_true",
                        help="Tabulate only the --methods and --seeds given (default: every finished run in the "
                             "folder).")
    parser.add_argument("--report_name", default="results",
                        help="Stem of the tables and plots written: <name>.md, <name>.csv, <name>_reliability.png, "
                             "... (default 'results', whose plots keep their plain names).")
    parser.add_argument("--export", type=Path, default=None,
                        help="Also copy the table, its plots and each tabulated run's metrics.json, run.json, "
                             "log_history.json, diagnostics.json and eval_predictions.jsonl (no model) to this folder, "
                             "e.g. docs/results/clm to commit them with docs/results.md.")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs {args.jobs}: give 1 or more.")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", args.report_name):
        parser.error(f"--report_name {args.report_name!r}: use letters, digits, '_', '-' and '.' only.")
    args.output_dir = Path(args.output_dir or f"outputs/compare-{args.task}")
    args.extra = extra
    return args


def recipe_command(args, spec, seed: int) -> list[str]:
    """The key of a finished arm: the recipe and every flag it is given, except where it writes.

    The output folder is where the record lives, and the launcher and the checkout's path say how the recipe was
    started, not what it computed; moving a sweep or the repository must not re-run hours of finished work. A change
    of launcher is reported when a run is reused (see `run_one`).
    """
    return [f"{args.task}.py", "--seed", str(seed), *spec.recipe_flags(), *args.extra]


def _read_json(path: Path):
    """(value, None), or (None, why it cannot be used) naming `path`."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None, f"{path} does not exist"
    except OSError as error:
        return None, f"{path} cannot be read ({error})"
    try:
        value = json.loads(text)
    except ValueError as error:
        return None, f"{path} is not valid JSON, truncated or damaged ({error})"
    if not isinstance(value, dict):
        return None, f"{path} holds {type(value).__name__}, not a JSON object"
    return value, None


# Arguments whose default says where a run writes, not what it computes.
NOT_COMPARED = frozenset({"output_dir", "logging_dir", "run_name"})

def recipe_defaults(task: str) -> dict:
    """Every argument default of `recipes/<task>.py` (its own, hf_smooth's and transformers' TrainingArguments').

    The recipe is imported under a private module name (once per process), as `python recipes/<task>.py` would run
    it, without running it."""
    from common import argument_defaults  # recipes/common.py: importable as the scripts import it

    name = f"_recipe_{task}"
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, HERE / f"{task}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except Exception:
            del sys.modules[name]
            raise
    return argument_defaults(module.ARGUMENT_CLASSES)


def unset_defaults(defaults: dict, command: list[str]) -> dict:
    """The defaults a run of `command` computes with: those of the arguments the command does not give."""
    given = {word[2:].split("=", 1)[0] for word in command if word.startswith("--")}
    given |= {name[3:] for name in given if name.startswith("no_")}  # HfArgumentParser's --no_<flag> switch
    return {key: value for key, value in defaults.items() if key not in given and key not in NOT_COMPARED}


def why_rerun(run_dir: Path, wanted: list[str], defaults: dict | None = None) -> str | None:
    """Why `run_dir` does not hold a finished run of `wanted` (see `recipe_command`) with the recipe defaults
    `defaults` (see `unset_defaults`; None: not compared), or None when it does."""
    _, problem = _read_json(run_dir / "metrics.json")
    if problem is not None:
        return problem
    record, problem = _read_json(run_dir / "run.json")
    if problem is not None:
        return f"no record of the command it ran: {problem}"
    before = record.get("recipe_command")
    if not isinstance(before, list):
        return f"{run_dir / 'run.json'} does not record the recipe command it ran (an older compare.py wrote it)"
    if before != wanted:
        return f"it ran `{shlex.join(map(str, before))}`; now asked for `{shlex.join(wanted)}`"
    then = record.get("recipe_defaults")
    if defaults is not None and isinstance(then, dict):
        # Only arguments known both then and now: a transformers upgrade that adds a field changes no finished run.
        changed = [f"{key} {then[key]!r} -> {defaults[key]!r}" for key in sorted(set(then) & set(defaults))
                   if then[key] != defaults[key]]
        if changed:
            shown = ", ".join(changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")
            return f"the recipe's defaults changed since it ran ({shown})"
    return None


def set_aside(run_dir: Path, suffix: str = "") -> Path:
    """Move an old run folder (or an interrupted run's log, with `suffix` '.log') to
    `<method>/superseded/<seed>-<time><suffix>` unchanged (outside the `*/seed*/` pattern the report reads), so the
    recipe gets an empty output_dir and nothing a run wrote is deleted."""
    parent = run_dir.parent / "superseded"
    parent.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    source = run_dir.parent / f"{run_dir.name}{suffix}"
    for attempt in range(1000):
        destination = parent / (f"{run_dir.name}-{stamp}" + (f"-{attempt}" if attempt else "") + suffix)
        if not os.path.lexists(destination):
            os.rename(source, destination)
            return destination
    raise SystemExit(f"[compare] could not find a free name under {parent} to move {source} to.")


def run_one(args, spec, seed: int, defaults: dict | None = None, env: dict | None = None) -> Path:
    """Run one arm and seed unless its folder holds that run finished (see `why_rerun`); SystemExit when it fails."""
    run_dir = args.output_dir / spec.slug / f"seed{seed}"
    wanted = recipe_command(args, spec, seed)
    unset = None if defaults is None else unset_defaults(defaults, wanted)
    label = f"[compare] {spec.name} seed {seed}"
    reason = why_rerun(run_dir, wanted, unset)
    if reason is None:
        record, _ = _read_json(run_dir / "run.json")
        if record.get("launcher") != args.launcher:
            print(f"{label}: done already under --launcher {record.get('launcher')!r} (now {args.launcher!r}); "
                  f"reusing it. Move {run_dir} away to run it again.", flush=True)
        if unset is not None and "recipe_defaults" not in record:
            print(f"{label}: its run.json (from an older compare.py) does not record the recipe's defaults, so a "
                  f"default changed since cannot be seen; reusing it. Move {run_dir} away to run it again.", flush=True)
        print(f"{label}: done already, skipping", flush=True)
        return run_dir
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    lock, holder = claim(run_dir, label)
    if lock is None:
        print(f"{label}: another compare.py ({holder}) is running it now (lock {run_dir}.lock); left to it.",
              flush=True)
        return run_dir
    try:
        return _run_claimed(args, spec, seed, run_dir, wanted, unset, env, label)
    finally:
        os.unlink(lock)


def _process_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError, OverflowError):
        return True  # someone else's process, or a pid we cannot read: assume it runs
    return True


def claim(run_dir: Path, label: str) -> tuple[Path | None, str | None]:
    """Take `<run_dir>.lock` for this process: `(lock path, None)`, or `(None, who holds it)` when another invocation
    (this machine or another sharing the folder) is running that run. A lock left on this machine by a process that
    no longer runs is taken over, and said."""
    lock = run_dir.parent / f"{run_dir.name}.lock"
    me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(2):
        try:
            descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            holder, _ = _read_json(lock)  # None while its owner has not yet written it: held
            who = "unknown" if holder is None else f"pid {holder.get('pid')} on {holder.get('host')}"
            if holder is not None and holder.get("host") == me["host"] and not _process_alive(holder.get("pid")):
                print(f"{label}: {lock} was left by {who}, which no longer runs; taking it over.", flush=True)
                os.unlink(lock)
                continue
            return None, who
        with os.fdopen(descriptor, "w") as handle:
            json.dump(me, handle)
        return lock, None
    return None, "a process that keeps taking it"


def _run_claimed(args, spec, seed, run_dir, wanted, unset, env, label) -> Path:
    reason = why_rerun(run_dir, wanted, unset)  # again, under the lock: another invocation may have finished it
    if reason is None:
        print(f"{label}: finished by another invocation meanwhile, skipping", flush=True)
        return run_dir
    if os.path.lexists(run_dir):
        moved = set_aside(run_dir)
        print(f"{label}: running again: {reason}. The old folder is now {moved}.", flush=True)
    # The log is written beside the run folder while the recipe runs (the recipe may refuse a non-empty
    # output_dir), then moved into it; one found there now is the log of a run stopped before it finished.
    running_log = run_dir.parent / f"{run_dir.name}.log"
    if os.path.lexists(running_log):
        moved = set_aside(run_dir, suffix=".log")
        print(f"{label}: the log of an earlier, unfinished attempt is now {moved}.", flush=True)
    prefix = shlex.split(args.launcher) if args.launcher else [sys.executable]
    command = prefix + [str(HERE / wanted[0]), "--output_dir", str(run_dir), *wanted[1:]]
    env = os.environ.copy() if env is None else env
    print(f"{label}: {shlex.join(command)}", flush=True)
    started = time.time()
    with open(running_log, "w") as log:
        result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    run_dir.mkdir(exist_ok=True)
    log_path = run_dir / "stdout.log"
    os.replace(running_log, log_path)
    if result.returncode != 0:
        raise SystemExit(f"{label}: run failed ({result.returncode}) in {run_dir}; log {log_path}:\n"
                         f"{log_path.read_text()[-3000:]}")
    _, problem = _read_json(run_dir / "metrics.json")
    if problem is not None:
        raise SystemExit(f"{label}: the recipe exited 0 but {problem}; log {log_path}.")
    record = {"method": spec.name, "seed": seed, "spec": spec.__dict__, "task": args.task,
              "recipe_command": wanted, "recipe_defaults": unset, "launcher": args.launcher, "command": command,
              "omp_num_threads": env.get("OMP_NUM_THREADS"), "seconds": round(time.time() - started, 1),
              "commit": checkout_commit()}
    partial = run_dir / "run.json.partial"
    partial.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(partial, run_dir / "run.json")  # written last, in one step: it marks the run finished
    print(f"{label}: {time.time() - started:.0f} s", flush=True)
    return run_dir


def checkout_commit() -> str | None:
    """The commit of this checkout (for the record only; a run is not keyed by it), with '+changes' when the working
    tree differs from it; None outside a git checkout."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True, timeout=30)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=HERE,
                               capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    if commit.returncode != 0:
        return None
    return commit.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def run_all(args, specs, defaults: dict | None) -> list[str]:
    """Every arm and seed, seed by seed, `args.jobs` at a time; the failures' messages (empty when none failed)."""
    env = os.environ.copy()
    if args.jobs > 1 and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.jobs))
        print(f"[compare] {args.jobs} runs at a time, each with OMP_NUM_THREADS={env['OMP_NUM_THREADS']} "
              f"({os.cpu_count()} CPUs; set OMP_NUM_THREADS to choose)", flush=True)
    order = [(spec, seed) for seed in args.seeds for spec in specs]
    failures = []  # list.append is atomic: the threads only wait on their recipe's process

    def one(item):
        spec, seed = item
        try:
            run_one(args, spec, seed, defaults, env)
        except SystemExit as failed:
            failures.append(str(failed))
            print(f"[compare] {spec.name} seed {seed} FAILED; the other runs go on.", flush=True)

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(one, order))
    return failures


def check_finished_runs(output_dir: Path) -> None:
    """Every run the report would read has a readable metrics.json and run.json; otherwise stop, naming the files."""
    problems = []
    for metrics_path in sorted(output_dir.glob("*/seed*/metrics.json")):
        for path in (metrics_path, metrics_path.parent / "run.json"):
            if path.exists():
                problem = _read_json(path)[1]
                if problem is not None:
                    problems.append(problem)
    if problems:
        raise SystemExit("[compare] cannot report: " + "; ".join(problems) + ". Run compare.py for that method "
                         "without --report_only to run it again, or move its folder away.")


PLOTS = ("reliability", "logit_gaps", "training_curves")


def table_files(output_dir: Path, name: str) -> dict[str, Path]:
    """Where the table `name`, its per-run table and its plots go: `<name>.md`, `<name>_runs.md`, `<name>.csv`, and
    `reliability.png`, ... for the name 'results' (the runner's default), `<name>_reliability.png`, ... for any
    other."""
    stem = "" if name == "results" else f"{name}_"
    return {"md": output_dir / f"{name}.md", "runs_md": output_dir / f"{name}_runs.md",
            "csv": output_dir / f"{name}.csv", **{plot: output_dir / f"{stem}{plot}.png" for plot in PLOTS}}


def report(output_dir: Path, order: list[str], name: str = "results", seeds: list[int] | None = None) -> dict:
    """Tabulate and plot every finished run under `output_dir`: the requested methods first, in `order`, then any
    other method found there (a directory shared by two sweeps is reported whole). With `seeds`, only the runs of
    the methods in `order` and of those seeds (`--only_listed`). Writes `<name>.md`, `<name>_runs.md` (one row per
    run), `<name>.csv` and the plots (`reliability.png`, ... for the name 'results'; `<name>_reliability.png`, ...
    otherwise)."""
    from hf_smooth.plots import plot_logit_gaps, plot_reliability
    from hf_smooth.demo.report import (load_runs, plot_training_curves, pool_diagnostics, runs_to_markdown, summarize,
                                       to_csv, to_markdown)

    check_finished_runs(output_dir)
    runs = load_runs(output_dir)
    if seeds is not None:
        runs = [run for run in runs if run.method in order and run.seed in seeds]
        absent = [f"{method} seed {seed}" for method in order for seed in seeds
                  if not any(run.method == method and run.seed == seed for run in runs)]
        if absent:
            print(f"[compare] not finished, left out of {name}.md: {', '.join(absent)}", flush=True)
    if not runs:
        raise SystemExit(f"No finished runs under {output_dir}" + (" for the listed methods and seeds." if seeds
                                                                   is not None else "."))
    found = list(dict.fromkeys(run.method for run in runs))
    summary = summarize(runs, order=[m for m in order if m in found] + [m for m in found if m not in order])
    files = table_files(output_dir, name)
    files["md"].write_text(to_markdown(summary))
    files["runs_md"].write_text(runs_to_markdown(runs, order=summary["methods"]))
    files["csv"].write_text(to_csv(summary))
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
        plot_reliability(pooled, files["reliability"])
        plot_logit_gaps(pooled, files["logit_gaps"])
    plot_training_curves(runs, files["training_curves"])
    print(to_markdown(summary), flush=True)
    summary["runs"] = runs
    return summary


# What --export copies of each run: the numbers and the record, not the model.
EXPORTED_RUN_FILES = ("metrics.json", "run.json", "log_history.json", "diagnostics.json", "eval_predictions.jsonl")
EXPORT_RECORD = "EXPORTED.json"


def export(output_dir: Path, name: str, summary: dict, destination: Path) -> list[Path]:
    """Copy the table, its plots and each tabulated run's EXPORTED_RUN_FILES to `destination` (e.g. under docs/, to
    commit), keeping the `<method>/seed<k>/` layout so that the table can be rebuilt from the copy. A destination
    that holds anything but an earlier export's files (listed in its EXPORTED.json) is refused: nothing this
    function did not write is overwritten or removed."""
    copies = [(path, destination / path.name) for path in table_files(output_dir, name).values() if path.is_file()]
    for run in summary["runs"]:
        for file in EXPORTED_RUN_FILES:
            if (run.path / file).is_file():
                copies.append((run.path / file, destination / run.path.parent.name / run.path.name / file))
    earlier = []
    if destination.exists():
        record, problem = _read_json(destination / EXPORT_RECORD)
        present = sorted(p.relative_to(destination).as_posix() for p in destination.rglob("*") if p.is_file())
        earlier = [] if record is None else list(record.get("files", []))
        foreign = [p for p in present if p not in earlier and p != EXPORT_RECORD]
        if foreign:
            raise SystemExit(f"[compare] --export {destination}: it holds files an export did not write ("
                             f"{', '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''}); give an empty or new "
                             f"folder.")
    for old in earlier:  # an earlier export of ours: replaced whole, so no run of an older table lingers
        (destination / old).unlink(missing_ok=True)
    for source, target in copies:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    written = sorted(target.relative_to(destination).as_posix() for _, target in copies)
    record = {"source": str(output_dir), "table": f"{name}.md", "runs_table": f"{name}_runs.md", "files": written}
    (destination / EXPORT_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    ours = {parent for old in earlier for parent in (destination / old).parents if destination in parent.parents}
    for folder in sorted(ours, key=lambda p: len(p.parts), reverse=True):
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()  # a run folder of an earlier export, emptied above and not written again
    print(f"[compare] exported {len(written)} files to {destination}", flush=True)
    return [target for _, target in copies]


def check_launcher(launcher: str | None) -> None:
    """A --launcher whose program cannot be started stops here, in one line, before any run."""
    if launcher is None:
        return
    try:
        words = shlex.split(launcher)
    except ValueError as error:
        raise SystemExit(f"--launcher {launcher!r} cannot be split into words ({error}); check its quotes.") from None
    if not words:
        raise SystemExit("--launcher is empty: leave it out to run each recipe with this Python, or give a command "
                         "such as 'accelerate launch'.")
    if shutil.which(words[0]) is None:
        raise SystemExit(f"--launcher {launcher!r}: {words[0]!r} is not an executable on PATH (or not executable); "
                         f"install it (accelerate: pip install accelerate) or give its full path.")


def main(argv=None):
    from hf_smooth.demo.report import MethodSpec

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
    check_launcher(args.launcher)
    started = time.time()
    failures = [] if args.report_only else run_all(args, specs, recipe_defaults(args.task))
    names = [spec.name for spec in specs]
    try:
        summary = report(args.output_dir, names, args.report_name, args.seeds if args.only_listed else None)
    except SystemExit:
        if not failures:
            raise
        summary = None  # nothing finished to tabulate: the failures below say why
    if args.export is not None and summary is not None:
        export(args.output_dir, args.report_name, summary, args.export)
    if failures:
        raise SystemExit(f"[compare] {len(failures)} run(s) failed (the finished ones are kept and tabulated):\n"
                         + "\n".join(failures))
    print(f"[compare] total {time.time() - started:.0f} s; tables in {args.output_dir}/{args.report_name}.md",
          flush=True)
    return summary


if __name__ == "__main__":
    main()
