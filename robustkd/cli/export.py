"""``robustkd export``: a checkpoint to ONNX, checked against PyTorch with onnxruntime."""

from __future__ import annotations

from typing import Any

from robustkd.cli.api import export_onnx, export_options
from robustkd.cli.inputs import (
    DATA_ROOT_RENAMED,
    add_data_options,
    add_points_option,
    add_progress_option,
    require_checkpoints,
)
from robustkd.cli.parsing import command_parser
from robustkd.cli.table import ATOMIC, COMMANDS, Command

EXAMPLES = """examples:
  robustkd export runs/fmnist_kd/best --onnx student.onnx
  robustkd export runs/fmnist_kd/best --onnx student.onnx --teacher runs/fmnist_teacher_pgd_at/best
  robustkd export runs/fmnist_kd/best --onnx student.onnx --n_examples 1000 --exporter legacy
  robustkd export --config export.yaml      # export.yaml: {checkpoint: runs/fmnist_kd/best, onnx: student.onnx}
"""

DESCRIPTION = (
    "Export a checkpoint to ONNX, run the graph with onnxruntime on the test set and check it against "
    "the PyTorch model (same predictions, largest logit difference); with --teacher, also that the "
    "relative-calibration metrics against the teacher are unchanged. The result goes to "
    "<name>.export.json beside the .onnx and to export_<ckpt>.json in the run dir (shown by robustkd "
    "report). Exit status 1 when the check fails."
)

# --test-subset was this command's name for what every other command calls --n_examples
RENAMED = {"--test-subset": "--n_examples", "--test_subset": "--n_examples", **DATA_ROOT_RENAMED}


def build(prog: str) -> Any:
    exporters, logit_tolerance, calibration_tolerance = export_options()
    parser = command_parser(prog, DESCRIPTION, EXAMPLES)
    parser.add_argument("checkpoint", metavar="CKPT", help="checkpoint: runs/<name>/best, a .safetensors or a run dir")
    parser.add_argument("--onnx", required=True, help="output file, e.g. student.onnx")
    parser.add_argument("--teacher", default=None, help="teacher checkpoint for the relative-calibration check")
    add_points_option(parser)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--exporter", default="auto", choices=list(exporters), help="torch.onnx exporter")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset; null: 18 with dynamo, 17 with legacy")
    parser.add_argument("--logit_tolerance", type=float, default=logit_tolerance)
    parser.add_argument("--calibration_tolerance", type=float, default=calibration_tolerance)
    add_data_options(parser)
    add_progress_option(parser)
    return parser


def run(ns: Any) -> int:
    require_checkpoints("export", {"CKPT": ns.checkpoint, "--teacher": ns.teacher})
    result = export_onnx(
        ns.checkpoint,
        ns.onnx,
        teacher=ns.teacher,
        n_examples=ns.n_examples,
        batch_size=ns.batch_size,
        exporter=ns.exporter,
        opset=ns.opset,
        logit_tolerance=ns.logit_tolerance,
        calibration_tolerance=ns.calibration_tolerance,
        data_root=ns.data.root,
        dataset=ns.data.dataset,
        progress=ns.progress,  # the bars themselves stay off in a log
    )
    scope = "a subset of the test set" if result["subset"] else "the full test set"
    print(f"{result['onnx']}: exported with the {result['exporter']} exporter, opset {result['opset']}")
    print(
        f"onnxruntime vs pytorch on {result['data']['n']} test points ({scope}): same class on "
        f"{result['agreement']:.4f}, max |logit difference| {result['max_logit_diff']:.2e} "
        f"(tolerance {result['logit_tolerance']:g})"
    )
    cal = result["calibration"]
    if cal is not None:
        state = "unchanged" if cal["unchanged"] else f"CHANGED ({cal['worst_metric']})"
        print(
            f"relative calibration against the teacher: {state}, max difference {cal['max_abs_difference']:.2e} "
            f"(tolerance {cal['tolerance']:g})"
        )
    print(f"check {'passed' if result['passed'] else 'FAILED'}; results: {', '.join(result['outputs'])}")
    return 0 if result["passed"] else 1


COMMANDS.add(
    "export", Command("a checkpoint to ONNX, checked with onnxruntime", build, run, RENAMED, on_interrupt=ATOMIC)
)
