"""Make auto_LiRPA 0.3 (2022) import and trace on numpy 2 and torch 2.x.

auto_LiRPA reaches into three things newer releases moved or removed. ``apply()`` restores each of them,
only when the auto_LiRPA backend is requested (never on ``import robustkd``), and only if it is missing, so
calling it twice, or on versions that still have the names, changes nothing.

1. ``numpy.lib.arraysetops.isin`` (numpy 2 dropped the module; ``numpy.isin`` is the same function).
2. ``torch.onnx.symbolic_helper._set_opset_version`` (torch 2.x keeps the opset in the TorchScript
   exporter's ``GLOBALS`` object instead of behind a setter).
3. ``node[key]`` on ``torch._C.Node`` (torch 2.x removed ``__getitem__``; the exporter reads attributes
   with its internal ``_node_get`` helper, which picks the typed getter from ``kindOf``).

``patch_bounded_module()`` fixes one more thing after the import: ``BoundedModule._named_members``
overrides a torch method without the ``remove_duplicate`` argument torch 2.x passes, so
``BoundedModule.parameters()`` (used by CROWN on conv layers) raises ``TypeError``. auto_LiRPA's version
always removes duplicates, which is torch's default, so the argument is accepted and dropped.
"""

from __future__ import annotations

import sys
import types

_applied = False


def _patch_numpy() -> None:
    import numpy as np

    if "numpy.lib.arraysetops" in sys.modules:
        return
    try:  # numpy 1.x still ships the module
        import numpy.lib.arraysetops

        return
    except ImportError:
        pass
    module = types.ModuleType("numpy.lib.arraysetops")
    module.isin = np.isin
    module.unique = np.unique
    module.in1d = getattr(np, "in1d", np.isin)
    sys.modules["numpy.lib.arraysetops"] = module
    np.lib.arraysetops = module


def _patch_opset() -> None:
    import torch.onnx.symbolic_helper as helper

    if hasattr(helper, "_set_opset_version"):
        return
    from torch.onnx._internal.torchscript_exporter._globals import GLOBALS

    def _set_opset_version(opset_version: int) -> None:
        GLOBALS.export_onnx_opset_version = opset_version

    helper._set_opset_version = _set_opset_version


def _patch_node_getitem() -> None:
    import torch

    node_type = torch._C.Node
    if hasattr(node_type, "__getitem__"):
        return

    def _getitem(node, key: str):
        # Same as the exporter's _node_get: kindOf names the typed accessor ("i", "f", "s", "t", "is", ...).
        return getattr(node, node.kindOf(key))(key)

    node_type.__getitem__ = _getitem


def apply() -> None:
    """Install the three shims (idempotent)."""
    global _applied
    if _applied:
        return
    _patch_numpy()
    _patch_opset()
    _patch_node_getitem()
    _applied = True


def patch_bounded_module(bounded_module_class: type) -> None:
    """Let ``BoundedModule._named_members`` accept torch 2.x's ``remove_duplicate`` argument (idempotent)."""
    original = bounded_module_class._named_members
    if getattr(original, "_robustkd_shim", False):
        return

    def _named_members(self, get_members_fn, prefix="", recurse=True, remove_duplicate=True):
        return original(self, get_members_fn, prefix=prefix, recurse=recurse)

    _named_members._robustkd_shim = True
    bounded_module_class._named_members = _named_members
