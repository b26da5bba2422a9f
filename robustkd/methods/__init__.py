"""Training methods, one file each, all behind one registry."""

from robustkd.methods import standard  # noqa: F401  (registers)
from robustkd.methods.base import METHODS, Batch, Method, Output, StepInfo, build_method, register_method

__all__ = ["METHODS", "Batch", "Method", "Output", "StepInfo", "build_method", "register_method"]
