"""Translation with a decoder-only LM, for recipes/clm.py: prompt/completion rows, few-shot prompts, greedy
generation and sacrebleu scores.

The prompt is plain text a base model continues (no chat template):

    English: Save changes
    German:                       <- the prompt (its tokens get label -100)
     Änderungen speichern<eos>    <- the completion (scored), with its leading space

A few-shot prompt puts `shots` solved examples before it, each on its own two lines and separated by a blank line.
Generation is greedy and stops at the end-of-sequence token or at the first token holding a line break; the text
up to the first line break is the hypothesis. The same rule scores the model before fine-tuning (few-shot) and after
(zero-shot, the format it was fine-tuned on), so the two numbers differ only in the model and the prompt.
"""

from __future__ import annotations

import time

import torch

LANGUAGES = {"de": "German", "fr": "French"}


def language_name(lang: str) -> str:
    if lang not in LANGUAGES:
        raise ValueError(f"No prompt wording for target language {lang!r}; known: {', '.join(LANGUAGES)}.")
    return LANGUAGES[lang]


def prompt(source: str, lang: str) -> str:
    return f"English: {source}\n{language_name(lang)}:"


def completion(target: str) -> str:
    return f" {target}"


def few_shot_prompt(source: str, lang: str, shots: list[tuple[str, str]]) -> str:
    examples = "".join(prompt(s, lang) + completion(t) + "\n\n" for s, t in shots)
    return examples + prompt(source, lang)


def prompt_completion_rows(pairs: list[tuple[str, str]], lang: str) -> dict[str, list[str]]:
    """Columns 'prompt' and 'completion' (what clm.py's --prompt_column/--completion_column read)."""
    return {"prompt": [prompt(s, lang) for s, _ in pairs], "completion": [completion(t) for _, t in pairs]}


def line_break_token_ids(tokenizer) -> list[int]:
    """Every vocabulary entry whose text holds a line break (``\\n``, ``\\n\\n``, ``.\\n``, the byte ``<0x0A>``):
    generation stops on any of them, and the hypothesis is cut at the first line break, which gives the same text
    as generating on and cutting afterwards."""
    ids = sorted(i for token, i in tokenizer.get_vocab().items() if "\n" in token or token == "<0x0A>")
    if not ids:
        raise ValueError(f"{type(tokenizer).__name__} has no token holding a line break; the prompt format needs one.")
    return ids


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], *, batch_size: int, max_new_tokens: int) -> tuple[list[str], int]:
    """Greedy continuations of `prompts` up to the first line break (or eos), in order; also the number of
    generated tokens (up to and including the stopping token)."""
    stop = [tokenizer.eos_token_id, *line_break_token_ids(tokenizer)]
    side, was_training = tokenizer.padding_side, model.training
    tokenizer.padding_side = "left"  # continuations start right after each prompt
    model.eval()
    outputs, generated = [], 0
    try:
        for start in range(0, len(prompts), batch_size):
            batch = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True)
            batch = batch.to(next(model.parameters()).device)
            tokens = model.generate(
                **batch, do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=stop,
                pad_token_id=tokenizer.pad_token_id,
            )[:, batch["input_ids"].shape[1] :]
            for row in tokens.tolist():
                ended = next((i + 1 for i, t in enumerate(row) if t in stop), len(row))
                generated += ended
                outputs.append(tokenizer.decode(row[:ended], skip_special_tokens=True).split("\n", 1)[0].strip())
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return outputs, generated


def corpus_scores(hypotheses: list[str], references: list[str]) -> dict[str, float]:
    """Corpus BLEU and chrF (sacrebleu defaults: 13a tokenization, chrF with character 6-grams, beta 2)."""
    import sacrebleu

    return {"bleu": sacrebleu.corpus_bleu(hypotheses, [references]).score,
            "chrf": sacrebleu.corpus_chrf(hypotheses, [references]).score}


def score_translations(model, tokenizer, pairs: list[tuple[str, str]], lang: str, *, shots: list[tuple[str, str]],
                       batch_size: int, max_new_tokens: int) -> tuple[dict, list[dict]]:
    """Translate the sources of `pairs` (with `shots` solved examples in each prompt; none: zero-shot) and score them
    against the targets.

    Returns the scores (bleu, chrf, pairs, shots, distinct_outputs: distinct hypotheses per distinct source,
    mean_generated_tokens, seconds) and one ``{"source", "reference", "hypothesis"}`` row per pair, in order."""
    started = time.time()
    prompts = [few_shot_prompt(source, lang, shots) for source, _ in pairs]
    hypotheses, generated = generate(model, tokenizer, prompts, batch_size=batch_size, max_new_tokens=max_new_tokens)
    references = [target for _, target in pairs]
    by_source = dict(zip((source for source, _ in pairs), hypotheses))
    scores = {
        **corpus_scores(hypotheses, references), "pairs": len(pairs), "shots": len(shots),
        "distinct_outputs": len(set(by_source.values())) / max(1, len(by_source)),
        "mean_generated_tokens": generated / max(1, len(pairs)), "seconds": time.time() - started,
    }
    rows = [{"source": source, "reference": reference, "hypothesis": hypothesis}
            for (source, reference), hypothesis in zip(pairs, hypotheses)]
    return scores, rows
