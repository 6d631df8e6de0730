"""The loss family beyond LS and MaxSup (issue 13 items 1-3, issue 12 item 3): z-loss, per-token weights, smoothing
over a restricted set of classes, the entropy sum, and no host-device sync per chunk.

Every expected number comes from tests/oracles.py (``family_rows``, ``weighted_reduce``): the target distribution
built in full and ``torch.logsumexp`` in float64, independent of hf_smooth. Materialized (``smoothed_cross_entropy``)
and fused (``fused_linear_smoothed_loss``) paths are both checked, values and gradients, at float64 (1e-9).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import hf_smooth.losses as losses
from hf_smooth import LossComponents, label_smoothing_loss, maxsup_loss, smoothed_cross_entropy
from hf_smooth.fused import OutputHead, fused_linear_smoothed_loss
from oracles import family_rows, weighted_reduce

TOL = dict(rtol=1e-9, atol=1e-10)


@dataclass(frozen=True)
class Knobs:
    epsilon: float = 0.0
    alpha: float = 0.0
    convention: str = "uniform"

    def __str__(self):
        if self.epsilon and self.alpha:
            return f"ls{self.epsilon}-{self.convention}+maxsup{self.alpha}"
        if self.epsilon:
            return f"ls{self.epsilon}-{self.convention}"
        return f"maxsup{self.alpha}" if self.alpha else "ce"

    def kwargs(self):
        return dict(epsilon=self.epsilon, alpha=self.alpha, convention=self.convention)


METHODS = [
    Knobs(),
    Knobs(epsilon=0.1),
    Knobs(epsilon=0.2, convention="fairseq"),
    Knobs(alpha=0.3),
    Knobs(epsilon=0.1, alpha=0.2, convention="fairseq"),
]

# (z_loss, weighted, restriction) -- restriction: None, "num_classes", "exclude_ids" or "both".
FAMILY = [
    (1e-2, False, None),
    (0.0, True, None),
    (0.0, False, "num_classes"),
    (0.0, False, "exclude_ids"),
    (0.5, True, "both"),
]

V, H = 13, 6


def test_tables_are_not_empty():
    assert len(METHODS) * len(FAMILY) >= 25


def _restriction(kind):
    """(kwargs for hf_smooth, the float64 oracle's mask)."""
    mask = torch.ones(V, dtype=torch.bool)
    kwargs = {}
    if kind in ("num_classes", "both"):
        kwargs["num_classes"] = 10
        mask[10:] = False
    if kind in ("exclude_ids", "both"):
        kwargs["exclude_ids"] = [0, 4]
        mask[[0, 4]] = False
    return kwargs, (None if kind is None else mask)


def _inputs(seed=0, shape=(3, 5)):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64)
    bias = torch.randn(V, generator=g, dtype=torch.float64)
    labels = torch.randint(V, shape, generator=g)
    labels.view(-1)[[1, 7]] = -100
    labels.view(-1)[[2, 9]] = torch.tensor([4, 11])  # labels inside excluded classes (exclude_ids, num_classes)
    weights = torch.rand(shape, generator=g, dtype=torch.float64) * 2.0
    weights.view(-1)[3] = 0.0
    weights.view(-1)[1] = 5.0  # an ignored position: its weight counts for nothing
    return hidden, weight, bias, labels, weights


def _oracle(logits, labels, knobs, z_loss, mask, weights, reduction, num_items=None):
    rows = family_rows(logits, labels, **knobs.kwargs(), z_loss=z_loss, smoothing_mask=mask)
    w = torch.ones_like(rows) if weights is None else weights
    w = torch.where(labels == -100, 0.0, w)
    return weighted_reduce(rows, w, reduction=reduction, num_items_in_batch=num_items)


def _value_and_grads(fn, tensors, reduction):
    leaves = [t.clone().requires_grad_(True) for t in tensors]
    out = fn(*leaves)
    upstream = torch.linspace(0.5, 1.5, out.numel(), dtype=torch.float64).reshape(out.shape)
    grads = torch.autograd.grad(out, leaves, upstream)
    return out.detach(), grads


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("family", FAMILY, ids=lambda f: f"z{f[0]}-{'w' if f[1] else 'nw'}-{f[2]}")
@pytest.mark.parametrize("knobs", METHODS, ids=str)
def test_materialized_and_fused_match_the_float64_oracle(knobs, family, reduction):
    z_loss, weighted, kind = family
    hidden, weight, bias, labels, weights = _inputs()
    restrict, mask = _restriction(kind)
    weights = weights if weighted else None
    extra = dict(z_loss=z_loss, weights=weights, **restrict)

    def oracle(h, w, b):
        return _oracle(h @ w.T + b, labels, knobs, z_loss, mask, weights, reduction)

    def materialized(h, w, b):
        return smoothed_cross_entropy(h @ w.T + b, labels, **knobs.kwargs(), reduction=reduction, chunk_size=4,
                                      **extra)

    def fused(h, w, b):
        return fused_linear_smoothed_loss(h, w, labels, bias=b, **knobs.kwargs(), reduction=reduction, chunk_size=4,
                                          **extra)

    expected, expected_grads = _value_and_grads(oracle, (hidden, weight, bias), reduction)
    assert torch.isfinite(expected).all()
    for fn in (materialized, fused):
        value, grads = _value_and_grads(fn, (hidden, weight, bias), reduction)
        torch.testing.assert_close(value, expected, **TOL)
        for got, want in zip(grads, expected_grads):
            torch.testing.assert_close(got, want, **TOL)


