"""Evaluation on tensors and models in memory: robustness (clean, per-attack and worst-case accuracy) and
faithfulness of a student to its teacher, dicts out. Checkpoints, data and files are :mod:`robustkd.jobs`' part.

``robustkd.evaluate(model, x, y, ...)`` is :func:`evaluate_robustness`.
"""

from robustkd.evaluate.faithfulness import evaluate_faithfulness
from robustkd.evaluate.robustness import evaluate_robustness, resolve_protocol

__all__ = ["evaluate_robustness", "resolve_protocol"]
__all__ += ["evaluate_faithfulness"]

from robustkd._callable import make_module_callable  # noqa: E402

make_module_callable(__name__, "evaluate_robustness")
