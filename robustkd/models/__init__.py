"""Architecture registry: ``create_model(arch, ...)`` returns ``Sequential(normalize=..., net=...)``.

Every model takes images in [0, 1] and normalises them itself. The CNNs and ResNets are built only from
``layers.BOUNDABLE_TYPES`` so ``robustkd.certify`` can bound them; MobileNetV2, the ViT and timm models
are for empirical evaluation only.
"""

from __future__ import annotations

# Importing the architecture modules registers them.
from robustkd.models import cnn, foreign, mobilenet, resnet, vit  # noqa: F401
from robustkd.models._factory import (
    MODELS,
    ModelInfo,
    count_parameters,
    create_model,
    list_models,
    model_info,
    model_options,
    model_shapes,
    register_model,
)
from robustkd.models.layers import BOUNDABLE_TYPES, Normalize, Residual, is_boundable
from robustkd.models.wrap import WrappedModel, wrap

__all__ = [
    "BOUNDABLE_TYPES",
    "MODELS",
    "ModelInfo",
    "Normalize",
    "Residual",
    "WrappedModel",
    "count_parameters",
    "create_model",
    "is_boundable",
    "list_models",
    "model_info",
    "model_options",
    "model_shapes",
    "register_model",
    "wrap",
]
