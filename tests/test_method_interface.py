"""The method interface, registry-wide: every registered method and every shipped config, discovery of method
files, the one threat-model option, the shared weighted sum of named terms.
"""

from __future__ import annotations

import ast
import dataclasses
import math
import warnings
from pathlib import Path

import pytest
import torch
from conftest import (
    FAST_ARGS,
    INFO,
    REPO,
    SHIPPED_CONFIGS,
    ForwardCounter,
    configs_of,
    shipped_config,
    tiny_pair,
)
from torch import nn

import robustkd.methods
from robustkd.attacks import ThreatModel
from robustkd.config import load_config
from robustkd.errors import ConfigError
from robustkd.methods import METHODS, Batch, Method, StepInfo, build_method
from robustkd.methods.base import DeprecatedOptionWarning
from robustkd.methods.losses import Term, weighted_sum

METHOD_DIR = Path(robustkd.methods.__file__).parent
SHARED = {"__init__", "base", "common", "losses"}

# ---------------------------------------------------------------------------------------------------
# Every registered method.


def _boundable_pair() -> tuple[nn.Module, nn.Module]:
    """A train-mode student with BatchNorm and a frozen teacher, plain Sequentials (certified methods bound them)."""
    torch.manual_seed(0)
    student = nn.Sequential(
        nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 4)
    )
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 4))
    return student.train(), teacher.eval().requires_grad_(False)


@pytest.mark.parametrize("name", METHODS.names())
def test_every_method_builds_with_defaults_and_takes_one_step(name: str) -> None:
    method = build_method(name)
    assert isinstance(method, Method) and method.name == name and METHODS.get(name) is type(method)
    student, teacher = _boundable_pair()
    batch = Batch(torch.rand(8, 1, 8, 8), torch.randint(0, 4, (8,)))
    student_flags = [p.requires_grad for p in student.parameters()]

    out = method(student, teacher if method.needs_teacher else None, batch, INFO)

    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    # Modes and flags are as the caller left them, submodules included.
    assert all(m.training for m in student.modules()) and not any(m.training for m in teacher.modules())
    assert [p.requires_grad for p in student.parameters()] == student_flags
    assert not any(p.requires_grad for p in teacher.parameters())
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in student.parameters())
    assert all(math.isfinite(float(v)) for v in out.logs.values())
    passes = method.passes()
    assert passes["student_fwd"] >= 1 and passes["student_bwd"] == 1


@pytest.mark.parametrize("name", METHODS.names())
def test_every_method_has_a_doc_page(name: str) -> None:
    page = REPO / "docs" / "methods" / f"{name}.md"
    assert page.is_file(), f"docs/methods/{name}.md is missing"
    assert "## Options (`method.args`)" in page.read_text()


