"""recipes/compare.py and hf_smooth.demo.report: the comparison table is the mean and sd of the runs' own metrics.json.

Three layers:
- hf_smooth.demo.report on hand-written metrics with hand-computed means and sample standard deviations;
- the runner with a stand-in recipe (a few lines of Python passed as --launcher) that records its command line and
  writes known metrics: the flags each arm gets, resuming only the missing runs, failures and bad input;
- the runner end to end on the real translation recipe (embedded Marian built from a config, tiny sizes, 3 steps),
  2 methods x 2 seeds, checked against statistics.mean/stdev over the metrics.json files the runs wrote.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import math
import os
import re
import shlex
import statistics
import sys
from pathlib import Path

import matplotlib.image
import pytest
import torch
from metric_oracles import oracle_metrics

from hf_smooth.metrics import TokenMetrics
from hf_smooth.demo.report import (DEFAULT_METRICS, MethodSpec, load_runs, pool_diagnostics, runs_to_markdown, summarize,
                                   to_csv, to_markdown)

REPO = Path(__file__).resolve().parents[1]


def load_compare():
    """recipes/compare.py is a script, not a package module: import it by path."""
    spec = importlib.util.spec_from_file_location("hf_smooth_compare_script", REPO / "recipes" / "compare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pytestmark = pytest.mark.usefixtures("offline_env")


# ---- hf_smooth.demo.report on hand-written runs ------------------------------------------------------------------------


def write_run(root: Path, slug: str, seed: int, method: str | None, metrics: dict) -> Path:
    run_dir = root / slug / f"seed{seed}"
    run_dir.mkdir(parents=True)
    if method is not None:
        (run_dir / "run.json").write_text(json.dumps({"method": method, "seed": seed}))
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    return run_dir


@pytest.fixture
def hand_runs(tmp_path):
    # eval_nll: LS 2, 4, 6 -> mean 4, sd sqrt((4 + 0 + 4) / 2) = 2;  MaxSup 3, 5 -> mean 4, sd sqrt(2);  CE 7.5 alone.
    # eval_ece: LS 0.25, 0.75, 0.5 -> mean 0.5, sd sqrt((0.0625 + 0.0625 + 0) / 2) = 0.25;  MaxSup: one run wrote
    # null (a non-finite value), so one value, 0.125, and no sd;  CE has no ECE at all.
    # eval_mean_token_accuracy only in the CE run; eval_bleu in none (its column must disappear).
    write_run(tmp_path, "ls0p1", 0, "LS 0.1", {"eval_nll": 2.0, "eval_ece": 0.25, "task": "clm"})
    write_run(tmp_path, "ls0p1", 1, "LS 0.1", {"eval_nll": 4.0, "eval_ece": 0.75})
    write_run(tmp_path, "ls0p1", 2, "LS 0.1", {"eval_nll": 6.0, "eval_ece": 0.5})
    write_run(tmp_path, "maxsup0p1", 0, "MaxSup 0.1", {"eval_nll": 3.0, "eval_ece": None})
    write_run(tmp_path, "maxsup0p1", 1, "MaxSup 0.1", {"eval_nll": 5.0, "eval_ece": 0.125})
    write_run(tmp_path, "ce", 0, "CE", {"eval_nll": 7.5, "eval_mean_token_accuracy": 0.625})
    (tmp_path / "ce" / "seed1").mkdir()  # an unfinished run: no metrics.json, not counted
    (tmp_path / "ce" / "seed1" / "run.json").write_text(json.dumps({"method": "CE", "seed": 1}))
    return tmp_path


def test_load_runs_reads_method_and_seed(hand_runs, tmp_path):
    runs = load_runs(hand_runs)
    assert sorted((r.method, r.seed) for r in runs) == [
        ("CE", 0), ("LS 0.1", 0), ("LS 0.1", 1), ("LS 0.1", 2), ("MaxSup 0.1", 0), ("MaxSup 0.1", 1)
    ]
    # Without run.json the folder names stand in.
    write_run(tmp_path / "other", "mystery", 7, None, {"eval_nll": 1.0})
    (run,) = load_runs(tmp_path / "other")
    assert (run.method, run.seed, run.metrics) == ("mystery", 7, {"eval_nll": 1.0})
    assert load_runs(tmp_path / "nothing-here") == []


def test_summarize_hand_computed(hand_runs):
    summary = summarize(load_runs(hand_runs), order=["CE", "LS 0.1", "MaxSup 0.1"])
    assert summary["methods"] == ["CE", "LS 0.1", "MaxSup 0.1"]
    assert summary["columns"] == [
        ("eval_nll", "eval NLL"), ("eval_mean_token_accuracy", "token acc."), ("eval_ece", "ECE")
    ]
    cells = summary["cells"]
    assert cells["LS 0.1"]["eval_nll"] == pytest.approx((4.0, 2.0, 3), abs=1e-15)
    assert cells["LS 0.1"]["eval_ece"] == pytest.approx((0.5, 0.25, 3), abs=1e-15)
    assert cells["MaxSup 0.1"]["eval_nll"][0] == 4.0
    assert cells["MaxSup 0.1"]["eval_nll"][1] == pytest.approx(1.4142135623730951, abs=1e-15)
    assert cells["MaxSup 0.1"]["eval_ece"] == (0.125, None, 1)
    assert cells["CE"] == {"eval_nll": (7.5, None, 1), "eval_mean_token_accuracy": (0.625, None, 1)}
    assert "eval_mean_token_accuracy" not in cells["LS 0.1"]


def test_summarize_default_order_is_first_appearance(hand_runs):
    summary = summarize(load_runs(hand_runs))
    assert summary["methods"] == ["CE", "LS 0.1", "MaxSup 0.1"]  # load_runs sorts the paths: ce/, ls0p1/, maxsup0p1/


def test_to_markdown_hand_written(hand_runs):
    summary = summarize(load_runs(hand_runs), order=["LS 0.1", "MaxSup 0.1", "CE"])
    assert to_markdown(summary) == (
        "| method | runs | eval NLL | token acc. | ECE |\n"
        "|---|---|---|---|---|\n"
        "| LS 0.1 | 3 | 4.0000 ± 2.0000 | n/a | 0.5000 ± 0.2500 |\n"
        "| MaxSup 0.1 | 2 | 4.0000 ± 1.4142 | n/a | 0.1250 |\n"
        "| CE | 1 | 7.5000 | 0.6250 | n/a |\n"
    )


def test_runs_to_markdown_hand_written(hand_runs):
    """One row per run, seeds ascending within a method; a null (non-finite) value and an absent key are both n/a."""
    assert runs_to_markdown(load_runs(hand_runs), order=["MaxSup 0.1", "LS 0.1", "CE"]) == (
        "| method | seed | eval NLL | token acc. | ECE |\n"
        "|---|---|---|---|---|\n"
        "| MaxSup 0.1 | 0 | 3.0000 | n/a | n/a |\n"
        "| MaxSup 0.1 | 1 | 5.0000 | n/a | 0.1250 |\n"
        "| LS 0.1 | 0 | 2.0000 | n/a | 0.2500 |\n"
        "| LS 0.1 | 1 | 4.0000 | n/a | 0.7500 |\n"
        "| LS 0.1 | 2 | 6.0000 | n/a | 0.5000 |\n"
        "| CE | 0 | 7.5000 | 0.6250 | n/a |\n"
    )


def test_to_csv_hand_written(hand_runs):
    summary = summarize(load_runs(hand_runs), order=["LS 0.1", "MaxSup 0.1", "CE"])
    rows = list(csv.reader(io.StringIO(to_csv(summary))))
    assert rows[0] == ["method"] + [
        f"{key}_{part}" for key in ("eval_nll", "eval_mean_token_accuracy", "eval_ece") for part in ("mean", "sd", "n")
    ]
    ls, maxsup, ce = rows[1:]
    assert ls[:4] == ["LS 0.1", "4.0", "2.0", "3"] and ls[4:7] == ["", "", "0"] and ls[7:] == ["0.5", "0.25", "3"]
    assert maxsup[0] == "MaxSup 0.1" and float(maxsup[2]) == pytest.approx(math.sqrt(2.0), abs=1e-15)
    assert maxsup[7:] == ["0.125", "", "1"]
    assert ce == ["CE", "7.5", "", "1", "0.625", "", "1", "", "", "0"]


@pytest.mark.parametrize(
    "text, name, slug, flags",
    [
        ("ce", "CE", "ce", ["--smoothing_method", "none", "--smoothing_schedule", "constant"]),
        ("ls:0.1", "LS 0.1", "ls0p1",
         ["--smoothing_method", "label_smoothing", "--smoothing_alpha", "0.1", "--smoothing_schedule", "constant"]),
        ("maxsup:0.1-0.2", "MaxSup 0.1->0.2", "maxsup0p1-0p2",
         ["--smoothing_method", "maxsup", "--smoothing_alpha", "0.1", "--smoothing_schedule", "linear",
          "--smoothing_alpha_end", "0.2"]),
        ("MaxSup:0.15", "MaxSup 0.15", "maxsup0p15",
         ["--smoothing_method", "maxsup", "--smoothing_alpha", "0.15", "--smoothing_schedule", "constant"]),
    ],
)
def test_method_spec(text, name, slug, flags):
    spec = MethodSpec.parse(text)
    assert (spec.name, spec.slug, spec.recipe_flags()) == (name, slug, flags)


@pytest.mark.parametrize(
    "text, message",
    [("ce:0.1", "takes no strength"), ("ls", "give the strength"), ("dropout:0.1", "Unknown method"),
     ("ls:1e-1", "plain decimal"), ("maxsup:abc", "plain decimal")],
)
def test_method_spec_rejects(text, message):
    with pytest.raises(ValueError, match=message):
        MethodSpec.parse(text)


def random_metrics(seed: int, rows: int, scale: float) -> tuple[TokenMetrics, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, 11, generator=g, dtype=torch.float64) * scale
    labels = torch.randint(0, 11, (rows,), generator=g)
    labels[::7] = -100
    return TokenMetrics().update(logits, labels), logits, labels


def test_pool_diagnostics_equals_concatenated_oracle():
    parts = [random_metrics(seed, rows, scale) for seed, rows, scale in ((0, 90, 2.0), (1, 130, 4.0), (2, 40, 0.5))]
    states = [json.loads(json.dumps(m.to_dict())) for m, _, _ in parts]  # as read back from diagnostics.json
    pooled = pool_diagnostics(states)
    logits = torch.cat([z for _, z, _ in parts])
    labels = torch.cat([y for _, _, y in parts])
    edges = list(pooled.layout.gap_edges)
    oracle = oracle_metrics(logits, labels, gap_edges=edges)
    results = pooled.compute()
    for key in ("nll", "accuracy", "confidence", "ece", "brier", "entropy", "logit_gap"):
        assert results[key] == pytest.approx(oracle[key], rel=1e-9, abs=1e-12), key
    assert results["num_tokens"] == oracle["num_tokens"]
    assert pooled.reliability()["count"] == oracle["bin_count"]
    assert pooled.logit_gap_histogram()["count"] == oracle["gap_count"]
    assert "ece_adaptive" not in results  # needs per-token pairs, which diagnostics.json does not hold


def test_pool_diagnostics_rejects_mismatched_or_empty():
    a = TokenMetrics().update(torch.randn(5, 4), torch.tensor([0, 1, 2, 3, 0])).to_dict()
    b = TokenMetrics(num_bins=10).update(torch.randn(5, 4), torch.tensor([0, 1, 2, 3, 0])).to_dict()
    with pytest.raises(ValueError, match="different layouts"):
        pool_diagnostics([a, b])
    with pytest.raises(ValueError, match="at least one"):
        pool_diagnostics([])
    with pytest.raises(ValueError, match="diagnostics.json"):
        pool_diagnostics([{"metrics": {}}])


# ---- the runner with a stand-in recipe ----------------------------------------------------------------------------

# Receives `<recipe.py> --output_dir D --seed S <method flags> <extra flags>` like the real recipes, appends its
# command line to calls.jsonl and writes metrics that are a known function of the method and the seed. Like the real
# recipes (issue 11.4) it refuses an output_dir that is not empty. Set FAKE_RECIPE_FAIL=<seed> to make that seed
# fail, FAKE_RECIPE_NO_METRICS=1 to make it exit 0 without writing metrics.json, FAKE_RECIPE_BARRIER=<folder>:<n> to
# make each run wait until n runs have started (fails after 60 s).
FAKE_RECIPE = r'''
import json, os, sys
from pathlib import Path
argv = sys.argv[1:]
flags = dict(zip(argv[1::2], argv[2::2]))
out = Path(flags["--output_dir"])
with open(Path(os.environ["FAKE_RECIPE_LOG"]), "a") as log:
    log.write(json.dumps(argv) + "\n")
if out.exists() and any(out.iterdir()):
    sys.exit(f"output_dir {out} is not empty: {sorted(p.name for p in out.iterdir())}")
out.mkdir(parents=True, exist_ok=True)
seed = int(flags["--seed"])
print("fake recipe running", seed)
if os.environ.get("FAKE_RECIPE_FAIL") == str(seed):
    print("boom: simulated failure")
    sys.exit(3)
if os.environ.get("FAKE_RECIPE_NO_METRICS"):
    sys.exit(0)
(out / "omp_num_threads.txt").write_text(os.environ.get("OMP_NUM_THREADS", "unset"))
barrier = os.environ.get("FAKE_RECIPE_BARRIER")  # "<folder>:<count>": wait until <count> runs have started
if barrier:
    import time
    folder, count = barrier.rsplit(":", 1)
    Path(folder, out.parent.name + "-" + out.name).touch()
    deadline = time.time() + 60
    while len(list(Path(folder).iterdir())) < int(count):
        if time.time() > deadline:
            sys.exit("barrier: the other runs did not start while this one ran")
        time.sleep(0.05)
alpha = float(flags.get("--smoothing_alpha", 0.0))
metrics = {"eval_nll": 1.0 + alpha + 0.5 * seed, "eval_mean_token_accuracy": 0.5 - alpha + 0.01 * seed}
(out / "metrics.json").write_text(json.dumps(metrics))
history = [{"step": s, "loss": 3.0 - 0.1 * s + alpha, "nll": 3.0 - 0.1 * s} for s in (1, 2, 3)]
(out / "log_history.json").write_text(json.dumps(history))
'''


@pytest.fixture
def fake_recipe(tmp_path, monkeypatch):
    script = tmp_path / "fake_recipe.py"
    script.write_text(FAKE_RECIPE)
    log = tmp_path / "calls.jsonl"
    monkeypatch.setenv("FAKE_RECIPE_LOG", str(log))
    monkeypatch.delenv("FAKE_RECIPE_FAIL", raising=False)
    monkeypatch.delenv("FAKE_RECIPE_NO_METRICS", raising=False)
    monkeypatch.delenv("FAKE_RECIPE_BARRIER", raising=False)

    def calls():
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    return f"{shlex.quote(sys.executable)} {shlex.quote(str(script))}", calls


def test_runner_flags_resume_and_table(tmp_path, fake_recipe, capsys):
    launcher, calls = fake_recipe
    compare = load_compare()
    out = tmp_path / "cmp"
    argv = ["--task", "clm", "--methods", "ce", "maxsup:0.1-0.2", "--seeds", "0", "1", "--output_dir", str(out),
            "--launcher", launcher, "--", "--max_steps", "3"]
    summary = compare.main(argv)

    made = calls()
    assert len(made) == 4
    by_run = {(c[c.index("--output_dir") + 1], c[c.index("--seed") + 1]): c for c in made}
    assert set(by_run) == {(str(out / slug / f"seed{s}"), str(s)) for slug in ("ce", "maxsup0p1-0p2") for s in (0, 1)}
    maxsup = by_run[(str(out / "maxsup0p1-0p2" / "seed1"), "1")]
    assert maxsup[0] == str(REPO / "recipes" / "clm.py")
    assert maxsup[5:] == ["--smoothing_method", "maxsup", "--smoothing_alpha", "0.1", "--smoothing_schedule",
                          "linear", "--smoothing_alpha_end", "0.2", "--max_steps", "3"]
    ce = by_run[(str(out / "ce" / "seed0"), "0")]
    assert ce[5:] == ["--smoothing_method", "none", "--smoothing_schedule", "constant", "--max_steps", "3"]

    # Known metrics: CE nll 1.0, 1.5; MaxSup (alpha 0.1) 1.1, 1.6.
    assert summary["methods"] == ["CE", "MaxSup 0.1->0.2"]
    assert summary["cells"]["CE"]["eval_nll"] == pytest.approx((1.25, statistics.stdev([1.0, 1.5]), 2), abs=1e-12)
    assert summary["cells"]["MaxSup 0.1->0.2"]["eval_nll"] == pytest.approx(
        (1.35, statistics.stdev([1.1, 1.6]), 2), abs=1e-12
    )
    assert (out / "results.md").read_text() == to_markdown(summary)
    assert (out / "training_curves.png").stat().st_size > 5_000
    assert not (out / "reliability.png").exists()  # the stand-in writes no diagnostics.json ...
    assert "no diagnostics.json" in capsys.readouterr().out  # ... and the runner says so

    # Resume: only the run whose metrics.json is gone runs again.
    (out / "ce" / "seed1" / "metrics.json").unlink()
    compare.main(argv)
    again = calls()[4:]
    assert len(again) == 1 and again[0][again[0].index("--seed") + 1] == "1"
    assert again[0][again[0].index("--output_dir") + 1] == str(out / "ce" / "seed1")

    # --report_only never launches; a method present on disk but not requested is still reported, after the others.
    compare.main(["--output_dir", str(out), "--methods", "maxsup:0.1-0.2", "--report_only"])
    assert len(calls()) == 5
    assert load_compare().report(out, ["MaxSup 0.1->0.2"])["methods"] == ["MaxSup 0.1->0.2", "CE"]


def test_runner_stops_on_a_failed_run(tmp_path, fake_recipe, monkeypatch):
    launcher, calls = fake_recipe
    monkeypatch.setenv("FAKE_RECIPE_FAIL", "1")
    out = tmp_path / "cmp"
    with pytest.raises(SystemExit, match=r"(?s)run failed \(3\).*boom: simulated failure"):
        load_compare().main(["--methods", "ls:0.1", "--seeds", "0", "1", "--output_dir", str(out),
                             "--launcher", launcher])
    assert (out / "ls0p1" / "seed0" / "metrics.json").is_file()
    assert not (out / "ls0p1" / "seed1" / "metrics.json").exists()  # so the next invocation runs it again


def test_runner_goes_seed_by_seed(tmp_path, fake_recipe):
    """Every arm's seed 0 before any seed 1: an interrupted sweep leaves whole seeds."""
    launcher, calls = fake_recipe
    load_compare().main(["--methods", "ce", "ls:0.1", "--seeds", "0", "1", "--output_dir", str(tmp_path / "cmp"),
                         "--launcher", launcher])
    order = [(Path(c[c.index("--output_dir") + 1]).parent.name, c[c.index("--seed") + 1]) for c in calls()]
    assert order == [("ce", "0"), ("ls0p1", "0"), ("ce", "1"), ("ls0p1", "1")]


