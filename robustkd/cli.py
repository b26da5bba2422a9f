"""The ``robustkd`` command: thin over the Python API."""

from __future__ import annotations

import difflib
import json
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

from robustkd.errors import RobustKDError

TRAIN_EXAMPLES = """examples:
  robustkd train --config configs/fmnist/standard.yaml
  robustkd train --config configs/fmnist/standard.yaml --optim.lr 0.05 --epochs 3 --name quick
  robustkd train --config configs/fmnist/standard.yaml --resume true      # continue a killed run
  robustkd train --config configs/fmnist/standard.yaml --print_config     # show the resolved config
"""

DISTILL_EXAMPLES = """examples:
  robustkd distill --config configs/fmnist/kd.yaml --teacher runs/teacher/best
  robustkd distill --config configs/fmnist/kd.yaml --teacher teacher.pt --teacher_arch dm_large
"""


def _train_parser(prog: str, description: str, epilog: str) -> Any:
    from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings

    from robustkd.config import TrainConfig

    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    parser = ArgumentParser(
        prog=prog, description=description, epilog=epilog, formatter_class=_formatter(), exit_on_error=False
    )
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file with any of the options below")
    parser.add_class_arguments(TrainConfig, nested_key=None, fail_untyped=False)
    return parser


def _command_parser(prog: str, description: str, epilog: str) -> Any:
    """An argparse parser for a command that takes no config file; examples are kept as written."""
    import argparse

    return argparse.ArgumentParser(
        prog=prog, description=description, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter
    )


def _formatter() -> Any:
    from jsonargparse import DefaultHelpFormatter

    class Formatter(DefaultHelpFormatter):
        def _fill_text(self, text: str, width: int, indent: str) -> str:  # keep example lines as written
            return "".join(indent + line for line in text.splitlines(keepends=True))

    return Formatter


def _run_train(args: Any, require_teacher: bool) -> int:
    from robustkd.config import from_dict
    from robustkd.engine import train

    raw = args.as_dict() if hasattr(args, "as_dict") else dict(args)
    raw.pop("config", None)
    raw.pop("__path__", None)
    cfg = from_dict(raw)
    if require_teacher and cfg.teacher is None:
        raise RobustKDError("distill needs --teacher PATH (a robustkd checkpoint, or a .pt with --teacher_arch)")
    result = train(cfg)
    print(f"run: {result.run_dir}")
    print(f"best checkpoint: {result.best}")
    subset = f" (subset of {result.test['n']} points)" if result.test.get("subset") else ""
    print(f"test accuracy of the best checkpoint: {result.test['acc']:.4f}{subset}")
    if cfg.tensorboard:
        print(f"logs: tensorboard --logdir {result.run_dir / 'tb'}")
    return 0


EVALUATE_EXAMPLES = """examples:
  robustkd evaluate --model runs/teacher/best --protocol linf-0.1
  robustkd evaluate --model runs/teacher/best --protocol linf-0.1 --attacks clean,pgd100,cw100,autoattack
  robustkd evaluate --model runs/teacher/best --protocol linf-8/255 --n-examples 1000   # a subset, said so
  robustkd list protocols; robustkd list attacks
"""


def _evaluate(argv: list[str]) -> int:
    from robustkd.jobs import evaluate_checkpoint

    parser = _command_parser(
        "robustkd evaluate",
        "Robust accuracy of a saved model on its dataset's test split (full test set by default).",
        EVALUATE_EXAMPLES,
    )
    parser.add_argument("--model", required=True, help="checkpoint: runs/<name>/best, a .safetensors file or a run dir")
    parser.add_argument("--protocol", default="linf-0.1", help="threat-model preset (robustkd list protocols)")
    parser.add_argument("--attacks", default="clean,pgd20,cw20", help="comma-separated recipes (robustkd list attacks)")
    parser.add_argument("--n-examples", type=int, default=None, help="evaluate the first N test points only")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0, help="seeds the attacks' random starts")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--data-root", default=None, help="where the dataset lives (default search paths otherwise)")
    parser.add_argument("--out", default=None, help="JSON output (default: eval_<ckpt>_<protocol>.json beside it)")
    parser.add_argument("--no-progress", action="store_true")
    ns = parser.parse_args(argv)
    result = evaluate_checkpoint(
        ns.model,
        protocol=ns.protocol,
        attacks=[a.strip() for a in ns.attacks.split(",") if a.strip()],
        n_examples=ns.n_examples,
        batch_size=ns.batch_size,
        seed=ns.seed,
        device=ns.device,
        data_root=ns.data_root,
        out=ns.out,
        progress=not ns.no_progress,
    )
    _print_robustness(result)
    return 0