def test_the_oracle_itself_is_pytorch_label_smoothing_without_extras():
    hidden, weight, bias, labels, _ = _inputs()
    logits = hidden @ weight.T + bias
    rows = family_rows(logits, labels, epsilon=0.1)
    expected = F.cross_entropy(logits.reshape(-1, V), labels.reshape(-1), label_smoothing=0.1, reduction="none")
    torch.testing.assert_close(rows.reshape(-1), expected, **TOL)


def test_z_loss_by_hand():
    # One token, logits [0, ln 3]: lse = ln 4, p_y = 3/4 for y = 1. CE = ln(4/3); z-loss c * ln(4)^2.
    logits = torch.tensor([[0.0, math.log(3.0)]], dtype=torch.float64, requires_grad=True)
    c = 0.1
    loss = smoothed_cross_entropy(logits, torch.tensor([1]), z_loss=c)
    assert float(loss.detach()) == pytest.approx(math.log(4 / 3) + c * math.log(4) ** 2, rel=1e-12)
    loss.backward()
    # d/dz = (1 + 2c lse) softmax - onehot
    factor = 1 + 2 * c * math.log(4)
    torch.testing.assert_close(logits.grad, torch.tensor([[factor * 0.25, factor * 0.75 - 1.0]], dtype=torch.float64))


@pytest.mark.parametrize("path", ["materialized", "fused"])
def test_gradcheck_with_everything_on(path):
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(7, 3, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(7, (2, 4), generator=g)
    labels[0, 1] = -100
    labels[1, 2] = 6  # outside num_classes=6
    weights = torch.rand(2, 4, generator=g, dtype=torch.float64) + 0.1
    weights[1, 0] = 0.0
    kwargs = dict(epsilon=0.1, alpha=0.2, convention="fairseq", z_loss=0.05, weights=weights, num_classes=6,
                  exclude_ids=[2], num_items_in_batch=3.7, chunk_size=3)

    def fn(h, w):
        if path == "fused":
            return fused_linear_smoothed_loss(h, w, labels, **kwargs)
        return smoothed_cross_entropy(h @ w.T, labels, **kwargs)

    assert torch.autograd.gradcheck(fn, (hidden, weight), eps=1e-6, atol=1e-7)


# --------------------------------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["materialized", "fused"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_zero_weight_is_exactly_ignore_index(path, reduction):
    hidden, weight, bias, labels, _ = _inputs(seed=4)
    weights = torch.ones(labels.shape, dtype=torch.float64)
    zero = torch.zeros_like(labels, dtype=torch.bool)
    zero.view(-1)[[0, 5, 6]] = True
    weights[zero] = 0.0
    ignored = labels.masked_fill(zero, -100)
    poisoned = hidden.clone()
    poisoned[zero] = math.nan  # never scored, so never seen

    def run(h, labels_, w):
        knobs = dict(epsilon=0.1, alpha=0.1, z_loss=1e-3, reduction=reduction, return_components=True)
        if path == "fused":
            return fused_linear_smoothed_loss(h, weight, labels_, bias=bias, weights=w, **knobs)
        return smoothed_cross_entropy(h @ weight.T + bias, labels_, weights=w, **knobs)

    h1 = poisoned.clone().requires_grad_(True)
    h2 = hidden.clone().requires_grad_(True)
    out1, parts1 = run(h1, labels, weights)
    out2, parts2 = run(h2, ignored, None)
    torch.testing.assert_close(out1, out2, rtol=1e-12, atol=0)
    out1.sum().backward()
    out2.sum().backward()
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-12, atol=0)
    assert bool((h1.grad[zero] == 0).all())
    for name in LossComponents.FIELDS:
        assert float(getattr(parts1, name)) == pytest.approx(float(getattr(parts2, name)), rel=1e-6), name


