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
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from recipe_helpers import CPU_2PROC_LAUNCH, RECIPES, ROOT, load_recipe, recipe_env, recipe_error

# Every step logged, so the curves can be compared step by step; no warmup so the learning rate is not ~0.
STEPS = ["--warmup_steps", "0", "--logging_steps", "1", "--seed", "0", "--dataloader_pin_memory", "false"]


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


def interrupt_during_step(monkeypatch, trainer_class, step: int, signum: int = signal.SIGINT, times: int = 1) -> None:
    """Send `signum` to this process `times` times from inside optimizer step `step` (1-based), as Ctrl-C would."""
    original = trainer_class.training_step
    sent = []

    def training_step(self, *args, **kwargs):
        if self.state.global_step == step - 1 and not sent:
            sent.append(step)
            for _ in range(times):
                os.kill(os.getpid(), signum)
                time.sleep(0.05)  # let the handler run before the next one
        return original(self, *args, **kwargs)

    monkeypatch.setattr(trainer_class, "training_step", training_step)


def run_interrupted(recipe, argv, monkeypatch, capsys, trainer_class, step: int, signum=signal.SIGINT) -> str:
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with monkeypatch.context() as patch:
        interrupt_during_step(patch, trainer_class, step, signum)
        with pytest.raises(SystemExit) as raised:
            recipe.main(argv)
    assert raised.value.code == 128 + signum
    assert {s: signal.getsignal(s) for s in handlers} == handlers  # the recipe's handlers are gone again
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

    err = run_interrupted(translation, translation_argv(translation_files, out, steps), monkeypatch, capsys,
                          translation.TranslationTrainer, 6, signal.SIGTERM)  # in the second epoch
    assert "Interrupted by SIGTERM at step 6 of 10" in err
    check_interrupted_dir(out, 6)
    translation.main(translation_argv(translation_files, out, steps) + ["--resume_from_checkpoint", "true"])
    assert_same_run(out, reference, steps)


def test_resume_from_a_checkpoint_path_full_weights(llama_dir, text_files, tmp_path):
    """--resume_from_checkpoint <path> from a --save_strategy steps run, into another folder, all weights: same end,
    and the checkpoints go on numbering from the resumed step."""
    clm = load_recipe("clm")
    reference, out = tmp_path / "reference", tmp_path / "out"
    full = ["--use_lora", "false", "--learning_rate", "1e-3", "--save_strategy", "steps", "--save_steps", "3"]
    clm.main(clm_argv(llama_dir, text_files, reference, 6) + full)
    assert (reference / "checkpoint-3").is_dir() and (reference / "checkpoint-6").is_dir()
    clm.main(clm_argv(llama_dir, text_files, out, 6) + full
             + ["--resume_from_checkpoint", str(reference / "checkpoint-3")])
    assert_same_run(out, reference, 6)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-6"]


def test_second_ctrl_c_aborts_without_saving(llama_dir, text_files, tmp_path, monkeypatch):
    """Ctrl-C twice: Python's KeyboardInterrupt, no checkpoint; the log of the steps already done is on disk."""
    clm = load_recipe("clm")
    out = tmp_path / "out"
    interrupt_during_step(monkeypatch, clm.ClmTrainer, 2, times=2)
    with pytest.raises(KeyboardInterrupt):
        clm.main(clm_argv(llama_dir, text_files, out, 6))
    assert not list(out.glob("checkpoint-*"))
    assert [row[0] for row in train_curve(out)] == [1]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_failed_evaluation_leaves_the_trained_model(llama_dir, text_files, tmp_path, monkeypatch, capsys):
    """An exception in evaluation: the adapter, tokenizer, trainer_state.json, train_results.json and the log are
    already saved, and stderr says so."""
    clm = load_recipe("clm")
    out = tmp_path / "out"

    def broken(self, *args, **kwargs):
        raise RuntimeError("evaluation broke")

    monkeypatch.setattr(clm.ClmTrainer, "evaluate", broken)
    with pytest.raises(RuntimeError, match="evaluation broke"):
        clm.main(clm_argv(llama_dir, text_files, out, 3))
    assert "the trained model, trainer_state.json and log_history.json are saved in" in capsys.readouterr().err
    for name in ("adapter_config.json", "tokenizer.json", "trainer_state.json", "train_results.json"):
        assert (out / name).is_file(), name
    assert not (out / "metrics.json").exists()
    adapter = saved_weights(out)
    lora_b = [value for key, value in adapter.items() if "lora_B" in key]
    assert lora_b and all(value.abs().max() > 0 for value in lora_b)  # B starts at zero: these are trained weights
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 3
    assert [row[0] for row in train_curve(out)] == [1, 2, 3]


# ---- an existing --output_dir ---------------------------------------------------------------------------------------


