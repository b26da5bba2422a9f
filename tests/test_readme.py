"""The documentation runs: README's Python blocks execute, its commands exist, every method has a page.

Python blocks of README.md and docs/getting-started.md run in order, in one namespace, in a temporary
working directory. A block preceded by ``<!-- test_readme: needs robustkd.NAME -->`` runs in a separate
test that is skipped while ``robustkd.NAME`` does not exist.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from robustkd.attacks import ThreatModel
from robustkd.methods import METHODS

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
METHOD_DOCS = DOCS / "methods"
EXECUTED = [REPO / "README.md", DOCS / "getting-started.md"]

FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```[ \t]*$", re.S | re.M)
NEEDS = re.compile(r"<!--\s*test_readme:\s*needs\s+([\w.]+)\s*-->\s*$")


@dataclasses.dataclass
class Block:
    source: Path
    line: int
    lang: str
    code: str
    needs: str | None


def code_blocks(path: Path) -> list[Block]:
    text = path.read_text()
    blocks = []
    for match in FENCE.finditer(text):
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        needs = NEEDS.search(before)
        line = text.count("\n", 0, match.start()) + 1
        blocks.append(Block(path, line, match.group(1).lower(), match.group(2), needs.group(1) if needs else None))
    return blocks


def python_blocks(needs: bool) -> list[Block]:
    return [b for p in EXECUTED for b in code_blocks(p) if b.lang == "python" and (b.needs is not None) == needs]


def available(dotted: str) -> bool:
    """Whether ``robustkd.NAME...`` resolves; an import that fails counts as not available yet."""
    import importlib

    first, *rest = dotted.split(".")
    try:
        obj = importlib.import_module(first)
        for part in rest:
            obj = getattr(obj, part)
    except (AttributeError, ImportError):
        return False
    return True


def run_block(block: Block, namespace: dict) -> None:
    where = f"{block.source.relative_to(REPO)}:{block.line}"
    try:
        exec(compile(block.code, where, "exec"), namespace)
    except Exception as err:  # say which block failed; the traceback stays attached
        raise AssertionError(f"the python block at {where} failed: {type(err).__name__}: {err}") from err


@pytest.fixture(scope="module")
def executed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """Run every ungated python block in order in a fresh working directory: (that directory, the namespace)."""
    blocks = python_blocks(needs=False)
    assert blocks, "README.md has no python blocks"
    workdir = tmp_path_factory.mktemp("readme")
    namespace: dict = {"__name__": "__readme__"}
    with working_directory(workdir):
        for block in blocks:
            run_block(block, namespace)
    return workdir, namespace


@contextlib.contextmanager
def working_directory(path: Path):
    old = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


# ---------------------------------------------------------------------------------------------------------------
# Fast checks on the text alone.


def test_blocks_are_found_and_gated_blocks_name_their_need():
    readme = code_blocks(REPO / "README.md")
    assert [b.lang for b in readme[:1]] == ["bash"]
    assert "make quickstart" in readme[0].code and "make test" in readme[0].code
    python = [b for b in readme if b.lang == "python"]
    assert len(python) >= 2
    code = "\n".join(b.code for b in python if b.needs is None)
    for name in ("train", "distill", "load_model", "evaluate", "certify"):
        call = f"robustkd.{name}("
        assert call in code, f"README's Python API example does not show {call}"
    for block in python:
        if block.needs is not None:
            assert block.needs.startswith("robustkd."), block.needs


def test_gated_blocks_are_parsed_from_the_marker(tmp_path):
    text = "a\n<!-- test_readme: needs robustkd.nothing_here -->\n```python\nx = 1\n```\n\n```python\ny = 2\n```\n"
    path = tmp_path / "probe.md"
    path.write_text(text)
    blocks = code_blocks(path)
    assert [(b.needs, b.code) for b in blocks] == [("robustkd.nothing_here", "x = 1\n"), (None, "y = 2\n")]
    assert not available("robustkd.nothing_here")
    assert available("robustkd.train")


def help_commands() -> set[str]:
    out = subprocess.run(
        [sys.executable, "-m", "robustkd", "--help"], capture_output=True, text=True, check=True, cwd=REPO
    ).stdout
    match = re.search(r"\{([\w,-]+)\}", out)
    assert match, f"no command list in robustkd --help:\n{out}"
    return set(match.group(1).split(","))


def shown_commands(path: Path) -> set[str]:
    """``robustkd <command>`` at the start of a shell line in a non-python block, or in inline code."""
    text = path.read_text()
    found = set()
    for block in code_blocks(path):
        if block.lang == "python":
            continue
        for line in block.code.splitlines():
            match = re.match(r"\s*(?:\$\s*)?robustkd\s+([a-z][\w-]*)", line)
            if match:
                found.add(match.group(1))
    prose = FENCE.sub("", text)
    found |= set(re.findall(r"`robustkd\s+([a-z][\w-]*)[^`]*`", prose))
    return found


def documented_pages() -> list[Path]:
    return [REPO / "README.md", *sorted(DOCS.rglob("*.md"))]


def test_every_command_shown_is_a_command_of_robustkd_help():
    commands = help_commands()
    assert {"train", "distill", "evaluate", "certify", "list"} <= commands
    for path in documented_pages():
        unknown = shown_commands(path) - commands
        assert not unknown, f"{path.relative_to(REPO)} shows robustkd {sorted(unknown)}, not in robustkd --help"
    assert {"train", "distill", "evaluate", "certify"} <= shown_commands(REPO / "README.md")


def test_every_registered_method_has_a_page_and_every_page_a_method():
    names = set(METHODS.names())
    assert names, "no methods registered"
    pages = {p.stem for p in METHOD_DOCS.glob("*.md")}
    assert not names - pages, f"methods without a page in docs/methods/: {sorted(names - pages)}"
    assert not pages - names, f"pages for unregistered methods: {sorted(pages - names)}"


SECTIONS = ("## Loss", "## Inner maximisation", "## Options (`method.args`)", "## Shipped configs", "## Cost per step")


def options_table(text: str) -> dict[str, str]:
    section = text.split("## Options (`method.args`)", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\|\s*`([\w]+)`\s*\|\s*([^|]*)\|", section, re.M)
    return dict(rows)


def parse_default(cell: str):
    match = re.match(r"`([^`]*)`", cell.strip())
    assert match, f"default cell {cell!r} does not start with a `value`"
    token = match.group(1)
    if token == "null":
        return None
    if token in ("true", "false"):
        return token == "true"
    fraction = re.fullmatch(r"([\d.]+)/([\d.]+)", token)
    if fraction:
        return float(fraction.group(1)) / float(fraction.group(2))
    try:
        return float(token)
    except ValueError:
        return token


def same_threat(cell: str, actual: ThreatModel) -> bool:
    """A threat-model default documented as `{norm: linf, eps: 8/255, ...}`; fields left out are ThreatModel's."""
    match = re.fullmatch(r"\s*`\{([^}]*)\}`.*", cell.strip())
    assert match, f"threat default {cell!r} is not written as `{{field: value, ...}}`"
    documented = dict(part.split(": ", 1) for part in match.group(1).split(", "))
    assert {"norm", "eps"} <= set(documented), f"threat default {cell!r} must state norm and eps"
    plain = ThreatModel()
    return all(
        same_default(parse_default(f"`{documented[f.name]}`"), getattr(actual, f.name))
        if f.name in documented
        else getattr(actual, f.name) == getattr(plain, f.name)
        for f in dataclasses.fields(ThreatModel)
    )


