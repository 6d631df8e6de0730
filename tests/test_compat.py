"""hf_smooth._compat: the one seam to transformers' / accelerate's internals fails loudly, never silently.

- Construction refuses a Trainer without the hooks SmoothLossMixin relies on (simulated by removing them from the
  installed `transformers.Trainer`; checked for real against transformers 5.18 when the floors were set).
- The evaluate-before-train DDP workaround has a post-condition: several data-parallel processes and a model that
  is not DDP-wrapped after train()'s preparation raise at the start of training (unit-tested on a stand-in trainer,
  and on 2 real processes with the workaround switched off).
"""

from __future__ import annotations

import importlib.metadata
import inspect
import json
import re
import types

import pytest
import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import DistributedType
from launch_helpers import ROOT, TESTS, launch_two_processes
from packaging.version import Version
from tiny_models import BUILDERS, ListDataset, PadCollator, causal_examples
from transformers import Trainer

from hf_smooth import SmoothTrainer, SmoothTrainingArguments, _compat


def smooth_trainer(tmp_path, **extra):
    args = SmoothTrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, max_steps=1, report_to=[], use_cpu=True,
        save_strategy="no", disable_tqdm=True, smoothing_method="maxsup", **extra,
    )
    return SmoothTrainer(
        model=BUILDERS["llama"](0), args=args, train_dataset=ListDataset(causal_examples(4)),
        data_collator=PadCollator(),
    )


# ---- the Trainer hooks --------------------------------------------------------------------------------------------


def test_installed_trainer_is_supported_and_the_ddp_check_is_registered(tmp_path):
    trainer = smooth_trainer(tmp_path)
    _compat.check_trainer_supported(trainer)  # the installed transformers has every hook
    assert "loss_is_scaled_for_ga" in vars(Trainer)
    checks = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, _compat.DDPWrapCheck)]
    assert len(checks) == 1


def test_trainer_without_loss_is_scaled_for_ga_fails_at_construction(tmp_path, monkeypatch):
    """transformers < 5.19 has no `Trainer.loss_is_scaled_for_ga`: refuse to build, naming the version needed."""
    monkeypatch.delattr(Trainer, "loss_is_scaled_for_ga")
    with pytest.raises(_compat.UnsupportedVersionError) as caught:
        smooth_trainer(tmp_path)
    message = str(caught.value)
    assert "transformers >= 5.19.0" in message
    assert f"installed: transformers {importlib.metadata.version('transformers')}" in message
    assert "loss_is_scaled_for_ga" in message and "a second time" in message
    assert "pip install 'transformers>=5.19.0'" in message
    assert "please report it" not in message  # the installed version is within the range hf_smooth was checked with


def test_a_newer_transformers_without_the_hook_is_reported_as_an_upstream_change(tmp_path, monkeypatch):
    monkeypatch.delattr(Trainer, "loss_is_scaled_for_ga")
    monkeypatch.setattr(_compat, "installed_version", lambda package: "9.0.0")
    with pytest.raises(_compat.UnsupportedVersionError, match="9.0.0 changed an internal .* please report it"):
        smooth_trainer(tmp_path)


def test_trainer_that_declares_but_never_reads_the_flag_fails_at_construction(tmp_path, monkeypatch):
    """Declared on Trainer but no longer read by the trainer module: as silent as not having it."""
    monkeypatch.setattr(_compat, "_trainer_module_reads", lambda expression: False)
    with pytest.raises(_compat.UnsupportedVersionError, match="does not have or does not read"):
        smooth_trainer(tmp_path)


def test_the_source_probe_finds_the_read_in_the_installed_trainer():
    assert _compat._trainer_module_reads("self.loss_is_scaled_for_ga")
    assert not _compat._trainer_module_reads("self.no_such_attribute_anywhere_in_trainer")


def old_get_batch_samples(self, epoch_iterator, num_batches):  # a signature without the device
    raise AssertionError("never called")


def old_compute_loss(self, model, inputs, return_outputs=False):  # a signature without num_items_in_batch
    raise AssertionError("never called")


