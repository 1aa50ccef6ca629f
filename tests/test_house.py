"""The house rules a learner relies on, checked: one SMF step reads in at most 150 lines of train.py and memory.py
(docstrings aside), product code never imports the test suite, and model.py keeps no state hidden in __dict__."""

import ast
import os

from conftest import ROOT

# One default-recipe SMF step: train.py's smf_step and every function it runs in train.py and memory.py, the
# "same numbers, faster" section of memory.py aside (a learner may skip it)
STEP = {"train.py": ["smf_step", "summed_loss"],
        "memory.py": ["read_counts", "select_per_micro_batch", "select_rows", "row_scores", "rank_kl", "background_of",
                      "BackgroundStats.distribution", "grad_rows", "adamw_rows_", "SparseMemoryOptimizer.step",
                      "SparseMemoryOptimizer.zero_grad"]}
FASTER = "# Same numbers, faster"


def functions(path: str) -> dict:
    """{name or Class.name: ast node} of a file's top-level functions and methods."""
    found = {}
    for node in ast.parse(open(path, encoding="utf-8").read()).body:
        if isinstance(node, ast.FunctionDef):
            found[node.name] = node
        elif isinstance(node, ast.ClassDef):
            found.update({f"{node.name}.{f.name}": f for f in node.body if isinstance(f, ast.FunctionDef)})
    return found


def code_lines(node, lines: list) -> int:
    """The lines of a function, decorators included, blank lines and its docstring aside."""
    doc = set()
    if ast.get_docstring(node) is not None:
        doc = set(range(node.body[0].lineno, node.body[0].end_lineno + 1))
    start = min([node.lineno] + [d.lineno for d in node.decorator_list])
    return sum(1 for i in range(start, node.end_lineno + 1) if i not in doc and lines[i - 1].strip())


def test_one_smf_step_reads_in_150_lines_of_two_files():
    total = 0
    for name, names in STEP.items():
        path = os.path.join(ROOT, name)
        lines = open(path, encoding="utf-8").read().splitlines()
        found = functions(path)
        faster = next((i + 1 for i, line in enumerate(lines) if line.startswith(FASTER)), len(lines) + 1)
        for n in names:
            assert found[n].lineno < faster, f"{name}: {n} lies in the 'same numbers, faster' section"
            total += code_lines(found[n], lines)
    assert total <= 150, total
    # the step calls what it is said to call
    called = {c.func.attr for c in ast.walk(functions(os.path.join(ROOT, "train.py"))["smf_step"])
              if isinstance(c, ast.Call) and isinstance(c.func, ast.Attribute)}
    assert {"read_counts", "select_per_micro_batch", "select_rows", "step"} <= called


def test_product_code_never_imports_the_tests():
    files = [os.path.join(d, f) for d in (ROOT, os.path.join(ROOT, "experiments"), os.path.join(ROOT, "bench"))
             for f in os.listdir(d) if f.endswith(".py")]
    for path in files:
        src = open(path, encoding="utf-8").read()
        assert "\"tests\"" not in src and "'tests'" not in src, f"{path} puts tests/ on its path"
        mods = {a.name for n in ast.walk(ast.parse(src)) if isinstance(n, ast.Import) for a in n.names} | \
               {n.module for n in ast.walk(ast.parse(src)) if isinstance(n, ast.ImportFrom) and n.module}
        assert not mods & {"tiny", "tiny_data", "conftest", "helpers"}, f"{path} imports the test suite"


def test_model_py_keeps_no_state_in_dict():
    assert "__dict__" not in open(os.path.join(ROOT, "model.py"), encoding="utf-8").read()
