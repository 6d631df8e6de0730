"""Several machines: the multi-node accelerate configs, the SLURM launch script, and both recipes launched as two
accelerate "nodes" on this host.

Two-node runs (slow): two launcher processes, machine ranks 0 and 1, one CPU process each, rendezvous on 127.0.0.1
(gloo), through recipes/configs/multi_node.yaml with the per-node flags a user gives. The oracle is the same recipe in
one process with the same global batch (per-device batch b on 2 ranks == 2b in 1 process, same accumulation): final
weights and evaluation must agree to float precision, and only node 0 may write outputs (node 1 gets its own
--output_dir, as without a shared filesystem, and it must stay empty). Which node holds which global rank is read
from torchrun's own log (LOGLEVEL=INFO), not from the recipe.

The SLURM script runs against a fake `srun` (records its argv and environment, then runs the task once per node with
that node's SLURM_NODEID), a fake `scontrol` and a fake `accelerate` (records the exact command each node launches).
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import recipe_data
import torch
import yaml
from launch_helpers import free_port, kill_tree

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "recipes" / "configs"
SBATCH = ROOT / "recipes" / "slurm" / "launch.sbatch"
MULTI_NODE_CONFIGS = ["multi_node.yaml", "multi_node_fsdp2.yaml"]
LAUNCH_TIMEOUT_S = 300


# ---- the configs -----------------------------------------------------------------------------------------------------


def header_commands(path: Path) -> dict[str, list[str]]:
    """The `node <R>: accelerate launch ...` lines at the top of an accelerate config, as argument lists."""
    found = {}
    for line in path.read_text().splitlines():
        match = re.match(r"#\s+node (\d+): accelerate launch (.*)$", line)
        if match:
            found[match.group(1)] = match.group(2).split()
    return found


@pytest.mark.parametrize("name", MULTI_NODE_CONFIGS)
def test_header_commands_differ_only_in_machine_rank(name):
    """Node 0 and node 1 run the same command but for --machine_rank; address and port are given explicitly, and
    accelerate's launcher parses each command with this config file."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    path = CONFIGS / name
    commands = header_commands(path)
    assert sorted(commands) == ["0", "1"], commands
    parsed = {}
    for rank, arguments in commands.items():
        args = launch_command_parser().parse_args(arguments)
        assert (ROOT / args.config_file).resolve() == path
        assert args.machine_rank == int(rank) and args.main_process_ip and args.main_process_port
        assert args.training_script.startswith("recipes/") and (ROOT / args.training_script).is_file()
        parsed[rank] = args
        validated, _, _ = _validate_launch_command(args)  # fills the rest from the config file, as a launch does
        assert validated.num_machines == 2 and validated.num_processes == 16 and validated.machine_rank == int(rank)
    without_rank = [[a for a in commands[r] if a != r] for r in ("0", "1")]
    assert without_rank[0] == without_rank[1]


@pytest.mark.parametrize("name", MULTI_NODE_CONFIGS)
def test_config_gives_torchrun_a_static_multi_node_rendezvous(name, monkeypatch):
    """What accelerate would hand torchrun on node 1 of 2: 8 processes on this node, node rank 1, node 0's address
    and port (static ranks, so node 0 holds global rank 0); FSDP2 settings for the FSDP config. Nothing is launched
    (FSDP itself needs GPUs)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    monkeypatch.setattr("accelerate.utils.launch.is_port_in_use", lambda port: False)
    arguments = ["--config_file", str(CONFIGS / name), "--machine_rank", "1", "--main_process_ip", "10.0.0.1",
                 "--main_process_port", "29500", "recipes/clm.py", "--output_dir", "/shared/out"]
    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(arguments))
    env = prepare_multi_gpu_env(args)
    assert (args.nnodes, args.nproc_per_node, args.node_rank) == ("2", "8", 1)
    # accelerate ignores a config's `same_network` (a store_true flag is never None), so the address and port reach
    # torchrun as its rendezvous endpoint; with the static backend that is node 0's master address and port.
    assert (args.rdzv_endpoint, args.rdzv_backend) == ("10.0.0.1:29500", "static")
    raw = yaml.safe_load((CONFIGS / name).read_text())
    assert env["ACCELERATE_MIXED_PRECISION"] == raw["mixed_precision"] == "bf16"
    if "fsdp_config" in raw:
        assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
        assert env["FSDP_STATE_DICT_TYPE"] == "SHARDED_STATE_DICT" and env["FSDP_SYNC_MODULE_STATES"] == "true"
    else:
        assert "ACCELERATE_USE_FSDP" not in env


# ---- the SLURM script ------------------------------------------------------------------------------------------------

FAKE_SRUN = r'''#!{python}
"""Fake srun: record argv and environment, then run the task once per node (one task per node), as slurmstepd
would, with that node's SLURM_NODEID / SLURM_PROCID / SLURM_LOCALID."""
import json, os, subprocess, sys
record = os.environ["FAKE_RECORD"]
argv = sys.argv[1:]
with open(os.path.join(record, "srun.json"), "w") as f:
    json.dump({{"argv": argv, "env": dict(os.environ)}}, f)
