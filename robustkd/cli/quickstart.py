"""``robustkd quickstart``: the whole pipeline on Fashion-MNIST, small and offline."""

from __future__ import annotations

from typing import Any

from robustkd.cli.inputs import add_progress_option
from robustkd.cli.parsing import command_parser, names
from robustkd.cli.table import COMMANDS, Command

EXAMPLES = """examples:
  robustkd quickstart                              # runs/quickstart, report in runs/quickstart/report/report.html
  robustkd quickstart --out runs/qs --methods kd,faithful
"""

DESCRIPTION = (
    "The whole pipeline on Fashion-MNIST, offline and small: an IBP-trained (certifiable) teacher and its card, "
    "students 4.5x smaller distilled from it, and one report comparing them (size, latency, clean / PGD-20 / "
    "CW-20 accuracy, empirical and certified relative calibration, a verdict per student). Finished runs are "
    "reused and interrupted ones resume, so running it again is cheap."
)


def build(prog: str) -> Any:
    from robustkd.quickstart import STUDENT_METHODS, STUDENTS, Plan

    parser = command_parser(prog, DESCRIPTION, EXAMPLES)
    parser.add_argument("--out", default="runs/quickstart", help="folder for the runs and the report")
    parser.add_argument(
        "--methods",
        type=names,
        default=list(STUDENTS),
        help=f"students to distil, comma-separated, from: {', '.join(STUDENT_METHODS)}",
    )
    parser.add_argument("--train_subset", type=int, default=Plan.train_subset, help="training images")
    parser.add_argument("--n_eval", type=int, default=Plan.n_eval, help="test points evaluated")
    parser.add_argument("--device", default="auto")
    add_progress_option(parser)
    return parser


def run(ns: Any) -> int:
    from robustkd.quickstart import Plan
    from robustkd.quickstart import run as run_pipeline

    plan = Plan(train_subset=ns.train_subset, n_eval=ns.n_eval)
    result = run_pipeline(ns.out, methods=names(ns.methods), plan=plan, progress=ns.progress, device=ns.device)
    print(table(result["models"]))
    for name, entry in result["summary"].items():
        print(f"{name}: {entry['text']}")
    print(f"report: {result['outputs']['html']}")
    print(f"tensorboard --logdir {ns.out}")
    print(f"quickstart: {result['seconds']['total']:.0f} s")
    return 0


def table(rows: list[dict[str, Any]]) -> str:
    def cell(value: Any) -> str:
        return "–" if value is None else f"{value:.3f}"

    def ratio(value: Any) -> str:
        return "–" if value is None else f"{value:.2f}x"

    lines = [
        f"{'model':<12} {'params':>8} {'smaller':>7} {'faster':>6} {'clean':>6} {'robust':>6} {'disagree':>8} "
        f"{'cert.agree':>10}"
    ]
    for row in rows:
        lines.append(
            f"{row['name']:<12} {row['params']:>8,} {ratio(row.get('compression')):>7} "
            f"{ratio(row.get('latency_ratio')):>6} {cell(row.get('clean')):>6} {cell(row.get('robust')):>6} "
            f"{cell(row.get('disagreement')):>8} {cell(row.get('certified_agreement')):>10}"
        )
    return "\n".join(lines)


COMMANDS.add("quickstart", Command("the whole pipeline, small and offline", build, run))
