"""``robustkd export``: a checkpoint to ONNX, checked on its test points, the record kept in its run dir."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from robustkd.export import CALIBRATION_TOLERANCE, LOGIT_TOLERANCE, check_options, export_model
from robustkd.io import atomic_write_json
from robustkd.jobs.chain import load_models, load_points, weights_path


def export_onnx(
    checkpoint: str | Path,
    onnx_path: str | Path,
    *,
    teacher: str | Path | None = None,
    n_examples: int | None = None,
    batch_size: int = 256,
    exporter: str = "auto",
    opset: int | None = None,
    logit_tolerance: float = LOGIT_TOLERANCE,
    calibration_tolerance: float = CALIBRATION_TOLERANCE,
    data_root: str | None = None,
    progress: bool = True,
    dataset: str | None = None,
) -> dict[str, Any]:
    """Export ``checkpoint`` to ``onnx_path`` and check the ONNX graph against the PyTorch model.

    ``n_examples``: the first N test points of the checkpoint's dataset (None: all). The check passes when
    every point gets the same class, the largest logit difference is at most ``logit_tolerance`` and, with
    a ``teacher`` checkpoint, every relative-calibration number against the teacher moves by at most
    ``calibration_tolerance``. The result (a JSON-able dict, ``"passed"`` among it) is written next to the
    .onnx as ``<name>.export.json`` and into the run dir as ``export_<checkpoint>.json`` (which
    ``robustkd report`` shows); the function does not raise on a failed check.
    """
    options = {"batch_size": batch_size, "exporter": exporter, "opset": opset}
    options.update(logit_tolerance=logit_tolerance, calibration_tolerance=calibration_tolerance)
    onnx_path = check_options(onnx_path, **options)  # before any loading
    models = load_models(checkpoint, teacher, device="cpu")
    points = load_points(models, n_examples, data_root, dataset)
    checked = export_model(
        models.student, onnx_path, points.x, teacher=models.teacher, y=points.y, progress=progress, **options
    )
    weights = weights_path(checkpoint)
    result = {
        "checkpoint": str(weights.with_suffix("")),
        "weights_sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
        **checked,
        "data": {**points.record(), "n": len(points.y), "n_total": points.n_total},
        "subset": len(points.y) < points.n_total,
        "teacher": None if teacher is None else str(weights_path(teacher).with_suffix("")),
    }
    beside = onnx_path.with_name(onnx_path.stem + ".export.json")
    in_run = weights.with_name(f"export_{weights.stem}.json")
    atomic_write_json(beside, result)
    atomic_write_json(in_run, result)
    result["outputs"] = [str(beside), str(in_run)]
    return result