def test_runner_jobs_run_at_once_with_their_threads(tmp_path, fake_recipe, monkeypatch):
    """--jobs 2: two recipes run at the same time (each waits for the other to start; one at a time, the first
    would give up after 60 s and fail), and each gets OMP_NUM_THREADS = CPUs // 2 when it is unset."""
    launcher, calls = fake_recipe
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    monkeypatch.setenv("FAKE_RECIPE_BARRIER", f"{barrier}:2")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 6)
    out = tmp_path / "cmp"
    compare = load_compare()
    summary = compare.main(["--methods", "ce", "ls:0.1", "--seeds", "0", "--jobs", "2", "--output_dir", str(out),
                            "--launcher", launcher])
    assert len(calls()) == 2 and summary["methods"] == ["CE", "LS 0.1"]
    for slug in ("ce", "ls0p1"):
        assert (out / slug / "seed0" / "omp_num_threads.txt").read_text() == "3"
        assert json.loads((out / slug / "seed0" / "run.json").read_text())["omp_num_threads"] == "3"

    # A thread count the user set is kept.
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    for old in barrier.iterdir():
        old.unlink()
    compare.main(["--methods", "ce", "ls:0.1", "--seeds", "1", "--jobs", "2", "--output_dir", str(out),
                  "--launcher", launcher])
    assert (out / "ls0p1" / "seed1" / "omp_num_threads.txt").read_text() == "5"