options = [a for a in argv[: next(i for i, a in enumerate(argv) if not a.startswith("-"))]]
task = argv[len(options):]
nodes = int(os.environ["SLURM_JOB_NUM_NODES"])
tasks = [subprocess.Popen(task, env=dict(os.environ, SLURM_NODEID=str(node), SLURM_PROCID=str(node), SLURM_LOCALID="0"))
         for node in range(nodes)]  # all at once, as on N machines: the nodes of a launch wait for each other
sys.exit(max(t.wait() for t in tasks))
'''

FAKE_SCONTROL = r'''#!{python}
import json, os, sys
with open(os.path.join(os.environ["FAKE_RECORD"], "scontrol.json"), "w") as f:
    json.dump(sys.argv[1:], f)
if sys.argv[1:3] == ["show", "hostnames"] and sys.argv[3] == "gpu-[07-08]":
    print("gpu-07\ngpu-08")
else:
    sys.exit(f"fake scontrol: unexpected arguments {{sys.argv[1:]}}")
'''

FAKE_ACCELERATE = r'''#!{python}
import json, os, sys
node = os.environ["SLURM_NODEID"]
with open(os.path.join(os.environ["FAKE_RECORD"], f"accelerate-{{node}}.json"), "w") as f:
    json.dump({{"argv": sys.argv[1:], "cwd": os.getcwd()}}, f)
