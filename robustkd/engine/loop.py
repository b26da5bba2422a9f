"""The training loop: data, model, method, optimiser, validation, checkpoints, resume, logs.

``train`` runs named steps over one ``_Run``: prepare the run folder, load the data, build the model, load
the teacher, then per epoch ``_train_epoch`` (``_step`` after ``_step``) and ``_close_epoch`` (validate,
save, log), and at the end ``_final_test``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

import robustkd.data as datasets
from robustkd.attacks import ThreatModel
from robustkd.attacks.graph import fast_path
from robustkd.certify import certified_accuracy as certified
from robustkd.checkpoint import (
    check_compatible,
    checkpoint_bytes,
    load_model,
    load_state_strict,
    read_checkpoint,
    save_checkpoint,
)
from robustkd.config import TrainConfig, ValidateConfig, from_dict, protocol_value, to_dict, validate
from robustkd.data import DatasetInfo, Split, build_augment, iterate_batches, stratified_split
from robustkd.engine.distributed import Dist, distributed
from robustkd.engine.optim import build_optimizer, learning_rate
from robustkd.engine.state import STATE_FILE, DamagedStateError, load_state, save_state
from robustkd.engine.teacher_cache import TeacherCache, fits
from robustkd.errors import CheckpointError, ConfigError, RobustKDError
from robustkd.evaluate import evaluate_robustness
from robustkd.io import atomic_write_json, atomic_write_text, preflight_write, run_lock
from robustkd.methods import Batch, Method, Output, StepInfo, build_method
from robustkd.models import WrappedModel, create_model, wrap
from robustkd.models.wrap import check_model, is_module_marker, module_marker
from robustkd.runtime import (
    derive_seed,
    freeze,
    interactive,
    keep_freed_memory,
    resolve_device,
    seed_everything,
    teacher_layout,
)


class TrainingError(RobustKDError):
    """Training cannot go on (non-finite loss, ...); the last good checkpoint is kept."""


class ThreatMismatchWarning(UserWarning):
    """The method trains against one perturbation ball and validation measures another (norm or eps differ)."""


@dataclass
class TrainResult:
    run_dir: Path
    best: Path
    last: Path
    history: list[dict[str, Any]] = field(default_factory=list)
    test: dict[str, Any] = field(default_factory=dict)


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int) -> float:
    """Clean accuracy of ``model`` in eval mode on uint8 images; the caller's mode is restored."""
    was_training = model.training
    model.eval()
    correct = 0
    try:
        with torch.no_grad():
            for start in range(0, len(labels), batch_size):
                x = images[start : start + batch_size].float().div_(255)
                correct += (model(x).argmax(1) == labels[start : start + batch_size]).sum().item()
    finally:
        model.train(was_training)
    return correct / max(1, len(labels))


def robust_accuracy(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    attack: str,
    threat: ThreatModel,
    batch_size: int,
    seed: int,
) -> float:
    """Accuracy under a named attack recipe (e.g. pgd10) in ``threat``'s ball on uint8 images, model in eval mode."""
    x = images.float().div(255)
    result = evaluate_robustness(
        model,
        x,
        labels,
        protocol=threat,
        attacks=("clean", attack),
        batch_size=batch_size,
        seed=seed,
        progress=False,
    )
    return float(result["attacks"][attack]["accuracy"])


def certified_accuracy(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, verifier: str, threat: ThreatModel, batch_size: int
) -> float:
    """Certified accuracy at ``threat``'s (linf) eps on uint8 images, model in eval mode."""
    return certified(model, images, labels, threat.eps, verifier, batch_size)


def _selection(v: ValidateConfig) -> str:
    """The metric the best checkpoint maximises (a key of the epoch's row), or "last"."""
    select = v.select
    if select == "auto":
        select = "certified" if v.certify is not None else "robust" if v.attack is not None else "clean"
    return {"clean": "val/acc", "robust": "val/robust_acc", "certified": "val/cert_acc"}.get(select, select)


