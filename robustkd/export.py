"""Export a model to ONNX and check the exported graph against the PyTorch model on given points.

The check runs the ``.onnx`` file with onnxruntime (CPU) on the points (:mod:`robustkd.jobs` passes a
checkpoint's test points) and compares it with the
PyTorch model: the share of points with the same predicted class and the largest absolute logit
difference. With a teacher, the relative-calibration metrics of the faithfulness evaluation
(:func:`robustkd.evaluate.evaluate_faithfulness` at eps 0: agreement with the teacher and the confidence
gap f_T^y - f_S^y at the test points) are computed for the PyTorch student and for the ONNX one and must
agree within a stated tolerance. The graph run by onnxruntime gives no input gradients here, so the
attacked (eps > 0) metrics are not recomputed on it; the logit difference says how far they could move.

Exporters: ``dynamo`` (``torch.onnx.export(dynamo=True)``, needs onnxscript; the default since torch 2.9)
and ``legacy`` (the TorchScript exporter, deprecated since torch 2.9, fast, needs neither onnxscript nor
onnx). ``auto`` takes dynamo when onnxscript imports and falls back to legacy when dynamo fails.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import io
import logging
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from robustkd.errors import ConfigError, RobustKDError
from robustkd.evaluate.faithfulness import evaluate_faithfulness
from robustkd.io import atomic_write_bytes
from robustkd.runtime import progress_bar

EXPORTERS = ("auto", "dynamo", "legacy")
DEFAULT_OPSET = {"dynamo": 18, "legacy": 17}
LOGIT_TOLERANCE = 1e-4
CALIBRATION_TOLERANCE = 1e-4
INPUT_NAME, OUTPUT_NAME = "input", "logits"


class OnnxModule(nn.Module):
    """An onnxruntime session behind the ``nn.Module`` interface (CPU, no gradients), for the evaluations."""

    def __init__(self, session: Any) -> None:
        super().__init__()
        self.session = session
        self.input_name = session.get_inputs()[0].name

    def forward(self, x: Tensor) -> Tensor:
        array = x.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(self.session.run(None, {self.input_name: array})[0]).to(x.device)


def _require_onnx() -> tuple[Any, Any]:
    try:
        import onnx
        import onnxruntime
    except ImportError as err:
        raise RobustKDError(
            f"export needs onnx and onnxruntime ({err}); install them with "
            "'pip install onnx==1.23.2 onnxruntime==1.32.0 onnxscript==0.7.2' (pinned in requirements/dev.txt)"
        ) from None
    return onnx, onnxruntime


def _has_onnxscript() -> bool:
    try:
        import onnxscript  # noqa: F401
    except ImportError:
        return False
    return "dynamo" in inspect.signature(torch.onnx.export).parameters


@contextlib.contextmanager
def _quiet_export(notes: list[str]) -> Iterator[None]:
    """Keep the exporters' chatter out of the output; record it, and pass on warnings that may matter."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._export", "onnxscript")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)  # e.g. "torchvision is not installed. Skipping torchvision::nms"
    try:
        with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("always")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
    for w in caught:
        message = f"{w.category.__name__}: {w.message}"
        if message not in notes:
            notes.append(message)
        # Deprecation notices about the exporters themselves are expected; a TracerWarning is not.
        if not issubclass(w.category, DeprecationWarning | FutureWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def _export_with(kind: str, model: nn.Module, example: Tensor, path: Path, opset: int, notes: list[str]) -> None:
    with _quiet_export(notes), torch.no_grad():
        if kind == "dynamo":
            # `report` (write a Markdown export report) is missing from older releases; off where it exists.
            extra = {"report": False} if "report" in inspect.signature(torch.onnx.export).parameters else {}
            torch.onnx.export(
                model,
                (example,),
                str(path),
                dynamo=True,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes=({0: torch.export.Dim("batch")},),  # the tuple form: no argument names needed
                verbose=False,
                **extra,
            )
        else:
            # torch < 2.5 has no dynamo argument and is legacy-only anyway.
            legacy = "dynamo" in inspect.signature(torch.onnx.export).parameters
            kwargs: dict[str, Any] = {"dynamo": False} if legacy else {}
            torch.onnx.export(
                model,
                (example,),
                str(path),
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                **kwargs,
            )


def _export(
    model: nn.Module, example: Tensor, path: Path, exporter: str, opset: int | None, notes: list[str]
) -> tuple[str, int]:
    """Write the graph to ``path`` as one self-contained file, atomically; returns (exporter used, opset)."""
    order = _exporter_order(exporter)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)  # before the export, which takes a while
    except OSError as err:
        raise ConfigError(f"onnx: cannot create the folder {path.parent} ({err})") from err
    errors = []
    # The exporters write into a private folder (dynamo puts the weights in a side file there); the graph is
    # then read back with its weights and written as one file: copied alone, it still runs.
    with tempfile.TemporaryDirectory(prefix="robustkd-onnx-") as folder:
        tmp = Path(folder) / path.name
        for kind in order:
            chosen = opset if opset is not None else DEFAULT_OPSET[kind]
            try:
                _export_with(kind, model, example, tmp, chosen, notes)
            except Exception as err:  # the exporters raise many types; the message carries the cause
                errors.append(f"{kind}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
                if kind != order[-1]:
                    message = f"the dynamo exporter failed ({errors[-1]}); trying the legacy exporter"
                    notes.append(message)
                    warnings.warn(message, stacklevel=3)
                continue
            _write_self_contained(tmp, path)
            return kind, chosen
    arch = getattr(model, "robustkd_meta", {}).get("arch")
    raise RobustKDError(f"cannot export {arch or 'the model'} to ONNX: " + "; ".join(errors))


def _exporter_order(exporter: str) -> list[str]:
    if exporter == "auto":
        return ["dynamo", "legacy"] if _has_onnxscript() else ["legacy"]
    if exporter == "dynamo" and not _has_onnxscript():
        raise RobustKDError(
            "exporter: dynamo needs onnxscript ('pip install onnxscript==0.7.2') and torch >= 2.5; or use legacy"
        )
    return [exporter]


# Protocol buffers cannot hold more than 2 GiB in one message.
MAX_SELF_CONTAINED_BYTES = 2**31 - 2**20


def _write_self_contained(exported: Path, path: Path) -> None:
    """The exported graph with every weight inside it, written to ``path`` atomically (fsync, rename)."""
    onnx, _ = _require_onnx()
    proto = onnx.load(str(exported), load_external_data=True)  # pulls side files' weights into the graph
    if proto.ByteSize() > MAX_SELF_CONTAINED_BYTES:
        raise RobustKDError(
            f"onnx: the model is {proto.ByteSize() / 2**30:.1f} GiB, over the 2 GiB an ONNX file can hold "
            "without an external-data file; export a smaller model"
        )
    atomic_write_bytes(path, proto.SerializeToString())  # a WriteError names the file and what to do


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _logits(model: nn.Module, x: Tensor, batch_size: int, bar: Any, task: Any) -> Tensor:
    parts = []
    with torch.no_grad():
        for begin in range(0, x.shape[0], batch_size):
            parts.append(model(x[begin : begin + batch_size]).float())
            if bar is not None:
                bar.advance(task, min(batch_size, x.shape[0] - begin))
    return torch.cat(parts)


def _flatten(prefix: str, value: Any, out: dict[str, float]) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), item, out)
    elif isinstance(value, bool) or value is None:
        return
    elif isinstance(value, int | float):
        out[prefix] = float(value)


