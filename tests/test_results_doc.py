"""docs/results.md holds no hand-typed table: each comparison table in it is a table that `recipes/compare.py --export`
wrote under docs/results/<name>/, and each exported table is rebuilt here from the exported runs' own metrics.json
(and eval_predictions.jsonl, for the distinct-outputs column)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hf_smooth.demo.report import load_runs, runs_to_markdown, summarize, to_markdown

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "results.md"
EXPORTS = sorted(path.parent for path in (ROOT / "docs" / "results").glob("*/EXPORTED.json"))


def exported_table(folder: Path) -> str:
    record = json.loads((folder / "EXPORTED.json").read_text())
    return (folder / record["table"]).read_text()


def exported_runs_table(folder: Path) -> str | None:
    """The export's one-row-per-run table (exports written before it existed have none)."""
    record = json.loads((folder / "EXPORTED.json").read_text())
    return (folder / record["runs_table"]).read_text() if "runs_table" in record else None


def tables_in(text: str) -> list[str]:
    """Every Markdown table of the report's shapes (header `| method | runs | ...` or, one row per run,
    `| method | seed | ...`) in `text`, whole."""
    tables, current = [], None
    for line in text.splitlines():
        if line.startswith(("| method | runs |", "| method | seed |")):
            current = [line]
        elif current is not None and line.startswith("|"):
            current.append(line)
        elif current is not None:
            tables.append("\n".join(current) + "\n")
            current = None
    if current is not None:
        tables.append("\n".join(current) + "\n")
    return tables


def test_there_are_exported_comparisons():
    assert EXPORTS, "docs/results/ has no folder written by recipes/compare.py --export"


@pytest.mark.parametrize("folder", EXPORTS, ids=[folder.name for folder in EXPORTS])
def test_exported_table_is_rebuilt_from_its_runs(folder):
    record = json.loads((folder / "EXPORTED.json").read_text())
    missing = [name for name in record["files"] if not (folder / name).is_file()]
    assert not missing, missing
    table = exported_table(folder)
    order = [line.split("|")[1].strip() for line in table.splitlines()[2:]]
    runs = load_runs(folder)
    assert runs and all((run.path / "run.json").is_file() for run in runs)
    assert to_markdown(summarize(runs, order=order)) == table
    per_run = exported_runs_table(folder)
    if per_run is not None:
        assert runs_to_markdown(runs, order=order) == per_run


def test_every_table_in_the_doc_is_an_exported_one():
    text = DOC.read_text()
    exported = {exported_table(folder) for folder in EXPORTS} | {
        table for table in map(exported_runs_table, EXPORTS) if table is not None}
    found = tables_in(text)
    assert found, "docs/results.md has no comparison table"
    typed = [table.splitlines()[0] for table in found if table not in exported]
    assert not typed, f"tables in docs/results.md that no export wrote: {typed}"
    for folder in EXPORTS:
        assert exported_table(folder) in text, f"docs/results.md does not show {folder.name}'s table"


def test_the_doc_is_its_template_with_the_exported_tables():
    """docs/results.md is what docs/build_results.py writes from docs/results_template.md and the exports: an edit to
    the page alone, or an export not rebuilt into it, fails here."""
    result = subprocess.run([sys.executable, str(ROOT / "docs" / "build_results.py"), "--check"], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr
