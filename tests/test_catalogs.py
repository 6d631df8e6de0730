"""The catalog reader (hf_smooth/demo/catalogs.py) on small .po/.mo/JSON files written here, and the split.

Expected pairs are written out by hand from the catalog text below, never computed by the reader."""

from __future__ import annotations

import json
import logging
import random
import zipfile

import pytest

polib = pytest.importorskip("polib")

from hf_smooth.demo import catalogs  # noqa: E402
from hf_smooth.demo.catalogs import (  # noqa: E402
    CatalogError,
    is_placeholder_only,
    merge_pairs,
    pairs_from_gettext,
    pairs_from_json,
    split_by_source,
    wheel_pairs,
    write_translation_jsonl,
)

PO = r'''
msgid ""
msgstr ""
"Content-Type: text/plain; charset=UTF-8\n"
"Plural-Forms: nplurals=2; plural=(n != 1);\n"

msgid "Save changes"
msgstr "Änderungen speichern"

#, fuzzy
msgid "Delete item"
msgstr "Element löschen (geraten)"

msgid "Untranslated"
msgstr ""

msgid "%s"
msgstr "%s"

msgid "%(count)d"
msgstr "%(count)d"

msgid "{name}: {value}"
msgstr "{name}: {value}"

msgid "Status"
msgstr "Status"

msgid "One file"
msgid_plural "%(count)d files"
msgstr[0] "Eine Datei"
msgstr[1] "%(count)d Dateien"

msgid "Add {name}"
msgstr "{name}   hinzufügen"

msgctxt "menu"
msgid "Save changes"
msgstr "Änderungen speichern"

msgid "label_title"
msgstr "Titel"

#. Default: "Log in"
msgid "label_log_in"
msgstr "Anmelden"

#~ msgid "Old text"
#~ msgstr "Alter Text"
'''

EXPECTED = [
    ("Save changes", "Änderungen speichern"),
    ("One file", "Eine Datei"),
    ("Add {name}", "{name} hinzufügen"),
    ("Log in", "Anmelden"),
]


def _clean(pairs):
    return catalogs._clean(pairs)


def test_po_reader_drops_fuzzy_obsolete_header_placeholder_identical_and_deduplicates():
    pairs = _clean(pairs_from_gettext(PO.encode("utf-8"), "x/de/LC_MESSAGES/app.po"))
    assert pairs == EXPECTED


def test_mo_reader_matches_the_po_reader_on_the_same_catalog(tmp_path):
    po = polib.pofile(PO)
    mo_path = tmp_path / "app.mo"
    po.save_as_mofile(str(mo_path))  # msgfmt drops fuzzy and obsolete entries, as gettext does
    pairs = _clean(pairs_from_gettext(mo_path.read_bytes(), "x/de/LC_MESSAGES/app.mo"))
    # A .mo keeps no "#. Default:" comment, so the Plone-style message id gives nothing there.
    assert sorted(pairs) == sorted(pair for pair in EXPECTED if pair != ("Log in", "Anmelden"))  # .mo sorts msgids


@pytest.mark.parametrize("text", ["%s", "%(count)d", "{name}: {value}", "${a} - ${b}", "<br/>", "{{ x }}", "%1", " "])
def test_placeholder_only(text):
    assert is_placeholder_only(text)


@pytest.mark.parametrize("text", ["Add {name}", "No", "%(field)s must be unique", "<b>Bold</b>"])
def test_not_placeholder_only(text):
    assert not is_placeholder_only(text)


def test_invalid_encoding_raises_naming_the_file():
    data = PO.replace("UTF-8", "UTF-8").encode("utf-8") + b'\nmsgid "Bad"\nmsgstr "\xff\xfe"\n'
    with pytest.raises(CatalogError, match=r"broken/de/LC_MESSAGES/app\.po.*UTF-8"):
        pairs_from_gettext(data, "broken/de/LC_MESSAGES/app.po")


def test_latin1_catalog_is_decoded_by_its_declared_charset():
    text = PO.replace("charset=UTF-8", "charset=ISO-8859-1")
    assert _clean(pairs_from_gettext(text.encode("latin-1"), "x/de/LC_MESSAGES/app.po")) == EXPECTED


def test_corrupt_mo_raises_naming_the_file():
    with pytest.raises(CatalogError, match=r"x/de/LC_MESSAGES/app\.mo"):
        pairs_from_gettext(b"not a mo file at all", "x/de/LC_MESSAGES/app.mo")