class _Progress:
    """A rich progress bar with live loss/accuracy, or nothing."""

    def __init__(self, enabled: bool) -> None:
        self.bar = None
        # Off a terminal the per-epoch lines are the progress; a bar would only dump its last frame into the log.
        if enabled and interactive():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[stats]}"),
                transient=False,
            )
            self.bar.start()
        self.task = None

    def epoch(self, description: str, total: int) -> None:
        if self.bar is not None:
            self.task = self.bar.add_task(description, total=total, stats="")

    def update(self, advance: int, stats: str | None = None) -> None:
        if self.bar is not None and self.task is not None:
            if stats is None:
                self.bar.update(self.task, advance=advance)
            else:
                self.bar.update(self.task, advance=advance, stats=stats)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _stratified_take(labels: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    if n >= len(labels):
        return torch.arange(len(labels))
    _, idx = stratified_split(labels, val_fraction=n / len(labels), seed=seed)
    return idx


@dataclass
class _Data:
    """The splits of one run: training and validation on the device (uint8), the test split where it was loaded."""

    info: DatasetInfo
    train: Split
    val: Split
    test: Split
    augment: Callable[[torch.Tensor], torch.Tensor] | None


@dataclass
class _Run:
    """Everything one run resolved before its first epoch; the named steps below read it."""

    cfg: TrainConfig
    dist: Dist
    run_dir: Path
    method: Method
    data: _Data
    model: nn.Module  # checkpoints, validation and the optimiser use it
    student: nn.Module  # what methods call: ``model``, DDP-wrapped when distributed
    teacher: nn.Module | None
    optimizer: torch.optim.Optimizer
    batch_size: int  # this rank's share of the global batch
    steps_per_epoch: int
    meta: dict[str, Any]
    autocast: AbstractContextManager[Any]
    start_epoch: int = 0
    best_score: float = -math.inf
    history: list[dict[str, Any]] = field(default_factory=list)
    teacher_cache: TeacherCache | None = None  # built by the first epoch that uses it


def train(
    config: TrainConfig | dict[str, Any], *, model: nn.Module | None = None, teacher: nn.Module | None = None
) -> TrainResult:
    """Train (or distil into) a model as ``config`` says; returns where the checkpoints are.

    ``model`` / ``teacher``: in-memory modules (plain or :func:`robustkd.wrap`-ped) used in place of
    ``config.model.arch`` / ``config.teacher``; the run's config.yaml records them as ``<nn.Module Name>``, and
    a resumed run needs the same modules passed again. Launched by torchrun with several processes, it trains
    with DistributedDataParallel: ``batch_size`` is the global batch, each rank takes its shard of one shared
    permutation, and rank 0 alone validates and writes the run folder (see docs/DISTRIBUTED.md). Every rank
    returns the same result.
    """
    cfg = _with_modules(validate(from_dict(config) if isinstance(config, dict) else config), model, teacher)
    method = _build_method(cfg)
    run_dir = Path(cfg.out_dir) / cfg.name
    with distributed(resolve_device(cfg.device)) as dist, ExitStack() as stack:
        batch_size = dist.rank_batch(cfg.data.batch_size)  # one the ranks cannot share is refused before any work
        keep_freed_memory()  # every step reallocates the same activations: no page faults for them
        if dist.is_main:
            _warn_threat_mismatch(cfg, method)
        stack.enter_context(fast_path(cfg.fast_path))  # the graph-captured training attack on CUDA, or not
        resuming = dist.on_main(partial(_prepare_dir, cfg, run_dir, stack))
        run = _setup(cfg, method, dist, run_dir, resuming, batch_size, (model, teacher))
        writer = _tensorboard(run_dir, cfg.tensorboard and dist.is_main, run.start_epoch)
        progress = _Progress(cfg.progress and dist.is_main)
        try:
            for epoch in range(run.start_epoch, cfg.epochs):
                row = _train_epoch(run, epoch, progress)
                # The others wait here while rank 0 validates and writes; then all hold the same row.
                row, run.best_score = dist.on_main(partial(_close_epoch, run, epoch, row, writer))
                run.history.append(row)
        finally:
            progress.close()
            if writer is not None:
                writer.close()
        test = dist.on_main(partial(_final_test, run))
        return TrainResult(run_dir, run_dir / "best.safetensors", run_dir / "last.safetensors", run.history, test)


def _with_modules(cfg: TrainConfig, model: nn.Module | None, teacher: nn.Module | None) -> TrainConfig:
    """``cfg`` naming the in-memory modules as ``<nn.Module Name>``; such a name without its module is refused."""
    for what, module, named in (("model", model, cfg.model.arch), ("teacher", teacher, cfg.teacher)):
        if module is not None and not isinstance(module, nn.Module):
            raise ConfigError(f"{what}: expected a torch.nn.Module, got {type(module).__name__}")
        if module is None and is_module_marker(named):
            keyword = "model=" if what == "model" else "teacher="
            raise ConfigError(
                f"{what}: the run config names an in-memory module {named}, which no file holds; pass the same "
                f"module again ({keyword}module) to train or resume this run"
            )
    if model is not None:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, arch=module_marker(model)))
    if teacher is not None:
        cfg = dataclasses.replace(cfg, teacher=module_marker(teacher), teacher_arch=None)
    return cfg


