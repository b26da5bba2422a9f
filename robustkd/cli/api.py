"""The job functions the commands call, imported in this one place (each when first called, so that
``--help`` stays quick)."""

from __future__ import annotations

from typing import Any


def evaluate_checkpoint(*args: Any, **kwargs: Any) -> dict[str, Any]:
    from robustkd.jobs import evaluate_checkpoint as job

    return job(*args, **kwargs)


def certify_checkpoints(*args: Any, **kwargs: Any) -> dict[str, Any]:
    from robustkd.jobs import certify_checkpoints as job

    return job(*args, **kwargs)


def export_onnx(*args: Any, **kwargs: Any) -> dict[str, Any]:
    from robustkd.jobs import export_onnx as job

    return job(*args, **kwargs)


def export_options() -> tuple[tuple[str, ...], float, float]:
    """The exporters and the default tolerances of ``export_onnx``."""
    from robustkd.export import CALIBRATION_TOLERANCE, EXPORTERS, LOGIT_TOLERANCE

    return tuple(EXPORTERS), LOGIT_TOLERANCE, CALIBRATION_TOLERANCE
