"""``robustkd evaluate``: robust accuracy of a saved model on its dataset's test split."""

from __future__ import annotations

from typing import Any

from robustkd.cli.api import evaluate_checkpoint
from robustkd.cli.inputs import (
    DATA_ROOT_RENAMED,
    add_data_options,
    add_points_option,
    add_progress_option,
    require_checkpoints,
)
from robustkd.cli.output import num, table
from robustkd.cli.parsing import command_parser, names
from robustkd.cli.registries import listed
from robustkd.cli.table import COMMANDS, Command

EXAMPLES = """examples:
  robustkd evaluate --model runs/teacher/best --protocol linf-0.1
  robustkd evaluate --model runs/teacher/best --protocol linf-0.1 --attacks clean,pgd100,cw100,autoattack
  robustkd evaluate --model runs/teacher/best --protocol linf-8/255 --n_examples 1000   # a subset, said so
  robustkd evaluate --config evaluate.yaml --n_examples 100     # evaluate.yaml: {model: ..., attacks: [clean, pgd20]}
  robustkd list protocols; robustkd list attacks
"""


def build(prog: str) -> Any:
    parser = command_parser(
        prog, "Robust accuracy of a saved model on its dataset's test split (full test set by default).", EXAMPLES
    )
    parser.add_argument("--model", required=True, help="checkpoint: runs/<name>/best, a .safetensors file or a run dir")
    parser.add_argument("--protocol", default="linf-0.1", help=f"threat-model preset, one of: {listed('protocols')}")
    parser.add_argument(
        "--attacks",
        type=names,
        default=["clean", "pgd20", "cw20"],
        help=f"attack recipes, comma-separated (a list in a config file), from: {listed('attacks')}",
    )
    add_points_option(parser)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0, help="seeds the attacks' random starts")
    parser.add_argument("--device", default="auto")
    add_data_options(parser)
    parser.add_argument("--out", default=None, help="JSON output; null: eval_<ckpt>_<protocol>.json beside it")
    add_progress_option(parser)
    return parser


def run(ns: Any) -> int:
    require_checkpoints("evaluate", {"--model": ns.model})
    result = evaluate_checkpoint(
        ns.model,
        protocol=ns.protocol,
        attacks=names(ns.attacks),
        n_examples=ns.n_examples,
        batch_size=ns.batch_size,
        seed=ns.seed,
        device=ns.device,
        data_root=ns.data.root,
        dataset=ns.data.dataset,
        out=ns.out,
        progress=ns.progress,  # the bars themselves stay off in a log
    )
    print_robustness(result)
    return 0


def print_robustness(result: dict[str, Any]) -> None:
    settings = result["settings"]
    scope = "a subset of the test set" if settings.get("subset") else "the full test set"
    print(f"{result['model']['path']}: {settings.get('n')} test points ({scope}), protocol {settings['protocol']}")
    rows = [*result["attacks"].items(), ("worst case", result["worst_case"])]
    cells = [(name, num(r["accuracy"], 4), num(r["stderr"], 4), f"{r['correct']} / {r['total']}") for name, r in rows]
    print(table(("attack", "accuracy", "± stderr", "correct / total"), cells))
    print(f"results: {result['output']}")


COMMANDS.add("evaluate", Command("robust accuracy of a saved model", build, run, DATA_ROOT_RENAMED))
