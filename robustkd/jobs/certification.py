"""``robustkd certify``: certificates of saved checkpoints on their dataset's test split."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from robustkd.attacks.threat import ThreatModel
from robustkd.certify.bounds import get_verifier
from robustkd.certify.pair import DEFAULT_RHO, as_threat, batch_starts, certify, summarize
from robustkd.errors import ConfigError
from robustkd.jobs.chain import Models, ModelSource, load_models, load_points, output_path, run_resumable, source_name


def certify_checkpoints(
    student_path: ModelSource,
    teacher_path: ModelSource | None = None,
    *,
    eps: float | ThreatModel | str | Mapping[str, Any] = 0.1,
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

    ``eps`` is the Linf ball: a radius, a ThreatModel, a preset name or a mapping (see ``certify.as_threat``).
    The JSON goes beside the student as ``cert_<ckpt>_<method>_<eps>.json`` unless ``out`` is given.
    Per-example results are saved batch by batch beside it (``<out>.progress.json``); with ``resume`` a
    killed run started again with the same arguments continues from them and gives the same result.
    Either model may be an in-memory module (``dataset`` then needed unless it names one; ``out`` for a student).
    """
    threat = as_threat(eps)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size: must be an integer >= 1, got {batch_size!r}")
    verifier = get_verifier(method)  # a bad name fails before any loading
    models = load_models(student_path, teacher_path, device=device)
    points = load_points(models, n_examples, data_root, dataset)
    out = output_path(out, student_path, "cert_{stem}_" + f"{method}_{threat.eps:g}.json")
    settings = {"eps": threat.eps, "method": method, "joint": joint, "rho": list(rho)}
    settings.update(batch_size=batch_size, device=models.device.type)
    run = _Batches(models, points.x, points.y, threat, method, batch_size, joint, rho, progress)

    def compute(state: dict[str, Any], on_batch: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        per_example = run.per_example(state, on_batch)
        summary = summarize(
            {key: torch.tensor(values) for key, values in per_example.items()},
            pair=models.teacher is not None,
            backend=verifier.backend,
            eps=float(torch.as_tensor(threat.eps, dtype=torch.float32)),  # as certify reports it
            method=method,
            joint=joint,
            rho=rho,
        )
        return {**summary, "per_example": per_example}

    def record(result: dict[str, Any]) -> None:
        result["subset"] = len(points.y) < points.n_total
        result["student_path"] = source_name(student_path)
        result["teacher_path"] = source_name(teacher_path) if teacher_path is not None else None
        result["data"] = {**points.record(), "n_total": points.n_total}

    tensors = [*models.tensors(), ("x", points.x), ("y", points.y)]
    return run_resumable(
        out, what="certify", settings=settings, tensors=tensors, resume=resume, compute=compute, record=record
    )


@dataclass
class _Batches:
    """``certify``'s per-example results, one batch at a time, each batch handed out for a resume.

    The batches are exactly those ``certify`` would run on all of x, so the numbers are the same.
    """

    models: Models
    x: Tensor
    y: Tensor
    threat: ThreatModel
    method: str
    batch_size: int
    joint: bool
    rho: Sequence[float]
    progress: bool

    def per_example(self, state: dict[str, Any], on_batch: Callable[[dict[str, Any]], None]) -> dict[str, list[Any]]:
        done, n_done = self._restore(state)
        n, m = len(self.y), self.models
        for start in batch_starts(n, self.batch_size, self.progress, f"certify ({self.method})", n_done):
            end = start + self.batch_size
            part = certify(
                m.teacher, m.student, self.x[start:end], self.y[start:end], self.threat, self.method,
                self.batch_size, joint=self.joint, rho=self.rho, progress=False, device=m.device,
            )["per_example"]  # fmt: skip
            for key, values in part.items():
                done.setdefault(key, []).extend(values)
            if end < n:
                on_batch({"per_example": done})
        return done

    def _restore(self, state: dict[str, Any]) -> tuple[dict[str, list[Any]], int]:
        done = state.get("per_example", {})
        lists = isinstance(done, dict) and all(isinstance(v, list) for v in done.values())
        n_done = len(next(iter(done.values()))) if lists and done else 0
        bad_size = n_done % self.batch_size or n_done > len(self.y)
        if not lists or bad_size or any(len(v) != n_done for v in done.values()):
            warnings.warn("ignoring the saved progress: its contents are damaged; starting over", stacklevel=4)
            return {}, 0
        return done, n_done
