"""The ``robustkd`` command: thin over the Python API.

Each command is one entry of ``COMMANDS`` (a parser builder and a runner, in its own module here); ``main``
looks the command up and dispatches. Every command takes ``--config FILE.yaml`` and ``--key value``
overrides spelled as the file's keys (see ``robustkd.cli.parsing``)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

# Each module adds its command(s) to COMMANDS when imported.
from robustkd.cli import (  # noqa: F401
    card,
    certify,
    claims,
    compare,
    evaluate,
    export,
    importing,
    listing,
    quickstart,
    report,
    train,
)
from robustkd.cli.parsing import _parse, parse
from robustkd.cli.table import COMMANDS, Command
from robustkd.cli.terminal import plain_unless_interactive
from robustkd.cli.train import _train_parser
from robustkd.errors import RobustKDError
from robustkd.runtime import keep_freed_memory

__all__ = ["COMMANDS", "Command", "_parse", "_train_parser", "main"]


def _top_parser() -> Any:
    from jsonargparse import ArgumentParser

    from robustkd.cli.parsing import formatter

    summaries = "\n".join(f"  {name:<11} {COMMANDS.get(name).summary}" for name in COMMANDS.names())
    parser = ArgumentParser(
        prog="robustkd",
        description="Knowledge distillation that keeps adversarial robustness and stays faithful to the teacher.",
        epilog=f"commands:\n{summaries}\n\nRun 'robustkd COMMAND --help' for a command's options and examples.\n",
        formatter_class=formatter(),
    )
    parser.add_argument("command", choices=COMMANDS.names(), help="what to do")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; expected failures print one line and exit 2, never a traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        _top_parser().print_help()
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        _top_parser().print_usage(sys.stderr)
        print(f"robustkd: {COMMANDS.unknown_message(name)}", file=sys.stderr)
        return 2
    command = COMMANDS.get(name)
    keep_freed_memory()  # this process is robustkd's own: its tensors' pages stay mapped between steps
    try:
        ns = parse(command.build(f"robustkd {name}"), rest, command.renamed)
        with plain_unless_interactive():
            return command.run(ns)
    except RobustKDError as err:
        print(f"robustkd {name}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"robustkd {name}: interrupted; {command.on_interrupt}", file=sys.stderr)
        return 130
