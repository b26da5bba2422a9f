"""Attacks give lower bounds on the worst case and certificates upper bounds: the two must never cross.

For each pair and radius, point by point: no disagreement is found where agreement is certified, and every
confidence gap an attack reaches lies under the certified bound on it. Over P (teacher-correct points) the
empirical disagreement rate is therefore at most 1 - the certified agreement rate.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from robustkd.certify import certify
from robustkd.evaluate import evaluate_faithfulness
from robustkd.models.layers import Normalize

TOL = 1e-5
EPS = (0.004, 0.02, 0.08)


def _net(seed: int, width: int = 24) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        Normalize([0.5], [0.3]),
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(64, width),
        nn.ReLU(),
        nn.Linear(width, 4),
    ).eval()


def _noisy_copy(model: nn.Module, scale: float, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * p.abs().mean() * torch.randn_like(p))
    return other


def _pairs() -> dict[str, tuple[nn.Module, nn.Module]]:
    teacher = _net(0)
    return {
        "close": (teacher, _noisy_copy(teacher, 0.05, 1)),
        "far": (teacher, _noisy_copy(teacher, 0.6, 2)),
        "unrelated": (teacher, _net(3, width=16)),
    }


@pytest.fixture(scope="module")
def points() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(5)
    x = torch.rand(24, 1, 8, 8)
    with torch.no_grad():
        y = _net(0)(x).argmax(1)
    y[::5] = (y[::5] + 1) % 4  # a few points outside P (teacher wrong)
    return x, y


def _check_pair(teacher: nn.Module, student: nn.Module, x: torch.Tensor, y: torch.Tensor, method: str) -> dict:
    emp = evaluate_faithfulness(
        teacher, student, x, y, eps=list(EPS), steps=20, restarts=2, progress=False, checks=False, batch_size=64
    )
    in_p = torch.tensor(emp["per_example"]["teacher_correct"])
    seen = {"certified": 0, "found": 0}
    for k, eps in enumerate(EPS):
        cert = certify(teacher, student, x, y, eps, method=method, progress=False, joint=True)
        pe, ce = emp["per_example"]["eps"][k], cert["per_example"]
        assert pe["eps"] == pytest.approx(eps)
        assert torch.equal(torch.tensor(ce["teacher_correct"]), in_p)
        agree = torch.tensor(ce["agreement_certified"])
        found = torch.tensor([bool(v) for v in pe["disagreement"]])
        assert not (agree & found).any(), f"disagreement found where agreement is certified at eps {eps}"
        for i in torch.nonzero(in_p).flatten().tolist():
            under, over = pe["gap_under"][i], pe["gap_over"][i]
            assert under <= ce["gap_upper"][i] + TOL
            assert max(under, over) <= ce["gap_upper_two_sided"][i] + TOL
        rate = emp["results"][k]["teacher_correct"]["disagreement"]["rate"]
        assert rate <= 1 - cert["teacher_correct"]["agreement_certified"] + TOL
        seen["certified"] += int(agree[in_p].sum())
        seen["found"] += int(found[in_p].sum())
    return seen


@pytest.mark.parametrize("method", ["ibp", "crown-ibp", "best"])
def test_empirical_never_exceeds_certified(points, method):
    x, y = points
    seen = {name: _check_pair(t, s, x, y, method) for name, (t, s) in _pairs().items()}
    # Both sides must have something to say, or the comparison above proves nothing.
    assert seen["close"]["certified"] > 0
    assert seen["far"]["found"] + seen["unrelated"]["found"] > 0
