"""Certified faithfulness of a student to its teacher (robustkd's definitions, after Lamb et al. 2023).

For a labelled point (x, y) and the ball ``B = Ball_inf(x, eps) ∩ [0, 1]^d``, with margins
``m_j = z_j - z_y`` bounded by ``[l_j, u_j]`` for each network:

- certified (per network): every ``u_j < 0``, so the network predicts y on all of B;
- agreement certified: teacher and student both certified on y. Sufficient, not necessary, for "no
  x' in B where the two argmaxes differ";
- confidence interval of ``f^y = softmax(z)_y``: ``[1 / (1 + sum exp(u_j)), 1 / (1 + sum exp(l_j))]``;
- ``gap_upper``: a certified upper bound on ``G(x) = max_{x' in B} f_T^y(x') - f_S^y(x')`` (both networks
  at the same x'); decoupled, it is ``ub f_T^y - lb f_S^y``; ``gap_upper_two_sided`` also bounds
  ``f_S^y - f_T^y`` (so it bounds ``max |gap|``);
- (eps, rho)-faithful certified: agreement certified and ``gap_upper <= rho``.

``joint=True`` adds a joint bound (robustkd's option; not known to be the paper's). One backward (CROWN)
pass through both networks from the *same* input box bounds ``D_j = m_S^j - m_T^j``: the two networks'
coefficients are summed at the input before the box is applied, so their common input dependence cancels
instead of being counted twice. ``specs.joint_gap_upper`` turns ``max_j D_j`` and the teacher's margin
interval into a gap bound, which, unlike the decoupled one, is not bounded below by the width of the
teacher's own confidence interval. Each network's ReLUs are still relaxed separately, so the joint bound is
not always the tighter one: every reported bound is the minimum of the decoupled and joint bounds, and
``m_S <= u_T + max D`` is used as a second certificate for the student's margins in the agreement check.
The joint pass reuses the verifier's hidden-layer bounds (IBP ones for ``ibp``, ``crown-ibp``, ``best``
and for auto_LiRPA verifiers, CROWN ones for ``crown``).
"""

from __future__ import annotations

import numbers
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from robustkd.attacks.threat import ThreatModel
from robustkd.certify._graph import build_graph
from robustkd.certify._propagate import BoundState
from robustkd.certify.bounds import Verifier, get_verifier, input_box
from robustkd.certify.specs import (
    certified_from_margins,
    confidence_interval,
    joint_gap_upper,
    margin_spec,
)
from robustkd.errors import ConfigError
from robustkd.runtime import progress_bar

DEFAULT_RHO = (0.05, 0.1, 0.2)


def _faithful_key(rho: float) -> str:
    return f"faithful@{rho:g}"


def _margins(
    verifier: Verifier, model: nn.Module, state: BoundState | None, x_lower: Tensor, x_upper: Tensor, C: Tensor
) -> tuple[Tensor, Tensor]:
    if state is not None and verifier.native:
        return verifier.spec_bounds(state, C)
    return verifier.bounds(model, x_lower, x_upper, C)


def joint_margin_difference(teacher: BoundState, student: BoundState, C: Tensor) -> tuple[Tensor, Tensor]:
    """Bounds on ``C @ z_S - C @ z_T`` at a shared input, from one backward pass through both networks."""
    S = C.shape[1]
    spec = torch.cat([C, -C], 1)
    A_s, bias_s = student.backward(student.graph.output, spec)
    with torch.no_grad():  # the teacher is a fixed reference: gradients, where wanted, reach the student only
        A_t, bias_t = teacher.backward(teacher.graph.output, -spec)
    if A_s is None or A_t is None:
        A0 = A_s if A_t is None else A_t
    else:
        A0 = A_s + A_t
    low = student.concretize(A0, bias_s + bias_t)
    return low[:, :S], -low[:, S:]