def test_json_catalogs_join_by_key_path():
    english = {"config": {"step": {"user": {"title": "Connect to the device", "data": {"host": "Host"}}}},
               "state": {"on": "On", "off": "Off", "ref": "[%key:common::state::on%]"}, "only_en": "Only here"}
    german = {"config": {"step": {"user": {"title": "Mit dem Gerät verbinden", "data": {"host": "Host"}}}},
              "state": {"on": "An", "off": "Aus", "ref": "[%key:common::state::on%]"}, "only_de": "Nur hier"}
    raw = pairs_from_json(json.dumps(english).encode(), json.dumps(german).encode(), english_name="en.json",
                          name="de.json")
    assert _clean(raw) == [("Connect to the device", "Mit dem Gerät verbinden"), ("On", "An"), ("Off", "Aus")]


def test_invalid_json_raises_naming_the_file():
    with pytest.raises(CatalogError, match=r"comp/translations/de\.json"):
        pairs_from_json(b"{}", b"{not json", english_name="comp/translations/en.json",
                        name="comp/translations/de.json")


def _wheel(tmp_path, files):
    path = tmp_path / "demo_pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("demo_pkg-1.0.dist-info/METADATA",
                         "Metadata-Version: 2.1\nName: demo-pkg\nVersion: 1.0\nLicense-Expression: MIT\n")
        for name, data in files.items():
            archive.writestr(name, data)
    return path


def test_wheel_reader_finds_po_json_and_data_files_skips_other_languages_and_counts_bad_files(tmp_path, caplog):
    po = PO.encode("utf-8")
    po_other = b'msgid "Hello"\nmsgstr "Hallo (CH)"\n'
    files = {
        "demo_pkg/locale/de/LC_MESSAGES/app.po": po,
        "demo_pkg/locale/de/LC_MESSAGES/app.mo": b"ignored: the .po beside it is read",
        "demo_pkg/locale/de_CH/LC_MESSAGES/app.po": po_other,  # another variety, not 'de'
        "demo_pkg/locale/fr/LC_MESSAGES/app.po": b'msgid "Hello"\nmsgstr "Bonjour"\n',
        "demo_pkg-1.0.data/data/share/locale/de_DE/LC_MESSAGES/extra.po": b'msgid "Hello"\nmsgstr "Hallo"\n',
        "demo_pkg/locale/de/LC_MESSAGES/broken.po": b'msgid "x"\nmsgstr "\xff"\n',
        "demo_pkg/components/a/translations/en.json": json.dumps({"t": "Turn on", "s": "Save changes"}).encode(),
        "demo_pkg/components/a/translations/de.json": json.dumps({"t": "Einschalten",
                                                                   "s": "Änderungen speichern"}).encode(),
        "demo_pkg/static/translations/de-0123456789abcdef0123.json": json.dumps({"k": "Schließen"}).encode(),
        "demo_pkg/static/translations/en-fedcba98765432100123.json": json.dumps({"k": "Close"}).encode(),
        "demo_pkg/static/locale-data/de.json": json.dumps({"k": "Januar"}).encode(),  # not a translations/ folder
        "demo_pkg/static/locale-data/en.json": json.dumps({"k": "January"}).encode(),
    }
    with caplog.at_level(logging.WARNING, logger="hf_smooth.demo.catalogs"):
        result = wheel_pairs(_wheel(tmp_path, files), "de")
    assert (result.package, result.version, result.license) == ("demo-pkg", "1.0", "MIT")
    assert sorted(result.pairs) == sorted(EXPECTED + [("Hello", "Hallo"), ("Turn on", "Einschalten"),
                                                      ("Close", "Schließen")])
    assert result.skipped_files == ["demo_pkg/locale/de/LC_MESSAGES/broken.po"]
    assert "broken.po" in caplog.text
    with pytest.raises(CatalogError, match="broken.po"):
        wheel_pairs(_wheel(tmp_path, files), "de", strict=True)
    french = wheel_pairs(_wheel(tmp_path, files), "fr")
    assert french.pairs == [("Hello", "Bonjour")]


def test_merge_deduplicates_across_packages():
    a = catalogs.PackagePairs("a", "1", "MIT", [("Save", "Speichern"), ("Open", "Öffnen")])
    b = catalogs.PackagePairs("b", "1", "MIT", [("Open", "Öffnen"), ("Open", "Aufmachen")])
    assert merge_pairs([a, b]) == [("Save", "Speichern"), ("Open", "Öffnen"), ("Open", "Aufmachen")]


