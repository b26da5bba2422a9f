"""The command table: one entry per ``robustkd`` command, a parser builder and a runner."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from robustkd.registry import Registry


@dataclass(frozen=True)
class Command:
    """``build(prog)`` makes the command's parser; ``run(namespace)`` does the work and returns the exit status.

    ``renamed`` maps old flag spellings that are not just dashes for underscores (those are found by themselves)
    to the one spelling, e.g. ``{"--data-root": "--data.root"}``. ``on_interrupt`` is what Ctrl-C tells the user
    about continuing."""

    summary: str
    build: Callable[[str], Any]
    run: Callable[[Any], int]
    renamed: dict[str, str] = field(default_factory=dict)
    on_interrupt: str = "run the same command again to continue where it stopped"


COMMANDS: Registry[Command] = Registry("command")

RESUME = "continue with --resume true (the same command line)"
ATOMIC = "nothing was written; run the same command again"
