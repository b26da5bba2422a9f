"""No code path in robustkd/ unpickles, loads YAML unsafely, or extracts an archive member unchecked.

The one pickle reader allowed is a restricted unpickler: a class deriving from ``pickle.Unpickler`` that
defines its own ``find_class`` and never hands the lookup back to pickle's (no ``.find_class(`` call inside).

The check reads the syntax tree of every module, not its text: imports are followed through aliases
(``import pickle as p``, ``from torch import load``), keyword arguments are read as values, and a
function that reads archive members must first call ``is_unsafe_member``. The checker is itself tested
on snippets that must be caught and on snippets that must pass.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "robustkd"

# Loaders that run code from the file (pickle and its relatives), whatever their arguments.
NEVER = {
    "pickle.load",
    "pickle.loads",
    "pickle.Unpickler",
    "_pickle.load",
    "_pickle.loads",
    "_pickle.Unpickler",
    "cPickle.load",
    "cPickle.loads",
    "dill.load",
    "dill.loads",
    "cloudpickle.load",
    "cloudpickle.loads",
    "joblib.load",
    "marshal.load",
    "marshal.loads",
    "shelve.open",
    "pandas.read_pickle",
    "yaml.unsafe_load",
    "yaml.unsafe_load_all",
    "yaml.full_load",
    "yaml.full_load_all",
    "yaml.Loader",
    "yaml.UnsafeLoader",
    "yaml.FullLoader",
    "shutil.unpack_archive",
}
UNPICKLERS = {"pickle.Unpickler", "_pickle.Unpickler"}  # allowed only as the base of a restricted unpickler
TORCH_LOADS = {"torch.load", "torch.serialization.load"}
YAML_LOADS = {"yaml.load", "yaml.load_all"}
SAFE_YAML_LOADERS = {"yaml.SafeLoader", "yaml.CSafeLoader", "yaml.BaseLoader", "yaml.CBaseLoader"}
NUMPY_LOADS = {"numpy.load"}
ARCHIVE_OPENERS = {"zipfile.ZipFile", "tarfile.open", "tarfile.TarFile", "tarfile.TarFile.open"}
MEMBER_READS = {"read", "open", "extract", "extractfile"}
CHECK = "is_unsafe_member"


def _aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> dotted name it was imported as, from every import in the module."""
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    names[alias.asname] = alias.name
                else:
                    top = alias.name.split(".")[0]
                    names[top] = top
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return names


def _dotted(node: ast.AST, names: dict[str, str]) -> str | None:
    if isinstance(node, ast.Name):
        return names.get(node.id, node.id)
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value, names)
        return f"{base}.{node.attr}" if base else None
    return None


def _keyword(call: ast.Call, name: str, position: int | None = None) -> ast.AST | None:
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value
    if position is not None and len(call.args) > position:
        return call.args[position]
    return None


def _is_constant(node: ast.AST | None, value: object) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def _functions(tree: ast.AST) -> list[ast.AST]:
    """Each function, plus the module itself for top-level code."""
    return [tree, *(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef))]


def _own_nodes(scope: ast.AST) -> list[ast.AST]:
    """Nodes of a function, not of the functions nested in it."""
    out, todo = [], list(ast.iter_child_nodes(scope))
    while todo:
        node = todo.pop()
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda | ast.ClassDef):
            continue
        out.append(node)
        todo.extend(ast.iter_child_nodes(node))
    return out


def _restricted_unpickler_bases(tree: ast.AST) -> set[int]:
    """The base-class nodes of classes that override ``find_class`` without delegating it to pickle's."""
    bases: set[int] = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.ClassDef):
            continue
        finders = [f for f in node.body if isinstance(f, ast.FunctionDef) and f.name == "find_class"]
        delegates = any(isinstance(n, ast.Attribute) and n.attr == "find_class" for f in finders for n in ast.walk(f))
        if finders and not delegates:
            bases.update(id(base) for base in node.bases)
    return bases