def test_runner_jobs_a_failure_does_not_stop_the_others(tmp_path, fake_recipe, monkeypatch, capsys):
    launcher, calls = fake_recipe
    monkeypatch.setenv("FAKE_RECIPE_FAIL", "0")
    out = tmp_path / "cmp"
    with pytest.raises(SystemExit) as stopped:
        load_compare().main(["--methods", "ce", "ls:0.1", "--seeds", "0", "1", "--jobs", "2",
                             "--output_dir", str(out), "--launcher", launcher])
    text = str(stopped.value)
    assert text.startswith("[compare] 2 run(s) failed") and text.count("boom: simulated failure") == 2
    assert "CE seed 0: run failed (3)" in text and "LS 0.1 seed 0: run failed (3)" in text
    assert len(calls()) == 4  # seed 1 of both arms still ran
    assert sorted(p.parent.parent.name for p in out.glob("*/seed1/metrics.json")) == ["ce", "ls0p1"]
    assert not list(out.glob("*/seed0/metrics.json"))
    assert "| CE | 1 |" in (out / "results.md").read_text()  # the finished runs are tabulated
    assert "FAILED; the other runs go on" in capsys.readouterr().out


def test_runner_reruns_an_arm_whose_recipe_default_changed(tmp_path, fake_recipe, monkeypatch, capsys):
    """A run is keyed by the defaults of the arguments its command does not give, as well as by the command: a
    recipe default changed since the run makes it run again (the old folder moved aside), a changed default of a
    flag the command gives does not, nor does an argument that only one side knows."""
    launcher, calls = fake_recipe
    compare = load_compare()
    real = compare.recipe_defaults("clm")
    assert real["learning_rate"] > 0 and real["smoothing_method"] is None
    defaults = {"learning_rate": 5e-4, "max_steps": -1, "seed": 42, "output_dir": "outputs/clm"}
    monkeypatch.setattr(compare, "recipe_defaults", lambda task: dict(defaults))
    out = tmp_path / "cmp"
    argv = ["--methods", "ls:0.1", "--seeds", "0", "--output_dir", str(out), "--launcher", launcher, "--",
            "--max_steps", "3"]
    compare.main(argv)
    record = json.loads((out / "ls0p1" / "seed0" / "run.json").read_text())
    assert record["recipe_defaults"] == {"learning_rate": 5e-4}  # given flags and the output folder left out

    for change in ({"max_steps": 10}, {"seed": 1}, {"output_dir": "elsewhere"}, {"new_argument": 1}):
        defaults.update(change)
        compare.main(argv)
    assert len(calls()) == 1
    capsys.readouterr()

    defaults["learning_rate"] = 1e-3
    compare.main(argv)
    assert len(calls()) == 2
    assert "the recipe's defaults changed since it ran (learning_rate 0.0005 -> 0.001)" in capsys.readouterr().out
    assert len(list((out / "ls0p1" / "superseded").iterdir())) == 1

    # A run.json from before defaults were recorded is reused, and the runner says it cannot check them.
    path = out / "ls0p1" / "seed0" / "run.json"
    path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != "recipe_defaults"}))
    compare.main(argv)
    assert len(calls()) == 2 and "does not record the recipe's defaults" in capsys.readouterr().out