@pytest.mark.parametrize(
    "name, replacement, expected",
    [
        ("get_batch_samples", old_get_batch_samples, "Trainer.get_batch_samples(epoch_iterator, num_batches)"),
        ("compute_loss", old_compute_loss, "Trainer.compute_loss(model, inputs, return_outputs)"),
    ],
)
def test_trainer_with_another_hook_signature_fails_at_construction(tmp_path, monkeypatch, name, replacement, expected):
    monkeypatch.setattr(Trainer, name, replacement)
    with pytest.raises(_compat.UnsupportedVersionError) as caught:
        smooth_trainer(tmp_path)
    assert expected in str(caught.value) and "transformers >= 5.19.0" in str(caught.value)


def test_mixin_on_a_non_trainer_is_refused():
    with pytest.raises(TypeError, match="SmoothLossMixin before a Trainer class"):
        _compat.check_trainer_supported(object())


# ---- DDP after an evaluation-only preparation --------------------------------------------------------------------


class FakeTrainer(types.SimpleNamespace):
    """The attributes _compat reads from a Trainer (a subclass, so that it can be weakly referenced)."""


def fake_trainer(*, num_processes=2, distributed_type=DistributedType.MULTI_CPU, wrapped=None, fsdp=False,
                 deepspeed=False, models=None):
    model = torch.nn.Linear(3, 2)
    accelerator = types.SimpleNamespace(num_processes=num_processes, distributed_type=distributed_type)
    if models is not None:
        accelerator._models = models(model)
    return FakeTrainer(
        accelerator=accelerator, model=model, model_wrapped=model if wrapped is None else wrapped(model),
        is_deepspeed_enabled=deepspeed, is_fsdp_enabled=fsdp,
    )


def test_two_processes_and_an_unwrapped_model_raise():
    trainer = fake_trainer()
    assert _compat.expects_ddp(trainer)
    with pytest.raises(RuntimeError, match="did not wrap it in DistributedDataParallel") as caught:
        _compat.check_model_wrapped_for_ddp(trainer)
    assert "2 processes" in str(caught.value) and "Linear" in str(caught.value)
    # the same through the callback the mixin registers, at on_train_begin
    with pytest.raises(RuntimeError, match="DistributedDataParallel"):
        _compat.DDPWrapCheck(trainer).on_train_begin(None, None, None)


@pytest.mark.parametrize(
    "setup",
    [
        dict(num_processes=1, distributed_type=DistributedType.NO),
        dict(fsdp=True, distributed_type=DistributedType.FSDP),
        dict(deepspeed=True, distributed_type=DistributedType.DEEPSPEED),
        dict(distributed_type=DistributedType.XLA),  # TPU processes are not DDP-wrapped
    ],
    ids=["one-process", "fsdp", "deepspeed", "xla"],
)
def test_setups_that_synchronize_otherwise_are_not_required_to_be_ddp(setup):
    trainer = fake_trainer(**setup)
    assert not _compat.expects_ddp(trainer)
    _compat.check_model_wrapped_for_ddp(trainer)


def test_frozen_model_is_not_required_to_be_ddp():
    trainer = fake_trainer()
    trainer.model.requires_grad_(False)
    assert not _compat.expects_ddp(trainer)


@pytest.fixture
def one_rank_group():
    """A world-size-1 gloo group, so that a real DistributedDataParallel can be built in this process."""
    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_ddp_wrapped_model_passes_also_under_torch_compile(one_rank_group):
    ddp = torch.nn.parallel.DistributedDataParallel
    _compat.check_model_wrapped_for_ddp(fake_trainer(wrapped=ddp))
    _compat.check_model_wrapped_for_ddp(fake_trainer(wrapped=lambda m: torch.compile(ddp(m))))  # compiled lazily
    with pytest.raises(RuntimeError, match="DistributedDataParallel"):
        _compat.check_model_wrapped_for_ddp(fake_trainer(wrapped=torch.compile))  # compiled but not DDP


def test_undo_resets_accelerates_mark_and_record_of_the_model():
    other = torch.nn.Linear(1, 1)
    trainer = fake_trainer(models=lambda model: [other, model])
    trainer.model._is_accelerate_prepared = True
    _compat.undo_evaluation_only_prepare(trainer)
    assert trainer.model._is_accelerate_prepared is False
    assert trainer.accelerator._models == [other]


