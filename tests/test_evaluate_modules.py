"""The `evaluate` modules shipped in hf_smooth/evaluate_modules: loaded offline from the package, the numbers of
`TokenMetrics` and of the float64 oracle (tests/metric_oracles.py), `evaluate.combine`, a plain `Trainer` /
`Seq2SeqTrainer` with `preprocess_logits_for_metrics`, BLEU/chrF equal to sacrebleu's, the translation recipe's
scorer and its fallback, and the module files inside a built wheel."""

from __future__ import annotations

import ast
import copy
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import evaluate
import pytest
import sacrebleu
import torch
from collator_data import tiny_tokenizer
from metric_oracles import oracle_metrics
from recipe_helpers import load_recipe
from tiny_models import ListDataset, causal_examples, seq2seq_examples, tiny_llama, tiny_t5
from transformers import DataCollatorForSeq2Seq, Seq2SeqTrainer, Seq2SeqTrainingArguments, Trainer, TrainingArguments

from hf_smooth import TokenMetrics, evaluate_modules
from hf_smooth.evaluate_modules import ComputeMetrics, TokenStatisticsPreprocessor, scored_statistics, token_statistics

pytestmark = pytest.mark.usefixtures("offline_env", "one_thread")

ROOT = Path(__file__).resolve().parents[1]
TOKEN_KEYS = ("nll", "ppl", "accuracy", "confidence", "ece", "ece_adaptive", "brier")


