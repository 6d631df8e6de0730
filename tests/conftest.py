"""Fixtures shared by several test modules: the tiny model directory and data files of the recipe tests
(tests/test_recipes.py, tests/test_recipe_resume.py; built by tests/recipe_data.py), a guard that no run reaches
training, and the environment a test module asks for with `pytestmark = pytest.mark.usefixtures(...)`
(`offline_env`, `one_thread`). Module-scoped fixtures are built once per module that asks for them.
"""

from __future__ import annotations

import os

import pytest
import recipe_data
import torch

# The recipes are imported in-process: no hub access, no tokenizer threads, no display (as the recipes' subprocesses
# get from recipe_helpers.recipe_env).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(scope="module")
def corpus():
    return recipe_data.english_lines(360)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, corpus):
    return recipe_data.write_tiny_llama_dir(tmp_path_factory.mktemp("llama") / "model", corpus)


@pytest.fixture(scope="module")
def text_files(tmp_path_factory, corpus):
    root = tmp_path_factory.mktemp("text")
    return (recipe_data.write_lines(root / "train.txt", corpus[:300]),
            recipe_data.write_lines(root / "dev.txt", corpus[300:330]))


@pytest.fixture(scope="module")
def instruction_files(tmp_path_factory, corpus):
    root = tmp_path_factory.mktemp("instructions")
    train = recipe_data.write_jsonl(root / "train.jsonl", recipe_data.instruction_rows(corpus[:120]))
    dev = recipe_data.write_jsonl(root / "dev.jsonl", recipe_data.instruction_rows(corpus[330:342]))
    return train, dev


@pytest.fixture(scope="module")
def translation_files(tmp_path_factory):
    return recipe_data.write_translation_files(tmp_path_factory.mktemp("pairs"), train=160, validation=21)


@pytest.fixture
def no_training(monkeypatch):
    """Fail loudly if a run reaches Trainer.train: the checks under test must stop it before."""
    from transformers import Trainer

    def refuse(*args, **kwargs):
        raise AssertionError("training started although the run had to be refused before it")

    monkeypatch.setattr(Trainer, "train", refuse)


@pytest.fixture
def offline_env(monkeypatch):
    """Offline, no tokenizer threads, no display, for the test and every process it starts (a recipe, a kernel)."""
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.setenv("MPLBACKEND", "Agg")


@pytest.fixture
def one_thread():
    """torch on one intra-op thread during the test: tiny tensors on 2 shared cores, where threads only add
    contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
