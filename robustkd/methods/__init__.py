"""Training methods, one file each, all behind one registry."""

# Importing a method's module registers it.
from robustkd.methods import (  # noqa: F401
    adaad,
    advfunmatch,
    ard,
    crown_ibp,
    faithful,
    iad,
    ibp,
    kd,
    kdiga,
    pgd_at,
    rslad,
    standard,
    trades,
)
from robustkd.methods.base import METHODS, Batch, Method, Output, StepInfo, build_method, register_method

__all__ = ["METHODS", "Batch", "Method", "Output", "StepInfo", "build_method", "register_method"]
