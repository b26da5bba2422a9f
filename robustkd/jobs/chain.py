"""The chain every job runs: checkpoints → models → test points → output name → resumable progress → atomic JSON.

Each step is a function of its own, so a job is a few lines over them and every job applies the same rules:
the device from :func:`robustkd.runtime.resolve_device`, teacher–student compatibility from
:func:`robustkd.checkpoint.check_compatible`, and one rule for which dataset's test split is used.

Wherever a job takes a checkpoint path it also takes an in-memory ``nn.Module`` (plain, or
:func:`robustkd.wrap`-ped to state its normalisation, input shape and classes): it is checked against the
dataset with one forward, the dataset must then be named (``dataset=``) unless the module was loaded from a
checkpoint that names it, and with no checkpoint to write beside, the output path must be given (``out=``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from robustkd.checkpoint import FOREIGN_SUFFIXES, check_compatible, load_model, resolve
from robustkd.data import load_dataset
from robustkd.errors import ConfigError
from robustkd.io import atomic_write_json
from robustkd.jobs.progress import ProgressFile, fingerprint, model_tensors, progress_path
from robustkd.models import wrap
from robustkd.models.wrap import check_model, module_marker
from robustkd.runtime import resolve_device

# Computes a job's result from a saved state ({} when there is none), handing each new state to the callback.
Compute = Callable[[dict[str, Any], Callable[[dict[str, Any]], None]], dict[str, Any]]
# What a job takes for a model: a checkpoint path or an in-memory module.
ModelSource = str | Path | nn.Module


@dataclass
class Models:
    """A loaded student (and teacher), their sidecars, and the device they sit on."""

    device: torch.device
    student: nn.Module
    teacher: nn.Module | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    teacher_meta: dict[str, Any] = field(default_factory=dict)
    # The (name, model) pairs given as in-memory modules: checked against the data once it is loaded.
    in_memory: list[tuple[str, nn.Module]] = field(default_factory=list)

    def tensors(self) -> list[tuple[str, Tensor]]:
        """The weights of both models, named, for a progress file's key."""
        return [*model_tensors("student", self.student), *model_tensors("teacher", self.teacher)]


@dataclass
class Points:
    """The test points a job runs on, and where they came from."""

    x: Tensor
    y: Tensor
    n_total: int
    source: str
    dataset: str

    def record(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "source": self.source, "split": "test"}


def weights_path(path: str | Path) -> Path:
    """The weights file of a checkpoint: a foreign state dict is its own file, a robustkd one its .safetensors."""
    return Path(path) if Path(path).suffix in FOREIGN_SUFFIXES else resolve(path)


def source_name(source: ModelSource) -> str:
    """How a result names a model: its weights file, or ``<nn.Module Name>`` for an in-memory module."""
    return module_marker(source) if isinstance(source, nn.Module) else str(weights_path(source))


def load_models(
    student_path: ModelSource, teacher_path: ModelSource | None = None, *, device: str | torch.device = "auto"
) -> Models:
    """Load a student (and a teacher) on ``device``; a teacher incompatible with the student is refused.

    Either may be an in-memory module instead of a checkpoint path (see the module docstring).
    """
    dev = resolve_device(device)
    student, meta = _model(student_path, dev)
    models = Models(dev, student, None, meta)
    if isinstance(student_path, nn.Module):
        models.in_memory.append(("student", student))
    if teacher_path is not None:
        models.teacher, models.teacher_meta = _model(teacher_path, dev)
        if isinstance(teacher_path, nn.Module):
            models.in_memory.append(("teacher", models.teacher))
        check_compatible(models.teacher_meta, models.meta)
    return models


def _model(source: ModelSource, device: torch.device) -> tuple[nn.Module, dict[str, Any]]:
    """A checkpoint loaded, or a module as given (wrapped when plain), on ``device``, with its description."""
    if not isinstance(source, nn.Module):
        model = load_model(source, device=device)
        return model, dict(getattr(model, "robustkd_meta", {}))
    meta = getattr(source, "robustkd_meta", None)
    if isinstance(meta, dict):  # loaded from a checkpoint: it describes itself, its dataset included
        return source.to(device), dict(meta)
    wrapped = wrap(source)
    described = {key: value for key, value in wrapped.describe().items() if value is not None}
    return wrapped.to(device), described


