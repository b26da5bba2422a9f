"""pgd_at, trades, kd, kdiga, advfunmatch: golden outer losses, gradients, pass counts, hygiene, configs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

import robustkd.methods.advfunmatch as advfunmatch_mod
from robustkd.errors import ConfigError
from robustkd.methods.advfunmatch import advfunmatch_loss
from robustkd.methods.base import METHODS, Batch, StepInfo, build_method
from robustkd.methods.kd import kd_loss
from robustkd.methods.kdiga import kdiga_grad_term, kdiga_loss, student_input_gradient, teacher_input_gradient
from robustkd.methods.pgd_at import pgd_at_loss
from robustkd.methods.trades import trades_loss

ROOT = Path(__file__).resolve().parents[1]
NAMES = ("pgd_at", "trades", "kd", "kdiga", "advfunmatch")
INFO = StepInfo(epoch=0, step=0, epochs=1, steps_per_epoch=1)
PASS_KEYS = {
    "student_fwd",
    "student_bwd",
    "student_input_grad",
    "student_double_bwd",
    "teacher_fwd",
    "teacher_input_grad",
    "attack_steps",
}
# Small attack budgets keep every step test well under a second.
FAST = {
    "pgd_at": {"eps": 0.1, "step_size": 0.05, "steps": 3},
    "trades": {"eps": 0.1, "step_size": 0.05, "steps": 3},
    "kd": {},
    "kdiga": {},
    "advfunmatch": {"eps": 0.1, "step_size": 0.05, "steps": 3},
}

# ---------------------------------------------------------------------------------------------------
# Closed forms, written out with exp/log sums (no F.kl_div, no log_softmax), in float64.

S_LOGITS = [[1.0, -0.5, 0.3, 2.0], [0.2, 0.1, -1.2, 0.4], [-2.0, 3.0, 0.5, 0.0]]
T_LOGITS = [[0.5, 0.0, 1.5, 1.0], [2.0, -1.0, 0.0, 0.3], [0.1, 2.5, 0.2, -0.7]]
LABELS = [3, 0, 1]


def _logits(values: list[list[float]]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def softmax_cf(z: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    e = torch.exp(z / tau)
    return e / e.sum(dim=1, keepdim=True)


def kl_cf(p: torch.Tensor, q: torch.Tensor, reduction: str) -> torch.Tensor:
    """Σ_c p_c (log p_c − log q_c), reduced: batchmean = /B, sum, mean_over_classes = /(B·C)."""
    total = (p * (torch.log(p) - torch.log(q))).sum()
    b, c = p.shape
    return {"batchmean": total / b, "sum": total, "mean_over_classes": total / (b * c)}[reduction]


def ce_cf(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    p = softmax_cf(z)
    return -torch.log(p[torch.arange(len(y)), y]).mean()


def grad_of(fn, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    return torch.autograd.grad(fn(*leaves), leaves)


# ---------------------------------------------------------------------------------------------------
# Golden outer losses.


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean_over_classes"])
@pytest.mark.parametrize(("alpha", "tau"), [(0.7, 3.0), (1.0, 4.0), (0.0, 2.0), (0.5, 1.0)])
def test_kd_loss_golden(reduction: str, alpha: float, tau: float) -> None:
    zs, zt, y = _logits(S_LOGITS), _logits(T_LOGITS), torch.tensor(LABELS)

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
    zs, zt, y = _logits(S_LOGITS), _logits(T_LOGITS), torch.tensor(LABELS)
    tau = 5.0
    kl = kl_cf(softmax_cf(zt, tau), softmax_cf(zs, tau), "batchmean")
    for alpha in (0.1, 0.5, 0.9, 1.0):
        loss, terms = kd_loss(zs, zt, y, alpha, tau)
        torch.testing.assert_close(loss - (1 - alpha) * terms["ce"], alpha * tau**2 * kl)


def test_kd_loss_teacher_gets_no_gradient() -> None:
    zs, zt, y = _logits(S_LOGITS), _logits(T_LOGITS).requires_grad_(True), torch.tensor(LABELS)
    kd_loss(zs.requires_grad_(True), zt, y, 0.5, 2.0)[0].backward()
    assert zt.grad is None


@pytest.mark.parametrize("beta", [6.0, 1.0, 0.0])
def test_trades_loss_golden_both_sides_carry_gradient(beta: float) -> None:
    zc, za, y = _logits(S_LOGITS), _logits(T_LOGITS), torch.tensor(LABELS)

    def closed(zc_: torch.Tensor, za_: torch.Tensor) -> torch.Tensor:
        return ce_cf(zc_, y) + beta * kl_cf(softmax_cf(zc_), softmax_cf(za_), "batchmean")

    loss, terms = trades_loss(zc, za, y, beta)
    torch.testing.assert_close(loss, closed(zc, za), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(terms["ce"], ce_cf(zc, y))
    g_code = grad_of(lambda a, b: trades_loss(a, b, y, beta)[0], zc, za)
    g_cf = grad_of(closed, zc, za)
    for got, want in zip(g_code, g_cf):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    if beta:
        # Not detached: the clean logits' gradient differs from the CE gradient alone.
        (g_ce,) = grad_of(lambda a: ce_cf(a, y), zc)
        assert (g_code[0] - g_ce).abs().max() > 1e-3


def test_pgd_at_loss_golden() -> None:
    za, y = _logits(S_LOGITS), torch.tensor(LABELS)
    torch.testing.assert_close(pgd_at_loss(za, y), ce_cf(za, y))
    torch.testing.assert_close(grad_of(lambda z: pgd_at_loss(z, y), za)[0], grad_of(lambda z: ce_cf(z, y), za)[0])


@pytest.mark.parametrize("tau", [1.0, 3.0])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean_over_classes"])
def test_advfunmatch_loss_golden(tau: float, reduction: str) -> None:
    zs, zt, y = _logits(S_LOGITS), _logits(T_LOGITS), torch.tensor(LABELS)

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
    zs, zt, y = _logits(S_LOGITS), _logits(T_LOGITS), torch.tensor(LABELS)
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


# ---------------------------------------------------------------------------------------------------
# Tiny networks for whole steps.


class TinyConvBN(nn.Module):
    """Conv-BN-ReLU-Linear on 1×8×8: BatchNorm makes the model mode matter."""

    def __init__(self, classes: int = 4, width: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, width, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(width, momentum=None)  # cumulative average: counts train forwards
        self.fc = nn.Linear(width * 16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.bn(self.conv(x))).flatten(1))


class TinyMLP(nn.Module):
    """A teacher of another architecture."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _pair() -> tuple[nn.Module, nn.Module, Batch]:
    torch.manual_seed(0)
    student = TinyConvBN().train()
    teacher = TinyMLP().eval().requires_grad_(False)
    x = torch.rand(8, 1, 8, 8)
    y = torch.randint(0, 4, (8,))
    return student, teacher, Batch(x, y)


