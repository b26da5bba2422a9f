"""Distillation methods: kd, kdiga, advfunmatch and the robust baselines ard, rslad, iad, adaad.

Golden values come from closed forms written with explicit exp/log sums (float64), never from the library's KL
helpers. Network-level tests use tiny models and count passes with forward hooks.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import (
    FAST_ARGS,
    INFO,
    LABELS,
    REPO,
    S_LOGITS,
    T_LOGITS,
    ForwardCounter,
    TinyConvBN,
    TinyMLP,
    ce_cf,
    configs_of,
    grad_of,
    kl_cf,
    logits64,
    softmax_cf,
    tiny_pair,
)
from torch import nn

import robustkd.methods.advfunmatch as advfunmatch_mod
from robustkd.config import from_dict, validate
from robustkd.errors import ConfigError
from robustkd.methods import Batch, StepInfo, build_method
from robustkd.methods.adaad import AdaAD, adaad_loss
from robustkd.methods.advfunmatch import advfunmatch_loss
from robustkd.methods.ard import ARD, ard_loss
from robustkd.methods.iad import IAD, iad1_loss, iad2_loss, introspection_weights
from robustkd.methods.kd import kd_loss
from robustkd.methods.kdiga import kdiga_grad_term, kdiga_loss, student_input_gradient, teacher_input_gradient
from robustkd.methods.rslad import RSLAD, rslad_loss

# ---------------------------------------------------------------------------------------------------
# Golden outer losses: kd, advfunmatch.


# ---------------------------------------------------------------------------------------------------
# Golden outer losses.


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean_over_classes"])
@pytest.mark.parametrize(("alpha", "tau"), [(0.7, 3.0), (1.0, 4.0), (0.0, 2.0), (0.5, 1.0)])
def test_kd_loss_golden(reduction: str, alpha: float, tau: float) -> None:
    zs, zt, y = logits64(S_LOGITS), logits64(T_LOGITS), torch.tensor(LABELS)

    def closed(zs_: torch.Tensor) -> torch.Tensor:
        kl = kl_cf(softmax_cf(zt, tau), softmax_cf(zs_, tau), reduction)
        return alpha * tau**2 * kl + (1 - alpha) * ce_cf(zs_, y)

    loss, terms = kd_loss(zs, zt, y, alpha, tau, reduction)
    torch.testing.assert_close(loss, closed(zs), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(terms["kl"], kl_cf(softmax_cf(zt, tau), softmax_cf(zs, tau), reduction))
    (g_code,) = grad_of(lambda z: kd_loss(z, zt, y, alpha, tau, reduction)[0], zs)
    (g_cf,) = grad_of(closed, zs)
    torch.testing.assert_close(g_code, g_cf, rtol=1e-10, atol=1e-12)
    if reduction == "batchmean":
        # Analytic gradient: α·τ·(q − p)/B + (1 − α)·(softmax(z) − onehot)/B.
        b = zs.shape[0]
        onehot = F.one_hot(y, 4).double()
        analytic = alpha * tau * (softmax_cf(zs, tau) - softmax_cf(zt, tau)) / b
        analytic = analytic + (1 - alpha) * (softmax_cf(zs) - onehot) / b
        torch.testing.assert_close(g_code, analytic, rtol=1e-10, atol=1e-12)


def test_kd_temperature_factor_does_not_depend_on_alpha() -> None:
    zs, zt, y = logits64(S_LOGITS), logits64(T_LOGITS), torch.tensor(LABELS)
    tau = 5.0
    kl = kl_cf(softmax_cf(zt, tau), softmax_cf(zs, tau), "batchmean")
    for alpha in (0.1, 0.5, 0.9, 1.0):
        loss, terms = kd_loss(zs, zt, y, alpha, tau)
        torch.testing.assert_close(loss - (1 - alpha) * terms["ce"], alpha * tau**2 * kl)


def test_kd_loss_teacher_gets_no_gradient() -> None:
    zs, zt, y = logits64(S_LOGITS), logits64(T_LOGITS).requires_grad_(True), torch.tensor(LABELS)
    kd_loss(zs.requires_grad_(True), zt, y, 0.5, 2.0)[0].backward()
    assert zt.grad is None


@pytest.mark.parametrize("tau", [1.0, 3.0])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean_over_classes"])
def test_advfunmatch_loss_golden(tau: float, reduction: str) -> None:
    zs, zt, y = logits64(S_LOGITS), logits64(T_LOGITS), torch.tensor(LABELS)

    def closed(zs_: torch.Tensor) -> torch.Tensor:
        return tau**2 * kl_cf(softmax_cf(zt, tau), softmax_cf(zs_, tau), reduction)

    loss, terms = advfunmatch_loss(zs, zt, y, temperature=tau, reduction=reduction)
    torch.testing.assert_close(loss, closed(zs), rtol=1e-12, atol=1e-12)
    assert set(terms) == {"kl"}
    torch.testing.assert_close(
        grad_of(lambda z: advfunmatch_loss(z, zt, y, temperature=tau, reduction=reduction)[0], zs)[0],
        grad_of(closed, zs)[0],
        rtol=1e-10,
        atol=1e-12,
    )
    teacher = zt.clone().requires_grad_(True)
    advfunmatch_loss(zs.requires_grad_(True), teacher, y, temperature=tau)[0].backward()
    assert teacher.grad is None  # the teacher's output at x' is a constant in the outer loss


def test_advfunmatch_loss_ce_weight_and_mixed_labels() -> None:
    zs, zt, y = logits64(S_LOGITS), logits64(T_LOGITS), torch.tensor(LABELS)
    y_mix, lam, w = torch.tensor([1, 2, 0]), 0.3, 0.25
    loss, terms = advfunmatch_loss(zs, zt, y, ce_weight=w, y_mix=y_mix, lam=lam)
    want = kl_cf(softmax_cf(zt), softmax_cf(zs), "batchmean") + w * (lam * ce_cf(zs, y) + (1 - lam) * ce_cf(zs, y_mix))
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)
    assert set(terms) == {"kl", "ce"}


# ---------------------------------------------------------------------------------------------------
# KDIGA: the gradient term.


def test_kdiga_grad_term_closed_forms() -> None:
    g = torch.Generator().manual_seed(1)
    g_s = torch.randn(4, 1, 3, 3, generator=g, dtype=torch.float64)
    g_t = torch.randn(4, 1, 3, 3, generator=g, dtype=torch.float64)
    b, gamma = 4, 0.5
    flat = (g_s - g_t).reshape(-1)
    code_norm = gamma / b * math.sqrt(sum(v * v for v in flat.tolist()))
    assert kdiga_grad_term(g_s, g_t, gamma, "l2_batch").item() == pytest.approx(code_norm, rel=1e-12)
    per_example = [sum(v * v for v in (b * (g_s[i] - g_t[i])).reshape(-1).tolist()) for i in range(b)]
    want = gamma * sum(per_example) / b
    assert kdiga_grad_term(g_s, g_t, gamma, "l2_squared_per_example").item() == pytest.approx(want, rel=1e-12)
    with pytest.raises(ValueError, match="grad_norm"):
        kdiga_grad_term(g_s, g_t, gamma, "l1")


def test_kdiga_grad_term_at_zero_difference_has_a_finite_gradient() -> None:
    g_s = torch.zeros(2, 3, dtype=torch.float64, requires_grad=True)
    kdiga_grad_term(g_s, torch.zeros(2, 3, dtype=torch.float64), 0.5).backward()
    assert torch.isfinite(g_s.grad).all()


def test_kdiga_student_input_gradient_matches_linear_closed_form() -> None:
    torch.manual_seed(3)
    lin = nn.Linear(6, 4).double()
    x, y = torch.rand(5, 6, dtype=torch.float64), torch.tensor([0, 3, 1, 2, 3])
    logits, g_s = student_input_gradient(lin, x, y)
    # CE_mean of a linear model: ∇_x = (softmax(z) − e_y) W / B, per row.
    p = softmax_cf(lin(x).detach())
    want = (p - F.one_hot(y, 4).double()) @ lin.weight.detach() / 5
    torch.testing.assert_close(g_s, want, rtol=1e-10, atol=1e-12)
    assert g_s.requires_grad  # kept in the graph: double backprop
    torch.testing.assert_close(logits.detach(), lin(x).detach())


class TanhMLP(nn.Module):
    def __init__(self, d_in: int, hidden: int, classes: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _central_differences(fn, params: list[nn.Parameter], h: float = 1e-6, picks: int = 6) -> list[tuple]:
    """(param index, flat index, finite difference) for a few coordinates of each parameter."""
    out = []
    for k, p in enumerate(params):
        for j in torch.linspace(0, p.numel() - 1, min(picks, p.numel())).long().tolist():
            flat = p.data.view(-1)
            old = flat[j].item()
            flat[j] = old + h
            up = fn().item()
            flat[j] = old - h
            down = fn().item()
            flat[j] = old
            out.append((k, j, (up - down) / (2 * h)))
    return out


@pytest.mark.parametrize("grad_norm", ["l2_batch", "l2_squared_per_example"])
def test_kdiga_grad_term_parameter_gradient_matches_finite_differences(grad_norm: str) -> None:
    torch.manual_seed(4)
    student = TanhMLP(2 * 3 * 3, 5, 3).double()
    teacher = TanhMLP(2 * 3 * 3, 7, 3).double().eval().requires_grad_(False)
    x, y = torch.rand(4, 2, 3, 3, dtype=torch.float64), torch.tensor([0, 2, 1, 2])
    _, g_t = teacher_input_gradient(teacher, x, y)

    def term() -> torch.Tensor:
        _, g_s = student_input_gradient(student, x, y)
        return kdiga_grad_term(g_s, g_t, 0.5, grad_norm)

    # The term's value against the explicit formula, from independently computed input gradients.
    xs = x.clone().requires_grad_(True)
    (g_s_ref,) = torch.autograd.grad(F.cross_entropy(student(xs), y), xs)
    diff = (g_s_ref - g_t).reshape(4, -1)
    explicit = 0.5 / 4 * diff.pow(2).sum().sqrt() if grad_norm == "l2_batch" else 0.5 * (4 * diff).pow(2).sum(1).mean()
    torch.testing.assert_close(term().detach(), explicit.detach(), rtol=1e-10, atol=1e-14)

    params = list(student.parameters())
    analytic = torch.autograd.grad(term(), params)
    for k, j, fd in _central_differences(term, params):
        assert analytic[k].reshape(-1)[j].item() == pytest.approx(fd, rel=1e-5, abs=1e-9)


def test_kdiga_full_loss_matches_closed_form_and_finite_differences() -> None:
    torch.manual_seed(5)
    student = TanhMLP(8, 6, 3).double().train()
    teacher = TanhMLP(8, 4, 3).double().eval().requires_grad_(False)
    x, y = torch.rand(6, 2, 2, 2, dtype=torch.float64), torch.tensor([0, 1, 2, 2, 1, 0])
    method = build_method("kdiga", {"alpha": 0.3, "temperature": 2.0, "gamma": 10.0})

    def loss() -> torch.Tensor:
        return method(student, teacher, Batch(x, y), INFO).loss

    zt = teacher(x)
    xs = x.clone().requires_grad_(True)
    zs = student(xs)
    (g_s,) = torch.autograd.grad(F.cross_entropy(zs, y), xs)
    xt = x.clone().requires_grad_(True)
    (g_t,) = torch.autograd.grad(F.cross_entropy(teacher(xt), y), xt)
    want = 0.3 * 4 * kl_cf(softmax_cf(zt.detach(), 2), softmax_cf(zs.detach(), 2), "batchmean")
    want = want + 0.7 * ce_cf(zs.detach(), y) + 10.0 / 6 * (g_s - g_t).pow(2).sum().sqrt()
    torch.testing.assert_close(loss().detach(), want, rtol=1e-10, atol=1e-12)
    out = kdiga_loss(zs, zt, y, g_s, g_t, alpha=0.3, temperature=2.0, gamma=10.0)[0]
    torch.testing.assert_close(out.detach(), want, rtol=1e-10, atol=1e-12)

    params = list(student.parameters())
    analytic = torch.autograd.grad(loss(), params)
    for k, j, fd in _central_differences(loss, params, picks=4):
        assert analytic[k].reshape(-1)[j].item() == pytest.approx(fd, rel=1e-5, abs=1e-9)


def test_kdiga_mean_over_classes_reproduces_the_code_reduction() -> None:
    torch.manual_seed(6)
    student, teacher = TanhMLP(4, 5, 10).double(), TanhMLP(4, 3, 10).double().eval().requires_grad_(False)
    x, y = torch.rand(3, 1, 2, 2, dtype=torch.float64), torch.tensor([1, 9, 4])
    outs = {
        r: build_method("kdiga", {"kl_reduction": r, "gamma": 0.0})(student, teacher, Batch(x, y), INFO).logs["kl"]
        for r in ("batchmean", "mean_over_classes")
    }
    torch.testing.assert_close(outs["mean_over_classes"] * 10, outs["batchmean"])


@pytest.mark.parametrize("name", ["kd", "kdiga", "advfunmatch"])
def test_an_unfrozen_teacher_still_gets_no_gradient(name: str) -> None:
    student, teacher, batch = tiny_pair()
    teacher.requires_grad_(True)
    build_method(name, FAST_ARGS[name])(student, teacher, batch, INFO).loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.requires_grad for p in teacher.parameters())  # the flags are restored


@pytest.mark.parametrize("name", ["kd", "kdiga", "advfunmatch"])
def test_distillation_methods_refuse_a_missing_teacher(name: str) -> None:
    student, _, batch = tiny_pair()
    method = build_method(name, FAST_ARGS[name])
    assert method.needs_teacher
    with pytest.raises(ConfigError, match="teacher"):
        method(student, None, batch, INFO)


@pytest.mark.parametrize("name", ["kd", "kdiga", "advfunmatch"])
def test_distillation_methods_refuse_a_teacher_in_train_mode(name: str) -> None:
    student, teacher, batch = tiny_pair()
    teacher.net[1].train()  # one submodule left in train mode is enough to be refused
    with pytest.raises(ConfigError, match="eval mode"):
        build_method(name, FAST_ARGS[name])(student, teacher, batch, INFO)


def test_kdiga_uses_one_student_forward_for_kd_and_gradient() -> None:
    student, teacher, batch = tiny_pair()
    count = ForwardCounter(student)
    out = build_method("kdiga")(student, teacher, batch, INFO)
    assert count.calls == 1
    assert count.inputs[0].requires_grad
    assert out.logits is not None and out.logits.shape == (8, 4)


def test_kdiga_accepts_a_student_of_another_architecture() -> None:
    torch.manual_seed(0)
    x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    for student, teacher in ((TinyMLP(), TinyConvBN().eval()), (TinyConvBN(), TinyMLP())):
        teacher.eval().requires_grad_(False)
        out = build_method("kdiga")(student.train(), teacher, Batch(x, y), INFO)
        out.loss.backward()
        assert out.logs["grad"] > 0


# ---------------------------------------------------------------------------------------------------
# AdvFunMatch.


def test_advfunmatch_teacher_and_student_see_the_same_tensor() -> None:
    student, teacher, batch = tiny_pair()
    s_count, t_count = ForwardCounter(student), ForwardCounter(teacher)
    method = build_method("advfunmatch", FAST_ARGS["advfunmatch"])
    method(student, teacher, batch, INFO)
    # Every attack step and the final matching step: the same input, the very same storage.
    assert s_count.calls == t_count.calls == method.threat.steps + 1
    for xs, xt in zip(s_count.inputs, t_count.inputs):
        assert torch.equal(xs, xt) and xs.data_ptr() == xt.data_ptr()
    final = s_count.inputs[-1]
    assert (final - batch.x).abs().max() <= method.threat.eps + 1e-6
    assert not torch.equal(final, batch.x)


def test_advfunmatch_inner_maximisation_increases_the_mismatch() -> None:
    from robustkd.attacks import make_objective, perturb

    student, teacher, batch = tiny_pair()
    student.eval()
    method = build_method("advfunmatch", {"threat": {"eps": 0.1, "step_size": 0.02, "steps": 10}})

    def mismatch(x: torch.Tensor) -> float:
        with torch.no_grad():
            return kl_cf(softmax_cf(teacher(x).double()), softmax_cf(student(x).double()), "sum").item()

    x_adv = perturb(
        student, batch.x, batch.y, method.threat, method.objective, teacher=teacher, early_stop=False, track_best=False
    ).x_adv
    assert mismatch(x_adv) > mismatch(batch.x) * 1.05
    assert method.objective == make_objective("mismatch")


def test_without_augmentation_advfunmatch_at_tau_1_is_adaad_at_alpha_1() -> None:
    # The same inner maximisation (KL(p_T(x') || p_S(x')) through both networks, eval mode, normal start) and
    # the same outer KL at x': the two Fashion-MNIST rows of fmnist_cpu_methods agree to the last digit. What
    # sets AdvFunMatch apart is consistent teaching under strong augmentation (docs/RESULTS.md).
    threat = {"eps": 0.1, "step_size": 0.02, "steps": 5, "random_start": "normal"}
    grads = []
    for name, args in (("advfunmatch", {"temperature": 1.0}), ("adaad", {"alpha": 1.0})):
        student, teacher, batch = tiny_pair()
        torch.manual_seed(7)
        out = build_method(name, {**args, "threat": threat, "attack_mode": "eval"})(student, teacher, batch, INFO)
        out.loss.backward()
        grads.append((out.loss.detach(), [p.grad.clone() for p in student.parameters()]))
    (loss_a, grad_a), (loss_b, grad_b) = grads
    assert loss_a > 0 and torch.equal(loss_a, loss_b)
    assert all(torch.equal(a, b) for a, b in zip(grad_a, grad_b))


def test_advfunmatch_mixup_is_drawn_once_and_shared(monkeypatch: pytest.MonkeyPatch) -> None:
    student, teacher, batch = tiny_pair()
    draws: list[torch.Tensor] = []
    original = advfunmatch_mod.mixup

    def counting(x: torch.Tensor, alpha: float):
        out = original(x, alpha)
        draws.append(out[0])
        return out

    monkeypatch.setattr(advfunmatch_mod, "mixup", counting)
    s_count, t_count = ForwardCounter(student), ForwardCounter(teacher)
    method = build_method("advfunmatch", {**FAST_ARGS["advfunmatch"], "mixup_alpha": 1.0, "ce_weight": 0.1})
    out = method(student, teacher, batch, INFO)
    assert len(draws) == 1
    mixed = draws[0]
    assert not torch.equal(mixed, batch.x)
    xs, xt = s_count.inputs[-1], t_count.inputs[-1]
    assert torch.equal(xs, xt) and xs.data_ptr() == xt.data_ptr()
    # The ball is around the mixed input, not around the raw batch.
    assert (xs - mixed).abs().max() <= method.threat.eps + 1e-6
    assert 0.0 <= out.logs["mixup_lambda"] <= 1.0
    assert "ce" in out.logs


def test_mixup_is_a_convex_combination_of_the_batch() -> None:
    torch.manual_seed(2)
    x = torch.rand(6, 1, 4, 4)
    mixed, perm, lam = advfunmatch_mod.mixup(x, 0.4)
    torch.testing.assert_close(mixed, lam * x + (1 - lam) * x[perm])
    assert sorted(perm.tolist()) == list(range(6))
    assert mixed.min() >= 0 and mixed.max() <= 1


# ===================================================================================================
# Robust distillation baselines: ARD, RSLAD, IAD, AdaAD.

REDUCTIONS = ("batchmean", "sum", "mean_over_classes")

# ---------------------------------------------------------------------------------------------------
# Closed forms (float64, explicit sums)


def softmax(z: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    e = torch.exp(z / tau)
    return e / e.sum(dim=1, keepdim=True)


def kl_rows(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Σ_c p_c (log p_c − log q_c) per row."""
    return (p * (torch.log(p) - torch.log(q))).sum(dim=1)


