"""What the commands print: plain aligned text that reads the same on a terminal and in a log file."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def num(value: float | None, digits: int = 3) -> str:
    """A number to ``digits`` decimals (small ones in scientific notation); 'n/a' for a missing one."""
    if value is None:
        return "n/a"
    if value != 0 and abs(value) < 10**-digits:
        return f"{value:.2e}"
    return f"{value:.{digits}f}"


def table(header: Sequence[str], rows: Sequence[Sequence[Any]], indent: str = "  ") -> str:
    """Columns aligned under ``header``: the first to the left, the others (numbers) to the right."""
    cells = [[str(c) for c in header], *([str(c) for c in row] for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]

    def line(row: list[str]) -> str:
        first = row[0].ljust(widths[0])
        return indent + "  ".join([first, *(c.rjust(w) for c, w in zip(row[1:], widths[1:]))]).rstrip()

    return "\n".join(line(row) for row in cells)