def calibration_metrics(result: dict[str, Any]) -> dict[str, float]:
    """The numbers of a faithfulness result that describe the student against the teacher, flattened."""
    out: dict[str, float] = {}
    _flatten("clean", {k: result["clean"][k] for k in ("student", "agreement", "both_correct")}, out)
    for block in result["results"]:
        for subset in ("teacher_correct", "both_correct"):
            _flatten(f"eps={block['eps']:g}.{subset}", block[subset], out)
    return out


def _compare_calibration(
    teacher: nn.Module, student: nn.Module, onnx_student: nn.Module, x: Tensor, y: Tensor, batch_size: int, tol: float
) -> dict[str, Any]:
    def run(model: nn.Module) -> dict[str, Any]:
        return evaluate_faithfulness(
            teacher, model, x, y, eps=0.0, batch_size=batch_size, device="cpu", progress=False, checks=False
        )

    torch_metrics = calibration_metrics(run(student))
    onnx_metrics = calibration_metrics(run(onnx_student))
    diffs = {key: abs(torch_metrics[key] - onnx_metrics[key]) for key in torch_metrics if key in onnx_metrics}
    missing = sorted(set(torch_metrics) ^ set(onnx_metrics))
    worst = max(diffs, key=diffs.get) if diffs else None
    largest = diffs[worst] if worst is not None else 0.0
    return {
        "definition": "evaluate_faithfulness at eps 0 (clean test points), PyTorch student vs ONNX student",
        "tolerance": tol,
        "max_abs_difference": largest,
        "worst_metric": worst,
        "mismatched_keys": missing,
        "unchanged": largest <= tol and not missing,
        "torch": {k: torch_metrics[k] for k in _HEADLINE if k in torch_metrics},
        "onnx": {k: onnx_metrics[k] for k in _HEADLINE if k in onnx_metrics},
    }


_HEADLINE = (
    "clean.agreement.rate",
    "eps=0.teacher_correct.disagreement.rate",
    "eps=0.teacher_correct.gap_clean.mean",
    "eps=0.teacher_correct.gap_clean.q50",
    "eps=0.teacher_correct.gap_clean.q90",
    "eps=0.teacher_correct.gap_clean.q99",
)


