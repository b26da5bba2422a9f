"""``robustkd train`` and ``robustkd distill``: one training run from a config file and dotted overrides."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from robustkd.cli.configfile import locate
from robustkd.cli.parsing import command_parser
from robustkd.cli.registries import listed
from robustkd.cli.table import COMMANDS, RESUME, Command
from robustkd.errors import ConfigError, RobustKDError

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

# options whose values are registered names: their help ends with the names, read from the registry
NAMED_OPTIONS = {
    "data.dataset": "datasets",
    "data.augment": "augments",
    "model.arch": "models",
    "method.name": "methods",
    "validate.attack": "attacks",
    "validate.protocol": "protocols",
}


def _train_parser(prog: str, description: str, epilog: str, named: bool = False) -> Any:
    """The parser of a training run: every field of TrainConfig, nested keys spelled ``--optim.lr``.

    ``named`` appends the registered names to the help of the options that take one (imports the registries)."""
    from jsonargparse import set_parsing_settings

    from robustkd.config import TrainConfig

    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    parser = command_parser(prog, description, epilog)
    parser.add_class_arguments(TrainConfig, nested_key=None, fail_untyped=False)
    if named:
        for action in parser._actions:
            kind = NAMED_OPTIONS.get(action.dest)
            if kind:
                action.help = f"{action.help} One of: {listed(kind)}."
    return parser


def build_train(prog: str) -> Any:
    return _train_parser(prog, "Train a model (e.g. a robust teacher) with one of the methods.", TRAIN_EXAMPLES, True)


def build_distill(prog: str) -> Any:
    parser = _train_parser(prog, "Distil a teacher into a student with one of the methods.", DISTILL_EXAMPLES, True)
    parser.set_defaults({"method.name": "kd"})
    return parser


def _run(args: Any, require_teacher: bool) -> int:
    from robustkd.config import from_dict
    from robustkd.engine import train

    raw = args.as_dict() if hasattr(args, "as_dict") else dict(args)
    files = [str(path) for path in raw.pop("config", None) or []]
    raw.pop("__path__", None)
    if isinstance(raw.get("method"), dict) and isinstance(raw["method"].get("args"), dict):
        raw["method"]["args"] = _method_args(files, raw["method"]["args"])
    try:
        cfg = from_dict(raw)
        if require_teacher and cfg.teacher is None:
            raise RobustKDError("distill needs --teacher PATH (a robustkd checkpoint, or a .pt with --teacher_arch)")
        result = train(cfg)
    except ConfigError as err:  # a value from a config file: name the file and line (method.args.stepz: ...)
        located = locate(str(err), files, raw)
        if located == str(err):
            raise
        raise ConfigError(located) from err
    print(f"run: {result.run_dir}")
    print(f"best checkpoint: {result.best}")
    subset = f" (subset of {result.test['n']} points)" if result.test.get("subset") else ""
    print(f"test accuracy of the best checkpoint: {result.test['acc']:.4f}{subset}")
    if cfg.tensorboard:
        print(f"logs: tensorboard --logdir {result.run_dir / 'tb'}")
    return 0


def _method_args(files: list[str], args: dict[str, Any]) -> dict[str, Any]:
    """``method.args`` with ``--method.args.threat.eps 0.05`` changing one field of the file's mapping.

    The parser replaces a nested mapping by the command line's keys alone (the file's ``step_size`` and
    ``steps`` would fall back to the method's defaults) and hands their values over as text; here the files'
    mappings fill the keys the command line left out, and text values are read as YAML scalars."""
    import yaml

    merged: dict[str, Any] = {}
    for path in files:  # read and checked by the parser already
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        file_args = (data.get("method") or {}).get("args") if isinstance(data.get("method"), dict) else None
        merged = _deep_merge(merged, file_args if isinstance(file_args, dict) else {})
    return _deep_merge(merged, _scalars(args))


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _deep_merge(out[key], value) if both else value
    return out


def _scalars(value: Any) -> Any:
    import yaml

    if isinstance(value, dict):
        return {key: _scalars(item) for key, item in value.items()}
    if isinstance(value, str):
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            return value
        return parsed if isinstance(parsed, int | float | bool) or parsed is None else value
    return value


def run_train(args: Any) -> int:
    return _run(args, require_teacher=False)


def run_distill(args: Any) -> int:
    return _run(args, require_teacher=True)


COMMANDS.add(
    "train",
    Command(
        "train a model (e.g. a robust teacher) with one of the methods", build_train, run_train, on_interrupt=RESUME
    ),
)
COMMANDS.add("distill", Command("distil a teacher into a student", build_distill, run_distill, on_interrupt=RESUME))
