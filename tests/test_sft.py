"""`SmoothSFTTrainer` (hf_smooth.sft): TRL's SFTTrainer with hf_smooth's loss, in TRL's three masking modes.

Every expected number comes from outside the code under test: the tokens that must be scored are rebuilt from the
raw rows (prompt words, chat turns) with the tokenizer's vocabulary, each sequence is run alone through a float64
copy of the model at that step, and the objective, accuracy and entropy are computed there by the naive formulas.
"""

from __future__ import annotations

import copy
import importlib.metadata
import re
import sys
import warnings

import pytest
import torch
from packaging.version import Version
from tiny_models import BUILDERS
from trl_sft_pieces import sft_pieces

from hf_smooth import SmoothedLoss, SmoothingArguments, SmoothLossMixin

ALPHA = 0.1
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}user {{ m['content'] }} "
    "{% else %}assistant {% generation %}{{ m['content'] }}[EOS]{% endgeneration %} {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}assistant {% endif %}"
)
MODES = ("completion_only", "assistant_only", "padding_free")


# ---- data: rows and, independently of TRL, the tokens each row must score ---------------------------------------


def completion_rows(n: int = 8) -> list[dict]:
    """Prompt/completion rows of different lengths (so padded batches have padding)."""
    return [
        {
            "prompt": " ".join(["question", str(i)] + ["question", str((i * 3) % 17)] * (i % 3)),
            "completion": " " + " ".join(["answer", str(i * 7 % 11)] + ["done"] * (1 + i % 2)),
        }
        for i in range(n)
    ]


def chat_rows(n: int = 8) -> list[dict]:
    return [
        {
            "messages": [
                {"role": "user", "content": f"question {i}"},
                {"role": "assistant", "content": " ".join(["answer", str(i * 7 % 11)] + ["done"] * (i % 3))},
                {"role": "user", "content": f"question {i + 1} question"},
                {"role": "assistant", "content": f"answer {i % 5}"},
            ]
        }
        for i in range(n)
    ]


def expected_completion(tokenizer, row) -> tuple[list[int], list[bool]]:
    """(token ids, scored per token): prompt words unscored, completion words and the EOS TRL appends scored."""
    prompt, completion = row["prompt"].split(), row["completion"].split()
    ids = tokenizer.convert_tokens_to_ids(prompt + completion) + [tokenizer.eos_token_id]
    return ids, [False] * len(prompt) + [True] * (len(completion) + 1)


def expected_chat(tokenizer, row) -> tuple[list[int], list[bool]]:
    """The chat template by hand: role words and user turns unscored, assistant content and its [EOS] scored."""
    ids, scored = [], []
    for message in row["messages"]:
        words = message["content"].split()
        ids += tokenizer.convert_tokens_to_ids([message["role"]] + words)
        if message["role"] == "user":
            scored += [False] * (1 + len(words))
        else:
            ids.append(tokenizer.eos_token_id)
            scored += [False] + [True] * (len(words) + 1)
    return ids, scored


