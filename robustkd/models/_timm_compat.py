"""Optional timm models (``create_model("timm/<name>")``), importable without torchvision and offline.

timm imports torchvision at load time for a handful of names (``FrozenBatchNorm2d``, transforms and
dataset classes used by its data pipeline). torchvision has no build matching the pinned torch on our
machines, so when it cannot be imported a minimal stand-in is installed, and only when a timm model is
requested. Model creation needs nothing from it beyond ``FrozenBatchNorm2d``.
"""

from __future__ import annotations

import difflib
import enum
import importlib.machinery
import importlib.util
import os
import sys
import types
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import nn

from robustkd.errors import ConfigError, RegistryError

STUB_VERSION = "0.0.0+robustkd.stub"


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine parameters, all stored as buffers."""

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)


class InterpolationMode(enum.Enum):
    """The values torchvision uses, which timm maps to and from strings."""

    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


def _unavailable(module: str, name: str) -> type:
    def fail(*args: Any, **kwargs: Any) -> NoReturn:
        raise ImportError(
            f"{module}.{name} is unavailable: torchvision is not installed (robustkd put a stand-in in its "
            "place so timm models can be built; timm's data pipeline needs the real torchvision)"
        )

    # A class, because timm subclasses some of these names at import time.
    return type(name, (), {"__init__": fail, "__module__": module})


def _stub_module(name: str, **attrs: Any) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    module.__path__ = []  # a package, so only the submodules registered below resolve
    # importlib.util.find_spec (torch's ONNX exporter probes torchvision with it) fails on a None spec.
    module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)

    def __getattr__(attr: str) -> type:
        if attr.startswith("__"):
            raise AttributeError(attr)  # the import system probes dunders; answer them honestly
        placeholder = _unavailable(name, attr)
        setattr(module, attr, placeholder)
        return placeholder

    module.__getattr__ = __getattr__  # type: ignore[method-assign]
    return module


def _torchvision_importable() -> bool:
    if "torchvision" in sys.modules:
        return True
    try:
        import torchvision  # noqa: F401
    except Exception:
        # A build mismatched with torch fails with RuntimeError, not ImportError; either way it is unusable.
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        return False
    return True


def install_torchvision_stub() -> bool:
    """Put a minimal ``torchvision`` into ``sys.modules`` if the real one cannot be imported.

    Returns True when the stand-in is (now) in place.
    """
    if _torchvision_importable():
        return getattr(sys.modules["torchvision"], "__version__", "") == STUB_VERSION
    functional = _stub_module("torchvision.transforms.functional", InterpolationMode=InterpolationMode)
    misc = _stub_module("torchvision.ops.misc", FrozenBatchNorm2d=FrozenBatchNorm2d)
    modules = {
        "torchvision": _stub_module("torchvision", __version__=STUB_VERSION),
        "torchvision.ops": _stub_module("torchvision.ops", misc=misc),
        "torchvision.ops.misc": misc,
        "torchvision.transforms": _stub_module(
            "torchvision.transforms", functional=functional, InterpolationMode=InterpolationMode
        ),
        "torchvision.transforms.functional": functional,
        "torchvision.datasets": _stub_module("torchvision.datasets"),
    }
    # `torchvision.models` stays absent: timm's feature-extraction import is guarded by `except ImportError`.
    for name, module in modules.items():
        sys.modules[name] = module
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(modules[parent], child, module)
    return True


def import_timm() -> types.ModuleType:
    """Import timm offline, with a torchvision stand-in when needed; ConfigError if timm is missing."""
    # Never reach the Hugging Face hub: weights come from local files only. Set before the first import,
    # because huggingface_hub reads it into a constant then.
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_OFFLINE = True
    if importlib.util.find_spec("timm") is None:
        raise ConfigError("timm models need timm and huggingface_hub: pip install --no-deps timm huggingface_hub")
    install_torchvision_stub()
    import timm

    return timm


def create_timm_model(
    name: str,
    *,
    num_classes: int,
    in_channels: int,
    input_size: int,
    pretrained: bool = False,
    pretrained_file: str | os.PathLike[str] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build timm model ``name``; pretrained weights only from ``pretrained_file`` (never downloaded)."""
    if pretrained and pretrained_file is None:
        raise ConfigError(
            f"timm/{name}: pretrained weights are never downloaded; pass pretrained_file=<local weights file>"
        )
    timm = import_timm()
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(repr('timm/' + c) for c in close)}?" if close else ""
        raise RegistryError(f"unknown timm model {name!r}{hint}")
    args: dict[str, Any] = dict(kwargs, num_classes=num_classes, in_chans=in_channels)
    if pretrained_file is not None:
        path = Path(pretrained_file)
        if not path.is_file():
            raise ConfigError(f"timm/{name}: pretrained_file {str(path)!r} does not exist")
        # An empty source makes timm take the file instead of its default hub location.
        overlay: dict[str, Any] = {"file": str(path), "source": ""}
        file_classes = _classes_in_file(timm, name, path)
        if file_classes is not None:
            # timm keeps the file's classifier only when the class counts match; compare with the file's,
            # not with the count of the weights timm would have downloaded.
            overlay["num_classes"] = file_classes
        args.update(pretrained=True, pretrained_cfg_overlay=overlay)
    try:
        # Transformers size their position embeddings from img_size; other models reject the argument.
        if "img_size" not in kwargs:
            try:
                return timm.create_model(name, img_size=input_size, **args)
            except TypeError as error:
                if "img_size" not in str(error):
                    raise
        return timm.create_model(name, **args)
    except TypeError as error:
        raise ConfigError(f"timm/{name}: {error}") from None


def _classes_in_file(timm: types.ModuleType, name: str, path: Path) -> int | None:
    classifier = timm.models.get_pretrained_cfg_value(name, "classifier")
    if not isinstance(classifier, str):
        return None
    # timm's loader: safetensors, or torch.load with weights_only=True.
    weight = timm.models.load_state_dict(str(path)).get(classifier + ".weight")
    return None if weight is None else int(weight.shape[0])
