"""The graph-captured training attack (robustkd.attacks.graph): where it applies, the switch, and on CUDA its
equality with the eager loop. The CUDA tests skip without a device; the rest runs anywhere."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from robustkd.attacks import ThreatModel, graph
from robustkd.attacks.pgd import pgd as eager_pgd
from robustkd.config import TrainConfig, validate
from robustkd.errors import ConfigError
from robustkd.models import create_model

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
THREAT = ThreatModel("linf", 8 / 255, 2 / 255, 5)


def _net(seed: int = 0, bn: bool = True) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Conv2d(3, 8, 3, padding=1)]
    layers += [nn.BatchNorm2d(8)] if bn else []
    layers += [nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10)]
    return nn.Sequential(*layers)


def test_the_switch_is_checked_and_scoped():
    assert graph.fast_path_setting() == "auto"
    with graph.fast_path("off"):
        assert graph.fast_path_setting() == "off"
    assert graph.fast_path_setting() == "auto"
    with pytest.raises(ConfigError, match="fast_path: expected one of auto, off, got 'fast'"), graph.fast_path("fast"):
        pass
    assert validate(TrainConfig()).fast_path == "auto"
    with pytest.raises(ConfigError, match="fast_path: must be 'auto' or 'off'"):
        validate(TrainConfig(fast_path="on"))


def test_where_the_graph_applies():
    model, x = _net(), torch.rand(4, 3, 8, 8)
    assert not graph.applies(model, x, THREAT, "eval", None)  # CPU tensors: eager
    cuda_like = type("CudaLike", (), {"is_cuda": True})()  # the device check alone, without a GPU
    assert graph.applies(model, cuda_like, THREAT, "eval", None)
    assert not graph.applies(model, cuda_like, THREAT, "train", None)  # BatchNorm would update its statistics
    assert not graph.applies(model.train(), cuda_like, THREAT, "keep", None)
    assert graph.applies(model.eval(), cuda_like, THREAT, "keep", None)
    assert not graph.applies(model, cuda_like, THREAT, "eval", torch.Generator())
    assert not graph.applies(model, cuda_like, ThreatModel("linf", 0.0, 0.01, 5), "eval", None)
    with graph.fast_path("off"):
        assert not graph.applies(model, cuda_like, THREAT, "eval", None)


def test_on_cpu_the_hook_is_the_eager_loop_bit_for_bit():
    model, x, y = _net(), torch.rand(6, 3, 8, 8), torch.randint(0, 10, (6,))
    torch.manual_seed(3)
    ours = graph.pgd(model, x, y, THREAT)
    torch.manual_seed(3)
    eager = eager_pgd(model, x, y, THREAT)
    assert torch.equal(ours, eager)
    assert not graph._GRAPHS  # nothing captured on a CPU


def _agree(a: torch.Tensor, b: torch.Tensor, alpha: float) -> float:
    """Fraction of entries equal within 1e-6; the rest may differ by a sign flip of a near-zero gradient."""
    assert (a - b).abs().max() <= 2 * alpha * THREAT.steps + 1e-6
    return float(((a - b).abs() <= 1e-6).float().mean())


@CUDA
@pytest.mark.parametrize("objective", ("ce", "mismatch"))
def test_graph_replay_matches_the_eager_loop(objective, monkeypatch):
    graph.clear()
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    model, teacher = _net(0).cuda().eval(), _net(1).cuda().eval()
    x, y = torch.rand(16, 3, 8, 8, device="cuda"), torch.randint(0, 10, (16,), device="cuda")
    for round_ in range(3):  # capture, then replays on new data
        x = torch.rand_like(x)
        torch.manual_seed(round_)
        eager = eager_pgd(model, x, y, THREAT, objective, teacher=teacher)
        torch.manual_seed(round_)
        replayed = graph.pgd(model, x, y, THREAT, objective, teacher=teacher)
        assert _agree(replayed, eager, THREAT.alpha) >= 0.999
    assert len(graph._GRAPHS) == 1


@CUDA
def test_weight_updates_reach_the_replay_and_partial_batches_run_eagerly():
    graph.clear()
    model = _net(0).cuda().eval()
    x, y = torch.rand(16, 3, 8, 8, device="cuda"), torch.randint(0, 10, (16,), device="cuda")
    graph.pgd(model, x, y, THREAT)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(-1.5)  # in place, as an optimiser step: the captured kernels read the new values
    torch.manual_seed(0)
    eager = eager_pgd(model, x, y, THREAT)
    torch.manual_seed(0)
    assert _agree(graph.pgd(model, x, y, THREAT), eager, THREAT.alpha) >= 0.999
    graph.pgd(model, x[:5], y[:5], THREAT)  # the last partial batch: eager, nothing new captured
    assert len(graph._GRAPHS) == 1


@CUDA
def test_bf16_channels_last_replay_stays_a_valid_attack():
    graph.clear()
    model = create_model("resnet18", num_classes=10).cuda().eval().to(memory_format=torch.channels_last)
    x = torch.rand(8, 3, 32, 32, device="cuda").contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (8,), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        torch.manual_seed(0)
        eager = eager_pgd(model, x, y, THREAT)
        torch.manual_seed(0)
        replayed = graph.pgd(model, x, y, THREAT)
    assert ((replayed - x).abs() <= THREAT.eps + 1e-6).all() and replayed.min() >= 0 and replayed.max() <= 1
    # bf16 rounds each gradient: iterates may part ways, but most entries follow the same signs.
    assert float(((replayed - eager).abs() <= 1e-6).float().mean()) >= 0.5