def find_unsafe(source: str, filename: str = "<snippet>") -> list[str]:
    """Every unsafe load or unchecked archive read in ``source``, as 'file:line: what'."""
    tree = ast.parse(source, filename)
    names = _aliases(tree)
    found: list[str] = []
    allowed: set[int] = set()  # loader references that are the function of a safe call
    restricted = _restricted_unpickler_bases(tree)

    def report(node: ast.AST, what: str) -> None:
        found.append(f"{filename}:{node.lineno}: {what}")

    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func, names)
        if name in TORCH_LOADS:
            if _is_constant(_keyword(node, "weights_only"), True):
                allowed.add(id(node.func))
        elif name in YAML_LOADS:
            loader = _keyword(node, "Loader", 1)
            if loader is not None and _dotted(loader, names) in SAFE_YAML_LOADERS:
                allowed.add(id(node.func))
        elif name in NUMPY_LOADS:
            flag = _keyword(node, "allow_pickle")
            if flag is not None and not _is_constant(flag, False):
                report(node, f"{name} with allow_pickle other than False")
        elif isinstance(node.func, ast.Attribute) and node.func.attr == "extractall":
            report(node, "extractall (robustkd never extracts archives to disk)")

    for node in ast.walk(tree):
        if not isinstance(node, ast.Name | ast.Attribute):
            continue
        name = _dotted(node, names)
        if name in UNPICKLERS and id(node) in restricted:
            continue
        if name in NEVER and id(node) not in allowed:
            report(node, f"{name} can run code from the file")
        elif name in TORCH_LOADS and id(node) not in allowed:
            report(node, f"{name} without weights_only=True")
        elif name in YAML_LOADS and id(node) not in allowed:
            report(node, f"{name} without a safe Loader (use yaml.safe_load)")

    for scope in _functions(tree):
        nodes = _own_nodes(scope)
        archives: set[str] = set()
        for node in nodes:
            # x = zipfile.ZipFile(...), with tarfile.open(...) as x (the opener may sit inside other calls)
            if isinstance(node, ast.Assign | ast.withitem):
                value = node.value if isinstance(node, ast.Assign) else node.context_expr
                targets = node.targets if isinstance(node, ast.Assign) else [node.optional_vars]
                opens = any(
                    isinstance(sub, ast.Call) and _dotted(sub.func, names) in ARCHIVE_OPENERS for sub in ast.walk(value)
                )
                if opens:
                    archives.update(t.id for t in targets if isinstance(t, ast.Name))
        checked_at = [
            n.lineno
            for n in nodes
            if isinstance(n, ast.Call) and (_dotted(n.func, names) or "").split(".")[-1] == CHECK
        ]
        for node in nodes:
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            method, owner = node.func.attr, node.func.value
            on_archive = isinstance(owner, ast.Name) and owner.id in archives
            reads = method in ("extract", "extractfile") or (on_archive and method in MEMBER_READS)
            if reads and not any(line < node.lineno for line in checked_at):
                report(node, f"archive member read by .{method}() with no {CHECK}() check before it")
    return sorted(set(found))


def test_no_unsafe_loads_or_unchecked_extraction_in_robustkd():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 30  # the package really was found
    problems = [p for path in files for p in find_unsafe(path.read_text(), str(path.relative_to(PACKAGE.parent)))]
    assert problems == [], "\n".join(problems)


@pytest.mark.parametrize(
    ("module", "old", "new"),
    [
        ("checkpoint.py", "weights_only=True", "weights_only=False"),
        ("checkpoint.py", ", weights_only=True", ""),
        ("data/cache.py", "allow_pickle=False", "allow_pickle=True"),
        ("data/imagefolder.py", f"{CHECK}(", "renamed_check("),
        ("data/cifar.py", f"{CHECK}(", "renamed_check("),
        ("data/pickled.py", "def find_class(", "def other_name("),
        ("data/pickled.py", "found = ALLOWED.get((module, name))", "found = super().find_class(module, name)"),
    ],
)
def test_weakening_a_real_loader_is_caught(module, old, new):
    # The rule is only worth something if it sees the real loaders: undo each one's guard and it must fire.
    source = (PACKAGE / module).read_text()
    assert old in source
    assert find_unsafe(source) == []
    assert find_unsafe(source.replace(old, new)), f"{module}: {old!r} -> {new!r} went unnoticed"