def test_recipe_defaults_are_the_parsers_defaults():
    """The recorded defaults are what the recipe's own argument parser fills in when a flag is not given."""
    from transformers import HfArgumentParser

    from common import argument_defaults
    from recipe_helpers import load_recipe

    for name in ("clm", "translation"):
        classes = load_recipe(name).ARGUMENT_CLASSES
        recorded = argument_defaults(classes)
        namespace, _ = HfArgumentParser(classes).parse_known_args([])
        parsed = json.loads(json.dumps(vars(namespace), default=str))
        assert set(recorded) <= set(parsed) and len(recorded) > 100
        differ = {key: (recorded[key], parsed[key]) for key in recorded if recorded[key] != parsed[key]}
        # HfArgumentParser reads two transformers defaults through their Union types ("no" as False, "" as None);
        # every other default, the recipes' and hf_smooth's included, is the parser's own.
        assert all(then in ("no", "") and now in (False, None) for then, now in differ.values()), differ
        assert {"learning_rate", "smoothing_method", "smoothing_alpha", "lora_r"} <= set(recorded)


def test_runner_leaves_a_run_another_invocation_holds(tmp_path, fake_recipe, capsys):
    """`<seed>.lock` held by a live process (this test, standing in for a second compare.py): that run is left alone,
    the others run; a lock from a process that no longer runs is taken over and removed after the run."""
    import socket
    import subprocess

    launcher, calls = fake_recipe
    compare = load_compare()
    out = tmp_path / "cmp"
    (out / "ce").mkdir(parents=True)
    lock = out / "ce" / "seed0.lock"
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
    (out / "ce" / "seed0").mkdir()
    (out / "ce" / "seed0" / "partial.bin").write_bytes(b"being written")  # the other invocation's running recipe
    argv = ["--methods", "ce", "--seeds", "0", "1", "--output_dir", str(out), "--launcher", launcher]
    compare.main(argv)
    assert [c[c.index("--seed") + 1] for c in calls()] == ["1"]
    assert f"is running it now (lock {out / 'ce' / 'seed0'}.lock); left to it" in capsys.readouterr().out
    assert (out / "ce" / "seed0" / "partial.bin").read_bytes() == b"being written"  # not moved aside
    assert not (out / "ce" / "superseded").exists() and lock.exists()
    assert not (out / "ce" / "seed1.lock").exists()  # ours is released

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": int(gone.stdout)}))
    compare.main(argv)
    assert [c[c.index("--seed") + 1] for c in calls()] == ["1", "0"]
    assert "which no longer runs; taking it over" in capsys.readouterr().out
    assert not lock.exists() and (out / "ce" / "seed0" / "metrics.json").is_file()

    lock.write_text(json.dumps({"host": "another-machine", "pid": 1}))  # a shared folder: never taken over
    (out / "ce" / "seed0" / "metrics.json").unlink()
    compare.main(argv)
    assert len(calls()) == 2 and "pid 1 on another-machine" in capsys.readouterr().out