def sft_setup(tmp_path, mode: str, **config_extra):
    """(trl, trainer kwargs, {ids tuple: scored mask}) for one masking mode, on the word-level tokenizer of
    trl_sft_pieces extended by the two role words of the chat template."""
    from datasets import Dataset

    trl, tokenizer, _, _, _ = sft_pieces(tmp_path)
    tokenizer.add_tokens(["user", "assistant"])
    tokenizer.chat_template = CHAT_TEMPLATE
    if mode == "assistant_only":
        rows, expect = chat_rows(), expected_chat
        options = dict(assistant_only_loss=True, max_length=64)
    else:
        rows, expect = completion_rows(), expected_completion
        options = dict(completion_only_loss=True, max_length=64)
        if mode == "padding_free":
            options.update(padding_free=True, max_length=None)
    options = dict(per_device_train_batch_size=4, max_steps=2, learning_rate=1e-2, save_strategy="no", **options)
    options.update(config_extra)
    config = trl.SFTConfig(
        output_dir=str(tmp_path / "sft"), report_to=[], use_cpu=True, logging_steps=1, disable_tqdm=True, **options
    )
    expected = {}
    for row in rows:
        ids, scored = expect(tokenizer, row)
        assert tokenizer.unk_token_id not in ids
        expected[tuple(ids)] = scored
    model = BUILDERS["llama"](0, vocab=len(tokenizer))
    kwargs = dict(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    return trl, kwargs, expected


# ---- the float64 oracle ----------------------------------------------------------------------------------------


def sequences_of(inputs) -> list[torch.Tensor]:
    """The real token sequences of a collated batch: rows without padding, or the segments of a padding-free row."""
    ids = inputs["input_ids"]
    if inputs.get("attention_mask") is not None:
        return [row[mask.bool()] for row, mask in zip(ids, inputs["attention_mask"])]
    (flat,), (positions,) = ids, inputs["position_ids"]
    starts = (positions == 0).nonzero().flatten().tolist() + [flat.numel()]
    return [flat[a:b] for a, b in zip(starts[:-1], starts[1:])]


def oracle_sums(model, inputs, expected: dict, method: str) -> dict[str, float]:
    """Per-token sums over the expected scored tokens of the batch, each sequence alone through a float64 copy of
    the model: objective, NLL, correct argmax, entropy, count; and the input tokens (TRL's num_tokens)."""
    reference = copy.deepcopy(model).double().eval()
    sums = dict.fromkeys(("objective", "nll", "correct", "entropy", "count", "input_tokens"), 0.0)
    for sequence in sequences_of(inputs):
        key = tuple(sequence.tolist())
        assert key in expected, f"TRL built a sequence the oracle does not know: {key}"
        scored = torch.tensor(expected[key][1:])
        with torch.no_grad():
            logits = reference(input_ids=sequence[None]).logits[0, :-1][scored]
        targets = sequence[1:][scored]
        log_p = torch.log_softmax(logits, dim=-1)
        nll = -log_p.gather(-1, targets[:, None]).squeeze(-1)
        if method == "label_smoothing":  # PyTorch convention: (1 - eps) * onehot + eps / K
            objective = (1 - ALPHA) * nll - ALPHA * log_p.mean(-1)
        else:  # MaxSup: CE + alpha * (z_max - mean z)
            objective = nll + ALPHA * (logits.max(-1).values - logits.mean(-1))
        sums["objective"] += objective.sum().item()
        sums["nll"] += nll.sum().item()
        sums["correct"] += (logits.argmax(-1) == targets).sum().item()
        sums["entropy"] += -(log_p.exp() * log_p).sum(-1).sum().item()
        sums["count"] += float(scored.sum())
        sums["input_tokens"] += sequence.numel()
    return sums


def next_token_scored(inputs, expected: dict) -> torch.Tensor:
    """(B, T) bool: whether the hidden state at each position predicts a token that must be scored."""
    ids = inputs["input_ids"]
    out = torch.zeros(ids.shape, dtype=torch.bool)
    if inputs.get("attention_mask") is not None:
        for b, sequence in enumerate(sequences_of(inputs)):
            out[b, : sequence.numel() - 1] = torch.tensor(expected[tuple(sequence.tolist())][1:])
        return out
    offset = 0
    for sequence in sequences_of(inputs):
        n = sequence.numel()
        out[0, offset : offset + n - 1] = torch.tensor(expected[tuple(sequence.tolist())][1:])
        offset += n
    return out


def spying(trainer_cls, expected: dict, method: str, record: list):
    """A subclass that, at every training micro-batch, records the oracle sums (model as it is at that step), the
    loss the trainer returned and the gradient reaching the final hidden states (the input of the output layer)."""

    class Spy(trainer_cls):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training:
                record.append({"oracle": oracle_sums(model, inputs, expected, method), "inputs": dict(inputs)})
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if model.training:
                record[-1]["loss"] = loss.item()
            return loss

        def training_step(self, model, inputs, *args, **kwargs):
            captured = {}
            backbone = model.model

            def keep(module, _args, output):
                if module is not backbone:  # the oracle's deep copy carries the hook along
                    return
                hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state
                hidden.retain_grad()
                captured["hidden"] = hidden

            handle = backbone.register_forward_hook(keep)
            try:
                loss = super().training_step(model, inputs, *args, **kwargs)
            finally:
                handle.remove()
            record[-1]["hidden_grad"] = captured["hidden"].grad.detach().clone()
            return loss

    return Spy


# ---- the three masking modes -----------------------------------------------------------------------------------

CASES = [(mode, fused, method) for mode in MODES for fused in (False, True) for method in ("label_smoothing", "maxsup")]
assert len(CASES) == 12


@pytest.mark.parametrize(("mode", "fused", "method"), CASES)
def test_sft_modes_train_on_exactly_the_masked_tokens(tmp_path, mode, fused, method):
    trl, kwargs, expected = sft_setup(tmp_path, mode)
    from hf_smooth import SmoothSFTTrainer

    record: list[dict] = []
    smoothing = SmoothingArguments(smoothing_method=method, smoothing_alpha=ALPHA, smoothing_fused_loss=fused)
    trainer = spying(SmoothSFTTrainer, expected, method, record)(**kwargs, smoothing_args=smoothing)
    assert isinstance(trainer, trl.SFTTrainer)
    trainer.train()
    assert trainer.fused_loss_active is fused, trainer.fused_fallback_reason
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(record) == len(logs) == 2  # GA 1, one process: one micro-batch per logged step

    input_tokens = 0.0
    for step, log in zip(record, logs):
        inputs, oracle = step["inputs"], step["oracle"]
        if mode == "padding_free":
            assert inputs["input_ids"].shape[0] == 1 and "attention_mask" not in inputs
        else:
            assert inputs["input_ids"].shape[0] == 4
        count = oracle["count"]
        assert count > 0
        # TRL's labels score exactly the tokens rebuilt from the raw rows
        scored = next_token_scored(inputs, expected)
        assert torch.equal(inputs["labels"][..., 1:] != -100, scored[..., :-1]) and not scored[..., -1].any()
        assert scored.sum().item() == count
        # the loss: the float64 objective over exactly those tokens, per token
        assert step["loss"] == pytest.approx(oracle["objective"] / count, rel=1e-5)
        assert log["loss"] == pytest.approx(oracle["objective"] / count, rel=1e-5)
        assert log["nll"] == pytest.approx(oracle["nll"] / count, rel=1e-5)
        # prompt / user / padding positions send no gradient into the output layer; scored ones do
        grad_norm = step["hidden_grad"].norm(dim=-1)
        assert grad_norm[~scored].max().item() == 0.0
        assert grad_norm[scored].min().item() > 0.0
        # TRL's metrics, TRL's names
        assert log["mean_token_accuracy"] == pytest.approx(oracle["correct"] / count, abs=1e-9)
        assert log["entropy"] == pytest.approx(oracle["entropy"] / count, rel=1e-5)
        input_tokens += oracle["input_tokens"]
        assert log["num_tokens"] == input_tokens  # cumulative input tokens, prompts included, as TRL counts
    assert logs[0]["num_tokens"] < logs[1]["num_tokens"]


def test_num_tokens_continues_when_resumed(tmp_path):
    """A run resumed from the step-1 checkpoint logs the same cumulative num_tokens as the uninterrupted run."""
    from hf_smooth import SmoothSFTTrainer

    smoothing = SmoothingArguments(smoothing_method="maxsup", smoothing_alpha=ALPHA)
    _, kwargs, _ = sft_setup(tmp_path, "completion_only", max_steps=3, save_strategy="steps", save_steps=1)
    whole = SmoothSFTTrainer(**kwargs, smoothing_args=smoothing)
    whole.train()
    expected = [log["num_tokens"] for log in whole.state.log_history if "loss" in log]

    _, kwargs, _ = sft_setup(tmp_path, "completion_only", max_steps=3, save_strategy="no")
    resumed = SmoothSFTTrainer(**kwargs, smoothing_args=smoothing)
    resumed.train(resume_from_checkpoint=str(tmp_path / "sft" / "checkpoint-1"))
    got = [log["num_tokens"] for log in resumed.state.log_history if "loss" in log]
    assert len(expected) == len(got) == 3 and expected[0] < expected[1] < expected[2]
    assert got == expected


# ---- import, warnings, what TRL refuses ----------------------------------------------------------------------------


def test_import_is_lazy_and_says_what_to_install_without_trl(monkeypatch):
    """`import hf_smooth` does not import trl (tests/test_package_boundary.py checks that in a fresh interpreter);
    the name resolves on first access, and without trl it raises an ImportError saying what to install."""
    trl = pytest.importorskip("trl")
    import hf_smooth
    from hf_smooth import SmoothSFTTrainer

    assert issubclass(SmoothSFTTrainer, trl.SFTTrainer) and issubclass(SmoothSFTTrainer, SmoothLossMixin)
    assert hf_smooth.SmoothSFTTrainer is SmoothSFTTrainer
    with pytest.raises(AttributeError, match="no attribute 'NoSuchThing'"):
        hf_smooth.NoSuchThing  # noqa: B018

    monkeypatch.setitem(sys.modules, "trl", None)  # as if trl were not installed (restored after the test)
    monkeypatch.delitem(sys.modules, "hf_smooth.sft")
    with pytest.raises(ImportError, match=re.escape('pip install "hf_smooth[trl]"')):
        from hf_smooth import SmoothSFTTrainer  # noqa: F401, F811


def test_smoothed_loss_inside_sft_trainer_points_to_smooth_sft_trainer(tmp_path):
    trl, tokenizer, data, model, config = sft_pieces(tmp_path)
    loss = SmoothedLoss(smoothing_method="label_smoothing", smoothing_alpha=ALPHA)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trl.SFTTrainer(
            model=model, args=config, train_dataset=data, processing_class=tokenizer, compute_loss_func=loss,
            callbacks=[loss],
        )
    ours = [w for w in caught if "SmoothSFTTrainer" in str(w.message)]
    assert len(ours) == 1 and "compute_loss_func" in str(ours[0].message)


def test_trl_loss_types_that_would_be_ignored_are_refused(tmp_path):
    trl, tokenizer, data, model, config = sft_pieces(tmp_path, loss_type="dft")
    from hf_smooth import SmoothSFTTrainer

    with pytest.raises(ValueError, match="loss_type='dft'"):
        SmoothSFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer)


