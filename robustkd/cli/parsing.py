"""One parser stack for every command: jsonargparse, a ``--config`` YAML file, dotted overrides, one flag spelling.

Every option is spelled as its key in the config file (``--n_examples``, ``--data.root``). Older spellings
(``--n-examples``, ``--data-root``) are still accepted with a one-line notice on stderr and are not shown in
``--help``. Abbreviated options (``--epoch`` for ``--epochs``) are refused.
"""

from __future__ import annotations

import inspect
import itertools
import re
import sys
import textwrap
from collections.abc import Iterable, Mapping
from typing import Any

from robustkd.cli.configfile import check_config_file, close_matches, locate
from robustkd.errors import ConfigError


def formatter() -> Any:
    """Help formatter: example lines kept as written, no ``type: <function ...>`` for value parsers, names unbroken."""
    from jsonargparse import DefaultHelpFormatter

    class Formatter(DefaultHelpFormatter):
        def _fill_text(self, text: str, width: int, indent: str) -> str:
            return "".join(indent + line for line in text.splitlines(keepends=True))

        def _get_type_str(self, action: Any) -> str | None:
            return None if inspect.isfunction(action.type) else super()._get_type_str(action)

        def _split_lines(self, text: str, width: int) -> list[str]:  # 'crown-ibp' stays one word
            return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)

    return Formatter


def command_parser(prog: str, description: str, epilog: str) -> Any:
    """A parser with ``--config FILE.yaml``, whose keys are the option names without the leading dashes."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(
        prog=prog,
        description=description,
        epilog=epilog,
        formatter_class=formatter(),
        exit_on_error=False,
        allow_abbrev=False,  # '--epoch 1' must not silently mean '--epochs 1'
    )
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file with any of the options below")
    return parser


def options(parser: Any) -> set[str]:
    """The long options a parser accepts, e.g. {'--n_examples', '--data.root'}."""
    return {o for action in parser._actions for o in action.option_strings if o.startswith("--")}


def parse(parser: Any, argv: Iterable[str], renamed: Mapping[str, str] | None = None) -> Any:
    """Parse ``argv``: old spellings renamed (with a notice), config files checked, the command line last.

    Expected mistakes raise ConfigError with one line: a YAML error names its file, an unknown option or
    config key names the closest accepted ones."""
    from jsonargparse import ArgumentError

    known = options(parser)
    argv = _config_first(respell(list(argv), known, {**SHARED_RENAMED, **(renamed or {})}, parser.prog))
    for path in _config_files(argv):
        check_config_file(path, parser)
    try:
        return parser.parse_args(argv)
    except ArgumentError as err:
        message = _class_option(str(err)) or _with_suggestions(str(err), known)
        raise ConfigError(locate(message, _config_files(argv))) from err


_parse = parse  # the name the config and fuzz tests import


# Old spellings of options every command shares; a value after a space becomes its own token.
SHARED_RENAMED = {"--no_progress": "--progress false", "--no-progress": "--progress false"}


def respell(argv: list[str], known: set[str], renamed: Mapping[str, str], prog: str) -> list[str]:
    """``--n-examples 5`` → ``--n_examples 5``, with a deprecation notice on stderr for each old spelling."""
    out: list[str] = []
    for i, token in enumerate(argv):
        if token == "--":
            return out + argv[i:]
        flag, eq, value = token.partition("=")
        new = _new_spelling(flag, known, renamed)
        if new is not None:
            print(f"{prog}: {flag} is deprecated; use {new}", file=sys.stderr)
            if " " in new:  # a switch that became an option with a value: --no_progress -> --progress false
                out += new.split()
                continue
            token = new + eq + value
        out.append(token)
    return out


def _new_spelling(flag: str, known: set[str], renamed: Mapping[str, str]) -> str | None:
    if not flag.startswith("--") or flag in known:
        return None
    if flag in renamed:
        return renamed[flag]
    underscored = "--" + flag[2:].replace("-", "_")
    return underscored if underscored in known else None


def _config_first(argv: list[str]) -> list[str]:
    """Config files first, so that every value on the command line overrides them wherever it stands."""
    configs: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(argv):
        if argv[i] == "--":
            rest += argv[i:]
            break
        if argv[i] == "--config" and i + 1 < len(argv):
            configs += argv[i : i + 2]
            i += 2
            continue
        (configs if argv[i].startswith("--config=") else rest).append(argv[i])
        i += 1
    return configs + rest


def _config_files(argv: list[str]) -> list[str]:
    files = [value for flag, value in itertools.pairwise(argv) if flag == "--config"]
    return files + [token.split("=", 1)[1] for token in argv if token.startswith("--config=")]


_UNKNOWN = (
    re.compile(r"Option '([\w.-]+)' is not accepted"),
    re.compile(r"Group '([\w.-]+)' does not accept option '([\w.-]+)'"),
    re.compile(r"Key '([\w.-]+)' is not expected"),
)


def _unknown_names(message: str) -> list[str]:
    names: list[str] = []
    if "unrecognized arguments" in message:
        names += re.findall(r"--([\w.-]+)", message.split("unrecognized arguments", 1)[1])
    for pattern in _UNKNOWN:
        names += [".".join(m) if isinstance(m, tuple) else m for m in pattern.findall(message)]
    return names


# jsonargparse's refusal of a mapping given to an option typed as a class (validate.protocol: {stepz: 2})
_CLASS_OPTION = re.compile(r"Parser key \"([\w.]+)\".*?class_path '([\w.]+)'.*?Option '(\w+)' is not accepted", re.S)


def _class_option(message: str) -> str | None:
    """``validate.protocol.stepz: unknown option; did you mean 'steps'?`` for a mapping's mistyped key."""
    import dataclasses
    import importlib

    match = _CLASS_OPTION.search(message)
    if match is None:
        return None
    key, class_path, name = match.groups()
    module, _, cls = class_path.rpartition(".")
    try:
        fields = [f.name for f in dataclasses.fields(getattr(importlib.import_module(module), cls)) if f.init]
    except (ImportError, AttributeError, TypeError):
        fields = []
    close = close_matches(name, fields)
    hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
    return f"{key}.{name}: unknown option{hint} (options: {', '.join(fields) or 'none'})"


