"""Run configuration: plain dataclasses, filled from YAML + ``--dotted.key value`` by the CLI."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import math
import numbers
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from robustkd.attacks import PRESETS, ThreatModel, get_attack
from robustkd.certify import get_verifier
from robustkd.errors import ConfigError, RobustKDError


@dataclass
class DataConfig:
    """Dataset, split and batching."""

    dataset: str = "fashion-mnist"
    """Registered dataset name (robustkd list datasets)."""
    root: str | None = None
    """Folder or archive holding the dataset; default: $ROBUSTKD_DATA, then the system's dataset folders."""
    val_fraction: float = 0.1
    """Carved from the training set, stratified; checkpoints are chosen on it."""
    train_subset: int | None = None
    """Stratified subset of the remaining training set, for quick runs."""
    test_subset: int | None = None
    """Stratified subset of N test points, for quick looks (reported as a subset)."""
    augment: str | None = None
    """Batch augmentation (robustkd list augments); null: the dataset's default (none: MNIST-like, crop_flip: CIFAR)."""
    batch_size: int = 128
    """Training batch size."""
    eval_batch_size: int = 512
    """Batch size for validation and test evaluation."""


@dataclass
class ModelConfig:
    """Student (or trained model) architecture."""

    arch: str = "small_cnn"
    """Registered architecture (robustkd list models)."""
    args: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the architecture, e.g. {width: 2}."""
    init: str | None = None
    """Start from these weights (a robustkd checkpoint), e.g. pre-trained."""


@dataclass
class MethodConfig:
    """Training method and its options (see ``robustkd list methods``)."""

    name: str = "standard"
    """Registered method (robustkd list methods)."""
    args: dict[str, Any] = field(default_factory=dict)
    """The method's options, e.g. {temperature: 4.0, alpha: 0.9}; unknown names are refused."""


@dataclass
class OptimConfig:
    """Optimiser and learning-rate schedule."""

    name: str = "sgd"
    """sgd | adam | adamw."""
    lr: float = 0.05
    """Peak learning rate."""
    momentum: float = 0.9
    """SGD momentum."""
    nesterov: bool = False
    """Nesterov momentum for SGD."""
    weight_decay: float = 5e-4
    """L2 weight decay (decoupled for adamw)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam(W) betas."""
    schedule: str = "cosine"
    """constant | cosine | multistep (decay by gamma at each milestone epoch)."""
    milestones: list[float] = field(default_factory=list)
    """Epochs, for multistep."""
    gamma: float = 0.1
    """Multistep decay factor."""
    warmup_epochs: float = 0.0
    """Linear warm-up length in epochs (may be fractional)."""
    grad_clip: float | None = None
    """Max global gradient norm."""


@dataclass
class ValidateConfig:
    """Per-epoch validation; the best checkpoint maximises ``select``."""

    attack: str | None = None
    """E.g. 'pgd10': also measure robust accuracy on the validation split."""
    protocol: ThreatModel | str | None = None
    """Threat model for that attack (and certify): a preset name such as 'linf-0.1' (robustkd list protocols) or a
    mapping of its fields ({norm: linf, eps: 0.1, steps: 40}); read into a ThreatModel when the config is loaded."""
    certify: str | None = None
    """E.g. 'ibp': also measure certified accuracy on the validation split at the protocol's eps (ibp | crown-ibp
    | best); for certified training, whose clean accuracy peaks before the eps ramp."""
    select: str = "auto"
    """auto (certified accuracy when certify is set, else robust when an attack is set, else clean) | clean |
    robust | certified | last (the latest epoch)."""
    max_examples: int | None = None
    """Cap the validation points attacked each epoch (cost)."""