def _random_pairs(seed, n_sources=600):
    rng = random.Random(seed)
    pairs = []
    for i in range(n_sources):
        for j in range(rng.choice([1, 1, 1, 2, 3])):  # some sources carry several translations
            pairs.append((f"source {i}", f"Ziel {i}.{j}"))
    rng.shuffle(pairs)
    return pairs


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_split_has_no_source_in_two_splits_keeps_every_pair_and_is_deterministic(seed):
    pairs = _random_pairs(seed)
    splits = split_by_source(pairs, test_pairs=100, dev_pairs=50, seed=seed)
    sources = {name: {source for source, _ in split} for name, split in splits.items()}
    assert not sources["train"] & sources["dev"]
    assert not sources["train"] & sources["test"]
    assert not sources["dev"] & sources["test"]
    assert sorted(p for split in splits.values() for p in split) == sorted(pairs)
    assert len(splits["test"]) >= 100 and len(splits["dev"]) >= 50 and splits["train"]
    # The last source added to test pushed it over the target: at most its own pair count (<= 3) over.
    assert len(splits["test"]) < 100 + 3
    assert split_by_source(pairs, test_pairs=100, dev_pairs=50, seed=seed) == splits
    assert split_by_source(list(reversed(pairs)), test_pairs=100, dev_pairs=50, seed=seed)["test"] != [] and {
        s for s, _ in split_by_source(list(reversed(pairs)), test_pairs=100, dev_pairs=50, seed=seed)["test"]
    } == sources["test"]  # membership depends on the set of sources, not on the input order


def test_split_refuses_a_too_small_corpus():
    with pytest.raises(ValueError, match="read more catalogs"):
        split_by_source([("a b", "c d")] * 3, test_pairs=10)


def test_jsonl_rows_are_run_translation_format(tmp_path):
    path = tmp_path / "pairs.jsonl"
    assert write_translation_jsonl([("Save", "Speichern")], path, target_lang="de") == 1
    assert json.loads(path.read_text(encoding="utf-8")) == {"translation": {"en": "Save", "de": "Speichern"}}


def test_installed_distribution_is_read_through_its_record_and_not_again_from_a_wheel(tmp_path, monkeypatch):
    """A fake installed distribution on sys.path whose RECORD lists a catalog outside site-packages (as gramps' files
    under <prefix>/share/locale); a wheel of the same distribution in wheel_dir is then skipped."""
    site = tmp_path / "lib" / "site-packages"
    info = site / "demo_pkg-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: demo-pkg\nVersion: 1.0\nLicense: MIT\n")
    catalog = tmp_path / "share" / "locale" / "de" / "LC_MESSAGES" / "demo.po"
    catalog.parent.mkdir(parents=True)
    catalog.write_bytes(PO.encode("utf-8"))
    (info / "RECORD").write_text(
        "demo_pkg-1.0.dist-info/METADATA,,\ndemo_pkg-1.0.dist-info/RECORD,,\n"
        "../../share/locale/de/LC_MESSAGES/demo.po,,\n"
    )
    monkeypatch.syspath_prepend(str(site))
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(wheels, {"demo_pkg/locale/de/LC_MESSAGES/other.po": b'msgid "Hello"\nmsgstr "Hallo"\n'})
    results = catalogs.catalog_pairs("de", packages=["demo-pkg"], wheel_dir=wheels)
    assert [(r.package, r.version, r.license, r.catalogs) for r in results] == [("demo-pkg", "1.0", "MIT", 1)]
    assert results[0].pairs == EXPECTED
    with pytest.raises(ImportError, match="pip install --no-deps"):
        catalogs.catalog_pairs("de", packages=["no-such-catalog-package"], strict=True)


# ---- the translation recipe's outputs (issue 15.5) and its new default -----------------------------------------------

SOURCES = ["Open the door", "Close", "Turn the light on in the kitchen now", "Save", "Delete all files in this folder",
           "Start", "Stop the music", "Add a new user to the group", "Help", "Settings"]


def _write_pairs(path, pairs):
    write_translation_jsonl(pairs, path, target_lang="de")
    return path


def test_generated_lengths_stop_at_the_first_end_of_sequence():
    import numpy as np
    from translation import generated_lengths

    # decoder start 0 (= pad, as Marian), eos 1; rows padded with eos (beam search) or pad or -100 (gathered batches)
    predictions = np.array([[0, 5, 6, 1, 1, 1], [0, 7, 1, 0, 0, 0], [0, 5, 5, 5, 5, 5],
                            [0, 1, -100, -100, -100, -100]])
    assert generated_lengths(predictions, pad=0, eos=1, start=0).tolist() == [3, 2, 5, 1]  # counted by hand


