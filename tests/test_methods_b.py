"""Robust distillation baselines: ARD, RSLAD, IAD, AdaAD.

Golden values come from closed forms written here with explicit exp/log sums (float64), never from the
library's KL helpers. Network-level tests use tiny models and count passes with forward hooks.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from torch import nn

import robustkd.methods.adaad
import robustkd.methods.ard
import robustkd.methods.iad
import robustkd.methods.rslad  # noqa: F401  (registers)
from robustkd.config import from_dict, validate
from robustkd.errors import ConfigError
from robustkd.methods.adaad import AdaAD, adaad_loss
from robustkd.methods.ard import ARD, ard_loss
from robustkd.methods.base import Batch, StepInfo, build_method
from robustkd.methods.iad import IAD, iad1_loss, iad2_loss, introspection_weights
from robustkd.methods.rslad import RSLAD, rslad_loss

ROOT = Path(__file__).resolve().parents[1]
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


ATTACK = {"eps": 0.1, "step_size": 0.04, "steps": 3}


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


METHODS = {
    "ard": lambda: ARD(alpha=0.5, temperature=4.0, **ATTACK),
    "rslad": lambda: RSLAD(**ATTACK),
    "iad": lambda: IAD(variant="I", alpha=0.5, begin=0, **ATTACK),
    "adaad": lambda: AdaAD(alpha=0.5, **ATTACK),
}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_no_parameter_grads_from_attack_and_frozen_teacher(name: str) -> None:
    student, teacher, batch = setup()
    method = METHODS[name]()
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
        ("ard", {"step_size": 0.5, "eps": 0.1}, "step_size"),
        ("ard", {"attack_mode": "keep"}, "attack_mode"),
        ("ard", {"kl_reduction": "none"}, "per-example"),
        ("ard", {"kl_reduction": "mean"}, "reduction"),
        ("ard", {"temperature": 0}, "temperature"),
        ("rslad", {"alpha": 1.5}, "alpha"),
        ("rslad", {"random_start": "gauss"}, "random_start"),
        ("iad", {"variant": "III"}, "variant"),
        ("iad", {"alpha1": 0.8, "alpha2": 0.5}, "alpha1"),
        ("iad", {"begin": -1}, "begin"),
        ("adaad", {"steps": 0}, "steps"),
        ("adaad", {"eps": -0.1}, "eps"),
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


CONFIGS = sorted(
    str(p.relative_to(ROOT))
    for ds in ("fmnist", "cifar10")
    for p in (ROOT / "configs" / ds).glob("*.yaml")
    if p.stem in ("ard", "rslad", "iad", "adaad")
)


def test_all_configs_present() -> None:
    assert len(CONFIGS) == 8


@pytest.mark.parametrize("path", CONFIGS)
def test_config_loads(path: str) -> None:
    from robustkd.attacks import ThreatModel, get_attack
    from robustkd.models import list_models

    cfg = validate(from_dict(yaml.safe_load((ROOT / path).read_text())))
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
