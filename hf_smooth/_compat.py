"""The one seam between hf_smooth and the internals of transformers / accelerate (peft, trl).

Every reliance on upstream state that is private, or only exists from some version on, lives here, each with the
versions it was written against and a loud failure when that state is missing, so that an upgrade breaks in one
known place with a message saying what changed instead of training silently wrong.

Written against: transformers 5.19-5.24, accelerate 1.4-1.15 (the floors CI proves are in pyproject.toml and the
minimum-versions leg of .ci/run).
"""

from __future__ import annotations

import importlib.metadata
import inspect
import weakref

from packaging.version import Version

import torch
from transformers import Trainer, TrainerCallback

__all__ = [
    "TRANSFORMERS_MIN",
    "DDPWrapCheck",
    "ResumableTrainOrder",
    "calling_trainer",
    "causal_lm_facts",
    "gather_generations_once",
    "prepare_inputs",
    "trainer_counts_shifted_labels",
    "check_model_wrapped_for_ddp",
    "check_trainer_supported",
    "expects_ddp",
    "undo_evaluation_only_prepare",
]

# transformers PR #49240 (first released in 5.19.0): the class attribute `Trainer.loss_is_scaled_for_ga`, read by
# `training_step` to skip its division by the accumulation steps. Before it, a loss already divided by the token
# count of the whole accumulation window was divided by the number of accumulation steps again whenever the
# model's forward takes no `**kwargs`, silently.
TRANSFORMERS_MIN = "5.19.0"
# The newest versions each touch below was checked against.
WRITTEN_AGAINST = {"transformers": "5.24.0", "accelerate": "1.15.0"}


class UnsupportedVersionError(RuntimeError):
    """An installed transformers / accelerate lacks state that hf_smooth relies on."""


def installed_version(package: str) -> str:
    return importlib.metadata.version(package)


def _needs(what: str, *, package: str = "transformers", minimum: str = TRANSFORMERS_MIN) -> UnsupportedVersionError:
    installed = installed_version(package)
    message = (
        f"hf_smooth needs {package} >= {minimum}, installed: {package} {installed}. {what} "
        f"Install a supported version: pip install '{package}>={minimum}'."
    )
    if Version(installed) > Version(WRITTEN_AGAINST[package]):
        message += (
            f" hf_smooth was last checked with {package} {WRITTEN_AGAINST[package]}: {installed} changed an internal "
            "that hf_smooth/_compat.py relies on; please report it (meanwhile, install that version)."
        )
    return UnsupportedVersionError(message)


# ---- transformers: the Trainer hooks SmoothLossMixin overrides or relies on -------------------------------------


def check_trainer_supported(trainer: Trainer) -> None:
    """Fail at construction if the Trainer lacks a hook `SmoothLossMixin` relies on (written against 5.19-5.24).

    - `Trainer.loss_is_scaled_for_ga`, declared on `Trainer` and read by the trainer module (`training_step`):
      without it every micro-batch loss is divided by the accumulation steps a second time.
    - `Trainer.get_batch_samples(epoch_iterator, num_batches, device)`: where the mixin counts the tokens of
      the whole accumulation window.
    - `Trainer.compute_loss(model, inputs, return_outputs, num_items_in_batch)`: where that count arrives.
    - `Trainer._save_checkpoint(model, trial)`, called on every process: where the mixin puts its `num_tokens` count
      into the checkpoint's trainer state (`save_checkpoint`).
    """
    if not isinstance(trainer, Trainer):
        raise TypeError(
            f"{type(trainer).__name__} is not a transformers.Trainer: put SmoothLossMixin before a Trainer class, "
            "e.g. class MyTrainer(SmoothLossMixin, Trainer)."
        )
    if "loss_is_scaled_for_ga" not in vars(Trainer) or not _trainer_module_reads("self.loss_is_scaled_for_ga"):
        raise _needs(
            f"{type(trainer).__name__} computes a loss already normalized over the accumulation window and tells "
            "Trainer.training_step so through `Trainer.loss_is_scaled_for_ga` (transformers PR #49240), which this "
            "transformers does not have or does not read; Trainer.training_step would divide its loss and "
            "gradients by the gradient accumulation steps a second time (silently, for models whose forward takes "
            "no **kwargs)."
        )
    _check_parameters("get_batch_samples", ["self", "epoch_iterator", "num_batches", "device"])
    _check_parameters("compute_loss", ["self", "model", "inputs", "return_outputs", "num_items_in_batch"])
    _check_parameters("_save_checkpoint", ["self", "model", "trial"])


