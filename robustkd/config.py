"""Run configuration: plain dataclasses, filled from YAML + ``--dotted.key value`` by the CLI."""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from dataclasses import dataclass, field
from typing import Any

from robustkd.errors import ConfigError


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
    protocol: str | None = None
    """Threat-model preset for that attack, e.g. 'linf-0.1'."""
    select: str = "auto"
    """auto (robust accuracy when an attack is set, else clean) | clean | robust."""
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
    """Continue the run in <out_dir>/<name> from its last completed epoch."""
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
    nonfinite: str = "stop"
    """stop | skip: what a NaN/inf loss does (stop keeps the last good checkpoint)."""


NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


def validate(cfg: TrainConfig) -> TrainConfig:
    """Refuse values that would fail later or silently do something else; messages name the field."""

    def need(cond: bool, fld: str, msg: str) -> None:
        if not cond:
            raise ConfigError(f"{fld}: {msg}")

    need(
        bool(NAME_RE.match(cfg.name)) and ".." not in cfg.name,
        "name",
        f"{cfg.name!r} must be a plain folder name (letters, digits, '_.+-'; no '/' or '..')",
    )
    need(cfg.epochs >= 1, "epochs", f"must be >= 1, got {cfg.epochs}")
    need(cfg.log_every >= 1, "log_every", f"must be >= 1, got {cfg.log_every}")
    need(cfg.nonfinite in ("stop", "skip"), "nonfinite", f"must be 'stop' or 'skip', got {cfg.nonfinite!r}")
    d = cfg.data
    need(0.0 <= d.val_fraction < 1.0, "data.val_fraction", f"must be in [0, 1), got {d.val_fraction}")
    need(d.batch_size >= 1, "data.batch_size", f"must be >= 1, got {d.batch_size}")
    need(d.eval_batch_size >= 1, "data.eval_batch_size", f"must be >= 1, got {d.eval_batch_size}")
    for fld in ("train_subset", "test_subset"):
        value = getattr(d, fld)
        need(value is None or value >= 1, f"data.{fld}", f"must be >= 1 or null, got {value}")
    o = cfg.optim
    need(o.name in ("sgd", "adam", "adamw"), "optim.name", f"must be sgd, adam or adamw, got {o.name!r}")
    need(math.isfinite(o.lr) and o.lr > 0, "optim.lr", f"must be a positive number, got {o.lr}")
    need(o.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {o.weight_decay}")
    need(0 <= o.momentum < 1, "optim.momentum", f"must be in [0, 1), got {o.momentum}")
    need(
        o.schedule in ("constant", "cosine", "multistep"),
        "optim.schedule",
        f"must be constant, cosine or multistep, got {o.schedule!r}",
    )
    need(o.warmup_epochs >= 0, "optim.warmup_epochs", f"must be >= 0, got {o.warmup_epochs}")
    need(o.grad_clip is None or o.grad_clip > 0, "optim.grad_clip", f"must be > 0 or null, got {o.grad_clip}")
    need(0 < o.gamma <= 1, "optim.gamma", f"must be in (0, 1], got {o.gamma}")
    v = cfg.validate
    need(
        v.select in ("auto", "clean", "robust"),
        "validate.select",
        f"must be auto, clean or robust, got {v.select!r}",
    )
    need(
        v.select != "robust" or v.attack is not None,
        "validate.select",
        "'robust' needs validate.attack (e.g. pgd10)",
    )
    need(
        v.attack is None or v.protocol is not None,
        "validate.protocol",
        "set a threat model (e.g. linf-0.1) for validate.attack",
    )
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(data: dict[str, Any], cls: type = TrainConfig, prefix: str = "") -> Any:
    """Build a (nested) config dataclass from a dict; unknown keys are refused with close matches."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            raise ConfigError(f"{prefix}{key}: unknown option{hint}")
        default = getattr(cls(), key) if dataclasses.is_dataclass(cls) else None
        if dataclasses.is_dataclass(default):
            kwargs[key] = from_dict(value, type(default), f"{prefix}{key}.")
        else:
            kwargs[key] = value
    return cls(**kwargs)
