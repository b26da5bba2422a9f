"""Checkpoints: safetensors weights plus a JSON sidecar from which the model is rebuilt.

A checkpoint ``runs/x/best`` is the pair ``best.safetensors`` / ``best.json``. The metadata is also
embedded in the safetensors header, so the weights file alone is enough and a kill between the two
renames never pairs new weights with an old description (the sidecar names the weights' SHA-256).
Nothing here unpickles: foreign ``.pt`` files load with ``torch.load(weights_only=True)`` only.
"""

from __future__ import annotations

import hashlib
import json
import math
import pickle
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from robustkd._version import __version__
from robustkd.errors import CheckpointError, ConfigError, RobustKDError
from robustkd.io import atomic_write_bytes, atomic_write_json
from robustkd.models import WrappedModel, create_model, foreign, model_shapes, wrap
from robustkd.models.wrap import build_user_model, is_user_arch

FORMAT = "robustkd-checkpoint"
FORMAT_VERSION = 1
META_KEY = "robustkd"
REQUIRED = ("arch", "num_classes", "input_shape", "mean", "std")
# Weights without a robustkd description (architecture, data): foreign state dicts, read with weights_only=True.
FOREIGN_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".t7")  # .t7: the ARD repository's checkpoints


def resolve(path: str | Path) -> Path:
    """Map ``runs/x`` (-> best), ``runs/x/best`` or ``runs/x/best.safetensors`` to the weights file."""
    path = Path(path)
    if path.is_dir():
        path = path / "best"
    if path.suffix in (".json", ".safetensors"):
        path = path.with_suffix("")
    weights = path.with_name(path.name + ".safetensors")
    if not weights.is_file():
        raise CheckpointError(f"no checkpoint at {path}: {weights} does not exist")
    return weights


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    meta: Mapping[str, Any],
    extra: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``path.safetensors`` and ``path.json`` atomically; returns the weights path.

    ``meta`` must describe how to rebuild the model (arch, arch_args, num_classes, input_shape, mean,
    std) and may carry anything JSON-able besides (dataset, method, config, metrics).
    """
    missing = [k for k in REQUIRED if k not in meta]
    if missing:
        raise CheckpointError(f"checkpoint metadata lacks {', '.join(missing)}")
    path = Path(path)
    if path.suffix in (".json", ".safetensors"):
        path = path.with_suffix("")
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    for key, value in (extra or {}).items():
        tensors[f"__extra__.{key}"] = value.detach().cpu().contiguous()
    full = {"format": FORMAT, "format_version": FORMAT_VERSION, "robustkd_version": __version__, **meta}
    full.setdefault("torch_version", torch.__version__)
    blob = st_save(tensors, metadata={META_KEY: json.dumps(full, sort_keys=True, default=str)})
    sidecar = {**full, "weights_sha256": hashlib.sha256(blob).hexdigest()}
    weights = path.with_name(path.name + ".safetensors")
    atomic_write_bytes(weights, blob)
    atomic_write_json(path.with_name(path.name + ".json"), sidecar)
    return weights


def checkpoint_bytes(model: nn.Module) -> int:
    """Bytes of the tensors one checkpoint of ``model`` holds (the file adds a small header)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def read_checkpoint(
    path: str | Path,
) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, torch.Tensor]]:
    """Return (state_dict, metadata, extra tensors) of a robustkd checkpoint."""
    weights = resolve(path)
    try:
        blob = weights.read_bytes()
    except OSError as err:
        raise CheckpointError(f"cannot read {weights} ({err})") from err
    try:
        tensors = st_load(blob)
        with safe_open(str(weights), framework="pt") as handle:
            header = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{weights} is not a readable safetensors file ({err})") from err
    meta = _read_meta(weights, blob, header)
    state = {k: v for k, v in tensors.items() if not k.startswith("__extra__.")}
    extra = {k[len("__extra__.") :]: v for k, v in tensors.items() if k.startswith("__extra__.")}
    return state, meta, extra