def joint_gap_bound(teacher: nn.Module, student: nn.Module, x: Tensor, y: Tensor, eps: float) -> Tensor:
    """``(B,)`` upper bounds on ``max_{x'} f_T^y(x') - f_S^y(x')`` over the ball from the joint bound alone.

    IBP hidden-layer bounds for both networks, one backward pass through both from the shared input box
    (:func:`joint_margin_difference`) and the teacher's IBP margin interval (:func:`specs.joint_gap_upper`).
    Differentiable in the student's parameters, for faithful training; the teacher is bounded under no_grad.
    ``x`` must lie in [0, 1] (not checked: training batches do by construction)."""
    x_lower, x_upper = input_box(x, eps, check_range=False)
    with torch.no_grad():
        t_state = BoundState(build_graph(teacher), x_lower, x_upper, "ibp")
        C = margin_spec(y, t_state.output[0].shape[1], dtype=x.dtype)
        l_t, u_t = t_state.ibp_spec(C)
    s_state = BoundState(build_graph(student), x_lower, x_upper, "ibp")
    _, d_upper = joint_margin_difference(t_state, s_state, C)
    return joint_gap_upper(l_t, u_t, d_upper)


@torch.no_grad()
def certify_pair(
    teacher: nn.Module,
    student: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float | Tensor,
    *,
    method: str = "ibp",
    joint: bool = False,
    rho: Sequence[float] = DEFAULT_RHO,
) -> dict[str, Tensor]:
    """Per-example certificates for a teacher-student pair on a batch (see the module docstring).

    Returns tensors of shape ``(B,)``: ``teacher_correct``, ``student_correct`` (clean), ``teacher_certified``,
    ``student_certified``, ``agreement_certified``, ``teacher_conf_lower/upper``, ``student_conf_lower/upper``,
    ``gap_upper``, ``gap_upper_two_sided``, ``faithful@<rho>`` for each rho, and with ``joint=True`` also
    ``gap_upper_decoupled`` and ``gap_upper_joint``. Both models must be in eval mode (BatchNorm).
    """
    verifier = get_verifier(method)
    x_lower, x_upper = input_box(x, eps)
    # Refuse unsupported models (and train-mode BatchNorm) before a forward pass could update BN statistics.
    graphs = (build_graph(teacher), build_graph(student))
    z_t, z_s = teacher(x), student(x)
    if z_t.shape != z_s.shape:
        raise ConfigError(f"teacher and student outputs differ in shape: {tuple(z_t.shape)} vs {tuple(z_s.shape)}")
    C = margin_spec(y, z_t.shape[1], dtype=x.dtype)
    states = (None, None)
    if verifier.native or joint:
        states = tuple(BoundState(g, x_lower, x_upper, verifier.intermediate) for g in graphs)
    l_t, u_t = _margins(verifier, teacher, states[0], x_lower, x_upper, C)
    l_s, u_s = _margins(verifier, student, states[1], x_lower, x_upper, C)

    out: dict[str, Tensor] = {
        "teacher_correct": z_t.argmax(1) == y,
        "student_correct": z_s.argmax(1) == y,
        "teacher_certified": certified_from_margins(u_t),
        "student_certified": certified_from_margins(u_s),
    }
    conf_t, conf_s = confidence_interval(l_t, u_t), confidence_interval(l_s, u_s)
    out["teacher_conf_lower"], out["teacher_conf_upper"] = conf_t
    out["student_conf_lower"], out["student_conf_upper"] = conf_s
    gap = conf_t[1] - conf_s[0]
    reverse = conf_s[1] - conf_t[0]
    student_ok = out["student_certified"]
    if joint:
        d_lower, d_upper = joint_margin_difference(states[0], states[1], C)  # D = m_S - m_T
        gap_joint = joint_gap_upper(l_t, u_t, d_upper)
        reverse_joint = joint_gap_upper(l_s, u_s, -d_lower)
        out["gap_upper_decoupled"], out["gap_upper_joint"] = gap, gap_joint
        gap, reverse = torch.minimum(gap, gap_joint), torch.minimum(reverse, reverse_joint)
        # m_S^j <= u_T^j + max D^j is a second sound bound on the student margins; it can certify agreement
        # where the direct bound misses.
        student_ok = student_ok | certified_from_margins(torch.minimum(u_s, u_t + d_upper))
    out["gap_upper"] = gap
    out["gap_upper_two_sided"] = torch.maximum(gap, reverse)
    out["agreement_certified"] = out["teacher_certified"] & student_ok
    for r in rho:
        out[_faithful_key(r)] = out["agreement_certified"] & (gap <= r)
    return out


