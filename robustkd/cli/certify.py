"""``robustkd certify``: certified bounds over the Linf eps-ball for a model, or a teacher-student pair."""

from __future__ import annotations

from typing import Any

from robustkd.cli.api import certify_checkpoints
from robustkd.cli.inputs import (
    DATA_ROOT_RENAMED,
    add_data_options,
    add_points_option,
    add_progress_option,
    require_checkpoints,
)
from robustkd.cli.output import num, table
from robustkd.cli.parsing import command_parser, number, numbers
from robustkd.cli.registries import listed
from robustkd.cli.table import COMMANDS, Command

EXAMPLES = """examples:
  robustkd certify --student runs/kd/best --teacher runs/teacher/best --eps 0.05 --method crown-ibp
  robustkd certify --student runs/teacher/best --eps 0.1 --method ibp        # certified accuracy of one model
  robustkd certify --student runs/kd/best --teacher runs/teacher/best --eps 0.05 --joint --n_examples 1000
  robustkd certify --config certify.yaml --method ibp     # certify.yaml: {student: ..., teacher: ..., eps: 0.05}
"""

DESCRIPTION = (
    "Certified bounds over the Linf eps-ball on the test split: certified accuracy of the student "
    "and, with --teacher, the share of teacher-correct points certified to agree with the teacher "
    "and a certified upper bound on the confidence gap f_T^y - f_S^y."
)


def build(prog: str) -> Any:
    parser = command_parser(prog, DESCRIPTION, EXAMPLES)
    parser.add_argument("--student", required=True, help="checkpoint of the model to certify")
    parser.add_argument("--teacher", default=None, help="teacher checkpoint (omit to certify the student alone)")
    parser.add_argument("--eps", type=number, required=True, help="Linf radius, e.g. 0.05 or 8/255")
    parser.add_argument("--method", default="ibp", help=f"verifier, one of: {listed('verifiers')}")
    parser.add_argument("--joint", action="store_true", help="also bound the pair jointly (tighter gap bounds)")
    parser.add_argument(
        "--rho", type=numbers, default=(0.05, 0.1, 0.2), help="gap thresholds for the faithful share, comma-separated"
    )
    add_points_option(parser)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--device", default="auto")
    add_data_options(parser)
    parser.add_argument("--out", default=None, help="JSON output; null: cert_<ckpt>_<method>_<eps>.json beside it")
    add_progress_option(parser)
    return parser


def run(ns: Any) -> int:
    require_checkpoints("certify", {"--student": ns.student, "--teacher": ns.teacher})
    result = certify_checkpoints(
        ns.student,
        ns.teacher,
        eps=ns.eps,
        method=ns.method,
        n_examples=ns.n_examples,
        batch_size=ns.batch_size,
        joint=ns.joint,
        rho=tuple(ns.rho),
        device=ns.device,
        data_root=ns.data.root,
        dataset=ns.data.dataset,
        out=ns.out,
        progress=ns.progress,  # the bars themselves stay off in a log
    )
    print_certificates(result, ns.eps, ns.method)
    return 0


def print_certificates(result: dict[str, Any], eps: float, method: str) -> None:
    """A few labelled lines; every number, and the per-example detail, stays in the JSON file."""
    scope = "a subset of the test set" if result["subset"] else "the full test set"
    print(f"{result['student_path']}: {result['n']} test points ({scope}), Linf eps {eps:g}, {method} bounds")
    if "teacher" not in result:
        rows = [("student", num(result["clean_accuracy"]), num(result["certified_accuracy"]))]
    else:
        models = ("teacher", "student")
        rows = [(m, num(result[m]["clean_accuracy"]), num(result[m]["certified_accuracy"])) for m in models]
    print(table(("", "clean accuracy", "certified accuracy"), rows))
    pair = result.get("teacher_correct")
    if pair is not None:
        print(f"on the {pair['n']} points the teacher gets right:")
        print(f"  certified agreement       {num(pair['agreement_certified'])}")
        gap = pair["gap_upper"]
        print(
            f"  certified gap bound       median {num(gap['median'])}, q90 {num(gap['q90'])}, "
            f"max {num(gap['max'])}  (f_T^y - f_S^y; 1 is vacuous)"
        )
        shares = ", ".join(f"{num(v)} within {rho}" for rho, v in pair["faithful_certified"].items())
        print(f"  certified faithful share  {shares}")
    print(f"results: {result['output']}")


COMMANDS.add(
    "certify", Command("certified bounds for a model or a teacher-student pair", build, run, DATA_ROOT_RENAMED)
)
