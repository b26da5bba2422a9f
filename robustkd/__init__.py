"""robustkd: knowledge distillation that keeps adversarial robustness and stays faithful to the teacher."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from robustkd.engine import TrainResult


def train(config: Any) -> TrainResult:
    """Train a model as ``config`` (a ``TrainConfig`` or a dict of its fields) says."""
    from robustkd.engine import train as _train

    return _train(config)


def distill(config: Any) -> TrainResult:
    """Distil ``config.teacher`` into the configured student; the method must use a teacher."""
    from robustkd.config import TrainConfig, from_dict
    from robustkd.errors import ConfigError

    cfg = config if isinstance(config, TrainConfig) else from_dict(config)
    if cfg.teacher is None:
        raise ConfigError("teacher: distill needs a teacher checkpoint")
    return train(cfg)


def load_model(path: Any, **kwargs: Any) -> Any:
    """Load a robustkd checkpoint (or a foreign .pt state dict with ``arch=``) in eval mode."""
    from robustkd.checkpoint import load_model as _load

    return _load(path, **kwargs)


__all__ = ["__version__", "distill", "load_model", "train"]
