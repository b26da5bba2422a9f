"""The registries ``robustkd list`` shows; help texts read their lists from here, never typed in.

Each registry is imported when asked for, so that ``robustkd --help`` stays quick."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def _models() -> Any:
    from robustkd.models import MODELS

    return MODELS


def _datasets() -> Any:
    from robustkd.data import DATASETS

    return DATASETS


def _methods() -> Any:
    from robustkd.methods import METHODS

    return METHODS


def _augments() -> Any:
    from robustkd.data import AUGMENTS

    return AUGMENTS


def _attacks() -> Any:
    from robustkd.attacks import ATTACKS

    return ATTACKS


def _protocols() -> Any:
    from robustkd.attacks import PRESETS

    return PRESETS


def _objectives() -> Any:
    from robustkd.attacks import OBJECTIVES

    return OBJECTIVES


def _verifiers() -> Any:
    from robustkd.certify import VERIFIERS

    return VERIFIERS


REGISTRIES: dict[str, Callable[[], Any]] = {
    "models": _models,
    "datasets": _datasets,
    "methods": _methods,
    "augments": _augments,
    "attacks": _attacks,
    "protocols": _protocols,
    "objectives": _objectives,
    "verifiers": _verifiers,
}


def names(kind: str, pattern: str = "*") -> list[str]:
    """Registered names of one kind, e.g. ``names("verifiers")``."""
    return REGISTRIES[kind]().names(pattern)


def listed(kind: str) -> str:
    """The names of one kind for a help text: 'alpha-crown, best, crown, crown-ibp, ibp'."""
    return ", ".join(names(kind))