def choose_dataset(
    student_meta: Mapping[str, Any], teacher_meta: Mapping[str, Any], dataset: str | None = None
) -> str | None:
    """The one dataset rule: ``dataset`` when given; else the one both checkpoints name (refused when they differ).

    A checkpoint that names no dataset (a foreign ``.pt``) takes the other's; None when neither names one.
    """
    if dataset is not None:
        return dataset
    mine, theirs = student_meta.get("dataset"), teacher_meta.get("dataset")
    if mine and theirs and mine != theirs:
        raise ConfigError(
            f"dataset: the teacher was trained on {theirs!r} but the student on {mine!r}; "
            "pass --data.dataset to choose the test split"
        )
    return mine or theirs


def load_test_points(
    meta: Mapping[str, Any], n_examples: int | None, data_root: str | None = None
) -> tuple[Tensor, Tensor, int, str]:
    """The first ``n_examples`` test points (all when None) of the dataset ``meta`` names, images in [0, 1].

    Only the test files are read, so a data folder that holds nothing else serves an evaluation.
    """
    if not meta.get("dataset"):
        raise ConfigError("dataset: the checkpoint does not name its dataset; pass --data.dataset")
    if n_examples is not None and (isinstance(n_examples, bool) or not isinstance(n_examples, int) or n_examples < 1):
        raise ConfigError(f"n_examples: must be an integer >= 1, got {n_examples!r}")
    data = load_dataset(meta["dataset"], data_root, splits=("test",))
    n_total = len(data.test)
    n = n_total if n_examples is None else min(n_examples, n_total)
    x = data.test.images[:n].float().div_(255)
    return x, data.test.labels[:n].clone(), n_total, data.source


def load_points(
    models: Models, n_examples: int | None, data_root: str | None = None, dataset: str | None = None
) -> Points:
    """The job's test points, from the dataset :func:`choose_dataset` picks; the student's sidecar records it."""
    chosen = choose_dataset(models.meta, models.teacher_meta, dataset)
    if chosen is not None:
        models.meta["dataset"] = chosen
    elif models.in_memory:
        raise ConfigError(
            "dataset: an in-memory nn.Module names no dataset; pass dataset=NAME (robustkd list datasets)"
        )
    x, y, n_total, source = load_test_points(models.meta, n_examples, data_root)
    if models.in_memory:  # modules describe no classes of their own: the dataset's (its decoded copy is cached)
        num_classes = load_dataset(str(chosen), data_root).info.num_classes
        for what, model in models.in_memory:
            check_model(model, tuple(x.shape[1:]), num_classes, what, str(chosen))
    return Points(x, y, n_total, source, models.meta.get("dataset"))


def output_path(out: str | Path | None, student_path: ModelSource, name: str) -> Path:
    """``out`` when given, else ``name`` beside the student's weights, ``{stem}`` in it replaced by their stem."""
    if out is not None:
        return Path(out)
    if isinstance(student_path, nn.Module):
        raise ConfigError(
            f"out: the student is an in-memory {module_marker(student_path)} with no checkpoint to write beside; "
            "pass out=PATH"
        )
    weights = weights_path(student_path)
    return weights.with_name(name.replace("{stem}", weights.stem))


def model_record(path: ModelSource, meta: Mapping[str, Any]) -> dict[str, Any]:
    """How a result names a model it was computed for (``path``: its weights file or ``<nn.Module Name>``)."""
    return {"path": source_name(path), "arch": meta.get("arch"), "method": meta.get("method")}


def open_progress(
    path: str | Path,
    *,
    what: str,
    settings: Mapping[str, Any],
    tensors: Iterable[tuple[str, Tensor]],
    resume: bool = True,
) -> ProgressFile:
    """The progress file at ``path``, keyed by ``what``, ``settings`` and the named tensors (weights and data).

    A file made for anything else, or unreadable, is ignored with a warning; ``resume=False`` removes it first.
    Its ``state`` goes to the computation, its ``save`` is the computation's ``on_batch``.
    """
    path = Path(path)
    if not resume:
        path.unlink(missing_ok=True)
    return ProgressFile(path, fingerprint({"what": what, **settings}, tensors))


def run_resumable(
    out: Path,
    *,
    what: str,
    settings: Mapping[str, Any],
    tensors: Iterable[tuple[str, Tensor]],
    resume: bool,
    compute: Compute,
    record: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run ``compute`` with the progress saved beside ``out``, write its result atomically, then drop the progress.

    The progress file is keyed by ``what``, ``settings`` and the named ``tensors`` (weights and data): one made
    for anything else is ignored with a warning. ``resume=False`` starts over. ``record`` adds the job's own
    entries (models, data) to the result before it is written; ``"output"`` is added after.
    """
    saved = open_progress(progress_path(out), what=what, settings=settings, tensors=tensors, resume=resume)
    result = compute(saved.state, saved.save)
    if record is not None:
        record(result)
    atomic_write_json(out, result)
    saved.discard()
    result["output"] = str(out)
    return result
