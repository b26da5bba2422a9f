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


def _robustkd(*argv: str, cwd) -> tuple[int, str]:
    """Runs ``python -m robustkd`` with both outputs going to a pipe and FORCE_COLOR set, as CI logs often have."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "FORCE_COLOR": "1", "PYTHONPATH": str(PACKAGE.parent), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "robustkd", *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    return done.returncode, done.stdout + done.stderr


def test_no_terminal_codes_or_bars_in_a_pipe(tmp_path):
    """A run and a refusal, both into a pipe: plain text, one line per epoch, no bar dumped."""
    run = ["train", "--data.dataset", "fashion-mnist", "--model.arch", "small_cnn", "--epochs", "2",
           "--data.train_subset", "128", "--data.test_subset", "32", "--out_dir", str(tmp_path)]  # fmt: skip
    status, text = _robustkd(*run, "--name", "ok", cwd=tmp_path)
    assert status == 0, text
    assert "\x1b" not in text and "━" not in text and "0:00:00" not in text, text
    assert re.findall(r"^epoch (\d): train/loss", text, re.M) == ["1", "2"]
    # A refusal into the pipe: the same run again, without --resume.
    status, text = _robustkd(*run, "--name", "ok", cwd=tmp_path)
    assert status == 2 and "already holds a run" in text, text
    assert "\x1b" not in text and "━" not in text, text


def test_no_bars_when_not_a_terminal(tmp_path, capsys):
    from conftest import fmnist_meta, fmnist_model

    from robustkd.checkpoint import save_checkpoint
    from robustkd.cli import main

    save_checkpoint(tmp_path / "best", fmnist_model(), fmnist_meta())
    argv = ["evaluate", "--model", str(tmp_path / "best"), "--attacks", "clean,pgd2", "--n_examples", "8"]
    assert main(argv) == 0  # --progress true by default; captured output is no terminal
    captured = capsys.readouterr()
    assert "━" not in captured.err + captured.out and "worst case" in captured.out


def test_quickstart_heads_each_stage_and_times_it(tmp_path, monkeypatch, capsys):
    """[4/7] kdiga student, 4 epochs ... [4/7] kdiga done in 0.0 s; a finished run says it is reused."""
    import robustkd.report
    from robustkd import quickstart

    trained = []
    monkeypatch.setattr(
        quickstart, "_train", lambda raw, out, teacher, progress: trained.append(raw) or out / raw["name"] / "best"
    )
    monkeypatch.setattr(robustkd.report, "make_report", lambda runs, out, **kw: {"models": [], "summary": {}})
    monkeypatch.setattr(quickstart, "teacher_card", lambda teacher, plan, device, progress: {})
    (tmp_path / "kd").mkdir()
    (tmp_path / "kd" / "results.json").write_text("{}")
    result = quickstart.run(tmp_path, progress=True)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "[1/7] teacher (IBP, certifiable), 10 epochs"
    assert lines[2] == "[2/7] teacher card: 500 test points, AutoAttack on 20"
    assert lines[4] == "[3/7] kd student, 4 epochs (finished earlier: reused)"
    assert lines[6:8] == ["[4/7] kdiga student, 4 epochs", "[4/7] kdiga done in 0.0 s"]
    assert lines[-2:] == ["[7/7] report: 5 models on 500 test points", "[7/7] report done in 0.0 s"]
    assert len(lines) == 14 and [raw["name"] for raw in trained] == ["teacher", *quickstart.STUDENTS]
    assert set(result["seconds"]) == {"teacher", "card", *quickstart.STUDENTS, "report", "total"}
    quickstart.run(tmp_path, progress=False)
    assert capsys.readouterr().out == ""
