"""The notebooks: committed without outputs, and they execute top to bottom (nbclient, this interpreter's kernel).

Each notebook checks its own claims with `assert`s (hf_smooth's NLL against F.cross_entropy, LS against PyTorch's
label_smoothing, MaxSup against CE + alpha * (z_max - mean z), LS and MaxSup penalties equal on a right prediction),
so a wrong number fails the run as an error. Here: no cell errors, and the PNGs each notebook promises exist, are
real images and are not blank. Every notebook runs in its own temporary working directory.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import matplotlib.image
import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
QUICKSTART = NOTEBOOKS / "01_quickstart.ipynb"
LS_VS_MAXSUP = NOTEBOOKS / "02_ls_vs_maxsup.ipynb"


def kernel_name() -> str:
    """'python3' must start this interpreter (jupyter_client swaps a spec's bare `python` for sys.executable)."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        spec = KernelSpecManager().get_kernel_spec("python3")
    except NoSuchKernel:
        from ipykernel.kernelspec import install

        install(prefix=sys.prefix)  # into this virtual environment, never the user's Jupyter folders
        spec = KernelSpecManager().get_kernel_spec("python3")
    assert Path(spec.argv[0]).name.startswith("python"), spec.argv
    return "python3"


def gettext_pairs_available() -> bool:
    try:
        from hf_smooth.demo.assets import gettext_pairs

        return len(gettext_pairs(source_lang="en", target_lang="de")) > 100
    except (ImportError, FileNotFoundError):
        return False


pytestmark = pytest.mark.usefixtures("offline_env")  # the kernel inherits this environment


def execute(path: Path, workdir: Path):
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        notebook, kernel_name=kernel_name(), timeout=900, resources={"metadata": {"path": str(workdir)}}
    )
    client.execute()  # raises CellExecutionError, naming the cell, on the first error
    errors = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    return notebook


def outputs_text(notebook) -> str:
    parts = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            if output.output_type == "stream":
                parts.append(output.text)
            for mime in ("text/plain", "text/markdown"):
                if mime in output.get("data", {}):
                    parts.append(output["data"][mime])
    return "\n".join(parts)


def check_png(path: Path) -> None:
    assert path.is_file(), f"{path.name} was not written"
    assert path.stat().st_size > 5_000, path
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and min(image.shape[:2]) >= 200, (path, image.shape)
    assert float(image[..., :3].std()) > 0.05, f"{path.name} looks blank"


@pytest.mark.parametrize("path", [QUICKSTART, LS_VS_MAXSUP], ids=lambda p: p.name)
def test_committed_without_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code, "no code cells"
    for cell in code:
        assert cell.outputs == [] and cell.execution_count is None, "clear the outputs before committing"
    assert notebook.metadata.kernelspec.name == "python3"


def test_quickstart_executes(tmp_path):
    notebook = execute(QUICKSTART, tmp_path)
    check_png(tmp_path / "quickstart_reliability.png")
    text = outputs_text(notebook)
    for expected in ("eval_nll", "eval_ece", "NLL by hand", "label_smoothing_loss", "maxsup_loss"):
        assert expected in text, expected
    images = [o for c in notebook.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 1  # the reliability diagram is shown inline too


@pytest.mark.skipif(not gettext_pairs_available(), reason="embedded translation pairs need plone.app.locales + polib")
def test_ls_vs_maxsup_executes_standalone_then_from_a_comparison_dir(tmp_path, monkeypatch):
    # 1. HF_SMOOTH_COMPARE_DIR unset: the notebook runs its own tiny comparison through recipes/compare.py.
    monkeypatch.delenv("HF_SMOOTH_COMPARE_DIR", raising=False)
    first = tmp_path / "standalone"
    first.mkdir()
    notebook = execute(LS_VS_MAXSUP, first)
    runs = first / "ls_vs_maxsup_runs"
    for slug in ("ce", "ls0p1", "maxsup0p1-0p2"):
        metrics = json.loads((runs / slug / "seed0" / "metrics.json").read_text())
        assert metrics["task"] == "translation"
        assert (runs / slug / "seed0" / "diagnostics.json").is_file()
    names = ["ls_vs_maxsup_reliability.png", "ls_vs_maxsup_logit_gaps.png", "ls_vs_maxsup_training_curves.png"]
    names += [f"ls_vs_maxsup_reliability_{i}.png" for i in range(3)]  # one bar diagram per method
    for name in names:
        check_png(first / name)
    text = outputs_text(notebook)
    for method in ("| CE | 1 |", "| LS 0.1 | 1 |", "| MaxSup 0.1->0.2 | 1 |"):
        assert text.count(method) == 2, method  # in the results table and in the logit-statistics table

    # 2. HF_SMOOTH_COMPARE_DIR set: it only reads that directory (nothing is run, nothing written there).
    monkeypatch.setenv("HF_SMOOTH_COMPARE_DIR", str(runs))
    before = sorted((p, p.stat().st_mtime_ns) for p in runs.rglob("*") if p.is_file())
    second = tmp_path / "from_dir"
    second.mkdir()
    notebook = execute(LS_VS_MAXSUP, second)
    assert not (second / "ls_vs_maxsup_runs").exists()
    assert "Reading the comparison in" in outputs_text(notebook)
    for name in names:
        check_png(second / name)
    assert sorted((p, p.stat().st_mtime_ns) for p in runs.rglob("*") if p.is_file()) == before


def test_ls_vs_maxsup_rejects_a_missing_comparison_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_SMOOTH_COMPARE_DIR", str(tmp_path / "no-such-dir"))
    with pytest.raises(nbclient.exceptions.CellExecutionError, match="is not a directory"):
        execute(LS_VS_MAXSUP, tmp_path)
    assert os.listdir(tmp_path) == []  # stopped before running or writing anything
