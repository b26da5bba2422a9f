"""The shape of the package: imports point down the layers of docs/ARCHITECTURE.md, no cycles, small functions."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "robustkd"
MAX_LINES = 60
MAX_DEPTH = 4
BLOCKS = (ast.If, ast.For, ast.AsyncFor, ast.While, ast.With, ast.AsyncWith, ast.Try, ast.Match)


def _layers() -> dict[str, int]:
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    layers: dict[str, int] = {}
    for number, packages in re.findall(r"^\| (\d+) \| ([^|]+) \|", text, flags=re.MULTILINE):
        for name in re.findall(r"`([^`]+)`", packages):
            layers[name] = int(number)
    return layers


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Every robustkd module ``name`` imports, at module level or inside a function."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = (
                ".".join([*package[: len(package) - node.level + 1], node.module or ""]) if node.level else node.module
            )
            base = (base or "").strip(".")
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            while target not in known and "." in target:
                target = target.rsplit(".", 1)[0]
            if target in known and target != name:
                found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    known = _modules()
    return {name: _imports(name, path, known) for name, path in known.items()}


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "robustkd"


def test_every_package_has_a_layer():
    layers = _layers()
    assert layers, "docs/ARCHITECTURE.md has no layer table"
    missing = sorted({_unit(m) for m in _modules()} - set(layers))
    assert not missing, f"packages with no row in docs/ARCHITECTURE.md: {missing}"


def test_imports_point_down_the_layers():
    layers = _layers()
    wrong = []
    for module, targets in _graph().items():
        for target in targets:
            a, b = _unit(module), _unit(target)
            if a != b and layers.get(b, 99) >= layers.get(a, -1):
                wrong.append(f"{module} -> {target} (layer {layers.get(a)} -> {layers.get(b)})")
    assert not wrong, "imports against the layer order:\n" + "\n".join(sorted(wrong))


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    assert not _cycles(_graph())


def test_cycle_finder_finds_a_cycle():
    # The check above must be able to fail.
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def _depth(node: ast.AST, depth: int = 0) -> int:
    deepest = depth
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef | ast.Lambda):
            continue  # measured on its own
        deepest = max(deepest, _depth(child, depth + isinstance(child, BLOCKS)))
    return deepest


def _functions():
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                yield f"{path.relative_to(ROOT)}:{node.lineno} {node.name}", node


def test_functions_are_short_and_flat():
    long = [
        f"{where} ({node.end_lineno - node.lineno + 1} lines)"
        for where, node in _functions()
        if node.end_lineno - node.lineno + 1 > MAX_LINES
    ]
    deep = [f"{where} (depth {_depth(node)})" for where, node in _functions() if _depth(node) > MAX_DEPTH]
    assert not long, f"functions over {MAX_LINES} lines:\n" + "\n".join(long)
    assert not deep, f"functions nested deeper than {MAX_DEPTH}:\n" + "\n".join(deep)


@pytest.mark.parametrize(
    ("source", "depth"),
    [
        ("def f():\n    return 1\n", 0),
        ("def f():\n    for a in b:\n        if a:\n            with c:\n                pass\n", 3),
    ],
)
def test_depth_measure(source, depth):
    (func,) = ast.parse(source).body
    assert _depth(func) == depth


NEW_METHOD = '''"""A one-teacher method written as a user would: logits matched by mean squared error."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from robustkd.methods.base import Batch, Method, Output, StepInfo, register_method
from robustkd.methods.common import require_teacher


@register_method("logit_mse")
@dataclass
class LogitMSE(Method):
    needs_teacher = True
    weight: float = 1.0

    def __call__(self, student, teacher, batch: Batch, info: StepInfo) -> Output:
        teacher = require_teacher(teacher, self.name)
        with torch.no_grad():
            target = teacher(batch.x)
        logits = student(batch.x)
        loss = self.weight * F.mse_loss(logits, target)
        return Output(loss, {"mse": loss.detach()}, logits)
'''

USE_IT = """
import torch
from robustkd.methods import METHODS, Batch, StepInfo, build_method
from robustkd.runtime import freeze
method = build_method("logit_mse", {"weight": 2.0})
student, teacher = torch.nn.Linear(4, 3), freeze(torch.nn.Linear(4, 3))
out = method(student, teacher, Batch(torch.rand(5, 4), torch.tensor([0, 1, 2, 0, 1])), StepInfo(0, 0, 1, 1))
out.loss.backward()
assert "logit_mse" in METHODS.names() and torch.isfinite(out.loss) and student.weight.grad is not None
print("ok")
"""


def test_a_distillation_method_is_one_file(tmp_path):
    # A copy of the package plus one new file in robustkd/methods/: nothing else is edited, and the new
    # method is registered, builds from its options and runs a step (docs/ARCHITECTURE.md, "A new method").
    import shutil
    import subprocess
    import sys

    copy = tmp_path / "robustkd"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "methods" / "logit_mse.py").write_text(NEW_METHOD)
    env = {"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    run = [sys.executable, "-c", USE_IT]
    done = subprocess.run(run, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
