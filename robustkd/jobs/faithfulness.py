"""Faithfulness of a saved student to a saved teacher on the test split."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from robustkd.evaluate.faithfulness import (
    DEFAULT_RHO,
    DISAGREEMENT_SEARCHES,
    GAP_SURROGATES,
    evaluate_faithfulness,
    threat_models,
)
from robustkd.jobs.chain import ModelSource, load_models, load_points, model_record, output_path, run_resumable


def evaluate_faithfulness_checkpoints(
    teacher_path: ModelSource,
    student_path: ModelSource,
    *,
    eps: float | Sequence[float] = 0.1,
    n_examples: int | None = None,
    steps: int = 50,
    restarts: int = 5,
    step_size: float | None = None,
    rho: float | Sequence[float] = DEFAULT_RHO,
    norm: str = "linf",
    disagreement_searches: Sequence[str] = DISAGREEMENT_SEARCHES,
    gap_surrogates: Sequence[str] = GAP_SURROGATES,
    separate_confidence: bool = False,
    batch_size: int = 256,
    seed: int = 0,
    device: str = "auto",
    data_root: str | None = None,
    dataset: str | None = None,
    out: str | Path | None = None,
    progress: bool = True,
    resume: bool = True,
) -> dict[str, Any]:
    """Faithfulness of a saved student to a saved teacher on the student's test split.

    The JSON goes next to the student (``faithful_<stem>_<norm>-<eps>.json``) unless ``out`` says otherwise.
    ``dataset`` overrides the dataset named in the checkpoints (needed for foreign ``.pt`` files). Either
    model may be an in-memory module (``dataset`` then needed unless it names one; ``out`` for a student).
    Per-point results are saved beside the output (``<out>.progress.json``) after every batch; with ``resume``
    a killed run started again with the same arguments continues from them and gives the same result. The file
    is removed once the result is written.
    """
    threats = threat_models(eps, norm, steps, restarts, step_size)  # nonsense fails before any loading
    models = load_models(student_path, teacher_path, device=device)
    points = load_points(models, n_examples, data_root, dataset)
    radii = "_".join(f"{t.eps:g}" for t in threats)
    out = output_path(out, student_path, "faithful_{stem}_" + f"{threats[0].norm}-{radii}.json")
    options = {
        "eps": eps, "steps": steps, "restarts": restarts, "step_size": step_size, "rho": rho, "norm": norm,
        "disagreement_searches": disagreement_searches, "gap_surrogates": gap_surrogates,
        "separate_confidence": separate_confidence, "batch_size": batch_size, "seed": seed,
    }  # fmt: skip

    def compute(state: dict[str, Any], on_batch: Any) -> dict[str, Any]:
        x, y = points.x.to(models.device), points.y.to(models.device)
        return evaluate_faithfulness(
            models.teacher, models.student, x, y, **options, device=models.device, progress=progress,
            dataset_size=points.n_total, state=state, on_batch=on_batch,
        )  # fmt: skip

    def record(result: dict[str, Any]) -> None:
        result["models"] = {"teacher": model_record(teacher_path, models.teacher_meta)}
        result["models"]["student"] = model_record(student_path, models.meta)
        result["data"] = points.record()

    settings = {**options, "device": models.device.type}
    tensors = [*models.tensors(), ("x", points.x), ("y", points.y)]
    return run_resumable(
        out, what="faithfulness", settings=settings, tensors=tensors, resume=resume, compute=compute, record=record
    )