def test_export_copies_what_rebuilds_the_table_and_nothing_else(tmp_path, fake_recipe, capsys):
    """--export: the table, its plots and each tabulated run's records, from which the same table is rebuilt; a later
    export replaces only what an export wrote; a folder with anything else in it is refused, untouched."""
    launcher, _ = fake_recipe
    compare = load_compare()
    out, dest = tmp_path / "cmp", tmp_path / "docs" / "clm"
    argv = ["--methods", "ce", "ls:0.1", "--seeds", "0", "1", "--output_dir", str(out), "--launcher", launcher]
    compare.main(argv + ["--export", str(dest)])
    (out / "ce" / "seed0" / "model.safetensors").write_bytes(b"weights")
    assert (dest / "results.md").read_text() == (out / "results.md").read_text()
    assert (dest / "training_curves.png").is_file() and not list(dest.rglob("model.safetensors"))
    for slug in ("ce", "ls0p1"):
        for seed in (0, 1):
            for name in ("metrics.json", "run.json", "log_history.json"):
                assert (dest / slug / f"seed{seed}" / name).read_bytes() == (out / slug / f"seed{seed}" / name).read_bytes()
    rebuilt = summarize(load_runs(dest), order=["CE", "LS 0.1"])
    assert to_markdown(rebuilt) == (dest / "results.md").read_text()
    # The per-run table travels with it: the fake recipe's eval_nll is 1 + alpha + 0.5 * seed.
    record = json.loads((dest / "EXPORTED.json").read_text())
    assert record["table"] == "results.md" and record["runs_table"] == "results_runs.md"
    per_run = (dest / "results_runs.md").read_text()
    assert per_run == (out / "results_runs.md").read_text() == runs_to_markdown(load_runs(dest), order=["CE", "LS 0.1"])
    assert [line.split(" | ")[:3] for line in per_run.splitlines()[2:]] == [
        ["| CE", "0", "1.0000"], ["| CE", "1", "1.5000"], ["| LS 0.1", "0", "1.1000"], ["| LS 0.1", "1", "1.6000"]]

    # Exporting a one-seed table to the same folder replaces the earlier export: no seed-1 run lingers.
    compare.main(argv[:4] + ["0"] + argv[6:] + ["--report_only", "--only_listed", "--export", str(dest)])
    assert sorted(p.parent.name for p in dest.glob("*/seed*/metrics.json")) == ["seed0", "seed0"]
    assert not (dest / "ce" / "seed1").exists()
    assert to_markdown(summarize(load_runs(dest), order=["CE", "LS 0.1"])) == (dest / "results.md").read_text()

    (dest / "notes.txt").write_text("mine")
    before = tree_bytes(dest)
    with pytest.raises(SystemExit, match=r"--export .* holds files an export did not write \(notes\.txt\)"):
        compare.main(argv + ["--report_only", "--export", str(dest)])
    assert tree_bytes(dest) == before


