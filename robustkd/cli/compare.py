"""``robustkd compare``: methods × seeds under one frozen protocol, intervals, paired tests, claim verdicts."""

from __future__ import annotations

from typing import Any

from robustkd.cli.inputs import add_progress_option
from robustkd.cli.parsing import command_parser
from robustkd.cli.table import COMMANDS, Command

EXAMPLES = """examples:
  robustkd compare --config configs/compare/fmnist_methods.yaml --workers 2
  robustkd compare --config configs/compare/tiny.yaml --out runs/compare/tiny_again
  robustkd compare --config configs/compare/fmnist_faithful.yaml --seeds [0,1] --device cpu

The file's keys (every option below is one): name, out, seeds, teacher {checkpoint | config, overrides, seed},
protocol (a training config without name/seed/method: epochs, data, model, optim, validate), evaluation
{protocol, attacks, n_examples, autoattack, certify {eps, method}, faithfulness {eps, steps, restarts}, bootstrap,
confidence},
methods {LABEL: {config, method, args, exceptions}}, ablation {key, values, methods}, claims (a claims file).
Runs go to OUT/runs/LABEL/seedK; finished ones are reused, killed ones resume. See docs/compare.md.
"""

DESCRIPTION = (
    "Train and evaluate a list of methods × seeds (optionally × one ablation axis) under one frozen protocol, "
    "then write a leaderboard with intervals (Wilson per run, bootstrap over seeds and test points), paired "
    "comparisons (bootstrap and McNemar, Holm-corrected) and a verdict per claim of the claims file: "
    "reproduced, within noise, contradicted or not run. Writes leaderboard.md/.html/.json, claims.md, "
    "pareto.png and results_fragment.md into OUT."
)

SECTIONS = {
    "teacher": "{checkpoint: PATH} or {config: FILE, overrides: {...}, seed: 0}: the teacher every student learns from",
    "protocol": "the frozen training settings every run shares: epochs, data, model, optim, validate",
    "evaluation": "{protocol, attacks, n_examples, autoattack, certify, faithfulness, bootstrap, confidence}",
    "methods": "LABEL: {config: FILE (its method section), method: NAME, args: {...}, exceptions: {dotted.key: v}}",
    "ablation": "{key: dotted training-config key, values: [...], methods: [LABEL, ...]}; null: none",
}


def build(prog: str) -> Any:
    parser = command_parser(prog, DESCRIPTION, EXAMPLES)
    parser.add_argument("--name", default=None, help="the comparison's name; null: the config file's stem")
    parser.add_argument("--out", default=None, help="folder for the runs and outputs; null: runs/compare/NAME")
    parser.add_argument("--seeds", type=list[int] | None, default=None, help="seeds of every method, e.g. [0,1,2]")
    for key, text in SECTIONS.items():
        parser.add_argument(f"--{key}", type=dict | None, default=None, help=text)
    parser.add_argument("--claims", default=None, help="claims file, e.g. configs/compare/claims.yaml; null: none")
    parser.add_argument("--workers", type=int, default=1, help="runs trained at once, each in its own process")
    parser.add_argument("--device", default=None, help="device of every run (auto, cpu, cuda); null: auto")
    add_progress_option(parser)
    return parser


KEYS = ("name", "seeds", "claims", *SECTIONS)


def run(ns: Any) -> int:
    from robustkd.compare import compare

    config = {key: ns[key] for key in KEYS if ns[key] is not None}
    files = [str(f) for f in (ns.get("config") or []) if f is not None]
    source = files[-1] if files else None
    out = compare(config, workers=ns.workers, out=ns.out, device=ns.device, progress=ns.progress, source=source)
    print(f"leaderboard: {out / 'leaderboard.md'}")
    return 0


COMMANDS.add("compare", Command("methods × seeds under one protocol, intervals, claim verdicts", build, run))
