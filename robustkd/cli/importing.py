"""``robustkd import``: a foreign checkpoint (RobustBench, TRADES, ARD, RSLAD) to a robustkd checkpoint."""

from __future__ import annotations

from typing import Any

from robustkd.cli.inputs import DATA_ROOT_RENAMED
from robustkd.cli.parsing import command_parser
from robustkd.cli.registries import listed
from robustkd.cli.table import COMMANDS, Command

EXAMPLES = """examples:
  robustkd import Zhang2019Theoretically.pt --dataset cifar10 --out_dir teachers/zhang2019
  robustkd import model_cifar_wrn.pt --arch wrn --arch_args '{"depth": 34, "width": 10}' --dataset cifar10 \\
      --out_dir teachers/trades
  robustkd import Wong2020Fast.pt --dataset cifar10 --out_dir teachers/wong2020 \\
      --mean '[0.4914, 0.4822, 0.4465]' --std '[0.2471, 0.2435, 0.2616]'
  robustkd import epoch=199.t7 --dataset cifar10 --out_dir teachers/ard_resnet18 --card false
"""

DESCRIPTION = (
    "Import a checkpoint saved by another project's code (RobustBench's WideResNet and PreActResNet-18, TRADES' "
    "WRN-34-10, the ResNet-18 and MobileNetV2 of ARD and RSLAD) as DIR/best.safetensors + DIR/best.json, for "
    "images in [0, 1]. The file is read with weights_only=True; its format, architecture and arguments (depth, "
    "width, variant) are recognised from key names and tensor shapes and printed; with --arch they are checked. "
    "Files without their own mean/std (RobustBench's Wong2020Fast and Rice2020Overfitting) need --mean/--std. "
    "With --card true (the default) the teacher card is written beside the checkpoint. See docs/import.md."
)


def build(prog: str) -> Any:
    parser = command_parser(prog, DESCRIPTION, EXAMPLES)
    parser.add_argument("src", metavar="SRC", help="the foreign checkpoint (.pt, .pth, .t7, ...)")
    parser.add_argument("--arch", default=None, help=f"check the file against this architecture: {listed('models')}")
    parser.add_argument("--arch_args", type=dict[str, Any], default=None, help='options as JSON: {"depth": 34}')
    parser.add_argument("--dataset", required=True, help=f"the data the model was trained on: {listed('datasets')}")
    parser.add_argument("--out_dir", required=True, help="where best.safetensors and best.json go")
    parser.add_argument(
        "--mean", type=list[float], default=None, help="per-channel mean, JSON, e.g. [0.4914, 0.4822, 0.4465]"
    )
    parser.add_argument(
        "--std", type=list[float], default=None, help="per-channel std, JSON, e.g. [0.2471, 0.2435, 0.2616]"
    )
    parser.add_argument("--card", type=bool, default=True, help="write the teacher card (false: skip it)")
    parser.add_argument(
        "--data.root", default=None, help="where the dataset lives, for the card; null: the default search paths"
    )
    return parser


def run(ns: Any) -> int:
    from robustkd.jobs import describe_import, import_model

    # The card comes after the summary: it takes minutes for a large teacher, what was recognised does not.
    checkpoint = import_model(
        ns.src, ns.arch, arch_args=ns.arch_args, dataset=ns.dataset, out_dir=ns.out_dir, mean=ns.mean, std=ns.std,
        card=False,
    )  # fmt: skip
    source = describe_import(checkpoint)
    print(f"{ns.src}: {source.get('recognised', '')}")
    if source.get("normalisation") == "none":
        print(
            "no mean/std in the file and none given: the model uses images in [0, 1] as they are (right for TRADES, "
            "Carmon2019Unlabeled, Zhang2019Theoretically, ARD and RSLAD; RobustBench's Wong2020Fast and "
            "Rice2020Overfitting need --mean '[0.4914, 0.4822, 0.4465]' --std '[0.2471, 0.2435, 0.2616]')"
        )
    print(f"wrote {checkpoint}.safetensors and .json; load it with robustkd.load_model({str(checkpoint)!r})")
    if ns.card:  # both card modules load only here: they bring the attacks and AutoAttack
        from robustkd.cli.card import render_card
        from robustkd.jobs.card import make_card

        card = make_card(checkpoint, dataset=ns.dataset, data_root=ns.data.root)
        print(render_card(card))
        print(f"teacher card: {card['output']}")
    return 0


COMMANDS.add(
    "import",
    Command("a foreign checkpoint (RobustBench, TRADES, ARD, RSLAD) to robustkd", build, run, DATA_ROOT_RENAMED),
)