def _trainer_module_reads(expression: str) -> bool:
    """Whether transformers' trainer module reads `expression` (the source, so a refactor inside it still counts)."""
    try:
        source = inspect.getsource(inspect.getmodule(Trainer))
    except (OSError, TypeError):  # no source shipped (e.g. a frozen install): trust the declaration
        return True
    return expression in source


def _check_parameters(name: str, expected: list[str]) -> None:
    found = list(inspect.signature(getattr(Trainer, name)).parameters)
    if found[: len(expected)] != expected:
        raise _needs(
            f"SmoothLossMixin overrides Trainer.{name}({', '.join(expected[1:])}), but this transformers defines "
            f"Trainer.{name}({', '.join(found[1:])})."
        )


def save_checkpoint(parent, model, trial) -> None:
    """The parent class's private ``Trainer._save_checkpoint`` (``parent`` is the mixin's ``super()``), which writes
    ``trainer_state.json`` with the state's ``stateful_callbacks`` (transformers 5.19-5.24)."""
    parent._save_checkpoint(model, trial)


# ---- accelerate: DDP after an evaluation-only preparation -------------------------------------------------------


def expects_ddp(trainer: Trainer) -> bool:
    """Whether `train()` must wrap the model in `DistributedDataParallel`: several processes of a plain
    data-parallel launch (accelerate's `MULTI_*` distributed types), a trainable model, and none of the setups that
    synchronize gradients another way (DeepSpeed, FSDP, tensor parallelism, transformers' distributed loading)."""
    accelerator = trainer.accelerator
    distributed_type = str(getattr(accelerator.distributed_type, "value", accelerator.distributed_type))
    parallelism = getattr(accelerator, "parallelism_config", None)  # accelerate >= 1.10; absent before
    return (
        accelerator.num_processes > 1
        and distributed_type.startswith("MULTI_")
        and not (trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled)
        and not (parallelism is not None and getattr(parallelism, "tp_enabled", False))
        and not getattr(trainer, "is_distributed_loading_by_transformers", False)  # transformers >= 5.19 feature
        and any(p.requires_grad for p in trainer.model.parameters())
    )


def undo_evaluation_only_prepare(trainer: Trainer) -> None:
    """Let `train()` wrap the model in DDP when `evaluate()` (or `predict()`) ran first.

    `Trainer.evaluation_loop` prepares a model that was never trained with
    ``accelerator.prepare_model(model, evaluation_mode=True)``: no DDP wrapper, but accelerate marks the model
    ``_is_accelerate_prepared`` and records it in ``Accelerator._models``; the ``accelerator.prepare(model,
    optimizer)`` of `train()` then returns it unwrapped (accelerate >= 1.14 refuses to prepare a model twice; before,
    it wrapped the model anyway and there is nothing to undo). Every rank would step on the gradient of its own
    micro-batches, never synchronized, and, since `compute_loss` scales the loss by the number of processes for
    DDP's averaging, num_processes times too large. Found with transformers 5.23 / accelerate 1.15 on 2 CPU processes
    (tests/test_distributed.py, evaluate() then train()). Undo the mark and the record so that `train()` prepares
    the model as if evaluate() had not run.

    Touches accelerate private state (written against accelerate 1.14-1.15): ``model._is_accelerate_prepared`` and
    ``Accelerator._models``. Should accelerate rename the mark, nothing is undone here, and `DDPWrapCheck` raises at
    the start of training instead of letting the ranks drift apart.
    """
    model = trainer.model
    if not (expects_ddp(trainer) and trainer.model_wrapped is model):
        return
    if not getattr(model, "_is_accelerate_prepared", False):
        return  # not prepared by an evaluation (or accelerate renamed the mark: DDPWrapCheck will say so)
    models = getattr(trainer.accelerator, "_models", None)
    if not isinstance(models, list):
        raise _needs(
            "after evaluate(), train() must re-prepare the model for DDP, which needs accelerate's "
            "Accelerator._models list (written against accelerate 1.15); this accelerate has none.",
            package="accelerate",
            minimum="1.4.0",
        )
    model._is_accelerate_prepared = False
    models[:] = [m for m in models if m is not model]