def test_translation_predictions_follow_the_data_order_with_source(tmp_path):
    """Length-grouped evaluation batches, yet eval_predictions.jsonl lists the evaluation file's pairs in order, with
    their source, and BLEU/chrF/gen_len are those of the rows (the oracle regenerates with the saved model)."""
    import numpy as np
    import sacrebleu
    import torch
    import translation
    from transformers import AutoTokenizer, MarianMTModel

    train = [(s, f"Ziel {i}: {s}") for i, s in enumerate(SOURCES * 3)]
    dev = [(s, f"Übersetzung von {s}") for s in SOURCES]
    out = tmp_path / "out"
    translation.main([
        "--train_file", str(_write_pairs(tmp_path / "train.jsonl", train)),
        "--validation_file", str(_write_pairs(tmp_path / "dev.jsonl", dev)),
        "--embedded_d_model", "32", "--embedded_layers", "1", "--embedded_vocab_size", "300",
        "--generation_num_beams", "2", "--generation_max_length", "12", "--max_steps", "2", "--warmup_steps", "0",
        "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "3", "--learning_rate", "3e-3",
        "--dataloader_pin_memory", "false", "--output_dir", str(out),
    ])
    rows = [json.loads(line) for line in (out / "eval_predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [(r["source"], r["reference"]) for r in rows] == dev
    metrics = json.loads((out / "metrics.json").read_text())
    hypotheses = [r["hypothesis"] for r in rows]
    references = [target for _, target in dev]
    assert metrics["eval_bleu"] == pytest.approx(sacrebleu.corpus_bleu(hypotheses, [references]).score, abs=1e-9)
    assert metrics["eval_chrf"] == pytest.approx(sacrebleu.corpus_chrf(hypotheses, [references]).score, abs=1e-9)

    tokenizer, model = AutoTokenizer.from_pretrained(out), MarianMTModel.from_pretrained(out).eval()
    lengths = []
    for (source, _), written in zip(dev, hypotheses):
        with torch.no_grad():
            ids = model.generate(**tokenizer([source], return_tensors="pt"), num_beams=2, max_length=12)[0].tolist()
        assert tokenizer.decode(ids, skip_special_tokens=True).strip() == written  # the row is this source's output
        count = 0
        for token in ids[1:]:  # after the decoder start token, up to and including the first eos
            count += 1
            if token == tokenizer.eos_token_id:
                break
        lengths.append(count)
    assert metrics["eval_gen_len"] == pytest.approx(float(np.mean(lengths)))


def _catalog_packages_installed() -> bool:
    import importlib.metadata

    try:
        for name in catalogs.CATALOG_PACKAGES:
            importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.skipif(not _catalog_packages_installed(), reason=catalogs.install_command())
def test_new_default_data_two_step_smoke(tmp_path):
    """The recipe's default data (the catalog packages' test split) with a tiny model for 2 steps."""
    import translation

    out = tmp_path / "out"
    translation.main([
        "--max_train_samples", "64", "--max_eval_samples", "8", "--embedded_d_model", "32", "--embedded_layers", "1",
        "--embedded_vocab_size", "400", "--generation_num_beams", "1", "--generation_max_length", "8",
        "--max_steps", "2", "--warmup_steps", "0", "--per_device_train_batch_size", "8",
        "--dataloader_pin_memory", "false", "--output_dir", str(out),
    ])
    metrics = json.loads((out / "metrics.json").read_text())
    assert "translation catalogs of 8 packages" in metrics["data"] and metrics["global_step"] == 2
    assert metrics["train_examples"] == 64 and metrics["eval_examples"] == 8
    rows = [json.loads(line) for line in (out / "eval_predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    test = split_by_source(merge_pairs(catalogs.catalog_pairs("de")), test_pairs=1000, dev_pairs=1000, seed=0)["test"]
    assert [(r["source"], r["reference"]) for r in rows] == test[:8]


def test_translation_refuses_include_for_metrics_without_inputs(tmp_path):
    import translation

    with pytest.raises(ValueError, match="--include_for_metrics loss: keep 'inputs'"):
        translation.TranslationTrainingArguments(output_dir=str(tmp_path), include_for_metrics=["loss"])
