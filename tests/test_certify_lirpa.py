"""Cross-checks of the native verifiers against auto_LiRPA 0.3 (skipped when it is not usable)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from robustkd.certify import input_box, interval_bounds, margin_spec
from robustkd.certify._graph import build_graph
from robustkd.certify._propagate import BoundState
from robustkd.certify.bounds import lirpa_bounds
from robustkd.certify.lirpa import lirpa_available
from robustkd.errors import RobustKDError
from robustkd.models.layers import Normalize, Residual

pytestmark = pytest.mark.skipif(not lirpa_available(), reason="auto_LiRPA 0.3 is not usable here")


def _nets() -> dict[str, nn.Module]:
    nets = {
        "mlp": nn.Sequential(
            nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)
        ),
        "cnn": nn.Sequential(
            Normalize([0.5], [0.3]),
            nn.Conv2d(1, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            Residual(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))),
            nn.ReLU(),
            nn.Conv2d(4, 4, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(64, 12),
            nn.ReLU(),
            nn.Linear(12, 4),
        ),
        "cnn_plain": nn.Sequential(
            Normalize([0.5], [0.3]),
            nn.Conv2d(1, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Conv2d(4, 4, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(64, 12),
            nn.ReLU(),
            nn.Linear(12, 4),
        ),
        "maxpool": nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64, 12),
            nn.ReLU(),
            nn.Linear(12, 4),
        ),
        "avgpool": nn.Sequential(
            Normalize([0.5], [0.3]),
            nn.Conv2d(1, 4, 3, padding=1),
            nn.ReLU(),
            nn.AvgPool2d(2),
            nn.Conv2d(4, 4, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(16, 4),
        ),
    }
    with torch.no_grad():
        for net in nets.values():
            for m in net.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.3, 0.3)
                    m.running_var.uniform_(0.5, 2.0)
                    m.weight.uniform_(-1.5, 1.5)
            net.eval()
    return nets


@pytest.mark.parametrize("net", ["mlp", "cnn", "cnn_plain", "maxpool", "avgpool"])
def test_native_matches_auto_lirpa(net):
    model = _nets()[net]
    x, y = torch.rand(3, 1, 8, 8), torch.tensor([0, 1, 3])
    C = margin_spec(y, 4)
    for native, lirpa in [("ibp", "IBP"), ("crown-ibp", "CROWN-IBP")]:
        for spec in (None, C):
            lower, upper = interval_bounds(model, x, 0.05, method=native, C=spec)
            ref_lower, ref_upper = lirpa_bounds(model, x, 0.05, lirpa, spec)
            torch.testing.assert_close(lower, ref_lower, atol=1e-5, rtol=0, msg=f"{native} lower")
            torch.testing.assert_close(upper, ref_upper, atol=1e-5, rtol=0, msg=f"{native} upper")
    if net == "avgpool":  # auto_LiRPA 0.3's CROWN through AvgPool fails on torch 2.x (a .view on a strided A)
        return
    ref_lower, ref_upper = lirpa_bounds(model, x, 0.05, "CROWN", C)
    lower, upper = interval_bounds(model, x, 0.05, method="crown", C=C)
    if net == "cnn":
        # Through the residual block auto_LiRPA's CROWN comes out looser than plain CROWN (the native bound
        # is sound under sampling and PGD); compare the widths only.
        assert (upper - lower).mean() <= (ref_upper - ref_lower).mean() + 1e-6
        return
    # Plain CROWN (every intermediate neuron bounded by its own backward pass, IBP not used) is what
    # auto_LiRPA computes here; robustkd's default "crown" also intersects with IBP, so compare the plain mode.
    x_lower, x_upper = input_box(x, 0.05)
    plain = BoundState(build_graph(model), x_lower, x_upper, "crown", tighten_with_ibp=False)
    lower, upper = plain.crown_spec(C)
    torch.testing.assert_close(lower, ref_lower, atol=1e-5, rtol=0)
    torch.testing.assert_close(upper, ref_upper, atol=1e-5, rtol=0)


def test_alpha_crown_is_sound_and_no_looser_than_crown():
    model = _nets()["mlp"]
    x, y = torch.rand(3, 1, 8, 8), torch.tensor([0, 1, 3])
    C = margin_spec(y, 4)
    lower, upper = interval_bounds(model, x, 0.05, method="alpha-crown", C=C)
    crown_lower, crown_upper = interval_bounds(model, x, 0.05, method="crown", C=C)
    assert (lower >= crown_lower - 1e-4).all() and (upper <= crown_upper + 1e-4).all()
    points = (x + 0.05 * (torch.rand(500, *x.shape) * 2 - 1)).clamp(0, 1)
    with torch.no_grad():
        margins = torch.einsum("bsk,nbk->nbs", C, model(points.flatten(0, 1)).view(500, 3, 4))
    assert (margins >= lower - 1e-5).all() and (margins <= upper + 1e-5).all()


def test_lirpa_refuses_train_mode_batchnorm_and_unknown_methods():
    model = _nets()["cnn"].train()
    with pytest.raises(RobustKDError, match="training mode"):
        lirpa_bounds(model, torch.rand(2, 1, 8, 8), 0.1, "IBP")
    with pytest.raises(RobustKDError, match="alpha-CROWN"):
        lirpa_bounds(model.eval(), torch.rand(2, 1, 8, 8), 0.1, "beta-CROWN")


def test_shims_are_idempotent():
    from robustkd.certify import _lirpa_compat

    _lirpa_compat.apply()
    _lirpa_compat.apply()
    import numpy.lib.arraysetops as arraysetops

    assert arraysetops.isin is not None and hasattr(torch._C.Node, "__getitem__")