def _with_suggestions(message: str, known: set[str]) -> str:
    message = " ".join(message.split())  # one line, as every other error
    head, required, names = message.partition("the following arguments are required: ")
    if required:  # 'student, eps' -> '--student, --eps', as they are typed
        spelled = [f"--{n}" if f"--{n}" in known else n.upper() for n in names.split(", ")]
        message = head + required + ", ".join(spelled)
    accepted = [o[2:] for o in known]
    for name in dict.fromkeys(_unknown_names(message)):
        close = close_matches(name.replace("-", "_"), accepted)  # first what prefix matching would have taken
        if close:
            message += f"; did you mean {', '.join('--' + c for c in close)}?"
    return message


# --- values: the same text on the command line and in a config file -----------------------------------------


def number(value: Any) -> float:
    """A float, or a fraction such as 8/255 (config files may give a plain number)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    text = str(value)
    try:
        if "/" in text:
            num, den = text.split("/", 1)
            return float(num) / float(den)
        return float(text)
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"expected a number such as 0.1 or 8/255, got {text!r}") from None


def numbers(value: Any) -> tuple[float, ...]:
    """Comma-separated numbers on the command line, a list (or one number) in a config file."""
    return tuple(number(v) for v in names(value))


def threshold(value: Any) -> float | None:
    """A number, or 'none' / 'off' (or null in a config file) to switch a threshold off."""
    if value is None or str(value).lower() in ("none", "off"):
        return None
    return number(value)


def subset(value: Any) -> int | None:
    """A number of test points, or 'all' (or null in a config file) for the whole split."""
    if value is None or str(value).lower() in ("all", "none"):
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"expected a number of test points or 'all', got {value!r}") from None


def names(value: Any) -> list[str]:
    """Comma-separated names on the command line, a YAML list in a config file."""
    items = value if isinstance(value, list | tuple) else str(value).split(",")
    return [str(item).strip() for item in items if str(item).strip()]