def _read_meta(weights: Path, blob: bytes, header: Mapping[str, str]) -> dict[str, Any]:
    sidecar = weights.with_suffix(".json")
    if sidecar.is_file():
        try:
            meta = json.loads(sidecar.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, OSError) as err:
            raise CheckpointError(f"{sidecar} is not valid JSON ({err})") from err
        if not isinstance(meta, dict):
            raise CheckpointError(f"{sidecar} is not a checkpoint description (a JSON object)")
        if meta.get("weights_sha256") == hashlib.sha256(blob).hexdigest():
            return meta
        warnings.warn(
            f"{sidecar} describes other weights than {weights.name}; using the metadata inside the weights file",
            stacklevel=3,
        )
    if META_KEY not in header:
        raise CheckpointError(
            f"{weights} has no robustkd metadata and no matching sidecar {sidecar.name}; "
            "load foreign weights with load_model(path, arch=...)"
        )
    try:
        meta = json.loads(header[META_KEY])
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{weights}: corrupt metadata in the safetensors header ({err})") from err
    if not isinstance(meta, dict):
        raise CheckpointError(f"{weights}: the metadata in the safetensors header is not a JSON object")
    return meta


def build_from_meta(
    meta: Mapping[str, Any], state: Mapping[str, torch.Tensor] | None = None, source: str = "checkpoint"
) -> nn.Module:
    """Rebuild the (untrained) model a checkpoint describes.

    With ``state`` (the weights it is for), the description is first checked against those tensors on the
    meta device, so an edited ``arch_args`` is refused before anything is allocated.
    """
    missing = [k for k in REQUIRED if k not in meta]
    if missing:
        raise CheckpointError(f"checkpoint metadata lacks {', '.join(missing)}")
    if not isinstance(meta["arch"], str):
        raise CheckpointError(f"{source}: 'arch' in the checkpoint metadata must be a name, got {meta['arch']!r}")
    if is_user_arch(meta["arch"]):
        raise CheckpointError(user_arch_message(meta["arch"], source))
    _check_normalisation(meta, source)
    try:
        shape = meta["input_shape"]
        kwargs = {
            "num_classes": int(meta["num_classes"]),
            "in_channels": int(shape[0]),
            "input_size": int(shape[-1]),
            "mean": meta["mean"],
            "std": meta["std"],
            **dict(meta.get("arch_args") or {}),
        }
    except (TypeError, ValueError, IndexError, KeyError) as err:
        raise CheckpointError(f"checkpoint metadata does not describe a model ({type(err).__name__}: {err})") from err
    if state is not None and not meta["arch"].startswith("timm/"):  # timm bodies are not built on meta
        _check_described_shapes(meta, kwargs, state, source)
    try:
        return create_model(meta["arch"], **kwargs)
    except (TypeError, ValueError) as err:  # not ConfigError: that names its field already
        if isinstance(err, RobustKDError):
            raise
        raise CheckpointError(f"checkpoint metadata does not describe a model ({type(err).__name__}: {err})") from err


def _check_normalisation(meta: Mapping[str, Any], source: str) -> None:
    # JSON reads NaN and Infinity; a model normalising with them outputs NaN for every input.
    for key in ("mean", "std"):
        value = meta[key]
        try:
            values = [float(v) for v in (value if isinstance(value, list | tuple) else [value])]
        except (TypeError, ValueError, OverflowError):
            raise CheckpointError(
                f"{source}: '{key}' in the checkpoint metadata must be numbers, got {value!r}"
            ) from None
        if not all(math.isfinite(v) for v in values):
            raise CheckpointError(f"{source}: '{key}' in the checkpoint metadata must be finite, got {value!r}")
        if key == "std" and not all(v > 0 for v in values):
            raise CheckpointError(f"{source}: 'std' in the checkpoint metadata must be > 0, got {value!r}")