def ce_mean(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    q = softmax(z)
    return -torch.log(q[torch.arange(len(y)), y]).sum() / len(y)


def reduce_rows(rows: torch.Tensor, reduction: str, classes: int) -> torch.Tensor:
    if reduction == "batchmean":
        return rows.sum() / len(rows)
    if reduction == "sum":
        return rows.sum()
    assert reduction == "mean_over_classes"
    return rows.sum() / (len(rows) * classes)


# Fixed tiny logits: B = 3 examples, C = 4 classes.
S_ADV = [[1.0, -0.5, 0.3, 0.0], [0.2, 0.1, -1.0, 0.7], [-0.4, 1.5, 0.2, -0.3]]
S_CLEAN = [[0.5, 0.5, 0.0, -0.2], [1.0, -1.0, 0.0, 0.3], [0.1, 0.9, -0.6, 0.4]]
T_CLEAN = [[2.0, 0.0, -1.0, 0.5], [-0.3, 0.8, 0.5, 0.1], [0.0, 2.5, -0.5, 0.2]]
T_ADV = [[1.2, 0.4, -0.2, 0.1], [0.3, 0.2, 0.9, -0.4], [-0.2, 0.6, 0.3, 0.5]]
ST_ADV = [[0.7, 0.1, 0.2, -0.9], [0.0, 0.5, -0.5, 1.0], [0.3, -0.3, 1.1, 0.0]]
Y = [0, 1, 1]


def t64(values: list[list[float]], grad: bool = False) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64, requires_grad=grad)