def test_label_smoothing_factor_is_exact_label_smoothing_without_trls_warning(tmp_path):
    """TRL >= 1.15 warns that label_smoothing_factor costs an extra forward in SFTTrainer; not here, where the mixin
    takes it as hf_smooth's label smoothing with that epsilon."""
    trl, tokenizer, data, model, config = sft_pieces(tmp_path, label_smoothing_factor=0.2)
    from hf_smooth import SmoothSFTTrainer

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = SmoothSFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer)
    assert not [w for w in caught if "label_smoothing_factor" in str(w.message)]
    options = trainer.smoothing_args
    assert (options.smoothing_method, options.smoothing_alpha, options.smoothing_convention) == (
        "label_smoothing", 0.2, "uniform")


def test_peft_on_lm_head(tmp_path):
    """TRL 1.16 refuses a PEFT adapter on lm_head in SFTTrainer.__init__ (its fused LM head reads lm_head.weight),
    and so for SmoothSFTTrainer too, although hf_smooth's loss would train it; TRL 1.0 accepts it."""
    peft = pytest.importorskip("peft")
    trl, tokenizer, data, model, config = sft_pieces(tmp_path)
    from hf_smooth import SmoothSFTTrainer

    lora = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "lm_head"], lora_dropout=0.0)
    build = dict(model=peft.get_peft_model(model, lora), args=config, train_dataset=data, processing_class=tokenizer)
    if Version(importlib.metadata.version("trl")) >= Version("1.16"):
        with pytest.raises(ValueError, match="lm_head"):
            SmoothSFTTrainer(**build)
        return
    trainer = SmoothSFTTrainer(**build)
    head = trainer.model.get_output_embeddings()
    before = {k: v.detach().clone() for k, v in head.named_parameters() if "lora_B" in k}
    trainer.train()
    assert before and all(not torch.equal(before[k], v) for k, v in head.named_parameters() if k in before)


