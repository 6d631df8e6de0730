"""Launching a script as 2 CPU processes (gloo DDP) from a test with `accelerate launch`, and cleaning up after it.

The launched script imports test helpers (tests/) and hf_smooth (the repository root) by name: both are put on its
PYTHONPATH, as pytest's `pythonpath` setting does for the tests themselves.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
# Backstop only: a rank stuck in a collective exits by itself after 120 s with its stack (ddp_scenarios watchdog).
LAUNCH_TIMEOUT_S = 420


def free_port() -> int:
    # Other test runs may launch at the same time on this machine: never rely on accelerate's fixed 29500.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_tree(pid: int) -> None:
    """Kill the launcher and every process under it. torchrun starts each rank in a session of its own, so killing
    the launcher's process group leaves the ranks running (and holding the output pipe open)."""
    import psutil  # a dependency of accelerate

    try:
        launcher = psutil.Process(pid)
        processes = launcher.children(recursive=True) + [launcher]  # listed before any is killed and reparented
    except psutil.NoSuchProcess:
        return
    for process in processes:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass


def launch_env(hf_home: Path) -> dict:
    """This environment, offline, one thread per process, tests/ and the repository root on PYTHONPATH."""
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
        # two processes on a 2-core machine: one thread each, or they fight over the cores
        OMP_NUM_THREADS="1",
        # no user accelerate config file can change the launch
        HF_HOME=str(hf_home),
        PYTHONPATH=os.pathsep.join(p for p in [str(ROOT), str(TESTS), env.get("PYTHONPATH", "")] if p),
    )
    return env


def launch_two_processes(script: Path, arguments: list[str], *, hf_home: Path, timeout: int = LAUNCH_TIMEOUT_S) -> str:
    """Run `script arguments` as 2 gloo processes; returns their output, or fails the test with its tail when the
    launch fails or runs past `timeout` seconds (then every process of the launch is killed)."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()), str(script), *arguments,
    ]
    return run_launch(command, hf_home=hf_home, timeout=timeout)


def run_launch(command: list[str], *, hf_home: Path, timeout: int = LAUNCH_TIMEOUT_S) -> str:
    """Run a multi-process launch `command` from the repository root; returns its output, or fails the test with its
    tail when it fails or runs past `timeout` seconds (then every process of the launch is killed)."""
    process = subprocess.Popen(
        command, cwd=ROOT, env=launch_env(hf_home), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(process.pid)
        output, _ = process.communicate(timeout=60)
        pytest.fail(f"2-process launch did not finish in {timeout} s (a rank hanging?):\n{output[-8000:]}")
    if process.returncode != 0:
        pytest.fail(f"2-process launch failed with exit code {process.returncode}:\n{output[-8000:]}")
    return output
