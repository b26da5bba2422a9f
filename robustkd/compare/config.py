"""A comparison's configuration: one frozen protocol applied to methods × seeds (× one ablation axis).

The YAML file (see docs/compare.md)::

    name: fmnist_methods
    out: runs/compare/fmnist_methods
    seeds: [0, 1, 2]
    teacher: {checkpoint: runs/teacher/best}          # or {config: FILE, overrides: {...}, seed: 0}
    protocol: {epochs: 8, data: {...}, model: {...}, optim: {...}, validate: {...}}
    evaluation: {protocol: linf-0.1, attacks: [clean, pgd20, cw20], n_examples: null,
                 autoattack: 1000, certify: {eps: 0.1, method: ibp, n_examples: 1000}}
    methods:
      kd: {config: configs/fmnist/kd.yaml}            # the method section of that file
      kdiga: {method: kdiga, args: {gamma: 3}}
      advfunmatch: {config: ..., exceptions: {optim.warmup_epochs: 1}}   # written in the output
    ablation: {key: data.augment, values: [none, randaugment], methods: [advfunmatch]}
    claims: configs/compare/claims.yaml

Every mistake is a one-line :class:`ConfigError` naming the key and, for a misspelt one, the close matches.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from robustkd.errors import ConfigError

TOP_KEYS = ("name", "out", "seeds", "teacher", "protocol", "evaluation", "methods", "ablation", "claims", "device")
TEACHER_KEYS = ("checkpoint", "config", "overrides", "seed", "label")
METHOD_KEYS = ("config", "method", "args", "exceptions")
ABLATION_KEYS = ("key", "values", "methods")
EVAL_KEYS = ("protocol", "attacks", "n_examples", "batch_size", "seed", "autoattack", "certify", "faithfulness",
             "bootstrap", "confidence")  # fmt: skip
CERTIFY_KEYS = ("eps", "method", "n_examples", "batch_size")
FAITHFUL_KEYS = ("eps", "steps", "restarts", "n_examples", "batch_size")
# Protocol fields are the training config's own; these are set per run by the comparison.
PER_RUN = ("name", "out_dir", "seed", "teacher", "method", "resume")


def check_keys(section: dict[str, Any], accepted: tuple[str, ...], where: str) -> None:
    """Refuse a key not in ``accepted``: one line with the close matches."""
    for key in section:
        if key not in accepted:
            close = difflib.get_close_matches(str(key), accepted, n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else f"; accepted: {', '.join(accepted)}"
            raise ConfigError(f"{where}{key}: unknown key{hint}")


def _mapping(value: Any, where: str, default: dict[str, Any] | None = None) -> dict[str, Any]:
    if value is None and default is not None:
        return dict(default)
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
    return dict(value)


@dataclass(frozen=True)
class Evaluation:
    """What every run is evaluated on: the same test points, attacks and seeds for all."""

    protocol: str = "linf-0.1"
    attacks: tuple[str, ...] = ("clean", "pgd20", "cw20")
    n_examples: int | None = None
    batch_size: int = 256
    seed: int = 0
    autoattack: int | None = None
    certify: dict[str, Any] | None = None
    faithfulness: dict[str, Any] | None = None
    bootstrap: int = 2000
    confidence: float = 0.95

    def key(self) -> dict[str, Any]:
        """The settings an evaluation result must have been made with to be reused."""
        fields = ("protocol", "attacks", "n_examples", "batch_size", "seed", "autoattack", "certify", "faithfulness")
        # As JSON gives it back (lists, not tuples), so a stored record compares equal.
        return json.loads(json.dumps({f: getattr(self, f) for f in fields}))


@dataclass(frozen=True)
class Run:
    """One training run of the comparison: a label (``method`` or ``method[value]``) and a seed."""

    label: str
    seed: int
    config: dict[str, Any]
    exceptions: dict[str, Any] = field(default_factory=dict)
    role: str = "student"

    @property
    def folder(self) -> str:
        return f"{self.label}/seed{self.seed}"

    def key(self) -> str:
        """A digest of the training config (everything that shapes the weights), to tell a reusable run."""
        raw = {k: v for k, v in self.config.items() if k not in ("resume", "progress", "device", "tensorboard")}
        return hashlib.sha256(json.dumps(raw, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class CompareConfig:
    """The validated comparison: the runs to make and how to evaluate and judge them."""

    name: str
    out: Path
    seeds: list[int]
    protocol: dict[str, Any]
    evaluation: Evaluation
    runs: list[Run]
    teacher: Run | None
    teacher_checkpoint: Path | None
    claims: Path | None
    source: str
    device: str = "auto"
    labels: list[str] = field(default_factory=list)
    teacher_label: str = "teacher"


def _read_yaml(path: Path, where: str) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ConfigError(f"{where}: cannot read {path} ({err.strerror or err})") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{where}: {path} is not valid YAML ({str(err).splitlines()[0]})") from None
    return _mapping(data, f"{where} ({path})")


def read_source(config: str | Path | dict[str, Any]) -> tuple[dict[str, Any], str, Path]:
    """(the raw mapping, how to name it in messages, the folder relative paths are read from)."""
    if isinstance(config, dict):
        return dict(config), "compare config", Path.cwd()
    path = Path(config)
    return _read_yaml(path, "compare config"), str(path), Path.cwd()


def set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``a.b.c`` in a nested dict, creating the sections on the way."""
    *parents, leaf = dotted.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: {part} is not a section")
    node[leaf] = copy.deepcopy(value)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def method_section(label: str, spec: dict[str, Any], root: Path) -> dict[str, Any]:
    """The ``method`` section of a run: a config file's, its name replaced or its args merged over as asked."""
    where = f"methods.{label}."
    check_keys(spec, METHOD_KEYS, where)
    section: dict[str, Any] = {"name": label, "args": {}}
    if spec.get("config") is not None:
        section = _mapping(_read_yaml(root / spec["config"], f"{where}config").get("method"), f"{where}config.method")
    if spec.get("method") is not None:
        section["name"] = spec["method"]
    section["args"] = _merge(section.get("args") or {}, _mapping(spec.get("args"), f"{where}args", {}))
    return section


