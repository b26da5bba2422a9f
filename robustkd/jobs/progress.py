"""Saved progress of a long job, so a killed run continues where it stopped.

A progress file is JSON written atomically. It carries a key: a hash of the settings, the model weights
and the data. A file whose key differs (other settings, retrained weights, other points), or that cannot
be read, is ignored with a warning and the work starts over; it is never trusted blindly.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from robustkd.io import atomic_write_json

FORMAT = "robustkd-progress-v1"


def fingerprint(settings: Mapping[str, Any], tensors: Iterable[tuple[str, Tensor]]) -> str:
    """SHA-256 over JSON ``settings`` and the dtype, shape and bytes of every named tensor."""
    digest = hashlib.sha256(FORMAT.encode())
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for name, tensor in tensors:
        t = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"\0{name}\0{t.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def model_tensors(prefix: str, model: nn.Module | None) -> list[tuple[str, Tensor]]:
    """(name, tensor) pairs of a model's weights and buffers, for :func:`fingerprint`."""
    if model is None:
        return []
    return [(f"{prefix}.{k}", v) for k, v in sorted(model.state_dict().items())]


class ProgressFile:
    """Load, save and remove the progress of one evaluation; ``path=None`` keeps nothing."""

    def __init__(self, path: str | Path | None, key: str) -> None:
        self.path = Path(path) if path is not None else None
        self.key = key
        self.state: dict[str, Any] = self._load()

    def _load(self) -> dict[str, Any]:
        if self.path is None or not self.path.is_file():
            return {}
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError) as err:
            warnings.warn(f"ignoring the unreadable progress file {self.path} ({err}); starting over", stacklevel=3)
            return {}
        if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("state"), dict):
            warnings.warn(f"ignoring {self.path}: not a robustkd progress file; starting over", stacklevel=3)
            return {}
        if data.get("key") != self.key:
            warnings.warn(
                f"ignoring {self.path}: it was saved for other settings, weights or data; starting over",
                stacklevel=3,
            )
            return {}
        return data["state"]

    def save(self, state: dict[str, Any]) -> None:
        self.state = state
        if self.path is not None:
            atomic_write_json(self.path, {"format": FORMAT, "key": self.key, "state": state})

    def discard(self) -> None:
        """Forget the saved state (after the final result is written, or when it proved unusable)."""
        self.state = {}
        if self.path is not None:
            self.path.unlink(missing_ok=True)


def progress_path(out: str | Path) -> Path:
    """Where the progress of a job writing ``out`` is kept until it finishes."""
    out = Path(out)
    return out.with_name(out.name.removesuffix(".json") + ".progress.json")
