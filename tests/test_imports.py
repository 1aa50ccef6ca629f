"""The import ladder: model.py and memory.py import nothing of this project, common.py nothing either, data.py only
model.py, checkpoint.py no script, eval.py not train.py, import_gguf.py only the library, and no project file
imports train.py."""

import ast
import os
import subprocess
import sys

from conftest import ROOT

OURS = {"model", "memory", "common", "data", "checkpoint", "eval", "train", "import_gguf"}
ALLOWED = {  # what each top-level file may import of ours
    "model": set(),
    "memory": set(),
    "common": set(),
    "data": {"model"},
    "checkpoint": {"model", "memory", "common", "data"},
    "eval": {"model", "memory", "common", "data", "checkpoint"},
    "train": {"model", "memory", "common", "data", "checkpoint", "eval"},
    "import_gguf": {"model", "data", "checkpoint"},  # a script beside the library, as eval.py
}


def imports_of(path: str) -> set:
    """The project modules a file imports, at any depth of its code (module level or inside a function)."""
    found = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & OURS


def test_each_file_imports_only_the_rungs_below_it():
    for name, allowed in ALLOWED.items():
        extra = imports_of(os.path.join(ROOT, f"{name}.py")) - allowed - {name}
        assert not extra, f"{name}.py imports {sorted(extra)}"


def test_no_project_file_imports_train():
    files = [os.path.join(ROOT, f"{n}.py") for n in ALLOWED if n != "train"]
    files += [os.path.join(ROOT, "experiments", f) for f in os.listdir(os.path.join(ROOT, "experiments"))
              if f.endswith(".py")]
    assert not [f for f in files if "train" in imports_of(f)]


def test_importing_model_and_memory_loads_nothing_else_of_ours():
    code = "import sys, model, memory; print(sorted(m for m in sys.modules if m in %r))" % sorted(OURS)
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "['memory', 'model']"