def _build_method(cfg: TrainConfig) -> Method:
    """The configured method; one that distils is refused here, before any work, when no teacher is given."""
    method = build_method(cfg.method.name, cfg.method.args)
    if method.needs_teacher and cfg.teacher is None:
        raise ConfigError(f"teacher: method {cfg.method.name!r} distils from a teacher; pass --teacher PATH")
    return method


def _warn_threat_mismatch(cfg: TrainConfig, method: Method) -> None:
    """Say so when the ball the method trains against is not the one validation measures (and selects on)."""
    trained, measured = getattr(method, "threat", None), cfg.validate.protocol
    if not isinstance(trained, ThreatModel) or measured is None:
        return
    if trained.norm == measured.norm and _usual_margin(trained.eps, measured.eps):
        return
    warnings.warn(
        ThreatMismatchWarning(
            f"method {cfg.method.name!r} trains against {trained.norm} eps={trained.eps:g} but validate.protocol "
            f"is {protocol_value(measured)!r} ({measured.norm} eps={measured.eps:g}): checkpoints are chosen under "
            "another threat model than the one trained for. Make the two agree (the same norm, and a training "
            f"eps from the protocol's to {MAX_TRAIN_EPS_RATIO:g} times it) to silence this warning"
        ),
        stacklevel=3,
    )


# Certified training trains at a larger ball than it is tested at (Gowal et al. 2018: 0.4 for 0.3 on MNIST;
# CROWN-IBP: 0.2 for 0.1), so a training eps up to twice the protocol's is a choice; below the protocol's
# eps, or beyond twice it (0.1 against 8/255, say), it is almost always a mistake.
MAX_TRAIN_EPS_RATIO = 2.0


def _usual_margin(trained: float, measured: float) -> bool:
    return measured * (1 - 1e-6) <= trained <= MAX_TRAIN_EPS_RATIO * measured * (1 + 1e-6)


def _prepare_dir(cfg: TrainConfig, run_dir: Path, stack: ExitStack) -> bool:
    """Rank 0: check and lock the run folder and write the resolved config; True when resuming a run."""
    preflight_write(run_dir)  # creatable and writable, or one clear error before any work
    if not cfg.resume and (run_dir / STATE_FILE).exists():
        raise ConfigError(
            f"resume: {run_dir} already holds a run; pass --resume true to continue it, or choose another --name"
        )
    stack.enter_context(run_lock(run_dir))
    # Writing the resolved config first doubles as the pre-flight check that the folder is writable.
    import yaml

    atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return bool(cfg.resume and (run_dir / STATE_FILE).exists())


def _setup(
    cfg: TrainConfig,
    method: Method,
    dist: Dist,
    run_dir: Path,
    resuming: bool,
    batch_size: int,
    modules: tuple[nn.Module | None, nn.Module | None] = (None, None),
) -> _Run:
    """Data, model, teacher and optimiser, in the order that fixes what the seed produces; then the resume state.

    ``modules``: the in-memory (model, teacher) the caller passed, or None for those built from ``cfg``.
    """
    seed_everything(cfg.seed)
    data = _load_data(cfg, dist.device)
    model = _build_model(cfg, data.info, dist.device, modules[0])
    teacher = _load_teacher(cfg, method, data.info, dist, modules[1])
    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], cfg.optim)
    # Room for the next writes: a fresh run writes best, last and the resume state (weights and up to two
    # optimiser moments) plus a temporary copy; a resumed one replaces them, one temporary copy at a time.
    copies = 3 if resuming else 6
    dist.on_main(lambda: preflight_write(run_dir, need_bytes=copies * checkpoint_bytes(model)))
    steps_per_epoch = math.ceil(len(data.train) / cfg.data.batch_size)
    if steps_per_epoch == 0:
        raise ConfigError("data: the training split is empty")
    bf16 = cfg.bf16 and dist.device.type == "cuda"
    run = _Run(
        cfg=cfg,
        dist=dist,
        run_dir=run_dir,
        method=method,
        data=data,
        model=model,
        student=model,
        teacher=teacher,
        optimizer=optimizer,
        batch_size=batch_size,
        steps_per_epoch=steps_per_epoch,
        meta=_meta(cfg, data.info, model),
        autocast=torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else nullcontext(),
    )
    if resuming:
        # Every rank reads the same file (the run folder must be visible to all of them).
        saved = _load_resume_state(run)
        run.start_epoch, run.best_score, run.history = saved["epoch"] + 1, saved["best_score"], saved["history"]
        if dist.is_main:  # a kill between the committed state and metrics.jsonl leaves the file one row short
            _write_metrics(run.run_dir, run.history)
    run.student = dist.wrap(model)
    return run