@torch.no_grad()
def certify_model(model: nn.Module, x: Tensor, y: Tensor, eps: float | Tensor, *, method: str = "ibp") -> dict:
    """Per-example ``correct``, ``certified`` and ``conf_lower/upper`` for one network on a batch."""
    verifier = get_verifier(method)
    x_lower, x_upper = input_box(x, eps)
    build_graph(model)  # refuse unsupported models before the forward pass
    z = model(x)
    lower, upper = verifier.bounds(model, x_lower, x_upper, margin_spec(y, z.shape[1], dtype=x.dtype))
    conf_lower, conf_upper = confidence_interval(lower, upper)
    return {
        "correct": z.argmax(1) == y,
        "certified": certified_from_margins(upper),
        "conf_lower": conf_lower,
        "conf_upper": conf_upper,
    }


# ------------------------------------------------------------------------------------- dataset level
@contextmanager
def _eval_mode(*models: nn.Module):
    """Certificates are about the deployed (eval-mode) network; restore each model's mode afterwards."""
    modes = [[(m, m.training) for m in model.modules()] for model in models]
    try:
        for model in models:
            model.eval()
        yield
    finally:
        for entries in modes:
            for module, training in entries:
                module.training = training


def _stats(values: Tensor) -> dict[str, float | None]:
    keys = ("mean", "min", "q25", "median", "q75", "q90", "max")
    if values.numel() == 0:
        return dict.fromkeys(keys)
    v = values.double()
    q = torch.quantile(v, torch.tensor([0.25, 0.5, 0.75, 0.9], dtype=torch.float64))
    return dict(zip(keys, [v.mean().item(), v.min().item(), *q.tolist(), v.max().item()]))


def _rate(flags: Tensor) -> float | None:
    return flags.double().mean().item() if flags.numel() else None


def _subset_summary(r: dict[str, Tensor], mask: Tensor, n: int, rho: Sequence[float]) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "n": int(mask.sum()),
        "fraction_of_points": int(mask.sum()) / n if n else None,
        "teacher_certified": _rate(r["teacher_certified"][mask]),
        "student_certified": _rate(r["student_certified"][mask]),
        "agreement_certified": _rate(r["agreement_certified"][mask]),
        "faithful_certified": {f"{x:g}": _rate(r[_faithful_key(x)][mask]) for x in rho},
        "gap_upper": _stats(r["gap_upper"][mask]),
        "gap_upper_two_sided": _stats(r["gap_upper_two_sided"][mask]),
    }
    if "gap_upper_joint" in r:
        summary["gap_upper_decoupled"] = _stats(r["gap_upper_decoupled"][mask])
    return summary


def _model_device(model: nn.Module) -> torch.device:
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


def batch_starts(n: int, batch_size: int, progress: bool, description: str, first: int = 0) -> Iterator[int]:
    """The first index of each batch from ``first`` on, behind a transient progress bar when ``progress``."""
    with progress_bar(progress, transient=True) as bar:
        task = None if bar is None else bar.add_task(description, total=n, completed=first)
        for start in range(first, n, batch_size):
            yield start
            if bar is not None:
                bar.update(task, advance=min(batch_size, n - start))


def as_threat(eps: float | ThreatModel | str | Mapping[str, Any], field: str = "eps") -> ThreatModel:
    """The Linf ball a certificate is about: a ThreatModel, a preset name, a mapping, or a bare radius in [0, 1]."""
    if isinstance(eps, ThreatModel | str | Mapping):
        threat = ThreatModel.parse(dict(eps) if isinstance(eps, Mapping) else eps, field=field)
    elif isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not 0 <= eps <= 1:
        raise ConfigError(f"{field}: must be a number in [0, 1] (images live in [0, 1]), got {eps!r}")
    else:
        threat = ThreatModel("linf", float(eps))
    if threat.norm != "linf":
        raise ConfigError(f"{field}: certificates are over the Linf ball, got a {threat.norm} threat model")
    return threat


