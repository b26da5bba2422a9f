"""The one training loop every method runs in."""

from robustkd.engine.loop import TrainResult, train

__all__ = ["TrainResult", "train"]
