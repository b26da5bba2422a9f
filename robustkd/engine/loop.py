"""The training loop: data, model, method, optimiser, validation, checkpoints, resume, logs."""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robustkd.checkpoint import checkpoint_bytes, load_model, save_checkpoint
from robustkd.config import TrainConfig, to_dict, validate
from robustkd.engine.distributed import distributed
from robustkd.engine.optim import build_optimizer, learning_rate
from robustkd.engine.state import STATE_FILE, load_state, save_state
from robustkd.errors import ConfigError, RobustKDError
from robustkd.io import atomic_write_json, atomic_write_text, preflight_write
from robustkd.methods import Batch, StepInfo, build_method
from robustkd.runtime import derive_seed, freeze, resolve_device, seed_everything


class TrainingError(RobustKDError):
    """Training cannot go on (non-finite loss, ...); the last good checkpoint is kept."""


@dataclass
class TrainResult:
    run_dir: Path
    best: Path
    last: Path
    history: list[dict[str, Any]] = field(default_factory=list)
    test: dict[str, Any] = field(default_factory=dict)


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Refuse a second process on the same run directory instead of interleaving writes."""
    lock = run_dir / ".lock"
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        pid = lock.read_text().strip() or "?"
        if pid.isdigit() and not _alive(int(pid)):
            lock.unlink(missing_ok=True)  # left by a killed run
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        else:
            raise RobustKDError(
                f"{run_dir} is in use by process {pid} (lock file {lock}); wait for it, or remove the lock "
                "file if that process is gone"
            ) from None
    except OSError as err:
        raise RobustKDError(f"cannot write in the run directory {run_dir}: {err}") from err
    with os.fdopen(fd, "w") as handle:
        handle.write(str(os.getpid()))
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
    protocol: str,
    batch_size: int,
    seed: int,
) -> float:
    """Accuracy under a named attack recipe (e.g. pgd10) on uint8 images, model in eval mode."""
    from robustkd.evaluate import evaluate_robustness

    x = images.float().div(255)
    result = evaluate_robustness(
        model,
        x,
        labels,
        protocol=protocol,
        attacks=("clean", attack),
        batch_size=batch_size,
        seed=seed,
        progress=False,
    )
    return float(result["attacks"][attack]["accuracy"])


def certified_accuracy(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, verifier: str, protocol: str, batch_size: int
) -> float:
    """Certified accuracy at the protocol's (linf) eps on uint8 images, model in eval mode."""
    from robustkd.attacks import ThreatModel
    from robustkd.certify import certified_accuracy as certified

    eps = ThreatModel.preset(protocol).eps
    return certified(model, images, labels, eps, verifier, batch_size)


def _selection(v: Any) -> str:
    """The metric the best checkpoint maximises (a key of the epoch's row), or "last"."""
    select = v.select
    if select == "auto":
        select = "certified" if v.certify is not None else "robust" if v.attack is not None else "clean"
    return {"clean": "val/acc", "robust": "val/robust_acc", "certified": "val/cert_acc"}.get(select, select)


class _Progress:
    """A rich progress bar with live loss/accuracy, or nothing."""

    def __init__(self, enabled: bool) -> None:
        self.bar = None
        if enabled:
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
    from robustkd.data import stratified_split

    if n >= len(labels):
        return torch.arange(len(labels))
    _, idx = stratified_split(labels, val_fraction=n / len(labels), seed=seed)
    return idx


def _check_teacher(teacher: nn.Module, info: Any) -> None:
    meta = getattr(teacher, "robustkd_meta", {}) or {}
    problems = []
    if "num_classes" in meta and int(meta["num_classes"]) != info.num_classes:
        problems.append(f"the teacher has {meta['num_classes']} classes, {info.name} has {info.num_classes}")
    if "input_shape" in meta and tuple(meta["input_shape"]) != tuple(info.input_shape):
        problems.append(
            f"the teacher takes input {tuple(meta['input_shape'])}, {info.name} is {tuple(info.input_shape)}"
        )
    if problems:
        raise ConfigError("teacher: " + "; ".join(problems))
    with torch.no_grad():
        param = next(teacher.parameters(), None)
        probe = torch.zeros(1, *info.input_shape, device=param.device if param is not None else "cpu")
        try:
            out = teacher(probe)
        except RuntimeError as err:
            raise ConfigError(f"teacher: it cannot take {info.name} input {tuple(info.input_shape)} ({err})") from err
    if out.shape[-1] != info.num_classes:
        raise ConfigError(f"teacher: it outputs {out.shape[-1]} classes, {info.name} has {info.num_classes}")


