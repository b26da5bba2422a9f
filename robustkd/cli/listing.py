"""``robustkd list``: the names in a registry."""

from __future__ import annotations

from typing import Any

from robustkd.cli.parsing import command_parser
from robustkd.cli.registries import REGISTRIES, names
from robustkd.cli.table import COMMANDS, Command

EXAMPLES = """examples:
  robustkd list methods
  robustkd list models 'resnet*'
"""


def build(prog: str) -> Any:
    parser = command_parser(prog, "List registered names.", EXAMPLES)
    parser.add_argument("what", choices=sorted(REGISTRIES), help="which registry")
    parser.add_argument("pattern", nargs="?", default="*", help="wildcard filter, e.g. 'resnet*'")
    return parser


def run(ns: Any) -> int:
    for name in names(ns.what, ns.pattern):
        print(name)
    return 0


COMMANDS.add("list", Command("names in a registry (models, methods, attacks, verifiers, ...)", build, run))
