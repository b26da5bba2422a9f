"""robustkd: knowledge distillation that keeps adversarial robustness and stays faithful to the teacher.

The Python API mirrors the command line::

    import robustkd
    run = robustkd.train(config)                                   # TrainConfig, dict or YAML path
    run = robustkd.distill(teacher="runs/teacher/best", student="dm_small", method="kd",
                           data="fashion-mnist", epochs=5)
    run = robustkd.distill(teacher=robustkd.wrap(my_net, mean=[0.5], std=[0.5]), student="dm_small")
    model = robustkd.load_model(run.run_dir / "best")
    robustkd.evaluate(model, x, y, protocol="linf-0.1")            # robustkd.evaluate.evaluate_robustness
    robustkd.certify(teacher, model, x, y, eps=0.05)               # robustkd.certify.certify
    robustkd.report(["runs/kd"], out="report")                     # robustkd.report.make_report
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from robustkd._version import __version__

if TYPE_CHECKING:
    from torch import nn

    from robustkd.config import TrainConfig
    from robustkd.engine import TrainResult
    from robustkd.models import WrappedModel

_SUBPACKAGES = (
    "attacks",
    "certify",
    "checkpoint",
    "compare",
    "config",
    "data",
    "engine",
    "evaluate",
    "methods",
    "models",
    "report",
)


def __getattr__(name: str) -> Any:
    # Subpackages load on first use, so `import robustkd` stays fast and `robustkd.evaluate(...)` works.
    if name in _SUBPACKAGES:
        return importlib.import_module(f"robustkd.{name}")
    raise AttributeError(f"module 'robustkd' has no attribute {name!r}")


def _config(config: Any) -> TrainConfig:
    from collections.abc import Mapping

    from robustkd.config import load_config

    # Every failure (missing file, bad YAML, a YAML tag, a list instead of a mapping) is a ConfigError.
    return load_config(dict(config) if isinstance(config, Mapping) else config)


def wrap(
    model: nn.Module,
    *,
    mean: Any = None,
    std: Any = None,
    input_shape: Any = None,
    num_classes: int | None = None,
    arch_args: dict[str, Any] | None = None,
) -> WrappedModel:
    """State what a module of one's own expects: the mean/std robustkd puts in front (none: it takes images in
    [0, 1]), its input shape and classes (none: the dataset's), the arguments that rebuild it. See
    :func:`robustkd.models.wrap.wrap`."""
    from robustkd.models.wrap import wrap as _wrap

    return _wrap(model, mean=mean, std=std, input_shape=input_shape, num_classes=num_classes, arch_args=arch_args)


def _is_module(value: Any) -> bool:
    # A module can only exist once torch is imported; checking this way keeps `import robustkd` light.
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.nn.Module)


def train(config: Any = None, *, model: nn.Module | None = None, **overrides: Any) -> TrainResult:
    """Train a model as ``config`` says: a ``TrainConfig``, a dict of its fields or a YAML file.

    ``model``: a module of one's own (plain or :func:`wrap`-ped) trained in place of ``config.model``.
    Keyword overrides replace top-level fields (``epochs=3``, ``name="quick"``).
    """
    from robustkd.config import to_dict
    from robustkd.engine import train as _train

    cfg = _config(config if config is not None else {})
    if overrides:
        cfg = _config({**to_dict(cfg), **overrides})
    return _train(cfg, model=model)


def distill(
    config: Any = None,
    *,
    teacher: str | Path | nn.Module | None = None,
    student: str | dict[str, Any] | nn.Module | None = None,
    method: str | dict[str, Any] | None = None,
    data: str | dict[str, Any] | None = None,
    **overrides: Any,
) -> TrainResult:
    """Distil ``teacher`` into a student with one of the distillation methods.

    Either a full ``config`` (as for :func:`train`) or keywords: ``teacher`` a checkpoint path or a module,
    ``student`` an architecture name, ``{"arch": ..., "args": ...}`` or a module, ``method`` a name or
    ``{"name": ..., "args": ...}`` (default ``kd``), ``data`` a dataset name or a ``DataConfig`` dict,
    plus any top-level field (``epochs=5``, ``name="kd"``). Modules (plain, or :func:`wrap`-ped to state
    their normalisation, input shape and classes) stay in memory: the run's config records them as
    ``<nn.Module Name>``, a resume needs them passed again, and the student is saved as safetensors whose
    sidecar names its class (load it back with ``load_model(path, model=...)``).
    """
    from robustkd.config import to_dict
    from robustkd.engine import train as _train

    raw = to_dict(_config(config)) if config is not None else {"method": {"name": "kd", "args": {}}}
    teacher_module = teacher if _is_module(teacher) else None
    student_module = student if _is_module(student) else None
    if teacher is not None and teacher_module is None:
        raw["teacher"] = str(teacher)
    if student is not None and student_module is None:
        raw["model"] = {"arch": student} if isinstance(student, str) else dict(student)
    if method is not None:
        raw["method"] = {"name": method} if isinstance(method, str) else dict(method)
    if data is not None:
        raw["data"] = {"dataset": data} if isinstance(data, str) else dict(data)
    raw.update(overrides)
    # The engine refuses a distillation method without a teacher, before any work.
    return _train(_config(raw), model=student_module, teacher=teacher_module)


def load_model(path: Any, **kwargs: Any) -> Any:
    """Load a robustkd checkpoint (or a foreign .pt state dict with ``arch=``) in eval mode.

    A checkpoint of a module of one's own needs ``model=<instance>`` or ``arch="pkg.mod:Class"``
    (see :func:`robustkd.checkpoint.load_model`)."""
    from robustkd.checkpoint import load_model as _load

    return _load(path, **kwargs)


def import_model(src: Any, arch: str | None = None, **kwargs: Any) -> Path:
    """Import a RobustBench / TRADES / ARD / RSLAD checkpoint as ``out_dir/best`` (``robustkd.jobs.import_model``)."""
    from robustkd.jobs import import_model as _import

    return _import(src, arch, **kwargs)


__all__ = [
    "__version__",
    "certify",
    "compare",
    "distill",
    "evaluate",
    "import_model",
    "load_model",
    "report",
    "train",
    "wrap",
]