def _load_resume_state(run: _Run) -> dict[str, Any]:
    """The saved state restored into the model and optimiser; a damaged one falls back on ``last``."""
    try:
        return load_state(run.run_dir, run.model, run.optimizer)
    except DamagedStateError as err:
        damaged = err
    saved = _state_from_last(run, damaged)
    if run.dist.is_main:
        warnings.warn(
            f"{damaged}; continuing from last.safetensors (epoch {saved['epoch'] + 1}) with a fresh optimiser: "
            "its state (momentum, moments) was lost, so from here the run differs from an uninterrupted one",
            stacklevel=4,
        )
    return saved


def _state_from_last(run: _Run, damaged: DamagedStateError) -> dict[str, Any]:
    """What the resume state would have said, read from ``last`` and metrics.jsonl; the weights into the model."""
    last = run.run_dir / "last"
    try:
        weights, meta, _ = read_checkpoint(last)
        epoch = meta["epoch"]
        if isinstance(epoch, bool) or not isinstance(epoch, int) or not 1 <= epoch <= run.cfg.epochs:
            raise CheckpointError(f"its sidecar's epoch is {epoch!r}")
        load_state_strict(run.model, weights, str(last))
    except (RobustKDError, KeyError) as err:
        raise CheckpointError(
            f"{damaged}, and {last}.safetensors cannot stand in for it ({err}); start over under another "
            f"--name (the files in {run.run_dir} are kept)"
        ) from None
    best = meta.get("metrics", {}).get("best_score", -math.inf)
    return {"epoch": epoch - 1, "best_score": best, "history": _history(run.run_dir, epoch)}


def _history(run_dir: Path, epochs: int) -> list[dict[str, Any]]:
    """The rows of metrics.jsonl for the first ``epochs`` epochs; none when it cannot be read."""
    try:
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    except (OSError, ValueError):
        return []
    return [
        row for row in rows if isinstance(row, dict) and isinstance(row.get("epoch"), int) and row["epoch"] <= epochs
    ]


def _load_data(cfg: TrainConfig, device: torch.device) -> _Data:
    """The training split minus a stratified validation split, optional stratified subsets, and augmentation."""
    # Looked up on the package at call time, so a substituted loader (tests, toy data) is the one used.
    data = datasets.load_dataset(cfg.data.dataset, cfg.data.root)
    info = data.info
    train_idx, val_idx = stratified_split(data.train.labels, cfg.data.val_fraction, cfg.seed)
    if cfg.data.train_subset is not None:
        keep = _stratified_take(data.train.labels[train_idx], cfg.data.train_subset, cfg.seed)
        train_idx = train_idx[keep]
    train, val, test = data.train.subset(train_idx), data.train.subset(val_idx), data.test
    if cfg.data.test_subset is not None:
        test = data.test.subset(_stratified_take(data.test.labels, cfg.data.test_subset, cfg.seed))
    # uint8 on the device: a quarter of the memory of float and no host copies per step.
    train, val = train.to(device), val.to(device)
    augment = build_augment(cfg.data.augment if cfg.data.augment is not None else info.default_augment, info)
    return _Data(info, train, val, test, augment)


def _build_model(
    cfg: TrainConfig, info: DatasetInfo, device: torch.device, module: nn.Module | None = None
) -> nn.Module:
    """The registered architecture ``cfg.model`` names, or the caller's module checked against the data."""
    if module is not None:
        model: nn.Module = _user_model(module, info, "model", device)
        if cfg.model.init:
            state, _, _ = read_checkpoint(cfg.model.init)
            load_state_strict(model, state, str(cfg.model.init))
    else:
        model = create_model(
            cfg.model.arch,
            num_classes=info.num_classes,
            in_channels=info.input_shape[0],
            input_size=info.input_shape[-1],
            mean=info.mean,
            std=info.std,
            **cfg.model.args,
        )
        if cfg.model.init:
            model.load_state_dict(load_model(cfg.model.init).state_dict())
    model.to(device)
    if cfg.channels_last and device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    return model


def _user_model(module: nn.Module, info: DatasetInfo, what: str, device: torch.device) -> WrappedModel:
    """The caller's module, wrapped when plain, on ``device``, checked against the data with one forward.

    What the wrapper leaves unstated (input shape, classes) is the data's from here on.
    """
    wrapped = wrap(module)
    wrapped.to(device)
    check_model(wrapped, info.input_shape, info.num_classes, what, info.name)
    wrapped.input_shape = wrapped.input_shape or tuple(info.input_shape)
    wrapped.num_classes = wrapped.num_classes or info.num_classes
    return wrapped


