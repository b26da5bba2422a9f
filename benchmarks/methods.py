"""Each training method's per-pass overhead: its step time against the sum of its passes' unit costs.

The priced sum of a method is Σ_k passes_k · unit_k: the passes one step actually runs, priced by unit costs
measured on the same student, teacher, batch and thread count, each method right after its units in every
round. The network passes are counted with hooks during an untimed step (forwards of each network, and the
backwards that reach each forward's output: see :func:`count_passes`); the bound passes, which run no
network forward, are taken from the method's ``passes()``. Where ``passes()`` declares other network counts
than the hooks see, the row says so (``declared_differs``). A step is what the engine runs per batch minus
the optimiser update: ``zero_grad``, the method call, ``loss.backward()``.

This is not a floor on what a method must cost: a pass the method runs without need is priced into its own
sum. The ratio says how much a step costs beyond the passes it runs (Python dispatch, the attack's
element-wise steps, loss arithmetic); whether those passes are all needed is the question of
``benchmarks/reference.py``, which times each method against a hand-written loop.

Units (student S = dm_small, teacher T = dm_medium, frozen and in the layout the engine gives it), each a
composite measured whole, the backward parts found by subtraction so that the composites add up exactly:

- ``student_fwd``: S(x), train mode, graph through the parameters;
- ``student_bwd``: CE(S(x), y).backward() minus the forward;
- ``student_input_grad``: ∇_x CE_sum(S(x), y) with frozen parameters (one attack step) minus the forward;
- ``student_double_bwd``: KDIGA's pass (S(x), g = ∇_x CE with create_graph, backward of CE + ‖g‖) minus a
  forward, an input-gradient backward and a backward;
- ``teacher_fwd``: T(x) under no_grad; ``teacher_input_grad``: ∇_x CE_sum(T(x), y) minus ``teacher_fwd``;
- ``student_ibp``: IBP margin bounds of S over the ball plus the backward of CE on the worst-case logits;
- ``student_crown_bwd``: the same with the CROWN-IBP/IBP mix (one CROWN backward pass, upper side) minus
  ``student_ibp``;
- ``teacher_ibp`` / ``teacher_crown_bwd``: the teacher's lower margin bounds under no_grad, IBP and the
  CROWN-IBP extra.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.common import (
    arch,
    calibrate,
    engine_teacher,
    load_images,
    make_model,
    median,
    ms,
    round_ratios,
    sample,
    sample_both,
    setting,
)
from robustkd.certify import get_verifier, input_box, interval_bounds, margin_spec
from robustkd.methods import METHODS, Batch, Method, StepInfo, build_method
from robustkd.methods.losses import certified_ce

STUDENT, TEACHER = "dm_small", "dm_medium"  # defaults; `--arch student=...,teacher=...` replaces them
TARGET = 1.15
# Options that put a method in its costliest regime at the benchmark's StepInfo: IAD's introspection
# starts at epoch 60 by default; from epoch 0 here so that its extra passes are timed.
OPTIONS: dict[str, dict[str, Any]] = {"iad": {"begin": 0}}
# Halfway through the certified methods' ramp (1 warm-up epoch, 10 ramp epochs): eps_t = threat.eps / 2,
# kappa_t and beta_t strictly between their end points, so every declared bound pass runs.
INFO = StepInfo(epoch=6, step=600, epochs=20, steps_per_epoch=100)
BOUND_EPS = 0.05  # eps_t of the certified methods at INFO (threat.eps 0.1)
NOT_PASSES = {"attack_steps"}  # informational keys of passes()


def _input_grad(model: nn.Module, x: Tensor, y: Tensor, create_graph: bool = False) -> tuple[Tensor, Tensor]:
    inp = x.detach().requires_grad_(True)
    logits = model(inp)
    (grad,) = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), inp, create_graph=create_graph)
    return logits, grad


def unit_functions(student: nn.Module, teacher: nn.Module, x: Tensor, y: Tensor) -> dict[str, Callable[[], Any]]:
    """The composites behind the unit costs (see the module docstring)."""
    C = margin_spec(y, 10, dtype=x.dtype)
    ibp, crown_ibp = get_verifier("ibp"), get_verifier("crown-ibp")
    student_params = list(student.parameters())

    def student_fwd() -> None:
        student.zero_grad(set_to_none=True)
        student(x)

    def student_fwd_bwd() -> None:
        student.zero_grad(set_to_none=True)
        F.cross_entropy(student(x), y).backward()

    def student_attack_step() -> None:
        # As an attack runs it: parameters frozen, gradient with respect to the input only.
        for p in student_params:
            p.requires_grad_(False)
        try:
            _input_grad(student, x, y)
        finally:
            for p in student_params:
                p.requires_grad_(True)

    def student_double() -> None:
        student.zero_grad(set_to_none=True)
        x_in = x.detach().requires_grad_(True)
        logits = student(x_in)
        ce = F.cross_entropy(logits, y)
        (g,) = torch.autograd.grad(ce, x_in, create_graph=True)
        (ce + g.flatten().norm()).backward()

    def teacher_fwd() -> None:
        with torch.no_grad():
            teacher(x)

    def teacher_attack_step() -> None:
        _input_grad(teacher, x, y)

    def student_ibp() -> None:
        student.zero_grad(set_to_none=True)
        state = ibp.state(student, *input_box(x, BOUND_EPS))
        _, upper = ibp.spec_bounds(state, C)
        certified_ce(upper, y).backward()

    def student_crown() -> None:
        student.zero_grad(set_to_none=True)
        state = crown_ibp.state(student, *input_box(x, BOUND_EPS))
        _, u_ibp = ibp.spec_bounds(state, C)
        _, u_crown = crown_ibp.spec_bounds(state, C, bound_lower=False)
        certified_ce(0.5 * u_crown + 0.5 * u_ibp, y).backward()

    def teacher_ibp() -> None:
        with torch.no_grad():
            interval_bounds(teacher, x, BOUND_EPS, method="ibp", C=C, bound_upper=False)

    def teacher_crown() -> None:
        with torch.no_grad():
            interval_bounds(teacher, x, BOUND_EPS, method="crown-ibp", C=C, bound_upper=False)

    return {
        "student_fwd": student_fwd,
        "student_fwd_bwd": student_fwd_bwd,
        "student_attack_step": student_attack_step,
        "student_double": student_double,
        "teacher_fwd": teacher_fwd,
        "teacher_attack_step": teacher_attack_step,
        "student_ibp": student_ibp,
        "student_crown": student_crown,
        "teacher_ibp": teacher_ibp,
        "teacher_crown": teacher_crown,
    }


# The composites each priced pass kind is derived from (see unit_costs).
COMPOSITES: dict[str, tuple[str, ...]] = {
    "student_fwd": ("student_fwd",),
    "student_bwd": ("student_fwd", "student_fwd_bwd"),
    "student_input_grad": ("student_fwd", "student_attack_step"),
    "student_double_bwd": ("student_fwd", "student_fwd_bwd", "student_attack_step", "student_double"),
    "teacher_fwd": ("teacher_fwd",),
    "teacher_input_grad": ("teacher_fwd", "teacher_attack_step"),
    "student_ibp": ("student_ibp",),
    "student_crown_bwd": ("student_ibp", "student_crown"),
    "teacher_ibp": ("teacher_ibp",),
    "teacher_crown_bwd": ("teacher_ibp", "teacher_crown"),
}
# Passes that hooks cannot see (bound passes call no network's forward): priced as the method declares them.
BOUND_PASSES = ("student_ibp", "student_crown_bwd", "teacher_ibp", "teacher_crown_bwd")


def unit_costs(t: dict[str, float]) -> dict[str, float]:
    """Unit cost (seconds) of every pass kind whose composites are in ``t`` (one round's composite times)."""
    derived = {
        "student_fwd": lambda: t["student_fwd"],
        "student_bwd": lambda: t["student_fwd_bwd"] - t["student_fwd"],
        "student_input_grad": lambda: t["student_attack_step"] - t["student_fwd"],
        "student_double_bwd": lambda: (
            t["student_double"] + t["student_fwd"] - t["student_fwd_bwd"] - t["student_attack_step"]
        ),
        "teacher_fwd": lambda: t["teacher_fwd"],
        "teacher_input_grad": lambda: t["teacher_attack_step"] - t["teacher_fwd"],
        "student_ibp": lambda: t["student_ibp"],
        "student_crown_bwd": lambda: t["student_crown"] - t["student_ibp"],
        "teacher_ibp": lambda: t["teacher_ibp"],
        "teacher_crown_bwd": lambda: t["teacher_crown"] - t["teacher_ibp"],
    }
    return {kind: fn() for kind, fn in derived.items() if all(c in t for c in COMPOSITES[kind])}


def declared_passes(method: Method, info: StepInfo) -> dict[str, int]:
    """``method.passes()``, at ``info.epoch`` for methods whose count depends on it (IAD)."""
    if "epoch" in inspect.signature(method.passes).parameters:
        return method.passes(epoch=info.epoch)
    return method.passes()


def count_passes(step: Callable[[], Any], student: nn.Module, teacher: nn.Module) -> dict[str, int]:
    """The passes one ``step()`` runs through each network, counted with hooks.

    Forwards: calls of the network's forward. Backwards: gradients arriving at a forward's output. One that
    arrives while the network's parameters are frozen (an attack) or that is itself differentiable (taken
    with create_graph, KDIGA's g_S) is an input-gradient backward, the latter also a double backward later;
    any other is a backward through the parameters. Bound passes call no forward and are not seen here.
    """
    counts = {key: 0 for key in ("student_fwd", "student_bwd", "student_input_grad", "student_double_bwd")}
    counts.update(teacher_fwd=0, teacher_input_grad=0)

    def hook_for(prefix: str):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            counts[f"{prefix}_fwd"] += 1
            if not output.requires_grad:
                return
            trains = any(p.requires_grad for p in module.parameters())

            def arrived(grad: Tensor) -> None:
                if grad.requires_grad:
                    counts[f"{prefix}_input_grad"] += 1
                    counts[f"{prefix}_double_bwd"] += 1
                elif trains:
                    counts[f"{prefix}_bwd"] += 1
                else:
                    counts[f"{prefix}_input_grad"] += 1

            output.register_hook(arrived)

        return hook

    handles = [student.register_forward_hook(hook_for("student")), teacher.register_forward_hook(hook_for("teacher"))]
    try:
        step()
    finally:
        for handle in handles:
            handle.remove()
    return {key: value for key, value in counts.items() if value}


def priced_passes(counted: dict[str, int], declared: dict[str, int]) -> dict[str, int]:
    """What the sum prices: the counted network passes plus the declared bound passes."""
    return {**counted, **{k: v for k, v in declared.items() if k in BOUND_PASSES and v}}


def priced(passes: dict[str, int], units: dict[str, float]) -> float:
    return sum(count * units[kind] for kind, count in passes.items())


def _mismatch(counted: dict[str, int], declared: dict[str, int]) -> dict[str, list[int]]:
    """Network passes where ``passes()`` and the count disagree: {kind: [declared, counted]}."""
    kinds = (set(counted) | set(declared)) - set(BOUND_PASSES) - NOT_PASSES
    return {
        k: [declared.get(k, 0), counted.get(k, 0)] for k in sorted(kinds) if declared.get(k, 0) != counted.get(k, 0)
    }


def run(quick: bool = False, threads: int = 1, repeats: int | None = None) -> dict[str, Any]:
    repeats = repeats or (2 if quick else 9)
    batch = 16 if quick else 128
    x, y, source = load_images(batch, seed=0)
    student = make_model(arch("student", STUDENT), seed=1).train()
    teacher = engine_teacher(make_model(arch("teacher", TEACHER), seed=2))
    data = Batch(x, y)
    methods: dict[str, Method] = {}
    for name in METHODS.names():
        options = dict(OPTIONS.get(name, {}))
        if quick and "threat" in inspect.signature(METHODS.get(name)).parameters:
            options["threat"] = {"steps": 2}
        methods[name] = build_method(name, options)

    def step_fn(method: Method) -> Callable[[], None]:
        def step() -> None:
            student.zero_grad(set_to_none=True)
            method(student, teacher, data, INFO).loss.backward()

        return step

    composites = unit_functions(student, teacher, x, y)
    plans = {}
    for name, method in methods.items():
        step = step_fn(method)
        # The first call also runs the certified methods' one-off boundability check: untimed here.
        counted = count_passes(step, student, teacher)
        declared = declared_passes(method, INFO)
        passes = priced_passes(counted, declared)
        needed = sorted({c for kind in passes for c in COMPOSITES[kind]})
        plans[name] = {"step": step, "counted": counted, "declared": declared, "passes": passes, "needed": needed}
    calls = {name: calibrate(fn) for name, fn in composites.items() if any(name in p["needed"] for p in plans.values())}
    for plan in plans.values():
        plan["calls"] = calibrate(plan["step"])

    # Each method is timed right after the composites it is priced from, so the load of that moment hits both.
    unit_samples: dict[str, list[float]] = {}
    for _ in range(repeats):
        for plan in plans.values():
            times = {c: sample(composites[c], calls[c]) for c in plan["needed"]}
            wall, cpu = sample_both(plan["step"], plan["calls"])
            plan.setdefault("steps_s", []).append(wall)
            plan.setdefault("steps_cpu_s", []).append(cpu)
            units = unit_costs(times)
            plan.setdefault("priced_s", []).append(priced(plan["passes"], units))
            for kind, value in units.items():
                unit_samples.setdefault(kind, []).append(value)

    rows = []
    for name, plan in plans.items():
        ratio = median(round_ratios(plan["steps_s"], plan["priced_s"]))
        rows.append(
            {
                "name": name,
                "options": OPTIONS.get(name, {}),
                "passes": plan["passes"],
                "declared_passes": plan["declared"],
                "declared_differs": _mismatch(plan["counted"], plan["declared"]),
                "step_ms": ms(median(plan["steps_s"])),
                "step_cpu_ms": ms(median(plan["steps_cpu_s"])),
                "passes_ms": ms(median(plan["priced_s"])),
                "ratio": round(ratio, 3),
                "target": TARGET,
                "meets_target": ratio <= TARGET,
            }
        )
    slowest = max(rows, key=lambda row: row["ratio"])
    return {
        "benchmark": "methods",
        "what": f"per-pass overhead: training step time / the sum of its passes' unit costs (target <= {TARGET}); "
        "not a floor (a redundant pass is priced into its own sum)",
        "setting": setting(
            threads,
            repeats,
            model={"student": arch("student", STUDENT), "teacher": arch("teacher", TEACHER)},
            batch=batch,
            data=source,
            step_info={"epoch": INFO.epoch, "step": INFO.step, "steps_per_epoch": INFO.steps_per_epoch},
            quick=quick,
        ),
        "units_ms": {kind: ms(median(values)) for kind, values in unit_samples.items()},
        "rows": rows,
        "slowest": {"name": slowest["name"], "ratio": slowest["ratio"]},
        "ratios": [
            {
                "name": f"methods/{row['name']}",
                "ratio": row["ratio"],
                "target": f"<= {TARGET}",
                "meets": row["meets_target"],
            }
            for row in rows
        ],
    }
