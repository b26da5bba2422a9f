"""KDIGA through MobileNetV2: robustkd's depthwise convolution against PyTorch's grouped one.

KDIGA differentiates the student's input gradient again (double backward). PyTorch's derivative of a grouped
convolution's backward runs one convolution per channel; robustkd's ``DepthwiseConv2d`` writes it with two
ordinary convolutions. Same model and weights on both sides (the native side has its depthwise layers turned
back into ``nn.Conv2d``), one KDIGA training step (loss and backward) each, gradients checked equal.
Ratio: native time / robustkd time (no target). A plain KD step is timed too: there the two must cost the same.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from benchmarks import common
from benchmarks.common import interleaved, median, ms, round_ratios, setting
from robustkd.methods import Batch, StepInfo, build_method
from robustkd.models import create_model
from robustkd.models.layers import DepthwiseConv2d

INFO = StepInfo(epoch=0, step=0, epochs=1, steps_per_epoch=1)


def _native(model: nn.Module) -> nn.Module:
    """The same network with every depthwise layer back to PyTorch's grouped ``nn.Conv2d``."""
    native = copy.deepcopy(model)
    for module in native.modules():
        if isinstance(module, DepthwiseConv2d):
            module.__class__ = nn.Conv2d
    return native


def _convolution_calls(step) -> int:
    """Convolutions one step launches (forward, backward and double backward), counted by the profiler."""
    from torch.profiler import profile

    with profile() as prof:
        step()
    return sum(event.count for event in prof.key_averages() if event.key == "aten::convolution")


def run(quick: bool = False, threads: int = 1, repeats: int | None = None) -> dict[str, Any]:
    repeats = repeats or (1 if quick else 3)
    batch, width = (4, 0.25) if quick else (32, 1.0)
    torch.manual_seed(0)
    ours = create_model("mobilenet_v2", num_classes=10, in_channels=3, input_size=32, width_mult=width)
    ours = ours.to(common.DEVICE).train()
    native = _native(ours)
    teacher = create_model("resnet18", num_classes=10, in_channels=3, input_size=32).to(common.DEVICE)
    teacher.eval().requires_grad_(False)
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(batch, 3, 32, 32, generator=generator).to(common.DEVICE)
    y = torch.randint(0, 10, (batch,), generator=generator).to(common.DEVICE)

    def step(method_name: str, student: nn.Module):
        method = build_method(method_name, {})

        def run_step() -> None:
            student.zero_grad(set_to_none=True)
            method(student, teacher, Batch(x, y), INFO).loss.backward()

        return run_step

    fns = {f"{m}_{side}": step(m, s) for m in ("kdiga", "kd") for side, s in (("ours", ours), ("native", native))}
    fns["kdiga_ours"]()
    fns["kdiga_native"]()
    grads = [torch.cat([p.grad.flatten() for p in s.parameters()]) for s in (ours, native)]
    grad_diff = float((grads[0] - grads[1]).abs().max() / grads[1].abs().max())
    calls = {side: _convolution_calls(fns[f"kdiga_{side}"]) for side in ("ours", "native")}
    samples = interleaved(fns, repeats, warmup=1)
    row = {
        "time_ms": {name: ms(median(values)) for name, values in samples.items()},
        "kdiga_speedup": round(median(round_ratios(samples["kdiga_native"], samples["kdiga_ours"])), 3),
        "kd_ratio": round(median(round_ratios(samples["kd_native"], samples["kd_ours"])), 3),
        "grad_max_rel_diff": grad_diff,
        "kdiga_convolution_calls": calls,
    }
    return {
        "benchmark": "depthwise",
        "what": "KDIGA step through MobileNetV2: native grouped-conv time / robustkd DepthwiseConv2d time",
        "setting": setting(
            threads,
            repeats,
            model=f"mobilenet_v2 (width {width}) from a resnet18 teacher",
            batch=batch,
            input=[3, 32, 32],
            data="uniform noise (timings do not depend on pixel values)",
            quick=quick,
        ),
        "rows": [row],
        "ratios": [
            {"name": f"depthwise/{name}", "ratio": row[key], "target": None, "meets": None}
            for name, key in (("kdiga_speedup_vs_grouped_conv", "kdiga_speedup"), ("kd_native_over_ours", "kd_ratio"))
        ],
    }