def _load_teacher(
    cfg: TrainConfig, method: Method, info: DatasetInfo, dist: Dist, module: nn.Module | None = None
) -> nn.Module | None:
    """The frozen teacher (``module`` when given), checked against the data; None for a method that uses none."""
    if cfg.teacher is None:
        return None
    if not method.needs_teacher:
        if dist.is_main:
            warnings.warn(f"method {cfg.method.name!r} uses no teacher; --teacher is ignored", stacklevel=4)
        return None
    if module is not None:
        teacher = freeze(_user_model(module, info, "teacher", dist.device))
    else:
        shape: dict[str, Any] = {}
        if cfg.teacher_arch:  # a bare .pt state dict: the data says what the architecture is built for
            shape = {
                "num_classes": info.num_classes,
                "in_channels": info.input_shape[0],
                "input_size": info.input_shape[-1],
            }
        teacher = freeze(load_model(cfg.teacher, arch=cfg.teacher_arch, device=dist.device, **shape))
        _check_teacher(teacher, info)
    owned = module is not None
    return teacher_layout(teacher, dist.device, cfg.teacher_channels_last, cfg.channels_last, caller_owns=owned)


def _check_teacher(teacher: nn.Module, info: DatasetInfo) -> None:
    """The teacher's metadata against the data (the common rule), then a probe forward for teachers without it."""
    meta = getattr(teacher, "robustkd_meta", None) or {}
    check_compatible(meta, {"num_classes": info.num_classes, "input_shape": list(info.input_shape)})
    with torch.no_grad():
        param = next(teacher.parameters(), None)
        probe = torch.zeros(1, *info.input_shape, device=param.device if param is not None else "cpu")
        try:
            out = teacher(probe)
        except RuntimeError as err:
            raise ConfigError(f"teacher: it cannot take {info.name} input {tuple(info.input_shape)} ({err})") from err
    if out.shape[-1] != info.num_classes:
        raise ConfigError(f"teacher: it outputs {out.shape[-1]} classes, {info.name} has {info.num_classes}")


def _meta(cfg: TrainConfig, info: DatasetInfo, model: nn.Module | None = None) -> dict[str, Any]:
    """The checkpoint sidecar's description of the model, its data and the run.

    A caller's module is described by its class's import path (``pkg.mod:Class``), which loading never
    imports unless the user names it, and by the normalisation its wrapper puts in front.
    """
    if isinstance(model, WrappedModel):
        described = model.describe()
        arch = {key: described[key] for key in ("arch", "arch_args", "mean", "std")}
    else:
        arch = {"arch": cfg.model.arch, "arch_args": dict(cfg.model.args), "mean": list(info.mean)}
        arch["std"] = list(info.std)
    return {
        **arch,
        "num_classes": info.num_classes,
        "input_shape": list(info.input_shape),
        "dataset": info.name,
        "classes": list(info.classes),
        "method": cfg.method.name,
        "config": to_dict(cfg),
    }


@dataclass
class _Sums:
    """One epoch's example-weighted sums and its non-finite steps, kept on the device: no host sync per step.

    A step whose loss is not finite adds nothing to the sums; the first such step since the last read keeps its
    number and loss for the message. ``read`` brings everything back in one transfer, at log points only.
    """

    device: torch.device
    values: dict[str, torch.Tensor] = field(default_factory=dict)
    seen: torch.Tensor = field(init=False)
    correct: torch.Tensor = field(init=False)
    bad: torch.Tensor = field(init=False)  # non-finite steps this epoch
    first: torch.Tensor = field(init=False)  # [step, loss] of the first non-finite step since the last read

    def __post_init__(self) -> None:
        self.seen = torch.zeros((), device=self.device)
        self.correct = torch.zeros((), device=self.device)
        self.bad = torch.zeros((), device=self.device)
        self.first = torch.full((2,), -1.0, dtype=torch.float64, device=self.device)

    def add(self, out: Output, y: torch.Tensor, ok: torch.Tensor, step: int) -> None:
        n = len(y)
        self.seen += ok * n
        self._add("loss", out.loss, ok, n)
        for key, value in out.logs.items():
            self._add(key, value if isinstance(value, torch.Tensor) else torch.tensor(float(value)), ok, n)
        if out.logits is not None:
            self.correct += torch.where(ok, (out.logits.detach().argmax(1) == y).sum(), 0)
        self.bad += ~ok
        step_t = torch.tensor(float(step), dtype=torch.float64, device=self.device)
        here = torch.stack([step_t, out.loss.detach().to(self.device, torch.float64)])
        # torch.where, not a product: nan * 0 is nan.
        self.first = torch.where(~ok & (self.first[0] < 0), here, self.first)

    def _add(self, key: str, value: torch.Tensor, ok: torch.Tensor, n: int) -> None:
        value = torch.where(ok, value.detach().float().to(self.device), 0.0) * n
        self.values[key] = self.values[key] + value if key in self.values else value

    def reduce(self, dist: Dist) -> None:
        """Sums over every rank's examples: the weighted means of a single process at the same batch."""
        keys = list(self.values)
        counts = [self.seen, self.correct, *(self.values[k] for k in keys)]
        totals = dist.all_sum(torch.stack([c.double() for c in counts]))
        self.seen, self.correct = totals[0], totals[1]
        self.values = dict(zip(keys, totals[2:]))

    def read(self) -> dict[str, float]:
        """Everything, on the host, in one read; the first non-finite step is forgotten once read."""
        keys = list(self.values)
        head = [self.seen, self.correct, self.bad, self.first[0], self.first[1]]
        numbers = _read(torch.stack([t.double() for t in (*head, *(self.values[k] for k in keys))]))
        self.first = torch.full_like(self.first, -1.0)
        named = dict(zip(("seen", "correct", "bad", "first_step", "first_loss"), numbers))
        return {**named, **{f"train/{k}": v for k, v in zip(keys, numbers[len(head) :])}}