def _check_described_shapes(
    meta: Mapping[str, Any], kwargs: dict[str, Any], state: Mapping[str, torch.Tensor], source: str
) -> None:
    """Refuse metadata whose model (built on the meta device: nothing allocated) differs from the weights."""
    args = ", ".join(f"{k}={v!r}" for k, v in dict(meta.get("arch_args") or {}).items()) or "none"
    try:
        described = model_shapes(meta["arch"], **kwargs)
    except ConfigError as err:
        raise CheckpointError(f"{source}: the metadata's arch {meta['arch']!r} with arch_args {args}: {err}") from None
    problems = _mismatches({k: (v, None) for k, v in described.items()}, state)
    if problems:
        total = sum(math.prod(v) for v in described.values())
        raise CheckpointError(
            f"{source} does not match the architecture: {'; '.join(problems)} "
            f"(the metadata's arch {meta['arch']!r} with arch_args {args} describes {total:,} parameters, the "
            f"weights file holds {sum(t.numel() for t in state.values()):,}; the metadata was edited or is not "
            "for these weights)"
        )


def load_state_strict(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """``load_state_dict`` that explains a mismatch in terms of keys, shapes and dtypes."""
    own = {k: (tuple(v.shape), v) for k, v in model.state_dict().items()}
    problems = _mismatches(own, state)
    if problems:
        raise CheckpointError(f"{source} does not match the architecture: " + "; ".join(problems))
    model.load_state_dict(state, strict=True)


def _mismatches(
    own: Mapping[str, tuple[tuple[int, ...], torch.Tensor | None]], state: Mapping[str, torch.Tensor]
) -> list[str]:
    """Missing / unexpected keys, wrong shapes and (where ``own`` has a tensor) wrong dtypes, described."""
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {shape}"
        for k, (shape, _) in own.items()
        if k in state and tuple(state[k].shape) != shape
    ]
    dtypes = [
        f"{k}: file {state[k].dtype} vs model {tensor.dtype}"
        for k, (_, tensor) in own.items()
        if k in state
        and tensor is not None
        and state[k].dtype != tensor.dtype
        and not (state[k].is_floating_point() and tensor.is_floating_point())
    ]
    problems = []
    for what, items in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", shapes)):
        if items:
            problems.append(f"{what} {_few(items)}")
    if dtypes:
        problems.append(f"wrong dtypes {_few(dtypes)}")
    return problems


def _few(items: list[str], n: int = 4) -> str:
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def load_model(
    path: str | Path,
    *,
    arch: str | None = None,
    model: nn.Module | None = None,
    device: str | torch.device | None = None,
    **arch_kwargs: Any,
) -> nn.Module:
    """Load a model in eval mode.

    A robustkd checkpoint is rebuilt from its metadata alone, except one whose architecture is user code
    (``pkg.mod:Class``, saved from a module of one's own): robustkd never imports that on its own, so pass
    ``model=`` (an instance, plain or :func:`~robustkd.models.wrap`-ped, the weights loaded strictly into it)
    or ``arch="pkg.mod:Class"`` (imported because the caller named it, built with the recorded ``arch_args``
    updated by ``arch_kwargs``). A foreign ``.pt``/``.pth`` state dict is read with ``weights_only=True``
    (refused when it holds anything but tensors); its architecture is recognised from its key names and
    shapes (docs/import.md), or checked against ``arch`` when one is named.
    """
    path = Path(path)
    if path.suffix in FOREIGN_SUFFIXES:
        if model is not None:
            raise CheckpointError(f"{path}: model= loads robustkd checkpoints; for a bare state dict pass arch=")
        loaded = _load_foreign(path, arch, arch_kwargs)
    else:
        loaded = _load_own(path, arch, model, arch_kwargs)
    loaded.eval()
    return loaded.to(device) if device is not None else loaded


