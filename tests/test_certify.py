"""Native bound propagation: soundness against sampling, exactness, gradients, errors, pair certificates."""

from __future__ import annotations

import copy
import json
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustkd.certify import (
    VERIFIERS,
    UnsupportedModelError,
    _lirpa_compat,
    certified_accuracy,
    certify,
    certify_pair,
    confidence_interval,
    interval_bounds,
    joint_gap_upper,
    margin_bounds,
    margin_spec,
    mixed_bounds,
    worst_case_logits,
)
from robustkd.errors import ConfigError, RegistryError, RobustKDError
from robustkd.models.layers import Normalize, Residual

# Recorded once robustkd.certify is imported: importing it must not touch auto_LiRPA or patch anything.
_AT_IMPORT = {
    "auto_LiRPA loaded": "auto_LiRPA" in sys.modules,
    "shims applied": _lirpa_compat._applied,
    "Node subscriptable": hasattr(torch._C.Node, "__getitem__"),
}

NATIVE = ("ibp", "crown-ibp", "best", "crown")
TOL = 1e-5


def _randomise_bn(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(-1.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    return model.eval()


def _mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(128, 16),
        nn.ReLU(),
        nn.Linear(16, 12),
        nn.BatchNorm1d(12),
        nn.ReLU(),
        nn.Linear(12, 4),
    )


def _cnn() -> nn.Module:
    """Every supported layer type: Normalize, conv, BN, ReLU, residual, max/avg pooling, linear."""
    return nn.Sequential(
        Normalize([0.4, 0.5], [0.3, 0.25]),
        nn.Conv2d(2, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        Residual(
            nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1)),
            nn.Conv2d(4, 6, 1),
        ),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 6, 3, padding=1),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(24, 10),
        nn.ReLU(),
        nn.Linear(10, 4),
    )


def _cnn_odd() -> nn.Module:
    """Rarer layouts: overlapping / padded / ceil-mode max pooling, 'same' and reflect padding, grouped and
    dilated stride-2 convolution, adaptive pooling, a residual with an identity shortcut."""
    return nn.Sequential(
        Normalize([0.5], [0.5]),
        nn.Conv2d(2, 4, 3, padding="same"),
        nn.ReLU(),
        nn.MaxPool2d(3, stride=1, padding=1),
        nn.Conv2d(4, 4, 2, padding=1, padding_mode="reflect"),  # 8x8 -> 9x9
        nn.ReLU(),
        Residual(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())),
        nn.MaxPool2d(2, ceil_mode=True),  # 9x9 -> 5x5
        nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=2, groups=2),
        nn.ReLU(),
        nn.Conv2d(6, 5, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(5, 4),
    )


NETS = {"mlp": _mlp, "cnn": _cnn, "cnn_odd": _cnn_odd}


def _net(name: str) -> nn.Module:
    return _randomise_bn(NETS[name]())


def _inputs(batch: int = 3) -> torch.Tensor:
    x = torch.rand(batch, 2, 8, 8)
    x[0, 0, 0, :3] = torch.tensor([0.0, 1.0, 0.01])  # pixels at and near the [0, 1] edges
    return x


