"""The other ways in: SmoothedLoss as a compute_loss_func, the mixin on TRL's SFTTrainer, PEFT LoRA."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import BUILDERS, ListDataset, PadCollator, causal_examples
from trainer_helpers import ALPHA, LR, checkpointing_args, max_diff, reference_step
from trl_sft_pieces import compute_loss_func_deprecation, sft_pieces
from transformers import Trainer, TrainingArguments

from hf_smooth import SmoothedLoss, SmoothingArguments, SmoothLossMixin, SmoothTrainer


def plain_args(tmp_path, **extra):
    defaults = dict(
        output_dir=str(tmp_path / "plain"), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=1,
        learning_rate=LR, optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0, report_to=[], use_cpu=True,
        logging_steps=1, save_strategy="no", disable_tqdm=True, seed=0,
    )
    defaults.update(extra)
    return TrainingArguments(**defaults)


@pytest.mark.parametrize("method", ["label_smoothing", "maxsup"])
def test_smoothed_loss_in_plain_trainer_matches_reference(method, tmp_path):
    examples = causal_examples(4)
    expected, expected_loss = reference_step(BUILDERS["llama"](0), "llama", examples, method)
    model = BUILDERS["llama"](0)
    loss = SmoothedLoss(smoothing_method=method, smoothing_alpha=ALPHA)
    trainer = Trainer(
        model=model, args=plain_args(tmp_path), train_dataset=ListDataset(examples), data_collator=PadCollator(),
        compute_loss_func=loss, callbacks=[loss],
    )
    trainer.train()
    assert max_diff({k: v.detach() for k, v in model.named_parameters()}, expected) < 1e-6
    log = trainer.state.log_history[0]
    assert log["loss"] == pytest.approx(expected_loss, rel=1e-5)
    assert "nll" in log and "smoothing_alpha" in log


def test_smoothed_loss_rejects_silent_configurations(tmp_path):
    model = BUILDERS["llama"](0)
    loss = SmoothedLoss(smoothing_method="maxsup")
    with pytest.raises(ValueError, match="label_smoothing_factor=0.1 .*contradicts smoothing_method='maxsup'"):
        Trainer(model=model, args=plain_args(tmp_path, label_smoothing_factor=0.1), compute_loss_func=loss,
                callbacks=[loss])
    unregistered = SmoothedLoss(smoothing_method="maxsup")
    logits = torch.randn(1, 4, 8)
    with pytest.raises(ValueError, match="shifted"):
        unregistered({"logits": logits}, torch.tensor([[1, 2, 3, 4]]))
    scheduled = SmoothedLoss(
        smoothing_method="maxsup", smoothing_alpha_end=0.2, smoothing_schedule="linear", model=model
    )
    with pytest.raises(ValueError, match="callbacks"):
        scheduled({"logits": logits}, torch.tensor([[1, 2, 3, 4]]))

    class FakeArgs:
        label_smoothing_factor = 0.0
        loss_type = "chunked_nll"

    with pytest.raises(ValueError, match="loss_type"):
        SmoothedLoss(smoothing_method="maxsup").on_init_end(FakeArgs(), None, None, model=model)


def test_smoothed_loss_warns_about_gpt2_count():
    with pytest.warns(UserWarning, match="num_items_in_batch"):
        SmoothedLoss(smoothing_method="maxsup", model=BUILDERS["gpt2"](0))


def test_peft_lora_trains_only_adapters_with_gradient_checkpointing(tmp_path):
    peft = pytest.importorskip("peft")
    base = BUILDERS["llama"](0)
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    model = peft.get_peft_model(base, config)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    args = SmoothingArguments(smoothing_method="maxsup", smoothing_alpha=ALPHA)
    targs = plain_args(tmp_path, **checkpointing_args(), learning_rate=0.5, max_steps=2)
    trainer = SmoothTrainer(
        model=model, args=targs, smoothing_args=args, train_dataset=ListDataset(causal_examples(8)),
        data_collator=PadCollator(),
    )
    trainer.train()
    changed = {k for k, v in model.named_parameters() if not torch.equal(v.detach(), before[k])}
    assert changed, "no parameter changed"
    assert all("lora_" in k for k in changed), sorted(changed)
    assert any("lora_B" in k for k in changed)  # B starts at zero: it only moves with a real gradient
    # the shift is decided through the PEFT wrapper (a name list on PeftModelForCausalLM would miss it)
    assert trainer._shift(model) is True


def test_peft_lora_matches_reference_update(tmp_path):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                             init_lora_weights=False)
    model = peft.get_peft_model(BUILDERS["llama"](0), config)
    reference = copy.deepcopy(model)
    examples = causal_examples(4)
    expected, _ = reference_step(reference, "llama", examples, "label_smoothing")
    trainer = SmoothTrainer(
        model=model, args=plain_args(tmp_path), train_dataset=ListDataset(examples), data_collator=PadCollator(),
        smoothing_args=SmoothingArguments(smoothing_method="label_smoothing", smoothing_alpha=ALPHA),
    )
    trainer.train()
    assert max_diff({k: v.detach() for k, v in model.named_parameters()}, expected) < 1e-6


def test_trl_sft_trainer_with_mixin_completion_only(tmp_path):
    trl, tokenizer, data, model, config = sft_pieces(tmp_path)

    class SmoothSFTTrainer(SmoothLossMixin, trl.SFTTrainer):
        pass

    trainer = SmoothSFTTrainer(
        model=model, args=config, train_dataset=data, processing_class=tokenizer,
        smoothing_args=SmoothingArguments(smoothing_method="maxsup", smoothing_alpha=ALPHA),
    )
    batch = next(iter(trainer.get_train_dataloader()))
    assert (batch["labels"] == -100).any() and (batch["labels"] != -100).any()  # prompts masked
    trainer.train()
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(logs) == 2 and all("nll" in log for log in logs)
    # the objective equals MaxSup of the model's logits on completion tokens only
    model.eval()
    batch = {k: v.to(model.device) for k, v in batch.items()}
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
    from hf_smooth import maxsup_loss

    expected = maxsup_loss(logits[:, :-1], batch["labels"][:, 1:], alpha=ALPHA)
    trainer.model.eval()
    got = trainer.compute_loss(model, batch)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)


def test_trl_sft_trainer_with_smoothed_loss(tmp_path):
    trl, tokenizer, data, model, config = sft_pieces(tmp_path, loss_type="nll")
    loss = SmoothedLoss(smoothing_method="label_smoothing", smoothing_alpha=ALPHA)
    with compute_loss_func_deprecation():
        trainer = trl.SFTTrainer(
            model=model, args=config, train_dataset=data, processing_class=tokenizer, compute_loss_func=loss,
            callbacks=[loss],
        )
    trainer.train()
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(logs) == 2 and all("nll" in log and log["loss"] > 0 for log in logs)
