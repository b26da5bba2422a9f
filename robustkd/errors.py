"""Error types. Every expected failure is a ``RobustKDError`` with a message that names the fix."""

from __future__ import annotations


class RobustKDError(Exception):
    """Base class of the errors robustkd raises on purpose; the CLI prints them without a traceback."""


class RegistryError(RobustKDError, KeyError):
    """Unknown or duplicate registry name."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0]) if self.args else ""


class ConfigError(RobustKDError, ValueError):
    """A configuration value is invalid; the message names the field."""


class DataError(RobustKDError):
    """A dataset is missing, corrupt or malformed; the message names the file."""


class CheckpointError(RobustKDError):
    """A checkpoint cannot be read or does not match its sidecar."""
