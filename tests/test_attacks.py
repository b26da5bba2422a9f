"""robustkd.attacks: threat models, objectives against closed forms, the PGD engine's guarantees."""

from __future__ import annotations

import dataclasses
import math
import sys
from types import MappingProxyType

import numpy as np
import pytest
import torch
from conftest import HostSync
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

from robustkd.attacks import (
    ATTACKS,
    OBJECTIVES,
    PRESETS,
    AttackResult,
    ConfidenceGap,
    CWMargin,
    Objective,
    ThreatModel,
    attack_mode,
    autoattack,
    get_attack,
    make_objective,
    perturb,
    pgd,
)
from robustkd.attacks.search import search
from robustkd.errors import ConfigError, RegistryError, RobustKDError

# ---------------------------------------------------------------------------------------------------
# Small models and helpers


def assert_close(a: torch.Tensor, b: torch.Tensor, atol: float) -> None:
    # torch.testing.assert_close would import torch.distributed.tensor on first use (about a second).
    assert a.shape == b.shape and bool((a - b).abs().max() <= atol), f"max |a - b| = {(a - b).abs().max()}"


class Binary(nn.Module):
    """Logits [0, w.x + b]: class 1 when w.x + b > 0. Its PGD optima are known in closed form."""

    def __init__(self, w: torch.Tensor, b: float = 0.0) -> None:
        super().__init__()
        self.lin = nn.Linear(w.numel(), 1)
        with torch.no_grad():
            self.lin.weight.copy_(w.view(1, -1))
            self.lin.bias.fill_(b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.lin(x.flatten(1))
        return torch.cat([torch.zeros_like(z), z], dim=1)


class Counter(nn.Module):
    """Counts forwards (examples and calls) and backwards through a wrapped module."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.forwards = 0
        self.backwards = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.forwards += 1
        out = self.net(x)
        if out.requires_grad:
            out.register_hook(self._count)
        return out

    def _count(self, grad: torch.Tensor) -> None:
        self.backwards += 1


def mlp(d: int = 12, k: int = 4, hidden: int = 16, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, k))


def bn_net(d: int = 12, k: int = 4) -> nn.Sequential:
    torch.manual_seed(1)
    return nn.Sequential(nn.Flatten(), nn.Linear(d, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, k))


# ---------------------------------------------------------------------------------------------------
# ThreatModel


def test_threat_defaults_and_step_rule():
    t = ThreatModel()
    assert (t.norm, t.eps, t.steps, t.restarts, t.random_start) == ("linf", 0.1, 10, 1, "uniform")
    assert t.alpha == pytest.approx(2.5 * 0.1 / 10)
    assert ThreatModel(step_size=0.01).alpha == 0.01
    assert ThreatModel(norm="Linf").norm == "linf" and ThreatModel(norm="L2", eps=2.0).norm == "l2"
    assert t.replace(steps=20).alpha == pytest.approx(2.5 * 0.1 / 20)
    assert ThreatModel(eps=0).alpha == 0 and ThreatModel(eps=0, step_size=0.5).eps == 0


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"eps": -0.1}, "eps"),
        ({"eps": float("nan")}, "eps"),
        ({"eps": float("inf")}, "eps"),
        ({"eps": 1.5}, "eps"),
        ({"eps": "0.1"}, "eps"),
        ({"eps": True}, "eps"),
        ({"steps": 0}, "steps"),
        ({"steps": 2.5}, "steps"),
        ({"restarts": 0}, "restarts"),
        ({"steps": 100_000_000_000}, "steps"),  # would run for ever
        ({"steps": 10_001}, "steps"),
        ({"restarts": 1_001}, "restarts"),
        ({"step_size": 0.0}, "step_size"),
        ({"step_size": -1.0}, "step_size"),
        ({"step_size": 0.2, "eps": 0.1}, "step_size"),
        ({"step_size": float("nan")}, "step_size"),
        ({"norm": "l1"}, "norm"),
        ({"norm": None}, "norm"),
        ({"random_start": "gaussian"}, "random_start"),
    ],
)
def test_threat_rejects(kwargs, field):
    with pytest.raises(ConfigError, match=rf"^{field}:"):
        ThreatModel(**kwargs)


def test_threat_l2_allows_large_radius_and_big_steps():
    t = ThreatModel(norm="l2", eps=2.0, step_size=3.0)
    assert t.eps == 2.0 and t.alpha == 3.0


def test_threat_replace_validates_and_names_unknown_fields():
    with pytest.raises(ConfigError, match="steps"):
        ThreatModel().replace(steps=0)
    with pytest.raises(ConfigError, match="stepz"):
        ThreatModel().replace(stepz=3)


@given(
    norm=st.one_of(st.sampled_from(["linf", "l2", "LINF", "l1", ""]), st.text(max_size=4), st.none(), st.integers()),
    eps=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(), st.text(max_size=3), st.none()),
    step_size=st.one_of(st.none(), st.floats(), st.integers(-3, 3), st.booleans()),
    steps=st.one_of(st.integers(-5, 50), st.floats(), st.none(), st.integers(min_value=10**30)),
    restarts=st.one_of(st.integers(-2, 5), st.text(max_size=2)),
    random_start=st.one_of(st.sampled_from(["uniform", "normal", "none", "other"]), st.integers()),
)
@settings(max_examples=300, deadline=None)
def test_threat_fuzz_only_config_errors(norm, eps, step_size, steps, restarts, random_start):
    try:
        t = ThreatModel(norm, eps, step_size, steps, restarts, random_start)
    except ConfigError:
        return
    assert t.norm in ("linf", "l2") and t.eps >= 0 and math.isfinite(t.eps)
    assert 1 <= t.steps <= 10_000 and 1 <= t.restarts <= 1_000 and t.alpha >= 0


@pytest.mark.parametrize("name", PRESETS.names())
def test_presets(name):
    t = ThreatModel.preset(name)
    assert t == PRESETS.get(name)
    assert ThreatModel.preset(name, steps=3).steps == 3


def test_preset_values_and_parsing():
    assert ThreatModel.preset("linf-0.1").eps == 0.1
    assert ThreatModel.preset("linf-0.3").eps == 0.3
    assert ThreatModel.preset("linf-8/255").eps == pytest.approx(8 / 255)
    assert ThreatModel.preset("l2-0.5").norm == "l2"
    assert ThreatModel.preset("linf-4/255").eps == pytest.approx(4 / 255)
    assert ThreatModel.preset("l2-1.5").eps == 1.5
    with pytest.raises(RegistryError, match=r"linf-0\.1"):
        ThreatModel.preset("linf-0.l")
    with pytest.raises(ConfigError, match="eps"):
        ThreatModel.preset("linf-2")


def test_threat_parse_every_accepted_form():
    t = ThreatModel(eps=0.2, steps=3)
    assert ThreatModel.parse(t) is t
    assert ThreatModel.parse("linf-8/255") == PRESETS.get("linf-8/255")
    assert ThreatModel.parse("linf-4/255") == ThreatModel(eps=4 / 255)
    assert ThreatModel.parse("L2-1.5") == ThreatModel("l2", 1.5)
    assert ThreatModel.parse("linf-0.1", default=t) == PRESETS.get("linf-0.1")  # a default fills mappings only
    assert ThreatModel.parse({"eps": 0.05}) == ThreatModel(eps=0.05)
    assert ThreatModel.parse({"eps": 0.05}, default=t) == ThreatModel(eps=0.05, steps=3)
    assert ThreatModel.parse({}, default=t) == t
    assert ThreatModel.parse(MappingProxyType({"norm": "L2", "eps": 2.0})) == ThreatModel("l2", 2.0)


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ("linf-0.l", r"^method\.attack: .*'linf-0\.1'"),  # close matches are listed
        ("fgsm", r"^method\.attack: .*linf-<eps>"),
        ("linf-2", r"^method\.attack: eps: "),
        ("linf-1/0", r"^method\.attack: .*division by zero"),
        ({"eps": 0.1, "stepz": 3}, r"^method\.attack: unknown field 'stepz' \(fields: norm, eps, "),
        ({"eps": 0.1, 3: 1}, r"^method\.attack: unknown field 3 "),
        ({"steps": 0}, r"^method\.attack: steps: "),
        ({"eps": "0.1"}, r"^method\.attack: eps: "),
        ({"norm": "l1"}, r"^method\.attack: norm: "),
        (None, r"^method\.attack: expected a protocol name .* got NoneType"),
        (0.1, r"^method\.attack: expected a protocol name .* got float"),
        (["linf", 0.1], r"^method\.attack: expected a protocol name .* got list"),
    ],
)
def test_threat_parse_failures_name_the_field(value, match):
    with pytest.raises(ConfigError, match=match):
        ThreatModel.parse(value, field="method.attack")


def test_threat_budget_bounds_are_inclusive_and_named():
    assert ThreatModel(steps=10_000, restarts=1_000).steps == 10_000
    with pytest.raises(ConfigError, match=r"^method\.args\.threat: steps: must be <= 10000"):
        ThreatModel.parse({"steps": 100_000_000_000}, field="method.args.threat")


def test_threat_parse_default_field_name():
    with pytest.raises(ConfigError, match=r"^threat: "):
        ThreatModel.parse(None)
    with pytest.raises(ConfigError, match=r"^threat: steps: "):
        ThreatModel.parse({"steps": -1})


@pytest.mark.parametrize("name", PRESETS.names())
def test_preset_name_is_its_key_and_parses_back(name):
    t = PRESETS.get(name)
    assert t.name == name
    assert ThreatModel.parse(t.name).eps == t.eps and ThreatModel.parse(t.name).norm == t.norm


@pytest.mark.parametrize(
    ("threat", "name"),
    [
        (ThreatModel(eps=0.1, steps=3), "linf-0.1"),
        (ThreatModel(eps=0.2), "linf-0.2"),  # 51/255 too, but the short decimal reads better
        (ThreatModel(eps=4 / 255), "linf-4/255"),
        (ThreatModel(eps=16 / 255, step_size=None), "linf-16/255"),
        (ThreatModel(eps=0.5 / 255), "linf-0.00196078431372549"),  # no exact k/255: every digit
        (ThreatModel(eps=1e-5), "linf-0.00001"),  # the name pattern has no exponent
        (ThreatModel(eps=1.0), "linf-1"),
        (ThreatModel(eps=0.0), "linf-0"),
        (ThreatModel(eps=-0.0), "linf-0"),
        (ThreatModel("l2", 2.0), "l2-2"),
        (ThreatModel("L2", 0.5, steps=7), "l2-0.5"),
    ],
)
def test_threat_name(threat, name):
    assert threat.name == name
    back = ThreatModel.parse(name)
    assert back.eps == threat.eps and back.norm == threat.norm


def test_threat_to_dict_is_the_fields_and_alpha():
    t = ThreatModel.preset("linf-8/255")
    assert t.to_dict() == {
        "norm": "linf",
        "eps": 8 / 255,
        "step_size": 2 / 255,
        "steps": 10,
        "restarts": 1,
        "random_start": "uniform",
        "alpha": 2 / 255,
    }


# ---------------------------------------------------------------------------------------------------
# Objectives against closed forms computed here, in float64 numpy


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(3)
    zs = torch.randn(6, 5, generator=g) * 3
    zt = torch.randn(6, 5, generator=g) * 3
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    return zs, zt, y


def test_ce_objective(logits):
    zs, _, y = logits
    obj = make_objective("ce")
    p = _softmax(zs.double().numpy())
    expected = [-math.log(p[i, y[i]]) for i in range(6)]
    np.testing.assert_allclose(obj.value(zs, y).numpy(), expected, rtol=1e-5)
    assert obj.success(zs, y).tolist() == [int(np.argmax(p[i])) != int(y[i]) for i in range(6)]


@pytest.mark.parametrize("kappa", [50.0, 0.5])
def test_cw_objective(logits, kappa):
    zs, _, y = logits
    obj = CWMargin(kappa=kappa)
    z = zs.double().numpy()
    margins = [max(z[i, j] for j in range(5) if j != y[i]) - z[i, y[i]] for i in range(6)]
    np.testing.assert_allclose(obj.value(zs, y).numpy(), np.minimum(margins, kappa), rtol=1e-5)
    assert obj.success(zs, y).tolist() == [m > 0 for m in margins]
    assert make_objective("cw").kappa == 50.0


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_kl_objective(logits, temperature):
    zs, zt, y = logits
    ref = torch.softmax(zt, dim=1)
    ref[0] = torch.tensor([1.0, 0, 0, 0, 0])  # zeros in the reference: 0 log 0 = 0
    p = ref.double().numpy()
    q = _softmax(zs.double().numpy() / temperature)
    with np.errstate(divide="ignore", invalid="ignore"):
        expected = np.where(p > 0, p * (np.log(p) - np.log(q)), 0.0).sum(1)
    obj = make_objective("kl", temperature=temperature)
    np.testing.assert_allclose(obj.value(zs, y, reference=ref).numpy(), expected, rtol=1e-4, atol=1e-6)
    assert obj.success(zs, y, reference=ref) is None
    with pytest.raises(ConfigError, match="reference"):
        obj.value(zs, y)


def test_mismatch_objective(logits):
    zs, zt, y = logits
    p, q = _softmax(zt.double().numpy() / 2), _softmax(zs.double().numpy() / 2)
    expected = (p * (np.log(p) - np.log(q))).sum(1)
    obj = make_objective("mismatch", temperature=2.0)
    np.testing.assert_allclose(obj.value(zs, y, teacher_logits=zt).numpy(), expected, rtol=1e-4)
    assert obj.needs_teacher and obj.success(zs, y, teacher_logits=zt) is None


def test_disagreement_objective(logits):
    zs, zt, y = logits
    s, t = zs.double().numpy(), zt.double().numpy()
    expected = [max((s[i, j] - s[i, y[i]]) - (t[i, j] - t[i, y[i]]) for j in range(5) if j != y[i]) for i in range(6)]
    obj = make_objective("disagreement")
    np.testing.assert_allclose(obj.value(zs, y, teacher_logits=zt).numpy(), expected, rtol=1e-5)
    flips = [int(np.argmax(s[i])) != int(np.argmax(t[i])) for i in range(6)]
    assert obj.success(zs, y, teacher_logits=zt).tolist() == flips


def test_confidence_gap_objectives(logits):
    zs, zt, y = logits
    fs, ft = _softmax(zs.double().numpy()), _softmax(zt.double().numpy())
    under = [ft[i, y[i]] - fs[i, y[i]] for i in range(6)]
    np.testing.assert_allclose(make_objective("confidence_gap").value(zs, y, teacher_logits=zt), under, atol=1e-6)
    over = make_objective("confidence_gap_over").value(zs, y, teacher_logits=zt).numpy()
    np.testing.assert_allclose(over, -np.array(under), atol=1e-6)
    assert make_objective("confidence_gap", direction="over") == ConfidenceGap(direction="over")
    log_obj = make_objective("confidence_gap", log_space=True)
    logs = [math.log(ft[i, y[i]]) - math.log(fs[i, y[i]]) for i in range(6)]
    np.testing.assert_allclose(log_obj.value(zs, y, teacher_logits=zt).numpy(), logs, rtol=1e-4)
    np.testing.assert_allclose(log_obj.score(zs, y, teacher_logits=zt).numpy(), under, atol=1e-6)
    assert log_obj.success(zs, y, teacher_logits=zt) is None
    with pytest.raises(ConfigError, match="direction"):
        ConfidenceGap(direction="sideways")


def test_objective_registry():
    assert set(OBJECTIVES.names()) >= {
        "ce",
        "cw",
        "kl",
        "mismatch",
        "disagreement",
        "confidence_gap",
        "confidence_gap_over",
    }
    with pytest.raises(RegistryError, match="'ce'"):
        make_objective("cee")
    with pytest.raises(ConfigError, match="temperature"):
        make_objective("kl", temperature=0)
    with pytest.raises(ConfigError, match="objective 'ce'"):
        make_objective("ce", kappa=3)


def test_mismatch_gradient_flows_through_both_networks():
    student, teacher = mlp(seed=1), mlp(seed=2)
    x = torch.rand(5, 12, requires_grad=True)
    y = torch.zeros(5, dtype=torch.long)
    obj = make_objective("mismatch")

    def grad(s_detach: bool, t_detach: bool) -> torch.Tensor:
        zs, zt = student(x), teacher(x)
        zs = zs.detach() if s_detach else zs
        zt = zt.detach() if t_detach else zt
        return torch.autograd.grad(obj.value(zs, y, teacher_logits=zt).sum(), x)[0]

    both, via_student, via_teacher = grad(False, False), grad(False, True), grad(True, False)
    assert via_student.abs().sum() > 0 and via_teacher.abs().sum() > 0
    assert_close(both, via_student + via_teacher, atol=1e-6)

    # In the engine: a student blind to its input still gets moved, through the teacher alone.
    blind = mlp(seed=1)
    nn.init.zeros_(blind[1].weight)
    xs = torch.rand(4, 12) * 0.5 + 0.25
    res = perturb(blind, xs, y[:4], ThreatModel(eps=0.1, random_start="none"), "mismatch", teacher=teacher)
    assert (res.x_adv - xs).abs().max() > 0.05
    res = perturb(teacher, xs, y[:4], ThreatModel(eps=0.1, random_start="none"), "mismatch", teacher=blind)
    assert (res.x_adv - xs).abs().max() > 0.05


# ---------------------------------------------------------------------------------------------------
# The engine: closed-form optima of a linear binary classifier


def _binary_case(seed: int = 0, d: int = 20, n: int = 16):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d, generator=g)
    w[w.abs() < 0.05] = 0.5  # sign(0) is 0: keep every coordinate informative
    x = torch.rand(n, d, generator=g)
    y = torch.randint(0, 2, (n,), generator=g)
    return Binary(w), w, x, y


@pytest.mark.parametrize("random_start", ["uniform", "normal", "none"])
def test_linf_reaches_closed_form_optimum(random_start):
    model, w, x, y = _binary_case()
    threat = ThreatModel("linf", eps=0.1, steps=10, random_start=random_start)
    res = perturb(model, x, y, threat, "ce", early_stop=False, generator=torch.Generator().manual_seed(1))
    # CE of class 1 falls with w.x, of class 0 rises: each coordinate moves eps against its label's sign.
    direction = torch.where(y[:, None] == 1, -1.0, 1.0) * torch.sign(w)
    optimum = (x + 0.1 * direction).clamp(0, 1)
    assert_close(res.x_adv, optimum, atol=1e-6)
    assert res.success is not None and res.value.shape == (16,)
    # A bias-free margin check: the value returned is the CE at the optimum.
    with torch.no_grad():
        assert_close(res.value, nn.functional.cross_entropy(model(optimum), y, reduction="none"), atol=1e-5)


@pytest.mark.parametrize("random_start", ["none", "uniform"])
def test_l2_reaches_closed_form_optimum(random_start):
    model, w, _, y = _binary_case(d=10)
    x = 0.4 + 0.2 * torch.rand(16, 10)  # away from the box edges
    # From a random start the orthogonal part of the start decays geometrically once the iterate is on
    # the sphere; a step of half the radius makes that fast.
    threat = ThreatModel("l2", eps=0.1, steps=20, random_start=random_start)
    if random_start == "uniform":
        threat = threat.replace(step_size=0.05, steps=60)
    res = perturb(model, x, y, threat, "ce", early_stop=False, generator=torch.Generator().manual_seed(1))
    direction = torch.where(y[:, None] == 1, -1.0, 1.0) * w / w.norm()
    # From a random start, best tracking may keep an iterate whose float32 CE ties the optimum's.
    tol = 1e-6 if random_start == "none" else 2e-4
    assert_close(res.x_adv, x + 0.1 * direction, atol=tol)
    assert (res.x_adv - x).norm(dim=1).max() <= 0.1 + 1e-6


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("random_start", ["uniform", "normal", "none"])
def test_iterates_stay_feasible(norm, random_start):
    model = mlp()
    x = torch.rand(32, 12)
    x[:4] = 0.0
    x[4:8] = 1.0
    eps = 0.2 if norm == "linf" else 0.5
    res = perturb(model, x, torch.randint(0, 4, (32,)), ThreatModel(norm, eps, steps=5, random_start=random_start))
    delta = res.x_adv - x
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert size.max() <= eps + 1e-6
    assert res.x_adv.min() >= 0 and res.x_adv.max() <= 1


def test_uniform_l2_start_fills_the_ball():
    # The start alone (one step of a zero-gradient model keeps x at the start).
    class Flat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.zeros(3, 3))

        def forward(self, x):
            return x[:, :3] @ self.w

    x = torch.full((2000, 3), 0.5)
    res = perturb(Flat(), x, torch.zeros(2000, dtype=torch.long), ThreatModel("l2", 0.3, steps=1), track_best=False)
    radius = (res.x_adv - x).norm(dim=1)
    assert radius.max() <= 0.3 + 1e-6
    # In 3-D, P(r <= eps/2) = 1/8 for a uniform ball.
    assert abs((radius <= 0.15).float().mean().item() - 0.125) < 0.03


# ---------------------------------------------------------------------------------------------------
# The engine: hygiene


def test_parameters_get_no_grad_and_flags_restored():
    model, teacher = bn_net(), mlp(seed=5)
    model[1].bias.requires_grad_(False)  # a mixed state must come back exactly
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    x, y = torch.rand(8, 12), torch.randint(0, 4, (8,))
    for objective in ["ce", "cw", "mismatch", "disagreement", "confidence_gap"]:
        perturb(model, x, y, ThreatModel(steps=3), objective, teacher=teacher)
    perturb(model, x, y, ThreatModel(steps=3), "kl", reference=torch.softmax(teacher(x), 1).detach())
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert all(p.requires_grad for p in teacher.parameters())


class Exploding(Objective):
    name = "exploding"

    def value(self, logits, y, *, teacher_logits=None, reference=None):
        raise RuntimeError("boom")


@pytest.mark.parametrize("mode", ["eval", "train", "keep"])
def test_modes_restored_even_when_the_objective_raises(mode):
    model, teacher = bn_net(), bn_net()
    model.train()
    model[2].eval()  # mixed submodule modes survive
    teacher.train()
    params = [p.requires_grad for p in model.parameters()]
    with pytest.raises(RuntimeError, match="boom"):
        perturb(
            model,
            torch.rand(4, 12),
            torch.zeros(4, dtype=torch.long),
            ThreatModel(),
            Exploding(),
            teacher=teacher,
        )
    assert model.training and not model[2].training and model[1].training
    assert teacher.training and all(m.training for m in teacher.modules())
    assert [p.requires_grad for p in model.parameters()] == params


def test_modes_during_the_attack():
    seen = []

    class Spy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(12, 4)

        def forward(self, x):
            seen.append((self.training, x.shape[0]))
            return self.lin(x)

    model, teacher = Spy(), Spy()
    x, y = torch.rand(4, 12), torch.zeros(4, dtype=torch.long)
    for mode, expect in [("eval", False), ("train", True)]:
        seen.clear()
        model.train(not expect)
        teacher.train()
        perturb(model, x, y, ThreatModel(steps=2), "mismatch", teacher=teacher, mode=mode)
        # Calls alternate student, teacher: the student in `mode`, the teacher always in eval.
        assert [s for s, _ in seen[0::2]] == [expect] * 3 and not any(s for s, _ in seen[1::2])
        assert model.training is (not expect) and teacher.training
    with pytest.raises(ConfigError, match="mode"):
        perturb(model, x, y, ThreatModel(), mode="training")


def test_batchnorm_stats_untouched_in_eval_and_updated_in_train():
    model = bn_net()
    model.train()
    x, y = torch.rand(16, 12), torch.randint(0, 4, (16,))
    bn = model[2]
    mean, var, count = bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()
    perturb(model, x, y, ThreatModel(steps=3), mode="eval")
    assert torch.equal(bn.running_mean, mean) and torch.equal(bn.running_var, var)
    assert torch.equal(bn.num_batches_tracked, count)
    perturb(model, x, y, ThreatModel(steps=3), mode="train", early_stop=False, track_best=False)
    assert not torch.equal(bn.running_mean, mean)
    assert int(bn.num_batches_tracked) == int(count) + 3  # one update per attack step
    assert model.training


def test_works_under_no_grad_and_rejects_detached_models():
    model = mlp()
    x, y = torch.rand(4, 12), torch.zeros(4, dtype=torch.long)
    with torch.no_grad():
        res = perturb(model, x, y, ThreatModel(steps=2))
    assert (res.x_adv != x).any()

    class Detached(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(12, 4)

        def forward(self, x):
            return self.lin(x.detach())

    with pytest.raises(RobustKDError, match="does not depend on the input"):
        perturb(Detached(), x, y, ThreatModel(steps=2))


# ---------------------------------------------------------------------------------------------------
# The engine: pass counts, best tracking, early stopping, determinism


@pytest.mark.parametrize("restarts", [1, 3])
def test_pass_counts(restarts):
    model, teacher = Counter(mlp()), Counter(mlp(seed=3))
    x, y = torch.rand(8, 12), torch.randint(0, 4, (8,))
    threat = ThreatModel(steps=5, restarts=restarts)
    perturb(model, x, y, threat, "mismatch", teacher=teacher, early_stop=False)
    assert model.forwards == teacher.forwards == restarts * (5 + 1)  # steps + one scoring forward
    assert model.backwards == teacher.backwards == restarts * 5
    model.forwards = model.backwards = 0
    teacher.forwards = 0
    perturb(model, x, y, threat.replace(restarts=1), "ce", teacher=teacher, early_stop=False, track_best=False)
    assert (model.forwards, model.backwards, teacher.forwards) == (5, 5, 0)  # no teacher for CE


def test_track_best_false_returns_the_last_iterate_and_needs_one_restart():
    model = mlp()
    x, y = torch.rand(8, 12), torch.randint(0, 4, (8,))
    threat = ThreatModel(steps=4, random_start="none")
    res = perturb(model, x, y, threat, early_stop=False, track_best=False)
    assert res.value is None and res.success is None
    # The same iterates by hand.
    xa = x.clone()
    for _ in range(4):
        xa.requires_grad_(True)
        g = torch.autograd.grad(nn.functional.cross_entropy(model(xa), y, reduction="sum"), xa)[0]
        xa = (x + (xa.detach() + threat.alpha * g.sign() - x).clamp(-0.1, 0.1)).clamp(0, 1)
    assert_close(res.x_adv, xa, atol=1e-6)
    with pytest.raises(ConfigError, match="restarts"):
        perturb(model, x, y, threat.replace(restarts=2), track_best=False)


def test_early_stop_freezes_broken_points_and_stops():
    model = Counter(mlp())
    x = torch.rand(16, 12)
    with torch.no_grad():
        wrong = (model.net(x).argmax(1) + 1) % 4  # every point is misclassified from the start
    model.forwards = 0
    res = perturb(model, x, wrong, ThreatModel(steps=10, random_start="none"))
    assert res.success.all() and torch.equal(res.x_adv, x)
    assert model.forwards == 1  # stopped after the first forward: everything was broken
    res = perturb(model, x, wrong, ThreatModel(steps=10, random_start="none"), early_stop=False)
    assert not torch.equal(res.x_adv, x)


def test_best_tracking_is_monotone_in_steps_and_restarts():
    model = mlp(k=4, hidden=32)
    x, y = torch.rand(64, 12), torch.randint(0, 4, (64,))
    ref = torch.softmax(mlp(seed=9)(x), 1).detach()
    base = ThreatModel(eps=0.05, step_size=0.01, steps=5)

    def run(**changes):
        return perturb(
            model,
            x,
            y,
            base.replace(**changes),
            "kl",
            reference=ref,
            generator=torch.Generator().manual_seed(0),
        )

    short, long_, restarted = run(), run(steps=15), run(restarts=4)
    assert (long_.value >= short.value - 1e-6).all()
    assert (restarted.value >= short.value - 1e-6).all()
    assert (restarted.value > short.value + 1e-6).any()


def test_generator_makes_attacks_reproducible():
    model = mlp()
    x, y = torch.rand(8, 12), torch.randint(0, 4, (8,))
    threat = ThreatModel(steps=3, restarts=2)
    a = perturb(model, x, y, threat, generator=torch.Generator().manual_seed(5))
    b = perturb(model, x, y, threat, generator=torch.Generator().manual_seed(5))
    c = perturb(model, x, y, threat, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a.x_adv, b.x_adv) and torch.equal(a.value, b.value)
    assert not torch.equal(a.x_adv, c.x_adv)


def test_eps_zero_is_no_attack():
    model = Counter(mlp())
    x, y = torch.rand(8, 12), torch.randint(0, 4, (8,))
    res = perturb(model, x, y, ThreatModel(eps=0.0))
    assert torch.equal(res.x_adv, x) and model.forwards == 1
    with torch.no_grad():
        expected = model.net(x).argmax(1) != y
    assert torch.equal(res.success, expected)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"x": torch.full((2, 12), 1.01)}, r"^x:"),
        ({"x": torch.full((2, 12), -0.5)}, r"^x:"),
        ({"x": torch.full((2, 12), float("nan"))}, r"^x:"),
        ({"x": torch.ones(2, 12, dtype=torch.long)}, r"^x:"),
        ({"y": torch.zeros(3, dtype=torch.long)}, r"^y:"),
        ({"y": torch.zeros(2)}, r"^y:"),
        ({"objective": "mismatch"}, r"^teacher:"),
        ({"objective": "kl"}, r"^reference:"),
        ({"threat": {"eps": 0.1}}, r"^threat:"),
    ],
)
def test_perturb_rejects_bad_input(kwargs, match):
    args = {"x": torch.rand(2, 12), "y": torch.zeros(2, dtype=torch.long), "threat": ThreatModel()}
    args.update(kwargs)
    with pytest.raises(ConfigError, match=match):
        perturb(mlp(), args.pop("x"), args.pop("y"), args.pop("threat"), **args)


def test_rounding_noise_in_range_is_accepted():
    x = torch.rand(2, 12)
    x[0, 0] = 1 + 5e-7
    perturb(mlp(), x, torch.zeros(2, dtype=torch.long), ThreatModel(steps=1))


# ---------------------------------------------------------------------------------------------------
# The flat training-time loop: a hand-written PGD, the search without its extras, no host synchronisation


def _hand_written_pgd(model, x, y, threat, generator):
    """PGD with CE as the papers write it: a start in the ball (Linf: uniform; L2: none), then sign (Linf) or
    normalised (L2) steps, each projected onto the ball and clipped to [0, 1]."""
    eps, alpha = threat.eps, threat.alpha
    if threat.random_start == "uniform":
        x_adv = (x + ((2 * torch.rand(x.shape, generator=generator) - 1) * eps).clamp(-eps, eps)).clamp(0, 1)
    else:
        x_adv = x.clone()
    for _ in range(threat.steps):
        x_adv.requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(model(x_adv), y, reduction="sum"), x_adv)
        with torch.no_grad():
            if threat.norm == "linf":
                delta = (x_adv + alpha * g.sign() - x).clamp(-eps, eps)
            else:
                delta = x_adv + alpha * g / g.flatten(1).norm(dim=1, keepdim=True).clamp_min(1e-12) - x
                size = delta.flatten(1).norm(dim=1, keepdim=True)
                delta = delta * torch.where(size > eps, eps / size.clamp_min(1e-12), torch.ones_like(size))
            x_adv = (x + delta).clamp(0, 1)
    return x_adv


@pytest.mark.parametrize(
    "threat",
    [
        ThreatModel("linf", 0.1, steps=7),
        ThreatModel("linf", 0.1, step_size=0.1, steps=3, random_start="none"),
        ThreatModel("l2", 0.5, steps=6, random_start="none"),
    ],
)
def test_pgd_is_a_hand_written_pgd_loop(threat):
    model = mlp(hidden=32)
    x, y = torch.rand(16, 12), torch.randint(0, 4, (16,))
    x[:3] = 0.0  # points on the box edge
    ours = pgd(model, x, y, threat, generator=torch.Generator().manual_seed(4))
    expected = _hand_written_pgd(model, x, y, threat, torch.Generator().manual_seed(4))
    assert torch.equal(ours, expected)
    assert (ours != x).any()
    assert all(p.grad is None and p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("objective", ["ce", "cw", "kl", "mismatch", "disagreement", "confidence_gap"])
@pytest.mark.parametrize(
    ("threat", "mode"),
    [
        (ThreatModel("linf", 0.1, steps=4), "eval"),
        (ThreatModel("linf", 0.1, steps=4, random_start="normal"), "train"),
        (ThreatModel("l2", 0.5, steps=4), "eval"),
        (ThreatModel("l2", 0.5, steps=4, random_start="none"), "train"),
        (ThreatModel("linf", 0.0), "eval"),
    ],
)
def test_pgd_is_perturb_without_search(objective, threat, mode):
    model, teacher = bn_net(), mlp(seed=5)
    x, y = torch.rand(16, 12), torch.randint(0, 4, (16,))
    ref = torch.softmax(teacher(x), 1).detach()
    kwargs = {"teacher": teacher, "reference": ref if objective == "kl" else None, "mode": mode}

    def run(attack, **flags):
        generator = torch.Generator().manual_seed(2)
        torch.manual_seed(0)  # the BatchNorm model has no dropout, but keep the global stream equal too
        out = attack(model, x, y, threat, objective, generator=generator, **kwargs, **flags)
        return out if torch.is_tensor(out) else out.x_adv

    flat = run(pgd)
    assert torch.equal(flat, run(perturb, early_stop=False, track_best=False))
    # The search's own whole-batch path (no freezing, no tracking) is the same loop.
    assert torch.equal(flat, run(search, early_stop=False, track_best=False))
    z, labels = torch.zeros(2, 4), torch.zeros(2, dtype=torch.long)
    if make_objective(objective).success(z, labels, teacher_logits=z, reference=z.softmax(1)) is None:
        # Nothing can freeze without a success criterion: early stop changes nothing.
        assert torch.equal(flat, run(perturb, early_stop=True, track_best=False))


def test_the_sync_harness_catches_syncs(no_host_sync):
    t = torch.tensor([0.5, 1.0, 0.0])
    calls = [
        t.sum().item,
        t.tolist,
        t.nonzero,
        lambda: torch.nonzero(t),
        lambda: bool(t.any()),
        lambda: float(t.sum()),
        lambda: t[t > 0.2],
        lambda: t.__setitem__(t > 0.2, 0.0),
    ]
    for call in calls:
        with pytest.raises(HostSync):
            call()
    assert t[1:].shape == (2,) and t[torch.tensor([0, 2])].shape == (2,)  # plain indexing still works
    model = mlp()
    x, y = torch.rand(4, 12), torch.zeros(4, dtype=torch.long)
    # perturb checks the [0, 1] range of its input (two values read back), even for the training-time flags.
    with pytest.raises(HostSync, match="item"):
        perturb(model, x, y, ThreatModel(steps=2), early_stop=False, track_best=False)
    # The search decides on the host which points are still robust.
    with pytest.raises(HostSync):
        search(model, x, y, ThreatModel(steps=2))


@pytest.mark.parametrize("objective", ["ce", "cw", "mismatch", "kl", "disagreement"])
@pytest.mark.parametrize("threat", [ThreatModel("linf", 0.1, steps=3), ThreatModel("l2", 0.5, steps=3)])
def test_pgd_makes_no_host_sync(objective, threat, monkeypatch, no_host_sync):
    model, teacher = bn_net(), mlp(seed=5)
    model.train()
    x, y = torch.rand(8, 12), torch.randint(0, 4, (8,))
    ref = torch.softmax(teacher(x), 1).detach()
    x_adv = pgd(model, x, y, threat, objective, teacher=teacher, reference=ref, mode="train")
    monkeypatch.undo()
    assert x_adv.shape == x.shape and (x_adv != x).any() and model.training
    size = (x_adv - x).abs().amax(1) if threat.norm == "linf" else (x_adv - x).norm(dim=1)
    assert size.max() <= threat.eps + 1e-6


def test_pgd_checks_its_mode_but_not_the_input_range():
    model = mlp()
    x, y = torch.full((2, 12), 0.5), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ConfigError, match="^mode:"):
        pgd(model, x, y, ThreatModel(eps=0.0), mode="training")
    # Out-of-range inputs are the caller's business on the training path (checked where data enters).
    assert pgd(model, x + 1, y, ThreatModel(steps=1)).shape == x.shape

    class Detached(nn.Linear):
        def forward(self, x):
            return super().forward(x.detach())

    with pytest.raises(RobustKDError, match="does not depend on the input"):
        pgd(Detached(12, 4), x, y, ThreatModel(steps=1))


# ---------------------------------------------------------------------------------------------------
# Recipes


def test_recipes_parse_and_describe():
    assert set(ATTACKS.names()) == {"clean", "pgd<k>", "cw<k>", "autoattack", "autoattack-rand"}
    pgd = get_attack("pgd20")
    assert (pgd.kind, pgd.steps) == ("pgd<k>", 20)
    protocol = ThreatModel.preset("linf-8/255")
    s = pgd.settings(protocol)
    assert s["steps"] == 20 and s["step_size"] == pytest.approx(2 / 255) and s["objective"] == "ce"
    assert get_attack("cw30").settings(protocol)["kappa"] == 50.0
    assert get_attack("pgd10").settings(ThreatModel(eps=0.1, step_size=None))["step_size"] == pytest.approx(0.025)
    with pytest.raises(RegistryError, match="pgd<k>"):
        get_attack("pdg20")
    with pytest.raises(RegistryError, match="step count"):
        get_attack("pgd")
    with pytest.raises(ConfigError, match="at least one step"):
        get_attack("pgd0")


def test_recipe_matches_perturb():
    model = mlp()
    x, y = torch.rand(8, 12), torch.randint(0, 4, (8,))
    protocol = ThreatModel(eps=0.1, step_size=0.02)
    a = get_attack("cw7").run(model, x, y, protocol, generator=torch.Generator().manual_seed(0))
    b = perturb(model, x, y, protocol.replace(steps=7), CWMargin(50.0), generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b.x_adv)
    assert get_attack("clean").run(model, x, y, protocol) is x


# ---------------------------------------------------------------------------------------------------
# AutoAttack adapter


def test_autoattack_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyautoattack", None)  # makes the import fail
    with pytest.raises(RobustKDError, match=r"pip install --no-deps pyautoattack==0\.2\.0"):
        autoattack(mlp(), torch.rand(2, 12), torch.zeros(2, dtype=torch.long), eps=0.1)


def test_autoattack_hygiene_small_class_count():
    pytest.importorskip("pyautoattack")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    model.train()
    x, y = torch.rand(6, 1, 4, 4), torch.randint(0, 3, (6,))
    state = torch.get_rng_state()
    bn_mean = model[2].running_mean.clone()
    with pytest.warns(UserWarning, match="apgd-t"):
        x_adv = autoattack(model, x, y, eps=0.3, seed=0)
    assert torch.equal(torch.get_rng_state(), state)  # the library reseeds inside a forked RNG
    assert model.training and torch.equal(model[2].running_mean, bn_mean)
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    assert (x_adv - x).abs().max() <= 0.3 + 1e-6 and x_adv.shape == x.shape
    trace = sys.gettrace()
    with pytest.warns(UserWarning, match="apgd-t"):
        autoattack(model, x, y, eps=0.3, seed=0, n_classes=3)
    assert sys.gettrace() is trace
    with pytest.raises(ConfigError, match="version"):
        autoattack(model, x, y, eps=0.3, version="plus")
    with pytest.raises(ConfigError, match="norm"):
        autoattack(model, x, y, eps=0.3, norm="l1")


def test_attack_result_and_context_are_public():
    assert {f.name for f in dataclasses.fields(AttackResult)} == {"x_adv", "value", "success"}
    model = mlp().eval()
    with attack_mode(model, None, "train"):
        assert model.training and not any(p.requires_grad for p in model.parameters())
    assert not model.training
    assert all(p.requires_grad for p in model.parameters())
