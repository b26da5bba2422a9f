"""The frozen teacher's memory layout: channels-last convolution weights change which kernels run, not results."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from test_engine import _cfg
from torch import nn

import robustkd
import robustkd.engine.loop as loop
from robustkd.certify import interval_bounds
from robustkd.config import validate
from robustkd.errors import ConfigError
from robustkd.models import create_model
from robustkd.runtime import teacher_channels_last

CL = torch.channels_last
CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # a device name only: no CUDA is needed to ask the rule


def _conv(arch: str = "dm_small", channels: int = 1, size: int = 16) -> nn.Module:
    torch.manual_seed(0)
    return create_model(arch, num_classes=4, in_channels=channels, input_size=size).eval().requires_grad_(False)


def test_auto_picks_channels_last_on_a_cpu_for_a_teacher_with_convolutions() -> None:
    conv, mlp = _conv(), nn.Sequential(nn.Flatten(), nn.Linear(256, 4))
    assert teacher_channels_last(conv, CPU)
    assert not teacher_channels_last(mlp, CPU)  # nothing to reorder
    assert not teacher_channels_last(conv, CUDA)  # on CUDA auto follows the run's channels_last switch
    assert teacher_channels_last(conv, CUDA, cuda=True)
    assert teacher_channels_last(mlp, CPU, "always")
    assert not teacher_channels_last(conv, CPU, "never")


@pytest.mark.parametrize(
    ("arch", "channels", "size"),
    [("dm_small", 1, 16), ("dm_medium", 3, 16), ("small_cnn", 1, 16), ("resnet18", 3, 16), ("mobilenet_v2", 3, 16)],
)
def test_a_channels_last_teacher_gives_the_same_logits_and_input_gradients(arch: str, channels: int, size: int) -> None:
    plain = _conv(arch, channels, size)
    fast = copy.deepcopy(plain).to(memory_format=CL)
    assert any(p.dim() == 4 and not p.is_contiguous() for p in fast.parameters())  # the layout did change
    x = torch.rand(6, channels, size, size)
    y = torch.arange(6) % 4
    outs = []
    for net in (plain, fast):
        leaf = x.clone().requires_grad_(True)
        logits = net(leaf)
        (grad,) = torch.autograd.grad(F.cross_entropy(logits, y), leaf)
        outs.append((logits, grad))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs[1][1], outs[0][1], rtol=1e-4, atol=1e-6)


def test_bounds_through_a_channels_last_teacher_equal_the_contiguous_ones() -> None:
    # The faithful method bounds its teacher: certification must read channels-last weights as well.
    plain = _conv("dm_medium", 3, 16)
    fast = copy.deepcopy(plain).to(memory_format=CL)
    x = torch.rand(4, 3, 16, 16)
    for method in ("ibp", "crown-ibp"):
        lo, up = interval_bounds(plain, x, 2 / 255, method=method)
        lo_cl, up_cl = interval_bounds(fast, x, 2 / 255, method=method)
        torch.testing.assert_close(lo_cl, lo, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(up_cl, up, rtol=1e-5, atol=1e-5)


def test_an_unknown_layout_setting_is_refused(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"^teacher_channels_last: must be one of auto, always, never, got 'on'$"):
        validate(_cfg(tmp_path, teacher_channels_last="on"))


# --- through the engine


def _distill(tmp_path, teacher: str, setting: str, monkeypatch, method: str = "kd") -> tuple[nn.Module, nn.Module]:
    """(the engine's teacher, the trained student) of a short run under ``teacher_channels_last: setting``."""
    held = []
    real = loop.freeze
    monkeypatch.setattr(loop, "freeze", lambda model: held.append(model) or real(model))
    out = tmp_path / setting
    result = robustkd.train(_cfg(out, teacher=teacher, method={"name": method}, teacher_channels_last=setting))
    return held[0], robustkd.load_model(result.last)


@pytest.mark.parametrize("method", ["kd", "advfunmatch"])
def test_the_engine_holds_the_teacher_channels_last_on_a_cpu_and_trains_the_same(
    tmp_path, toy, toy_teacher, monkeypatch, method
) -> None:
    held = {}
    students = {}
    for setting in ("auto", "never"):
        held[setting], students[setting] = _distill(tmp_path, toy_teacher, setting, monkeypatch, method)
    conv2 = [m for m in held["auto"].modules() if isinstance(m, nn.Conv2d)][1]  # 16 input channels: unambiguous
    assert conv2.weight.is_contiguous(memory_format=CL) and not conv2.weight.is_contiguous()
    assert all(p.is_contiguous() for p in held["never"].parameters())
    # Two epochs of eight steps: the two layouts' last-bit differences stay far below the tolerance.
    for a, b in zip(students["auto"].parameters(), students["never"].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


def test_a_teacher_module_the_caller_passes_keeps_its_layout(tmp_path, toy, monkeypatch) -> None:
    torch.manual_seed(0)
    module = create_model("dm_small", num_classes=4, in_channels=1, input_size=16)
    used = []
    real = loop.teacher_layout
    monkeypatch.setattr(loop, "teacher_layout", lambda *a, **k: used.append(real(*a, **k)) or used[-1])
    loop.train(_cfg(tmp_path, epochs=1, method={"name": "kd"}), teacher=module)
    conv2 = [m for m in used[0].modules() if isinstance(m, nn.Conv2d)][1]
    assert conv2.weight.is_contiguous(memory_format=CL) and not conv2.weight.is_contiguous()  # the run's copy
    assert all(p.is_contiguous() for p in module.parameters())  # the caller's module: untouched