def _print_robustness(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    settings = result["settings"]
    scope = "a subset of the test set" if settings.get("subset") else "the full test set"
    print(f"{result['model']['path']}: {settings.get('n')} test points ({scope}), protocol {settings['protocol']}")
    table = Table()
    for column in ("attack", "accuracy", "± stderr", "correct / total"):
        table.add_column(column, justify="right" if column != "attack" else "left")
    rows = [*result["attacks"].items(), ("worst case", result["worst_case"])]
    for name, row in rows:
        table.add_row(name, f"{row['accuracy']:.4f}", f"{row['stderr']:.4f}", f"{row['correct']} / {row['total']}")
    Console().print(table)
    print(f"results: {result['output']}")


CERTIFY_EXAMPLES = """examples:
  robustkd certify --student runs/kd/best --teacher runs/teacher/best --eps 0.05 --method crown-ibp
  robustkd certify --student runs/teacher/best --eps 0.1 --method ibp        # certified accuracy of one model
  robustkd certify --student runs/kd/best --teacher runs/teacher/best --eps 0.05 --joint --n-examples 1000
"""


def _certify(argv: list[str]) -> int:
    from robustkd.jobs import certify_checkpoints

    parser = _command_parser(
        "robustkd certify",
        (
            "Certified bounds over the Linf eps-ball on the test split: certified accuracy of the student "
            "and, with --teacher, the share of teacher-correct points certified to agree with the teacher "
            "and a certified upper bound on the confidence gap f_T^y - f_S^y."
        ),
        CERTIFY_EXAMPLES,
    )
    parser.add_argument("--student", required=True, help="checkpoint of the model to certify")
    parser.add_argument("--teacher", default=None, help="teacher checkpoint (omit to certify the student alone)")
    parser.add_argument("--eps", type=float, required=True, help="Linf radius, e.g. 0.05")
    parser.add_argument("--method", default="ibp", help="ibp | crown-ibp | best | crown | alpha-crown")
    parser.add_argument("--joint", action="store_true", help="also bound the pair jointly (tighter gap bounds)")
    parser.add_argument("--rho", default="0.05,0.1,0.2", help="gap thresholds for the faithful share")
    parser.add_argument("--n-examples", type=int, default=None, help="the first N test points only")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--out", default=None, help="JSON output (default: cert_<ckpt>_<method>_<eps>.json beside it)")
    parser.add_argument("--no-progress", action="store_true")
    ns = parser.parse_args(argv)
    try:
        rho = tuple(float(v) for v in ns.rho.split(",") if v.strip())
    except ValueError as err:
        raise RobustKDError(f"rho: expected comma-separated numbers, got {ns.rho!r}") from err
    result = certify_checkpoints(
        ns.student,
        ns.teacher,
        eps=ns.eps,
        method=ns.method,
        n_examples=ns.n_examples,
        batch_size=ns.batch_size,
        joint=ns.joint,
        rho=rho,
        device=ns.device,
        data_root=ns.data_root,
        out=ns.out,
        progress=not ns.no_progress,
    )
    scope = "a subset of the test set" if result["subset"] else "the full test set"
    print(f"{result['student_path']}: {result['n']} test points ({scope}), eps {ns.eps}, {ns.method}")
    if ns.teacher is None:
        print(
            f"clean accuracy {_fmt(result['clean_accuracy'])}, certified accuracy {_fmt(result['certified_accuracy'])}"
        )
    else:
        p = result["teacher_correct"]
        print(
            f"teacher certified accuracy {_fmt(result['teacher']['certified_accuracy'])}, "
            f"student certified accuracy {_fmt(result['student']['certified_accuracy'])}"
        )
        print(f"on the {p['n']} teacher-correct points: certified agreement {_fmt(p['agreement_certified'])}")
        print(f"certified gap bound: {json.dumps(p['gap_upper'])}")
    print(f"results: {result['output']}")
    return 0


REPORT_EXAMPLES = """examples:
  robustkd report runs/fmnist_kd runs/fmnist_kdiga --out reports/fmnist
  robustkd report runs/fmnist_kd --eps 0.1 --attacks clean,pgd20,cw20,autoattack --n-examples 2000
  robustkd report runs/cifar_rslad --eps 8/255 --certify-method ibp --max-robust-drop 0.05
  robustkd report runs/fmnist_kd --min-certified-agreement 0.5 --max-gap none --fail-unsafe   # CI gate
"""


def _number_arg(text: str) -> float:
    """A float, or a fraction such as 8/255."""
    import argparse

    try:
        if "/" in text:
            num, den = text.split("/", 1)
            return float(num) / float(den)
        return float(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"expected a number such as 0.1 or 8/255, got {text!r}") from None


def _threshold_arg(text: str) -> float | None:
    return None if text.lower() in ("none", "off") else _number_arg(text)


def _numbers_arg(text: str) -> tuple[float, ...]:
    return tuple(_number_arg(v.strip()) for v in text.split(",") if v.strip())


def _subset_arg(text: str) -> int | None:
    import argparse

    if text.lower() in ("all", "none"):
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of test points or 'all', got {text!r}") from None


def _report(argv: list[str]) -> int:
    from robustkd.report import ReportSettings, Thresholds, make_report

    s, t = ReportSettings(), Thresholds()
    parser = _command_parser(
        "robustkd report",
        (
            "Compare distilled students with their teachers: clean, attacked and certified accuracy, empirical "
            "and certified faithfulness, size and latency, with a verdict per student. Writes report.html "
            "(self-contained), report.md and report.json into --out. Evaluations run through robustkd evaluate "
            "and certify and are cached under each run dir's report_cache/. See docs/report.md."
        ),
        REPORT_EXAMPLES,
    )
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run dirs written by robustkd distill")
    parser.add_argument("--out", default="report", help="folder for the report (default: report)")
    parser.add_argument("--teacher", default=None, help="teacher checkpoint for every run (default: each run's own)")
    parser.add_argument("--checkpoint", default=s.checkpoint, choices=["best", "last"], help="which student checkpoint")
    group = parser.add_argument_group("what is evaluated (cached per value)")
    group.add_argument("--eps", type=_number_arg, default=s.eps, help="stated Linf radius, e.g. 0.1 or 8/255")
    group.add_argument("--eps-sweep", type=_numbers_arg, default=None, help="radii of the plots (default eps/4,eps/2)")
    group.add_argument(
        "--attacks", default=",".join(s.attacks), help="robustkd evaluate recipes (robustkd list attacks)"
    )
    group.add_argument("--n-examples", type=_subset_arg, default=s.n_examples, help="first N test points, or 'all'")
    group.add_argument("--seed", type=int, default=s.seed)
    group.add_argument(
        "--certify-method", default=s.certify_method, help="ibp | crown-ibp | best | crown | alpha-crown"
    )
    group.add_argument(
        "--faith-steps", type=int, default=s.faithfulness_steps, help="steps of each faithfulness search"
    )
    group.add_argument("--faith-restarts", type=int, default=s.faithfulness_restarts, help="restarts of each search")
    group.add_argument("--rho", type=_numbers_arg, default=s.rho, help="gap thresholds recorded by both evaluations")
    group.add_argument("--batch-size", type=int, default=s.batch_size)
    limits = parser.add_argument_group("verdict thresholds ('none' switches one off)")
    limits.add_argument("--max-clean-drop", type=_threshold_arg, default=t.max_clean_drop, help="default %(default)s")
    limits.add_argument("--max-robust-drop", type=_threshold_arg, default=t.max_robust_drop, help="default %(default)s")
    limits.add_argument(
        "--max-disagreement", type=_threshold_arg, default=t.max_disagreement, help="default %(default)s"
    )
    limits.add_argument(
        "--max-gap", type=_threshold_arg, default=t.max_gap, help="on the empirical gap's q90; default %(default)s"
    )
    limits.add_argument(
        "--min-certified-agreement", type=_threshold_arg, default=t.min_certified_agreement, help="default %(default)s"
    )
    limits.add_argument(
        "--max-certified-gap", type=_threshold_arg, default=t.max_certified_gap, help="on its q90; default %(default)s"
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--recompute", action="store_true", help="evaluate again instead of reusing cached results")
    parser.add_argument("--fail-unsafe", action="store_true", help="exit with status 1 when a student is not safe")
    parser.add_argument("--no-progress", action="store_true")
    ns = parser.parse_args(argv)
    settings = ReportSettings(
        eps=ns.eps,
        eps_sweep=ns.eps_sweep,
        attacks=tuple(a.strip() for a in ns.attacks.split(",") if a.strip()),
        n_examples=ns.n_examples,
        seed=ns.seed,
        certify_method=ns.certify_method,
        faithfulness_steps=ns.faith_steps,
        faithfulness_restarts=ns.faith_restarts,
        rho=ns.rho,
        batch_size=ns.batch_size,
        checkpoint=ns.checkpoint,
    )
    thresholds = Thresholds(
        max_clean_drop=ns.max_clean_drop,
        max_robust_drop=ns.max_robust_drop,
        max_disagreement=ns.max_disagreement,
        max_gap=ns.max_gap,
        min_certified_agreement=ns.min_certified_agreement,
        max_certified_gap=ns.max_certified_gap,
    )
    result = make_report(
        ns.runs,
        ns.out,
        settings=settings,
        thresholds=thresholds,
        teacher=ns.teacher,
        device=ns.device,
        data_root=ns.data_root,
        recompute=ns.recompute,
        progress=not ns.no_progress,
    )
    for name, entry in result["summary"].items():
        print(f"{name}: {entry['text']}")
    print(f"report: {result['outputs']['html']} (also {result['outputs']['md']}, {result['outputs']['json']})")
    unsafe = [name for name, entry in result["summary"].items() if not entry["safe"]]
    return 1 if ns.fail_unsafe and unsafe else 0


QUICKSTART_EXAMPLES = """examples:
  robustkd quickstart                              # runs/quickstart, report in runs/quickstart/report/report.html
  robustkd quickstart --out runs/qs --methods kd,faithful
"""


def _quickstart(argv: list[str]) -> int:
    from robustkd.quickstart import STUDENT_METHODS, STUDENTS, Plan, run

    parser = _command_parser(
        "robustkd quickstart",
        (
            "The whole pipeline on Fashion-MNIST, offline and small: an IBP-trained (certifiable) teacher, students "
            "distilled from it, and one report comparing them (clean / PGD-20 / CW-20 accuracy, empirical and "
            "certified relative calibration, a verdict per student). Finished runs are reused and interrupted ones "
            "resume, so running it again is cheap."
        ),
        QUICKSTART_EXAMPLES,
    )
    parser.add_argument("--out", default="runs/quickstart", help="folder for the runs and the report")
    parser.add_argument(
        "--methods",
        default=",".join(STUDENTS),
        help=f"students to distil, comma-separated, from {', '.join(STUDENT_METHODS)} (default: %(default)s)",
    )
    parser.add_argument("--train-subset", type=int, default=Plan.train_subset, help="training images (%(default)s)")
    parser.add_argument("--n-eval", type=int, default=Plan.n_eval, help="test points evaluated (%(default)s)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    ns = parser.parse_args(argv)
    methods = [m.strip() for m in ns.methods.split(",") if m.strip()]
    plan = Plan(train_subset=ns.train_subset, n_eval=ns.n_eval)
    result = run(ns.out, methods=methods, plan=plan, progress=not ns.no_progress, device=ns.device)
    print(_quickstart_table(result["models"]))
    for name, entry in result["summary"].items():
        print(f"{name}: {entry['text']}")
    print(f"report: {result['outputs']['html']}")
    print(f"tensorboard --logdir {ns.out}")
    print(f"quickstart: {result['seconds']['total']:.0f} s")
    return 0


def _quickstart_table(rows: list[dict[str, Any]]) -> str:
    def cell(value: Any) -> str:
        return "–" if value is None else f"{value:.3f}"

    lines = [f"{'model':<12} {'clean':>6} {'robust':>6} {'disagree':>8} {'cert.agree':>10}"]
    for row in rows:
        lines.append(
            f"{row['name']:<12} {cell(row.get('clean')):>6} {cell(row.get('robust')):>6} "
            f"{cell(row.get('disagreement')):>8} {cell(row.get('certified_agreement')):>10}"
        )
    return "\n".join(lines)


EXPORT_EXAMPLES = """examples:
  robustkd export runs/fmnist_kd/best --onnx student.onnx
  robustkd export runs/fmnist_kd/best --onnx student.onnx --teacher runs/fmnist_teacher_pgd_at/best
  robustkd export runs/fmnist_kd/best --onnx student.onnx --test-subset 1000 --exporter legacy
"""


def _export_command(argv: list[str]) -> int:
    from robustkd.export import CALIBRATION_TOLERANCE, EXPORTERS, LOGIT_TOLERANCE
    from robustkd.jobs import export_onnx

    parser = _command_parser(
        "robustkd export",
        (
            "Export a checkpoint to ONNX, run the graph with onnxruntime on the test set and check it against "
            "the PyTorch model (same predictions, largest logit difference); with --teacher, also that the "
            "relative-calibration metrics against the teacher are unchanged. The result goes to "
            "<name>.export.json beside the .onnx and to export_<ckpt>.json in the run dir (shown by robustkd "
            "report). Exit status 1 when the check fails."
        ),
        EXPORT_EXAMPLES,
    )
    parser.add_argument("checkpoint", metavar="CKPT", help="checkpoint: runs/<name>/best, a .safetensors or a run dir")
    parser.add_argument("--onnx", required=True, help="output file, e.g. student.onnx")
    parser.add_argument("--teacher", default=None, help="teacher checkpoint for the relative-calibration check")
    parser.add_argument("--test-subset", type=_subset_arg, default=None, help="first N test points (default: all)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--exporter", default="auto", choices=EXPORTERS, help="torch.onnx exporter (default: auto)")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default: 18 dynamo, 17 legacy)")
    parser.add_argument("--logit-tolerance", type=float, default=LOGIT_TOLERANCE)
    parser.add_argument("--calibration-tolerance", type=float, default=CALIBRATION_TOLERANCE)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--no-progress", action="store_true")
    ns = parser.parse_args(argv)
    result = export_onnx(
        ns.checkpoint,
        ns.onnx,
        teacher=ns.teacher,
        n_examples=ns.test_subset,
        batch_size=ns.batch_size,
        exporter=ns.exporter,
        opset=ns.opset,
        logit_tolerance=ns.logit_tolerance,
        calibration_tolerance=ns.calibration_tolerance,
        data_root=ns.data_root,
        progress=not ns.no_progress,
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


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _list(what: str, pattern: str) -> int:
    registries = _registries()
    if what not in registries:
        raise RobustKDError(f"robustkd list: unknown kind {what!r}; choose from {', '.join(registries)}")
    for name in registries[what]().names(pattern):
        print(name)
    return 0


def _registries() -> dict[str, Callable[[], Any]]:
    def models() -> Any:
        from robustkd.models import MODELS

        return MODELS

    def datasets() -> Any:
        from robustkd.data import DATASETS

        return DATASETS

    def methods() -> Any:
        from robustkd.methods import METHODS

        return METHODS

    def augments() -> Any:
        from robustkd.data import AUGMENTS

        return AUGMENTS

    def attacks() -> Any:
        from robustkd.attacks import ATTACKS

        return ATTACKS

    def protocols() -> Any:
        from robustkd.attacks import PRESETS

        return PRESETS

    def verifiers() -> Any:
        from robustkd.certify import VERIFIERS

        return VERIFIERS

    def objectives() -> Any:
        from robustkd.attacks import OBJECTIVES

        return OBJECTIVES

    return {
        "models": models,
        "datasets": datasets,
        "methods": methods,
        "augments": augments,
        "attacks": attacks,
        "protocols": protocols,
        "objectives": objectives,
        "verifiers": verifiers,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; expected failures print one line and exit 2, never a traceback."""
    import argparse

    argv = list(sys.argv[1:] if argv is None else argv)
    top = argparse.ArgumentParser(
        prog="robustkd",
        description="Knowledge distillation that keeps adversarial robustness and stays faithful to the teacher.",
        epilog="Run 'robustkd COMMAND --help' for a command's options and examples.",
    )
    top.add_argument(
        "command",
        choices=["quickstart", "train", "distill", "evaluate", "certify", "report", "export", "list"],
        help="what to do",
    )
    if not argv or argv[0] in ("-h", "--help"):
        top.print_help()
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    try:
        if command == "train":
            parser = _train_parser(
                "robustkd train",
                "Train a model (e.g. a robust teacher) with one of the methods.",
                TRAIN_EXAMPLES,
            )
            return _run_train(_parse(parser, rest), require_teacher=False)
        if command == "distill":
            parser = _train_parser(
                "robustkd distill",
                "Distil a teacher into a student with one of the methods.",
                DISTILL_EXAMPLES,
            )
            parser.set_defaults({"method.name": "kd"})
            return _run_train(_parse(parser, rest), require_teacher=True)
        if command == "quickstart":
            return _quickstart(rest)
        if command == "evaluate":
            return _evaluate(rest)
        if command == "certify":
            return _certify(rest)
        if command == "report":
            return _report(rest)
        if command == "export":
            return _export_command(rest)
        if command == "list":
            lister = argparse.ArgumentParser(prog="robustkd list", description="List registered names.")
            lister.add_argument("what", choices=sorted(_registries()))
            lister.add_argument("pattern", nargs="?", default="*", help="wildcard filter, e.g. 'resnet*'")
            ns = lister.parse_args(rest)
            return _list(ns.what, ns.pattern)
        top.print_usage(sys.stderr)
        print(f"robustkd: unknown command {command!r}", file=sys.stderr)
        return 2
    except RobustKDError as err:
        print(f"robustkd {command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"robustkd {command}: interrupted; continue with --resume true", file=sys.stderr)
        return 130


def _parse(parser: Any, argv: list[str]) -> Any:
    from jsonargparse import ArgumentError

    from robustkd.errors import ConfigError

    try:
        return parser.parse_args(argv)
    except ArgumentError as err:
        message = str(err)
        unknown = re.findall(r"--([\w.]+)", message) if "unrecognized arguments" in message else []
        known = [o.lstrip("-") for a in parser._actions for o in a.option_strings]
        for name in unknown:
            close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
            if close:
                message += f"; did you mean {', '.join('--' + c for c in close)}?"
        raise ConfigError(message) from err


if __name__ == "__main__":
    raise SystemExit(main())
