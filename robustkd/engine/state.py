"""Resumable training state in safetensors: model, optimiser tensors, and JSON for the rest."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from robustkd.checkpoint import load_state_strict
from robustkd.errors import CheckpointError
from robustkd.io import atomic_write_bytes

STATE_FILE = "resume.safetensors"


def save_state(run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, info: dict[str, Any]) -> None:
    """One file, one atomic rename: the commit point of an epoch."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    opt = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for idx, entry in opt["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    meta = {"info": info, "param_groups": opt["param_groups"], "scalars": scalars}
    blob = st_save(tensors, metadata={"state": json.dumps(meta, default=_jsonable)})
    atomic_write_bytes(run_dir / STATE_FILE, blob)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, tuple):
        return list(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    raise TypeError(f"cannot store {type(obj).__name__} in the training state")


class DamagedStateError(CheckpointError):
    """The resume state cannot be read (truncated, overwritten, not safetensors): the epoch it commits is lost."""


def load_state(run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore model and optimiser in place; returns the saved ``info`` dict.

    Raises :class:`DamagedStateError` when the file cannot be read, and a plain ``CheckpointError`` when it
    is readable but belongs to another model.
    """
    path = run_dir / STATE_FILE
    tensors, meta = _read(path)
    model_state = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    load_state_strict(model, model_state, str(path))
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    for idx, entry in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(entry)
    groups = meta["param_groups"]
    for group in groups:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    return meta["info"]


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    try:
        tensors = st_load(path.read_bytes())
        with safe_open(str(path), framework="pt") as handle:
            meta = json.loads((handle.metadata() or {})["state"])
        if not all(isinstance(meta.get(key), dict | list) for key in ("info", "param_groups", "scalars")):
            raise KeyError("info, param_groups or scalars")
    except (OSError, SafetensorError, KeyError, ValueError, AttributeError) as err:
        raise DamagedStateError(f"{path} is not a readable training state ({type(err).__name__}: {err})") from err
    return tensors, meta
