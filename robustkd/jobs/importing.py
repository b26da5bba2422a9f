"""``robustkd import``: a foreign checkpoint (RobustBench, TRADES, ARD, RSLAD) in, a robustkd checkpoint out.

The file is read with ``weights_only=True``, its format and architecture recognised from key names and tensor
shapes (``robustkd.models.foreign``), checked against the dataset, and written as ``DIR/best.safetensors`` +
``DIR/best.json`` for images in [0, 1]. Everything is checked before anything is written.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

import robustkd.data.catalog as catalog
from robustkd.checkpoint import load_state_strict, read_meta, read_state_dict, save_checkpoint
from robustkd.data import DATASETS, DatasetInfo, load_dataset
from robustkd.errors import CheckpointError, ConfigError
from robustkd.models import create_model, foreign

# What each source feeds its model, for the notes and docs/import.md. RobustBench adds the normalisation of
# these two in code (a mu/sigma pair of buffers the released files do not hold), so it must be given.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)
NEEDS_NORMALISATION = "RobustBench's Wong2020Fast and Rice2020Overfitting (Linf and L2)"


def import_model(
    src: str | Path,
    arch: str | None = None,
    *,
    arch_args: Mapping[str, Any] | None = None,
    dataset: str,
    out_dir: str | Path,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    card: bool = True,
) -> Path:
    """Import the foreign checkpoint ``src`` as ``out_dir/best`` and return that checkpoint path.

    Without ``arch`` the format, architecture and its arguments (depth, width, variant) are recognised from the
    file; with ``arch`` (and ``arch_args``) the file is checked against them. ``mean``/``std`` go into the
    model's Normalize (the model then takes images in [0, 1]); a file holding RobustBench's mu/sigma buffers
    brings its own. ``card=True`` also writes the teacher card beside the checkpoint. Raises a ``RobustKDError``
    (one line naming the file and what to do) before writing anything when the file cannot be imported.
    """
    src = Path(src)
    if src.suffix in (".safetensors", ".json") or src.is_dir():
        raise ConfigError(f"{src} is a robustkd checkpoint already: load it with robustkd.load_model, no import needed")
    info = dataset_info(dataset)
    found = foreign.recognise(read_state_dict(src), str(src), arch=arch, arch_args=arch_args)
    _check_against_data(src, found, info)
    mean, std, normalisation = _normalisation(src, found, mean, std)
    model = _build(src, found, info, mean, std)
    meta = {
        "arch": found.arch,
        "arch_args": dict(found.arch_args),
        "num_classes": found.num_classes,
        "input_shape": list(info.input_shape),
        "mean": list(mean),
        "std": list(std),
        "dataset": info.name,
        "imported_from": {
            "file": str(src),
            "sha256": _sha256(src),
            "format": found.format,
            "recognised": found.describe(),
            "normalisation": normalisation,
            "unused_tensors": len(found.unused),
        },
    }
    checkpoint = Path(out_dir) / "best"
    save_checkpoint(checkpoint, model, meta)
    if card:
        from robustkd.jobs.card import make_card  # loaded only when asked for: it brings the attacks and AutoAttack

        make_card(checkpoint, dataset=dataset)
    return checkpoint


def dataset_info(name: str) -> DatasetInfo:
    """The description of a registered dataset (classes, input shape), without reading it where it is known."""
    DATASETS.get(name)  # an unknown name raises, listing close matches
    for value in vars(catalog).values():
        if isinstance(value, DatasetInfo) and value.name == name:
            return value
    return load_dataset(name).info  # a dataset described only by its files (an image folder)


def _check_against_data(src: Path, found: foreign.Recognised, info: DatasetInfo) -> None:
    if found.num_classes != info.num_classes:
        raise CheckpointError(
            f"{src} has {found.num_classes} output classes but dataset {info.name} has {info.num_classes}: "
            "name the dataset the model was trained on (--dataset)"
        )
    if found.in_channels != info.input_shape[0]:
        raise CheckpointError(
            f"{src} takes {found.in_channels}-channel images but dataset {info.name} has {info.input_shape[0]}: "
            "name the dataset the model was trained on (--dataset)"
        )


def _normalisation(
    src: Path, found: foreign.Recognised, mean: Sequence[float] | None, std: Sequence[float] | None
) -> tuple[tuple[float, ...], tuple[float, ...], str]:
    """(mean, std, where they came from): the file's mu/sigma, the caller's values, or none (0 and 1)."""
    if (mean is None) != (std is None):
        raise ConfigError("give both mean and std, or neither")
    channels = found.in_channels
    given = None if mean is None else (_values("mean", mean, channels), _values("std", std or (), channels))
    if found.mean is not None and found.std is not None:
        if given is not None and not _close((found.mean, found.std), given):
            raise CheckpointError(
                f"{src} carries its own normalisation (mean {list(found.mean)}, std {list(found.std)}) that "
                f"differs from the mean/std given ({list(given[0])}, {list(given[1])}): leave --mean/--std out"
            )
        return found.mean, found.std, "file"
    if given is not None:
        return given[0], given[1], "given"
    return (0.0,) * channels, (1.0,) * channels, "none"


def _values(field: str, values: Sequence[float], channels: int) -> tuple[float, ...]:
    try:
        out = tuple(float(v) for v in ([values] if isinstance(values, int | float) else values))
    except (TypeError, ValueError):
        raise ConfigError(f"{field} must be a list of numbers, got {values!r}") from None
    if len(out) == 1:
        out = out * channels
    if len(out) != channels or not all(math.isfinite(v) for v in out):
        raise ConfigError(f"{field} needs {channels} finite numbers (one per input channel), got {list(out)}")
    if field == "std" and not all(v > 0 for v in out):
        raise ConfigError(f"std must be positive, got {list(out)}")
    return out


def _close(a: tuple[tuple[float, ...], ...], b: tuple[tuple[float, ...], ...]) -> bool:
    return all(abs(x - y) <= 1e-6 for pa, pb in zip(a, b) for x, y in zip(pa, pb))


def _build(
    src: Path, found: foreign.Recognised, info: DatasetInfo, mean: Sequence[float], std: Sequence[float]
) -> nn.Module:
    model = create_model(
        found.arch,
        num_classes=found.num_classes,
        in_channels=found.in_channels,
        input_size=info.input_shape[-1],
        mean=list(mean),
        std=list(std),
        **found.arch_args,
    )
    state = {f"net.{k}": v for k, v in found.state.items()}
    state.update({k: v for k, v in model.state_dict().items() if k.startswith("normalize.")})
    load_state_strict(model, state, str(src))
    return model.eval()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def describe_import(checkpoint: str | Path) -> dict[str, Any]:
    """What an imported checkpoint's sidecar says of its source (for the command line's summary)."""
    return dict(read_meta(checkpoint).get("imported_from") or {})


__all__ = ["CIFAR10_MEAN", "CIFAR10_STD", "NEEDS_NORMALISATION", "dataset_info", "describe_import", "import_model"]