class Counter:
    """Counts forwards of a module (and keeps their inputs, for identity checks)."""

    def __init__(self, module: nn.Module) -> None:
        self.inputs: list[torch.Tensor] = []
        self.handle = module.register_forward_pre_hook(lambda _m, args: self.inputs.append(args[0]))

    @property
    def calls(self) -> int:
        return len(self.inputs)


@pytest.mark.parametrize("name", NAMES)
def test_one_step_runs_and_keeps_hygiene(name: str) -> None:
    student, teacher, batch = _pair()
    method = build_method(name, FAST[name])
    assert METHODS.get(name) is type(method)
    s_count, t_count = Counter(student), Counter(teacher)
    bn_before = int(student.bn.num_batches_tracked)

    out = method(student, teacher if method.needs_teacher else None, batch, INFO)

    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    # Attacks and input gradients never write a parameter's .grad; only the final backward does.
    assert all(p.grad is None for p in student.parameters())
    assert student.training and not teacher.training
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in student.parameters())
    assert any(p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    assert not teacher.training

    passes = method.passes()
    assert passes and set(passes) <= PASS_KEYS and all(isinstance(v, int) and v >= 0 for v in passes.values())
    # The declared counts are the real ones.
    assert s_count.calls == passes["student_fwd"]
    assert t_count.calls == passes.get("teacher_fwd", 0)
    # Train-mode student forwards (BatchNorm statistics updates): the outer forwards only, attacks in eval.
    train_forwards = {"pgd_at": 1, "trades": 2, "kd": 1, "kdiga": 1, "advfunmatch": 1}[name]
    assert int(student.bn.num_batches_tracked) - bn_before == train_forwards
    for key, value in out.logs.items():
        assert math.isfinite(float(value)), key
    if out.logits is not None:
        assert out.logits.shape == (8, 4)


@pytest.mark.parametrize("name", ["kd", "kdiga", "advfunmatch"])
def test_an_unfrozen_teacher_still_gets_no_gradient(name: str) -> None:
    student, teacher, batch = _pair()
    teacher.requires_grad_(True)
    build_method(name, FAST[name])(student, teacher, batch, INFO).loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.requires_grad for p in teacher.parameters())  # the flags are restored


