"""Our attacks against reference implementations, on a tiny model trained on real Fashion-MNIST."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from robustkd.attacks import ThreatModel, autoattack, perturb

FMNIST = Path("/usr/share/datasets/fashion-mnist")
EPS, STEP, STEPS = 0.1, 0.01, 20


def _idx(name: str) -> np.ndarray:
    with gzip.open(FMNIST / name, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


@pytest.fixture(scope="module")
def trained():
    """A 784-32-10 MLP trained for a second on 3000 test-split images; 100 held-out points to attack."""
    if not (FMNIST / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    images = torch.from_numpy(_idx("t10k-images-idx3-ubyte.gz")[:3100].copy()).float().div(255).unsqueeze(1)
    labels = torch.from_numpy(_idx("t10k-labels-idx1-ubyte.gz")[:3100].astype(np.int64))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 10))
    # Plain SGD by hand: torch.optim's first step pays a multi-second lazy import.
    for _ in range(4):
        for i in range(0, 3000, 100):
            loss = nn.functional.cross_entropy(model(images[i : i + 100]), labels[i : i + 100])
            grads = torch.autograd.grad(loss, list(model.parameters()))
            with torch.no_grad():
                for p, g in zip(model.parameters(), grads):
                    p -= 0.2 * g
    model.eval()
    x, y = images[3000:], labels[3000:]
    with torch.no_grad():
        assert (model(x).argmax(1) == y).float().mean() > 0.6  # it learned something
    return model, x, y


def _broken(model, x_adv, y):
    with torch.no_grad():
        return model(x_adv).argmax(1) != y


def test_pgd_finds_at_least_as_many_as_torchattacks(trained):
    torchattacks = pytest.importorskip("torchattacks")
    model, x, y = trained
    # Without a random start both follow the same iterates, so this comparison is exact.
    ours = perturb(model, x, y, ThreatModel("linf", EPS, STEP, STEPS, random_start="none"))
    theirs = torchattacks.PGD(model, eps=EPS, alpha=STEP, steps=STEPS, random_start=False)(x, y)
    assert _broken(model, ours.x_adv, y).sum() >= _broken(model, theirs, y).sum()
    assert torch.equal(ours.success, _broken(model, ours.x_adv, y))
    # With random starts (different draws): best-iterate tracking keeps ours ahead.
    torch.manual_seed(0)
    theirs = torchattacks.PGD(model, eps=EPS, alpha=STEP, steps=STEPS, random_start=True)(x, y)
    ours = perturb(model, x, y, ThreatModel("linf", EPS, STEP, STEPS), generator=torch.Generator().manual_seed(0))
    assert _broken(model, ours.x_adv, y).sum() >= _broken(model, theirs, y).sum()
    assert (ours.x_adv - x).abs().max() <= EPS + 1e-6


@pytest.mark.slow  # Square's 5000 queries and FAB-T's 9 targets cost 10-20 s even on a few survivors
def test_autoattack_is_at_least_as_strong_as_pgd(trained):
    pytest.importorskip("pyautoattack")
    model, x, y = trained
    eps = 0.05  # small enough that PGD leaves survivors for AutoAttack to beat or match
    pgd = perturb(model, x, y, ThreatModel("linf", eps, None, STEPS), generator=torch.Generator().manual_seed(0))
    aa = autoattack(model, x, y, eps=eps, seed=0, batch_size=100)
    clean = ~_broken(model, x, y)
    robust_pgd = (clean & ~_broken(model, pgd.x_adv, y)).float().mean()
    robust_aa = (clean & ~_broken(model, aa, y)).float().mean()
    assert robust_aa <= robust_pgd
    assert robust_pgd < clean.float().mean()  # the attack does something at this eps
    assert (aa - x).abs().max() <= eps + 1e-6 and aa.min() >= 0 and aa.max() <= 1
