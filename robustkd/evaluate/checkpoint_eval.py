"""Evaluate a saved model on its dataset's test split: what ``robustkd evaluate`` runs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from robustkd.errors import ConfigError
from robustkd.io import atomic_write_json


def load_test_points(
    meta: dict[str, Any], n_examples: int | None, data_root: str | None = None
) -> tuple[torch.Tensor, torch.Tensor, int, str]:
    """The first ``n_examples`` test points (all when None) of the dataset a checkpoint was trained on."""
    from robustkd.data import load_dataset

    if "dataset" not in meta:
        raise ConfigError("dataset: the checkpoint does not name its dataset; pass --dataset")
    if n_examples is not None and (isinstance(n_examples, bool) or not isinstance(n_examples, int) or n_examples < 1):
        raise ConfigError(f"n_examples: must be an integer >= 1, got {n_examples!r}")
    data = load_dataset(meta["dataset"], data_root)
    n_total = len(data.test)
    n = n_total if n_examples is None else min(n_examples, n_total)
    x = data.test.images[:n].float().div_(255)
    return x, data.test.labels[:n].clone(), n_total, data.source


def evaluate_checkpoint(
    model_path: str | Path,
    *,
    protocol: str = "linf-0.1",
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

    Per-example progress is saved beside the output (``<out>.progress.json``) as the attacks run; with
    ``resume`` a killed run started again with the same arguments continues from it and gives the same
    result. The file is removed once the result is written.
    """
    from robustkd.checkpoint import load_model, resolve
    from robustkd.evaluate.robustness import _resolve_attacks, evaluate_robustness, resolve_protocol
    from robustkd.runtime import resolve_device

    resolve_protocol(protocol)  # bad names fail before the model and the data are loaded
    _resolve_attacks(attacks)
    dev = resolve_device(device)
    model = load_model(model_path, device=dev)
    meta = dict(getattr(model, "robustkd_meta", {}))
    if dataset is not None:
        meta["dataset"] = dataset
    x, y, n_total, source = load_test_points(meta, n_examples, data_root)
    weights = resolve(model_path)
    if out is None:
        safe = protocol.replace("/", "_")
        out = weights.with_name(f"eval_{weights.stem}_{safe}.json")
    saved = progress_path(out)
    if not resume:
        saved.unlink(missing_ok=True)
    result = evaluate_robustness(
        model,
        x.to(dev),
        y.to(dev),
        protocol=protocol,
        attacks=list(attacks),
        batch_size=batch_size,
        seed=seed,
        device=dev,
        progress=progress,
        dataset_size=n_total,
        progress_file=saved,
    )
    result["model"] = {"path": str(weights), "arch": meta.get("arch"), "method": meta.get("method")}
    result["data"] = {"dataset": meta.get("dataset"), "source": source, "split": "test"}
    atomic_write_json(out, result)
    saved.unlink(missing_ok=True)
    result["output"] = str(out)
    return result


def progress_path(out: str | Path) -> Path:
    """Where the per-example progress of a run writing ``out`` is kept until it finishes."""
    out = Path(out)
    return out.with_name(out.name.removesuffix(".json") + ".progress.json")
