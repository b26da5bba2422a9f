"""``robustkd evaluate``: robustness of a saved model on its dataset's test split."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from robustkd.attacks.threat import ThreatModel
from robustkd.evaluate.robustness import evaluate_robustness, resolve_attacks, resolve_protocol
from robustkd.jobs.chain import ModelSource, load_models, load_points, model_record, output_path, run_resumable


def evaluate_checkpoint(
    model_path: ModelSource,
    *,
    protocol: str | ThreatModel = "linf-0.1",
    attacks: Sequence[str] = ("clean", "pgd20", "cw20"),
    n_examples: int | None = None,
    batch_size: int = 256,
    seed: int = 0,
    device: str = "auto",
    data_root: str | None = None,
    dataset: str | None = None,
    out: str | Path | None = None,
    progress: bool = True,
    resume: bool = True,
) -> dict[str, Any]:
    """Robustness of a checkpoint on its test split; the JSON goes next to it unless ``out`` says otherwise.

    ``model_path`` may be an in-memory module; it then needs ``dataset`` (unless loaded from a checkpoint that
    names one) and ``out``.

    Per-example progress is saved beside the output (``<out>.progress.json``) as the attacks run; with
    ``resume`` a killed run started again with the same arguments continues from it and gives the same
    result. The file is removed once the result is written.
    """
    name, _ = resolve_protocol(protocol)  # bad names fail before the model and the data are loaded
    names = [r.name for r in resolve_attacks(attacks)]
    models = load_models(model_path, device=device)
    points = load_points(models, n_examples, data_root, dataset)
    out = output_path(out, model_path, "eval_{stem}_" + name.replace("/", "_") + ".json")
    settings = {"protocol": name, "attacks": names, "seed": seed, "batch_size": batch_size}
    settings["device"] = models.device.type

    def compute(state: dict[str, Any], on_batch: Any) -> dict[str, Any]:
        return evaluate_robustness(
            models.student,
            points.x.to(models.device),
            points.y.to(models.device),
            protocol=protocol,
            attacks=list(attacks),
            batch_size=batch_size,
            seed=seed,
            device=models.device,
            progress=progress,
            dataset_size=points.n_total,
            state=state,
            on_batch=on_batch,
        )

    def record(result: dict[str, Any]) -> None:
        result["model"] = model_record(model_path, models.meta)
        result["data"] = points.record()

    tensors = [*models.tensors(), ("x", points.x), ("y", points.y)]
    return run_resumable(
        out, what="robustness", settings=settings, tensors=tensors, resume=resume, compute=compute, record=record
    )