@dataclass
class TrainConfig:
    """Everything one training or distillation run needs."""

    name: str = "run"
    """Run name: outputs go to <out_dir>/<name>/."""
    out_dir: str = "runs"
    """Folder holding the runs."""
    seed: int = 0
    """Seeds every generator (data order, augmentation, attack starts, initialisation)."""
    device: str = "auto"
    """auto (CUDA when present) | cpu | cuda | cuda:N."""
    epochs: int = 10
    """Training epochs."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    validate: ValidateConfig = field(default_factory=ValidateConfig)
    teacher: str | None = None
    """Teacher for distillation methods: a robustkd checkpoint, or a .pt state dict with teacher_arch."""
    teacher_arch: str | None = None
    """Architecture of a .pt teacher (robustkd checkpoints describe themselves)."""
    resume: bool = False
    """Continue the run in <out_dir>/<name> from its last epoch (a damaged resume state: from last, new optimiser)."""
    progress: bool = True
    """Show progress bars and per-epoch lines."""
    tensorboard: bool = True
    """Write TensorBoard logs to <run>/tb."""
    log_every: int = 20
    """Steps between progress-bar/log updates."""
    bf16: bool = False
    """bf16 autocast on CUDA."""
    channels_last: bool = False
    """channels_last memory format on CUDA."""
    fast_path: str = "auto"
    """auto (the training attack replayed from one CUDA graph on a GPU; eager elsewhere) | off (always eager)."""
    nonfinite: str = "stop"
    """stop | skip: what a NaN/inf loss does (stop keeps the last good checkpoint)."""
    teacher_cache: str = "auto"
    """auto | always | never: compute the teacher's outputs on the clean training images once per run, not every
    epoch (kd, kdiga, ard, rslad); auto: where valid (no augmentation) and under 2 GiB; always: refused where
    augmentation changes the teacher's input."""
    teacher_channels_last: str = "auto"
    """auto | always | never: hold the frozen teacher's convolution weights channels-last; auto: on a CPU for a
    teacher with convolutions (its passes cost 0.70-0.95 of the contiguous ones), on CUDA as channels_last."""


NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
SELECT = ("auto", "clean", "robust", "certified", "last")
AUTO_ALWAYS_NEVER = ("auto", "always", "never")  # not on/off: YAML reads those as booleans

# Bounds for numbers that are valid Python but absurd for a run. The optimiser turns lr, weight_decay and
# the values derived from them (lr / Adam's bias correction, lr * weight_decay) into float32 scalars on the
# parameters: far above 1e6 they overflow ("value cannot be converted to type float without overflow"),
# below float32's smallest normal number they become 0 and nothing trains. No recipe is near either end.
MAX_LR = 1e6
MIN_FLOAT32 = 1.1754943508222875e-38  # torch.finfo(torch.float32).tiny, without importing torch here
MAX_FLOAT32 = 3.4028234663852886e38  # torch.finfo(torch.float32).max
# No run is meant to last 100 000 epochs; a longer one (or a warm-up or milestone past it) is a typo.
MAX_EPOCHS = 100_000
# No dataset here holds 2**31 examples, so a larger batch size or subset cannot be what was meant.
MAX_COUNT = 2**31 - 1


def validate(cfg: TrainConfig) -> TrainConfig:
    """Refuse values that would fail later or silently do something else; messages name the field."""
    _check_types(cfg)
    _check_run(cfg)
    _check_data(cfg.data)
    _check_optim(cfg.optim)
    _check_validate(cfg.validate)
    return cfg