def test_report_only_listed_arms_and_seeds_under_a_name(tmp_path, fake_recipe, capsys):
    """A one-seed sweep shares the folder of a three-seed comparison: --only_listed --report_name tabulates just the
    sweep's arms at its seed, in files of its own, and names what is listed but not finished."""
    launcher, _ = fake_recipe
    compare = load_compare()
    out = tmp_path / "cmp"
    compare.main(["--methods", "ce", "ls:0.1", "--seeds", "0", "1", "--output_dir", str(out), "--launcher", launcher])
    compare.main(["--methods", "ls:0.2", "--seeds", "0", "--output_dir", str(out), "--launcher", launcher])
    capsys.readouterr()
    summary = compare.main(["--methods", "ce", "ls:0.1", "ls:0.2", "ls:0.3", "--seeds", "0", "--output_dir", str(out),
                            "--report_only", "--only_listed", "--report_name", "sweep"])
    assert summary["methods"] == ["CE", "LS 0.1", "LS 0.2"]
    # The fake recipe's eval_nll is 1 + alpha + 0.5 * seed: seed 0 only.
    assert [summary["cells"][m]["eval_nll"][:2] for m in summary["methods"]] == [
        (1.0, None), (pytest.approx(1.1), None), (pytest.approx(1.2), None)]
    assert (out / "sweep.md").read_text() == to_markdown(summary)
    assert (out / "sweep.csv").is_file() and (out / "sweep_training_curves.png").is_file()
    assert "not finished, left out of sweep.md: LS 0.3 seed 0" in capsys.readouterr().out
    assert "| 2 |" in (out / "results.md").read_text()  # the whole-folder table is untouched


@pytest.mark.parametrize("argv, message", [(["--jobs", "0"], "--jobs 0: give 1 or more"),
                                           (["--report_name", "../x"], "--report_name '../x'")])
def test_runner_bad_jobs_and_report_name(tmp_path, argv, message, capsys):
    with pytest.raises(SystemExit):
        load_compare().main(argv + ["--output_dir", str(tmp_path / "cmp")])
    assert message in capsys.readouterr().err


def test_distinct_output_share(tmp_path):
    from hf_smooth.demo.report import distinct_output_share

    path = tmp_path / "eval_predictions.jsonl"
    rows = [("a", "x"), ("b", "x"), ("c", "y"), ("a", "x"), ("d", "z")]  # 4 distinct sources, 3 distinct outputs
    path.write_text("".join(json.dumps({"source": s, "reference": "r", "hypothesis": h}) + "\n" for s, h in rows)
                    + "\n")
    assert distinct_output_share(path) == 3 / 4
    path.write_text(json.dumps({"text": "no source"}) + "\n")
    assert distinct_output_share(path) is None


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_runner_keys_a_finished_arm_by_its_recipe_command(tmp_path, fake_recipe, capsys):
    """A flag changed after `--` runs the arm again; the old run is moved aside untouched; the same command again
    reuses the new run; the run.json holds the exact command."""
    launcher, calls = fake_recipe
    compare = load_compare()
    out = tmp_path / "cmp"
    base = ["--methods", "ls:0.1", "--seeds", "0", "--output_dir", str(out), "--launcher", launcher, "--"]
    compare.main(base + ["--max_steps", "3"])
    run_dir = out / "ls0p1" / "seed0"
    record = json.loads((run_dir / "run.json").read_text())
    first_command = calls()[0]
    assert record["command"] == shlex.split(launcher) + first_command
    assert record["recipe_command"] == ["clm.py", *first_command[3:]]
    assert record["recipe_command"][-2:] == ["--max_steps", "3"] and record["launcher"] == launcher
    assert "fake recipe running 0" in (run_dir / "stdout.log").read_text()
    old = tree_bytes(run_dir)
    capsys.readouterr()

    compare.main(base + ["--max_steps", "4"])
    assert len(calls()) == 2 and calls()[1][-2:] == ["--max_steps", "4"]
    printed = capsys.readouterr().out
    assert "--max_steps 3" in printed and "--max_steps 4" in printed and "running again" in printed
    (moved,) = (out / "ls0p1" / "superseded").iterdir()
    assert moved.name.startswith("seed0-") and tree_bytes(moved) == old  # nothing of the old run lost
    assert json.loads((run_dir / "run.json").read_text())["recipe_command"][-2:] == ["--max_steps", "4"]
    assert [run.path for run in load_runs(out)] == [run_dir]  # the report never reads the superseded run

    compare.main(base + ["--max_steps", "4"])
    assert len(calls()) == 2
    assert "done already, skipping" in capsys.readouterr().out

    # Same flags in another order are another command: it runs again.
    compare.main(base + ["--max_steps", "4", "--learning_rate", "1e-3"])
    compare.main(base + ["--learning_rate", "1e-3", "--max_steps", "4"])
    assert len(calls()) == 4 and len(list((out / "ls0p1" / "superseded").iterdir())) == 3