@pytest.mark.parametrize("path", SHIPPED_CONFIGS)
def test_every_shipped_config_loads_and_builds_its_method(path: str) -> None:
    cfg = load_config(REPO / path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # shipped configs use the current spelling
        method = build_method(cfg.method.name, cfg.method.args)
    assert type(method) is METHODS.get(cfg.method.name)
    protocol = cfg.validate.protocol
    if getattr(method, "threat", None) is not None and protocol:
        # Training at less than the validation radius would leave the protocol's ball untrained.
        assert method.threat.eps >= ThreatModel.parse(protocol).eps - 1e-12


def test_shipped_configs_are_found() -> None:
    assert len(SHIPPED_CONFIGS) >= 24 and all(p.startswith("configs/") for p in SHIPPED_CONFIGS)


# ---------------------------------------------------------------------------------------------------
# Discovery: a method is one file.


def _registering_modules() -> list[str]:
    """Modules of robustkd/methods/ that define a class decorated with @register_method(...)."""
    found = []
    for path in sorted(METHOD_DIR.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and any(
                isinstance(d, ast.Call) and getattr(d.func, "id", None) == "register_method"
                for d in node.decorator_list
            ):
                found.append(path.stem)
                break
    return found


def test_every_method_file_is_discovered_and_registered() -> None:
    modules = _registering_modules()
    assert len(modules) == len(METHODS.names()) >= 13
    registered = {METHODS.get(name).__module__.rsplit(".", 1)[1] for name in METHODS.names()}
    assert registered == set(modules)


def test_the_package_init_names_no_method_module() -> None:
    tree = ast.parse((METHOD_DIR / "__init__.py").read_text())
    method_modules = {p.stem for p in METHOD_DIR.glob("*.py")} - SHARED
    named = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            named |= {(node.module or "").rsplit(".", 1)[-1], *(a.name for a in node.names)}
        elif isinstance(node, ast.Import):
            named |= {a.name.rsplit(".", 1)[-1] for a in node.names}
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            named |= set(node.value.replace(".", " ").split())
    assert not named & method_modules, f"methods/__init__.py names {sorted(named & method_modules)}"


def test_method_files_import_no_sibling_method_file() -> None:
    method_modules = {p.stem for p in METHOD_DIR.glob("*.py")} - SHARED
    for stem in sorted(method_modules):
        tree = ast.parse((METHOD_DIR / f"{stem}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("robustkd.methods."):
                assert node.module.rsplit(".", 1)[1] in SHARED, f"{stem}.py imports {node.module}"


# ---------------------------------------------------------------------------------------------------
# The threat model: one option.


def _ball_methods() -> list[str]:
    return [n for n in METHODS.names() if any(f.name == "threat" for f in dataclasses.fields(METHODS.get(n)))]


def test_methods_with_a_ball_are_those_that_had_one() -> None:
    assert _ball_methods() == sorted(
        ["adaad", "advfunmatch", "ard", "crown_ibp", "faithful", "iad", "ibp", "pgd_at", "rslad", "trades"]
    )


@pytest.mark.parametrize("name", _ball_methods())
def test_threat_is_a_threat_model_from_a_name_or_a_mapping_on_the_method_defaults(name: str) -> None:
    default = build_method(name).threat
    assert (
        isinstance(default, ThreatModel)
        and default
        == dataclasses.fields(METHODS.get(name))[
            [f.name for f in dataclasses.fields(METHODS.get(name))].index("threat")
        ].default
    )
    assert build_method(name, {"threat": "linf-0.1"}).threat == ThreatModel.preset("linf-0.1")
    partial = build_method(name, {"threat": {"eps": 0.05}}).threat
    assert partial == default.replace(eps=0.05)  # the method's step, steps and start, not ThreatModel's
    given = ThreatModel("linf", 0.2, step_size=0.05, steps=3)
    assert build_method(name, {"threat": given}).threat is given


@pytest.mark.parametrize(
    ("name", "flat", "threat"),
    [
        ("pgd_at", {"eps": 0.1, "steps": 3}, {"eps": 0.1, "steps": 3}),
        ("trades", {"step_size": 0.01, "random_start": "none"}, {"step_size": 0.01, "random_start": "none"}),
        ("rslad", {"norm": "l2", "eps": 0.5, "step_size": None}, {"norm": "l2", "eps": 0.5, "step_size": None}),
        ("ibp", {"eps_train": 0.2}, {"eps": 0.2}),
        ("faithful", {"eps_train": 0.15}, {"eps": 0.15}),
    ],
)
def test_old_flat_keys_fold_into_threat_with_a_deprecation_warning(name: str, flat: dict, threat: dict) -> None:
    with pytest.warns(DeprecatedOptionWarning, match=r"method\.args\.threat: \{") as record:
        method = build_method(name, {**flat})
    assert issubclass(record[0].category, FutureWarning)  # shown by default, unlike DeprecationWarning
    assert method.threat == build_method(name, {"threat": threat}).threat


@pytest.mark.parametrize(
    ("name", "args", "match"),
    [
        ("pgd_at", {"eps": 0.1, "threat": "linf-0.1"}, "both set"),
        ("ibp", {"eps_train": 0.1, "threat": {"eps": 0.1}}, "both set"),
        ("ibp", {"eps": 0.1}, "no option 'eps'"),  # certified methods never had the attack keys
        ("kd", {"eps": 0.1}, "no option 'eps'"),
        ("pgd_at", {"threat": {"restarts": 2}}, "restarts"),
        ("pgd_at", {"threat": {"radius": 0.1}}, "method.args.threat: unknown field 'radius'"),
        ("pgd_at", {"threat": "linf-huge"}, "method.args.threat"),
        ("pgd_at", {"threat": 0.1}, "method.args.threat: expected a protocol name"),
        ("crown_ibp", {"threat": "l2-0.5"}, "Linf"),
    ],
)
def test_bad_threat_options_are_refused(name: str, args: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        build_method(name, args)


# ---------------------------------------------------------------------------------------------------
# The weighted sum of named terms.


def test_weighted_sum_adds_weighted_terms_in_order_and_logs_them_unweighted() -> None:
    a, b = torch.tensor(2.0), torch.tensor(3.0)
    total, logs = weighted_sum(Term("a", 0.5, lambda: a), Term("b", 2.0, lambda: b))
    assert total.item() == 0.5 * 2.0 + 2.0 * 3.0
    assert list(logs) == ["a", "b"] and logs["a"] is a and logs["b"] is b


def test_weighted_sum_never_computes_a_term_of_weight_zero() -> None:
    def forbidden() -> torch.Tensor:
        raise AssertionError("a term of weight 0 was computed")

    total, logs = weighted_sum(Term("a", 1.0, lambda: torch.tensor(4.0)), Term("b", 0.0, forbidden))
    assert total.item() == 4.0 and set(logs) == {"a"}
    total, logs = weighted_sum(Term("a", -0.5, forbidden), Term("b", 1.0, lambda: torch.tensor(1.0)))
    assert set(logs) == {"b"}


def test_weighted_sum_group_terms_sum_their_parts_before_weighting() -> None:
    parts = {"p": torch.tensor(1.0), "q": torch.tensor(2.0)}
    total, logs = weighted_sum(Term("bracket", 3.0, lambda: parts), Term("c", 1.0, lambda: torch.tensor(0.5)))
    assert total.item() == 3.0 * (1.0 + 2.0) + 0.5
    assert list(logs) == ["p", "q", "c"]


def test_weighted_sum_needs_a_positive_weight() -> None:
    with pytest.raises(ValueError, match="no term has a positive weight"):
        weighted_sum(Term("a", 0.0, lambda: torch.tensor(1.0)), Term("b", float("nan"), lambda: torch.tensor(1.0)))


# ---------------------------------------------------------------------------------------------------
# The attack and KD methods: one step's hygiene and declared passes, options, defaults, configs.


NAMES = ("pgd_at", "trades", "kd", "kdiga", "advfunmatch")
PASS_KEYS = {
    "student_fwd",
    "student_bwd",
    "student_input_grad",
    "student_double_bwd",
    "teacher_fwd",
    "teacher_input_grad",
    "attack_steps",
}


@pytest.mark.parametrize("name", NAMES)
def test_one_step_runs_and_keeps_hygiene(name: str) -> None:
    student, teacher, batch = tiny_pair()
    method = build_method(name, FAST_ARGS[name])
    assert METHODS.get(name) is type(method)
    s_count, t_count = ForwardCounter(student), ForwardCounter(teacher)
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


# ---------------------------------------------------------------------------------------------------
# Options and configs.


@pytest.mark.parametrize(
    ("name", "args"),
    [
        ("pgd_at", {"threat": {"eps": -0.1}}),
        ("pgd_at", {"threat": {"step_size": 0.5, "eps": 0.1}}),
        ("pgd_at", {"attack_mode": "keep"}),
        ("trades", {"beta": -1.0}),
        ("trades", {"threat": {"random_start": "gaussian"}}),
        ("kd", {"alpha": 1.5}),
        ("kd", {"temperature": 0.0}),
        ("kd", {"kl_reduction": "none"}),
        ("kd", {"kl_reduction": "mean"}),
        ("kdiga", {"grad_norm": "l1"}),
        ("kdiga", {"gamma": -1.0}),
        ("advfunmatch", {"mixup_alpha": -1.0}),
        ("advfunmatch", {"threat": {"norm": "l3"}}),
        ("advfunmatch", {"threat": {"steps": 0}}),
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


CONFIGS = configs_of(*NAMES)


@pytest.mark.parametrize("path", CONFIGS)
def test_config_loads_and_names_a_valid_method(path: str) -> None:
    from robustkd.attacks import ThreatModel, get_attack
    from robustkd.data.augment import AUGMENTS
    from robustkd.models import list_models

    cfg, method = shipped_config(path)
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


@pytest.mark.parametrize("name", METHODS.names())
def test_a_training_step_reads_nothing_back_from_the_device(name: str, monkeypatch, request) -> None:
    # Every host read (item, tolist, bool, nonzero, mask indexing) stalls an accelerator's queue and rules out
    # graph capture. The first step may check what it must once (that the model can be bounded); later steps
    # — the method's step, the backward and the optimiser update — read nothing back.
    student, teacher = _boundable_pair()
    batch = Batch(torch.rand(8, 1, 8, 8), torch.randint(0, 4, (8,)))
    method = build_method(name, {})
    optimizer = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)
    teacher = teacher if method.needs_teacher else None

    def step(index: int) -> torch.Tensor:
        out = method(student, teacher, batch, StepInfo(1, index, 3, 20))
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        return out.loss.detach()

    step(20)
    request.getfixturevalue("no_host_sync")
    losses = [step(21), step(30)]  # inside the eps ramp and the late-starting terms
    monkeypatch.undo()
    assert all(torch.isfinite(loss) for loss in losses)