@pytest.mark.parametrize("path", ["materialized", "fused"])
def test_weighted_components_and_means(path):
    hidden, weight, bias, labels, weights = _inputs(seed=6)
    logits = hidden @ weight.T + bias
    if path == "fused":
        _, parts = fused_linear_smoothed_loss(hidden, weight, labels, bias=bias, weights=weights, epsilon=0.1,
                                              z_loss=0.01, return_components=True)
    else:
        _, parts = smoothed_cross_entropy(logits, labels, weights=weights, epsilon=0.1, z_loss=0.01,
                                          return_components=True)
    scored = (labels != -100) & (weights != 0)
    z, y, w = logits[scored], labels[scored], weights[scored]
    lse = torch.logsumexp(z, -1)
    p = z.softmax(-1)
    nll = lse - z.gather(-1, y[:, None]).squeeze(-1)
    expected = {
        "num_tokens": float(scored.sum()),
        "weight": float(w.sum()),
        "nll": float((w * nll).sum()),
        "z_loss": float((w * 0.01 * lse**2).sum()),
        "entropy": float((w * (lse - (p * z).sum(-1))).sum()),
        "correct": float((w * (z.argmax(-1) == y)).sum()),
        "top1_prob": float((w * p.max(-1).values).sum()),
    }
    for name, value in expected.items():
        assert float(getattr(parts, name)) == pytest.approx(value, rel=1e-5), name
    total = float(parts.nll + parts.regularizer + parts.z_loss)
    assert float(parts.loss) == pytest.approx(total, rel=1e-5)
    means = parts.means()
    assert means["nll"] == pytest.approx(expected["nll"] / expected["weight"], rel=1e-5)
    assert means["entropy"] == pytest.approx(expected["entropy"] / expected["weight"], rel=1e-5)
    assert means["num_tokens"] == expected["num_tokens"] and means["weight"] == pytest.approx(expected["weight"])


def test_weighted_mean_over_a_window_total():
    # Two micro-batches of one window, each divided by the window's total weight, add up to the whole.
    hidden, weight, bias, labels, weights = _inputs(seed=8, shape=(4, 5))
    logits = hidden @ weight.T + bias
    total = float(weights[labels != -100].sum())
    whole = smoothed_cross_entropy(logits, labels, weights=weights, epsilon=0.1)
    halves = sum(
        smoothed_cross_entropy(logits[i:i + 2], labels[i:i + 2], weights=weights[i:i + 2], epsilon=0.1,
                               num_items_in_batch=torch.tensor(total, dtype=torch.float64))
        for i in (0, 2)
    )
    torch.testing.assert_close(halves, whole, **TOL)


def test_unweighted_call_is_unchanged_by_all_one_weights():
    hidden, weight, bias, labels, _ = _inputs(seed=9)
    logits = hidden @ weight.T + bias
    ones = torch.ones(labels.shape, dtype=torch.float32)
    for reduction in ("mean", "sum", "none"):
        torch.testing.assert_close(
            smoothed_cross_entropy(logits, labels, weights=ones, alpha=0.1, reduction=reduction),
            smoothed_cross_entropy(logits, labels, alpha=0.1, reduction=reduction), **TOL,
        )


# --------------------------------------------------------------------------------------------------------------------
# Restricted vocabulary with masked (-inf) entries; the wrappers and OutputHead pass the keywords on
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["materialized", "fused"])
@pytest.mark.parametrize("knobs", [Knobs(epsilon=0.1), Knobs(epsilon=0.1, convention="fairseq"), Knobs(alpha=0.2)],
                         ids=str)
def test_restriction_with_negative_infinite_columns(path, knobs):
    # Column 2 (a smoothing class) and column 12 (outside num_classes=11) are -inf: 2 leaves K, 12 was never in it.
    hidden, weight, bias, labels, _ = _inputs(seed=10)
    labels = torch.where((labels == 2) | (labels == 12), 3, labels)
    bias[[2, 12]] = -math.inf
    mask = torch.arange(V) < 11
    mask[2] = False  # for the oracle: a -inf class is absent, as without a restriction

    def oracle(h, w):
        logits = h @ w.T + bias
        keep = [c for c in range(V) if c not in (2, 12)]
        sub = logits[..., keep]
        remap = torch.full((V,), -1, dtype=torch.long)
        remap[keep] = torch.arange(len(keep))
        sub_labels = torch.where(labels == -100, -100, remap[labels.clamp(min=0)])
        return family_rows(sub, sub_labels, **knobs.kwargs(), z_loss=0.01, smoothing_mask=mask[keep]).sum()

    def run(h, w):
        kwargs = dict(**knobs.kwargs(), z_loss=0.01, num_classes=11, reduction="sum")
        if path == "fused":
            return fused_linear_smoothed_loss(h, w, labels, bias=bias, **kwargs)
        return smoothed_cross_entropy(h @ w.T + bias, labels, **kwargs)

    expected, expected_grads = _value_and_grads(oracle, (hidden, weight), "sum")
    value, grads = _value_and_grads(run, (hidden, weight), "sum")
    torch.testing.assert_close(value, expected, **TOL)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, **TOL)


