"""``robustkd card``: a teacher checkpoint's card (accuracy under attack, certificates, size, latency, hash)."""

from __future__ import annotations

from typing import Any

from robustkd.cli.inputs import DATA_ROOT_RENAMED, add_points_option, add_progress_option, require_checkpoints
from robustkd.cli.output import num, table
from robustkd.cli.parsing import command_parser, number
from robustkd.cli.registries import listed
from robustkd.cli.table import COMMANDS, Command

EXAMPLES = """examples:
  robustkd card runs/teacher/best                       # writes runs/teacher/best.card.json
  robustkd card runs/imported/wrn_34_10/best --n_examples 1000 --n_autoattack 200 --device cuda
  robustkd card runs/teacher/best --eps 0.05 --n_examples all
"""

DESCRIPTION = (
    "What a teacher is worth, in one JSON file beside it (<name>.card.json): clean, PGD-20 and CW-20 accuracy on "
    "the first --n_examples test points, AutoAttack on the first --n_autoattack, IBP and CROWN-IBP certified "
    "accuracy at the radius (skipped, with the reason, for an architecture no bound handles), the parameter "
    "count, the latency at batch 1 and 128 and the weights' SHA-256. The protocol is the dataset's usual one "
    "unless --eps says otherwise."
)


def build(prog: str) -> Any:
    from robustkd.jobs.card import BATCH_SIZE, N_AUTOATTACK, N_EXAMPLES

    parser = command_parser(prog, DESCRIPTION, EXAMPLES)
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="runs/<name>/best, a .safetensors file or a run dir")
    parser.add_argument(
        "--dataset", default=None, help=f"null: the one the checkpoint names. One of: {listed('datasets')}"
    )
    parser.add_argument("--eps", type=_eps, default=None, help="radius (0.1, 8/255) or protocol; null: the dataset's")
    add_points_option(parser, N_EXAMPLES)
    parser.add_argument("--n_autoattack", type=int, default=N_AUTOATTACK, help="first N test points of AutoAttack")
    parser.add_argument("--batch_size", type=int, default=BATCH_SIZE)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--data.root", default=None, help="where the dataset lives; null: the default search paths")
    parser.add_argument("--out", default=None, help="the card's JSON; null: <checkpoint>.card.json beside it")
    add_progress_option(parser)
    return parser


def _eps(value: Any) -> float | str | None:
    """A radius (a number or a fraction such as 8/255) or a protocol name such as linf-8/255."""
    if value is None or str(value).lower() in ("none", "null"):
        return None
    try:
        return number(value)
    except ValueError:
        return str(value)


def run(ns: Any) -> int:
    from robustkd.jobs.card import make_card

    require_checkpoints("card", {"CHECKPOINT": ns.checkpoint})
    card = make_card(
        ns.checkpoint,
        dataset=ns.dataset,
        data_root=ns.data.root,
        device=ns.device,
        progress=ns.progress,
        n_examples=ns.n_examples,
        n_autoattack=ns.n_autoattack,
        eps=ns.eps,
        batch_size=ns.batch_size,
        out=ns.out,
    )
    print(render_card(card))
    print(f"card: {card['output']}")
    return 0


def render_card(card: dict[str, Any]) -> str:
    """The card as aligned text: what the model is, then one row per number with the points it was measured on."""
    p, lat = card["protocol"], card["latency"]
    lines = [
        f"{card['checkpoint']}: {card['arch']} on {card['dataset']}, {card['params']:,} parameters",
        f"  weights sha256 {card['weights_sha256']}",
        f"  protocol {p['name']} ({p['norm']}, eps {p['eps']:.4g})",
        f"  latency on {lat['device']}: {lat['batch_1_ms']:.2f} ms at batch 1, {lat['batch_128_ms']:.2f} ms at "
        f"batch 128 ({lat['statistic']})",
    ]
    rows = []
    robustness = card["robustness"]
    for name, block in robustness["attacks"].items():
        rows.append((name, num(block["accuracy"], 4), _points(robustness)))
    for name, block in [("autoattack", card["autoattack"]), *card["certified"].items()]:
        label = name if name == "autoattack" else f"certified ({name})"
        rows.append((label, "skipped", block["skipped"]) if "skipped" in block else
                    (label, num(block["accuracy"], 4), _points(block)))  # fmt: skip
    return "\n".join([*lines, table(("accuracy", "value", "test points"), rows)])


def _points(block: dict[str, Any]) -> str:
    return f"first {block['n']} (a subset)" if block.get("subset") else f"all {block['n']}"


COMMANDS.add("card", Command("a teacher's card: accuracy, certificates, size, latency", build, run, DATA_ROOT_RENAMED))