def check_model_wrapped_for_ddp(trainer: Trainer) -> None:
    """Post-condition of `train()`'s preparation: with several data-parallel processes the model that trains is a
    `DistributedDataParallel` (possibly under `torch.compile`), or the ranks would never synchronize gradients."""
    if not expects_ddp(trainer):
        return
    model = trainer.model_wrapped
    while hasattr(model, "_orig_mod") and not isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model._orig_mod  # torch.compile's OptimizedModule around the DDP wrapper
    if not isinstance(model, torch.nn.parallel.DistributedDataParallel):
        raise RuntimeError(
            f"train() prepared the model for {trainer.accelerator.num_processes} processes "
            f"({trainer.accelerator.distributed_type}) but did not wrap it in DistributedDataParallel (got "
            f"{type(trainer.model_wrapped).__name__}): each rank would step on its own gradients, never synchronized. "
            "This happens when the model was prepared earlier for evaluation only (evaluate() or predict() before "
            "train()) and hf_smooth could not undo that preparation with accelerate "
            f"{installed_version('accelerate')} and transformers {installed_version('transformers')} "
            f"(hf_smooth/_compat.py was last checked with accelerate {WRITTEN_AGAINST['accelerate']} and transformers "
            f"{WRITTEN_AGAINST['transformers']}). Work around it by calling train() before evaluate(), and please "
            "report it."
        )


class DDPWrapCheck(TrainerCallback):
    """Checks `check_model_wrapped_for_ddp` at `on_train_begin`: after `train()` prepared the model, before step 1."""

    def __init__(self, trainer: Trainer):
        self._trainer = weakref.ref(trainer)  # the trainer holds this callback: no reference cycle

    def on_train_begin(self, args, state, control, **kwargs):
        trainer = self._trainer()
        if trainer is not None:
            check_model_wrapped_for_ddp(trainer)


# ---- transformers: model facts read from its internal tables ------------------------------------------------------


def causal_lm_facts(model) -> tuple[bool, bool]:
    """``(registered, causal_loss)`` for an (unwrapped) model: whether its class is registered as a causal LM
    (`MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`), and whether its `loss_type` maps to transformers' causal-LM loss
    (`transformers.loss.loss_utils.LOSS_MAPPING`). Written against transformers 5.19-5.24."""
    try:
        from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError as error:
        raise _needs(
            f"hf_smooth decides whether a model's logits are shifted from transformers' loss and model tables, which "
            f"this transformers does not have ({error}). Set smoothing_shift_labels explicitly to bypass it."
        ) from error
    registered = type(model).__name__ in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    causal_loss = LOSS_MAPPING.get(getattr(model, "loss_type", None)) is ForCausalLMLoss
    return registered, causal_loss


def trainer_counts_shifted_labels(model) -> bool:
    """Whether `Trainer` counts `num_items_in_batch` over ``labels[..., 1:]`` for this (unwrapped) model: its private
    rule in transformers 5.19-5.24 (the model's loss type is the causal-LM loss and it is not encoder-decoder).
    `SmoothedLoss` warns when that rule over-counts what it scores; `SmoothTrainer` counts itself."""
    config = getattr(model, "config", None)
    return causal_lm_facts(model)[1] and not getattr(config, "is_encoder_decoder", False)


# ---- transformers: Trainer internals used by the mixin and SmoothedLoss -------------------------------------------