@pytest.mark.parametrize(
    "damage, name, phrase, report_stops",
    [
        (lambda p: p.write_text('{"eval_nll": 1.0, "eval_acc'), "metrics.json", "is not valid JSON", True),
        (lambda p: p.write_text(""), "metrics.json", "is not valid JSON", True),
        (lambda p: p.write_text("[1, 2]"), "metrics.json", "holds list, not a JSON object", True),
        (lambda p: p.write_text('{"method": "LS'), "run.json", "is not valid JSON", True),
        (lambda p: p.unlink(), "run.json", "does not exist", False),
        (lambda p: p.write_text('{"method": "LS 0.1", "seed": 1}'), "run.json", "does not record the recipe command",
         False),
    ],
    ids=["metrics-truncated", "metrics-empty", "metrics-list", "run-truncated", "run-missing", "run-old"],
)
def test_runner_reruns_a_damaged_arm_and_names_the_file(tmp_path, fake_recipe, capsys, damage, name, phrase,
                                                        report_stops):
    launcher, calls = fake_recipe
    compare = load_compare()
    out = tmp_path / "cmp"
    argv = ["--methods", "ls:0.1", "--seeds", "0", "1", "--output_dir", str(out), "--launcher", launcher]
    compare.main(argv)
    damaged = out / "ls0p1" / "seed1"
    damage(damaged / name)
    capsys.readouterr()

    if report_stops:  # --report_only names the file instead of a traceback
        with pytest.raises(SystemExit) as stopped:
            compare.main(argv + ["--report_only"])
        assert f"{damaged / name} {phrase}" in str(stopped.value)
    else:  # the report reads it as before (run.json is optional there)
        compare.main(argv + ["--report_only"])
    compare.main(argv)
    printed = capsys.readouterr().out
    assert f"{damaged / name} {phrase}" in printed and "running again" in printed
    assert [c[c.index("--seed") + 1] for c in calls()] == ["0", "1", "1"]  # only the damaged arm ran again
    assert json.loads((damaged / "metrics.json").read_text())["eval_nll"] == pytest.approx(1.1 + 0.5)


def test_runner_keeps_the_log_of_an_interrupted_run(tmp_path, fake_recipe, capsys):
    """A run killed before it finished leaves `<seed>.log` beside its folder; the next invocation moves it under
    superseded/ before the new attempt writes its own."""
    launcher, calls = fake_recipe
    out = tmp_path / "cmp"
    (out / "ce" / "seed0").mkdir(parents=True)
    (out / "ce" / "seed0" / "checkpoint-10.bin").write_bytes(b"half a run")
    (out / "ce" / "seed0.log").write_text("step 10 of 1800, then killed")
    load_compare().main(["--methods", "ce", "--seeds", "0", "--output_dir", str(out), "--launcher", launcher])
    assert len(calls()) == 1 and (out / "ce" / "seed0" / "metrics.json").is_file()
    moved = sorted((out / "ce" / "superseded").iterdir())
    assert [p.suffix for p in moved] == ["", ".log"]
    assert (moved[0] / "checkpoint-10.bin").read_bytes() == b"half a run"
    assert moved[1].read_text() == "step 10 of 1800, then killed"
    assert "the log of an earlier, unfinished attempt is now" in capsys.readouterr().out
    assert not (out / "ce" / "seed0.log").exists()


def test_runner_recipe_that_writes_no_metrics(tmp_path, fake_recipe, monkeypatch):
    launcher, _ = fake_recipe
    monkeypatch.setenv("FAKE_RECIPE_NO_METRICS", "1")
    out = tmp_path / "cmp"
    with pytest.raises(SystemExit, match=r"exited 0 but .*seed0/metrics\.json does not exist"):
        load_compare().main(["--methods", "ce", "--seeds", "0", "--output_dir", str(out), "--launcher", launcher])
    assert not (out / "ce" / "seed0" / "run.json").exists()  # not recorded as finished


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--methods", "ls:0.1", "ls:0.10"], "same arm twice"),
        (["--methods", "ls"], "give the strength"),
        (["--seeds", "0", "0"], "repeats a seed"),
        (["--report_only"], "No finished runs"),
    ],
)
def test_runner_bad_input(tmp_path, argv, message):
    with pytest.raises(SystemExit, match=message):
        load_compare().main(argv + ["--output_dir", str(tmp_path / "empty")])


@pytest.mark.parametrize(
    "launcher, message",
    [
        ("no-such-launcher-xyz launch --config_file a.yaml",
         r"--launcher .*'no-such-launcher-xyz' is not an executable"),
        ("/nonexistent/bin/accelerate launch", r"--launcher .*'/nonexistent/bin/accelerate' is not an executable"),
        ("", "--launcher is empty"),
        ("accelerate launch --config_file 'a.yaml", "--launcher .*check its quotes"),
    ],
)
def test_runner_launcher_that_cannot_start(tmp_path, fake_recipe, launcher, message):
    _, calls = fake_recipe
    out = tmp_path / "cmp"
    with pytest.raises(SystemExit) as stopped:
        load_compare().main(["--methods", "ce", "--seeds", "0", "--output_dir", str(out), "--launcher", launcher])
    text = str(stopped.value)
    assert re.search(message, text) and "\n" not in text  # one line, naming the flag
    assert calls() == [] and not out.exists()  # before anything ran or was written