def test_undo_leaves_one_process_and_wrapped_models_alone():
    for trainer in (fake_trainer(num_processes=1, distributed_type=DistributedType.NO, models=lambda m: [m]),
                    fake_trainer(wrapped=lambda m: torch.nn.Sequential(m), models=lambda m: [m])):
        trainer.model._is_accelerate_prepared = True
        _compat.undo_evaluation_only_prepare(trainer)
        assert trainer.model._is_accelerate_prepared is True and trainer.accelerator._models == [trainer.model]


def test_undo_without_accelerates_model_record_fails_loudly():
    trainer = fake_trainer()  # no Accelerator._models
    trainer.model._is_accelerate_prepared = True
    with pytest.raises(_compat.UnsupportedVersionError, match=r"Accelerator\._models"):
        _compat.undo_evaluation_only_prepare(trainer)


@pytest.mark.slow
def test_two_real_processes_evaluate_then_train_are_ddp_or_raise(tmp_path):
    """2 gloo processes, evaluate() then train(): DDP-wrapped as shipped; with the workaround switched off (as if
    accelerate renamed what it resets) the post-condition stops training on both ranks instead of drifting."""
    script = TESTS / "scripts" / "ddp_compat.py"
    launch_two_processes(script, [str(tmp_path)], hf_home=tmp_path / "hf_home", timeout=300)
    # accelerate >= 1.14 refuses to prepare a model twice ("can't double wrap"), which is what strands the model
    # that evaluate() prepared; before 1.14 train() wraps it anyway and the workaround has nothing to undo.
    refuses_twice = "_is_accelerate_prepared" in inspect.getsource(Accelerator.prepare_model)
    for rank in range(2):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["world_size"] == 2
        assert result["shipped"] == {"wrapped_as": "DistributedDataParallel"}, result
        if refuses_twice:  # never an unwrapped model training silently
            assert "did not wrap it in DistributedDataParallel" in result["no_undo"].get("error", ""), result
        else:
            assert result["no_undo"] == {"wrapped_as": "DistributedDataParallel"}, result


# ---- the declared range is the range CI proves -------------------------------------------------------------------

FLOORED = {"torch", "transformers", "accelerate", "peft", "trl"}


def _ci_block(title: str) -> list[str]:
    text = (ROOT / ".ci" / "run").read_text()
    match = re.search(rf'# --- README "{title}".*?\n(.*?)# --- end', text, flags=re.S)
    assert match, f'.ci/run has no README "{title}" block'
    return [line.strip() for line in match.group(1).splitlines() if line.strip() and not line.strip().startswith("#")]


def test_minimum_versions_leg_pins_exactly_the_declared_floors():
    (install,) = _ci_block("Supported versions")
    pins = dict(re.findall(r"\b([a-z]+)==([0-9][0-9.]*)", install))
    assert set(pins) == FLOORED, install
    pyproject = (ROOT / "pyproject.toml").read_text()
    for package, pinned in pins.items():
        floors = set(re.findall(rf'"{package}>=([0-9][0-9.]*)"', pyproject))
        assert len(floors) == 1, f"pyproject.toml declares {package} floors {floors}: one floor, in every place"
        assert Version(floors.pop()) == Version(pinned), f"{package}: pyproject floor != the min leg's pin {pinned}"
    assert Version(pins["transformers"]) == Version(_compat.TRANSFORMERS_MIN)


def test_readme_shows_the_minimum_versions_install_line():
    readme = (ROOT / "README.md").read_text()
    section = re.search(r"^### Supported versions\n(.*?)(?=^##)", readme, flags=re.S | re.M)
    assert section, "README.md has no '### Supported versions' section"
    lines = {line.strip() for block in re.findall(r"```bash\n(.*?)```", section.group(1), flags=re.S)
             for line in block.splitlines()}
    (install,) = _ci_block("Supported versions")
    assert install in lines
    for package in FLOORED:
        assert f"| {package} |" in section.group(1), f"README's table of floors lacks {package}"


def test_ci_never_masks_a_failing_or_empty_pytest_run():
    text = (ROOT / ".ci" / "run").read_text()
    assert "set -euo pipefail" in text
    pytest_lines = [line for line in text.splitlines() if "python -m pytest" in line]
    assert len(pytest_lines) >= 3  # main: default + slow; min: the exactness tests
    assert not any("||" in line or "; true" in line for line in pytest_lines), pytest_lines