@pytest.mark.parametrize(
    "snippet",
    [
        "import pickle\npickle.load(open('f', 'rb'))",
        "import pickle as p\np.loads(b'')",
        "import pickle\npickle.loads(pickle.dumps(a) + received)",
        "import pickle\npickle.loads(pickle.dumps(err))",
        "import pickle\npickle.loads(data)",
        "from pickle import load\nload(f)",
        "from pickle import Unpickler\nclass U(Unpickler): pass",
        # a find_class that hands the lookup back to pickle's restricts nothing
        "import pickle\nclass U(pickle.Unpickler):\n    def find_class(self, m, n):\n"
        "        return super().find_class(m, n)",
        "import pickle\nclass U(pickle.Unpickler):\n    def find_class(self, m, n):\n        return 1\n"
        "pickle.Unpickler(f)",
        "import dill\ndill.load(f)",
        "import marshal\nmarshal.loads(b'')",
        "import shelve\nshelve.open('db')",
        "import torch\ntorch.load('m.pt')",
        "import torch\ntorch.load('m.pt', weights_only=False)",
        "import torch\ntorch.load('m.pt', weights_only=flag)",
        "from torch import load\nload('m.pt', map_location='cpu')",
        "import torch.serialization\ntorch.serialization.load('m.pt')",
        "import torch\nreader = torch.load\nreader('m.pt', weights_only=True)",
        "import yaml\nyaml.load(text)",
        "import yaml\nyaml.load(text, Loader=yaml.Loader)",
        "import yaml\nyaml.load(text, yaml.FullLoader)",
        "from yaml import unsafe_load\nunsafe_load(text)",
        "import yaml\nyaml.full_load(text)",
        "import numpy as np\nnp.load('a.npy', allow_pickle=True)",
        "import shutil\nshutil.unpack_archive('a.zip', 'out')",
        "import tarfile\nwith tarfile.open('a.tar') as t:\n    t.extractall('out')",
        "import zipfile\ndef f():\n    z = zipfile.ZipFile('a.zip')\n    return z.read('x')",
        "import zipfile\ndef f(p):\n    with zipfile.ZipFile(p) as z:\n        return z.open(z.namelist()[0]).read()",
        "import tarfile\ndef f(p):\n    with tarfile.open(p) as t:\n        for m in t:\n            t.extractfile(m)",
        # the check must come before the read, in the same function
        "import zipfile\ndef f(p):\n    z = zipfile.ZipFile(p)\n    data = z.read('x')\n    is_unsafe_member('x')",
        "import zipfile\ndef g():\n    is_unsafe_member('x')\ndef f(p):\n    z = zipfile.ZipFile(p)\n    z.read('x')",
    ],
)
def test_checker_catches(snippet):
    assert find_unsafe(snippet), snippet


@pytest.mark.parametrize(
    "snippet",
    [
        "import pickle\ntry:\n    pass\nexcept pickle.UnpicklingError:\n    pass",
        "import pickle\nclass U(pickle.Unpickler):\n    def find_class(self, m, n):\n"
        "        raise pickle.UnpicklingError(m)",
        "import torch\ntorch.load('m.pt', map_location='cpu', weights_only=True)",
        "from torch import load\nload('m.pt', weights_only=True)",
        "import yaml\nyaml.safe_load(text)\nyaml.safe_dump({})",
        "import yaml\nyaml.load(text, Loader=yaml.SafeLoader)",
        "import yaml\nyaml.load(text, yaml.CSafeLoader)",
        "import numpy as np\nnp.load('a.npy')\nnp.load('a.npy', allow_pickle=False)",
        "import json\njson.load(f)",
        "import zipfile\ndef f(p):\n    z = zipfile.ZipFile(p)\n    for i in z.infolist():\n"
        "        if is_unsafe_member(i.filename):\n            raise ValueError\n    return z.read(i)",
        "import tarfile\ndef f(p):\n    with tarfile.open(p) as t:\n        for m in t:\n"
        "            if is_unsafe_member(m.name):\n                raise ValueError\n            t.extractfile(m)",
        "def f(path):\n    with open(path) as handle:\n        return handle.read()",
    ],
)
def test_checker_passes(snippet):
    assert find_unsafe(snippet) == [], snippet
