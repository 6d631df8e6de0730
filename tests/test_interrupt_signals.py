"""A recipe that gets SIGTERM twice in a row (a scheduler signals every process and the launcher forwards the signal
again, as SLURM and torchrun do at a time limit) still finishes the step and saves a checkpoint; the second SIGTERM
must not cancel the save. Real subprocess, real signals."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from recipe_helpers import RECIPES, ROOT, recipe_env


def test_repeated_sigterm_still_saves_a_checkpoint(llama_dir, text_files, tmp_path):
    train_file, dev_file = text_files
    out = tmp_path / "out"
    command = [
        sys.executable, str(ROOT / "tests" / "scripts" / "slow_steps.py"), "0.5", str(RECIPES / "clm.py"),
        "--model_name_or_path", str(llama_dir), "--train_file", str(train_file), "--validation_file", str(dev_file),
        "--block_size", "32", "--output_dir", str(out), "--max_steps", "40", "--logging_steps", "1",
    ]
    log = tmp_path / "log.txt"
    with open(log, "w") as stream:
        process = subprocess.Popen(command, cwd=ROOT, env=recipe_env(), stdout=stream, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 240
            while "'loss'" not in log.read_text() and process.poll() is None and time.time() < deadline:
                time.sleep(0.2)
            assert process.poll() is None, log.read_text()[-3000:]
            process.send_signal(signal.SIGTERM)
            time.sleep(0.05)
            process.send_signal(signal.SIGTERM)
            returncode = process.wait(timeout=240)
        finally:
            if process.poll() is None:
                process.kill()
    text = log.read_text()
    assert returncode == 128 + signal.SIGTERM, text[-3000:]
    checkpoints = sorted(out.glob("checkpoint-*"))
    assert len(checkpoints) == 1 and (checkpoints[0] / "trainer_state.json").is_file(), text[-3000:]
    assert (out / "adapter_model.safetensors").is_file() or (out / "model.safetensors").is_file()
    assert "--resume_from_checkpoint true" in text
