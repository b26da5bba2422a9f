"""``--config FILE.yaml``: the file read once, its mistakes named by file and line.

A key the command does not take gets the close matches a mistyped flag gets, at the key's own line
(``run.yaml:3: unknown option 'epoch'; did you mean 'epochs'?``); nested keys are spelled dotted
(``optim.lrr``). An error found later about a value that came from a file (``method.args.stepz: ...``) is
given the file and line of that value."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from robustkd.errors import ConfigError

# parser entries that are not keys of a config file
_NOT_KEYS = {"config", "help", "print_config"}


def file_keys(parser: Any) -> set[str]:
    """The keys a config file may hold: the parser's long options and positional arguments,
    e.g. {'epochs', 'optim', 'optim.lr', ...} or {'runs', 'out', ...}."""
    keys = set()
    for action in parser._actions:
        longs = [o[2:] for o in action.option_strings if o.startswith("--")]
        keys.update(longs if action.option_strings else [action.dest])
    return {k for k in keys if k not in _NOT_KEYS and not k.endswith(("+", ".help"))}


def close_matches(name: str, accepted: Iterable[str]) -> list[str]:
    """Up to three accepted names like ``name``: those it abbreviates first, then the similar ones."""
    accepted = sorted(accepted)
    close = [a for a in accepted if a.startswith(name)][:3]
    return close + [c for c in difflib.get_close_matches(name, accepted, n=3, cutoff=0.6) if c not in close]


def compose(path: str) -> Any:
    """The file's YAML node tree (None when empty); unreadable or invalid YAML is one line naming the file.

    ``safe_load`` also runs, so that tags which would construct Python objects are refused here."""
    import yaml

    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"--config {path}: cannot read it ({getattr(err, 'strerror', None) or err})") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"--config {path}: not valid YAML{where}: {problem}") from None
    if node is not None and not isinstance(node, yaml.MappingNode):
        kind = type(yaml.safe_load(text)).__name__
        raise ConfigError(f"--config {path}: must hold a mapping of option names to values, not {kind}")
    return node


def check_config_file(path: str, parser: Any = None) -> None:
    """Refuse a file that is not a YAML mapping, or (given the parser) holds a key the parser does not take."""
    node = compose(path)
    keys = file_keys(parser) if parser is not None else set()
    if node is None or not keys:
        return
    # 'data' for --data.root, whether or not the parser has a --data of its own
    groups = {".".join(k.split(".")[:i]) for k in keys for i in range(1, k.count(".") + 1)}
    for key, line in _keys(node, "", keys):
        if key not in keys and key not in groups:
            close = close_matches(key, keys)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            raise ConfigError(f"--config {path}:{line}: unknown option {key!r}{hint}")


def _keys(node: Any, prefix: str, keys: set[str]) -> Iterator[tuple[str, int]]:
    """Every dotted key of a mapping node and its line (1-based); a group's mapping is walked, an option's
    mapping (``method.args``, a protocol given as a mapping) is its value and is not."""
    import yaml

    for key_node, value in node.value:
        key = f"{prefix}{key_node.value}"
        yield key, key_node.start_mark.line + 1
        if isinstance(value, yaml.MappingNode) and any(k.startswith(key + ".") for k in keys):
            yield from _keys(value, key + ".", keys)


def _setting(path: str, dotted: str) -> tuple[int, Any] | None:
    """The line (1-based) and value of the dotted key in a config file, or None when the file does not set it."""
    import yaml

    node = compose(path)
    for part in dotted.split("."):
        if not isinstance(node, yaml.MappingNode):
            return None
        match = next(((k, v) for k, v in node.value if k.value == part), None)
        if match is None:
            return None
        key_node, node = match
    return key_node.start_mark.line + 1, yaml.safe_load(yaml.serialize(node))


_FIELD = re.compile(r"^([A-Za-z_]\w*(?:\.\w+)*): ")


def locate(message: str, files: Iterable[str], values: dict[str, Any] | None = None) -> str:
    """``message`` prefixed with the file and line of the key it starts with, when that file's value is the
    one in ``values`` (the resolved options; a command-line override has no line to point at). Without
    ``values`` (the parser refused before resolving), the last file that sets the key."""
    match = _FIELD.match(message)
    if match is None:
        return message
    dotted = match.group(1)
    for path in reversed(list(files)):  # the last file that sets a key is the one whose value was taken
        found = _setting(path, dotted)
        if found is not None and (values is None or _lookup(values, dotted) == found[1]):
            return f"{path}:{found[0]}: {message}"
    return message


def _lookup(values: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(values, dict) or part not in values:
            return None
        values = values[part]
    return values