print(f"fake accelerate on node {{node}}")
'''


@pytest.fixture
def fake_slurm(tmp_path):
    """A bin/ folder with the fakes first on PATH, the record folder, and a SLURM job environment for 2 nodes."""
    bin_dir, accelerate_dir, record = tmp_path / "bin", tmp_path / "fake_accelerate", tmp_path / "record"
    for folder in (bin_dir, accelerate_dir, record):
        folder.mkdir()
    fakes = ((bin_dir, "srun", FAKE_SRUN), (bin_dir, "scontrol", FAKE_SCONTROL),
             (accelerate_dir, "accelerate", FAKE_ACCELERATE))
    for folder, name, text in fakes:
        path = folder / name
        path.write_text(text.format(python=sys.executable))
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    env = {key: value for key, value in os.environ.items() if not key.startswith(("SLURM_", "GPUS_PER_NODE",
                                                                                 "MAIN_", "LOG_DIR"))}
    env.pop("ACCELERATE_CONFIG", None)
    env.update(PATH=os.pathsep.join([str(bin_dir), str(accelerate_dir), env["PATH"]]), FAKE_RECORD=str(record),
               SLURM_JOB_ID="123456",
               SLURM_JOB_NODELIST="gpu-[07-08]", SLURM_JOB_NUM_NODES="2", SLURM_NNODES="2",
               SLURM_GPUS_ON_NODE="4", SLURM_SUBMIT_DIR=str(ROOT), LOG_DIR=str(tmp_path / "logs"))
    return env, record, tmp_path


def run_sbatch(env: dict, *arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SBATCH), *arguments], cwd=env["FAKE_RECORD"], env=env, capture_output=True,
                          text=True, timeout=60)


def test_sbatch_script_parses():
    result = subprocess.run(["bash", "-n", str(SBATCH)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_sbatch_launches_one_accelerate_per_node(fake_slurm):
    env, record, tmp = fake_slurm
    out = tmp / "runs" / "clm"
    result = run_sbatch(env, "clm", "recipes/configs/clm_qwen_lora_maxsup.yaml", "--output_dir", str(out),
                        "--save_strategy", "steps", "--save_steps", "50")
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads((record / "scontrol.json").read_text()) == ["show", "hostnames", "gpu-[07-08]"]
    srun = json.loads((record / "srun.json").read_text())
    assert srun["argv"][:3] == ["--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    assert srun["env"]["LOG_DIR"] == str(tmp / "logs")  # exported: every node's task writes its log there
    port = str(20000 + 123456 % 20000)
    for node in (0, 1):
        launched = json.loads((record / f"accelerate-{node}.json").read_text())
        assert launched["cwd"] == str(ROOT)  # the submit directory: relative recipe and config paths resolve
        assert launched["argv"] == [
            "launch", "--machine_rank", str(node), "--config_file", "recipes/configs/multi_node.yaml",
            "--num_machines", "2", "--num_processes", "8", "--main_process_ip", "gpu-07", "--main_process_port", port,
            "recipes/clm.py", "recipes/configs/clm_qwen_lora_maxsup.yaml", "--output_dir", str(out),
            "--save_strategy", "steps", "--save_steps", "50",
        ]
        assert (tmp / "logs" / f"node-{node}.log").read_text() == f"fake accelerate on node {node}\n"
    assert not out.exists()  # the script never creates or writes --output_dir: the recipe does


def test_sbatch_resubmission_resumes_from_the_newest_complete_checkpoint(fake_slurm):
    env, record, tmp = fake_slurm
    out = tmp / "runs" / "translation"
    for step, complete in ((50, True), (100, True), (150, False)):  # checkpoint-150: the job died while saving it
        (out / f"checkpoint-{step}").mkdir(parents=True)
        if complete:
            (out / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    env.update(ACCELERATE_CONFIG="recipes/configs/multi_node_fsdp2.yaml", GPUS_PER_NODE="2", MAIN_PORT="29555")
    result = run_sbatch(env, "translation", f"--output_dir={out}", "--save_steps", "50")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"resuming from {out}/checkpoint-100" in result.stdout
    launched = json.loads((record / "accelerate-1.json").read_text())["argv"]
    assert launched == [
        "launch", "--machine_rank", "1", "--config_file", "recipes/configs/multi_node_fsdp2.yaml", "--num_machines",
        "2", "--num_processes", "4", "--main_process_ip", "gpu-07", "--main_process_port", "29555",
        "recipes/translation.py", f"--output_dir={out}", "--save_steps", "50",
        "--resume_from_checkpoint", f"{out}/checkpoint-100",
    ]


def test_sbatch_leaves_an_explicit_choice_and_stops_after_a_finished_run(fake_slurm):
    env, record, tmp = fake_slurm
    out = tmp / "runs" / "clm"
    (out / "checkpoint-10").mkdir(parents=True)
    (out / "checkpoint-10" / "trainer_state.json").write_text("{}")
    result = run_sbatch(env, "clm", "--output_dir", str(out), "--overwrite_output_dir", "true")
    assert result.returncode == 0, result.stderr
    assert "--resume_from_checkpoint" not in json.loads((record / "accelerate-0.json").read_text())["argv"]
    (record / "srun.json").unlink()
    (out / "metrics.json").write_text("{}")
    result = run_sbatch(env, "clm", "--output_dir", str(out))
    assert result.returncode == 0 and "that run finished" in result.stdout, result.stdout + result.stderr
    assert not (record / "srun.json").exists()


@pytest.mark.parametrize("arguments, unset, message", [
    (["clm", "--max_steps", "3"], [], "give --output_dir"),
    (["gpt", "--output_dir", "x"], [], "give the recipe, clm or translation"),
    (["clm", "--output_dir", "x"], ["SLURM_GPUS_ON_NODE"], "--gpus-per-node"),
    (["clm", "--output_dir", "x"], ["SLURM_JOB_ID"], "submit with sbatch"),
])
def test_sbatch_refuses_with_a_message(fake_slurm, arguments, unset, message):
    env, record, _ = fake_slurm
    for name in unset:
        env.pop(name)
    result = run_sbatch(env, *arguments)
    assert result.returncode == 2 and message in result.stderr, result.stdout + result.stderr
    assert not (record / "srun.json").exists()


# ---- two accelerate nodes on this host (slow) ------------------------------------------------------------------------


def node_env(hf_home: Path) -> dict:
    """Offline, one thread per process, no user accelerate config, torchrun's rendezvous log on (LOGLEVEL=INFO:
    `group_rank=`, `global_ranks=`), and no ACCELERATE_USE_CPU: the recipes must find out there is no GPU."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "MPLBACKEND": "Agg", "HF_HOME": str(hf_home),
           "LOGLEVEL": "INFO"}
    env.pop("ACCELERATE_USE_CPU", None)
    return env


def launch_two_nodes(script: str, arguments: list[str], outputs: list[Path], tmp: Path) -> list[str]:
    """Node 0 and node 1 of a 2-machine launch with multi_node.yaml, one process each; returns their logs."""
    port = free_port()
    processes, logs = [], []
    for rank, out in enumerate(outputs):
        log = open(tmp / f"node-{rank}.log", "w+")
        command = [
            sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "multi_node.yaml"),
            "--num_machines", "2", "--num_processes", "2", "--machine_rank", str(rank), "--main_process_ip",
            "127.0.0.1", "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no",
            str(ROOT / "recipes" / script), *arguments, "--output_dir", str(out),
        ]
        processes.append(subprocess.Popen(command, cwd=ROOT, env=node_env(tmp / "hf_home"), stdout=log,
                                          stderr=subprocess.STDOUT, text=True))
        logs.append(log)
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    try:
        for process in processes:
            process.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        for process in processes:
            kill_tree(process.pid)
    texts = []
    for log in logs:
        log.seek(0)
        texts.append(log.read())
        log.close()
    for rank, (process, text) in enumerate(zip(processes, texts)):
        if process.poll() is None or process.returncode != 0:
            for other in processes:
                kill_tree(other.pid)
            pytest.fail(f"node {rank} failed ({process.returncode}):\n{text[-6000:]}")
    return texts


def run_one_process(script: str, arguments: list[str], out: Path, tmp: Path) -> str:
    result = subprocess.run([sys.executable, str(ROOT / "recipes" / script), *arguments, "--output_dir", str(out)],
                            cwd=ROOT, env=node_env(tmp / "hf_home"), capture_output=True, text=True,
                            timeout=LAUNCH_TIMEOUT_S)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result.stdout


def check_node_ranks(logs: list[str]) -> None:
    """torchrun's rendezvous on each node: node R is group (machine) rank R of 2 and holds global rank R."""
    for rank, log in enumerate(logs):
        assert re.search(rf"group_rank={rank}\b", log), log[-3000:]
        assert re.search(r"group_world_size=2\b", log), log[-3000:]
        assert re.search(rf"global_ranks=\[{rank}\]", log), log[-3000:]


def check_same_training(two_nodes: Path, one_process: Path, initial: Path) -> dict:
    """Same final weights (float tolerance) and the same train/eval numbers as one process; returns the metrics."""
    from safetensors.torch import load_file

    a, b, start = (load_file(str(folder / "model.safetensors")) for folder in (two_nodes, one_process, initial))
    assert sorted(a) == sorted(b)
    moved = max((a[name] - start[name]).abs().max().item() for name in a)
    assert moved > 1e-4, "training did not change the weights: the comparison would prove nothing"
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
    metrics = json.loads((two_nodes / "metrics.json").read_text())
    single = json.loads((one_process / "metrics.json").read_text())
    assert (metrics["world_size"], single["world_size"]) == (2, 1)
    assert metrics["global_step"] == single["global_step"]
    for key in ("train_tokens_scored", "eval_num_tokens", "train_examples", "eval_examples"):
        assert metrics[key] == single[key], key
    for key in ("train_nll", "train_objective", "eval_loss", "eval_nll", "eval_mean_token_accuracy", "eval_ece",
                "eval_brier", "eval_entropy", "eval_logit_gap"):
        assert metrics[key] == pytest.approx(single[key], rel=1e-6, abs=1e-9), key
    return metrics


def check_only_node_zero_wrote(logs: list[str], node0: Path, node1: Path) -> None:
    assert (node0 / "metrics.json").is_file() and (node0 / "model.safetensors").is_file()
    assert node1.is_dir() and sorted(p.name for p in node1.iterdir()) == []  # checked writable, then left empty
    tables = [len(re.findall(r"^== ", log, flags=re.M)) for log in logs]
    assert tables == [1, 0], tables  # one results table, printed by global rank 0 on node 0


@pytest.fixture(scope="module")
def tiny_clm(tmp_path_factory):
    root = tmp_path_factory.mktemp("clm")
    lines = recipe_data.english_lines(360)
    model = recipe_data.write_tiny_llama_dir(root / "llama", lines)
    return model, recipe_data.write_lines(root / "train.txt", lines[:300]), recipe_data.write_lines(
        root / "dev.txt", lines[300:330])


@pytest.mark.slow
def test_clm_on_two_nodes_equals_one_process(tiny_clm, tmp_path):
    """3 optimizer steps of 2 micro-batches, one padded text per example, then an evaluation of 30 texts."""
    model, train_file, dev_file = tiny_clm
    block, batch, accumulation, steps = 32, 2, 2, 3
    common = [
        "--model_name_or_path", str(model), "--train_file", str(train_file), "--validation_file", str(dev_file),
        "--packing", "false", "--block_size", str(block), "--use_lora", "false", "--max_steps", str(steps),
        "--gradient_accumulation_steps", str(accumulation), "--warmup_steps", "0", "--learning_rate", "1e-3",
        "--logging_steps", "2", "--seed", "0", "--train_sampling_strategy", "sequential",
        "--dataloader_pin_memory", "false",
    ]
    # Sequential order: micro-batch k of rank r holds examples (2k + r) * batch to (2k + r + 1) * batch - 1. The tokens
    # each rank scores (bos + text + eos, cut to the block, minus the shift) differ over every accumulation window,
    # so a per-rank or per-micro-batch normalization would show.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    lengths = [min(len(tokenizer(line)["input_ids"]) + 1, block) - 1 for line in train_file.read_text().splitlines()]
    per_rank = [[sum(lengths[(2 * k + r) * batch:(2 * k + r + 1) * batch]) for r in (0, 1)]
                for k in range(steps * accumulation)]
    for step in range(steps):
        window = per_rank[step * accumulation:(step + 1) * accumulation]
        assert sum(w[0] for w in window) != sum(w[1] for w in window), (step, per_rank)

    node0, node1 = tmp_path / "node0", tmp_path / "node1"
    started = time.monotonic()
    logs = launch_two_nodes("clm.py", [*common, "--per_device_train_batch_size", str(batch),
                                       "--per_device_eval_batch_size", "4"], [node0, node1], tmp_path)
    two_nodes_s = time.monotonic() - started
    run_one_process("clm.py", [*common, "--per_device_train_batch_size", str(2 * batch),
                               "--per_device_eval_batch_size", "8"], tmp_path / "single", tmp_path)
    print(f"clm: two nodes {two_nodes_s:.0f} s, one process {time.monotonic() - started - two_nodes_s:.0f} s")
    check_node_ranks(logs)
    metrics = check_same_training(node0, tmp_path / "single", model)
    assert metrics["train_tokens_scored"] == sum(lengths[: steps * accumulation * 2 * batch])
    dev_tokens = [min(len(tokenizer(line)["input_ids"]) + 1, block) - 1 for line in dev_file.read_text().splitlines()]
    assert metrics["eval_num_tokens"] == sum(dev_tokens)  # 30 texts on 2 ranks x 4: each scored once
    check_only_node_zero_wrote(logs, node0, node1)


@pytest.fixture(scope="module")
def tiny_translation(tmp_path_factory):
    """Pair files and a Marian directory without dropout (dropout draws differ between 1 and 2 processes)."""
    from hf_smooth.demo.data import build_marian, train_bpe_tokenizer

    root = tmp_path_factory.mktemp("translation")
    train_file, dev_file, dev_pairs = recipe_data.write_translation_files(root / "pairs", train=160, validation=21)
    train_pairs = recipe_data.translation_pairs(160)
    tokenizer = train_bpe_tokenizer([s for s, _ in train_pairs] + [t for _, t in train_pairs], vocab_size=300)
    model = build_marian(tokenizer, d_model=32, layers=1, heads=1, ffn=64, dropout=0.0, seed=0)
    model.save_pretrained(root / "marian")
    tokenizer.save_pretrained(root / "marian")
    return root / "marian", train_file, dev_file, dev_pairs


@pytest.mark.slow
def test_translation_on_two_nodes_equals_one_process(tiny_translation, tmp_path):
    """2 optimizer steps of 2 micro-batches in the Trainer's seeded random order, then teacher-forced evaluation and
    beam search on 21 pairs (2 ranks x 4 per batch: the last batch is uneven)."""
    model, train_file, dev_file, dev_pairs = tiny_translation
    common = [
        "--model_name_or_path", str(model), "--train_file", str(train_file), "--validation_file", str(dev_file),
        "--max_steps", "2", "--gradient_accumulation_steps", "2", "--warmup_steps", "0", "--learning_rate", "1e-3",
        "--logging_steps", "1", "--seed", "0", "--train_sampling_strategy", "random", "--generation_num_beams", "2",
        "--generation_max_length", "16", "--dataloader_pin_memory", "false",
    ]
    node0, node1 = tmp_path / "node0", tmp_path / "node1"
    started = time.monotonic()
    logs = launch_two_nodes("translation.py", [*common, "--per_device_train_batch_size", "4",
                                               "--per_device_eval_batch_size", "4"], [node0, node1], tmp_path)
    two_nodes_s = time.monotonic() - started
    run_one_process("translation.py", [*common, "--per_device_train_batch_size", "8",
                                       "--per_device_eval_batch_size", "8"], tmp_path / "single", tmp_path)
    print(f"translation: two nodes {two_nodes_s:.0f} s, one process {time.monotonic() - started - two_nodes_s:.0f} s")
    check_node_ranks(logs)
    metrics = check_same_training(node0, tmp_path / "single", model)
    single = json.loads((tmp_path / "single" / "metrics.json").read_text())
    assert metrics["eval_bleu"] == pytest.approx(single["eval_bleu"]) and metrics["eval_chrf"] == pytest.approx(
        single["eval_chrf"])
    predictions = (node0 / "eval_predictions.jsonl").read_text().splitlines()
    assert [json.loads(row)["reference"] for row in predictions] == [target for _, target in dev_pairs]
    assert predictions == (tmp_path / "single" / "eval_predictions.jsonl").read_text().splitlines()
    check_only_node_zero_wrote(logs, node0, node1)


@pytest.mark.slow
def test_sbatch_runs_two_real_nodes_and_a_resubmission_resumes(tiny_clm, fake_slurm):
    """launch.sbatch with the real accelerate (fake srun starting both node tasks at once on this host, a CPU
    accelerate config): job 1 trains 3 steps with a checkpoint at step 2. Job 2 is given a folder holding only what a
    job killed during step 3's save would leave (checkpoint-2, and checkpoint-3 without trainer_state.json): it
    resumes from checkpoint-2 on both nodes and ends with job 1's weights."""
    from safetensors.torch import load_file

    env, record, tmp = fake_slurm
    model, train_file, dev_file = tiny_clm
    # The real accelerate (this venv) instead of the fake one; the recipes find out by themselves there is no GPU.
    real = {**node_env(tmp / "hf_home"), "PATH": os.pathsep.join(
        [str(tmp / "bin"), str(Path(sys.executable).parent), os.environ["PATH"]])}
    real.update({key: value for key, value in env.items() if key.startswith("SLURM_") or key == "FAKE_RECORD"})
    config = tmp / "cpu_multi_node.yaml"
    raw = yaml.safe_load((CONFIGS / "multi_node.yaml").read_text())
    config.write_text(yaml.safe_dump({**raw, "mixed_precision": "no"}))  # fp32 on CPU; the rest as shipped
    real.update(ACCELERATE_CONFIG=str(config), GPUS_PER_NODE="1", MAIN_ADDR="127.0.0.1")
    arguments = [
        "clm", "--model_name_or_path", str(model), "--train_file", str(train_file), "--validation_file", str(dev_file),
        "--packing", "false", "--block_size", "32", "--use_lora", "false", "--max_steps", "3", "--warmup_steps", "0",
        "--learning_rate", "1e-3", "--logging_steps", "1", "--per_device_train_batch_size", "2", "--seed", "0",
        "--save_strategy", "steps", "--save_steps", "2", "--dataloader_pin_memory", "false",
    ]

    def job(number: int, out: Path) -> subprocess.CompletedProcess:
        job_env = dict(real, SLURM_JOB_ID=str(1000 + number), MAIN_PORT=str(free_port()),
                       LOG_DIR=str(tmp / f"logs{number}"))
        return subprocess.run(["bash", str(SBATCH), *arguments, "--output_dir", str(out)], cwd=tmp, env=job_env,
                              capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)

    def node_logs(number: int) -> str:
        logs = tmp / f"logs{number}"
        return "".join(f"--- node {n}\n" + (logs / f"node-{n}.log").read_text()[-4000:] for n in (0, 1))

    first, second = tmp / "first", tmp / "second"
    started = time.monotonic()
    result = job(1, first)
    assert result.returncode == 0, result.stdout + result.stderr + node_logs(1)
    assert "resuming" not in result.stdout
    assert json.loads((first / "metrics.json").read_text())["world_size"] == 2
    assert (first / "checkpoint-2" / "trainer_state.json").is_file()
    (second / "checkpoint-3").mkdir(parents=True)
    for item in (first / "checkpoint-2").iterdir():
        (second / "checkpoint-2").mkdir(exist_ok=True)
        (second / "checkpoint-2" / item.name).write_bytes(item.read_bytes())
    (second / "checkpoint-3" / "rng_state_0.pth").write_bytes((first / "checkpoint-2" / "rng_state_0.pth").read_bytes())
    result = job(2, second)
    print(f"sbatch: two jobs of two real nodes {time.monotonic() - started:.0f} s")
    assert result.returncode == 0, result.stdout + result.stderr + node_logs(2)
    assert f"resuming from {second}/checkpoint-2" in result.stdout
    assert f"Resuming from {second}/checkpoint-2" in (tmp / "logs2" / "node-0.log").read_text()
    assert json.loads((second / "metrics.json").read_text())["global_step"] == 3
    # Job 2 trained step 3 only: its train_loss (the resumed part, transformers' convention) is job 1's step-3 loss.
    step3 = next(log["loss"] for log in json.loads((first / "log_history.json").read_text()) if log.get("step") == 3
                 and "loss" in log)
    resumed_loss = json.loads((second / "train_results.json").read_text())["train_loss"]
    assert resumed_loss == pytest.approx(step3, rel=1e-5)
    assert resumed_loss != pytest.approx(json.loads((first / "train_results.json").read_text())["train_loss"])
    a, b = load_file(str(first / "model.safetensors")), load_file(str(second / "model.safetensors"))
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