def same_default(documented, actual) -> bool:
    if isinstance(actual, bool) or actual is None or isinstance(documented, str):
        return documented == actual
    return isinstance(documented, float) and math.isclose(documented, float(actual), rel_tol=1e-3)


@pytest.mark.parametrize("name", sorted(METHODS.names()))
def test_method_page_documents_every_option_with_its_default(name):
    text = (METHOD_DOCS / f"{name}.md").read_text()
    for heading in SECTIONS:
        assert heading in text, f"docs/methods/{name}.md lacks the section {heading!r}"
    cls = METHODS.get(name)
    fields = {f.name: f.default for f in dataclasses.fields(cls) if f.init}
    table = options_table(text)
    assert set(table) == set(fields), (
        f"docs/methods/{name}.md options {sorted(table)} differ from the code's {sorted(fields)}"
    )
    for key, cell in table.items():
        if isinstance(fields[key], ThreatModel):
            assert same_threat(cell, fields[key]), f"docs/methods/{name}.md: default of {key} {cell!r} != {fields[key]}"
            continue
        documented = parse_default(cell)
        assert same_default(documented, fields[key]), (
            f"docs/methods/{name}.md: default of {key} is documented as {documented!r}, the code has {fields[key]!r}"
        )


def test_every_shipped_config_is_listed_on_its_method_page():
    # configs/compare holds comparisons (robustkd compare, docs/compare.md), not training configs of one method
    configs = sorted(p for p in REPO.glob("configs/**/*.yaml") if "compare" not in p.relative_to(REPO).parts)
    assert configs
    for config in configs:
        method = (yaml.safe_load(config.read_text()).get("method") or {}).get("name", "standard")
        rel = config.relative_to(REPO).as_posix()
        page = (METHOD_DOCS / f"{method}.md").read_text()
        assert f"`{rel}`" in page, f"docs/methods/{method}.md does not list {rel}"


def test_paths_and_links_in_the_docs_exist():
    for path in documented_pages():
        text = path.read_text()
        for rel in set(re.findall(r"(?<![\w/])(configs/[\w./-]+\.yaml)", text)):
            assert (REPO / rel).is_file(), f"{path.relative_to(REPO)} names {rel}, which does not exist"
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            file = target.split("#", 1)[0]
            assert (path.parent / file).exists(), f"{path.relative_to(REPO)} links {target}, which does not exist"


# ---------------------------------------------------------------------------------------------------------------
# The blocks themselves (real training on Fashion-MNIST subsets).


@pytest.mark.slow
def test_python_blocks_run(executed):
    workdir, namespace = executed
    for run in ("api_teacher", "api_rslad"):
        assert (workdir / "runs" / run / "best.safetensors").is_file()
        assert (workdir / "runs" / run / "results.json").is_file()
    robust = namespace["robust"]
    assert set(robust["attacks"]) == {"clean", "pgd20"}
    assert robust["attacks"]["pgd20"]["total"] == 200
    assert 0.0 <= namespace["cert"]["student"]["certified_accuracy"] <= 1.0


@pytest.mark.slow
def test_gated_python_blocks_run(executed):
    blocks = python_blocks(needs=True)
    if not blocks:
        pytest.skip("no gated python blocks")
    missing = sorted({b.needs for b in blocks if not available(b.needs)})
    if missing:
        pytest.skip(f"not importable yet: {', '.join(missing)}")
    workdir, namespace = executed
    with working_directory(workdir):
        for block in blocks:
            run_block(block, namespace)