@pytest.mark.parametrize("name", ["kd", "kdiga", "advfunmatch"])
def test_distillation_methods_refuse_a_missing_teacher(name: str) -> None:
    student, _, batch = _pair()
    method = build_method(name, FAST[name])
    assert method.needs_teacher
    with pytest.raises(ConfigError, match="teacher"):
        method(student, None, batch, INFO)


@pytest.mark.parametrize("name", ["kd", "kdiga", "advfunmatch"])
def test_distillation_methods_refuse_a_teacher_in_train_mode(name: str) -> None:
    student, teacher, batch = _pair()
    teacher.net[1].train()  # one submodule left in train mode is enough to be refused
    with pytest.raises(ConfigError, match="eval mode"):
        build_method(name, FAST[name])(student, teacher, batch, INFO)


def test_pgd_at_train_mode_attack_updates_batchnorm_each_step() -> None:
    student, _, batch = _pair()
    method = build_method("pgd_at", {**FAST["pgd_at"], "attack_mode": "train"})
    before = int(student.bn.num_batches_tracked)
    method(student, None, batch, INFO)
    assert int(student.bn.num_batches_tracked) - before == method.threat.steps + 1
    assert student.training


def test_pgd_at_raises_the_loss_over_clean_training() -> None:
    student, _, batch = _pair()
    student.eval()  # no BatchNorm drift between the two forwards being compared
    out = build_method("pgd_at", {"eps": 0.2, "step_size": 0.05, "steps": 10})(student, None, batch, INFO)
    assert out.logits is None
    assert out.loss.item() > F.cross_entropy(student(batch.x), batch.y).item()


def test_kdiga_uses_one_student_forward_for_kd_and_gradient() -> None:
    student, teacher, batch = _pair()
    count = Counter(student)
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
    student, teacher, batch = _pair()
    s_count, t_count = Counter(student), Counter(teacher)
    method = build_method("advfunmatch", FAST["advfunmatch"])
    method(student, teacher, batch, INFO)
    # Every attack step and the final matching step: the same input, the very same storage.
    assert s_count.calls == t_count.calls == method.threat.steps + 1
    for xs, xt in zip(s_count.inputs, t_count.inputs):
        assert torch.equal(xs, xt) and xs.data_ptr() == xt.data_ptr()
    final = s_count.inputs[-1]
    assert (final - batch.x).abs().max() <= method.eps + 1e-6
    assert not torch.equal(final, batch.x)


def test_advfunmatch_inner_maximisation_increases_the_mismatch() -> None:
    from robustkd.attacks import make_objective, perturb

    student, teacher, batch = _pair()
    student.eval()
    method = build_method("advfunmatch", {"eps": 0.1, "step_size": 0.02, "steps": 10})

    def mismatch(x: torch.Tensor) -> float:
        with torch.no_grad():
            return kl_cf(softmax_cf(teacher(x).double()), softmax_cf(student(x).double()), "sum").item()

    x_adv = perturb(
        student, batch.x, batch.y, method.threat, method.objective, teacher=teacher, early_stop=False, track_best=False
    ).x_adv
    assert mismatch(x_adv) > mismatch(batch.x) * 1.05
    assert method.objective == make_objective("mismatch")