def check_options(
    onnx_path: str | Path,
    *,
    batch_size: int = 256,
    exporter: str = "auto",
    opset: int | None = None,
    logit_tolerance: float = LOGIT_TOLERANCE,
    calibration_tolerance: float = CALIBRATION_TOLERANCE,
) -> Path:
    """Refuse bad export options before any work; returns the .onnx path."""
    onnx_path = Path(onnx_path)
    if onnx_path.is_dir():
        raise ConfigError(f"onnx: {onnx_path} is a folder; give a file name such as {onnx_path / 'student.onnx'}")
    if onnx_path.suffix != ".onnx":
        raise ConfigError(f"onnx: the output must end in .onnx, got {str(onnx_path)!r}")
    if exporter not in EXPORTERS:
        raise ConfigError(f"exporter: choose from {', '.join(EXPORTERS)}, got {exporter!r}")
    if opset is not None and (isinstance(opset, bool) or not isinstance(opset, int) or opset < 7):
        raise ConfigError(f"opset: expected an ONNX opset number such as 17 or 18, got {opset!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size: must be an integer >= 1, got {batch_size!r}")
    for field, value in (("logit_tolerance", logit_tolerance), ("calibration_tolerance", calibration_tolerance)):
        if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
            raise ConfigError(f"{field}: must be a number >= 0, got {value!r}")
    _require_onnx()
    return onnx_path


def export_model(
    model: nn.Module,
    onnx_path: str | Path,
    x: Tensor,
    *,
    teacher: nn.Module | None = None,
    y: Tensor | None = None,
    batch_size: int = 256,
    exporter: str = "auto",
    opset: int | None = None,
    logit_tolerance: float = LOGIT_TOLERANCE,
    calibration_tolerance: float = CALIBRATION_TOLERANCE,
    progress: bool = True,
) -> dict[str, Any]:
    """Write ``model`` to ``onnx_path`` and check the graph against it on the points ``x`` (images in [0, 1]).

    The check passes when every point gets the same class, the largest logit difference is at most
    ``logit_tolerance`` and, with a ``teacher`` (and labels ``y``), every relative-calibration number against
    the teacher moves by at most ``calibration_tolerance``. Returns a JSON-able dict, ``"passed"`` among it;
    a failed check does not raise.
    """
    tolerances = {"logit_tolerance": logit_tolerance, "calibration_tolerance": calibration_tolerance}
    onnx_path = check_options(onnx_path, batch_size=batch_size, exporter=exporter, opset=opset, **tolerances)
    onnx, ort = _require_onnx()
    timing: dict[str, float] = {}
    notes: list[str] = []
    start = time.perf_counter()
    used, used_opset = _export(model, x[: min(2, len(x))].clone(), onnx_path, exporter, opset, notes)
    timing["export"] = time.perf_counter() - start
    onnx_model = _session(onnx, ort, onnx_path)
    start = time.perf_counter()
    ref, got = _both_logits(model, onnx_model, x, batch_size, progress)
    timing["check"] = time.perf_counter() - start
    same = ref.argmax(dim=1) == got.argmax(dim=1)
    max_diff = (ref - got).abs().max().item()
    calibration = None
    if teacher is not None:
        start = time.perf_counter()
        tol = float(calibration_tolerance)
        calibration = _compare_calibration(teacher, model, onnx_model, x, y, batch_size, tol)
        timing["calibration"] = time.perf_counter() - start
    return {
        "onnx": str(onnx_path),
        "onnx_sha256": _sha256(onnx_path),
        "exporter": used,
        "opset": used_opset,
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
        "input_shape": ["batch", *x.shape[1:]],
        "input_range": "[0, 1]; the normalisation is inside the graph",
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": ort.__version__},
        "agreement": same.double().mean().item(),
        "disagreeing_points": int((~same).sum()),
        "max_logit_diff": max_diff,
        "logit_tolerance": logit_tolerance,
        "calibration": calibration,
        "passed": bool(same.all()) and max_diff <= logit_tolerance and (calibration or {}).get("unchanged", True),
        "notes": notes,
        "timing": timing,
    }


def _session(onnx: Any, ort: Any, onnx_path: Path) -> OnnxModule:
    try:
        onnx.checker.check_model(str(onnx_path))
    except Exception as err:  # onnx raises its own ValidationError type
        raise RobustKDError(f"{onnx_path}: the exported graph fails onnx.checker ({err})") from err
    return OnnxModule(ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]))


def _both_logits(
    model: nn.Module, onnx_model: nn.Module, x: Tensor, batch_size: int, progress: bool
) -> tuple[Tensor, Tensor]:
    with progress_bar(progress) as bar:
        task_t = bar.add_task("pytorch", total=len(x)) if bar is not None else None
        ref = _logits(model, x, batch_size, bar, task_t)
        task_o = bar.add_task("onnxruntime", total=len(x)) if bar is not None else None
        got = _logits(onnx_model, x, batch_size, bar, task_o)
    return ref, got