def certify(
    teacher: nn.Module | None,
    student: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float | Tensor | ThreatModel | str,
    method: str = "ibp",
    batch_size: int = 256,
    *,
    joint: bool = False,
    rho: Sequence[float] = DEFAULT_RHO,
    progress: bool = True,
    device: str | torch.device | None = None,
    per_example: bool = True,
) -> dict[str, Any]:
    """Certify a student against its teacher on a dataset; returns a JSON-able summary.

    ``x`` holds images in [0, 1] (float) or uint8 (divided by 255 per batch). ``eps`` is the ball: a
    :class:`~robustkd.attacks.ThreatModel` (Linf) or a preset name such as ``"linf-0.1"``, a bare radius
    (``ThreatModel("linf", eps)``), or a tensor of one radius per point. Both models are put in eval mode for
    the run (certificates are about the deployed network) and their modes restored afterwards; with ``device``
    they are moved there, else the data goes to the student's device. Rates are fractions in [0, 1]: clean and
    certified accuracy of each network over all points; and, on P (teacher-correct points) and on the
    both-correct subset, the share certified to agree and certified (eps, rho)-faithful per rho, with
    statistics of ``gap_upper``. ``teacher=None`` certifies the student alone (clean and certified accuracy).
    """
    verifier = get_verifier(method)  # fail on a bad name before any work
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if x.shape[0] != y.shape[0]:
        raise ConfigError(f"{x.shape[0]} inputs but {y.shape[0]} labels")
    if x.shape[0] == 0:
        raise ConfigError("no points to certify")
    radius = eps if torch.is_tensor(eps) else as_threat(eps).eps
    models = [m for m in (teacher, student) if m is not None]
    if device is not None:
        for m in models:
            m.to(device)
    target = torch.device(device) if device is not None else _model_device(student)
    eps_all = torch.as_tensor(radius, dtype=torch.float32)
    with _eval_mode(*models):
        r = _certify_batches(teacher, student, x, y, eps_all, method, batch_size, joint, rho, progress, target)
    eps_out = eps_all.tolist() if eps_all.dim() == 1 else float(eps_all)
    summary = summarize(
        r, pair=teacher is not None, backend=verifier.backend, eps=eps_out, method=method, joint=joint, rho=rho
    )
    if per_example:
        summary["per_example"] = {key: value.tolist() for key, value in r.items()}
    return summary


def _certify_batches(
    teacher: nn.Module | None,
    student: nn.Module,
    x: Tensor,
    y: Tensor,
    eps_all: Tensor,
    method: str,
    batch_size: int,
    joint: bool,
    rho: Sequence[float],
    progress: bool,
    target: torch.device,
) -> dict[str, Tensor]:
    """Per-example certificates of every point, batch by batch, on the CPU."""
    per_point_eps = eps_all.dim() == 1
    parts: dict[str, list[Tensor]] = {}
    for start in batch_starts(x.shape[0], batch_size, progress, f"certify ({method})"):
        xb = x[start : start + batch_size].to(target)
        xb = xb.float() / 255 if xb.dtype == torch.uint8 else xb
        yb = y[start : start + batch_size].to(target)
        eb = eps_all[start : start + batch_size].to(target) if per_point_eps else float(eps_all)
        if teacher is None:
            r = certify_model(student, xb, yb, eb, method=method)
        else:
            r = certify_pair(teacher, student, xb, yb, eb, method=method, joint=joint, rho=rho)
        for key, value in r.items():
            parts.setdefault(key, []).append(value.cpu())
    return {key: torch.cat(values) for key, values in parts.items()}


def summarize(
    r: dict[str, Tensor],
    *,
    pair: bool,
    backend: str,
    eps: float | list[float],
    method: str,
    joint: bool,
    rho: Sequence[float],
) -> dict[str, Any]:
    """The summary :func:`certify` returns, from its per-example results ``r`` (one tensor per key)."""
    n = len(next(iter(r.values())))
    summary: dict[str, Any] = {"method": method, "backend": backend, "eps": eps, "n": n}
    if not pair:
        summary.update(clean_accuracy=_rate(r["correct"]), certified_accuracy=_rate(r["certified"]))
        return summary
    summary.update(
        joint=joint,
        rho=[float(v) for v in rho],
        teacher={
            "clean_accuracy": _rate(r["teacher_correct"]),
            "certified_accuracy": _rate(r["teacher_certified"]),
        },
        student={
            "clean_accuracy": _rate(r["student_correct"]),
            "certified_accuracy": _rate(r["student_certified"]),
        },
        teacher_correct=_subset_summary(r, r["teacher_correct"], n, rho),
        both_correct=_subset_summary(r, r["teacher_correct"] & r["student_correct"], n, rho),
    )
    return summary


def certified_accuracy(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float | Tensor,
    method: str = "ibp",
    batch_size: int = 256,
    *,
    progress: bool = False,
    device: str | torch.device | None = None,
) -> float:
    """Fraction of points whose prediction is certified to be y on the whole ball."""
    summary = certify(None, model, x, y, eps, method, batch_size, progress=progress, device=device, per_example=False)
    return summary["certified_accuracy"]
