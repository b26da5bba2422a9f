"""Certify saved checkpoints on their dataset's test split: what ``robustkd certify`` runs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from robustkd.certify.pair import DEFAULT_RHO, certify
from robustkd.errors import ConfigError
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
) -> dict[str, Any]:
    """Certified accuracy (and, with a teacher, certified agreement and gap bounds) on the test split.

    The JSON goes beside the student as ``cert_<ckpt>_<method>_<eps>.json`` unless ``out`` is given.
    """
    from robustkd.checkpoint import load_model, resolve
    from robustkd.engine.loop import resolve_device
    from robustkd.evaluate.checkpoint_eval import load_test_points

    if eps < 0:
        raise ConfigError(f"eps: must be >= 0, got {eps}")
    dev = resolve_device(device)
    student = load_model(student_path, device=dev)
    teacher = load_model(teacher_path, device=dev) if teacher_path is not None else None
    meta = dict(getattr(student, "robustkd_meta", {}))
    if teacher is not None and dataset is None:
        t_data = getattr(teacher, "robustkd_meta", {}).get("dataset")
        if t_data and meta.get("dataset") and t_data != meta["dataset"]:
            raise ConfigError(
                f"dataset: the teacher was trained on {t_data}, the student on {meta['dataset']}; pass --dataset"
            )
    if dataset is not None:
        meta["dataset"] = dataset
    x, y, n_total, source = load_test_points(meta, n_examples, data_root)
    result = certify(
        teacher, student, x, y, eps, method, batch_size, joint=joint, rho=rho, progress=progress, device=dev
    )
    weights = resolve(student_path)
    result["subset"] = len(y) < n_total
    result["student_path"] = str(weights)
    result["teacher_path"] = str(resolve(teacher_path)) if teacher_path is not None else None
    result["data"] = {"dataset": meta.get("dataset"), "source": source, "split": "test", "n_total": n_total}
    if out is None:
        out = weights.with_name(f"cert_{weights.stem}_{method}_{eps:g}.json")
    atomic_write_json(out, result)
    result["output"] = str(out)
    return result