def test_non_empty_output_dir_is_refused(llama_dir, text_files, tmp_path, capsys, no_training):
    clm = load_recipe("clm")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_bytes(b"mine\n")
    line = recipe_error(clm, clm_argv(llama_dir, text_files, out, 3), capsys)
    assert f"--output_dir {out} is not empty (notes.txt)" in line and "--overwrite_output_dir true" in line
    assert "--resume_from_checkpoint" not in line  # nothing to resume from
    (out / "checkpoint-3").mkdir()
    line = recipe_error(clm, clm_argv(llama_dir, text_files, out, 3), capsys)
    assert "--resume_from_checkpoint true to continue from checkpoint-3" in line
    assert (out / "notes.txt").read_bytes() == b"mine\n"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--resume_from_checkpoint", "true"], "no checkpoint-<step> folder in --output_dir"),
        (["--resume_from_checkpoint", "{tmp}/nowhere"], "nowhere: no such directory"),
        (["--resume_from_checkpoint", "{tmp}/half"], "is not a complete Trainer checkpoint (no trainer_state.json"),
        (["--output_dir", "{tmp}/run", "--resume_from_checkpoint", "true", "--overwrite_output_dir", "true"],
         "would delete {tmp}/run/checkpoint-2, which --resume_from_checkpoint continues from: give only one"),
        (["--output_dir", "{tmp}/run", "--resume_from_checkpoint", "{tmp}/run/checkpoint-2", "--overwrite_output_dir",
          "true"], "give only one of them"),
        (["--output_dir", "{tmp}/other", "--resume_from_checkpoint", "{tmp}/run/checkpoint-2"],
         "--output_dir {tmp}/other is not empty (notes.txt)"),
        (["--output_dir", "{tmp}/a_file/out"], "cannot be written"),
        (["--output_dir", "{tmp}/a_file"], "is a file, not a directory"),
    ],
)
def test_bad_resume_and_output_dir(extra, message, llama_dir, text_files, tmp_path, capsys, no_training):
    clm = load_recipe("clm")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "adapter_model.safetensors").write_bytes(b"")
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "run" / "checkpoint-2").mkdir(parents=True)
    (tmp_path / "run" / "checkpoint-2" / "trainer_state.json").write_text("{}")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    extra = [value.replace("{tmp}", str(tmp_path)) for value in extra]
    line = recipe_error(clm, clm_argv(llama_dir, text_files, tmp_path / "out", 3) + extra, capsys)
    assert message.replace("{tmp}", str(tmp_path)) in line, line


def test_overwrite_replaces_only_a_runs_files(translation_files, tmp_path, capsys):
    """A second run with --overwrite_output_dir true: no file of the first run survives (here the first run's
    eval_predictions.jsonl and BLEU, which the second run, without generation, does not write), and files the user
    put there are kept byte for byte. Also: every file a run writes is in RUN_OUTPUTS, and the HF example-script
    outputs agree with metrics.json."""
    translation = load_recipe("translation")
    common = sys.modules["common"]
    out = tmp_path / "out"
    translation.main(translation_argv(translation_files, out, 2))
    written = sorted(out.iterdir())
    assert [p.name for p in written if not common.is_run_output(p)] == []
    for name in ("train_results.json", "eval_results.json", "all_results.json", "trainer_state.json",
                 "eval_predictions.jsonl"):
        assert (out / name).is_file(), name
    check_hf_outputs(out)
    assert "eval_bleu" in json.loads((out / "all_results.json").read_text())

    mine = {"notes.txt": b"my notes\n", "README.md": b"# my experiment\n", "data/pairs.jsonl": b"{}\n",
            "checkpoint-notes.txt": b"not a checkpoint\n"}
    for name, data in mine.items():
        (out / name).parent.mkdir(exist_ok=True)
        (out / name).write_bytes(data)
    capsys.readouterr()
    translation.main(translation_argv(translation_files, out, 2) + ["--overwrite_output_dir", "true",
                                                                      "--predict_with_generate", "false"])
    assert f"Removed {len(written)} outputs of the previous run" in capsys.readouterr().out
    for name, data in mine.items():
        assert (out / name).read_bytes() == data, name
    assert not (out / "eval_predictions.jsonl").exists()
    assert "eval_bleu" not in json.loads((out / "metrics.json").read_text())
    assert "eval_bleu" not in json.loads((out / "all_results.json").read_text())  # not merged into a stale file
    check_hf_outputs(out)


