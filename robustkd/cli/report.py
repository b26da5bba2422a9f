"""``robustkd report``: students against their teachers, a verdict per student, HTML + Markdown + JSON."""

from __future__ import annotations

from typing import Any

from robustkd.cli.inputs import DATA_ROOT_RENAMED, add_points_option, add_progress_option, require_checkpoints
from robustkd.cli.parsing import command_parser, names, number, numbers, threshold
from robustkd.cli.registries import listed
from robustkd.cli.table import COMMANDS, Command

EXAMPLES = """examples:
  robustkd report runs/fmnist_kd runs/fmnist_kdiga --out reports/fmnist
  robustkd report runs/fmnist_kd --eps 0.1 --attacks clean,pgd20,cw20,autoattack --n_examples 2000
  robustkd report runs/cifar_rslad --eps 8/255 --certify_method ibp --max_robust_drop 0.05
  robustkd report runs/fmnist_kd --min_certified_agreement 0.5 --max_gap none --fail_unsafe   # CI gate
  robustkd report --config report.yaml --out reports/x    # report.yaml: {runs: [runs/fmnist_kd], eps: 0.1}
"""

DESCRIPTION = (
    "Compare distilled students with their teachers: clean, attacked and certified accuracy, empirical "
    "and certified faithfulness, size and latency, with a verdict per student. Writes report.html "
    "(self-contained), report.md and report.json into --out. Evaluations run through robustkd evaluate "
    "and certify and are cached under each run dir's report_cache/. See docs/report.md."
)


# verdict threshold → its help; the default comes from Thresholds
THRESHOLDS = {
    "max_clean_drop": "teacher minus student clean accuracy",
    "max_robust_drop": "teacher minus student worst-case accuracy at eps",
    "max_disagreement": "empirical disagreement rate on the teacher-correct points",
    "max_gap": "on the empirical gap's q90",
    "min_certified_agreement": "certified agreement on the teacher-correct points",
    "max_certified_gap": "on the certified gap bound's q90",
}


def build(prog: str) -> Any:
    from robustkd.report import ReportSettings, Thresholds

    s, t = ReportSettings(), Thresholds()
    parser = command_parser(prog, DESCRIPTION, EXAMPLES)
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run dirs written by robustkd distill")
    parser.add_argument("--out", default="report", help="folder for the report")
    parser.add_argument("--teacher", default=None, help="teacher checkpoint for every run; null: each run's own")
    parser.add_argument("--checkpoint", default=s.checkpoint, choices=["best", "last"], help="which student checkpoint")
    _evaluated(parser.add_argument_group("what is evaluated (cached per value)"), s)
    limits = parser.add_argument_group("verdict thresholds ('none' switches one off)")
    for name, text in THRESHOLDS.items():
        limits.add_argument(f"--{name}", type=threshold, default=getattr(t, name), help=text)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--data.root", default=None, help="where the datasets live; null: the default search paths")
    parser.add_argument("--recompute", action="store_true", help="evaluate again instead of reusing cached results")
    parser.add_argument("--fail_unsafe", action="store_true", help="exit with status 1 when a student is not safe")
    add_progress_option(parser)
    return parser


def _evaluated(group: Any, s: Any) -> None:
    group.add_argument("--eps", type=number, default=s.eps, help="stated Linf radius, e.g. 0.1 or 8/255")
    group.add_argument("--eps_sweep", type=numbers, default=None, help="radii of the plots; null: eps/4,eps/2")
    group.add_argument(
        "--attacks", type=names, default=list(s.attacks), help=f"robustkd evaluate recipes, from: {listed('attacks')}"
    )
    add_points_option(group, s.n_examples)
    group.add_argument("--seed", type=int, default=s.seed)
    group.add_argument("--certify_method", default=s.certify_method, help=f"verifier, one of: {listed('verifiers')}")
    group.add_argument("--faith_steps", type=int, default=s.faithfulness_steps, help="steps of each search")
    group.add_argument("--faith_restarts", type=int, default=s.faithfulness_restarts, help="restarts of each search")
    group.add_argument("--rho", type=numbers, default=s.rho, help="gap thresholds recorded by both evaluations")
    group.add_argument("--batch_size", type=int, default=s.batch_size)


def run(ns: Any) -> int:
    from robustkd.report import ReportSettings, Thresholds, make_report

    require_checkpoints("report", {"--teacher": ns.teacher})
    settings = ReportSettings(
        eps=ns.eps,
        eps_sweep=None if ns.eps_sweep is None else tuple(ns.eps_sweep),
        attacks=tuple(names(ns.attacks)),
        n_examples=ns.n_examples,
        seed=ns.seed,
        certify_method=ns.certify_method,
        faithfulness_steps=ns.faith_steps,
        faithfulness_restarts=ns.faith_restarts,
        rho=tuple(ns.rho),
        batch_size=ns.batch_size,
        checkpoint=ns.checkpoint,
    )
    thresholds = Thresholds(**{name: ns[name] for name in THRESHOLDS})
    result = make_report(
        ns.runs,
        ns.out,
        settings=settings,
        thresholds=thresholds,
        teacher=ns.teacher,
        device=ns.device,
        data_root=ns.data.root,
        recompute=ns.recompute,
        progress=ns.progress,
    )
    for name, entry in result["summary"].items():
        print(f"{name}: {entry['text']}")
    print(f"report: {result['outputs']['html']} (also {result['outputs']['md']}, {result['outputs']['json']})")
    unsafe = [name for name, entry in result["summary"].items() if not entry["safe"]]
    return 1 if ns.fail_unsafe and unsafe else 0


COMMANDS.add("report", Command("students against their teachers, a verdict per student", build, run, DATA_ROOT_RENAMED))
