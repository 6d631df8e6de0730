"""What the recipe tests (tests/test_recipes.py, tests/test_recipe_resume.py) share: where the recipes are, loading a
recipe script as a module, the environment of a recipe run as a subprocess, and the check of a refused run.

Their tiny model directory and data files are fixtures in tests/conftest.py, built by tests/recipe_data.py.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
CONFIGS = RECIPES / "configs"
# `accelerate launch` with the shipped 2-process CPU config, before the script and its arguments.
CPU_2PROC_LAUNCH = [
    sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "cpu_2proc.yaml"),
]


def load_recipe(name: str):
    """Import recipes/<name>.py under a private module name (recipes/ is not a package)."""
    module_name = f"_recipe_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, RECIPES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:
        return False


def recipe_env() -> dict:
    """This environment, offline, one thread per process (a recipe run as a subprocess); without
    ACCELERATE_USE_CPU, so that a recipe must find out by itself that there is no GPU."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "MPLBACKEND": "Agg"}
    env.pop("ACCELERATE_USE_CPU", None)
    return env


def recipe_error(recipe, argv: list[str], capsys) -> str:
    """Run a recipe that must refuse its input: exit status 2 and exactly one line `error: ...` on stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as raised:
        recipe.main(argv)
    err = capsys.readouterr().err
    assert raised.value.code == 2, (raised.value.code, err[-2000:])
    assert "usage:" not in err, err[-2000:]
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err[-2000:]
    return lines[0]