def calibrated_batch(shape, classes, seed, dtype=torch.float32):
    """Logits, and labels drawn from their own softmax (so about as many tokens are right as the confidence says,
    and the equal-width and equal-mass ECEs differ); some ignored positions, one absent (-inf) entry, one tie."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(*shape, classes, generator=g, dtype=torch.float64) * 2.5
    labels = torch.multinomial(logits.softmax(-1).reshape(-1, classes), 1, generator=g).reshape(shape)
    labels.view(-1)[:: 7] = -100
    logits.view(-1, classes)[1, 3] = -float("inf")
    logits.view(-1, classes)[2, :2] = logits.view(-1, classes)[2].max() + 1.0  # a tie for the top class
    return logits.to(dtype), labels


def batches(dtype):
    return [calibrated_batch((4, 23), 37, seed=1, dtype=dtype), calibrated_batch((3, 9), 37, seed=2, dtype=dtype)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_token_calibration_equals_token_metrics_and_the_oracle(dtype):
    module = evaluate_modules.load("token_calibration", num_bins=7)
    reference = TokenMetrics(num_bins=7)
    for logits, labels in batches(dtype):
        module.add_batch(**scored_statistics(token_statistics(logits, labels)))
        reference.update(logits, labels)
    results, expected = module.compute(), reference.compute()
    assert set(results) == {*TOKEN_KEYS, "num_tokens"}
    assert results["num_tokens"] == expected["num_tokens"] == 4 * 23 + 3 * 9 - 14 - 4
    for key in TOKEN_KEYS:
        assert results[key] == pytest.approx(expected[key], rel=1e-13, abs=1e-15), key
    assert abs(results["ece"] - results["ece_adaptive"]) > 1e-3  # the two ECEs are told apart

    # The float64 oracle, on the logits as the library saw them (bf16 upcast).
    logits = torch.cat([b[0].double().reshape(-1, 37) for b in batches(dtype)])
    labels = torch.cat([b[1].reshape(-1) for b in batches(dtype)])
    oracle = oracle_metrics(logits, labels, num_bins=7)
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    for key in TOKEN_KEYS:
        assert results[key] == pytest.approx(oracle[key], rel=tolerance, abs=tolerance), key


def test_no_scored_token_gives_token_metrics_empty_values():
    logits, labels = torch.randn(2, 3, 5), torch.full((2, 3), -100)
    module = evaluate_modules.load("token_calibration")
    module.add_batch(**scored_statistics(token_statistics(logits, labels)))
    expected = TokenMetrics().update(logits, labels).compute()
    assert module.compute() == {key: expected[key] for key in (*TOKEN_KEYS, "num_tokens")}
    assert expected["ppl"] == 1.0 and expected["num_tokens"] == 0


def test_combine_of_the_single_modules_equals_token_calibration():
    names = ["token_accuracy", "token_nll", "token_brier", "token_ece"]
    combined = evaluate.combine([evaluate_modules.load(name, num_bins=5) for name in names])
    whole = evaluate_modules.load("token_calibration", num_bins=5)
    default_bins = evaluate_modules.load("token_ece")
    for logits, labels in batches(torch.float32):
        stats = scored_statistics(token_statistics(logits, labels))
        combined.add_batch(**stats)
        whole.add_batch(**stats)
        default_bins.add_batch(confidence=stats["confidence"], correct=stats["correct"])
    results, expected = combined.compute(), whole.compute()
    assert set(results) == {"accuracy", "nll", "ppl", "brier", "ece", "ece_adaptive"}
    for key, value in results.items():
        assert value == expected[key], key
    assert default_bins.compute()["ece"] != pytest.approx(results["ece"])  # num_bins reached the combined module


def test_module_files_are_loadable_by_path_with_evaluate_load():
    logits, labels = batches(torch.float64)[0]
    stats = scored_statistics(token_statistics(logits, labels))
    module = evaluate.load(evaluate_modules.path("token_nll"), keep_in_memory=True)
    assert module.name == "token_nll"
    expected = TokenMetrics().update(logits, labels).compute()["nll"]
    assert module.compute(nll=stats["nll"])["nll"] == pytest.approx(expected, rel=1e-14)


def test_statistics_layout_shift_and_padding():
    logits, labels = calibrated_batch((2, 6), 11, seed=3)
    stats = token_statistics(logits, labels)
    assert stats.shape == (2, 6, 4) and stats.dtype == torch.float32
    ignored = labels == -100
    assert (stats[ignored] == -1).all() and (stats[~ignored][:, 0] > 0).all()
    z, y = logits[~ignored].double(), labels[~ignored]
    p = z.softmax(-1)
    expected = torch.stack([p.max(-1).values, (z.argmax(-1) == y).double(), -p.log().gather(1, y[:, None])[:, 0],
                            ((p - torch.nn.functional.one_hot(y, 11)) ** 2).sum(-1)], dim=-1)
    torch.testing.assert_close(stats[~ignored].double(), expected, rtol=1e-5, atol=1e-6)

    shifted = TokenStatisticsPreprocessor(shift_labels=True)(logits, labels)
    assert torch.equal(shifted, token_statistics(logits[:, :-1], labels[:, 1:]))
    aligned = TokenStatisticsPreprocessor(shift_labels=False)((logits, torch.zeros(2, 3)), labels)  # seq2seq tuple
    assert torch.equal(aligned, stats)

    # The Trainer pads batches of different lengths with -100 when it concatenates them: those rows are dropped.
    padded = torch.cat([stats, torch.full((2, 3, 4), -100.0)], dim=1)
    columns = scored_statistics(padded.numpy())
    assert len(columns["nll"]) == int((~ignored).sum())
    assert columns["correct"].dtype.name == "int8"


def test_clear_errors():
    with pytest.raises(ValueError, match="token_calibration"):
        evaluate_modules.path("calibration")
    with pytest.raises(TypeError, match="numbins"):
        evaluate_modules.load("token_ece", numbins=10)
    with pytest.raises(ValueError, match="num_bins"):
        evaluate_modules.load("token_ece", num_bins=0)
    with pytest.raises(TypeError, match="predict_with_generate=False"):
        TokenStatisticsPreprocessor(shift_labels=False)(torch.ones(2, 5, dtype=torch.long), torch.ones(2, 5).long())
    with pytest.raises(TypeError, match="shift_labels"):
        TokenStatisticsPreprocessor(shift_labels="auto")
    with pytest.raises(ValueError, match="TokenStatisticsPreprocessor"):
        scored_statistics(torch.zeros(2, 3, 64))  # full logits handed to compute_metrics
    with pytest.raises(TypeError, match="evaluate_modules.load"):
        ComputeMetrics(TokenMetrics)


def test_load_without_evaluate_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "evaluate", None)  # import evaluate -> ImportError
    with pytest.raises(ImportError, match=r"pip install 'hf-smooth\[evaluate\]'"):
        evaluate_modules.load("token_nll")


def module_level_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.parse(path.read_text()).body:  # top level only: imports inside functions are lazy
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add((node.module or "").split(".")[0])
    return names


def test_the_package_imports_evaluate_only_when_a_module_loads():
    """`import hf_smooth` never reaches this package, and the package's own files import evaluate, datasets and
    sacrebleu only in modules.py (which the module scripts import when evaluate loads them)."""
    folder = ROOT / "hf_smooth" / "evaluate_modules"
    optional = {"evaluate", "datasets", "sacrebleu"}
    assert "evaluate_modules" not in (ROOT / "hf_smooth" / "__init__.py").read_text()
    eager = {p.name: module_level_imports(p) & optional for p in folder.glob("*.py")}
    assert set(eager) == {"__init__.py", "token_statistics.py", "modules.py"}
    assert eager == {"__init__.py": set(), "token_statistics.py": set(), "modules.py": {"evaluate", "datasets"}}


# ---- in a plain Trainer ------------------------------------------------------------------------------------------


class RecordingComputeMetrics(ComputeMetrics):
    """Keeps the shape of what the Trainer handed to compute_metrics."""

    def __call__(self, eval_prediction):
        self.shape = eval_prediction.predictions.shape
        return super().__call__(eval_prediction)


def reference_metrics(trainer, model, *, shift: bool, num_bins: int = 15) -> TokenMetrics:
    """TokenMetrics over the logits of the Trainer's own evaluation batches (same collator, padding and order)."""
    metrics = TokenMetrics(num_bins=num_bins)
    model.eval()
    with torch.no_grad():
        for batch in trainer.get_eval_dataloader():
            logits = model(**batch).logits
            labels = batch["labels"]
            metrics.update(logits[:, :-1], labels[:, 1:]) if shift else metrics.update(logits, labels)
    return metrics


