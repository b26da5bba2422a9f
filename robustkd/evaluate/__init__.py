"""Evaluation: robustness (clean, per-attack and worst-case accuracy), faithfulness and reports.

``robustkd.evaluate(model, x, y, ...)`` is :func:`evaluate_robustness`.
"""

from robustkd.evaluate.faithfulness import evaluate_faithfulness, evaluate_faithfulness_checkpoints
from robustkd.evaluate.robustness import evaluate_robustness, resolve_protocol

__all__ = ["evaluate_robustness", "resolve_protocol"]
__all__ += ["evaluate_faithfulness", "evaluate_faithfulness_checkpoints"]

from robustkd._callable import make_module_callable  # noqa: E402

make_module_callable(__name__, "evaluate_robustness")
