"""Let ``robustkd.evaluate(...)`` and ``robustkd.certify(...)`` be calls while staying packages."""

from __future__ import annotations

import sys
import types
from typing import Any


def make_module_callable(module_name: str, function_name: str) -> None:
    """Calling the module calls ``module.function_name``; everything else about the module is unchanged."""

    class CallableModule(types.ModuleType):
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            return getattr(self, function_name)(*args, **kwargs)

    CallableModule.__doc__ = getattr(sys.modules[module_name], function_name).__doc__
    sys.modules[module_name].__class__ = CallableModule
