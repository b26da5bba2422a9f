"""Evaluation: robustness (clean, per-attack and worst-case accuracy), faithfulness and reports."""

from robustkd.evaluate.faithfulness import evaluate_faithfulness, evaluate_faithfulness_checkpoints
from robustkd.evaluate.robustness import evaluate_robustness, resolve_protocol

__all__ = ["evaluate_robustness", "resolve_protocol"]
__all__ += ["evaluate_faithfulness", "evaluate_faithfulness_checkpoints"]
