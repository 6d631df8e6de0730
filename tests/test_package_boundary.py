"""The package boundary: a small core that imports none of the demo kit or its dependencies, private upstream state
touched in one module only, and one method table.

Every check here reads the source or imports in a fresh interpreter; none depends on what other tests imported.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ROOT / "hf_smooth"
DEMO_DEPENDENCIES = ("datasets", "sacrebleu", "yaml", "gguf", "polib", "peft", "matplotlib", "trl")


def library_modules() -> list[Path]:
    modules = sorted(p for p in LIBRARY.glob("*.py"))
    assert len(modules) > 10
    return modules


def test_import_hf_smooth_adds_no_demo_dependency():
    """What `import hf_smooth` imports beyond what torch, transformers' Trainer classes and accelerate import by
    themselves (transformers imports datasets and peft when they are installed, accelerate imports yaml): nothing
    from the demo kit, its dependencies, plots or TRL."""
    code = f"""
import json, sys
import torch, accelerate, accelerate.utils
from transformers import Seq2SeqTrainer, Trainer, TrainerCallback, TrainingArguments
before = set(sys.modules)
import hf_smooth
added = sorted(m for m in set(sys.modules) - before
               if m.split(".")[0] in {list(DEMO_DEPENDENCIES)!r} or m.startswith(("hf_smooth.demo", "hf_smooth.plots")))
print(json.dumps(added))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []


def test_library_never_imports_the_demo_kit():
    for path in library_modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [alias.name for alias in node.names]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            assert not any(name == "demo" or "demo" in name.split(".") for name in names), (path.name, node.lineno)


# Private attributes that are the object's own (a class reading its own state) or the standard library's / torch's.
OWN_STATE = {
    ("metrics.py", name) for name in ("_sums", "_pairs", "_saved_ece_adaptive", "_append_pairs")
} | {("fused.py", "_forward_hooks"), ("fused.py", "_forward_pre_hooks")} | {
    # argparse's groups (stdlib, unchanged since Python 2.7): recipes/common.py lists the smoothing options first.
    ("common.py", name) for name in ("_actions", "_action_groups", "_group_actions")
}


def private_accesses(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            if ast.unparse(node.value) in ("self", "ctx", "cls") or (path.name, node.attr) in OWN_STATE:
                continue
            found.append(f"{path.relative_to(ROOT)}:{node.lineno} {ast.unparse(node)}")
    return found


def test_private_upstream_state_is_touched_only_in_compat():
    """Outside hf_smooth/_compat.py no code reads another object's underscore attribute (transformers', accelerate's,
    peft's, trl's): an upgrade that renames one breaks in one known place."""
    paths = [p for p in library_modules() if p.name != "_compat.py"]
    paths += sorted((ROOT / "hf_smooth" / "demo").glob("*.py")) + sorted((ROOT / "recipes").glob("*.py"))
    paths += sorted((ROOT / "benchmarks").glob("*.py"))
    assert len(paths) > 15
    found = [access for path in paths for access in private_accesses(path)]
    assert not found, found
    # and the check can fail: _compat.py itself does touch private state
    assert private_accesses(LIBRARY / "_compat.py")


def test_the_method_list_exists_once():
    """`METHODS` is defined in hf_smooth/methods.py only; the rest of the code reads it."""
    definitions = []
    for path in [*library_modules(), *(ROOT / "recipes").glob("*.py"), *(ROOT / "benchmarks").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if any(isinstance(t, ast.Name) and t.id == "METHODS" for t in targets):
                    definitions.append(path.name)
    assert definitions == ["methods.py"]


def test_no_test_module_imports_another():
    tests = sorted((ROOT / "tests").glob("test_*.py"))
    assert len(tests) > 10
    offenders = []
    for path in tests:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("test_"):
                offenders.append(f"{path.name}:{node.lineno} from {node.module}")
            if isinstance(node, ast.Import) and any(a.name.startswith("test_") for a in node.names):
                offenders.append(f"{path.name}:{node.lineno}")
    assert not offenders, offenders


def test_no_sys_path_edits_in_recipes_and_tests():
    offenders = [
        f"{path.relative_to(ROOT)}"
        for folder in ("recipes", "tests")
        for path in (ROOT / folder).rglob("*.py")
        if "sys.path." + "insert" in path.read_text()  # spelled so that this file does not match itself
    ]
    assert not offenders, offenders
