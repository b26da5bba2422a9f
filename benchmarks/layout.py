"""The frozen teacher's memory layout on this device: channels-last convolution weights against contiguous ones.

``teacher_channels_last: auto`` (the training default) holds a convolutional teacher channels-last on a CPU.
This part times what a teacher does in training, a forward and an input gradient (∇_x of a sum of the logits'
log-sum-exp; the parameters frozen), for every registered convolutional architecture, both layouts taking
turns in every round: ``channels_last / contiguous`` below 1 is what the rule gains, above 1 what it costs.
Batch 128 for the Fashion-MNIST-sized networks, 16 for the CIFAR-sized ResNets and MobileNetV2 (4 for
WRN-28-10), synthetic inputs. Both layouts' logits agree to float rounding (``logits_max_rel_diff``); an input
gradient may differ by more in a few entries (``input_grad_max_rel_diff``) where a pre-activation lies within
rounding of a ReLU's kink, which either layout may put on either side.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from benchmarks import common
from benchmarks.common import frozen, interleaved, median, ms, round_ratios, setting
from robustkd.models import create_model

CL = torch.channels_last
# (architecture, input channels, size, batch): each network at the shape it is built for.
CASES = [
    ("dm_small", 1, 28, 128),
    ("dm_medium", 1, 28, 128),
    ("small_cnn", 1, 28, 128),
    ("dm_large", 1, 28, 128),
    ("dm_small", 3, 32, 128),
    ("dm_medium", 3, 32, 128),
    ("resnet18", 3, 32, 16),
    ("preact_resnet18", 3, 32, 16),
    ("mobilenet_v2", 3, 32, 16),
    ("wrn_28_10", 3, 32, 4),
]
QUICK = [("dm_small", 1, 28, 8), ("resnet18", 3, 32, 2)]


def _forward_and_input_grad(net: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    leaf = x.clone().requires_grad_(True)
    logits = net(leaf)
    (grad,) = torch.autograd.grad(logits.logsumexp(1).sum(), leaf)
    return logits.detach(), grad


def compare(name: str, channels: int, size: int, batch: int, repeats: int) -> dict[str, Any]:
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, in_channels=channels, input_size=size).to(common.DEVICE)
    plain = frozen(model)
    fast = copy.deepcopy(plain).to(memory_format=CL)
    x = torch.rand(batch, channels, size, size, device=common.DEVICE)
    (a, ga), (b, gb) = _forward_and_input_grad(plain, x), _forward_and_input_grad(fast, x)
    logits_diff, grad_diff = (float((v - u).abs().max() / u.abs().max()) for u, v in ((a, b), (ga, gb)))
    fns = {
        "contiguous": lambda: _forward_and_input_grad(plain, x),
        "channels_last": lambda: _forward_and_input_grad(fast, x),
    }
    cpu: dict[str, list[float]] = {}
    samples = interleaved(fns, repeats, cpu=cpu)
    ratio = median(round_ratios(samples["channels_last"], samples["contiguous"]))
    ratio_cpu = median(round_ratios(cpu["channels_last"], cpu["contiguous"]))
    return {
        "arch": name,
        "input": [channels, size, size],
        "batch": batch,
        "time_ms": {side: ms(median(values)) for side, values in samples.items()},
        "cpu_ms": {side: ms(median(values)) for side, values in cpu.items()},
        "channels_last_over_contiguous": round(ratio, 3),
        "channels_last_over_contiguous_cpu": round(ratio_cpu, 3),
        "logits_max_rel_diff": logits_diff,
        "input_grad_max_rel_diff": grad_diff,
    }


def run(quick: bool = False, threads: int = 1, repeats: int | None = None) -> dict[str, Any]:
    repeats = repeats or (1 if quick else 7)
    rows = [compare(*case, repeats) for case in (QUICK if quick else CASES)]
    return {
        "benchmark": "layout",
        "what": "a frozen teacher's forward + input gradient: channels-last / contiguous convolution weights",
        "setting": setting(
            threads, repeats, model="every registered convolutional network", batch="per row", quick=quick
        ),
        "rows": rows,
        "ratios": [
            {
                "name": f"layout/{row['arch']}_{row['input'][0]}x{row['input'][1]}",
                "ratio": row["channels_last_over_contiguous"],
                "target": None,
                "meets": None,
            }
            for row in rows
        ],
    }
