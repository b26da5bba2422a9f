"""Certify saved checkpoints on their dataset's test split: what ``robustkd certify`` runs."""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from robustkd.certify.bounds import get_verifier
from robustkd.certify.pair import DEFAULT_RHO, certify, summarize
from robustkd.errors import ConfigError
from robustkd.evaluate.checkpoint_eval import progress_path
from robustkd.evaluate.progress import ProgressFile, fingerprint, model_tensors
from robustkd.io import atomic_write_json


def certify_checkpoints(
    student_path: str | Path,
    teacher_path: str | Path | None = None,
    *,
    eps: float = 0.1,
    method: str = "ibp",
    n_examples: int | None = None,
    batch_size: int = 256,
    joint: bool = False,
    rho: Sequence[float] = DEFAULT_RHO,
    device: str = "auto",
    data_root: str | None = None,
    dataset: str | None = None,
    out: str | Path | None = None,
    progress: bool = True,
    resume: bool = True,
) -> dict[str, Any]:
    """Certified accuracy (and, with a teacher, certified agreement and gap bounds) on the test split.

    The JSON goes beside the student as ``cert_<ckpt>_<method>_<eps>.json`` unless ``out`` is given.
    Per-example results are saved batch by batch beside it (``<out>.progress.json``); with ``resume`` a
    killed run started again with the same arguments continues from them and gives the same result.
    """
    from robustkd.checkpoint import load_model, resolve
    from robustkd.evaluate.checkpoint_eval import load_test_points
    from robustkd.runtime import resolve_device

    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not 0 <= eps <= 1:
        raise ConfigError(f"eps: must be a number in [0, 1] (images live in [0, 1]), got {eps!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size: must be an integer >= 1, got {batch_size!r}")
    verifier = get_verifier(method)  # a bad name fails before any loading
    dev = resolve_device(device)
    student = load_model(student_path, device=dev)
    teacher = load_model(teacher_path, device=dev) if teacher_path is not None else None
    meta = dict(getattr(student, "robustkd_meta", {}))
    if teacher is not None:
        _check_pair(getattr(teacher, "robustkd_meta", {}), meta)
    if teacher is not None and dataset is None:
        t_data = getattr(teacher, "robustkd_meta", {}).get("dataset")
        if t_data and meta.get("dataset") and t_data != meta["dataset"]:
            raise ConfigError(
                f"dataset: the teacher was trained on {t_data}, the student on {meta['dataset']}; pass --dataset"
            )
    if dataset is not None:
        meta["dataset"] = dataset
    x, y, n_total, source = load_test_points(meta, n_examples, data_root)
    weights = resolve(student_path)
    if out is None:
        out = weights.with_name(f"cert_{weights.stem}_{method}_{eps:g}.json")
    saved_path = progress_path(out)
    if not resume:
        saved_path.unlink(missing_ok=True)
    settings = {"what": "certify", "eps": eps, "method": method, "joint": joint, "rho": list(rho)}
    settings.update(batch_size=batch_size, device=dev.type)
    tensors = [*model_tensors("student", student), *model_tensors("teacher", teacher), ("x", x), ("y", y)]
    saved = ProgressFile(saved_path, fingerprint(settings, tensors))
    per_example = _certify_in_batches(teacher, student, x, y, eps, method, batch_size, joint, rho, dev, saved, progress)
    result = _summary(per_example, teacher is not None, verifier.backend, eps, method, joint, rho)
    result["subset"] = len(y) < n_total
    result["student_path"] = str(weights)
    result["teacher_path"] = str(resolve(teacher_path)) if teacher_path is not None else None
    result["data"] = {"dataset": meta.get("dataset"), "source": source, "split": "test", "n_total": n_total}
    atomic_write_json(out, result)
    saved.discard()
    result["output"] = str(out)
    return result


def _check_pair(teacher: dict[str, Any], student: dict[str, Any]) -> None:
    for key, what in (("num_classes", "classes"), ("input_shape", "input shape")):
        if key in teacher and key in student and teacher[key] != student[key]:
            raise ConfigError(
                f"teacher: teacher and student differ in {what} ({teacher[key]} vs {student[key]}); "
                "a certificate compares the two on the same inputs and classes"
            )


def _certify_in_batches(
    teacher: nn.Module | None,
    student: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    method: str,
    batch_size: int,
    joint: bool,
    rho: Sequence[float],
    device: torch.device,
    saved: ProgressFile,
    progress: bool,
) -> dict[str, list[Any]]:
    """``certify``'s per-example results, one batch at a time, saved after each batch.

    The batches are exactly those ``certify`` would run on all of x, so the numbers are the same.
    """
    done = saved.state.get("per_example", {})
    lists = isinstance(done, dict) and all(isinstance(v, list) for v in done.values())
    n_done = len(next(iter(done.values()))) if lists and done else 0
    if not lists or n_done % batch_size or n_done > len(y) or any(len(v) != n_done for v in done.values()):
        warnings.warn(f"ignoring {saved.path}: its contents are damaged; starting over", stacklevel=3)
        done, n_done = {}, 0
    for start in _starts(len(y), batch_size, n_done, progress, f"certify ({method})"):
        end = start + batch_size
        part = certify(
            teacher, student, x[start:end], y[start:end], eps, method, batch_size,
            joint=joint, rho=rho, progress=False, device=device,
        )["per_example"]  # fmt: skip
        for key, values in part.items():
            done.setdefault(key, []).extend(values)
        if end < len(y):
            saved.save({"per_example": done})
    return done


def _starts(n: int, batch_size: int, first: int, progress: bool, description: str) -> Iterator[int]:
    starts = range(first, n, batch_size)
    if not progress:
        yield from starts
        return
    from rich.progress import Progress

    with Progress(transient=True) as bar:
        task = bar.add_task(description, total=n, completed=first)
        for start in starts:
            yield start
            bar.update(task, advance=min(batch_size, n - start))


def _summary(
    per_example: dict[str, list[Any]],
    pair: bool,
    backend: str,
    eps: float,
    method: str,
    joint: bool,
    rho: Sequence[float],
) -> dict[str, Any]:
    """The summary ``certify`` returns, from per-example results (tests check the two agree)."""
    r = {key: torch.tensor(values) for key, values in per_example.items()}
    eps32 = float(torch.as_tensor(eps, dtype=torch.float32))  # as certify reports it
    summary = summarize(r, pair=pair, backend=backend, eps=eps32, method=method, joint=joint, rho=rho)
    summary["per_example"] = per_example
    return summary
