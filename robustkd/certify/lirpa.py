"""Optional auto_LiRPA backend: CROWN / alpha-CROWN (and IBP, CROWN-IBP for cross-checks) on the same box.

auto_LiRPA is imported only here, on first use, after ``_lirpa_compat.apply()``. A ``BoundedModule`` copies
the model's state when it is built, so the cached one is rebuilt whenever a parameter or buffer of the model
has been replaced or changed in place (tracked through tensor version counters).
"""

from __future__ import annotations

import importlib.util
import warnings
import weakref
from typing import Any

from torch import Tensor, nn

from robustkd.errors import RobustKDError

INSTALL_HINT = "pip install --no-deps auto_LiRPA==0.3"
LIRPA_METHODS = ("IBP", "CROWN-IBP", "CROWN", "alpha-CROWN")

# "matrix" conv mode: the default "patches" mode trips over a per-channel division (Normalize). Dense alpha:
# with sparse alpha, alpha-CROWN 0.3 on torch 2.x can fail with a shape mismatch between unstable-neuron sets.
_BOUND_OPTS = {"conv_mode": "matrix", "sparse_features_alpha": False, "sparse_spec_alpha": False}

_cache: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, Any]] = weakref.WeakKeyDictionary()


def lirpa_available() -> bool:
    """Whether auto_LiRPA is installed and imports (with the compatibility shims)."""
    try:
        _import_lirpa()
    except RobustKDError:
        return False
    return True


def _import_lirpa() -> Any:
    if importlib.util.find_spec("auto_LiRPA") is None:
        raise RobustKDError(f"the auto_LiRPA backend needs auto_LiRPA 0.3; install it with `{INSTALL_HINT}`")
    import robustkd.certify._lirpa_compat as _lirpa_compat

    _lirpa_compat.apply()
    try:
        # auto_LiRPA calls warnings.simplefilter("once") at import time; catch_warnings restores the
        # process's filters afterwards so that does not leak into the caller's warning settings.
        with warnings.catch_warnings():
            import auto_LiRPA
    except Exception as exc:  # any failure here means the backend is unusable; say how to get a good copy
        raise RobustKDError(
            f"auto_LiRPA is installed but does not import ({type(exc).__name__}: {exc}); "
            f"robustkd supports auto_LiRPA 0.3 (`{INSTALL_HINT}`)"
        ) from exc
    _lirpa_compat.patch_bounded_module(auto_LiRPA.BoundedModule)
    return auto_LiRPA


def _fingerprint(model: nn.Module) -> tuple:
    return tuple((id(t), t._version) for t in model.state_dict(keep_vars=True).values())


def _bounded_module(model: nn.Module, example: Tensor) -> Any:
    lirpa = _import_lirpa()
    key = (tuple(example.shape[1:]), example.dtype, str(example.device), _fingerprint(model))
    hit = _cache.get(model)
    if hit is not None and hit[0] == key:
        return hit[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript tracing / legacy ONNX deprecation noise
        bounded = lirpa.BoundedModule(model, example, bound_opts=_BOUND_OPTS, device=example.device)
    _cache[model] = (key, bounded)
    return bounded


def _check_model(model: nn.Module) -> None:
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
            raise RobustKDError(
                f"module {name!r} ({type(module).__name__}) is in training mode; call model.eval() before "
                "certifying (bounds with batch statistics do not hold for the deployed network)"
            )


def lirpa_box_bounds(
    model: nn.Module, x_lower: Tensor, x_upper: Tensor, method: str, C: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """auto_LiRPA bounds of ``C @ model(x')`` for ``x'`` in the box ``[x_lower, x_upper]``."""
    if method not in LIRPA_METHODS:
        raise RobustKDError(f"unknown auto_LiRPA method {method!r}; choose one of {', '.join(LIRPA_METHODS)}")
    _check_model(model)
    lirpa = _import_lirpa()
    centre = (x_lower + x_upper) / 2
    bounded = _bounded_module(model, centre)
    radius = float(((x_upper - x_lower) / 2).max()) if centre.numel() else 0.0
    ptb = lirpa.PerturbationLpNorm(norm=float("inf"), eps=radius, x_L=x_lower, x_U=x_upper)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lower, upper = bounded.compute_bounds(x=(lirpa.BoundedTensor(centre, ptb),), C=C, method=method)
    except (AssertionError, RuntimeError, TypeError, ValueError, NotImplementedError) as exc:
        # auto_LiRPA 0.3 predates torch 2.x and fails on some layer / method combinations (e.g. alpha-CROWN
        # through MaxPool, CROWN through AvgPool); the native verifiers cover every supported layer.
        raise RobustKDError(
            f"auto_LiRPA {method} failed on this model ({type(exc).__name__}: {exc}); "
            "use a native verifier (ibp, crown-ibp, best, crown) for it"
        ) from exc
    return lower, upper