def _read(values: torch.Tensor) -> list[float]:
    """The one place the training loop reads device values back: at log points and at the end of an epoch."""
    return values.cpu().tolist()


def _train_epoch(run: _Run, epoch: int, progress: _Progress) -> dict[str, Any]:
    """One pass over this rank's shard of the training split; returns the epoch's row of training metrics.

    Nothing is read back from the device inside a step: whether the loss was finite is kept on the device
    (a non-finite step changes no weight, see ``_optimise``) and read every ``log_every`` steps and at the end.
    """
    cfg, dist = run.cfg, run.dist
    epoch_seed = derive_seed(cfg.seed, epoch)
    # Ranks draw different augmentations and attack starts; the shuffle generator below is shared.
    seed_everything(derive_seed(cfg.seed, epoch, dist.rank) if dist.enabled else epoch_seed)
    generator = torch.Generator().manual_seed(epoch_seed)
    cache = _teacher_cache(run)
    run.student.train()
    sums = _Sums(dist.device)
    started = time.perf_counter()
    progress.epoch(f"epoch {epoch + 1}/{cfg.epochs}", run.steps_per_epoch)
    batches = iterate_batches(
        run.data.train,
        run.batch_size,
        shuffle=True,
        generator=generator,
        device=dist.device,
        rank=dist.rank,
        world_size=dist.world_size,
    )
    lr, logits = None, False
    for i, (x, y, idx) in enumerate(batches):
        step = epoch * run.steps_per_epoch + i
        lr = learning_rate(cfg.optim, step, run.steps_per_epoch, cfg.epochs)
        batch = Batch(x, y, idx, cache.lookup(idx) if cache is not None else {})  # no teacher pass where cached
        out = _step(run, batch, StepInfo(epoch, step, cfg.epochs, run.steps_per_epoch), lr)
        logits = out.logits is not None
        # All ranks must skip (or stop) together, or the others would wait in the gradient all-reduce.
        ok = dist.all_true_on_device(torch.isfinite(out.loss.detach()))
        _optimise(run, out.loss, ok)
        sums.add(out, y, ok, step)
        if (i + 1) % cfg.log_every == 0:
            _log_point(run, sums, epoch, progress, cfg.log_every)
    totals = _log_point(run, sums, epoch, progress, run.steps_per_epoch % cfg.log_every, final=True)
    row: dict[str, Any] = {"epoch": epoch + 1, "lr": lr, "time_s": round(time.perf_counter() - started, 3)}
    seen = totals.pop("seen")
    row.update({k: v / max(1, seen) for k, v in totals.items() if k.startswith("train/")})
    if seen and logits:
        row["train/acc"] = totals["correct"] / seen
    return row


def _log_point(
    run: _Run, sums: _Sums, epoch: int, progress: _Progress, advance: int, final: bool = False
) -> dict[str, float]:
    """A log point: read the sums (reduced over the ranks at the end), stop or warn on non-finite steps, and
    advance the bar; returns what was read."""
    if final and run.dist.enabled:
        sums.reduce(run.dist)
    totals = sums.read()
    if totals["first_step"] >= 0:
        _nonfinite(run, epoch, int(totals["first_step"]), totals["first_loss"], int(totals["bad"]))
    if final:
        progress.update(advance)
    else:
        progress.update(advance, f"loss {totals['train/loss'] / max(1, totals['seen']):.4f}")
    return totals