def validate_train_config(raw: dict[str, Any], where: str) -> None:
    """The training config's own checks (unknown keys, values, the method and its options), before any work."""
    from robustkd.config import from_dict, validate
    from robustkd.data.augment import AUGMENTS
    from robustkd.methods import build_method

    try:
        cfg = validate(from_dict({**raw, "teacher": raw.get("teacher") or None}))
        build_method(cfg.method.name, cfg.method.args)
        if cfg.data.augment is not None and cfg.data.augment not in AUGMENTS:  # else found only when training starts
            raise ConfigError(f"data.augment: {AUGMENTS.unknown_message(cfg.data.augment)}")
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    except Exception as err:  # a registry error about a method name is one line too
        raise ConfigError(f"{where}: {str(err).splitlines()[0]}") from None


def _evaluation(raw: Any) -> Evaluation:
    section = _mapping(raw, "evaluation", {})
    check_keys(section, EVAL_KEYS, "evaluation.")
    if "attacks" in section:
        attacks = section["attacks"]
        if isinstance(attacks, str):
            attacks = [a.strip() for a in attacks.split(",") if a.strip()]
        section["attacks"] = tuple(attacks)
    for name, keys in (("certify", CERTIFY_KEYS), ("faithfulness", FAITHFUL_KEYS)):
        if section.get(name) is not None:
            section[name] = _mapping(section[name], f"evaluation.{name}")
            check_keys(section[name], keys, f"evaluation.{name}.")
    ev = Evaluation(**section)
    from robustkd.evaluate.robustness import resolve_attacks, resolve_protocol

    try:
        resolve_protocol(ev.protocol)
        resolve_attacks(list(ev.attacks))
    except ConfigError as err:
        raise ConfigError(f"evaluation.{err}") from None
    _check_numbers(ev)
    if ev.certify is not None:
        _check_certify(ev.certify)
    if ev.faithfulness is not None:
        from robustkd.certify.pair import as_threat

        as_threat(ev.faithfulness.get("eps", 0.1), field="evaluation.faithfulness.eps")  # one radius in [0, 1]
    for key, least in (("steps", 1), ("restarts", 1), ("n_examples", 1), ("batch_size", 1)):
        _integer((ev.faithfulness or {}).get(key), f"evaluation.faithfulness.{key}", least, none_ok=True)
    return ev


def _integer(value: Any, where: str, least: int, none_ok: bool = False) -> None:
    if value is None and none_ok:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ConfigError(f"{where}: must be an integer >= {least}{' or null' if none_ok else ''}, got {value!r}")


def _check_numbers(ev: Evaluation) -> None:
    _integer(ev.n_examples, "evaluation.n_examples", 1, none_ok=True)
    _integer(ev.autoattack, "evaluation.autoattack", 1, none_ok=True)
    _integer(ev.batch_size, "evaluation.batch_size", 1)
    _integer(ev.seed, "evaluation.seed", 0)
    _integer(ev.bootstrap, "evaluation.bootstrap", 100)
    if isinstance(ev.confidence, bool) or not isinstance(ev.confidence, float) or not 0.5 <= ev.confidence < 1:
        raise ConfigError(f"evaluation.confidence: must be a number in [0.5, 1), got {ev.confidence!r}")


def _check_certify(spec: dict[str, Any]) -> None:
    """The verifier's name and the radius, checked before any training rather than after it."""
    from robustkd.certify.bounds import get_verifier
    from robustkd.certify.pair import as_threat
    from robustkd.errors import RegistryError

    try:
        get_verifier(spec.get("method", "ibp"))
        as_threat(spec.get("eps", 0.1), field="evaluation.certify.eps")
    except RegistryError as err:
        raise ConfigError(f"evaluation.certify.method: {str(err).strip(chr(34))}") from None
    _integer(spec.get("n_examples"), "evaluation.certify.n_examples", 1, none_ok=True)
    _integer(spec.get("batch_size", 256), "evaluation.certify.batch_size", 1)


def _protocol(raw: Any) -> dict[str, Any]:
    section = _mapping(raw, "protocol")
    for key in PER_RUN:
        if key in section:
            raise ConfigError(f"protocol.{key}: set per run by the comparison; remove it (methods go under methods:)")
    return section


