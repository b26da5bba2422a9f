"""Terminal or not: colours, cursor codes and live progress bars only where a person watches them.

rich decides per console from the environment (``FORCE_COLOR`` makes it draw into a pipe); a command's
output that goes to a pipe or a log file must stay plain text whatever the environment says."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from robustkd.runtime import interactive


@contextmanager
def plain_unless_interactive() -> Iterator[None]:
    """Off a terminal, every rich console made meanwhile is plain (no ANSI codes, no live redraw), and rich's
    shared console, on which the training loop draws its bars, is quiet: a log gets the epoch lines, not
    each bar dumped at its end."""
    if interactive():
        yield
        return
    import rich

    saved = {key: os.environ.get(key) for key in ("FORCE_COLOR", "TTY_COMPATIBLE")}
    os.environ.pop("FORCE_COLOR", None)
    os.environ["TTY_COMPATIBLE"] = "0"  # rich >= 14 reads it; older versions go by isatty once FORCE_COLOR is gone
    shared = rich.get_console()
    quiet = shared.quiet
    shared.quiet = True
    try:
        yield
    finally:
        shared.quiet = quiet
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