def test_wrappers_and_output_head_take_the_family_keywords():
    hidden, weight, bias, labels, weights = _inputs(seed=11)
    logits = hidden @ weight.T + bias
    extra = dict(z_loss=0.02, weights=weights, num_classes=12, exclude_ids=[1])
    torch.testing.assert_close(
        label_smoothing_loss(logits, labels, epsilon=0.1, **extra),
        smoothed_cross_entropy(logits, labels, epsilon=0.1, **extra), **TOL,
    )
    torch.testing.assert_close(
        maxsup_loss(logits, labels, alpha=0.1, **extra), smoothed_cross_entropy(logits, labels, alpha=0.1, **extra),
        **TOL,
    )
    head = OutputHead(torch.nn.Linear(H, V).double())
    with torch.no_grad():
        head.module.weight.copy_(weight)
        head.module.bias.copy_(bias)
    torch.testing.assert_close(
        head.loss(hidden, labels, method="maxsup", alpha=0.1, **extra),
        smoothed_cross_entropy(logits, labels, alpha=0.1, **extra), **TOL,
    )
    with pytest.raises(TypeError, match="unexpected keyword"):
        label_smoothing_loss(logits, labels, z_los=0.1)


# --------------------------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------------------------


def _bad(**changes):
    hidden, weight, bias, labels, weights = _inputs(seed=12)
    return dict(hidden=hidden, weight=weight, labels=labels, weights=weights) | changes


def _weights_with(index, value):
    weights = _bad()["weights"].clone()
    weights.view(-1)[index] = value
    return weights


BAD = [
    (dict(weights=_weights_with(4, -0.5)), ValueError, r"weights must be finite and >= 0.*-0.5.*position 4"),
    (dict(weights=_weights_with(1, math.nan)), ValueError, r"weights must be finite and >= 0.*nan"),  # ignored spot
    (dict(weights=_weights_with(0, math.inf)), ValueError, r"weights must be finite and >= 0.*inf"),
    (dict(weights=torch.ones(3, 4)), ValueError, r"weights \(3, 4\) must have the shape of labels \(3, 5\)"),
    (dict(weights=torch.ones(3, 5, dtype=torch.long)), TypeError, r"weights must be a floating-point tensor"),
    (dict(num_classes=0), ValueError, r"num_classes \(smoothing_num_classes\) must be an int in \[1, 13\]"),
    (dict(num_classes=14), ValueError, r"num_classes .* got 14"),
    (dict(num_classes=5.0), ValueError, r"num_classes .* got 5.0"),
    (dict(num_classes=True), ValueError, r"num_classes .* got True"),
    (dict(exclude_ids=[3, 13]), ValueError, r"exclude_ids \(smoothing_exclude_ids\) .* \[0, 13\), got 13"),
    (dict(exclude_ids=[-1]), ValueError, r"exclude_ids .* got -1"),
    (dict(num_classes=2, exclude_ids=[0, 1]), ValueError, r"leave no class to smooth over"),
    (dict(num_classes=1, epsilon=0.1, convention="fairseq"), ValueError, r"fairseq convention .* K >= 2"),
    (dict(z_loss=-1e-4), ValueError, r"z_loss must be >= 0 and finite"),
    (dict(z_loss=math.nan), ValueError, r"z_loss must be >= 0 and finite"),
    (dict(weights=_bad()["weights"], num_items_in_batch=0), ValueError, r"with weights it is the total weight"),
]


@pytest.mark.parametrize("path", ["materialized", "fused"])
@pytest.mark.parametrize("changes, error, match", BAD, ids=range(len(BAD)))
def test_bad_family_inputs_raise(path, changes, error, match):
    args = _bad(**changes)
    hidden, weight, labels = args.pop("hidden"), args.pop("weight"), args.pop("labels")
    with pytest.raises(error, match=match):
        if path == "fused":
            fused_linear_smoothed_loss(hidden, weight, labels, **args)
        else:
            smoothed_cross_entropy(hidden @ weight.T, labels, **args)


# --------------------------------------------------------------------------------------------------------------------
# No host-device sync per chunk (#12 item 3)
# --------------------------------------------------------------------------------------------------------------------


class _CountSyncs(TorchDispatchMode):
    """Ops that read a device value on the host (``.item()``, ``bool(t)``, ``nonzero``'s data-dependent shape)."""

    SYNCS = ("_local_scalar_dense", "nonzero", "is_nonzero", "item")

    def __init__(self):
        super().__init__()
        self.count = 0
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in self.SYNCS:
            self.count += 1
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


