"""What a new user reads: every option named in a message exists, the missing-dataset advice can be followed,
summaries are readable, and nothing meant for a terminal reaches a pipe."""

import ast
import re
from pathlib import Path

from robustkd.cli import COMMANDS
from robustkd.cli.parsing import options

PACKAGE = Path(__file__).resolve().parents[1] / "robustkd"
FLAG = re.compile(r"(?<![\w-])--([a-z][a-z0-9_.-]*[a-z0-9_])")
# Options of other programs that messages tell the user to run.
OTHER_PROGRAMS = {"--logdir", "--nproc_per_node", "--no-deps"}


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        first = body[0] if isinstance(body, list) and body else None
        if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
            ids.add(id(first.value))
    return ids


def _mentioned_options() -> dict[str, list[str]]:
    """Each ``--option`` inside a string literal of the package (docstrings and the keys of the old-spelling
    tables aside) → where it is written."""
    found: dict[str, list[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skip = _docstrings(tree)
        skip |= {id(key) for node in ast.walk(tree) if isinstance(node, ast.Dict) for key in node.keys}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
                for flag in FLAG.findall(node.value):
                    found.setdefault(f"--{flag.rstrip('.')}", []).append(
                        f"{path.relative_to(PACKAGE.parent)}:{node.lineno}"
                    )
    return found


def _all_options() -> set[str]:
    return set().union(*(options(COMMANDS.get(name).build(f"robustkd {name}")) for name in COMMANDS.names()))


def test_every_option_a_message_names_exists():
    known = _all_options() | OTHER_PROGRAMS
    mentioned = _mentioned_options()
    assert "--data.root" in mentioned and "--teacher_arch" in mentioned  # the scan sees messages
    wrong = {flag: where for flag, where in mentioned.items() if flag not in known}
    assert not wrong, f"options no command takes: {wrong}"


def test_a_missing_dataset_says_what_to_pass(tmp_path, monkeypatch):
    """The advice names the flag every command takes and a download that exists; no folder that does not."""
    import pytest

    import robustkd.data.sources as sources
    from robustkd.data import load_dataset
    from robustkd.errors import DataError

    nowhere = tmp_path / "checkout" / "shared" / "data"
    monkeypatch.setattr(sources, "shared_data_dirs", lambda: [nowhere])
    monkeypatch.delenv("ROBUSTKD_DATA", raising=False)
    (tmp_path / "root").mkdir()
    for name in ("cifar10", "mnist"):
        with pytest.raises(DataError) as err:
            load_dataset(name, tmp_path / "root", cache_dir=tmp_path / "cache")
        message = str(err.value)
        assert "pass --data.root" in message and f"load_dataset({name!r}, download=True)" in message
        assert "(download=True)" not in message and str(nowhere) not in message and str(tmp_path / "root") in message
        assert set(FLAG.findall(message)) == {"data.root"}