def _samples(x: torch.Tensor, eps: float | torch.Tensor, n: int = 1000) -> torch.Tensor:
    """``n`` points per example in Ball(x, eps) ∩ [0, 1]^d: half corners (sign vectors), half uniform."""
    eps = torch.as_tensor(eps).reshape(-1, *[1] * (x.dim() - 1))
    signs = torch.randint(0, 2, (n // 2, *x.shape)).float() * 2 - 1
    uniform = torch.rand(n - n // 2, *x.shape) * 2 - 1
    return (x + eps * torch.cat([signs, uniform])).clamp(0, 1)  # (n, B, ...)


def _outputs(model: nn.Module, points: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(points.flatten(0, 1)).view(*points.shape[:2], -1)


# ------------------------------------------------------------------------------------------- soundness
@pytest.mark.parametrize("net", list(NETS))
@pytest.mark.parametrize("method", NATIVE)
def test_bounds_contain_sampled_logits_and_margins(net, method):
    model, x = _net(net), _inputs()
    y = torch.tensor([0, 1, 3])
    eps = 0.04
    z = _outputs(model, _samples(x, eps))  # (n, B, K)
    lower, upper = interval_bounds(model, x, eps, method=method)
    assert (z >= lower - TOL).all() and (z <= upper + TOL).all()
    C = margin_spec(y, 4)
    m_lower, m_upper = interval_bounds(model, x, eps, method=method, C=C)
    margins = torch.einsum("bsk,nbk->nbs", C, z)
    assert (margins >= m_lower - TOL).all() and (margins <= m_upper + TOL).all()


@pytest.mark.parametrize("method", ("ibp", "crown-ibp"))
def test_per_example_eps(method):
    model, x = _net("cnn"), _inputs()
    eps = torch.tensor([0.0, 0.02, 0.08])
    lower, upper = interval_bounds(model, x, eps, method=method)
    z = _outputs(model, _samples(x, eps, 400))
    assert (z >= lower - TOL).all() and (z <= upper + TOL).all()
    width = (upper - lower).mean(1)
    assert width[0] < 1e-5 and width[1] < width[2]
    single_l, _ = interval_bounds(model, x[1:2], 0.02, method=method)
    torch.testing.assert_close(single_l, lower[1:2], atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------- exactness
def test_single_linear_layer_matches_analytic_bounds():
    layer = nn.Linear(5, 3)
    x = torch.rand(4, 5)
    x[0, 0], x[1, 1] = 0.0, 0.99
    eps = 0.05
    lo, hi = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    W_pos, W_neg = layer.weight.clamp(min=0), layer.weight.clamp(max=0)
    want_l = lo @ W_pos.T + hi @ W_neg.T + layer.bias
    want_u = hi @ W_pos.T + lo @ W_neg.T + layer.bias
    for method in NATIVE:
        lower, upper = interval_bounds(nn.Sequential(layer), x, eps, method=method)
        torch.testing.assert_close(lower, want_l, atol=1e-6, rtol=0)
        torch.testing.assert_close(upper, want_u, atol=1e-6, rtol=0)
    # Unclipped balls: the familiar W x ± |W| eps.
    x = 0.2 + 0.6 * torch.rand(4, 5)
    lower, upper = interval_bounds(layer, x, eps)
    torch.testing.assert_close(lower, layer(x) - eps * layer.weight.abs().sum(1), atol=1e-6, rtol=0)
    torch.testing.assert_close(upper, layer(x) + eps * layer.weight.abs().sum(1), atol=1e-6, rtol=0)


def test_spec_on_single_linear_layer_is_exact_for_crown_ibp():
    layer = nn.Linear(6, 4)
    x, y = torch.rand(3, 6), torch.tensor([0, 2, 3])
    C = margin_spec(y, 4)
    lo, hi = (x - 0.1).clamp(0, 1), (x + 0.1).clamp(0, 1)
    W = C @ layer.weight  # (B, S, in): the margins are themselves one linear layer
    want_u = torch.einsum("bsi,bi->bs", W.clamp(min=0), hi) + torch.einsum("bsi,bi->bs", W.clamp(max=0), lo)
    want_u = want_u + C @ layer.bias
    for method in ("ibp", "crown-ibp"):
        _, upper = interval_bounds(layer, x, 0.1, method=method, C=C)
        torch.testing.assert_close(upper, want_u, atol=1e-6, rtol=0)


@pytest.mark.parametrize("net", list(NETS))
@pytest.mark.parametrize("method", NATIVE)
def test_zero_eps_gives_the_logits(net, method):
    model, x = _net(net), _inputs()
    lower, upper = interval_bounds(model, x, 0.0, method=method)
    logits = model(x)
    torch.testing.assert_close(lower, logits, atol=TOL, rtol=0)
    torch.testing.assert_close(upper, logits, atol=TOL, rtol=0)


def test_crown_ibp_against_ibp_and_best_is_tightest(capsys):
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 5)).eval()
    x, y = torch.rand(64, 10), torch.randint(0, 5, (64,))
    C = margin_spec(y, 5)
    widths = {}
    bounds = {}
    for method in ("ibp", "crown-ibp", "best", "crown"):
        lower, upper = interval_bounds(model, x, 0.05, method=method, C=C)
        bounds[method] = (lower, upper)
        widths[method] = (upper - lower).mean().item()
    with capsys.disabled():
        print(f"\n2-layer MLP, eps 0.05, mean margin-bound width: {widths}")
    best_l, best_u = bounds["best"]
    for method in ("ibp", "crown-ibp"):
        assert (best_l >= bounds[method][0] - 1e-6).all() and (best_u <= bounds[method][1] + 1e-6).all()
    # Reported, not a law: on this network CROWN-IBP is tighter on average.
    assert widths["crown-ibp"] < widths["ibp"]
    # One hidden layer: the first layer's interval bounds are exact, so CROWN equals CROWN-IBP.
    torch.testing.assert_close(bounds["crown"][1], bounds["crown-ibp"][1], atol=1e-5, rtol=0)


def test_mixed_bounds_interpolate_ibp_and_crown_ibp():
    model, x = _net("cnn"), _inputs()
    C = margin_spec(torch.tensor([0, 1, 2]), 4)
    ibp = interval_bounds(model, x, 0.03, method="ibp", C=C)
    crown_ibp = interval_bounds(model, x, 0.03, method="crown-ibp", C=C)
    for beta in (0.0, 0.3, 1.0):
        lower, upper = mixed_bounds(model, x, 0.03, beta=beta, C=C)
        torch.testing.assert_close(lower, beta * crown_ibp[0] + (1 - beta) * ibp[0], atol=1e-6, rtol=0)
        torch.testing.assert_close(upper, beta * crown_ibp[1] + (1 - beta) * ibp[1], atol=1e-6, rtol=0)
    with pytest.raises(ConfigError, match="beta"):
        mixed_bounds(model, x, 0.03, beta=1.5)


def test_one_sided_crown_bounds():
    model, x = _net("cnn"), _inputs()
    C = margin_spec(torch.tensor([0, 1, 2]), 4)
    lower, upper = interval_bounds(model, x, 0.03, method="crown-ibp", C=C)
    _, only_upper = interval_bounds(model, x, 0.03, method="crown-ibp", C=C, bound_lower=False)
    ibp_lower, _ = interval_bounds(model, x, 0.03, method="ibp", C=C)
    torch.testing.assert_close(only_upper, upper, atol=1e-6, rtol=0)
    only_lower, ibp_side = interval_bounds(model, x, 0.03, method="crown-ibp", C=C, bound_upper=False)
    torch.testing.assert_close(only_lower, lower, atol=1e-6, rtol=0)
    assert (ibp_side >= upper - 1e-6).all()
    assert ibp_lower.shape == lower.shape


# ----------------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("method", ("ibp", "crown-ibp"))
def test_gradients_flow_through_bounds(method):
    model, x = _net("cnn"), _inputs()
    model.train()
    for m in model.modules():  # certified training with BN would use eval statistics here
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    y = torch.tensor([0, 1, 2])
    _, upper = margin_bounds(model, x, y, 0.03, method=method, bound_lower=False)
    loss = F.cross_entropy(worst_case_logits(upper, y), y)
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0


def test_worst_case_logits_and_margin_spec():
    y = torch.tensor([2, 0])
    C = margin_spec(y, 3)
    assert C.shape == (2, 2, 3)
    assert C[0].tolist() == [[1.0, 0.0, -1.0], [0.0, 1.0, -1.0]]
    assert C[1].tolist() == [[-1.0, 1.0, 0.0], [-1.0, 0.0, 1.0]]
    upper = torch.tensor([[0.5, -1.0], [2.0, 3.0]])
    assert worst_case_logits(upper, y).tolist() == [[0.5, -1.0, 0.0], [0.0, 2.0, 3.0]]


# -------------------------------------------------------------------------- softmax and pair certificates
def test_confidence_interval_is_sound_and_monotone():
    model, x = _net("cnn"), _inputs()
    y = torch.tensor([0, 1, 2])
    lower, upper = margin_bounds(model, x, y, 0.03, method="crown-ibp")
    conf_l, conf_u = confidence_interval(lower, upper)
    probs = _outputs(model, _samples(x, 0.03)).softmax(-1).gather(2, y.view(1, -1, 1).expand(1000, -1, 1))
    assert (probs.squeeze(-1) >= conf_l - 1e-6).all() and (probs.squeeze(-1) <= conf_u + 1e-6).all()
    # Monotone: raising any margin can only lower f^y.
    lo2, hi2 = confidence_interval(lower + 0.5, upper + 0.5)
    assert (lo2 <= conf_l).all() and (hi2 <= conf_u).all()
    # No overflow on huge margins.
    big = torch.tensor([[100.0, -100.0]])
    assert torch.isfinite(torch.stack(confidence_interval(big, big))).all()


def test_joint_gap_formula_matches_brute_force():
    torch.manual_seed(3)
    ref_l = torch.randn(20, 3) - 1
    ref_u = ref_l + torch.rand(20, 3) * 2
    shift = torch.randn(20, 3)
    bound = joint_gap_upper(ref_l, ref_u, shift)
    d = shift.max(1).values
    t = torch.linspace(0, 1, 4001).unsqueeze(1)
    t = torch.logsumexp(ref_l, 1) + t * (torch.logsumexp(ref_u, 1) - torch.logsumexp(ref_l, 1))
    brute = (torch.sigmoid(-t) - torch.sigmoid(-t - d)).max(0).values
    assert (bound >= brute - 1e-6).all() and (bound <= brute + 1e-4).all()


def _noisy_copy(model: nn.Module, scale: float = 0.05) -> nn.Module:
    student = copy.deepcopy(model)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(scale * torch.randn_like(p) * p.abs())
    return student


@pytest.mark.parametrize(
    ("method", "joint", "student_kind"),
    [
        ("ibp", False, "noisy_copy"),
        ("ibp", True, "noisy_copy"),
        ("crown-ibp", False, "other_net"),
        ("crown-ibp", True, "other_net"),
        ("crown", True, "noisy_copy"),
    ],
)
def test_pair_certificates_hold_on_samples(method, joint, student_kind):
    teacher = _net("cnn")
    student = _noisy_copy(teacher) if student_kind == "noisy_copy" else _net("cnn_odd")
    x = _inputs(6)
    y = teacher(x).argmax(1)
    eps = 0.003
    r = certify_pair(teacher, student, x, y, eps, method=method, joint=joint)
    assert r["teacher_correct"].all()
    points = _samples(x, eps, 600)
    z_t, z_s = _outputs(teacher, points), _outputs(student, points)
    f_t = z_t.softmax(-1).gather(2, y.view(1, -1, 1).expand(len(points), -1, 1)).squeeze(-1)
    f_s = z_s.softmax(-1).gather(2, y.view(1, -1, 1).expand(len(points), -1, 1)).squeeze(-1)
    gap = f_t - f_s
    assert (gap <= r["gap_upper"] + 1e-6).all()
    assert (gap.abs() <= r["gap_upper_two_sided"] + 1e-6).all()
    assert (f_t >= r["teacher_conf_lower"] - 1e-6).all() and (f_s <= r["student_conf_upper"] + 1e-6).all()
    differ = (z_t.argmax(-1) != z_s.argmax(-1)).any(0)
    assert not (r["agreement_certified"] & differ).any()
    if student_kind == "noisy_copy":  # close networks and a small eps: some agreement must be certified
        assert r["agreement_certified"].any()
    for rho in (0.05, 0.1, 0.2):
        assert (r[f"faithful@{rho:g}"] == r["agreement_certified"] & (r["gap_upper"] <= rho)).all()
    if joint:
        assert (r["gap_upper"] <= r["gap_upper_decoupled"]).all()


@pytest.mark.parametrize("student_kind", ["noisy_copy", "other_net"])
def test_the_trainable_joint_gap_bound_holds_on_samples_and_reaches_only_the_student(student_kind):
    from robustkd.certify import joint_gap_bound

    teacher = _net("cnn").requires_grad_(True)
    student = _noisy_copy(teacher) if student_kind == "noisy_copy" else _net("cnn_odd")
    x = _inputs(6)
    y = teacher(x).argmax(1)
    eps = 0.003
    bound = joint_gap_bound(teacher, student, x, y, eps)
    with torch.no_grad():
        r = certify_pair(teacher, student, x, y, eps, method="ibp", joint=True)
    assert torch.allclose(bound, r["gap_upper_joint"], atol=1e-6)  # the certificate's joint bound, with a graph
    points = _samples(x, eps, 600)
    f_t = _outputs(teacher, points).softmax(-1).gather(2, y.view(1, -1, 1).expand(len(points), -1, 1))
    f_s = _outputs(student, points).softmax(-1).gather(2, y.view(1, -1, 1).expand(len(points), -1, 1))
    assert ((f_t - f_s).squeeze(-1) <= bound + 1e-6).all()
    params = [*student.parameters(), *teacher.parameters()]
    grads = torch.autograd.grad(bound.sum(), params, allow_unused=True)
    n = len(list(student.parameters()))
    assert any(g is not None and g.abs().sum() > 0 for g in grads[:n]) and all(g is None for g in grads[n:])


def test_dataset_certify_summary_is_json_and_restores_modes():
    teacher, student = _net("cnn"), _net("mlp")
    student.train()
    x = (_inputs(10) * 255).to(torch.uint8)
    y = teacher(x.float() / 255).argmax(1)
    summary = certify(teacher, student, x, y, 0.003, "crown-ibp", batch_size=4, progress=False, joint=True)
    assert student.training and not teacher.training
    json.dumps(summary, allow_nan=False)
    assert summary["n"] == 10 and summary["teacher_correct"]["n"] == 10
    assert set(summary["teacher_correct"]["faithful_certified"]) == {"0.05", "0.1", "0.2"}
    assert len(summary["per_example"]["gap_upper"]) == 10
    single = certify(None, student, x, y, 0.003, "ibp", batch_size=3, progress=False)
    student.eval()
    r = certify_pair(teacher, student, x.float() / 255, y, 0.003, method="ibp")
    assert single["certified_accuracy"] == pytest.approx(r["student_certified"].float().mean().item())
    assert certified_accuracy(student, x, y, 0.003) == single["certified_accuracy"]


# ------------------------------------------------------------------------------------------------ errors
def test_unsupported_module_is_named():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 4), nn.Sigmoid())
    with pytest.raises(UnsupportedModelError, match="Sigmoid"):
        interval_bounds(model, torch.rand(2, 4), 0.1)

    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    with pytest.raises(UnsupportedModelError, match="Scaled"):
        interval_bounds(nn.Sequential(Scaled(4, 2)), torch.rand(2, 4), 0.1)


def test_train_mode_batchnorm_is_refused():
    model = _net("cnn").train()
    with pytest.raises(RobustKDError, match="training mode"):
        interval_bounds(model, _inputs(), 0.1)


def test_unknown_method_suggests_close_names():
    with pytest.raises(RegistryError, match="crown-ibp"):
        interval_bounds(_net("mlp"), _inputs(), 0.1, method="crown_ibp")
    assert set(VERIFIERS.names()) == {"ibp", "crown-ibp", "best", "crown", "alpha-crown"}


def test_bad_inputs_are_refused():
    model = _net("mlp")
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        interval_bounds(model, _inputs() * 3 - 1, 0.1)
    with pytest.raises(ConfigError, match="eps"):
        interval_bounds(model, _inputs(), -0.1)
    with pytest.raises(ConfigError, match="spec C"):
        interval_bounds(model, _inputs(), 0.1, C=torch.zeros(2, 3, 4))


def test_import_does_not_load_auto_lirpa():
    assert not any(_AT_IMPORT.values()), _AT_IMPORT


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("method", NATIVE)
def test_gpu_matches_cpu(method):
    model, x = _net("cnn"), _inputs()
    C = margin_spec(torch.tensor([0, 1, 2]), 4)
    lower, upper = interval_bounds(model, x, 0.03, method=method, C=C)
    lower_g, upper_g = interval_bounds(model.cuda(), x.cuda(), 0.03, method=method, C=C.cuda())
    torch.testing.assert_close(lower_g.cpu(), lower, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(upper_g.cpu(), upper, atol=1e-4, rtol=1e-4)