def _count_syncs(monkeypatch, fn):
    """``(forward reads, backward reads, ops seen)``: host reads by op (dispatch) and by `losses.read_host`."""
    reads = []
    original = losses.read_host

    def counted(values):
        reads.append(values.numel())
        return original(values)

    monkeypatch.setattr(losses, "read_host", counted)
    with _CountSyncs() as forward:
        out = fn()
    forward_count = forward.count + len(reads)
    with _CountSyncs() as backward:
        out.sum().backward()
    return forward_count, backward.count + len(reads) - forward_count + forward.count, forward.seen + backward.seen


@pytest.mark.parametrize("path", ["materialized", "fused"])
@pytest.mark.parametrize("neginf", [False, True], ids=["finite", "neginf-column"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_one_host_read_per_call_whatever_the_chunk_count(monkeypatch, path, neginf, reduction):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(64, 8, generator=g, requires_grad=True)
    weight = torch.randn(40, 8, generator=g, requires_grad=True)
    bias = torch.randn(40, generator=g)
    if neginf:
        bias[5] = -math.inf
    labels = torch.randint(40, (64,), generator=g)
    labels[labels == 5] = 6
    labels[::7] = -100
    weights = torch.rand(64, generator=g)

    def call(chunk_size):
        kwargs = dict(epsilon=0.1, alpha=0.1, z_loss=1e-3, weights=weights, num_classes=38, exclude_ids=[0],
                      num_items_in_batch=torch.tensor(30.0), reduction=reduction, chunk_size=chunk_size)

        def run():
            if path == "fused":
                return fused_linear_smoothed_loss(hidden, weight, labels, bias=bias, **kwargs)
            return smoothed_cross_entropy(hidden @ weight.T + bias, labels, **kwargs)

        return run

    few = _count_syncs(monkeypatch, call(32))
    many = _count_syncs(monkeypatch, call(2))  # 16x the chunks
    assert few[0] == many[0] == 1, (few, many)  # the forward's one read, whatever the chunk count
    # The backward reads nothing, except the fused mean/sum, which checks once whether grad_output is 1 (its
    # gradients were formed in the forward and are returned as they are then).
    expected = 1 if (path, reduction) == ("fused", "mean") else 0
    assert few[1] == many[1] == expected, (few, many)


# --------------------------------------------------------------------------------------------------------------------
# Through SmoothTrainer: loss_weights from a collator, z-loss; accumulation invariance and the first step's oracle
# --------------------------------------------------------------------------------------------------------------------

MAX_LENGTH = 16
TRAIN_ARGS = dict(logging_steps=1, max_steps=4, learning_rate=3e-4, disable_tqdm=True, report_to=[], use_cpu=True,
                  seed=42)
PROMPT_TOKENS, PROMPT_WEIGHT = 4, 0.25


class PromptWeightingCollator:
    """The README's example: transformers' collator, then ``loss_weights`` (shape of ``labels``) down-weighting the
    first tokens of every row (a system prompt); the features of every micro-batch are kept for the oracle."""

    def __init__(self, tokenizer):
        from transformers import DataCollatorForLanguageModeling

        self.collator = DataCollatorForLanguageModeling(tokenizer=tokenizer, mlm=False)
        self.features = []

    def __call__(self, features):
        self.features.extend(features)
        batch = self.collator(features)
        weights = torch.ones(batch["labels"].shape)
        weights[:, :PROMPT_TOKENS] = PROMPT_WEIGHT
        batch["loss_weights"] = weights
        return batch


def _dataset():
    import datasets
    from collator_data import tiny_tokenizer, word
    from tiny_models import VOCAB

    tokenizer = tiny_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token
    g = torch.Generator().manual_seed(0)
    lines = []
    for i in range(32):
        length = 0 if i % 9 == 4 else int(torch.randint(2, 24, (1,), generator=g))
        lines.append(" ".join(word(int(t)) for t in torch.randint(3, VOCAB, (length,), generator=g)))
    dataset = datasets.Dataset.from_dict({"text": lines})

    def tokenize(examples):
        return tokenizer(examples["text"], max_length=MAX_LENGTH, padding="max_length", truncation=True)

    return tokenizer, dataset.map(tokenize, batched=True, remove_columns=["text"])


class _Logs:
    def __init__(self):
        self.entries = []

    def __call__(self):
        from transformers import TrainerCallback

        store = self.entries

        class Callback(TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and "loss" in logs and "grad_norm" in logs:
                    store.append(dict(logs))

        return Callback()


def _train(tmp_path, bs, ga, method, fused):
    from tiny_models import BUILDERS
    from trainer_helpers import train_checking_fused
    from transformers import set_seed

    from hf_smooth import SmoothTrainer, SmoothTrainingArguments

    tokenizer, dataset = _dataset()
    collator = PromptWeightingCollator(tokenizer)
    args = SmoothTrainingArguments(
        str(tmp_path), **TRAIN_ARGS, per_device_train_batch_size=bs, gradient_accumulation_steps=ga,
        smoothing_method=method, smoothing_alpha=0.1, smoothing_z_loss=1e-3, smoothing_fused_loss=fused,
    )
    set_seed(42)
    logs = _Logs()
    model = BUILDERS["llama"](0)
    trainer = SmoothTrainer(model, args, train_dataset=dataset, callbacks=[logs()], data_collator=collator)
    train_checking_fused(trainer, model, fused)
    return logs.entries, collator.features, tokenizer.pad_token_id


def _first_batch_oracle(features, pad_id=None, **knobs):
    """The tiny Llama's ``(sum_t w_t * l_t, sum_t w_t, tokens)`` over the first global batch of 8 rows, each row
    alone (no padding), float64, with the collator's prompt weights and z-loss 1e-3; ``pad_id`` labels are ignored.
    Returns the model too, for the gradient of whatever is formed from the sums."""
    from tiny_models import BUILDERS

    model = BUILDERS["llama"](0)
    total, weight, tokens = 0.0, 0.0, 0
    for feature in features[:8]:
        length = sum(feature["attention_mask"])
        if length < 2:
            continue
        ids = torch.tensor(feature["input_ids"][:length])
        labels = ids if pad_id is None else ids.masked_fill(ids == pad_id, -100)
        weights = torch.ones(length, dtype=torch.float64)
        weights[:PROMPT_TOKENS] = PROMPT_WEIGHT
        rows = family_rows(model(input_ids=ids[None]).logits[0, :-1], labels[1:], **knobs, z_loss=1e-3)
        w = torch.where(labels[1:] == -100, 0.0, weights[1:])
        total = total + (w * rows).sum()
        weight += float(w.sum())
        tokens += length - 1
    return model, total, weight, tokens


def _grad_norm(model) -> float:
    return float(torch.sqrt(sum(p.grad.double().pow(2).sum() for p in model.parameters() if p.grad is not None)))


def _oracle_first_step(features, pad_id, method):
    """sum_t w_t * l_t / sum_t w_t over the first global batch of 8 rows, each row alone (no padding), float64."""
    knobs = {"label_smoothing": dict(epsilon=0.1), "maxsup": dict(alpha=0.1)}[method]
    model, total, weight, _ = _first_batch_oracle(features, pad_id, **knobs)
    loss = total / weight
    loss.backward()
    return float(loss.detach()), _grad_norm(model)


@pytest.mark.parametrize("method, fused", [("maxsup", False), ("label_smoothing", True)])
def test_weights_and_z_loss_through_the_trainer_are_accumulation_invariant(tmp_path, method, fused):
    base, features, pad_id = _train(tmp_path / "base", 8, 1, method, fused)
    accumulated, ga_features, _ = _train(tmp_path / "ga", 4, 2, method, fused)
    assert len(base) == len(accumulated) == TRAIN_ARGS["max_steps"]
    assert [f["input_ids"] for f in features[:8]] == [f["input_ids"] for f in ga_features[:8]]
    for b, a in zip(base, accumulated):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
        assert a["z_loss"] == pytest.approx(b["z_loss"], rel=1e-4) and a["z_loss"] > 0
        assert "entropy" in a
        # the logged objective is nll + penalty + z-loss (weighted means)
        assert a["loss"] == pytest.approx(a["nll"] + a["smoothing_penalty"] + a["z_loss"], rel=1e-5)
    expected_loss, expected_grad_norm = _oracle_first_step(features, pad_id, method)
    for log in (base[0], accumulated[0]):
        assert log["loss"] == pytest.approx(expected_loss, rel=1e-5)
        assert log["grad_norm"] == pytest.approx(expected_grad_norm, rel=1e-4)


def _train_smoothed_loss(tmp_path, bs, ga):
    from tiny_models import BUILDERS
    from transformers import Trainer, TrainingArguments, set_seed

    from hf_smooth import SmoothedLoss

    tokenizer, dataset = _dataset()
    collator = PromptWeightingCollator(tokenizer)
    args = TrainingArguments(str(tmp_path), **TRAIN_ARGS, per_device_train_batch_size=bs,
                             gradient_accumulation_steps=ga)
    loss = SmoothedLoss(smoothing_method="maxsup", smoothing_alpha=0.1, smoothing_z_loss=1e-3)
    logs = _Logs()
    set_seed(42)
    trainer = Trainer(BUILDERS["llama"](0), args, train_dataset=dataset, data_collator=collator,
                      compute_loss_func=loss, callbacks=[loss, logs()])
    with pytest.warns(UserWarning, match="SmoothedLoss with loss_weights: .* token count"):
        trainer.train()
    return logs.entries, collator.features, tokenizer.pad_token_id


def test_smoothed_loss_takes_loss_weights_away_from_the_model(tmp_path):
    # The plain Trainer passes every batch key to the model; SmoothedLoss's pre-hook takes loss_weights. Its
    # denominator is transformers' token count (said in a warning): sum(w * l) / N, still accumulation-invariant.
    base, features, pad_id = _train_smoothed_loss(tmp_path / "base", 8, 1)
    accumulated, _, _ = _train_smoothed_loss(tmp_path / "ga", 4, 2)
    for b, a in zip(base, accumulated):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    # First step against the oracle with weights, divided by the token count (Trainer's num_items_in_batch).
    model, total, _, tokens = _first_batch_oracle(features, alpha=0.1)
    # the logged loss is the weighted mean (sum w*l / sum w); the gradient follows sum w*l / N
    (total / tokens).backward()
    assert base[0]["grad_norm"] == pytest.approx(_grad_norm(model), rel=1e-4)


def test_recipes_smooth_over_the_tokenizer_when_the_output_layer_is_padded(capsys, tmp_path):
    from collator_data import tiny_tokenizer
    from common import smoothing_classes_from_tokenizer
    from tiny_models import BUILDERS

    from hf_smooth import SmoothTrainingArguments

    tokenizer = tiny_tokenizer()
    model = BUILDERS["llama"](0)
    args = SmoothTrainingArguments(str(tmp_path), report_to=[], use_cpu=True)
    smoothing_classes_from_tokenizer(model, args, tokenizer)  # as many rows as tokens: nothing to do
    assert args.smoothing_num_classes is None and capsys.readouterr().out == ""
    model.resize_token_embeddings(len(tokenizer) + 7, mean_resizing=False)  # padded, as Qwen's
    smoothing_classes_from_tokenizer(model, args, tokenizer)
    assert args.smoothing_num_classes == len(tokenizer)
    assert f"Smoothing over the tokenizer's {len(tokenizer)} tokens" in capsys.readouterr().out
    given = SmoothTrainingArguments(str(tmp_path), report_to=[], use_cpu=True, smoothing_num_classes=50)
    smoothing_classes_from_tokenizer(model, given, tokenizer)  # an explicit value is kept
    assert given.smoothing_num_classes == 50


@pytest.mark.parametrize("field, value, match", [
    ("smoothing_z_loss", -1e-4, "smoothing_z_loss must be a finite number >= 0"),
    ("smoothing_z_loss", math.inf, "smoothing_z_loss must be a finite number >= 0"),
    ("smoothing_num_classes", 0, "smoothing_num_classes must be a positive int"),
    ("smoothing_exclude_ids", [1, -2], r"smoothing_exclude_ids must be a list of class ids \(ints >= 0\)"),
])
def test_bad_family_arguments_raise(tmp_path, field, value, match):
    from hf_smooth import SmoothingArguments

    with pytest.raises(ValueError, match=match):
        SmoothingArguments(**{field: value})


# --------------------------------------------------------------------------------------------------------------------
# Two processes (gloo DDP): weights and z-loss, one SGD step against the float64 oracle
# --------------------------------------------------------------------------------------------------------------------


def _weighted_examples(n=8, seed=3):
    from tiny_models import causal_examples

    g = torch.Generator().manual_seed(seed)
    examples = causal_examples(n, seed=seed)
    for example in examples:
        example["weights"] = (torch.rand(len(example["labels"]), generator=g) * 2).tolist()
        example["weights"][0] = 0.0  # never scored anyway (the causal shift drops position 0)
    examples[1]["weights"][-1] = 0.0  # a zero weight on a scored token
    return examples


def _oracle_sgd_step(examples, method):
    """One SGD step (lr 1) on sum_t w_t l_t / sum_t w_t over all rows, each row alone, float64 losses."""
    import copy

    from tiny_models import BUILDERS

    model = BUILDERS["llama"](0)
    knobs = {"label_smoothing": dict(epsilon=0.1), "maxsup": dict(alpha=0.1)}[method]
    total, weight = 0.0, 0.0
    for example in examples:
        ids = torch.tensor(example["input_ids"])
        labels = torch.tensor(example["labels"])[1:]
        w = torch.tensor(example["weights"], dtype=torch.float64)[1:]
        w = torch.where(labels == -100, 0.0, w)
        rows = family_rows(model(input_ids=ids[None]).logits[0, :-1], labels, **knobs, z_loss=1e-3)
        total = total + (w * rows).sum()
        weight += float(w.sum())
    loss = total / weight
    loss.backward()
    stepped = copy.deepcopy(model)
    with torch.no_grad():
        for (name, p), (_, q) in zip(model.named_parameters(), stepped.named_parameters()):
            q -= p.grad if p.grad is not None else 0.0
    return float(loss.detach()), {k: v.detach() for k, v in stepped.named_parameters()}


@pytest.mark.slow  # one 2-process launch: ~30-40 s on 2 cores
def test_two_processes_with_weights_and_z_loss_equal_the_oracle(tmp_path):
    from pathlib import Path

    from ddp_scenarios import launch_scenarios
    from trainer_helpers import max_diff

    examples = _weighted_examples()
    scenarios = [
        dict(name=f"{method}-{'fused' if fused else 'unfused'}", model="llama", method=method, fused=fused, lora=None,
             train=examples, per_device_train_batch_size=2, gradient_accumulation_steps=2)
        for method, fused in (("maxsup", False), ("label_smoothing", True))
    ]
    script = Path(__file__).parent / "scripts" / "family_ddp.py"
    results = launch_scenarios(script, tmp_path / "run", scenarios)
    for scenario in scenarios:
        result = results[scenario["name"]]
        assert result["world_size"] == 2 and result["wrapped_as"] == "DistributedDataParallel"
        assert result["fused_ran"] == scenario["fused"] and not result["fallback_warnings"]
        expected_loss, expected = _oracle_sgd_step(examples, scenario["method"])
        assert max_diff(result["params"], expected) < 1e-6, scenario["name"]
        logged = next(log for log in result["log_history"] if "loss" in log and "grad_norm" in log)
        assert logged["loss"] == pytest.approx(expected_loss, rel=1e-5)
        assert logged["z_loss"] > 0


def test_evaluation_reports_z_loss(tmp_path):
    from tiny_models import BUILDERS, ListDataset, PadCollator, causal_examples

    from hf_smooth import SmoothTrainer, SmoothTrainingArguments

    examples = causal_examples(6, seed=1)
    args = SmoothTrainingArguments(str(tmp_path), report_to=[], use_cpu=True, per_device_eval_batch_size=4,
                                   smoothing_method="maxsup", smoothing_z_loss=0.01)
    model = BUILDERS["llama"](0)
    trainer = SmoothTrainer(model=model, args=args, eval_dataset=ListDataset(examples), data_collator=PadCollator())
    metrics = trainer.evaluate()
    total, count = 0.0, 0
    with torch.no_grad():
        for example in examples:
            logits = model(input_ids=torch.tensor([example["input_ids"]])).logits[0, :-1].double()
            labels = torch.tensor(example["labels"][1:])
            lse = torch.logsumexp(logits[labels != -100], dim=-1)
            total += float((0.01 * lse**2).sum())
            count += int((labels != -100).sum())
    assert metrics["eval_z_loss"] == pytest.approx(total / count, rel=1e-5)


def test_loss_weights_never_reach_generate(tmp_path):
    """Seq2SeqTrainer's predict_with_generate hands the batch to generate(), which refuses keys the model does not
    take: a collator's loss_weights must be scored (teacher-forced loss) and never reach generate()."""
    from transformers import Seq2SeqTrainingArguments

    from hf_smooth import SmoothingArguments, SmoothSeq2SeqTrainer
    from tiny_models import PadCollator, ListDataset, seq2seq_examples, tiny_marian

    class WeightedPad(PadCollator):
        def __call__(self, features):
            batch = super().__call__(features)
            batch["loss_weights"] = (batch["labels"] != -100).to(torch.float32) * 0.5
            return batch

    examples = seq2seq_examples(4, seed=1)
    args = Seq2SeqTrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=2, report_to=[],
                                    predict_with_generate=True, generation_max_length=6, use_cpu=True)
    model = tiny_marian(0)
    seen = []
    generate = model.generate

    def recording_generate(*a, **kwargs):
        seen.append(sorted(kwargs))
        return generate(*a, **kwargs)

    model.generate = recording_generate
    trainer = SmoothSeq2SeqTrainer(model=model, args=args, data_collator=WeightedPad(),
                                   compute_metrics=lambda prediction: {},  # else evaluate() never generates
                                   smoothing_args=SmoothingArguments(smoothing_method="none"))
    metrics = trainer.evaluate(ListDataset(examples))
    # transformers 5 models take **kwargs in forward, so generate() would not even refuse the key: check it directly.
    assert len(seen) == 2 and all("input_ids" in keys and "loss_weights" not in keys for keys in seen), seen
    plain = SmoothSeq2SeqTrainer(model=tiny_marian(0), args=args, data_collator=PadCollator(),
                                 smoothing_args=SmoothingArguments(smoothing_method="none"))
    # Uniform weights (0.5 everywhere) leave the weighted mean unchanged.
    assert metrics["eval_loss"] == pytest.approx(plain.evaluate(ListDataset(examples))["eval_loss"], rel=1e-6)
