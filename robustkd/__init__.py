"""robustkd: knowledge distillation that keeps adversarial robustness and stays faithful to the teacher.

The Python API mirrors the command line::

    import robustkd
    run = robustkd.train(config)                                   # TrainConfig, dict or YAML path
    run = robustkd.distill(teacher="runs/teacher/best", student="dm_small", method="kd",
                           data="fashion-mnist", epochs=5)
    model = robustkd.load_model(run.run_dir / "best")
    robustkd.evaluate(model, x, y, protocol="linf-0.1")            # robustkd.evaluate.evaluate_robustness
    robustkd.certify(teacher, model, x, y, eps=0.05)               # robustkd.certify.certify
    robustkd.report(["runs/kd"], out="report")                     # robustkd.report.make_report
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from robustkd._version import __version__

if TYPE_CHECKING:
    from robustkd.config import TrainConfig
    from robustkd.engine import TrainResult

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


def train(config: Any = None, **overrides: Any) -> TrainResult:
    """Train a model as ``config`` says: a ``TrainConfig``, a dict of its fields or a YAML file.

    Keyword overrides replace top-level fields (``epochs=3``, ``name="quick"``).
    """
    from robustkd.config import to_dict
    from robustkd.engine import train as _train

    cfg = _config(config if config is not None else {})
    if overrides:
        cfg = _config({**to_dict(cfg), **overrides})
    return _train(cfg)


def distill(
    config: Any = None,
    *,
    teacher: str | Path | None = None,
    student: str | dict[str, Any] | None = None,
    method: str | dict[str, Any] | None = None,
    data: str | dict[str, Any] | None = None,
    **overrides: Any,
) -> TrainResult:
    """Distil ``teacher`` into a student with one of the distillation methods.

    Either a full ``config`` (as for :func:`train`) or keywords: ``teacher`` a checkpoint path,
    ``student`` an architecture name or ``{"arch": ..., "args": ...}``, ``method`` a name or
    ``{"name": ..., "args": ...}`` (default ``kd``), ``data`` a dataset name or a ``DataConfig`` dict,
    plus any top-level field (``epochs=5``, ``name="kd"``).
    """
    from robustkd.config import to_dict
    from robustkd.engine import train as _train

    raw = to_dict(_config(config)) if config is not None else {"method": {"name": "kd", "args": {}}}
    if teacher is not None:
        raw["teacher"] = str(teacher)
    if student is not None:
        raw["model"] = {"arch": student} if isinstance(student, str) else dict(student)
    if method is not None:
        raw["method"] = {"name": method} if isinstance(method, str) else dict(method)
    if data is not None:
        raw["data"] = {"dataset": data} if isinstance(data, str) else dict(data)
    raw.update(overrides)
    # The engine refuses a distillation method without a teacher, before any work.
    return _train(_config(raw))


def load_model(path: Any, **kwargs: Any) -> Any:
    """Load a robustkd checkpoint (or a foreign .pt state dict with ``arch=``) in eval mode."""
    from robustkd.checkpoint import load_model as _load

    return _load(path, **kwargs)


__all__ = ["__version__", "certify", "compare", "distill", "evaluate", "load_model", "report", "train"]