def grads(fn, *tensors: torch.Tensor) -> list[torch.Tensor]:
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    value = fn(*leaves)
    # A term with weight 0 is skipped by the library: its input then has a zero gradient.
    found = torch.autograd.grad(value, leaves, allow_unused=True)
    return [value.detach(), *(torch.zeros_like(t) if g is None else g for t, g in zip(leaves, found))]


def assert_close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-10, atol: float = 1e-12) -> None:
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


# ---------------------------------------------------------------------------------------------------
# Golden: outer losses


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(("alpha", "tau"), [(1.0, 30.0), (0.5, 4.0), (0.0, 2.0), (0.9, 1.0)])
def test_ard_loss_golden(reduction: str, alpha: float, tau: float) -> None:
    y = torch.tensor(Y)
    s_adv, s_clean, t = t64(S_ADV), t64(S_CLEAN), t64(T_CLEAN)

    def closed(adv: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
        kl = reduce_rows(kl_rows(softmax(t, tau), softmax(adv, tau)), reduction, 4)
        return alpha * tau**2 * kl + (1 - alpha) * ce_mean(clean, y)

    def ours(adv: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
        return ard_loss(adv, t, clean, y, alpha, tau, reduction)[0]

    want, ours_ = grads(closed, s_adv, s_clean), grads(ours, s_adv, s_clean)
    for a, b in zip(ours_, want):
        assert_close(a, b)
    # The KL gradient w.r.t. the adversarial logits is α·τ·(q^τ − p^τ) per example, then reduced.
    scale = {"batchmean": 3, "sum": 1, "mean_over_classes": 12}[reduction]
    analytic = alpha * tau * (softmax(s_adv, tau) - softmax(t, tau)) / scale
    assert_close(ours_[1], analytic)


def test_ard_code_reduction_is_tau_squared_over_classes() -> None:
    """ARD's code: 900 · nn.KLDivLoss() on 4 classes = (τ²/C) · per-example KL, pinned by value."""
    y = torch.tensor(Y)
    s_adv, t = t64(S_ADV), t64(T_CLEAN)
    code, _ = ard_loss(s_adv, t, None, y, 1.0, 30.0, "mean_over_classes")
    paper, _ = ard_loss(s_adv, t, None, y, 1.0, 30.0, "batchmean")
    per_example = kl_rows(softmax(t, 30.0), softmax(s_adv, 30.0)).mean()
    assert_close(code, 900 / 4 * per_example)
    assert_close(paper, 900 * per_example)
    # Computed once from the closed form with Python's math module (see _ard_pin below).
    assert code.item() == pytest.approx(_ard_pin(), rel=1e-12)
    assert code.item() == pytest.approx(0.07928361217399288, rel=1e-9)


def _ard_pin() -> float:
    tau, total = 30.0, 0.0
    for s_row, t_row in zip(S_ADV, T_CLEAN):
        zs = sum(math.exp(v / tau) for v in s_row)
        zt = sum(math.exp(v / tau) for v in t_row)
        for s, t in zip(s_row, t_row):
            p, q = math.exp(t / tau) / zt, math.exp(s / tau) / zs
            total += p * (math.log(p) - math.log(q))
    return tau**2 * total / (len(S_ADV) * len(S_ADV[0]))


def test_ard_loss_skips_unused_terms() -> None:
    y = torch.tensor(Y)
    _, terms = ard_loss(t64(S_ADV), t64(T_CLEAN), None, y, 1.0, 30.0)
    assert set(terms) == {"kl"}
    _, terms = ard_loss(None, None, t64(S_CLEAN), y, 0.0, 30.0)
    assert set(terms) == {"ce"}
    with pytest.raises(ValueError, match="clean"):
        ard_loss(t64(S_ADV), t64(T_CLEAN), None, y, 0.5, 30.0)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(("alpha", "log_eps", "scale"), [(5 / 6, 0.0, 1.0), (5 / 6, 1e-5, 1.0), (1.0, 0.0, 10.0)])
def test_rslad_loss_golden(reduction: str, alpha: float, log_eps: float, scale: float) -> None:
    t = t64(T_CLEAN)
    p = softmax(t)

    def kl_eps(q: torch.Tensor) -> torch.Tensor:
        # The code's element-wise KL: p·log(p + eps) − p·log q.
        return (p * torch.log(p + log_eps) - p * torch.log(q)).sum(dim=1)

    def closed(adv: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
        out = alpha * reduce_rows(kl_eps(softmax(adv)), reduction, 4)
        if alpha < 1:
            out = out + (1 - alpha) * reduce_rows(kl_eps(softmax(clean)), reduction, 4)
        return scale * out

    def ours(adv: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
        return rslad_loss(adv, clean, p, alpha, reduction, log_eps, scale)[0]

    want, got = grads(closed, t64(S_ADV), t64(S_CLEAN)), grads(ours, t64(S_ADV), t64(S_CLEAN))
    for a, b in zip(got, want):
        assert_close(a, b)


def test_rslad_code_options_pinned() -> None:
    """zibojia/RSLAD: torch.mean over B·C of p·log(p + 1e-5) − p·log q, weights 5/6 and 1/6."""
    p = softmax(t64(T_CLEAN))
    code, _ = rslad_loss(t64(S_ADV), t64(S_CLEAN), p, 5 / 6, "mean_over_classes", 1e-5)
    exact, _ = rslad_loss(t64(S_ADV), t64(S_CLEAN), p, 5 / 6, "mean_over_classes", 0.0)
    assert code.item() == pytest.approx(0.06050617005039086, rel=1e-9)
    # log(p + 1e-5) shifts the value by a constant (Σ p·log((p + 1e-5)/p) / (B·C)) and leaves the gradient.
    shift = (p * (torch.log(p + 1e-5) - torch.log(p))).sum() / 12
    assert_close(code - exact, shift)
    g_code = grads(lambda a: rslad_loss(a, None, p, 1.0, "batchmean", 1e-5)[0], t64(S_ADV))[1]
    g_exact = grads(lambda a: rslad_loss(a, None, p, 1.0, "batchmean", 0.0)[0], t64(S_ADV))[1]
    assert_close(g_code, g_exact)


def test_rslad_teacher_target_is_fixed() -> None:
    teacher = t64(T_CLEAN, grad=True)
    adv = t64(S_ADV, grad=True)
    loss, _ = rslad_loss(adv, t64(S_CLEAN), softmax(teacher))
    loss.backward()
    assert teacher.grad is None and adv.grad is not None


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("alpha", [1.0, 0.7, 0.0])
def test_adaad_loss_golden(reduction: str, alpha: float) -> None:
    t_adv, t_clean = t64(T_ADV), t64(T_CLEAN)

    def closed(adv: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
        a = reduce_rows(kl_rows(softmax(t_adv), softmax(adv)), reduction, 4)
        c = reduce_rows(kl_rows(softmax(t_clean), softmax(clean)), reduction, 4)
        return alpha * a + (1 - alpha) * c

    def ours(adv: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
        return adaad_loss(adv, t_adv, clean, t_clean, alpha, reduction)[0]

    want, got = grads(closed, t64(S_ADV), t64(S_CLEAN)), grads(ours, t64(S_ADV), t64(S_CLEAN))
    for a, b in zip(got, want):
        assert_close(a, b)


def test_adaad_cifar10_code_reduction_pinned() -> None:
    """boyellow/AdaAD CIFAR-10: nn.KLDivLoss() (mean over B·C) of KL(p_T(x') ‖ p_S(x')), α = 1."""
    loss, _ = adaad_loss(t64(S_ADV), t64(T_ADV), None, None, 1.0, "mean_over_classes")
    assert loss.item() == pytest.approx(0.07121556984747802, rel=1e-9)
    batchmean, _ = adaad_loss(t64(S_ADV), t64(T_ADV), None, None, 1.0, "batchmean")
    assert_close(batchmean, 4 * loss)


def weights64() -> torch.Tensor:
    return softmax(t64(T_ADV))[torch.arange(3), torch.tensor(Y)] ** 0.1


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(("alpha", "tau", "weighted"), [(1.0, 1.0, True), (1.0, 1.0, False), (0.6, 3.0, True)])
@pytest.mark.parametrize("introspect", [True, False])
def test_iad1_loss_golden(reduction: str, alpha: float, tau: float, weighted: bool, introspect: bool) -> None:
    y = torch.tensor(Y)
    t = t64(T_CLEAN)
    w = weights64() if introspect else None

    def closed(adv: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
        teacher_rows = kl_rows(softmax(t, tau), softmax(adv, tau))
        if introspect and weighted:
            teacher_rows = w * teacher_rows
        out = alpha * tau**2 * reduce_rows(teacher_rows, reduction, 4)
        if introspect:
            # The self target p_S(x) is not detached: its gradient flows into the clean logits.
            out = out + alpha * reduce_rows((1 - w) * kl_rows(softmax(clean), softmax(adv)), reduction, 4)
        return out + (1 - alpha) * ce_mean(clean, y)

    def ours(adv: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
        return iad1_loss(adv, t, clean, y, w, alpha, tau, reduction, weighted)[0]

    want, got = grads(closed, t64(S_ADV), t64(S_CLEAN)), grads(ours, t64(S_ADV), t64(S_CLEAN))
    for a, b in zip(got, want):
        assert_close(a, b)


def test_iad1_code_variant_pinned() -> None:
    """ZFancy/IAD IAD-I.py after `begin`: unweighted teacher term + (1/B)Σ(1 − α_i)KL(p_S(x) ‖ p_S(x'))."""
    y = torch.tensor(Y)
    loss, terms = iad1_loss(t64(S_ADV), t64(T_CLEAN), t64(S_CLEAN), y, weights64(), 1.0, 1.0, "batchmean", False)
    assert loss.item() == pytest.approx(0.22924172098778717, rel=1e-9)
    assert set(terms) == {"kl_teacher", "kl_self"}


def test_iad1_detached_self_target_option() -> None:
    y = torch.tensor(Y)
    clean = t64(S_CLEAN, grad=True)
    adv = t64(S_ADV, grad=True)
    loss, _ = iad1_loss(adv, t64(T_CLEAN), clean, y, weights64(), detach_self_target=True)
    loss.backward()
    assert clean.grad is None and adv.grad is not None


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(("a1", "a2", "tau"), [(0.5, 0.25, 1.0), (0.5, 0.25, 2.0), (1.0, 0.0, 1.0)])
@pytest.mark.parametrize("introspect", [True, False])
def test_iad2_loss_golden(reduction: str, a1: float, a2: float, tau: float, introspect: bool) -> None:
    y = torch.tensor(Y)
    t, st = t64(T_ADV), t64(ST_ADV)
    w = weights64() if introspect else None

    def closed(adv: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
        teacher_rows = kl_rows(softmax(t, tau), softmax(adv, tau))
        bracket = reduce_rows(teacher_rows * (w if introspect else 1.0), reduction, 4)
        if introspect:
            bracket = bracket + reduce_rows((1 - w) * kl_rows(softmax(clean), softmax(adv)), reduction, 4)
        out = (1 - a1 - a2) * ce_mean(adv, y) + a1 * tau**2 * bracket
        out = out + a2 * tau**2 * reduce_rows(kl_rows(softmax(st, tau), softmax(adv, tau)), reduction, 4)
        return out

    def ours(adv: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
        return iad2_loss(adv, t, st if a2 > 0 else None, clean, y, w, a1, a2, tau, reduction)[0]

    want, got = grads(closed, t64(S_ADV), t64(S_CLEAN)), grads(ours, t64(S_ADV), t64(S_CLEAN))
    for a, b in zip(got, want):
        assert_close(a, b)


def test_introspection_weights_vectorised_and_detached() -> None:
    logits = torch.randn(6, 5, requires_grad=True)
    y = torch.tensor([0, 4, 2, 2, 1, 3])
    w = introspection_weights(logits, y, 0.1)
    assert not w.requires_grad
    loop = torch.ones(6)
    for i in range(6):  # the reference code's per-example loop
        loop[i] = torch.softmax(logits, dim=1)[i][y[i].item()].pow(0.1).item()
    torch.testing.assert_close(w, loop)


# ---------------------------------------------------------------------------------------------------
# Tiny networks, hooks


class TinyNet(nn.Module):
    """conv → BatchNorm → ReLU → pool → linear on 1×6×6 inputs, 4 classes."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten()
        )
        self.head = nn.Linear(36, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class ConstantNet(nn.Module):
    """Logits that do not move with the input (zero weights): its input gradient is exactly zero."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.lin = nn.Linear(36, classes)
        nn.init.zeros_(self.lin.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x.flatten(1))


class Recorder:
    """Forward hook: every input a model sees, the grad mode and the model mode; input-gradient passes."""

    def __init__(self, model: nn.Module) -> None:
        self.calls: list[SimpleNamespace] = []
        self.backward = 0
        model.register_forward_hook(self._forward)

    def _forward(self, module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        self.calls.append(
            SimpleNamespace(x=args[0].detach().clone(), graph=out.requires_grad, training=module.training)
        )
        if out.requires_grad:
            out.register_hook(self._backward)

    def _backward(self, grad: torch.Tensor) -> None:
        self.backward += 1


def frozen(model: nn.Module) -> nn.Module:
    model.eval()
    model.requires_grad_(False)
    return model


def setup(student_cls: type[nn.Module] = TinyNet, b: int = 6):
    student = student_cls().train()
    teacher = frozen(TinyNet())
    x = torch.rand(b, 1, 6, 6)
    y = torch.randint(0, 4, (b,))
    return student, teacher, Batch(x, y)


def info(epoch: int = 0) -> StepInfo:
    return StepInfo(epoch=epoch, step=0, epochs=100, steps_per_epoch=1)


ATTACK = {"threat": {"eps": 0.1, "step_size": 0.04, "steps": 3}}


def in_ball(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> bool:
    return bool((x_adv - x).abs().max() <= eps + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1)


def check_passes(method, s_rec: Recorder, t_rec: Recorder, s_backward: int, t_backward: int, **kw) -> None:
    want = method.passes(**kw)
    assert want["student_fwd"] == len(s_rec.calls)
    assert want["teacher_fwd"] == len(t_rec.calls)
    assert want["student_input_grad"] == s_backward
    assert want.get("teacher_input_grad", 0) == t_backward
    assert want["student_bwd"] == 1


# ---------------------------------------------------------------------------------------------------
# Which input each network sees; pass counts


@pytest.mark.parametrize("alpha", [1.0, 0.5, 0.0])
def test_ard_inputs_and_passes(alpha: float) -> None:
    student, teacher, batch = setup()
    s_rec, t_rec = Recorder(student), Recorder(teacher)
    method = ARD(alpha=alpha, temperature=4.0, **ATTACK)
    out = method(student, teacher, batch, info())
    s_bwd, t_bwd = s_rec.backward, t_rec.backward
    check_passes(method, s_rec, t_rec, s_bwd, t_bwd)
    if alpha > 0:
        # The teacher sees the clean x only, once, without a graph.
        assert len(t_rec.calls) == 1 and torch.equal(t_rec.calls[0].x, batch.x) and not t_rec.calls[0].graph
        x_adv = s_rec.calls[3].x
        assert in_ball(x_adv, batch.x, 0.1) and not torch.equal(x_adv, batch.x)
        assert all(c.training for c in s_rec.calls)  # attack_mode="train", as ARD's code
    else:
        assert len(t_rec.calls) == 0 and len(s_rec.calls) == 1
    if alpha < 1:
        assert torch.equal(s_rec.calls[-1].x, batch.x) and out.logits is not None
    else:
        assert out.logits is None  # α = 1: no unused clean forward
    assert torch.isfinite(out.loss)
    out.loss.backward()


def test_rslad_one_teacher_forward_on_clean_x() -> None:
    student, teacher, batch = setup()
    s_rec, t_rec = Recorder(student), Recorder(teacher)
    method = RSLAD(**ATTACK)
    out = method(student, teacher, batch, info())
    check_passes(method, s_rec, t_rec, s_rec.backward, t_rec.backward)
    assert len(t_rec.calls) == 1
    assert torch.equal(t_rec.calls[0].x, batch.x) and not t_rec.calls[0].graph
    # Attack in eval mode, then S(x') and S(x) in train mode.
    assert [c.training for c in s_rec.calls] == [False] * 3 + [True, True]
    assert in_ball(s_rec.calls[3].x, batch.x, 0.1)
    assert torch.equal(s_rec.calls[4].x, batch.x)
    assert out.logits is not None and out.logits.shape == (6, 4)  # S(x), computed anyway
    out.loss.backward()


def test_rslad_attack_target_is_fixed_and_adaad_moves_both_sides() -> None:
    """With a student whose logits ignore x, RSLAD's attack (fixed p_T(x)) has no gradient and stays at the
    0.001·N start, while AdaAD's moves x' through the teacher at x'."""
    student, teacher, batch = setup(ConstantNet)
    s_rec = Recorder(student)
    RSLAD(**ATTACK)(student, teacher, batch, info())
    assert (s_rec.calls[3].x - batch.x).abs().max() < 0.01
    s_rec.calls.clear()
    AdaAD(**ATTACK)(student, teacher, batch, info())
    moved = (s_rec.calls[3].x - batch.x).abs().max()
    assert moved > 0.05 and in_ball(s_rec.calls[3].x, batch.x, 0.1)


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_adaad_inputs_and_passes(alpha: float) -> None:
    student, teacher, batch = setup()
    s_rec, t_rec = Recorder(student), Recorder(teacher)
    method = AdaAD(alpha=alpha, **ATTACK)
    out = method(student, teacher, batch, info())
    check_passes(method, s_rec, t_rec, s_rec.backward, t_rec.backward)
    # The attack forwards the teacher at the student's attack iterates, with a graph (both sides move),
    # and backpropagates through it once per step.
    for s_call, t_call in zip(s_rec.calls[:3], t_rec.calls[:3]):
        assert torch.equal(s_call.x, t_call.x) and t_call.graph and not t_call.training
    assert t_rec.backward == 3
    # Outer: T(x') without a graph on the final x', then the clean pair when α < 1.
    assert torch.equal(t_rec.calls[3].x, s_rec.calls[3].x) and not t_rec.calls[3].graph
    assert in_ball(s_rec.calls[3].x, batch.x, 0.1)
    if alpha < 1:
        assert torch.equal(t_rec.calls[4].x, batch.x) and torch.equal(s_rec.calls[4].x, batch.x)
        assert out.logits is not None
    else:
        assert out.logits is None
    out.loss.backward()


@pytest.mark.parametrize("epoch", [1, 2])
@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_iad1_inputs_and_passes(epoch: int, alpha: float) -> None:
    student, teacher, batch = setup()
    s_rec, t_rec = Recorder(student), Recorder(teacher)
    method = IAD(variant="I", alpha=alpha, begin=2, **ATTACK)
    out = method(student, teacher, batch, info(epoch))
    check_passes(method, s_rec, t_rec, s_rec.backward, t_rec.backward, epoch=epoch)
    x_adv = s_rec.calls[3].x
    assert in_ball(x_adv, batch.x, 0.1)
    # Target: the teacher on the clean x; weights (from `begin` on): the teacher on x'.
    assert torch.equal(t_rec.calls[0].x, batch.x)
    if epoch >= 2:
        assert len(t_rec.calls) == 2 and torch.equal(t_rec.calls[1].x, x_adv)
        assert "introspection_weight" in out.logs and "kl_self" in out.logs
    else:
        assert len(t_rec.calls) == 1 and "kl_self" not in out.logs
    assert not any(c.graph for c in t_rec.calls)
    out.loss.backward()


def test_iad1_alpha_zero_is_clean_ce_without_attack() -> None:
    student, teacher, batch = setup()
    s_rec, t_rec = Recorder(student), Recorder(teacher)
    method = IAD(alpha=0.0, begin=0, **ATTACK)
    out = method(student, teacher, batch, info(3))
    check_passes(method, s_rec, t_rec, s_rec.backward, t_rec.backward, epoch=3)
    assert set(out.logs) == {"ce"} and torch.equal(s_rec.calls[0].x, batch.x)


@pytest.mark.parametrize("epoch", [0, 5])
def test_iad2_inputs_and_passes(epoch: int) -> None:
    student, teacher, batch = setup()
    st_teacher = TinyNet().train()
    s_rec, t_rec, st_rec = Recorder(student), Recorder(teacher), Recorder(st_teacher)
    method = IAD(variant="II", begin=3, **ATTACK).attach_standard_teacher(st_teacher)
    assert not st_teacher.training and not any(p.requires_grad for p in st_teacher.parameters())
    out = method(student, teacher, batch, info(epoch))
    check_passes(method, s_rec, t_rec, s_rec.backward, t_rec.backward, epoch=epoch)
    assert method.passes(epoch=epoch)["st_teacher_fwd"] == len(st_rec.calls) == 1
    x_adv = s_rec.calls[3].x
    # Both teachers see x' only, once each (T(x') serves as target and as the weights' source).
    assert [torch.equal(c.x, x_adv) for c in t_rec.calls] == [True]
    assert [torch.equal(c.x, x_adv) for c in st_rec.calls] == [True]
    assert ("kl_self" in out.logs) == (epoch >= 3)
    assert (out.logits is not None) == (epoch >= 3)
    out.loss.backward()


def test_iad2_needs_standard_teacher() -> None:
    student, teacher, batch = setup()
    with pytest.raises(ConfigError, match="standard-trained"):
        IAD(variant="II", **ATTACK)(student, teacher, batch, info())
    out = IAD(variant="II", alpha2=0.0, **ATTACK)(student, teacher, batch, info())
    assert torch.isfinite(out.loss)
    with pytest.raises(ConfigError, match="no option"):
        build_method("iad", {"st_teacher": "path"})


def test_iad_weights_start_at_begin() -> None:
    """0-based epochs: begin=2 means epochs 0 and 1 run unweighted (α_i = 1), epoch 2 on weighted."""
    method = IAD(variant="I", begin=2, **ATTACK)
    assert method.begin_epoch == 2
    assert IAD().begin_epoch == 60 and IAD(variant="II").begin_epoch == 40
    results = {}
    for epoch in (1, 2):
        student, teacher, batch = setup()
        torch.manual_seed(1)
        results[epoch] = method(student, teacher, batch, info(epoch))
    assert "introspection_weight" not in results[1].logs
    w = results[2].logs["introspection_weight"]
    assert 0 < w <= 1
    assert method.passes(epoch=1)["teacher_fwd"] == 1 and method.passes(epoch=2)["teacher_fwd"] == 2


# ---------------------------------------------------------------------------------------------------
# Gradient and mode hygiene


BASELINES = {
    "ard": lambda: ARD(alpha=0.5, temperature=4.0, **ATTACK),
    "rslad": lambda: RSLAD(**ATTACK),
    "iad": lambda: IAD(variant="I", alpha=0.5, begin=0, **ATTACK),
    "adaad": lambda: AdaAD(alpha=0.5, **ATTACK),
}


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_no_parameter_grads_from_attack_and_frozen_teacher(name: str) -> None:
    student, teacher, batch = setup()
    method = BASELINES[name]()
    assert method.needs_teacher
    out = method(student, teacher, batch, info())
    # The attack took input gradients only: no parameter has a .grad before the caller's backward.
    assert all(p.grad is None for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.requires_grad for p in student.parameters())  # restored after the attack
    assert student.training and not any(m.training for m in teacher.modules())
    assert not any(p.requires_grad for p in teacher.parameters())
    assert torch.isfinite(out.loss) and out.loss.requires_grad
    out.loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in student.parameters())
    assert all(torch.isfinite(torch.as_tensor(v)).all() for v in out.logs.values())


def bn_updates(student: nn.Module) -> int:
    return int(student.body[1].num_batches_tracked)


@pytest.mark.parametrize("cls", [ARD, IAD])
def test_train_mode_attack_updates_batchnorm_and_eval_does_not(cls: type) -> None:
    for mode, expected in (("train", 3 + 1), ("eval", 1)):
        student, teacher, batch = setup()
        before = student.body[1].running_mean.clone()
        method = cls(attack_mode=mode, **ATTACK)  # α = 1, before IAD's `begin`: one outer forward, S(x')
        method(student, teacher, batch, info())
        assert bn_updates(student) == expected, mode
        assert not torch.equal(student.body[1].running_mean, before)


@pytest.mark.parametrize("cls", [RSLAD, AdaAD])
def test_eval_mode_attack_keeps_batchnorm(cls: type) -> None:
    student, teacher, batch = setup()
    method = cls(**ATTACK)
    method(student, teacher, batch, info())
    outer = 2 if cls is RSLAD else 1  # RSLAD: S(x') and S(x); AdaAD with α = 1: S(x')
    assert bn_updates(student) == outer
    student2, teacher2, batch2 = setup()
    cls(attack_mode="train", **ATTACK)(student2, teacher2, batch2, info())
    assert bn_updates(student2) == outer + 3


# ---------------------------------------------------------------------------------------------------
# Options, registry, configs


@pytest.mark.parametrize(
    ("name", "args", "match"),
    [
        ("ard", {"threat": {"step_size": 0.5, "eps": 0.1}}, "step_size"),
        ("ard", {"attack_mode": "keep"}, "attack_mode"),
        ("ard", {"kl_reduction": "none"}, "per-example"),
        ("ard", {"kl_reduction": "mean"}, "reduction"),
        ("ard", {"temperature": 0}, "temperature"),
        ("rslad", {"alpha": 1.5}, "alpha"),
        ("rslad", {"threat": {"random_start": "gauss"}}, "random_start"),
        ("iad", {"variant": "III"}, "variant"),
        ("iad", {"alpha1": 0.8, "alpha2": 0.5}, "alpha1"),
        ("iad", {"begin": -1}, "begin"),
        ("adaad", {"threat": {"steps": 0}}, "steps"),
        ("adaad", {"threat": {"eps": -0.1}}, "eps"),
        ("adaad", {"tau": 2.0}, "no option"),
    ],
)
def test_bad_options_refused(name: str, args: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        build_method(name, args)


def test_registered_defaults() -> None:
    ard = build_method("ard")
    assert (ard.alpha, ard.temperature, ard.kl_reduction, ard.attack_mode) == (1.0, 30.0, "batchmean", "train")
    assert ard.threat.random_start == "uniform" and ard.threat.steps == 10
    assert ard.threat.eps == pytest.approx(8 / 255) and ard.threat.alpha == pytest.approx(2 / 255)
    rslad = build_method("rslad")
    assert rslad.alpha == pytest.approx(5 / 6) and rslad.attack_mode == "eval"
    assert rslad.threat.random_start == "normal"
    iad = build_method("iad")
    assert (iad.variant, iad.alpha, iad.temperature, iad.beta, iad.attack_mode) == ("I", 1.0, 1.0, 0.1, "train")
    adaad = build_method("adaad")
    assert (adaad.alpha, adaad.attack_mode, adaad.threat.random_start) == (1.0, "eval", "normal")
    for method in (ard, rslad, iad, adaad):
        assert method.passes()["attack_steps"] == 10


CONFIGS = configs_of("ard", "rslad", "iad", "adaad")


def test_all_configs_present() -> None:
    assert len(CONFIGS) == 8


@pytest.mark.parametrize("path", CONFIGS)
def test_config_loads(path: str) -> None:
    from robustkd.attacks import ThreatModel, get_attack
    from robustkd.models import list_models

    cfg = validate(from_dict(yaml.safe_load((REPO / path).read_text())))
    assert cfg.method.name == Path(path).stem
    method = build_method(cfg.method.name, cfg.method.args)
    assert method.needs_teacher and cfg.teacher is None  # the teacher comes from the command line
    assert cfg.model.arch in list_models()
    get_attack(cfg.validate.attack)
    protocol = ThreatModel.parse(cfg.validate.protocol)
    assert method.threat.eps == pytest.approx(protocol.eps)
    if path.startswith("configs/fmnist"):
        assert cfg.model.arch == "dm_small" and cfg.validate.protocol == ThreatModel.preset("linf-0.1")
        assert (method.threat.alpha, method.threat.steps) == (0.01, 10)
    else:
        assert cfg.data.augment == "crop_flip" and cfg.validate.protocol == ThreatModel.preset("linf-8/255")
        assert (cfg.optim.name, cfg.optim.lr, cfg.optim.momentum, cfg.data.batch_size) == ("sgd", 0.1, 0.9, 128)
        assert cfg.optim.schedule == "multistep"