# ---- mixture of experts: the aux loss once -------------------------------------------------------------------------


def tiny_mixtral(vocab: int):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
        pad_token_id=0, eos_token_id=2, output_router_logits=True, router_aux_loss_coef=0.5, tie_word_embeddings=False,
    )
    return MixtralForCausalLM(config)


@pytest.mark.parametrize("fused", [False, True])
def test_moe_aux_loss_is_added_once(tmp_path, fused):
    """At smoothing 'none' and learning rate 0 the logged objective is the model's own loss on the batch
    (CE over the completion tokens + 0.5 * aux_loss): neither TRL nor the model adds the aux term a second time."""
    trl, kwargs, expected = sft_setup(tmp_path, "completion_only", learning_rate=0.0, max_steps=1)
    from hf_smooth import SmoothSFTTrainer

    kwargs["model"] = model = tiny_mixtral(kwargs["model"].config.vocab_size)
    own = []

    class Spy(SmoothSFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            with torch.no_grad():
                own.append(model(**{k: v for k, v in inputs.items() if k != "labels"}, labels=inputs["labels"]))
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    trainer = Spy(**kwargs, smoothing_args=SmoothingArguments(smoothing_method="none", smoothing_fused_loss=fused))
    trainer.train()
    assert trainer.fused_loss_active is fused
    (log,) = [log for log in trainer.state.log_history if "loss" in log]
    (reference,) = own
    assert reference.aux_loss is not None and reference.aux_loss.item() > 0
    assert log["aux_loss"] == pytest.approx(reference.aux_loss.item(), rel=1e-5)
    assert log["loss"] == pytest.approx(reference.loss.item(), rel=1e-5)
    assert log["loss"] == pytest.approx(log["nll"] + 0.5 * log["aux_loss"], rel=1e-6)
    assert model.config.output_router_logits


# ---- evaluation ------------------------------------------------------------------------------------------------


def test_evaluate_scores_the_completion_tokens(tmp_path):
    trl, kwargs, expected = sft_setup(tmp_path, "completion_only", per_device_eval_batch_size=3)
    from hf_smooth import SmoothSFTTrainer

    kwargs["eval_dataset"] = kwargs["train_dataset"]
    trainer = SmoothSFTTrainer(**kwargs, smoothing_args=SmoothingArguments(smoothing_method="maxsup",
                                                                            smoothing_alpha=ALPHA))
    metrics = trainer.evaluate()
    sums = dict.fromkeys(("objective", "nll", "correct", "count"), 0.0)
    for batch in trainer.get_eval_dataloader():
        for name, value in oracle_sums(trainer.model, batch, expected, "maxsup").items():
            if name in sums:
                sums[name] += value
    assert sums["count"] == sum(sum(mask[1:]) for mask in expected.values())
    assert metrics["eval_loss"] == pytest.approx(sums["objective"] / sums["count"], rel=1e-5)
    assert metrics["eval_nll"] == pytest.approx(sums["nll"] / sums["count"], rel=1e-5)
    assert metrics["eval_mean_token_accuracy"] == pytest.approx(sums["correct"] / sums["count"], abs=1e-9)
