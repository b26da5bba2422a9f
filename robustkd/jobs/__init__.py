"""Jobs: "checkpoint in, JSON out". Load checkpoints and their test points, compute with resumable progress,
write the result atomically; the maths is :mod:`robustkd.evaluate`'s, :mod:`robustkd.certify`'s and
:mod:`robustkd.export`'s.

The chain is written once in :mod:`robustkd.jobs.chain`; each job is a few lines over it.
"""

from robustkd.jobs.certification import certify_checkpoints
from robustkd.jobs.chain import (
    FOREIGN_SUFFIXES,
    choose_dataset,
    load_models,
    load_points,
    load_test_points,
    output_path,
)
from robustkd.jobs.export import export_onnx
from robustkd.jobs.faithfulness import evaluate_faithfulness_checkpoints
from robustkd.jobs.importing import describe_import, import_model
from robustkd.jobs.progress import ProgressFile, progress_path
from robustkd.jobs.robustness import evaluate_checkpoint

__all__ = [
    "FOREIGN_SUFFIXES",
    "ProgressFile",
    "certify_checkpoints",
    "choose_dataset",
    "describe_import",
    "evaluate_checkpoint",
    "evaluate_faithfulness_checkpoints",
    "export_onnx",
    "import_model",
    "load_models",
    "load_points",
    "load_test_points",
    "output_path",
    "progress_path",
]
