"""``robustkd export``: a checkpoint to ONNX, checked on its test points, the record kept in its run dir."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from torch import nn

from robustkd.export import CALIBRATION_TOLERANCE, LOGIT_TOLERANCE, check_options, export_model
from robustkd.io import atomic_write_json
from robustkd.jobs.chain import ModelSource, load_models, load_points, source_name, weights_path
from robustkd.jobs.progress import fingerprint, model_tensors


def export_onnx(
    checkpoint: ModelSource,
    onnx_path: str | Path,
    *,
    teacher: ModelSource | None = None,
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
    ``robustkd report`` shows); the function does not raise on a failed check. ``checkpoint`` (and ``teacher``)
    may be in-memory modules: ``dataset`` is then needed unless they name one, the record is written beside the
    .onnx only, and ``weights_sha256`` is a digest of the module's tensors.
    """
    options = {"batch_size": batch_size, "exporter": exporter, "opset": opset}
    options.update(logit_tolerance=logit_tolerance, calibration_tolerance=calibration_tolerance)
    onnx_path = check_options(onnx_path, **options)  # before any loading
    models = load_models(checkpoint, teacher, device="cpu")
    points = load_points(models, n_examples, data_root, dataset)
    checked = export_model(
        models.student, onnx_path, points.x, teacher=models.teacher, y=points.y, progress=progress, **options
    )
    result = {
        "checkpoint": _name(checkpoint),
        "weights_sha256": _digest(checkpoint, models.student),
        **checked,
        "data": {**points.record(), "n": len(points.y), "n_total": points.n_total},
        "subset": len(points.y) < points.n_total,
        "teacher": None if teacher is None else _name(teacher),
    }
    outputs = [onnx_path.with_name(onnx_path.stem + ".export.json")]
    if not isinstance(checkpoint, nn.Module):  # a run dir to keep the record in
        weights = weights_path(checkpoint)
        outputs.append(weights.with_name(f"export_{weights.stem}.json"))
    for path in outputs:
        atomic_write_json(path, result)
    result["outputs"] = [str(path) for path in outputs]
    return result


def _name(source: ModelSource) -> str:
    return source_name(source) if isinstance(source, nn.Module) else str(weights_path(source).with_suffix(""))


def _digest(source: ModelSource, model: nn.Module) -> str:
    """SHA-256 of the weights file, or for a module the fingerprint of its named tensors."""
    if isinstance(source, nn.Module):
        return fingerprint({"what": "weights"}, model_tensors("model", model))
    return hashlib.sha256(weights_path(source).read_bytes()).hexdigest()
