"""Certified training: ibp, crown_ibp and faithful distillation.

Golden values come from closed forms written here in float64: for a one-layer linear network the margins
z_j − z_y are linear in x, so their exact extremes over the clipped box are Σ_i max/min(a_i·lo_i, a_i·hi_i) plus
the bias, a formula that shares nothing with the library's centre/radius propagation.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import configs_of, shipped_config
from torch import nn

import robustkd.methods.common as certified
from robustkd.certify import UnsupportedModelError, margin_bounds
from robustkd.certify.bounds import Verifier
from robustkd.errors import ConfigError
from robustkd.methods import METHODS, Batch, StepInfo, build_method
from robustkd.methods.common import ramp_fraction
from robustkd.methods.crown_ibp import CrownIBP
from robustkd.methods.faithful import Faithful
from robustkd.methods.ibp import IBP
from robustkd.methods.kd import kd_loss
from robustkd.methods.losses import certified_ce, confidence_lower, faithful_hinge, faithful_log_hinge
from robustkd.models import create_model
from robustkd.models.layers import Normalize

NAMES = ("ibp", "crown_ibp", "faithful")
K = 4  # classes of the tiny problems
SHAPE = (1, 3, 3)  # input of the linear networks: 9 pixels

# ---------------------------------------------------------------------------------------------------
# Closed forms (float64)


def linear_net(seed: int, mean: float = 0.3, std: float = 0.5) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(Normalize([mean], [std]), nn.Flatten(), nn.Linear(9, K)).double()


def affine_of(net: nn.Sequential) -> tuple[torch.Tensor, torch.Tensor]:
    """z(x) = A·x + c for the Normalize-Flatten-Linear net (A, c keep the parameters' graph)."""
    mean, std = float(net[0].mean), float(net[0].std)
    W, b = net[2].weight, net[2].bias
    return W / std, b - W.sum(1) * mean / std


def box(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return (x - eps).clamp(0, 1).flatten(1), (x + eps).clamp(0, 1).flatten(1)


def exact_margins(net: nn.Sequential, x: torch.Tensor, y: torch.Tensor, eps: float) -> tuple[torch.Tensor, ...]:
    """Exact (lower, upper) of z_j − z_y, j ≠ y in increasing order, over Ball(x, eps) ∩ [0, 1]: for a linear
    function a·x' + d each coordinate is extreme at one end of its interval."""
    A, c = affine_of(net)
    lo, hi = box(x, eps)
    lowers, uppers = [], []
    for i in range(len(y)):
        row_l, row_u = [], []
        for j in range(K):
            if j == int(y[i]):
                continue
            a, d = A[j] - A[y[i]], c[j] - c[y[i]]
            row_u.append(torch.maximum(a * lo[i], a * hi[i]).sum() + d)
            row_l.append(torch.minimum(a * lo[i], a * hi[i]).sum() + d)
        lowers.append(torch.stack(row_l))
        uppers.append(torch.stack(row_u))
    return torch.stack(lowers), torch.stack(uppers)


def ce_closed(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """mean_i −log(e^{z_y} / Σ_c e^{z_c})."""
    e = torch.exp(z)
    return -torch.log(e[torch.arange(len(y)), y] / e.sum(1)).mean()


def worst_ce_closed(u: torch.Tensor) -> torch.Tensor:
    """CE(ẑ, y) with ẑ_y = 0, ẑ_j = u_j: mean_i log(1 + Σ_j e^{u_j})."""
    return torch.log(1 + torch.exp(u).sum(1)).mean()


def kl_closed(zt: torch.Tensor, zs: torch.Tensor, tau: float) -> torch.Tensor:
    """batchmean KL(softmax(zt/τ) ‖ softmax(zs/τ))."""
    p = torch.exp(zt / tau) / torch.exp(zt / tau).sum(1, keepdim=True)
    q = torch.exp(zs / tau) / torch.exp(zs / tau).sum(1, keepdim=True)
    return (p * (torch.log(p) - torch.log(q))).sum() / len(zt)


def fixed_batch() -> Batch:
    """Five points with pixels at 0, near 0, near 1 and at 1, so the [0, 1] clip shapes the box."""
    torch.manual_seed(1)
    x = torch.rand(5, *SHAPE, dtype=torch.float64)
    x[0, 0, 0, :] = 0.0
    x[1, 0, 1, :] = 1.0
    x[2, 0, 2, 0] = 0.04
    x[3, 0, 0, 2] = 0.97
    return Batch(x, torch.tensor([0, 1, 2, 3, 1]))


def info_at(step: int, steps_per_epoch: int = 10, epochs: int = 10) -> StepInfo:
    return StepInfo(epoch=step // steps_per_epoch, step=step, epochs=epochs, steps_per_epoch=steps_per_epoch)


def param_grads(loss: torch.Tensor, net: nn.Module) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, list(net.parameters())))


# ---------------------------------------------------------------------------------------------------
# Schedules


def test_ramp_fraction_hand_values() -> None:
    # warm-up 1.5 epochs, ramp 2 epochs, 10 steps per epoch: r = clamp((t/10 − 1.5) / 2, 0, 1).
    expected = {0: 0.0, 14: 0.0, 15: 0.0, 16: 0.05, 25: 0.5, 34: 0.95, 35: 1.0, 90: 1.0}
    for step, r in expected.items():
        assert ramp_fraction(info_at(step), 1.5, 2.0) == pytest.approx(r, abs=1e-12), step
    # No ramp: a jump at the end of the warm-up; no warm-up: the ramp starts at step 0.
    assert ramp_fraction(info_at(9), 1.0, 0.0) == 0.0 and ramp_fraction(info_at(10), 1.0, 0.0) == 1.0
    assert ramp_fraction(info_at(5), 0.0, 1.0) == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("step", "eps", "kappa", "beta"),
    [
        (0, 0.0, 1.0, 1.0),
        (10, 0.0, 1.0, 1.0),
        (20, 0.05, 0.875, 0.875),
        (30, 0.1, 0.75, 0.75),
        (35, 0.125, 0.6875, 0.6875),
        (50, 0.2, 0.5, 0.5),
        (70, 0.2, 0.5, 0.5),
    ],
)
def test_ibp_and_crown_ibp_schedules(step: int, eps: float, kappa: float, beta: float) -> None:
    # warm-up 1 epoch, ramp 4 epochs at 10 steps each: r = (t/10 − 1)/4.
    opts = {"threat": {"eps": 0.2}, "warmup_epochs": 1, "ramp_epochs": 4}
    s = build_method("ibp", opts).schedule(info_at(step))  # κ 1 → 0.5
    assert (s["eps"], s["kappa"], s["beta"]) == pytest.approx((eps, kappa, 0.0))
    s = build_method("crown_ibp", {**opts, "kappa_end": 0.5, "beta_end": 0.5}).schedule(info_at(step))
    assert (s["eps"], s["kappa"], s["beta"]) == pytest.approx((eps, kappa, beta))
    # Defaults of crown_ibp: κ and β both 1 → 0.
    s = build_method("crown_ibp", opts).schedule(info_at(step))
    r = eps / 0.2
    assert (s["kappa"], s["beta"]) == pytest.approx((1 - r, 1 - r))


def test_schedule_end_values_are_exact() -> None:
    s = build_method("ibp", {"kappa_end": 0.3, "threat": {"eps": 0.3}, "warmup_epochs": 0, "ramp_epochs": 1}).schedule(
        info_at(100)
    )
    assert s["eps"] == 0.3 and s["kappa"] == 0.3


@pytest.mark.parametrize(
    ("step", "eps", "kappa", "beta"), [(5, 0.0, 0.0, 1.0), (30, 0.05, 0.2, 0.5), (60, 0.1, 0.4, 0.0)]
)
def test_faithful_schedule(step: int, eps: float, kappa: float, beta: float) -> None:
    opts = {"threat": {"eps": 0.1}, "warmup_epochs": 1, "ramp_epochs": 4, "kappa_max": 0.4, "bound": "crown-ibp"}
    s = build_method("faithful", opts).schedule(info_at(step, steps_per_epoch=10))
    assert (s["eps"], s["kappa"], s["beta"]) == pytest.approx((eps, kappa, beta))
    assert build_method("faithful", {**opts, "bound": "ibp"}).schedule(info_at(step))["beta"] == 0.0


# ---------------------------------------------------------------------------------------------------
# Golden losses on a one-layer network


@pytest.mark.parametrize("name", ["ibp", "crown_ibp"])
def test_certified_loss_on_linear_net_matches_closed_form(name: str) -> None:
    net, batch = linear_net(0), fixed_batch()
    # warm-up 1, ramp 2 epochs of 10 steps; step 20 is half-way: eps_t = 0.1, κ_t = 0.75 (ibp) or 0.5.
    method = build_method(name, {"threat": {"eps": 0.2}, "warmup_epochs": 1, "ramp_epochs": 2})
    out = method(net, None, batch, info_at(20))
    kappa = {"ibp": 0.75, "crown_ibp": 0.5}[name]
    assert out.logs["eps"] == pytest.approx(0.1) and out.logs["kappa"] == pytest.approx(kappa)

    A, c = affine_of(net)
    z = batch.x.flatten(1) @ A.T + c
    _, u = exact_margins(net, batch.x, batch.y, 0.1)
    closed = kappa * ce_closed(z, batch.y) + (1 - kappa) * worst_ce_closed(u)
    torch.testing.assert_close(out.loss, closed, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.logs["bound_ce"], worst_ce_closed(u).detach(), rtol=1e-12, atol=1e-12)
    for got, want in zip(param_grads(out.loss, net), param_grads(closed, net)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    # Certified share: every exact upper margin negative.
    assert float(out.logs["cert_acc"]) == pytest.approx(float((u < 0).all(1).double().mean()))


def test_clip_to_unit_box_matters_in_the_golden() -> None:
    """The fixed batch is built so that clipping changes the bounds (else the test could not catch a missing clip)."""
    net, batch = linear_net(0), fixed_batch()
    _, clipped = exact_margins(net, batch.x, batch.y, 0.1)
    A, c = affine_of(net)
    unclipped = []
    for i in range(len(batch.y)):
        y = int(batch.y[i])
        a = torch.stack([A[j] - A[y] for j in range(K) if j != y])
        d = torch.stack([c[j] - c[y] for j in range(K) if j != y])
        unclipped.append(a @ batch.x[i].flatten() + d + 0.1 * a.abs().sum(1))
    assert (torch.stack(unclipped) - clipped).abs().max() > 1e-3


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        Normalize([0.5], [0.25]),
        nn.Flatten(),
        nn.Linear(9, 12),
        nn.ReLU(),
        nn.Linear(12, 8),
        nn.ReLU(),
        nn.Linear(8, K),
    ).double()


@pytest.mark.parametrize("step", [20, 25, 29])
def test_crown_ibp_mix_matches_the_verifiers_and_is_sound(step: int) -> None:
    net, batch = mlp(), fixed_batch()
    method = build_method("crown_ibp", {"threat": {"eps": 0.1}, "warmup_epochs": 1, "ramp_epochs": 2})
    out = method(net, None, batch, info_at(step))
    s = method.schedule(info_at(step))
    assert 0 < s["beta"] < 1
    _, u_ibp = margin_bounds(net, batch.x, batch.y, s["eps"], method="ibp")
    _, u_crown = margin_bounds(net, batch.x, batch.y, s["eps"], method="crown-ibp")
    u = s["beta"] * u_crown + (1 - s["beta"]) * u_ibp
    closed = s["kappa"] * ce_closed(net(batch.x), batch.y) + (1 - s["kappa"]) * worst_ce_closed(u)
    torch.testing.assert_close(out.loss, closed, rtol=1e-10, atol=1e-12)
    assert out.logs["beta"] == pytest.approx(s["beta"])
    # The mix is a sound upper bound: no sampled point of the ball exceeds it.
    bounds = certified.margin_upper_bounds(net, batch.x, batch.y, s["eps"], s["beta"], K)
    torch.manual_seed(3)
    x = batch.x.unsqueeze(0)
    noise = (torch.rand(2000, *batch.x.shape, dtype=torch.float64) * 2 - 1) * s["eps"]
    noise[:500] = noise[:500].sign() * s["eps"]  # corners too
    points = (x + noise).clamp(0, 1).reshape(-1, *SHAPE)
    with torch.no_grad():
        z = net(points).reshape(2000, len(batch.y), K)
    y = batch.y
    for i in range(len(y)):
        others = [j for j in range(K) if j != int(y[i])]
        sampled = (z[:, i, others] - z[:, i, y[i] : y[i] + 1]).max(0).values
        assert (sampled <= bounds.upper[i] + 1e-9).all()
        assert (bounds.tightest[i] <= bounds.upper[i] + 1e-12).all()


@pytest.mark.parametrize("form", ["hinge", "log_hinge"])
def test_faithful_hinge_matches_closed_form_with_gradients(form: str) -> None:
    student, teacher = linear_net(0), linear_net(7, mean=0.4, std=0.6).eval().requires_grad_(False)
    batch = fixed_batch()
    tau, rho = 2.0, 0.05
    opts = {
        "threat": {"eps": 0.1},
        "warmup_epochs": 1,
        "ramp_epochs": 2,
        "kappa_max": 0.6,
        "temperature": tau,
        "rho": rho,
    }
    method = build_method("faithful", {**opts, "loss_form": form})
    out = method(student, teacher, batch, info_at(20))  # r = 0.5: eps_t = 0.05, κ_t = 0.3
    eps, kappa = 0.05, 0.3
    assert (out.logs["eps"], out.logs["kappa"]) == pytest.approx((eps, kappa))

    A_s, c_s = affine_of(student)
    A_t, c_t = affine_of(teacher)
    zs, zt = batch.x.flatten(1) @ A_s.T + c_s, batch.x.flatten(1) @ A_t.T + c_t
    _, u_s = exact_margins(student, batch.x, batch.y, eps)
    l_t, _ = exact_margins(teacher, batch.x, batch.y, eps)
    lb_s = 1 / (1 + torch.exp(u_s).sum(1))
    ub_t = 1 / (1 + torch.exp(l_t).sum(1))
    active = ub_t - lb_s - rho > 0
    assert 0 < active.sum() < len(batch.y)  # both sides of the hinge occur
    if form == "hinge":
        term = torch.where(active, ub_t - lb_s - rho, 0.0).mean()
    else:
        term = torch.where(active, torch.log(ub_t - rho) - torch.log(lb_s), 0.0).mean()
    closed = (1 - kappa) * tau**2 * kl_closed(zt, zs, tau) + kappa * term
    torch.testing.assert_close(out.loss, closed, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.logs["faithful"], term.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.logs["gap_bound"], (ub_t - lb_s).mean().detach(), rtol=1e-12, atol=1e-12)
    for got, want in zip(param_grads(out.loss, student), param_grads(closed, student)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_log_hinge_has_the_hinge_zero_set_and_keeps_its_gradient_when_the_bound_is_loose() -> None:
    torch.manual_seed(4)
    ub_t = torch.rand(64, dtype=torch.float64)
    u = (torch.randn(64, 3, dtype=torch.float64) * 3).requires_grad_(True)
    for rho in (0.0, 0.1):
        per_hinge = torch.stack(
            [faithful_hinge(ub_t[i : i + 1], confidence_lower(u[i : i + 1]), rho) for i in range(64)]
        )
        per_log = torch.stack([faithful_log_hinge(ub_t[i : i + 1], u[i : i + 1], rho) for i in range(64)])
        assert torch.equal(per_hinge > 0, per_log > 0)
    # A loose student bound (lb f_S^y ≈ 3e-9): the hinge's gradient vanishes, the log-space one does not.
    loose = torch.full((1, 3), 18.0, dtype=torch.float64, requires_grad=True)
    teacher = torch.tensor([0.9], dtype=torch.float64)
    (g_hinge,) = torch.autograd.grad(faithful_hinge(teacher, confidence_lower(loose)), loose)
    (g_log,) = torch.autograd.grad(faithful_log_hinge(teacher, loose), loose)
    assert g_hinge.abs().max() < 1e-8
    torch.testing.assert_close(g_log, torch.full((1, 3), 1 / 3, dtype=torch.float64), rtol=1e-6, atol=0)


def test_faithful_soft_ce_matches_closed_form_and_reduces_to_ibp_with_hard_labels() -> None:
    student, teacher = linear_net(0), linear_net(7).eval().requires_grad_(False)
    batch = fixed_batch()
    method = build_method(
        "faithful",
        {"threat": {"eps": 0.1}, "warmup_epochs": 0, "ramp_epochs": 0, "kappa_max": 1.0, "loss_form": "soft_ce"},
    )
    out = method(student, teacher, batch, info_at(3))  # after the ramp: eps 0.1, κ 1: L = L_F exactly
    _, u = exact_margins(student, batch.x, batch.y, 0.1)
    A_t, c_t = affine_of(teacher)
    zt = batch.x.flatten(1) @ A_t.T + c_t
    p = torch.exp(zt) / torch.exp(zt).sum(1, keepdim=True)
    z_hat = torch.zeros(len(batch.y), K, dtype=torch.float64)
    for i in range(len(batch.y)):
        others = [j for j in range(K) if j != int(batch.y[i])]
        z_hat[i, others] = u[i]
    log_q = z_hat - torch.log(torch.exp(z_hat).sum(1, keepdim=True))
    closed = -(p * log_q).sum(1).mean()
    torch.testing.assert_close(out.loss, closed, rtol=1e-12, atol=1e-12)
    assert "gap_bound" not in out.logs  # no teacher bound pass for soft_ce
    # One-hot soft labels give Gowal et al.'s CE(ẑ, y).
    onehot = F.one_hot(batch.y, K).double()
    torch.testing.assert_close(certified_ce(u, batch.y, onehot), worst_ce_closed(u), rtol=1e-12, atol=1e-12)


def test_loss_helpers_closed_forms() -> None:
    u = torch.tensor([[0.5, -1.0, 2.0], [-3.0, -2.0, -0.1]], dtype=torch.float64)
    y = torch.tensor([0, 2])
    torch.testing.assert_close(confidence_lower(u), 1 / (1 + torch.exp(u).sum(1)))
    torch.testing.assert_close(certified_ce(u, y), worst_ce_closed(u))
    # Huge margins neither overflow nor NaN.
    big = torch.tensor([[800.0, -800.0]], dtype=torch.float64)
    assert torch.isfinite(confidence_lower(big)).all() and torch.isfinite(certified_ce(big, torch.tensor([1])))
    ub_t = torch.tensor([0.9, 0.5], dtype=torch.float64, requires_grad=True)
    lb_s = torch.tensor([0.6, 0.6], dtype=torch.float64, requires_grad=True)
    h = faithful_hinge(ub_t, lb_s, rho=0.1)
    torch.testing.assert_close(h, torch.tensor(0.1, dtype=torch.float64))
    h.backward()
    assert ub_t.grad is None  # the teacher's bound is a constant
    torch.testing.assert_close(lb_s.grad, torch.tensor([-0.5, 0.0], dtype=torch.float64))


# ---------------------------------------------------------------------------------------------------
# eps_t = 0: the clean losses, exactly, and no bound pass


@pytest.mark.parametrize("name", ["ibp", "crown_ibp"])
def test_warm_up_is_clean_ce_exactly(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    net, batch = mlp(), fixed_batch()
    monkeypatch.setattr(certified, "margin_upper_bounds", _forbidden)
    for kappa_start in (1.0, 0.3):  # at eps 0 the bound term is the clean CE, whatever κ
        method = build_method(name, {"warmup_epochs": 2, "kappa_start": kappa_start})
        out = method(net, None, batch, info_at(15))
        assert out.logs["eps"] == 0.0
        assert torch.equal(out.loss, F.cross_entropy(net(batch.x), batch.y))


def test_faithful_warm_up_is_kd_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    student, teacher, batch = mlp(0), mlp(1).eval().requires_grad_(False), fixed_batch()
    monkeypatch.setattr(certified, "margin_upper_bounds", _forbidden)
    monkeypatch.setattr("robustkd.methods.faithful.teacher_margin_lower", _forbidden)
    for tau in (1.0, 4.0):
        out = build_method("faithful", {"temperature": tau, "warmup_epochs": 2})(student, teacher, batch, info_at(15))
        assert out.logs["kappa"] == 0.0 and out.logs["eps"] == 0.0
        want, _ = kd_loss(student(batch.x), teacher(batch.x), batch.y, alpha=1.0, temperature=tau)
        assert torch.equal(out.loss, want)
        torch.testing.assert_close(out.loss, tau**2 * kl_closed(teacher(batch.x), student(batch.x), tau))
    out = build_method("faithful", {"ce_weight": 0.5, "warmup_epochs": 2})(student, teacher, batch, info_at(3))
    zs, zt = student(batch.x), teacher(batch.x)
    torch.testing.assert_close(out.loss, kl_closed(zt, zs, 1.0) + 0.5 * ce_closed(zs, batch.y))


def _forbidden(*args, **kwargs):
    raise AssertionError("no bound pass at eps_t = 0")


# ---------------------------------------------------------------------------------------------------
# Hygiene: teacher frozen, gradients into the student only, passes, model modes


def tiny_cnn(seed: int, bn: bool = False) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [Normalize([0.5], [0.25]), nn.Conv2d(1, 4, 3, stride=2, padding=1)]
    if bn:
        layers.append(nn.BatchNorm2d(4))
    layers += [nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 16), nn.ReLU(), nn.Linear(16, K)]
    return nn.Sequential(*layers)


def cnn_batch(n: int = 8) -> Batch:
    torch.manual_seed(2)
    return Batch(torch.rand(n, 1, 8, 8), torch.randint(0, K, (n,)))


MID_RAMP = info_at(25)  # r = 0.75 under the options below: eps, κ > 0 and β in (0, 1)
RAMP = {"threat": {"eps": 0.1}, "warmup_epochs": 1, "ramp_epochs": 2}


class Counter:
    def __init__(self, module: nn.Module) -> None:
        self.calls = 0
        module.register_forward_pre_hook(self._hook)

    def _hook(self, _module: nn.Module, _args: tuple) -> None:
        self.calls += 1


def _count_spec_bounds(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    calls = {"ibp": 0, "crown": 0, "best": 0}
    original = Verifier.spec_bounds

    def counting(self, state, C, bound_lower=True, bound_upper=True):
        calls[self.final] += 1
        return original(self, state, C, bound_lower, bound_upper)

    monkeypatch.setattr(Verifier, "spec_bounds", counting)
    return calls


@pytest.mark.parametrize(
    ("name", "args"),
    [
        ("ibp", {}),
        ("crown_ibp", {}),
        ("faithful", {}),
        ("faithful", {"bound": "crown-ibp", "teacher_bound": "best"}),
        ("faithful", {"loss_form": "soft_ce", "teacher_bound": "crown-ibp"}),
        ("faithful", {"loss_form": "log_hinge", "teacher_bound": "crown-ibp"}),
    ],
)
def test_step_hygiene_and_declared_passes(name: str, args: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    student, teacher, batch = tiny_cnn(0, bn=True).train(), tiny_cnn(1).eval(), cnn_batch()
    teacher.requires_grad_(True)  # even an unfrozen teacher must get no gradient
    method = build_method(name, {**RAMP, **args})
    method(student, teacher, batch, MID_RAMP)  # first call: the boundability check runs once
    s_count, t_count = Counter(student), Counter(teacher)
    calls = _count_spec_bounds(monkeypatch)
    bn_before = int(student[2].num_batches_tracked)

    out = method(student, teacher if method.needs_teacher else None, batch, MID_RAMP)
    out.loss.backward()

    assert student.training and not teacher.training
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in student.parameters())
    # BatchNorm statistics move once per step (the clean forward), never in the bound pass.
    assert int(student[2].num_batches_tracked) - bn_before == 1
    passes = method.passes()
    assert s_count.calls == passes["student_fwd"] == 1
    assert t_count.calls == passes.get("teacher_fwd", 0)
    # One interval pass per bounded network; a CROWN backward pass where declared (its spec_bounds call).
    assert calls["ibp"] == passes["student_ibp"] + passes.get("teacher_ibp", 0) - passes.get("teacher_crown_bwd", 0)
    assert calls["crown"] + calls["best"] == passes.get("student_crown_bwd", 0) + passes.get("teacher_crown_bwd", 0)
    for key in ("eps", "kappa", "cert_acc"):
        assert key in out.logs
    assert all(math.isfinite(float(v)) for v in out.logs.values())
    assert out.logits is not None and out.logits.shape == (len(batch.y), K)


def test_crown_pass_stops_when_beta_reaches_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    student, batch = tiny_cnn(0), cnn_batch()
    method = build_method("crown_ibp", RAMP)
    method(student, None, batch, info_at(0))  # the one-off boundability check
    calls = _count_spec_bounds(monkeypatch)
    method(student, None, batch, info_at(40))  # r = 1: β = 0
    assert calls == {"ibp": 1, "crown": 0, "best": 0}


def test_faithful_gradient_reaches_only_the_student() -> None:
    student, teacher, batch = tiny_cnn(0), tiny_cnn(1).eval(), cnn_batch()
    teacher.requires_grad_(True)
    method = build_method("faithful", {**RAMP, "kappa_max": 1.0, "warmup_epochs": 0, "ramp_epochs": 0})
    out = method(student, teacher, batch, info_at(0))  # κ = 1: the loss is L_F alone
    grads = torch.autograd.grad(out.loss, [*student.parameters(), *teacher.parameters()], allow_unused=True)
    n = len(list(student.parameters()))
    assert all(g is not None for g in grads[:n]) and any(g.abs().sum() > 0 for g in grads[:n])
    assert all(g is None for g in grads[n:])


def test_faithful_joint_gap_bound_is_the_smaller_bound_and_trains_the_student() -> None:
    student, teacher, batch = tiny_cnn(0), tiny_cnn(1).eval(), cnn_batch()
    opts = {**RAMP, "kappa_max": 1.0, "warmup_epochs": 0, "ramp_epochs": 0, "loss_form": "hinge"}
    decoupled = build_method("faithful", opts)(student, teacher, batch, info_at(0))
    joint = build_method("faithful", {**opts, "gap_bound": "joint"})(student, teacher, batch, info_at(0))
    # min(decoupled, joint) per point: the hinge can only fall, and the logged bound with it.
    assert joint.loss <= decoupled.loss + 1e-6 and joint.logs["gap_bound"] <= decoupled.logs["gap_bound"] + 1e-6
    grads = torch.autograd.grad(joint.loss, list(student.parameters()), allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_faithful_joint_gap_bound_refuses_other_forms_and_batchnorm_students() -> None:
    with pytest.raises(ValueError, match="loss_form hinge"):
        build_method("faithful", {"gap_bound": "joint", "loss_form": "log_hinge"})
    with pytest.raises(ValueError, match="gap_bound"):
        build_method("faithful", {"gap_bound": "pooled"})
    method = build_method("faithful", {**RAMP, "warmup_epochs": 0, "ramp_epochs": 0, "gap_bound": "joint"})
    with pytest.raises(ConfigError, match="without BatchNorm"):
        method(tiny_cnn(0, bn=True).train(), tiny_cnn(1).eval(), cnn_batch(), info_at(0))


def test_faithful_refuses_missing_or_training_teacher() -> None:
    student, teacher, batch = tiny_cnn(0), tiny_cnn(1), cnn_batch()
    method = build_method("faithful")
    with pytest.raises(ConfigError, match="teacher"):
        method(student, None, batch, MID_RAMP)
    with pytest.raises(ConfigError, match="eval mode"):
        method(student, teacher.train(), batch, MID_RAMP)


def test_train_mode_batchnorm_bounds_use_the_clean_batch_statistics() -> None:
    student, batch = tiny_cnn(0, bn=True).train(), cnn_batch()
    with torch.no_grad():
        student[2].weight.uniform_(0.5, 1.5)
        student[2].bias.uniform_(-0.2, 0.2)
    bn = student[2]
    buffers = (bn.running_mean, bn.running_var)
    logits, bounds = certified.bounded_forward(student, batch.x, batch.y, 0.05, beta=0.5)
    assert bn.training and (bn.running_mean, bn.running_var) == buffers  # restored: the same tensors

    # The same network frozen by hand: eval-mode BatchNorm whose running statistics are the batch ones.
    frozen = copy.deepcopy(student).eval()
    with torch.no_grad():
        h = frozen[1](frozen[0](batch.x))
        frozen[2].running_mean.copy_(h.mean((0, 2, 3)))
        frozen[2].running_var.copy_(h.var((0, 2, 3), correction=0))
    torch.testing.assert_close(logits, frozen(batch.x), rtol=1e-5, atol=1e-5)
    _, u_ibp = margin_bounds(frozen, batch.x, batch.y, 0.05, method="ibp")
    _, u_crown = margin_bounds(frozen, batch.x, batch.y, 0.05, method="crown-ibp")
    torch.testing.assert_close(bounds.upper, 0.5 * u_crown + 0.5 * u_ibp, rtol=1e-5, atol=1e-5)
    # Gradients flow through the batch statistics, as through train-mode BatchNorm.
    (g,) = torch.autograd.grad(bounds.upper.sum(), student[1].weight)
    assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_unboundable_model_is_refused_on_the_first_step() -> None:
    net = nn.Sequential(Normalize([0.5], [0.25]), nn.Flatten(), nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, K))
    with pytest.raises(UnsupportedModelError, match="Tanh"):
        build_method("ibp")(net, None, cnn_batch(), info_at(0))  # still in the warm-up


@pytest.mark.parametrize(
    ("name", "args", "match"),
    [
        ("ibp", {"threat": {"eps": -0.1}}, "threat: eps"),
        ("ibp", {"threat": "l2-0.5"}, "Linf"),
        ("ibp", {"kappa_end": 1.5}, "kappa_end"),
        ("ibp", {"warmup_epochs": -1}, "warmup_epochs"),
        ("ibp", {"beta_end": 0.0}, "no option"),
        ("crown_ibp", {"beta_start": 2.0}, "beta_start"),
        ("faithful", {"bound": "crown"}, "bound"),
        ("faithful", {"teacher_bound": "alpha-crown"}, "teacher_bound"),
        ("faithful", {"loss_form": "kl"}, "loss_form"),
        ("faithful", {"rho": 1.0}, "rho"),
        ("faithful", {"kappa_max": 1.2}, "kappa_max"),
        ("faithful", {"temperature": 0}, "temperature"),
        ("faithful", {"kl_reduction": "none"}, "per-example"),
    ],
)
def test_bad_options_are_refused(name: str, args: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        build_method(name, args)


def test_registered_defaults() -> None:
    ibp, crown, faithful = build_method("ibp"), build_method("crown_ibp"), build_method("faithful")
    assert isinstance(ibp, IBP) and isinstance(crown, CrownIBP) and isinstance(faithful, Faithful)
    assert all(METHODS.get(n).name == n for n in NAMES)
    assert (ibp.kappa_start, ibp.kappa_end, ibp.threat.eps, ibp.threat.norm) == (1.0, 0.5, 0.1, "linf")
    assert (crown.kappa_end, crown.beta_start, crown.beta_end) == (0.0, 1.0, 0.0)
    assert (faithful.kappa_max, faithful.bound, faithful.loss_form, faithful.rho) == (0.5, "ibp", "hinge", 0.0)
    assert not ibp.needs_teacher and not crown.needs_teacher and faithful.needs_teacher
    assert ibp.passes() == {"student_fwd": 1, "student_ibp": 1, "student_bwd": 1}
    assert crown.passes()["student_crown_bwd"] == 1
    assert faithful.passes() == {
        "student_fwd": 1,
        "student_ibp": 1,
        "student_bwd": 1,
        "teacher_fwd": 1,
        "teacher_ibp": 1,
    }


# ---------------------------------------------------------------------------------------------------
# Training works


def separable_problem(n_per_class: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """K classes, each a random 4x4 pattern of 0.2/0.8 pixels plus ±0.05 noise: separable with room for eps 0.1."""
    gen = torch.Generator().manual_seed(5)
    protos = 0.2 + 0.6 * (torch.rand(K, 1, 4, 4, generator=gen) > 0.5).float()
    y = torch.arange(K).repeat_interleave(n_per_class)
    x = protos[y] + (torch.rand(len(y), 1, 4, 4, generator=gen) * 2 - 1) * 0.05
    return x.clamp(0, 1), y


def certified_accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> float:
    net.eval()
    with torch.no_grad():
        _, upper = margin_bounds(net, x, y, eps, method="ibp")
    net.train()
    return float((upper < 0).all(1).float().mean())


def small_mlp(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        Normalize([0.5], [0.25]),
        nn.Flatten(),
        nn.Linear(16, 32),
        nn.ReLU(),
        nn.Linear(32, 32),
        nn.ReLU(),
        nn.Linear(32, K),
    )


def _train(method_name: str, args: dict, net: nn.Module, x, y, teacher=None, steps: int = 60) -> nn.Module:
    method = build_method(method_name, args)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    net.train()
    for step in range(steps):
        out = method(net, teacher, Batch(x, y), StepInfo(step // 10, step, steps // 10, 10))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    return net


@pytest.mark.parametrize("name", ["ibp", "crown_ibp"])
def test_certified_training_raises_certified_accuracy(name: str) -> None:
    x, y = separable_problem()
    eps = 0.1
    standard = _train("ibp", {"threat": {"eps": 0.0}}, small_mlp(0), x, y)  # eps 0: plain CE training
    net = small_mlp(0)
    before = certified_accuracy(net, x, y, eps)
    _train(name, {"threat": {"eps": eps}, "warmup_epochs": 1, "ramp_epochs": 2}, net, x, y)
    after = certified_accuracy(net, x, y, eps)
    # Clean training fits the data but certifies less than bound training does.
    assert after >= 0.9 and after - before >= 0.5, (before, after)
    assert after > certified_accuracy(standard, x, y, eps)


@pytest.mark.parametrize("form", ["hinge", "log_hinge", "soft_ce"])
def test_faithful_training_shrinks_the_certified_gap(form: str) -> None:
    x, y = separable_problem()
    teacher = _train("ibp", {"threat": {"eps": 0.1}, "warmup_epochs": 1, "ramp_epochs": 2}, small_mlp(1), x, y).eval()
    teacher.requires_grad_(False)
    opts = {"threat": {"eps": 0.1}, "warmup_epochs": 1, "ramp_epochs": 2, "kappa_max": 0.5}
    kd_only = _train("faithful", {**opts, "kappa_max": 0.0}, small_mlp(2), x, y, teacher)
    faithful = _train("faithful", {**opts, "loss_form": form}, small_mlp(2), x, y, teacher)
    probe = build_method("faithful", {**opts, "kappa_max": 1.0, "warmup_epochs": 0, "ramp_epochs": 0})
    gaps = {}
    for label, net in (("kd", kd_only), ("faithful", faithful)):
        net.eval()
        with torch.no_grad():
            gaps[label] = float(probe(net, teacher, Batch(x, y), info_at(0)).logs["gap_bound"])
    assert gaps["faithful"] < 0.5 * gaps["kd"], gaps


# ---------------------------------------------------------------------------------------------------
# Configs

CONFIGS = configs_of(*NAMES)


@pytest.mark.parametrize("path", CONFIGS)
def test_config_loads_validates_and_builds(path: str) -> None:
    from robustkd.attacks import ThreatModel, get_attack
    from robustkd.models import list_models, model_info

    cfg, method = shipped_config(path)
    assert cfg.method.name in NAMES
    assert cfg.model.arch in list_models() and model_info(cfg.model.arch).boundable
    if method.needs_teacher:  # faithful: robust validation, the last epoch kept
        get_attack(cfg.validate.attack)
        assert cfg.validate.select == "last"
    else:  # certified teachers keep the most-certified validation epoch
        assert cfg.validate.certify == "ibp" and cfg.validate.select == "auto"
    protocol = ThreatModel.parse(cfg.validate.protocol)
    assert method.threat.eps >= protocol.eps  # train at least at the test eps
    assert method.warmup_epochs + method.ramp_epochs < cfg.epochs  # the full eps is reached in the run
    assert (cfg.optim.name, cfg.optim.lr, cfg.data.batch_size) == ("adam", 5e-4, 256)
    assert method.needs_teacher == (cfg.method.name == "faithful")
    if method.needs_teacher:
        assert cfg.teacher is None  # given on the command line
        assert cfg.model.arch == "dm_small"
    # The architecture builds and can be bounded.
    model = create_model(cfg.model.arch, num_classes=10, in_channels=1, input_size=28, **cfg.model.args)
    margin_bounds(model.eval(), torch.rand(2, 1, 28, 28), torch.tensor([0, 1]), protocol.eps)
