"""Options several commands share, each added by one function so it means and reads the same everywhere, and the
check on what a command is given before any work: a foreign state dict where a checkpoint is expected."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from robustkd.checkpoint import FOREIGN_SUFFIXES
from robustkd.cli.parsing import subset
from robustkd.cli.registries import listed
from robustkd.errors import ConfigError


def require_checkpoints(command: str, paths: dict[str, str | None]) -> None:
    """Refuse a bare state dict given to a command that reads robustkd checkpoints, saying how to convert it.

    ``paths`` maps each argument as it is typed (``--model``, ``CKPT``) to its value."""
    for flag, path in paths.items():
        if path is not None and Path(str(path)).suffix in FOREIGN_SUFFIXES:
            raise ConfigError(
                f"{flag} {path}: robustkd {command} reads robustkd checkpoints (.safetensors with its .json), "
                f"not a bare state dict; convert it once in Python: model = robustkd.load_model({str(path)!r}, "
                "arch=...), then robustkd.checkpoint.save_checkpoint(path, model, meta) with arch, arch_args, "
                "num_classes, input_shape, mean, std and dataset in meta"
            )


# The old spellings of --data.root, for every command that takes it.
DATA_ROOT_RENAMED = {"--data-root": "--data.root", "--data_root": "--data.root"}


def add_data_options(parser: Any) -> None:
    """``--data.root`` and ``--data.dataset``, spelled as in a training config."""
    parser.add_argument("--data.root", default=None, help="where the dataset lives; null: the default search paths")
    parser.add_argument(
        "--data.dataset",
        default=None,
        help=f"the test split of this dataset; null: the one the checkpoint names. One of: {listed('datasets')}",
    )


def add_points_option(parser: Any, default: int | None = None) -> None:
    """``--n_examples``: the first N test points, or 'all' (null in a config file)."""
    parser.add_argument("--n_examples", type=subset, default=default, help="first N test points, or 'all'")


def add_progress_option(parser: Any) -> None:
    """``--progress``, spelled as in a training config; bars are drawn on a terminal only."""
    parser.add_argument("--progress", type=bool, default=True, help="progress bars (false: none)")
