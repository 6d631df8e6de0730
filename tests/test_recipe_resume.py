"""The recipes never lose work (issue 11): interrupt and resume, save before evaluation, refuse or overwrite an existing
--output_dir, and the HF example-script outputs.

The reference for every resume test is an uninterrupted run of the same length with the same flags: the resumed run
must end with the same weights (torch.allclose on the saved files) and the same logged loss curve, step by step.
Fast tests interrupt in-process (a SIGINT sent to this process from inside a training step); the slow ones run each
recipe as a real subprocess, poll its log_history.json and send SIGINT from outside, as Ctrl-C would.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import recipe_data  # noqa: E402
from test_recipes import RECIPES, ROOT, load_recipe  # noqa: E402

# Every step logged, so the curves can be compared step by step; no warmup so the learning rate is not ~0.
STEPS = ["--warmup_steps", "0", "--logging_steps", "1", "--seed", "0", "--dataloader_pin_memory", "false"]


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
def translation_files(tmp_path_factory):
    return recipe_data.write_translation_files(tmp_path_factory.mktemp("pairs"), train=160, validation=21)


def clm_argv(llama_dir, text_files, out: Path, max_steps: int) -> list[str]:
    """LoRA (dropout 0.05, so the RNG state matters) + MaxSup ramped 0.1 -> 0.2 (so alpha depends on the step)."""
    return [
        "--model_name_or_path", str(llama_dir), "--train_file", str(text_files[0]),
        "--validation_file", str(text_files[1]), "--block_size", "32", "--smoothing_method", "maxsup",
        "--smoothing_alpha", "0.1", "--smoothing_schedule", "linear", "--smoothing_alpha_end", "0.2",
        "--max_steps", str(max_steps), "--per_device_train_batch_size", "4", "--max_eval_samples", "4",
        "--output_dir", str(out), *STEPS,
    ]


def translation_argv(translation_files, out: Path, max_steps: int) -> list[str]:
    """Embedded Marian (dropout 0.1) with the recipe's default length-grouped sampler; 16 pairs in batches of 4 make
    4 steps per epoch, so a run of 10 steps crosses two epoch boundaries."""
    train_file, dev_file, _ = translation_files
    return [
        "--train_file", str(train_file), "--validation_file", str(dev_file), "--embedded_d_model", "32",
        "--embedded_layers", "1", "--embedded_vocab_size", "300", "--max_train_samples", "16",
        "--max_eval_samples", "4", "--generation_num_beams", "1", "--generation_max_length", "8",
        "--learning_rate", "3e-3", "--max_steps", str(max_steps), "--per_device_train_batch_size", "4",
        "--output_dir", str(out), *STEPS,
    ]


# ---- what two runs are compared on ----------------------------------------------------------------------------------


def train_curve(out: Path) -> list[tuple]:
    """(step, loss, nll, alpha) of every training log in log_history.json."""
    history = json.loads((out / "log_history.json").read_text())
    return [(log["step"], log["loss"], log["nll"], log["smoothing_alpha"]) for log in history if "nll" in log]


def saved_weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    name = "adapter_model.safetensors" if (out / "adapter_model.safetensors").is_file() else "model.safetensors"
    return load_file(out / name)


def assert_same_run(resumed: Path, reference: Path, steps: int) -> None:
    curve, expected = train_curve(resumed), train_curve(reference)
    assert [row[0] for row in expected] == list(range(1, steps + 1))
    assert [row[0] for row in curve] == [row[0] for row in expected]
    for got, want in zip(curve, expected):
        assert got[1:] == pytest.approx(want[1:], rel=1e-5, abs=1e-7), (got, want)
    weights, reference_weights = saved_weights(resumed), saved_weights(reference)
    assert weights.keys() == reference_weights.keys() and weights
    for key, value in reference_weights.items():
        assert torch.allclose(weights[key], value, rtol=1e-5, atol=1e-7), key
    metrics, reference_metrics = (json.loads((d / "metrics.json").read_text()) for d in (resumed, reference))
    assert metrics["global_step"] == reference_metrics["global_step"] == steps
    for key in ("train_nll", "train_objective", "eval_nll", "eval_loss"):
        assert metrics[key] == pytest.approx(reference_metrics[key], rel=1e-5), key


# ---- in-process interrupt and resume (fast) -------------------------------------------------------------------------


def interrupt_during_step(monkeypatch, trainer_class, step: int) -> None:
    """Send SIGINT to this process once, from inside optimizer step `step` (1-based), as Ctrl-C would."""
    original = trainer_class.training_step
    sent = []

    def training_step(self, *args, **kwargs):
        if self.state.global_step == step - 1 and not sent:
            sent.append(step)
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(trainer_class, "training_step", training_step)


def run_interrupted(recipe, argv, monkeypatch, capsys, trainer_class, step: int) -> str:
    with monkeypatch.context() as patch:
        interrupt_during_step(patch, trainer_class, step)
        with pytest.raises(SystemExit) as raised:
            recipe.main(argv)
    assert raised.value.code == 128 + signal.SIGINT
    return capsys.readouterr().err


def check_interrupted_dir(out: Path, step: int) -> None:
    """What an interrupt leaves: a checkpoint of that step, a loadable model or adapter, the log so far, no metrics."""
    assert (out / f"checkpoint-{step}" / "trainer_state.json").is_file()
    assert (out / f"checkpoint-{step}" / "optimizer.pt").is_file()
    assert saved_weights(out)
    assert (out / "tokenizer.json").is_file() and (out / "trainer_state.json").is_file()
    assert [row[0] for row in train_curve(out)] == list(range(1, step + 1))
    assert not (out / "metrics.json").exists()  # compare.py counts a run as finished by its metrics.json


def test_clm_lora_interrupt_and_resume_in_process(llama_dir, text_files, tmp_path, monkeypatch, capsys):
    clm = load_recipe("clm")
    steps = 6
    reference, out = tmp_path / "reference", tmp_path / "out"
    clm.main(clm_argv(llama_dir, text_files, reference, steps))

    err = run_interrupted(clm, clm_argv(llama_dir, text_files, out, steps), monkeypatch, capsys, clm.ClmTrainer, 3)
    assert "Interrupted by SIGINT at step 3 of 6" in err and "--resume_from_checkpoint true" in err
    check_interrupted_dir(out, 3)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), out)  # loadable as it stands

    clm.main(clm_argv(llama_dir, text_files, out, steps) + ["--resume_from_checkpoint", "true"])
    assert_same_run(out, reference, steps)


def test_translation_interrupt_and_resume_across_epochs_in_process(translation_files, tmp_path, monkeypatch, capsys):
    translation = load_recipe("translation")
    steps = 10
    reference, out = tmp_path / "reference", tmp_path / "out"
    translation.main(translation_argv(translation_files, reference, steps))

    run_interrupted(translation, translation_argv(translation_files, out, steps), monkeypatch, capsys,
                    translation.TranslationTrainer, 6)  # in the second epoch
    check_interrupted_dir(out, 6)
    translation.main(translation_argv(translation_files, out, steps) + ["--resume_from_checkpoint", "true"])
    assert_same_run(out, reference, steps)