def train(config: TrainConfig | dict[str, Any]) -> TrainResult:
    """Train (or distil into) a model as ``config`` says; returns where the checkpoints are.

    Launched by torchrun with several processes, it trains with DistributedDataParallel: ``batch_size`` is
    the global batch, each rank takes its shard of one shared permutation, and rank 0 alone validates and
    writes the run folder (see docs/DISTRIBUTED.md). Every rank returns the same result.
    """
    from robustkd.config import from_dict
    from robustkd.data import build_augment, iterate_batches, load_dataset, stratified_split
    from robustkd.models import create_model

    cfg = validate(from_dict(config) if isinstance(config, dict) else config)
    method = build_method(cfg.method.name, cfg.method.args)
    if method.needs_teacher and cfg.teacher is None:
        raise ConfigError(f"teacher: method {cfg.method.name!r} distils from a teacher; pass --teacher PATH")
    run_dir = Path(cfg.out_dir) / cfg.name

    with distributed(resolve_device(cfg.device)) as dist, ExitStack() as stack:
        device = dist.device
        batch_size = dist.rank_batch(cfg.data.batch_size)

        def prepare() -> bool:
            preflight_write(run_dir)  # creatable and writable, or one clear error before any work
            if not cfg.resume and (run_dir / STATE_FILE).exists():
                raise ConfigError(
                    f"resume: {run_dir} already holds a run; pass --resume true to continue it, or choose "
                    "another --name"
                )
            stack.enter_context(run_lock(run_dir))
            # Writing the resolved config first doubles as the pre-flight check that the folder is writable.
            import yaml

            atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
            return bool(cfg.resume and (run_dir / STATE_FILE).exists())

        resuming = dist.on_main(prepare)
        seed_everything(cfg.seed)
        data = load_dataset(cfg.data.dataset, cfg.data.root)
        info = data.info
        train_idx, val_idx = stratified_split(data.train.labels, cfg.data.val_fraction, cfg.seed)
        if cfg.data.train_subset is not None:
            keep = _stratified_take(data.train.labels[train_idx], cfg.data.train_subset, cfg.seed)
            train_idx = train_idx[keep]
        train_split = data.train.subset(train_idx)
        val_split = data.train.subset(val_idx)
        test_split = data.test
        if cfg.data.test_subset is not None:
            test_split = data.test.subset(_stratified_take(data.test.labels, cfg.data.test_subset, cfg.seed))
        # uint8 on the device: a quarter of the memory of float and no host copies per step.
        train_x, train_y = train_split.images.to(device), train_split.labels.to(device)
        val_x, val_y = val_split.images.to(device), val_split.labels.to(device)
        augment_name = cfg.data.augment if cfg.data.augment is not None else info.default_augment
        augment = build_augment(augment_name, info)

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
            init = load_model(cfg.model.init)
            model.load_state_dict(init.state_dict())
        model.to(device)
        if cfg.channels_last and device.type == "cuda":
            model.to(memory_format=torch.channels_last)
        teacher = None
        if cfg.teacher is not None and method.needs_teacher:
            teacher_kwargs: dict[str, Any] = {}
            if cfg.teacher_arch:
                teacher_kwargs = {
                    "num_classes": info.num_classes,
                    "in_channels": info.input_shape[0],
                    "input_size": info.input_shape[-1],
                }
            teacher = freeze(load_model(cfg.teacher, arch=cfg.teacher_arch, device=device, **teacher_kwargs))
            _check_teacher(teacher, info)
        elif cfg.teacher is not None and dist.is_main:
            warnings.warn(f"method {cfg.method.name!r} uses no teacher; --teacher is ignored", stacklevel=2)

        optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], cfg.optim)
        # Room for the next writes: a fresh run writes best, last and the resume state (weights and up to two
        # optimiser moments) plus a temporary copy; a resumed one replaces them, one temporary copy at a time.
        copies = 3 if resuming else 6
        dist.on_main(lambda: preflight_write(run_dir, need_bytes=copies * checkpoint_bytes(model)))
        steps_per_epoch = math.ceil(len(train_y) / cfg.data.batch_size)
        if steps_per_epoch == 0:
            raise ConfigError("data: the training split is empty")
        start_epoch, best_score, history = 0, -math.inf, []
        if resuming:
            # Every rank reads the same file (the run folder must be visible to all of them).
            saved = load_state(run_dir, model, optimizer)
            start_epoch, best_score, history = saved["epoch"] + 1, saved["best_score"], saved["history"]
        # What methods call: DDP when distributed; checkpoints, validation and the optimiser use ``model``.
        student = dist.wrap(model)

        meta = {
            "arch": cfg.model.arch,
            "arch_args": dict(cfg.model.args),
            "num_classes": info.num_classes,
            "input_shape": list(info.input_shape),
            "mean": list(info.mean),
            "std": list(info.std),
            "dataset": info.name,
            "classes": list(info.classes),
            "method": cfg.method.name,
            "config": to_dict(cfg),
        }
        writer = _tensorboard(run_dir, cfg.tensorboard and dist.is_main, start_epoch)
        progress = _Progress(cfg.progress and dist.is_main)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cfg.bf16 and device.type == "cuda" else nullcontext()
        select = _selection(cfg.validate)

        def close_epoch(epoch: int, epoch_seed: int, row: dict[str, Any], best_score: float) -> tuple[dict, float]:
            """Validation, checkpoints and logs of one epoch: rank 0's work, on the unwrapped model."""
            if len(val_y):
                row["val/acc"] = accuracy(model, val_x, val_y, cfg.data.eval_batch_size)
                vx, vy = val_x, val_y
                if cfg.validate.max_examples is not None:
                    vx, vy = vx[: cfg.validate.max_examples], vy[: cfg.validate.max_examples]
                if cfg.validate.attack is not None:
                    row["val/robust_acc"] = robust_accuracy(
                        model,
                        vx,
                        vy,
                        cfg.validate.attack,
                        cfg.validate.protocol or "",
                        cfg.data.eval_batch_size,
                        epoch_seed,
                    )
                if cfg.validate.certify is not None:
                    row["val/cert_acc"] = certified_accuracy(
                        model, vx, vy, cfg.validate.certify, cfg.validate.protocol or "", cfg.data.eval_batch_size
                    )
                score = float(epoch) if select == "last" else row[select]
            else:
                score = -float(row["train/loss"])  # no validation split: best = lowest training loss
            rows = [*history, row]
            improved = score > best_score
            if improved:
                best_score = score
            metrics = {**row, "best_score": best_score}
            # Order matters for resume: best, then last, then the state that commits the epoch.
            if improved:
                save_checkpoint(run_dir / "best", model, {**meta, "epoch": epoch + 1, "metrics": metrics})
            save_checkpoint(run_dir / "last", model, {**meta, "epoch": epoch + 1, "metrics": metrics})
            save_state(run_dir, model, optimizer, {"epoch": epoch, "best_score": best_score, "history": rows})
            atomic_write_text(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
            if writer is not None:
                for key, value in row.items():
                    if key != "epoch" and isinstance(value, int | float):
                        writer.add_scalar(key, value, epoch + 1)
                writer.flush()
            if cfg.progress:
                shown = ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k.startswith(("train/", "val/")))
                print(f"epoch {epoch + 1}: {shown}", flush=True)
            return row, best_score

        try:
            for epoch in range(start_epoch, cfg.epochs):
                epoch_seed = derive_seed(cfg.seed, epoch)
                # Ranks draw different augmentations and attack starts; the shuffle generator below is shared.
                seed_everything(derive_seed(cfg.seed, epoch, dist.rank) if dist.enabled else epoch_seed)
                generator = torch.Generator().manual_seed(epoch_seed)
                student.train()
                sums: dict[str, torch.Tensor] = {}
                correct = torch.zeros((), device=device)
                seen = 0
                started = time.perf_counter()
                progress.epoch(f"epoch {epoch + 1}/{cfg.epochs}", steps_per_epoch)
                split = type(train_split)(train_x, train_y)
                batches = iterate_batches(
                    split,
                    batch_size,
                    shuffle=True,
                    generator=generator,
                    device=device,
                    rank=dist.rank,
                    world_size=dist.world_size,
                )
                for i, (x, y, idx) in enumerate(batches):
                    step = epoch * steps_per_epoch + i
                    lr = learning_rate(cfg.optim, step, steps_per_epoch, cfg.epochs)
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                    if augment is not None:
                        x = augment(x)
                    if cfg.channels_last and device.type == "cuda":
                        x = x.contiguous(memory_format=torch.channels_last)
                    with autocast:
                        out = method(
                            student,
                            teacher,
                            Batch(x, y, idx),
                            StepInfo(epoch, step, cfg.epochs, steps_per_epoch),
                        )
                    loss = out.loss
                    # All ranks must skip (or stop) together, or the others would wait in the gradient all-reduce.
                    if not dist.all_true(bool(torch.isfinite(loss.detach()).item())):
                        if cfg.nonfinite == "skip":
                            warnings.warn(
                                f"non-finite loss at epoch {epoch + 1}, step {step}: step skipped",
                                stacklevel=2,
                            )
                            optimizer.zero_grad(set_to_none=True)
                            progress.update(1)
                            continue
                        kept = (
                            f"The last good checkpoint (epoch {epoch}) is kept in {run_dir}; lower the rate and "
                            "rerun with --resume true"
                            if epoch > start_epoch or (run_dir / STATE_FILE).exists()
                            else "No epoch had completed, so no checkpoint was written; lower the rate and rerun"
                        )
                        raise TrainingError(
                            f"non-finite loss ({loss.item()}) at epoch {epoch + 1}, step {step}, method "
                            f"{cfg.method.name!r}: usually a learning rate too high (optim.lr={lr:.4g}) or a loss "
                            f"weight too large. {kept}, or set --nonfinite skip"
                        )
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    if cfg.optim.grad_clip is not None:
                        nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
                    optimizer.step()
                    n = len(y)
                    seen += n
                    sums["loss"] = sums.get("loss", 0) + loss.detach().float() * n
                    for key, value in out.logs.items():
                        value = (
                            value.detach().float() if isinstance(value, torch.Tensor) else torch.tensor(float(value))
                        )
                        sums[key] = sums.get(key, 0) + value.to(device) * n
                    if out.logits is not None:
                        correct += (out.logits.detach().argmax(1) == y).sum()
                    if (i + 1) % cfg.log_every == 0:
                        progress.update(cfg.log_every, f"loss {float(sums['loss']) / seen:.4f}")
                progress.update(steps_per_epoch % cfg.log_every if steps_per_epoch % cfg.log_every else 0)
                if dist.enabled:
                    # Sums over every rank's examples: the weighted means of a single process at the same batch.
                    keys = list(sums)
                    counts = [torch.tensor(seen, device=device), correct, *(sums[k] for k in keys)]
                    totals = dist.all_sum(torch.stack([c.double() for c in counts]))
                    seen, correct = int(totals[0].item()), totals[1]
                    sums = dict(zip(keys, totals[2:]))

                row: dict[str, Any] = {
                    "epoch": epoch + 1,
                    "lr": lr,
                    "time_s": round(time.perf_counter() - started, 3),
                }
                row.update({f"train/{k}": float(v) / max(1, seen) for k, v in sums.items()})
                if seen and out.logits is not None:
                    row["train/acc"] = float(correct) / seen
                # The others wait here while rank 0 validates and writes; then all hold the same row.
                row, best_score = dist.on_main(partial(close_epoch, epoch, epoch_seed, row, best_score))
                history.append(row)
        finally:
            progress.close()
            if writer is not None:
                writer.close()

        def final_test() -> dict[str, Any]:
            best_model = load_model(run_dir / "best", device=device)
            test_x = test_split.images.to(device)
            test_y = test_split.labels.to(device)
            test = {
                "acc": accuracy(best_model, test_x, test_y, cfg.data.eval_batch_size),
                "n": len(test_y),
                "subset": cfg.data.test_subset is not None,
            }
            atomic_write_json(run_dir / "results.json", {"test": test, "best_score": best_score, "history": history})
            return test

        test = dist.on_main(final_test)
        return TrainResult(run_dir, run_dir / "best.safetensors", run_dir / "last.safetensors", history, test)


def _tensorboard(run_dir: Path, enabled: bool, start_epoch: int) -> Any:
    if not enabled:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    # purge_step drops events a killed run wrote past its last committed epoch.
    return SummaryWriter(str(run_dir / "tb"), purge_step=start_epoch + 1 if start_epoch else None)