def _need(cond: bool, fld: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{fld}: {msg}")


def _check_run(cfg: TrainConfig) -> None:
    _need(
        bool(NAME_RE.match(cfg.name)) and ".." not in cfg.name,
        "name",
        f"{cfg.name!r} must be a plain folder name (letters, digits, '_.+-'; no '/' or '..')",
    )
    _need(cfg.epochs >= 1, "epochs", f"must be >= 1, got {cfg.epochs}")
    _need(cfg.epochs <= MAX_EPOCHS, "epochs", f"must be <= {MAX_EPOCHS}, got {cfg.epochs}")
    _need(0 <= cfg.seed < 2**63, "seed", f"must be in [0, 2**63), got {cfg.seed}")
    _need(1 <= cfg.log_every <= MAX_COUNT, "log_every", f"must be in [1, {MAX_COUNT}], got {cfg.log_every}")
    _need(cfg.nonfinite in ("stop", "skip"), "nonfinite", f"must be 'stop' or 'skip', got {cfg.nonfinite!r}")
    _need(cfg.fast_path in ("auto", "off"), "fast_path", f"must be 'auto' or 'off', got {cfg.fast_path!r}")
    for fld in ("teacher_channels_last", "teacher_cache"):
        value = getattr(cfg, fld)
        _need(value in AUTO_ALWAYS_NEVER, fld, f"must be one of {', '.join(AUTO_ALWAYS_NEVER)}, got {value!r}")


def _check_data(d: DataConfig) -> None:
    _need(0.0 <= d.val_fraction < 1.0, "data.val_fraction", f"must be in [0, 1), got {d.val_fraction}")
    for fld in ("batch_size", "eval_batch_size"):
        value = getattr(d, fld)
        _need(value >= 1, f"data.{fld}", f"must be >= 1, got {value}")
        _need(value <= MAX_COUNT, f"data.{fld}", f"must be <= {MAX_COUNT}, got {value}")
    for fld in ("train_subset", "test_subset"):
        value = getattr(d, fld)
        _need(value is None or value >= 1, f"data.{fld}", f"must be >= 1 or null, got {value}")
        _need(value is None or value <= MAX_COUNT, f"data.{fld}", f"must be <= {MAX_COUNT} or null, got {value}")


def _check_optim(o: OptimConfig) -> None:
    _need(o.name in ("sgd", "adam", "adamw"), "optim.name", f"must be sgd, adam or adamw, got {o.name!r}")
    _need(math.isfinite(o.lr) and o.lr > 0, "optim.lr", f"must be a positive number, got {o.lr}")
    _need(
        MIN_FLOAT32 <= o.lr <= MAX_LR,
        "optim.lr",
        f"must be in [{MIN_FLOAT32:.3g}, {MAX_LR:g}] (it becomes a float32 scalar on the weights), got {o.lr}",
    )
    _need(o.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {o.weight_decay}")
    _need(
        o.weight_decay <= MAX_LR,
        "optim.weight_decay",
        f"must be <= {MAX_LR:g} (it becomes a float32 scalar on the weights), got {o.weight_decay}",
    )
    _need(0 <= o.momentum < 1, "optim.momentum", f"must be in [0, 1), got {o.momentum}")
    _need(
        o.schedule in ("constant", "cosine", "multistep"),
        "optim.schedule",
        f"must be constant, cosine or multistep, got {o.schedule!r}",
    )
    _need(
        0 <= o.warmup_epochs <= MAX_EPOCHS,
        "optim.warmup_epochs",
        f"must be in [0, {MAX_EPOCHS}], got {o.warmup_epochs}",
    )
    _need(o.grad_clip is None or o.grad_clip > 0, "optim.grad_clip", f"must be > 0 or null, got {o.grad_clip}")
    _need(
        o.grad_clip is None or MIN_FLOAT32 <= o.grad_clip <= MAX_FLOAT32,
        "optim.grad_clip",
        f"must be in [{MIN_FLOAT32:.3g}, {MAX_FLOAT32:.3g}] (a float32 norm), got {o.grad_clip}",
    )
    _need(0 < o.gamma <= 1, "optim.gamma", f"must be in (0, 1], got {o.gamma}")
    _need(all(0 <= b < 1 for b in o.betas), "optim.betas", f"must both be in [0, 1), got {list(o.betas)}")
    _need(
        all(0 <= m <= MAX_EPOCHS for m in o.milestones),
        "optim.milestones",
        f"must be epochs in [0, {MAX_EPOCHS}], got {o.milestones}",
    )


def _check_validate(v: ValidateConfig) -> None:
    # The protocol itself was read into a ThreatModel (and checked) with the types.
    _need(v.select in SELECT, "validate.select", f"must be one of {', '.join(SELECT)}, got {v.select!r}")
    _need(
        v.select != "robust" or v.attack is not None, "validate.select", "'robust' needs validate.attack (e.g. pgd10)"
    )
    _need(
        v.select != "certified" or v.certify is not None,
        "validate.select",
        "'certified' needs validate.certify (e.g. ibp)",
    )
    _need(
        (v.attack is None and v.certify is None) or v.protocol is not None,
        "validate.protocol",
        "set a threat model (e.g. linf-0.1) for validate.attack / validate.certify",
    )
    _need(
        v.max_examples is None or 1 <= v.max_examples <= MAX_COUNT,
        "validate.max_examples",
        f"must be in [1, {MAX_COUNT}] or null, got {v.max_examples}",
    )
    # Found now rather than after the first training epoch, when validation would first use them.
    if v.attack is not None:
        try:
            get_attack(v.attack)
        except RobustKDError as err:
            raise ConfigError(f"validate.attack: {err}") from None
    if v.certify is not None:
        _check_certify(v.certify, v.protocol)


def _check_certify(verifier: str, threat: ThreatModel) -> None:
    try:
        get_verifier(verifier)
    except RobustKDError as err:
        raise ConfigError(f"validate.certify: {err}") from None
    if threat.norm != "linf":
        raise ConfigError(
            f"validate.certify: certificates are for linf balls, but {protocol_value(threat)!r} is {threat.norm}"
        )


def protocol_value(threat: ThreatModel) -> str | dict[str, Any]:
    """How a threat model is written back into a config: a name that reads back to exactly it, else its fields.

    A protocol given as a preset or ``linf-<eps>`` name keeps that name in ``config.yaml`` and the checkpoint
    sidecars; one given as a mapping (or changed from its preset) is saved as a mapping of its fields.
    """
    for name in (*PRESETS.names(), threat.name):  # threat.name always parses back to its norm and eps
        if ThreatModel.preset(name) == threat:
            return name
    return {f.name: getattr(threat, f.name) for f in dataclasses.fields(threat)}


def _check_types(obj: Any, prefix: str = "") -> None:
    # A config built in Python skips from_dict; the range checks below must never meet a str or None.
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        value, hint = getattr(obj, f.name), hints[f.name]
        if _is_section(hint):
            if not isinstance(value, hint):
                raise ConfigError(f"{prefix}{f.name}: expected a mapping, got {_show(value)}")
            _check_types(value, f"{prefix}{f.name}.")
        else:
            setattr(obj, f.name, _typed(value, hint, f"{prefix}{f.name}"))


def _is_section(hint: Any) -> bool:
    """A nested config dataclass; a ThreatModel is a value read from a name or a mapping, not a section."""
    return dataclasses.is_dataclass(hint) and hint is not ThreatModel


def load_config(source: str | os.PathLike | dict[str, Any] | TrainConfig) -> TrainConfig:
    """A ``TrainConfig`` from a YAML file, a dict or a config; every failure is a ``ConfigError``.

    YAML is read with the safe loader only: a tag that would construct a Python object is refused.
    """
    if isinstance(source, TrainConfig):
        return source
    if isinstance(source, dict):
        return from_dict(source)
    if not isinstance(source, str | os.PathLike):
        raise ConfigError(f"config: expected a YAML file, a dict or a TrainConfig, got {type(source).__name__}")
    import yaml

    path = Path(source)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"config: cannot read {path} ({err})") from err
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"config: {path} is not valid YAML, or uses a tag that is not allowed ({err})") from None
    except RecursionError:
        raise ConfigError(f"config: {path} nests too deeply") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config: {path} must hold a mapping of options, got {type(data).__name__}")
    return from_dict(data)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain data (YAML- and JSON-able) that ``from_dict`` reads back to an equal config."""
    return {f.name: _plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}


def _plain(value: Any) -> Any:
    if isinstance(value, ThreatModel):
        return protocol_value(value)
    if dataclasses.is_dataclass(value):
        return to_dict(value)
    return copy.deepcopy(value)


def from_dict(data: dict[str, Any], cls: type = TrainConfig, prefix: str = "") -> Any:
    """Build a (nested) config dataclass from a dict.

    Unknown keys are refused with close matches, and values of the wrong type with the field's name
    (a number written as text, as YAML 1.1 reads ``1e-3``, is accepted for a float field).
    """
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if not isinstance(key, str) or key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=3, cutoff=0.5) if isinstance(key, str) else []
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            raise ConfigError(f"{prefix}{key}: unknown option{hint}")
        if _is_section(hints[key]):
            kwargs[key] = from_dict(value, hints[key], f"{prefix}{key}.")
        else:
            kwargs[key] = _typed(value, hints[key], f"{prefix}{key}")
    return cls(**kwargs)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _typed(value: Any, hint: Any, where: str) -> Any:
    """``value`` checked against (and, for numbers, converted to) the field type ``hint``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if ThreatModel in args:
        # Parsed here, once: the engine, methods and evaluation see only the ThreatModel.
        if isinstance(value, dict) and not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{where}: expected a protocol name or a mapping of field names, got {_show(value)}")
        return None if value is None else ThreatModel.parse(value, field=where)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _typed(value, inner, where)
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {_show(value)}")
    if hint is int:
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {_show(value)}")
    if hint is float:
        return _number(value, where)
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {_show(value)}")
    if origin is dict:
        if isinstance(value, dict) and all(isinstance(k, str) for k in value):
            return dict(value)
        raise ConfigError(f"{where}: expected a mapping of names to values, got {_show(value)}")
    if origin in (list, tuple) and isinstance(value, list | tuple):
        if origin is list:
            return [_typed(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
        if len(value) == len(args):
            return tuple(_typed(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin in (list, tuple):
        size = f" of {len(args)}" if origin is tuple else " of"
        raise ConfigError(f"{where}: expected a list{size} numbers, got {_show(value)}")
    raise ConfigError(f"{where}: unsupported field type {hint}")


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _number(value: Any, where: str) -> float:
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ConfigError(f"{where}: expected a number, got {_show(value)}") from None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{where}: expected a number, got {_show(value)}")
    try:
        out = float(value)
    except OverflowError:
        out = math.inf
    if not math.isfinite(out):
        raise ConfigError(f"{where}: must be a finite number, got {_show(value)}")
    return out