def check_hf_outputs(out: Path) -> None:
    """train/eval/all_results.json and trainer_state.json as transformers' example scripts write them, consistent with
    the project's own metrics.json and log_history.json."""
    metrics = json.loads((out / "metrics.json").read_text())
    train = json.loads((out / "train_results.json").read_text())
    evaluation = json.loads((out / "eval_results.json").read_text())
    assert {"train_loss", "train_runtime", "train_samples_per_second"} <= train.keys()
    assert {"eval_loss", "eval_nll", "eval_mean_token_accuracy"} <= evaluation.keys()
    for key, value in {**train, **evaluation}.items():
        if key != "epoch":
            assert metrics[key] == pytest.approx(value, rel=1e-12), key
    assert json.loads((out / "all_results.json").read_text()) == {**train, **evaluation}
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == metrics["global_step"]
    assert state["log_history"] == json.loads((out / "log_history.json").read_text())


# ---- real processes, interrupted from outside (slow) ----------------------------------------------------------------


def wait_for_first_log(out: Path, process: subprocess.Popen, timeout: float = 400) -> None:
    """Poll --output_dir until log_history.json holds a training log (it is replaced atomically, never half written)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert process.poll() is None, "the run ended before its first log:\n" + process.communicate()[1][-3000:]
        path = out / "log_history.json"
        if path.is_file() and any("loss" in log for log in json.loads(path.read_text())):
            return
        time.sleep(0.05)
    process.kill()
    raise AssertionError(f"no training log in {out} after {timeout} s")


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["clm", "translation"])
def test_ctrl_c_in_a_real_run_then_the_printed_command_resumes_it(recipe, llama_dir, text_files, translation_files,
                                                                    tmp_path):
    """Each recipe as a user runs it: SIGINT after the first logged step (sent from outside, as Ctrl-C), exit 130,
    then the command the run printed, executed as printed, finishes it with the same weights and loss curve as an
    uninterrupted run of the same length."""
    steps = 6 if recipe == "clm" else 10

    def argv(out: Path) -> list[str]:
        if recipe == "clm":
            return clm_argv(llama_dir, text_files, out, steps)
        return translation_argv(translation_files, out, steps)

    reference, out = tmp_path / "reference", tmp_path / "out"
    script = str(RECIPES / f"{recipe}.py")
    result = subprocess.run([sys.executable, script, *argv(reference)], cwd=ROOT, env=recipe_env(),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    slow = [sys.executable, str(ROOT / "tests" / "scripts" / "slow_steps.py"), "0.5", script]
    process = subprocess.Popen(slow + argv(out), cwd=ROOT, env=recipe_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    wait_for_first_log(out, process)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=600)
    assert process.returncode == 128 + signal.SIGINT, err[-3000:]
    assert "Traceback" not in err
    lines = err.splitlines()
    command = lines[lines.index("To continue, run the same command with --resume_from_checkpoint true:") + 1].strip()
    assert command == f"python recipes/{recipe}.py {shlex.join(argv(out))} --resume_from_checkpoint true"
    stopped = json.loads((out / "trainer_state.json").read_text())["global_step"]
    assert 1 <= stopped < steps
    check_interrupted_dir(out, stopped)

    result = subprocess.run([sys.executable, *shlex.split(command)[1:]], cwd=ROOT, env=recipe_env(),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Resuming from {out / f'checkpoint-{stopped}'}" in result.stdout
    assert_same_run(out, reference, steps)


@pytest.mark.slow
def test_ctrl_c_under_accelerate_launch_two_cpu_processes(llama_dir, text_files, tmp_path):
    """Ctrl-C reaches the launcher and both ranks (a process group, as a terminal sends it); the ranks stop at the
    same step, the checkpoint is written, and a resumed 2-process run ends like an uninterrupted one."""
    steps = 6
    reference, out = tmp_path / "reference", tmp_path / "out"
    env = recipe_env()
    launch = CPU_2PROC_LAUNCH
    script = str(RECIPES / "clm.py")
    result = subprocess.run([*launch, script, *clm_argv(llama_dir, text_files, reference, steps)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    slow = [str(ROOT / "tests" / "scripts" / "slow_steps.py"), "1.0", script]
    process = subprocess.Popen([*launch, *slow, *clm_argv(llama_dir, text_files, out, steps)], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_for_first_log(out, process)
    os.killpg(process.pid, signal.SIGINT)
    _, err = process.communicate(timeout=600)
    assert process.returncode != 0  # torchrun reports the signal it got (SignalException) and exits 1
    assert "To continue, run the same command with --resume_from_checkpoint true:" in err
    assert "accelerate launch <your launch flags> recipes/clm.py" in err
    stopped = json.loads((out / "trainer_state.json").read_text())["global_step"]
    assert 1 <= stopped < steps
    check_interrupted_dir(out, stopped)

    resume = [*launch, script, *clm_argv(llama_dir, text_files, out, steps), "--resume_from_checkpoint", "true"]
    result = subprocess.run(resume, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "metrics.json").read_text())["world_size"] == 2
    assert_same_run(out, reference, steps)