def _seeds(raw: Any) -> list[int]:
    seeds = [raw] if isinstance(raw, int) and not isinstance(raw, bool) else raw
    integers = isinstance(seeds, list) and all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
    if not seeds or not integers:
        raise ConfigError(f"seeds: expected a list of integers, e.g. [0, 1, 2], got {raw!r}")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds: {seeds} repeats a seed")
    return seeds


def _ablation(raw: Any, methods: list[str]) -> tuple[str, list[Any], list[str]] | None:
    if raw is None:
        return None
    section = _mapping(raw, "ablation")
    check_keys(section, ABLATION_KEYS, "ablation.")
    key, values = section.get("key"), section.get("values")
    if not isinstance(key, str) or not key:
        raise ConfigError("ablation.key: expected a dotted training-config key, e.g. data.augment or method.args.gamma")
    if not isinstance(values, list) or len(values) < 2:
        raise ConfigError(f"ablation.values: expected a list of at least two values, got {values!r}")
    chosen = section.get("methods") or methods
    unknown = [m for m in chosen if m not in methods]
    if unknown:
        raise ConfigError(f"ablation.methods: {', '.join(unknown)} not among methods ({', '.join(methods)})")
    return key, values, list(chosen)


def _student_runs(raw: dict[str, Any], protocol: dict[str, Any], seeds: list[int], root: Path) -> list[Run]:
    methods = _mapping(raw.get("methods"), "methods")
    if not methods:
        raise ConfigError("methods: empty; name at least one method, e.g. {kd: {}}")
    ablation = _ablation(raw.get("ablation"), list(methods))
    runs = []
    for label, spec in methods.items():
        spec = _mapping(spec, f"methods.{label}", {})
        section = method_section(label, spec, root)
        exceptions = _mapping(spec.get("exceptions"), f"methods.{label}.exceptions", {})
        variants: list[tuple[str, Any]] = [(label, None)]
        if ablation is not None and label in ablation[2]:
            variants = [(f"{label}[{value}]", value) for value in ablation[1]]
        for run_label, value in variants:
            base = _merge(protocol, {"method": section})
            for dotted, setting in exceptions.items():
                set_dotted(base, dotted, setting)
            if value is not None:
                set_dotted(base, ablation[0], value)
            runs += [Run(run_label, s, {**base, "seed": s, "name": f"seed{s}"}, exceptions) for s in seeds]
    return runs


def _teacher(raw: Any, root: Path) -> tuple[Run | None, Path | None]:
    if raw is None:
        return None, None
    section = _mapping(raw, "teacher")
    check_keys(section, TEACHER_KEYS, "teacher.")
    label = section.get("label", "teacher")
    if section.get("checkpoint") is not None:
        return None, Path(section["checkpoint"])
    if section.get("config") is None:
        raise ConfigError("teacher: give a checkpoint (teacher.checkpoint) or a training config (teacher.config)")
    base = _read_yaml(root / section["config"], "teacher.config")
    base = _merge(base, _mapping(section.get("overrides"), "teacher.overrides", {}))
    seed = section.get("seed", 0)
    base.update(seed=seed, name=f"seed{seed}")
    base.pop("teacher", None)
    base.pop("out_dir", None)
    return Run(label, seed, base, role="teacher"), None


def load_compare_config(
    config: str | Path | dict[str, Any], *, source: str | None = None, **overrides: Any
) -> CompareConfig:
    """Read and check a comparison; every run's training config is validated before any work."""
    raw, named, root = read_source(config)
    try:
        return _load(raw, source or named, root, overrides)
    except ConfigError as err:
        raise ConfigError(f"{source or named}: {err}") from None


def _load(raw: dict[str, Any], source: str, root: Path, overrides: dict[str, Any]) -> CompareConfig:
    raw.update({k: v for k, v in overrides.items() if v is not None})
    check_keys(raw, TOP_KEYS, "")
    name = str(raw.get("name") or Path(source).stem)
    out = Path(raw.get("out") or f"runs/compare/{name}")
    seeds = _seeds(raw.get("seeds", [0]))
    protocol = _protocol(raw.get("protocol"))
    teacher, checkpoint = _teacher(raw.get("teacher"), root)
    teacher_label = _mapping(raw.get("teacher"), "teacher", {}).get("label", "teacher")
    runs = _student_runs(raw, protocol, seeds, root)
    device = str(raw.get("device") or "auto")
    for run in ([teacher] if teacher else []) + runs:
        fake_teacher = "teacher" if run.role == "student" else None
        validate_train_config({**run.config, "teacher": fake_teacher, "device": device}, f"{run.label} seed {run.seed}")
    claims = raw.get("claims")
    teachers = [teacher_label] if teacher or checkpoint else []
    labels = teachers + list(dict.fromkeys(r.label for r in runs))
    return CompareConfig(
        name, out, seeds, protocol, _evaluation(raw.get("evaluation")), runs, teacher, checkpoint,
        Path(claims) if claims else None, source, device, labels, teacher_label,
    )  # fmt: skip