def _teacher_cache(run: _Run) -> TeacherCache | None:
    """The run's teacher cache, built at its first epoch (rebuilt if the teacher or the data changed since), or
    None: ``teacher_cache: never``, a method that declares nothing, augmented inputs, or (auto) too large."""
    names = _cached_outputs(run)
    if not names:
        return None
    dtype = torch.bfloat16 if isinstance(run.autocast, torch.autocast) else None
    cache = run.teacher_cache
    if cache is None or not cache.valid(run.teacher, run.data.train, names, dtype):
        batch_size = run.cfg.data.eval_batch_size
        cache = TeacherCache.build(run.teacher, run.data.train, names, batch_size, run.autocast, dtype)
        run.teacher_cache = cache
    return cache


def _cached_outputs(run: _Run) -> tuple[str, ...]:
    """The teacher outputs to cache under the ``teacher_cache`` setting; ``always`` where invalid is refused."""
    cfg, mode = run.cfg, run.cfg.teacher_cache
    names = run.method.clean_teacher() if run.teacher is not None else ()
    augment = cfg.data.augment or run.data.info.default_augment
    if mode == "always" and not names:
        raise ConfigError(
            f"teacher_cache: always, but method {cfg.method.name!r} uses no teacher output on its clean inputs; "
            "use auto or never"
        )
    if mode == "always" and run.data.augment is not None:
        raise ConfigError(
            f"teacher_cache: always, but data.augment {augment!r} changes the teacher's input every epoch, so its "
            "outputs cannot be computed once; set data.augment none, or teacher_cache auto (on where valid)"
        )
    if mode == "never" or run.data.augment is not None:
        return ()
    if mode == "auto" and not fits(run.data.train, run.data.info.num_classes, names):
        return ()
    return names


def _step(run: _Run, batch: Batch, info: StepInfo, lr: float) -> Output:
    """The method's loss on one augmented batch at learning rate ``lr``."""
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    x = batch.x
    if run.data.augment is not None:
        x = run.data.augment(x)
    if run.cfg.channels_last and run.dist.device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    with run.autocast:
        return run.method(run.student, run.teacher, Batch(x, batch.y, batch.index, batch.teacher), info)


def _nonfinite(run: _Run, epoch: int, step: int, loss: float, bad: int) -> None:
    """A non-finite loss was seen (first at ``step``): a warning under ``nonfinite: skip``, else the error.

    Under ``skip`` the step changed nothing (``_optimise``); under ``stop`` training ends here, before the epoch
    is saved, so the last good checkpoint is the one kept.
    """
    if run.cfg.nonfinite == "skip":
        more = f" ({bad} this epoch so far)" if bad > 1 else ""
        warnings.warn(f"non-finite loss at epoch {epoch + 1}, step {step}: step skipped{more}", stacklevel=4)
        return
    lr = learning_rate(run.cfg.optim, step, run.steps_per_epoch, run.cfg.epochs)
    kept = (
        f"The last good checkpoint (epoch {epoch}) is kept in {run.run_dir}; lower the rate and rerun with "
        "--resume true"
        if epoch > run.start_epoch or (run.run_dir / STATE_FILE).exists()
        else "No epoch had completed, so no checkpoint was written; lower the rate and rerun"
    )
    raise TrainingError(
        f"non-finite loss ({loss}) at epoch {epoch + 1}, step {step}, method {run.cfg.method.name!r}: "
        f"usually a learning rate too high (optim.lr={lr:.4g}) or a loss weight too large. {kept}, or set "
        "--nonfinite skip"
    )


def _optimise(run: _Run, loss: torch.Tensor, ok: torch.Tensor) -> None:
    """The update, made a no-op on the device when ``ok`` (every rank's loss finite) is false.

    ``stop``: the gradients of a bad step are zeroed, which keeps the weights finite until the next log point
    ends the run. ``skip``: the parameters and the optimiser's state are put back as they were (state the
    step created is put back to zeros, what SGD and Adam start from), so the step changed nothing. The one
    host read left is Adam's step count on a GPU, which PyTorch keeps on the host unless ``capturable``.
    """
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for group in run.optimizer.param_groups for p in group["params"] if p.grad is not None]
    if run.cfg.nonfinite == "stop":
        for p in params:
            p.grad.masked_fill_(~ok, 0.0)
    if run.cfg.optim.grad_clip is not None:
        nn.utils.clip_grad_norm_(run.model.parameters(), run.cfg.optim.grad_clip)
    if run.cfg.nonfinite == "stop":
        run.optimizer.step()
        return
    before = {key: value.clone() for key, value in _optimiser_tensors(run.optimizer, params).items()}
    run.optimizer.step()
    for key, now in _optimiser_tensors(run.optimizer, params).items():
        old = before.get(key)
        now.copy_(torch.where(ok.to(now.device), now, old if old is not None else torch.zeros_like(now)))


