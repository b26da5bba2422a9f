"""``robustkd claims``: every claim's verdict across finished comparisons, one Markdown table."""

from __future__ import annotations

from typing import Any

from robustkd.cli.parsing import command_parser
from robustkd.cli.table import COMMANDS, Command

EXAMPLES = """examples:
  robustkd claims runs/compare/fmnist_cpu_methods runs/compare/fmnist_cpu_faithful
  robustkd claims runs/compare/* --out claims.md
"""

DESCRIPTION = (
    "Read the leaderboard.json of finished comparisons (the OUT folders of robustkd compare) and write one table "
    "of every claim of their claims files: for each comparison that judged it, its verdict (reproduced, within "
    "noise, contradicted) and the paired-bootstrap intervals that decide it; claims no comparison ran are listed "
    "as not run. Comparisons are never pooled: each row is one protocol."
)


def build(prog: str) -> Any:
    parser = command_parser(prog, DESCRIPTION, EXAMPLES)
    parser.add_argument("folders", metavar="FOLDER", nargs="+", help="comparison output folders")
    parser.add_argument("--out", default=None, help="write the table to this file; null: print it")
    return parser


def run(ns: Any) -> int:
    from robustkd.compare import collect_claims
    from robustkd.io import atomic_write_text

    text = collect_claims(list(ns.folders))
    if ns.out is None:
        print(text, end="")
    else:
        atomic_write_text(ns.out, text)
        print(f"claims: {ns.out}")
    return 0


COMMANDS.add("claims", Command("every claim's verdict across finished comparisons", build, run))