def test_runner_launcher_not_executable_file(tmp_path, fake_recipe):
    _, calls = fake_recipe
    script = tmp_path / "launch.sh"
    script.write_text("#!/bin/sh\nexec \"$@\"\n")  # exists, but lacks the executable bit
    with pytest.raises(SystemExit, match=r"--launcher .*launch\.sh' is not an executable"):
        load_compare().main(["--seeds", "0", "--output_dir", str(tmp_path / "cmp"), "--launcher", str(script)])
    assert calls() == []


# ---- end to end on the real translation recipe --------------------------------------------------------------------

# Embedded Marian built from a config, with sizes that make one run a few seconds: 3 optimizer steps, greedy
# generation of at most 16 tokens over 16 held-out pairs.
TINY_TRANSLATION = [
    "--embedded_d_model", "32", "--embedded_layers", "1", "--embedded_vocab_size", "300",
    "--max_steps", "3", "--max_train_samples", "64", "--max_eval_samples", "16",
    "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "16",
    "--generation_num_beams", "1", "--generation_max_length", "16", "--logging_steps", "1", "--warmup_steps", "0",
]


def check_png(path: Path) -> None:
    assert path.is_file(), path
    assert path.stat().st_size > 5_000, path
    image = matplotlib.image.imread(path)
    assert float(image[..., :3].std()) > 0.05, path  # something was drawn


def test_compare_translation_two_methods_two_seeds(tmp_path, capsys):
    compare = load_compare()
    out = tmp_path / "cmp"
    argv = ["--task", "translation", "--methods", "ls:0.1", "maxsup:0.1", "--seeds", "0", "1",
            "--output_dir", str(out), "--", *TINY_TRANSLATION]
    compare.main(argv)

    # The independent computation: statistics.mean / statistics.stdev over the metrics.json files.
    metrics = {
        (method, seed): json.loads((out / slug / f"seed{seed}" / "metrics.json").read_text())
        for method, slug in (("LS 0.1", "ls0p1"), ("MaxSup 0.1", "maxsup0p1"))
        for seed in (0, 1)
    }
    for (method, seed), m in metrics.items():
        assert m["seed"] == seed and m["smoothing_alpha"] == 0.1
        assert m["smoothing_method"] == {"LS 0.1": "label_smoothing", "MaxSup 0.1": "maxsup"}[method]
    for (method, seed), m in metrics.items():  # computed here from the predictions file, as a translator would
        slug = {"LS 0.1": "ls0p1", "MaxSup 0.1": "maxsup0p1"}[method]
        with open(out / slug / f"seed{seed}" / "eval_predictions.jsonl") as lines:
            rows = [json.loads(line) for line in lines]
        assert len(rows) == 16
        m["eval_distinct_outputs"] = len({r["hypothesis"] for r in rows}) / len({r["source"] for r in rows})
    keys = ["eval_nll", "eval_ppl", "eval_mean_token_accuracy", "eval_ece", "eval_ece_adaptive", "eval_confidence",
            "eval_brier", "eval_entropy", "eval_logit_gap", "eval_bleu", "eval_chrf", "eval_distinct_outputs"]
    for key in keys:
        assert all(isinstance(m.get(key), float) and math.isfinite(m[key]) for m in metrics.values()), key

    rows = list(csv.DictReader(io.StringIO((out / "results.csv").read_text())))
    assert [row["method"] for row in rows] == ["LS 0.1", "MaxSup 0.1"]
    md_lines = (out / "results.md").read_text().splitlines()
    header = [c.strip() for c in md_lines[0].strip("|").split("|")]
    titles = {key: title for key, title, _ in DEFAULT_METRICS}
    assert header == ["method", "runs"] + [titles[k] for k in keys]  # methods x metrics, in the report's order
    assert len(md_lines) == 2 + 2
    for row, line in zip(rows, md_lines[2:]):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[:2] == [row["method"], "2"]
        for key, cell in zip(keys, cells[2:]):
            values = [metrics[(row["method"], seed)][key] for seed in (0, 1)]
            mean, sd = statistics.mean(values), statistics.stdev(values)
            assert float(row[f"{key}_mean"]) == pytest.approx(mean, rel=1e-12, abs=1e-12), key
            assert float(row[f"{key}_sd"]) == pytest.approx(sd, rel=1e-9, abs=1e-12), key
            assert row[f"{key}_n"] == "2"
            # The Markdown shows the same numbers as the CSV, rounded to 4 decimals.
            assert cell == f"{float(row[f'{key}_mean']):.4f} ± {float(row[f'{key}_sd']):.4f}", key
    for name in ("reliability.png", "logit_gaps.png", "training_curves.png"):
        check_png(out / name)

    # Resumable: a second invocation with a launcher that would fail any run must not start one.
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/seed*/metrics.json")}
    assert len(stamps) == 4
    capsys.readouterr()
    refuse = f"{shlex.quote(sys.executable)} -c 'raise SystemExit(9)'"
    cut = argv.index("--")
    compare.main(argv[:cut] + ["--launcher", refuse] + argv[cut:])  # the same recipe commands
    printed = capsys.readouterr().out
    assert printed.count("done already, skipping") == 4
    assert printed.count("done already under --launcher None") == 4  # the launcher change is reported
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/seed*/metrics.json")} == stamps


def test_to_markdown_escapes_pipes(hand_runs):
    summary = summarize(load_runs(hand_runs), metrics=[("eval_nll", "share |z| < 0.01", True)], order=["CE"])
    header = to_markdown(summary).splitlines()[0]
    assert header == "| method | runs | share \\|z\\| < 0.01 |"