def _optimiser_tensors(optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> dict[Any, torch.Tensor]:
    """Every parameter and optimiser-state tensor a step may change, by (parameter, name): copies' keys."""
    found: dict[Any, torch.Tensor] = {}
    for i, p in enumerate(params):
        found[(i, "")] = p.data
        for name, value in optimizer.state.get(p, {}).items():
            if isinstance(value, torch.Tensor):
                found[(i, name)] = value
    return found


def _close_epoch(run: _Run, epoch: int, row: dict[str, Any], writer: Any) -> tuple[dict[str, Any], float]:
    """Rank 0's end of an epoch, on the unwrapped model: validate, save, log; returns the row and the best score."""
    if len(run.data.val):
        score = _validate(run, epoch, row)
    else:
        score = -float(row["train/loss"])  # no validation split: best = lowest training loss
    improved = score > run.best_score
    best_score = score if improved else run.best_score
    _save(run, epoch, row, best_score, improved)
    if writer is not None:
        for key, value in row.items():
            if key != "epoch" and isinstance(value, int | float):
                writer.add_scalar(key, value, epoch + 1)
        writer.flush()
    if run.cfg.progress:
        shown = ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k.startswith(("train/", "val/")))
        print(f"epoch {epoch + 1}: {shown}", flush=True)
    return row, best_score


def _validate(run: _Run, epoch: int, row: dict[str, Any]) -> float:
    """Adds the validation metrics to ``row``; returns the score the best checkpoint maximises."""
    v, model, batch_size = run.cfg.validate, run.model, run.cfg.data.eval_batch_size
    val = run.data.val
    row["val/acc"] = accuracy(model, val.images, val.labels, batch_size)
    x, y = val.images[: v.max_examples], val.labels[: v.max_examples]  # max_examples None: all of them
    if v.attack is not None:
        seed = derive_seed(run.cfg.seed, epoch)
        row["val/robust_acc"] = robust_accuracy(model, x, y, v.attack, v.protocol, batch_size, seed)
    if v.certify is not None:
        row["val/cert_acc"] = certified_accuracy(model, x, y, v.certify, v.protocol, batch_size)
    select = _selection(v)
    return float(epoch) if select == "last" else row[select]


def _save(run: _Run, epoch: int, row: dict[str, Any], best_score: float, improved: bool) -> None:
    # Order matters for resume: best, then last, then the state that commits the epoch, then the metrics.
    rows = [*run.history, row]
    meta = {**run.meta, "epoch": epoch + 1, "metrics": {**row, "best_score": best_score}}
    if improved:
        save_checkpoint(run.run_dir / "best", run.model, meta)
    save_checkpoint(run.run_dir / "last", run.model, meta)
    save_state(run.run_dir, run.model, run.optimizer, {"epoch": epoch, "best_score": best_score, "history": rows})
    _write_metrics(run.run_dir, rows)


def _write_metrics(run_dir: Path, rows: list[dict[str, Any]]) -> None:
    atomic_write_text(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))


def _final_test(run: _Run) -> dict[str, Any]:
    """Rank 0: the best checkpoint's clean accuracy on the test split, written to results.json."""
    device = run.dist.device
    # A caller's module is user code, never imported from a file: its best weights go into a copy of it.
    own = copy.deepcopy(run.model) if isinstance(run.model, WrappedModel) else None
    best_model = load_model(run.run_dir / "best", model=own, device=device)
    test = run.data.test.to(device)
    result = {
        "acc": accuracy(best_model, test.images, test.labels, run.cfg.data.eval_batch_size),
        "n": len(test),
        "subset": run.cfg.data.test_subset is not None,
    }
    atomic_write_json(
        run.run_dir / "results.json", {"test": result, "best_score": run.best_score, "history": run.history}
    )
    return result


def _tensorboard(run_dir: Path, enabled: bool, start_epoch: int) -> Any:
    if not enabled:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    # purge_step drops events a killed run wrote past its last committed epoch.
    return SummaryWriter(str(run_dir / "tb"), purge_step=start_epoch + 1 if start_epoch else None)