def test_plain_trainer_causal_lm(tmp_path):
    model, tokenizer = tiny_llama(), tiny_tokenizer()
    examples = causal_examples(n=8, seed=4)
    compute = RecordingComputeMetrics(evaluate_modules.load("token_calibration"))
    args = TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=3, use_cpu=True, report_to=[])
    trainer = Trainer(
        model=model, args=args, eval_dataset=ListDataset(examples), data_collator=DataCollatorForSeq2Seq(tokenizer),
        compute_metrics=compute, preprocess_logits_for_metrics=TokenStatisticsPreprocessor(shift_labels=True),
    )
    results = trainer.evaluate()
    assert compute.shape[0] == 8 and compute.shape[-1] == 4  # 4 numbers per position reached compute_metrics
    assert results["eval_num_tokens"] == sum(sum(1 for t in e["labels"][1:] if t != -100) for e in examples)

    expected = reference_metrics(trainer, model, shift=True).compute()
    for key in TOKEN_KEYS:
        assert results[f"eval_{key}"] == pytest.approx(expected[key], rel=1e-12, abs=1e-15), key

    # Independent float64 oracle, one unpadded example at a time.
    model64 = copy.deepcopy(model).double().eval()
    rows, targets = [], []
    with torch.no_grad():
        for e in examples:
            rows.append(model64(input_ids=torch.tensor([e["input_ids"]])).logits[0, :-1])
            targets.append(torch.tensor(e["labels"][1:]))
    oracle = oracle_metrics(torch.cat(rows), torch.cat(targets))
    for key in ("nll", "accuracy", "confidence", "brier"):
        assert results[f"eval_{key}"] == pytest.approx(oracle[key], rel=1e-5), key


def test_seq2seq_trainer_with_combine(tmp_path):
    model, tokenizer = tiny_t5(), tiny_tokenizer()
    examples = seq2seq_examples(n=7, seed=5)
    combined = evaluate.combine([evaluate_modules.load(name, num_bins=4) for name in ("token_nll", "token_ece")])
    args = Seq2SeqTrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=2, use_cpu=True,
                                    report_to=[], predict_with_generate=False)
    trainer = Seq2SeqTrainer(
        model=model, args=args, eval_dataset=ListDataset(examples),
        data_collator=DataCollatorForSeq2Seq(tokenizer, model=model), compute_metrics=ComputeMetrics(combined),
        preprocess_logits_for_metrics=TokenStatisticsPreprocessor(shift_labels=False),
    )
    results = trainer.evaluate()
    expected = reference_metrics(trainer, model, shift=False, num_bins=4).compute()
    for key in ("nll", "ppl", "ece", "ece_adaptive"):
        assert results[f"eval_{key}"] == pytest.approx(expected[key], rel=1e-12, abs=1e-15), key
    # Decoder logits are aligned with the labels: the oracle scores every target token.
    model64 = copy.deepcopy(model).double().eval()
    total = count = 0.0
    with torch.no_grad():
        for e in examples:
            labels = torch.tensor([e["labels"]])
            logits = model64(input_ids=torch.tensor([e["input_ids"]]),
                             decoder_input_ids=model64.prepare_decoder_input_ids_from_labels(labels=labels)).logits
            total += torch.nn.functional.cross_entropy(logits[0], labels[0], reduction="sum").item()
            count += labels.numel()
    assert results["eval_nll"] == pytest.approx(total / count, rel=1e-5)


