"""``python -m robustkd``; also what ``torchrun --nproc_per_node=N -m robustkd train ...`` starts on every rank."""

import os
import sys

from robustkd.cli import main

DISTRIBUTED_COMMANDS = ("train", "distill")


def _world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1  # the training engine reports a malformed WORLD_SIZE itself


def run(argv: list[str]) -> int:
    """The CLI, with torchrun's ranks in mind: only training commands run distributed, and only rank 0
    prints their summary (errors, on stderr, still show from every rank)."""
    if _world_size() > 1:
        command = argv[0] if argv else ""
        if command not in DISTRIBUTED_COMMANDS:
            print(
                f"robustkd: only {' and '.join(DISTRIBUTED_COMMANDS)} run under torchrun; run "
                f"'{command or 'robustkd'}' as a single process (python -m robustkd {command})",
                file=sys.stderr,
            )
            return 2
        if os.environ.get("RANK", "0") != "0":
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - stays open until the process ends
    return main(argv)


if __name__ == "__main__":
    raise SystemExit(run(sys.argv[1:]))
