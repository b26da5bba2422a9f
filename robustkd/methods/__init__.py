"""Training methods, one file each, all behind one registry.

Every module of this package other than the shared ones (``base``, ``common``, ``losses``) and private ones
(``_name``) is a method file and is imported here, which registers its method: adding a method is adding a file.
"""

import importlib
import pkgutil

from robustkd.methods.base import (
    METHODS,
    Batch,
    DeprecatedOptionWarning,
    Method,
    Output,
    StepInfo,
    build_method,
    register_method,
)

SHARED_MODULES = frozenset({"base", "common", "losses"})


def _import_method_modules() -> None:
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if not info.name.startswith("_") and info.name not in SHARED_MODULES:
            importlib.import_module(f"{__name__}.{info.name}")


_import_method_modules()

__all__ = [
    "METHODS",
    "Batch",
    "DeprecatedOptionWarning",
    "Method",
    "Output",
    "StepInfo",
    "build_method",
    "register_method",
]