def prepare_inputs(trainer: Trainer, inputs):
    """`Trainer._prepare_inputs` (device placement of a batch; private in transformers 5.19-5.24)."""
    method = getattr(trainer, "_prepare_inputs", None)
    if method is None:
        raise _needs("hf_smooth scores evaluation batches itself and moves them with Trainer._prepare_inputs.")
    return method(inputs)


def calling_trainer(max_depth: int = 8):
    """The `Trainer` whose `compute_loss` called a ``compute_loss_func``, found on the call stack, or None.

    transformers 5.19-5.24 call ``self.compute_loss_func(outputs, labels, num_items_in_batch=...)`` from
    `Trainer.compute_loss`, so the trainer is the ``self`` of a frame or two above the loss function.
    """
    frame = inspect.currentframe()
    try:
        for _ in range(max_depth):
            frame = frame.f_back if frame is not None else None
            if frame is None:
                return None
            candidate = frame.f_locals.get("self")
            if isinstance(candidate, Trainer):
                return candidate
        return None
    finally:
        del frame


def gather_generations_once(trainer: Trainer) -> None:
    """Make `Seq2SeqTrainer` gather generated ids with ``gather_for_metrics`` for one sequence per input.

    `Seq2SeqTrainer.evaluate` sets ``trainer.gather_function = accelerator.gather`` (transformers #27025, for
    ``num_return_sequences > 1``, #25231), which keeps the samples the distributed sampler repeats to even out the
    last batch: 21 pairs on 2 ranks x 4 gave BLEU over 24 hypotheses. With one sequence per input,
    ``gather_for_metrics`` drops the repeats, as the token metrics already do. Reads the private ``_gen_kwargs``
    that `Seq2SeqTrainer.evaluate` stores (transformers 5.19-5.24); when it is missing, the generation config decides.
    """
    returns = (getattr(trainer, "_gen_kwargs", None) or {}).get("num_return_sequences")
    generation_config = getattr(getattr(trainer, "model", None), "generation_config", None)
    returns = returns or getattr(generation_config, "num_return_sequences", None) or 1
    if returns == 1 and hasattr(trainer, "gather_function"):
        trainer.gather_function = trainer.accelerator.gather_for_metrics


# ---- transformers: a length-grouped training order that resumes exactly --------------------------------------------


def _epoch_seeded(base, seed: int):
    from transformers.trainer_pt_utils import LengthGroupedSampler

    class EpochSeededLengthGroupedSampler(LengthGroupedSampler):
        """`LengthGroupedSampler` whose shuffle depends only on (seed, epoch), through `set_epoch` (which the Trainer
        and accelerate's data loaders call at every epoch, also on the loader that skips batches when resuming)."""

        def __init__(self):
            super().__init__(base.batch_size, lengths=base.lengths, generator=torch.Generator())
            self.seed, self.epoch = seed, 0

        def set_epoch(self, epoch: int) -> None:
            self.epoch = epoch

        def __iter__(self):
            self.generator.manual_seed(self.seed + self.epoch)
            return super().__iter__()

    return EpochSeededLengthGroupedSampler()


class ResumableTrainOrder:
    """Mixin (inherited by `SmoothLossMixin`): `group_by_length` batches resume in the same order.

    transformers 5.19-5.24 build the training `LengthGroupedSampler` without a generator, so each epoch's order is
    drawn from the global RNG when the epoch starts. A run resumed in epoch e >= 1 draws it right after start-up (the
    checkpoint's RNG state is restored only after the first batch), so its data order, and loss curve, differ from
    the uninterrupted run's (measured: step 7 loss 5.2851 resumed vs 5.2601). With a generator seeded by
    (data_seed or seed) + epoch the order is the same either way. The random sampler needs nothing: accelerate seeds
    it per epoch. Overrides the private `Trainer._get_train_sampler(train_dataset)`; if upstream starts passing a
    generator this steps aside.
    """

    def _get_train_sampler(self, *args, **kwargs):
        from transformers.trainer_pt_utils import LengthGroupedSampler

        sampler = super()._get_train_sampler(*args, **kwargs)
        if type(sampler) is LengthGroupedSampler and sampler.generator is None:
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            return _epoch_seeded(sampler, seed)
        return sampler