def test_advfunmatch_mixup_is_drawn_once_and_shared(monkeypatch: pytest.MonkeyPatch) -> None:
    student, teacher, batch = _pair()
    draws: list[torch.Tensor] = []
    original = advfunmatch_mod.mixup

    def counting(x: torch.Tensor, alpha: float):
        out = original(x, alpha)
        draws.append(out[0])
        return out

    monkeypatch.setattr(advfunmatch_mod, "mixup", counting)
    s_count, t_count = Counter(student), Counter(teacher)
    method = build_method("advfunmatch", {**FAST["advfunmatch"], "mixup_alpha": 1.0, "ce_weight": 0.1})
    out = method(student, teacher, batch, INFO)
    assert len(draws) == 1
    mixed = draws[0]
    assert not torch.equal(mixed, batch.x)
    xs, xt = s_count.inputs[-1], t_count.inputs[-1]
    assert torch.equal(xs, xt) and xs.data_ptr() == xt.data_ptr()
    # The ball is around the mixed input, not around the raw batch.
    assert (xs - mixed).abs().max() <= method.eps + 1e-6
    assert 0.0 <= out.logs["mixup_lambda"] <= 1.0
    assert "ce" in out.logs


def test_mixup_is_a_convex_combination_of_the_batch() -> None:
    torch.manual_seed(2)
    x = torch.rand(6, 1, 4, 4)
    mixed, perm, lam = advfunmatch_mod.mixup(x, 0.4)
    torch.testing.assert_close(mixed, lam * x + (1 - lam) * x[perm])
    assert sorted(perm.tolist()) == list(range(6))
    assert mixed.min() >= 0 and mixed.max() <= 1


# ---------------------------------------------------------------------------------------------------
# Options and configs.


@pytest.mark.parametrize(
    ("name", "args"),
    [
        ("pgd_at", {"eps": -0.1}),
        ("pgd_at", {"step_size": 0.5, "eps": 0.1}),
        ("pgd_at", {"attack_mode": "keep"}),
        ("trades", {"beta": -1.0}),
        ("trades", {"random_start": "gaussian"}),
        ("kd", {"alpha": 1.5}),
        ("kd", {"temperature": 0.0}),
        ("kd", {"kl_reduction": "none"}),
        ("kd", {"kl_reduction": "mean"}),
        ("kdiga", {"grad_norm": "l1"}),
        ("kdiga", {"gamma": -1.0}),
        ("advfunmatch", {"mixup_alpha": -1.0}),
        ("advfunmatch", {"norm": "l3"}),
        ("advfunmatch", {"steps": 0}),
        ("advfunmatch", {"tau": 2.0}),
    ],
)
def test_bad_options_are_refused(name: str, args: dict) -> None:
    with pytest.raises(ConfigError):
        build_method(name, args)


@pytest.mark.parametrize("name", NAMES)
def test_defaults_build_and_declare_passes(name: str) -> None:
    method = build_method(name)
    passes = method.passes()
    assert passes["student_bwd"] == 1 and passes["student_fwd"] >= 1
    if hasattr(method, "threat"):
        assert passes["attack_steps"] == method.threat.steps
        assert method.attack_mode == "eval"


CONFIGS = [
    "configs/fmnist/teacher_pgd_at.yaml",
    "configs/fmnist/teacher_trades.yaml",
    "configs/fmnist/kd.yaml",
    "configs/fmnist/kdiga.yaml",
    "configs/fmnist/advfunmatch.yaml",
    "configs/cifar10/teacher_pgd_at.yaml",
    "configs/cifar10/kd.yaml",
    "configs/cifar10/kdiga.yaml",
    "configs/cifar10/advfunmatch.yaml",
    "configs/mnist/teacher_pgd_at.yaml",
]


@pytest.mark.parametrize("path", CONFIGS)
def test_config_loads_and_names_a_valid_method(path: str) -> None:
    from robustkd.attacks import ThreatModel, get_attack
    from robustkd.config import from_dict, validate
    from robustkd.data.augment import AUGMENTS
    from robustkd.models import list_models

    text = (ROOT / path).read_text()
    assert text.startswith("#"), "the first line says what the config reproduces"
    cfg = validate(from_dict(yaml.safe_load(text)))
    method = build_method(cfg.method.name, cfg.method.args)
    assert cfg.method.name in NAMES
    assert cfg.model.arch in list_models()
    if cfg.data.augment is not None:
        assert cfg.data.augment in AUGMENTS
    assert cfg.validate.attack is not None
    get_attack(cfg.validate.attack)
    protocol = ThreatModel.parse(cfg.validate.protocol)
    if hasattr(method, "threat"):
        # Training attacks use the evaluation protocol's ball.
        assert method.threat.eps == pytest.approx(protocol.eps)
    assert method.needs_teacher == ("teacher" not in Path(path).stem)
