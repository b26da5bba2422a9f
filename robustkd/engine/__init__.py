"""The one training loop every method runs in."""

from robustkd.engine.loop import ThreatMismatchWarning, TrainingError, TrainResult, train

__all__ = ["ThreatMismatchWarning", "TrainResult", "TrainingError", "train"]