def _load_own(path: Path, arch: str | None, model: nn.Module | None, arch_kwargs: dict[str, Any]) -> nn.Module:
    """A robustkd checkpoint into the model its metadata, ``model`` or the named ``arch`` import path gives."""
    state, meta, _ = read_checkpoint(path)
    source = str(resolve(path))
    if model is not None:
        loaded = _as_checkpoint_model(model, meta, state, source)
    elif is_user_arch(arch):
        assert arch is not None
        args = {**dict(meta.get("arch_args") or {}), **arch_kwargs}
        try:
            built = build_user_model(arch, args)
        except ConfigError as err:
            raise CheckpointError(f"{source}: {err}") from None
        loaded = _as_checkpoint_model(built, meta, state, source)
    else:
        loaded = build_from_meta(meta, state, source)
    load_state_strict(loaded, state, source)
    loaded.robustkd_meta = dict(meta)  # type: ignore[assignment]
    return loaded


def _as_checkpoint_model(
    model: nn.Module, meta: Mapping[str, Any], state: Mapping[str, torch.Tensor], source: str
) -> nn.Module:
    """``model`` as it is when it has the checkpoint's layout, else behind the checkpoint's normalisation."""
    if not isinstance(model, nn.Module):
        raise CheckpointError(f"{source}: model= must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, WrappedModel) or set(model.state_dict()) == set(state):
        return model
    _check_normalisation(meta, source)
    shape = meta.get("input_shape")
    try:
        return wrap(
            model,
            mean=meta["mean"],
            std=meta["std"],
            input_shape=tuple(int(v) for v in shape) if shape is not None else None,
            num_classes=int(meta["num_classes"]) if meta.get("num_classes") is not None else None,
            arch_args=meta.get("arch_args") or None,
        )
    except (ConfigError, TypeError, ValueError) as err:
        raise CheckpointError(f"{source}: its metadata does not describe a model ({err})") from None


def user_arch_message(arch: str, source: str) -> str:
    """Why a checkpoint of user code is not rebuilt from its file, and the two ways to load it."""
    name = arch.rsplit(":", 1)[-1]
    return (
        f"{source}: its architecture is user code {arch!r}, which robustkd never imports because a file names it; "
        f"load it with load_model(path, model={name}(...)) (weights loaded strictly into your instance) or "
        f"load_model(path, arch={arch!r}) (imported because you named it)"
    )


def read_meta(path: str | Path) -> dict[str, Any]:
    """Metadata of a robustkd checkpoint without building the model."""
    return read_checkpoint(path)[1]


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict in a foreign ``.pt``/``.pth`` file, read with ``weights_only=True`` (nothing in it runs).

    Wrappers are opened (``{'state_dict': ...}``, ``{'model_state_dict': ...}``, ``{'net': ..., 'optimizer':
    ...}``; the other entries are ignored) and ``module.`` prefixes removed. ``CheckpointError`` (one line naming
    the file and what to do) for a missing, damaged or truncated file and for one holding more than tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no file at {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only" not in str(err).lower():
            raise CheckpointError(
                f"{path} is not a readable PyTorch file ({_first_line(err)}); download or copy it again"
            ) from err
        raise CheckpointError(
            f"{path} holds more than tensors (it would need full unpickling, which can run code): refused. "
            f"Re-save it as a plain state dict of tensors, or convert it to safetensors. ({_first_line(err)})"
        ) from err
    except Exception as err:  # damaged files raise KeyError, EOFError, RuntimeError, ...; nothing ran
        raise CheckpointError(
            f"{path} is not a readable PyTorch file ({type(err).__name__}: {_first_line(err)}); it may be "
            "truncated or damaged: download or copy it again"
        ) from err
    return _find_state_dict(obj, path)


def _load_foreign(path: Path, arch: str | None, kwargs: dict[str, Any]) -> nn.Module:
    state = read_state_dict(path)
    if foreign.formats_of(state) and not any(k.startswith(("net.", "normalize.")) for k in state):
        return _load_recognised(path, state, arch, kwargs)
    if arch is None:
        raise CheckpointError(
            f"{path} is a bare state dict in no known foreign format: name its architecture (arch=..., --teacher_arch)"
        )
    model = create_model(arch, **kwargs)
    if not any(k.startswith(("net.", "normalize.")) for k in state):
        # Weights of the bare network: our models carry Normalize in front of it.
        state = {f"net.{k}": v for k, v in state.items()}
        for key, value in model.state_dict().items():
            if key.startswith("normalize."):
                state[key] = value
    load_state_strict(model, state, str(path))
    meta = {"arch": arch, "arch_args": {}, "source": str(path)}
    model.robustkd_meta = meta  # type: ignore[assignment]
    return model


def _load_recognised(path: Path, state: dict[str, torch.Tensor], arch: str | None, kwargs: dict[str, Any]) -> nn.Module:
    """A state dict in a known foreign format (RobustBench, TRADES, ARD, RSLAD), renamed onto our architecture."""
    common = ("num_classes", "in_channels", "input_size", "mean", "std")
    arch_args = {k: v for k, v in kwargs.items() if k not in common and v is not None}
    found = foreign.recognise(state, str(path), arch=arch, arch_args=arch_args)
    for key, value in (("num_classes", found.num_classes), ("in_channels", found.in_channels)):
        if kwargs.get(key) is not None and int(kwargs[key]) != value:
            raise CheckpointError(
                f"{path} has {value} {key.replace('_', ' ').replace('num ', '')} but {kwargs[key]} were asked for; "
                "check the dataset or the file"
            )
    mean = kwargs.get("mean") if kwargs.get("mean") is not None else found.mean
    std = kwargs.get("std") if kwargs.get("std") is not None else found.std
    model = create_model(
        found.arch,
        num_classes=found.num_classes,
        in_channels=found.in_channels,
        input_size=kwargs.get("input_size") or 32,
        mean=mean,
        std=std,
        **found.arch_args,
    )
    full = {f"net.{k}": v for k, v in found.state.items()}
    full.update({k: v for k, v in model.state_dict().items() if k.startswith("normalize.")})
    load_state_strict(model, full, str(path))
    model.robustkd_meta = {  # type: ignore[assignment]
        "arch": found.arch,
        "arch_args": dict(found.arch_args),
        "num_classes": found.num_classes,
        "source": str(path),
        "format": found.format,
    }
    return model


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [""])[0][:300]


def _find_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    for key in ("state_dict", "model", "model_state_dict", "net"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items()):
        raise CheckpointError(
            f"{path} is not a state dict (names mapped to tensors, or one under 'state_dict', 'model', "
            "'model_state_dict' or 'net'); re-save it with torch.save(model.state_dict(), path)"
        )
    # Weights saved from nn.DataParallel / DDP carry a 'module.' prefix.
    return {k.removeprefix("module."): v for k, v in obj.items()}


def check_compatible(teacher: Mapping[str, Any], student: Mapping[str, Any], *, what: str = "teacher") -> None:
    """Refuse a teacher and a student (or a dataset's description) that differ in classes or input shape.

    Both sides are sidecar-like mappings (``num_classes``, ``input_shape``); a key missing on either side is
    not compared (a foreign ``.pt`` file does not describe itself). The one compatibility rule every
    command applies: the engine before distilling, the jobs before evaluating or certifying a pair.
    """
    problems = []
    for key, name in (("num_classes", "classes"), ("input_shape", "input shape")):
        if teacher.get(key) is not None and student.get(key) is not None:
            a, b = teacher[key], student[key]
            a, b = (tuple(a), tuple(b)) if key == "input_shape" else (int(a), int(b))
            if a != b:
                problems.append(
                    f"{name} ({list(a) if isinstance(a, tuple) else a} vs {list(b) if isinstance(b, tuple) else b})"
                )
    if problems:
        raise ConfigError(
            f"{what}: teacher and student differ in "
            + "; ".join(problems)
            + " (distillation, faithfulness and certificates compare the two on the same inputs and classes)"
        )