# ---- BLEU / chrF -------------------------------------------------------------------------------------------------

HYPOTHESES = ["the cat sat on the mat", "hello there", "ein kleines Haus am See", ""]
REFERENCES = ["the cat sat on a mat", "hello there friend", "ein kleines Haus am See", "nichts"]
SECOND = ["a cat sat on the mat", "hello there", "das kleine Haus am See", "gar nichts"]


def test_corpus_bleu_chrf_equals_sacrebleu():
    module = evaluate_modules.load("corpus_bleu_chrf")
    single = module.compute(predictions=HYPOTHESES, references=REFERENCES)
    assert single == {"bleu": sacrebleu.corpus_bleu(HYPOTHESES, [REFERENCES]).score,
                      "chrf": sacrebleu.corpus_chrf(HYPOTHESES, [REFERENCES]).score}
    multi = module.compute(predictions=HYPOTHESES, references=[list(pair) for pair in zip(REFERENCES, SECOND)])
    assert multi == {"bleu": sacrebleu.corpus_bleu(HYPOTHESES, [REFERENCES, SECOND]).score,
                     "chrf": sacrebleu.corpus_chrf(HYPOTHESES, [REFERENCES, SECOND]).score}
    assert multi["bleu"] != single["bleu"]
    with pytest.raises(ValueError, match="same number of references"):
        module.compute(predictions=HYPOTHESES[:2], references=[["a"], ["b", "c"]])


def test_translation_recipe_scores_through_the_module_and_falls_back_to_sacrebleu(monkeypatch, capsys):
    translation = load_recipe("translation")
    expected = {"bleu": sacrebleu.corpus_bleu(HYPOTHESES, [REFERENCES]).score,
                "chrf": sacrebleu.corpus_chrf(HYPOTHESES, [REFERENCES]).score}
    calls = []
    real_load = evaluate_modules.load
    monkeypatch.setattr(evaluate_modules, "load", lambda name, **kw: calls.append(name) or real_load(name, **kw))
    assert translation.bleu_chrf_scorer()(HYPOTHESES, REFERENCES) == expected
    assert calls == ["corpus_bleu_chrf"] and "Warning" not in capsys.readouterr().out

    monkeypatch.setitem(sys.modules, "evaluate", None)  # evaluate not installed
    monkeypatch.setattr(evaluate_modules, "load", real_load)
    assert translation.bleu_chrf_scorer()(HYPOTHESES, REFERENCES) == expected
    lines = [line for line in capsys.readouterr().out.splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("Warning: BLEU/chrF from sacrebleu directly"), lines
    assert "pip install" in lines[0]


# ---- packaging ---------------------------------------------------------------------------------------------------


def test_every_module_folder_is_listed_and_matched_by_package_data():
    folder = ROOT / "hf_smooth" / "evaluate_modules"
    scripts = sorted(p.relative_to(folder).as_posix() for p in folder.glob("*/*.py"))
    assert scripts == sorted(f"{name}/{name}.py" for name in evaluate_modules.MODULES)
    assert '"hf_smooth.evaluate_modules" = ["*/*.py"]' in (ROOT / "pyproject.toml").read_text()


@pytest.mark.slow
def test_wheel_ships_the_modules_and_they_load_offline_from_site_packages(tmp_path):
    """Build the wheel (from a copy of the sources), unpack it as an installed package, and load a module from there
    with the hub switched off, in a fresh interpreter that cannot see the source tree."""
    source = tmp_path / "src"
    shutil.copytree(ROOT / "hf_smooth", source / "hf_smooth", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "whl")], cwd=source, check=True, timeout=300, capture_output=True)
    (wheel,) = (tmp_path / "whl").glob("hf_smooth-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for name in evaluate_modules.MODULES:
        assert f"hf_smooth/evaluate_modules/{name}/{name}.py" in names, name
    site = tmp_path / "site-packages"
    zipfile.ZipFile(wheel).extractall(site)

    code = """
import json, evaluate, hf_smooth
from hf_smooth import evaluate_modules
module = evaluate.load(evaluate_modules.path("token_nll"), keep_in_memory=True)
bleu = evaluate_modules.load("corpus_bleu_chrf")
print(json.dumps({"file": hf_smooth.__file__, "nll": module.compute(nll=[1.0, 3.0])["nll"],
                  "bleu": bleu.compute(predictions=["a b c d"], references=["a b c d"])["bleu"]}))
"""
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert Path(out["file"]).resolve().is_relative_to(site.resolve())
    assert out["nll"] == 2.0 and out["bleu"] == pytest.approx(100.0)
