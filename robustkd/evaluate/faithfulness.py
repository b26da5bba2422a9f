"""Empirical faithfulness of a student to its teacher: robustkd's definitions, after Lamb et al. (2023).

The definitions are robustkd's own formalisation of the two questions of "Faithful Knowledge
Distillation" (Lamb, Bunel, Dvijotham, Kumar, Torr, Eiras, arXiv 2306.04431); see METHODS.md, section
"Faithful distillation and relative calibration". With logits z_T, z_S, soft confidences
f_T = softmax(z_T), f_S = softmax(z_S) and the ball B(x) = Ball(x, eps) ∩ [0, 1]^d (Linf by default):

- P = {(x, y) : argmax f_T(x) = y}, the teacher-correct points; the both-correct subset adds
  argmax f_S(x) = y. Rates are shares of P (and of the both-correct subset), never of all points.
- Disagreement: dis(x) = 1 iff some x' in B(x) has argmax f_S(x') != argmax f_T(x').
- Confidence gap at the same x', for the fixed label y: gap(x') = f_T^y(x') - f_S^y(x').
  One-sided (student under-confident): G_under(x) = max_{x' in B(x)} gap(x');
  over-confident: G_over(x) = max_B -gap(x'); two-sided: G(x) = max(G_under, G_over) = max_B |gap(x')|.
- (eps, rho)-faithful at (x, y): dis(x) = 0 and G_under(x) <= rho (``faithful``); with the two-sided G
  (``faithful_two_sided``).

Everything here comes from attacks, so every number is a **lower bound** on the true worst case: a found
disagreement is a witness x' in B(x), and each reported G is attained at a point of B(x). Certified upper
bounds are :mod:`robustkd.certify`'s job.

Searches, per point of P and per eps (PGD with a uniform random start, restarts, best iterate kept, both
networks in eval mode, gradients w.r.t. the input only):

- disagreement: ``student_flip`` ascends max_{j!=y} (z_S^j - z_S^y) - (z_T^j - z_T^y), ``teacher_flip``
  its mirror, ``mismatch`` ascends KL(f_T || f_S); each stops on a point as soon as the two argmaxes
  differ, and a point found by one search (or at the clean point, or at a smaller eps) is not searched
  again;
- gap, each direction: ascend the gap itself (``prob``) and the log-ratio surrogate
  ±(log f_T^y - log f_S^y) (``log``, whose gradient survives softmax saturation); every returned point is
  scored by the true gap and the best per point is kept, together with the clean gap.

Monotone by construction: balls are nested, so results at a larger eps include the witnesses found at the
smaller ones; each (eps, search, batch) draws its random starts from its own seeded stream and every search
sees the same batch, so more restarts only add starts and never lower a point's result. More steps at a fixed
``step_size`` extend each trajectory and never report less either; under the default rule 2.5 * eps / steps
the step size, hence every trajectory, changes with the steps: stronger in practice, not by construction.

Cost per point of P and per eps, with R restarts and S steps: each search runs at most R * S forward and
backward passes through both networks (disagreement searches stop early on a found point), plus one
scoring forward of both per restart and one re-scoring forward of both at the returned point.

:func:`evaluate_faithfulness` returns a JSON-able dict: ``settings``; ``clean`` (clean accuracy of each
network, the share of points where they agree, the size of P); ``results``, one block per eps with
``teacher_correct`` (P) and ``both_correct`` summaries (disagreement rate, faithful shares per rho, distributions
of G_under, G_over, two-sided G and the clean gap: mean, min, q50, q90, q99, max and the share above each rho)
and ``found_by`` (which search found each disagreement first); ``per_example`` (teacher/student correct and the
clean gap for every point; per eps, disagreement found, G_under and G_over, None outside P); ``warnings``;
``timing`` (seconds, the only non-deterministic entry).
"""

from __future__ import annotations

import hashlib
import math
import numbers
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustkd.attacks.checks import check_deterministic, check_output_is_logits
from robustkd.attacks.engine import attack_mode, perturb
from robustkd.attacks.objectives import ConfidenceGap, Disagreement, Mismatch, Objective
from robustkd.attacks.threat import ThreatModel
from robustkd.errors import ConfigError
from robustkd.evaluate.robustness import (
    SETTINGS_CHANGED,
    _recorded,
    _summary,
    check_run,
    recording_warnings,
)
from robustkd.evaluate.state import pack_tensor, settings_match, unpack_tensor
from robustkd.runtime import progress_bar

DISAGREEMENT_SEARCHES = ("student_flip", "teacher_flip", "mismatch")
GAP_SURROGATES = ("prob", "log")
DEFAULT_RHO = (0.05, 0.1, 0.2)
QUANTILES = (0.5, 0.9, 0.99)
STAGES = ("disagreement", "gap", "separate_confidence")
DEFINITIONS = "robustkd's definitions, after Lamb et al. (2023), arXiv 2306.04431"

# Called with (search, eps, index into x, clean inputs, searched points) for every point a search returns.
WitnessHook = Callable[[str, float, Tensor, Tensor, Tensor], None]


# ------------------------------------------------------------------------------------- objectives
@dataclass(frozen=True)
class _UntilDisagreement(Objective):
    """Ascend ``inner``; a point is done once argmax f_S(x') != argmax f_T(x'), or when already settled.

    ``reference[:, 0] > 0`` marks points settled before this search. They are frozen after one step instead
    of being left out of the batch, so every search sees the same batch and each point keeps the same
    random starts whatever the other points did (what makes more restarts never report less).
    """

    inner: Objective
    name: ClassVar[str] = "until_disagreement"
    needs_teacher: ClassVar[bool] = True
    needs_reference: ClassVar[bool] = True

    def value(self, logits, y, *, teacher_logits=None, reference=None):
        return self.inner.value(logits, y, teacher_logits=teacher_logits)

    def success(self, logits, y, *, teacher_logits=None, reference=None):
        return (logits.argmax(dim=-1) != teacher_logits.argmax(dim=-1)) | (reference[:, 0] > 0)


@dataclass(frozen=True)
class _LabelSurprise(Objective):
    """-log f^y(x') of one network, with no success criterion: a flipped point keeps being pushed down."""

    name: ClassVar[str] = "label_surprise"

    def value(self, logits, y, *, teacher_logits=None, reference=None):
        return F.cross_entropy(logits.float(), y, reduction="none")


def _disagreement_objective(search: str) -> Objective:
    inner = {
        "student_flip": Disagreement(flip="student"),
        "teacher_flip": Disagreement(flip="teacher"),
        "mismatch": Mismatch(),
    }[search]
    return _UntilDisagreement(inner)


# ------------------------------------------------------------------------------------- validation
def _check_names(field: str, values: Sequence[str], choices: tuple[str, ...]) -> tuple[str, ...]:
    if isinstance(values, str) or not isinstance(values, Sequence):
        raise ConfigError(f"{field}: expected a list drawn from {', '.join(choices)}, got {values!r}")
    bad = [v for v in values if v not in choices]
    if bad:
        raise ConfigError(f"{field}: unknown {', '.join(map(repr, bad))}; choose from {', '.join(choices)}")
    if len(set(values)) != len(values):
        raise ConfigError(f"{field}: a name is listed more than once in {list(values)}")
    return tuple(values)


def _check_rho(rho: float | Sequence[float]) -> tuple[float, ...]:
    values = [rho] if isinstance(rho, numbers.Real) else rho
    if isinstance(values, str) or not isinstance(values, Sequence):
        raise ConfigError(f"rho: expected a number or a list of numbers, got {rho!r}")
    out = []
    for r in values:
        if isinstance(r, bool) or not isinstance(r, numbers.Real) or not math.isfinite(r) or r < 0:
            raise ConfigError(f"rho: each threshold must be a finite number >= 0, got {r!r}")
        out.append(float(r))
    return tuple(out)


def threat_models(
    eps: float | Sequence[float], norm: str, steps: int, restarts: int, step_size: float | None
) -> list[ThreatModel]:
    """One threat model per radius, checked, in ascending order of eps."""
    values = [eps] if isinstance(eps, numbers.Real) else eps
    if isinstance(values, str) or not isinstance(values, Sequence):
        raise ConfigError(f"eps: expected a number or a list of numbers, got {eps!r}")
    if len(values) == 0:
        raise ConfigError("eps: empty; give at least one radius, e.g. 0.1")
    # ThreatModel validates each radius (eps >= 0, a number, step_size <= eps) with messages naming the field.
    threats = [ThreatModel(norm, e, step_size=step_size, steps=steps, restarts=restarts) for e in values]
    radii = [t.eps for t in threats]
    if len(set(radii)) != len(radii):
        raise ConfigError(f"eps: a radius is listed more than once in {radii}")
    # Ascending: each ball contains the previous ones, so its witnesses carry over.
    return sorted(threats, key=lambda t: t.eps)


def _check_pair(teacher: nn.Module, student: nn.Module) -> list[tuple[str, nn.Module]]:
    """Both must be modules; returns them named, the student first (its device is the default one)."""
    for name, model in (("teacher", teacher), ("student", student)):
        if not isinstance(model, nn.Module):
            raise ConfigError(f"{name}: expected an nn.Module, got {type(model).__name__}")
    return [("student", student), ("teacher", teacher)]


# ------------------------------------------------------------------------------------- summaries
def _share(flags: Tensor) -> dict[str, Any]:
    """Share of True with its binomial standard error sqrt(p (1 - p) / n); None on an empty set."""
    n, k = int(flags.numel()), int(flags.sum())
    if n == 0:
        return {"rate": None, "stderr": None, "count": 0, "total": 0}
    p = k / n
    return {"rate": p, "stderr": math.sqrt(p * (1 - p) / n), "count": k, "total": n}


def _distribution(values: Tensor, rho: tuple[float, ...]) -> dict[str, Any]:
    """Mean, min, quantiles (0.5, 0.9, 0.99), max, and the share above each rho."""
    keys = ["mean", "min", *(f"q{round(100 * q)}" for q in QUANTILES), "max"]
    above = {f"{r:g}": _share(values > r) for r in rho}
    if values.numel() == 0:
        return {**dict.fromkeys(keys), "above": above}
    v = values.double()
    qs = torch.quantile(v, torch.tensor(QUANTILES, dtype=torch.float64)).tolist()
    return {**dict(zip(keys, [v.mean().item(), v.min().item(), *qs, v.max().item()])), "above": above}


def _subset(mask: Tensor, n: int, r: dict[str, Tensor], rho: tuple[float, ...]) -> dict[str, Any]:
    dis, under, over, two = r["disagreement"][mask], r["gap_under"][mask], r["gap_over"][mask], r["gap"][mask]
    clean = r["gap_clean"][mask]
    return {
        "n": int(mask.sum()),
        "share_of_points": int(mask.sum()) / n,
        "disagreement": _share(dis),
        "faithful": {f"{x:g}": _share(~dis & (under <= x)) for x in rho},
        "faithful_two_sided": {f"{x:g}": _share(~dis & (two <= x)) for x in rho},
        "gap_under": _distribution(under, rho),
        "gap_over": _distribution(over, rho),
        "gap_two_sided": _distribution(two, rho),
        "gap_clean": _distribution(clean, rho),
        "gap_clean_two_sided": _distribution(clean.abs(), rho),
    }


def _separate_summary(mask: Tensor, r: dict[str, Tensor], rho: tuple[float, ...]) -> dict[str, Any]:
    t, s = r["teacher_min_conf"][mask], r["student_min_conf"][mask]
    return {
        "teacher_min_conf": _distribution(t, rho),
        "student_min_conf": _distribution(s, rho),
        "difference": _distribution(t - s, rho),
    }


def _per_example(values: Tensor, in_p: Tensor) -> list[Any]:
    return [v if keep else None for v, keep in zip(values.tolist(), in_p.tolist())]


def _generator(seed: int, eps: float, search: str, chunk: int) -> torch.Generator:
    # One stream per (eps, search, batch): a point's random starts depend neither on the other searches nor on
    # the other radii of a sweep, and the first R of R' > R restarts draw the same starts.
    digest = hashlib.sha256(f"{seed}/{eps!r}/{search}/{chunk}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def _label_conf(logits: Tensor, y: Tensor) -> Tensor:
    return F.softmax(logits.float(), dim=-1).gather(1, y[:, None]).squeeze(1)


# ------------------------------------------------------------------------------------- evaluation
def evaluate_faithfulness(
    teacher: nn.Module,
    student: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float | Sequence[float] = 0.1,
    steps: int = 50,
    restarts: int = 5,
    step_size: float | None = None,
    rho: float | Sequence[float] = DEFAULT_RHO,
    norm: str = "linf",
    disagreement_searches: Sequence[str] = DISAGREEMENT_SEARCHES,
    gap_surrogates: Sequence[str] = GAP_SURROGATES,
    separate_confidence: bool = False,
    batch_size: int = 256,
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: bool = True,
    dataset_size: int | None = None,
    checks: bool = True,
    witness_hook: WitnessHook | None = None,
    state: dict[str, Any] | None = None,
    on_batch: Callable[[dict[str, Any]], None] | None = None,
    save_every: int = 1,
) -> dict[str, Any]:
    """Empirical disagreement and confidence gaps of ``student`` against ``teacher`` on (x, y).

    Definitions and searches are in the module docstring (robustkd's definitions, after Lamb et al.). ``eps``
    is one radius or a sweep (reported in ascending order, one block each); ``step_size=None`` means
    2.5 * eps / steps for each radius. ``norm`` is ``"linf"`` (the default) or ``"l2"``.
    ``disagreement_searches`` (subset of student_flip, teacher_flip, mismatch) and ``gap_surrogates`` (subset of
    prob, log) choose the searches run; all by default. ``separate_confidence=True`` adds the second reading of
    relative calibration: min_B f_T^y and min_B f_S^y attacked separately (each network's own worst point) and
    their difference; attack estimates of each minimum, so the difference is no bound either way.
    ``rho`` are the thresholds for "share of P with G > rho" and for (eps, rho)-faithfulness.
    ``dataset_size``: size of the split x was drawn from, to record whether this is a subset. ``checks``: warn
    (and list under ``"warnings"``) when a network seems to output probabilities or to be randomised.
    ``witness_hook(search, eps, index, x, x_adv)`` sees every point a search returns (for tests and debugging).
    Deterministic given ``seed``.

    Resuming: ``on_batch(state)`` gets a JSON-able state every ``save_every`` batches and after each radius; given
    back as ``state`` (same settings, weights, data) it continues the run to the same result, per-example values
    included (the hook sees only the batches run again); other or damaged states are ignored with a warning.

    Returns a JSON-able dict; its entries are listed in the module docstring.
    """
    threats = threat_models(eps, norm, steps, restarts, step_size)
    rhos, dis_searches, surrogates = _check_lists(rho, disagreement_searches, gap_surrogates)
    run_device = check_run(_check_pair(teacher, student), x, y, batch_size, seed, device, dataset_size, save_every)
    run = _Run(teacher, student, x, y.long(), threats, rhos, dis_searches, surrogates, separate_confidence)
    run.configure(batch_size, seed, run_device, witness_hook, on_batch, save_every, checks)
    with recording_warnings() as caught, attack_mode(student, teacher, "eval"):
        run.caught = caught
        run.start(checks, state or {})
        with progress_bar(progress) as bar:
            for e, threat in enumerate(threats):
                run.radius(e, threat, bar)
    run.timing["total"] = run.before + time.perf_counter() - run.t_all
    return _faithfulness_result(run, step_size, dataset_size)


def _check_lists(
    rho: float | Sequence[float], disagreement_searches: Sequence[str], gap_surrogates: Sequence[str]
) -> tuple[tuple[float, ...], tuple[str, ...], tuple[str, ...]]:
    return (
        _check_rho(rho),
        _check_names("disagreement_searches", disagreement_searches, DISAGREEMENT_SEARCHES),
        _check_names("gap_surrogates", gap_surrogates, GAP_SURROGATES),
    )


@dataclass
class _Run:
    """One faithfulness evaluation: per-point running results over the radii, and what a resume needs."""

    teacher: nn.Module
    student: nn.Module
    x: Tensor
    y: Tensor
    threats: list[ThreatModel]
    rhos: tuple[float, ...]
    dis_searches: tuple[str, ...]
    surrogates: tuple[str, ...]
    separate: bool
    timing: dict[str, float] = field(default_factory=dict)
    blocks: list[dict[str, Any]] = field(default_factory=list)
    per_eps: list[dict[str, Any]] = field(default_factory=list)
    caught: list[warnings.WarningMessage] = field(default_factory=list)
    earlier_warnings: list[dict[str, str]] = field(default_factory=list)
    finished: list[dict[str, Any]] = field(default_factory=list)
    current: dict[str, Any] | None = None
    before: float = 0.0

    def configure(
        self,
        batch_size: int,
        seed: int,
        device: torch.device,
        hook: WitnessHook | None,
        on_batch: Callable[[dict[str, Any]], None] | None,
        save_every: int,
        checks: bool,
    ) -> None:
        self.batch_size, self.seed, self.device, self.hook = batch_size, seed, device, hook
        self.on_batch, self.save_every = on_batch, save_every
        self.settings = {
            "threats": [t.to_dict() for t in self.threats],
            "rho": list(self.rhos),
            "disagreement_searches": list(self.dis_searches),
            "gap_surrogates": list(self.surrogates),
            "separate_confidence": self.separate,
            "seed": seed,
            "batch_size": batch_size,
            "checks": checks,
            "device": device.type,  # kernels, and so borderline results, differ between devices
        }
        self.t_all = time.perf_counter()
        self.n_runs = len(self.dis_searches) + 2 * len(self.surrogates) + (2 if self.separate else 0)

    def start(self, checks: bool, saved: dict[str, Any]) -> None:
        """The clean pass, the running state it starts from, and what a saved state adds to it."""
        # The clean pass is cheap and deterministic: a resumed run does it again instead of saving it.
        start = time.perf_counter()
        self.clean = _clean_pass(self.teacher, self.student, self.x, self.y, self.batch_size, self.device, checks)
        self.timing["clean"] = time.perf_counter() - start
        clean = self.clean
        self.p_idx = clean["teacher_correct"].nonzero().flatten()
        self.state = {
            "disagreement": (clean["teacher_pred"] != clean["student_pred"]).clone(),
            "gap_under": clean["gap_clean"].clone(),
            "gap_over": -clean["gap_clean"],
        }
        if self.separate:
            self.state["teacher_min_conf"] = clean["teacher_conf"].clone()
            self.state["student_min_conf"] = clean["student_conf"].clone()
        self.n_chunks = -(-int(self.p_idx.numel()) // self.batch_size)
        found_keys = ["clean", "smaller_eps", *self.dis_searches]
        self._resume(saved, found_keys)

    def _resume(self, saved: dict[str, Any], found_keys: list[str]) -> None:
        if not saved:
            return
        if not settings_match(saved, self.settings):
            warnings.warn(SETTINGS_CHANGED, stacklevel=5)
            return
        restored = _restore(saved, self.state, len(self.threats), self.n_chunks, found_keys)
        if restored is not None:
            self.finished, self.current, self.before = restored
            self.earlier_warnings = [dict(e) for e in saved.get("warnings", []) if isinstance(e, dict)]

    def radius(self, e: int, threat: ThreatModel, bar: Any) -> None:
        """Search one radius (or take it whole from the saved state) and add its block to the result."""
        if e < len(self.finished):  # done before the interruption: its results at the end of that radius
            found_by, stage_time = self.finished[e]["found_by"], self.finished[e]["stage_time"]
            at_end = {key: _unpack(text, self.state[key]) for key, text in self.finished[e]["state"].items()}
        else:
            found_by, stage_time = self._search(threat, bar)
            at_end = {key: value.clone() for key, value in self.state.items()}
            self.finished.append({"state": _pack(at_end), "found_by": found_by, "stage_time": stage_time})
            self.hand_out(None, found_by, stage_time)
        for stage, seconds in stage_time.items():
            if stage != "separate_confidence" or self.separate:
                self.timing[f"{stage}@{threat.eps:g}"] = seconds
        self.blocks.append(_block(threat, self.clean, at_end, self.rhos, found_by, self.separate))
        self.per_eps.append(_per_eps_examples(threat, self.clean, at_end, self.separate))

    def _search(self, threat: ThreatModel, bar: Any) -> tuple[dict[str, int], dict[str, float]]:
        first = 0
        if self.current is not None:
            first, found_by, stage_time = self.current["chunk"], self.current["found_by"], self.current["stage_time"]
            self.current = None
        else:
            clean_disagreement = self.clean["teacher_pred"] != self.clean["student_pred"]
            at_clean = int(clean_disagreement[self.p_idx].sum())
            at_smaller = int(self.state["disagreement"][self.p_idx].sum()) - at_clean
            found_by = {"clean": at_clean, "smaller_eps": at_smaller, **dict.fromkeys(self.dis_searches, 0)}
            stage_time = dict.fromkeys(STAGES, 0.0)
        task = None
        if bar is not None:
            total = int(self.p_idx.numel())
            done = min(first * self.batch_size, total) * self.n_runs
            task = bar.add_task(f"eps={threat.eps:g}", total=total * self.n_runs, completed=done)
        for chunk in range(first, self.n_chunks):
            self._chunk(threat, chunk, found_by, stage_time, bar, task)
            if (chunk + 1 - first) % self.save_every == 0 and chunk + 1 < self.n_chunks:
                self.hand_out(chunk + 1, found_by, stage_time)
        return found_by, stage_time

    def _chunk(
        self, threat: ThreatModel, chunk: int, found_by: dict[str, int], stage_time: dict[str, float], bar, task
    ) -> None:
        # The chunk number seeds the batch's random starts: a resumed run keeps counting.
        idx = self.p_idx[chunk * self.batch_size : (chunk + 1) * self.batch_size]
        xb = self.x[idx.to(self.x.device)].to(self.device)
        yb = self.y[idx.to(self.y.device)].to(self.device)
        ctx = _Chunk(self.teacher, self.student, xb, yb, idx, threat, self.seed, chunk, self.hook, bar, task)
        start = time.perf_counter()
        for search in self.dis_searches:
            found_by[search] += ctx.disagreement(search, self.state)
        stage_time["disagreement"] += time.perf_counter() - start
        start = time.perf_counter()
        for direction in ("under", "over"):
            for surrogate in self.surrogates:
                ctx.gap(direction, surrogate, self.state)
        stage_time["gap"] += time.perf_counter() - start
        if self.separate:
            start = time.perf_counter()
            ctx.min_confidence(self.state)
            stage_time["separate_confidence"] += time.perf_counter() - start

    def recorded(self) -> list[dict[str, str]]:
        return _recorded(self.earlier_warnings, self.caught)

    def hand_out(self, chunk: int | None, found_by: dict[str, int], stage_time: dict[str, float]) -> None:
        """Hand the running results to ``on_batch``; ``chunk`` is the next batch of the radius, None past its end."""
        if self.on_batch is None:
            return
        at = None if chunk is None else {"chunk": chunk, "found_by": found_by, "stage_time": stage_time}
        self.on_batch(
            {
                "settings": self.settings,
                "finished": self.finished,
                "state": _pack(self.state),
                "current": at,
                "warnings": self.recorded(),
                "elapsed": self.before + time.perf_counter() - self.t_all,
            }
        )


def _faithfulness_result(run: _Run, step_size: float | None, dataset_size: int | None) -> dict[str, Any]:
    threats, clean, n = run.threats, run.clean, run.x.shape[0]
    return {
        "settings": {
            "definitions": DEFINITIONS,
            "norm": threats[0].norm,
            "eps": [t.eps for t in threats],
            "step_size": step_size,
            "alpha": [t.alpha for t in threats],
            "steps": threats[0].steps,
            "restarts": threats[0].restarts,
            "random_start": threats[0].random_start,
            "mode": "eval",
            "rho": list(run.rhos),
            "quantiles": list(QUANTILES),
            "disagreement_searches": list(run.dis_searches),
            "gap_surrogates": list(run.surrogates),
            "separate_confidence": run.separate,
            "seed": run.seed,
            "n": n,
            "dataset_size": dataset_size,
            "subset": None if dataset_size is None else n < dataset_size,
            "batch_size": run.batch_size,
            "device": str(run.device),
        },
        "clean": {
            "teacher": _summary(clean["teacher_correct"]),
            "student": _summary(clean["student_correct"]),
            "agreement": _share(clean["teacher_pred"] == clean["student_pred"]),
            "teacher_correct": int(clean["teacher_correct"].sum()),
            "both_correct": int((clean["teacher_correct"] & clean["student_correct"]).sum()),
        },
        "results": run.blocks,
        "per_example": {
            "teacher_correct": clean["teacher_correct"].tolist(),
            "student_correct": clean["student_correct"].tolist(),
            "gap_clean": clean["gap_clean"].tolist(),
            "eps": run.per_eps,
        },
        "warnings": run.recorded(),
        "timing": run.timing,
    }


def _pack(state: dict[str, Tensor]) -> dict[str, str]:
    return {key: pack_tensor(value) for key, value in state.items()}


def _unpack(text: str, like: Tensor) -> Tensor:
    return unpack_tensor(text, like.dtype, tuple(like.shape))


def _restore(
    saved: dict[str, Any], state: dict[str, Tensor], n_eps: int, n_chunks: int, found_keys: list[str]
) -> tuple[list[dict[str, Any]], dict[str, Any] | None, float] | None:
    """Check a saved state whole and load its running per-point results into ``state``.

    Returns the radii finished before the interruption (packed results at the end of each, found_by, stage
    times), where the next one stopped (None when it had not begun) and the seconds already spent; None, with a
    warning, for a damaged state.
    """
    try:
        finished = [_finished_entry(entry, state, found_keys) for entry in saved["finished"]]
        if len(finished) > n_eps:
            raise ValueError("more radii than asked for")
        current = saved["current"]
        if current is not None:
            chunk = current["chunk"]
            if len(finished) == n_eps or isinstance(chunk, bool) or not isinstance(chunk, int):
                raise ValueError("a batch past the last radius")
            if not 0 < chunk < n_chunks:
                raise ValueError(f"batch {chunk} of {n_chunks}")
            current = {"chunk": chunk, **_counts(current, found_keys)}
        running = _tensors(saved["state"], state)
        elapsed = float(saved["elapsed"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        warnings.warn(f"ignoring the saved progress: its contents are damaged ({err}); starting over", stacklevel=6)
        return None
    state.update(running)
    return finished, current, elapsed


def _counts(entry: dict[str, Any], found_keys: list[str]) -> dict[str, Any]:
    if set(entry["found_by"]) != set(found_keys) or set(entry["stage_time"]) != set(STAGES):
        raise ValueError("the searches differ")
    return {
        "found_by": {key: int(entry["found_by"][key]) for key in found_keys},
        "stage_time": {key: float(entry["stage_time"][key]) for key in STAGES},
    }


def _tensors(packed: dict[str, str], state: dict[str, Tensor]) -> dict[str, Tensor]:
    if set(packed) != set(state):
        raise ValueError("the per-point results differ")
    return {key: _unpack(packed[key], value) for key, value in state.items()}


def _finished_entry(entry: dict[str, Any], state: dict[str, Tensor], found_keys: list[str]) -> dict[str, Any]:
    _tensors(entry["state"], state)
    return {"state": dict(entry["state"]), **_counts(entry, found_keys)}


def _clean_pass(
    teacher: nn.Module, student: nn.Module, x: Tensor, y: Tensor, batch_size: int, device: torch.device, checks: bool
) -> dict[str, Tensor]:
    """Both networks at the clean points: predictions, label confidences and the clean gap, on the CPU."""
    parts: dict[str, list[Tensor]] = {}
    with torch.no_grad():
        for begin in range(0, x.shape[0], batch_size):
            xb, yb = x[begin : begin + batch_size].to(device), y[begin : begin + batch_size].to(device)
            z_t, z_s = teacher(xb), student(xb)
            if begin == 0:
                _check_outputs(teacher, student, z_t, z_s, xb, checks)
            k = z_t.shape[1]
            if bool((yb < 0).any()) or bool((yb >= k).any()):
                raise ConfigError(f"y: labels must lie in [0, {k}) for {k}-class networks")
            f_t, f_s = _label_conf(z_t, yb), _label_conf(z_s, yb)
            for key, value in (
                ("teacher_pred", z_t.argmax(dim=-1)),
                ("student_pred", z_s.argmax(dim=-1)),
                ("teacher_conf", f_t),
                ("student_conf", f_s),
                ("gap_clean", f_t - f_s),
            ):
                parts.setdefault(key, []).append(value.cpu())
    out = {key: torch.cat(values) for key, values in parts.items()}
    out["teacher_correct"] = out["teacher_pred"] == y.cpu()
    out["student_correct"] = out["student_pred"] == y.cpu()
    return out


def _check_outputs(teacher: nn.Module, student: nn.Module, z_t: Tensor, z_s: Tensor, xb: Tensor, checks: bool) -> None:
    """On the first batch: logits over the same classes from both, and AutoAttack-style sanity checks."""
    if z_t.dim() != 2 or z_t.shape != z_s.shape:
        raise ConfigError(
            f"student: outputs of shape {tuple(z_s.shape[1:])} but the teacher's are "
            f"{tuple(z_t.shape[1:])}; both must give logits over the same classes"
        )
    if checks:
        for net, z in ((teacher, z_t), (student, z_s)):
            check_output_is_logits(z)
            check_deterministic(net, xb)


@dataclass
class _Chunk:
    """One batch of P at one radius: runs each search and folds its returned points into the per-point state."""

    teacher: nn.Module
    student: nn.Module
    x: Tensor
    y: Tensor
    idx: Tensor
    threat: ThreatModel
    seed: int
    chunk: int
    hook: WitnessHook | None
    bar: Any
    task: Any

    def _advance(self) -> None:
        if self.bar is not None:
            self.bar.advance(self.task, int(self.idx.numel()))

    def _witness(self, search: str, keep: Tensor, x_adv: Tensor) -> None:
        if self.hook is not None and bool(keep.any()):
            keep_cpu = keep.cpu()
            self.hook(search, self.threat.eps, self.idx[keep_cpu], self.x[keep], x_adv[keep])

    def _perturb(self, model: nn.Module, objective: Objective, search: str, **kwargs: Any) -> Tensor:
        generator = _generator(self.seed, self.threat.eps, search, self.chunk)
        return perturb(model, self.x, self.y, self.threat, objective, generator=generator, mode="eval", **kwargs).x_adv

    def disagreement(self, search: str, state: dict[str, Tensor]) -> int:
        """Run one disagreement search; returns how many points it found that nothing had found before."""
        settled = state["disagreement"][self.idx]
        self._advance()
        if self.threat.eps == 0 or bool(settled.all()):
            return 0
        flags = settled.to(self.x.device, torch.float32)[:, None]
        x_adv = self._perturb(
            self.student, _disagreement_objective(search), search, teacher=self.teacher, reference=flags
        )
        # The found flag comes from a fresh forward at the returned point, so it always matches the witness.
        with torch.no_grad():
            differ = (self.student(x_adv).argmax(dim=-1) != self.teacher(x_adv).argmax(dim=-1)).cpu()
        self._witness(search, ~settled.to(self.x.device), x_adv)
        new = differ & ~settled
        state["disagreement"][self.idx] = settled | new
        return int(new.sum())

    def gap(self, direction: str, surrogate: str, state: dict[str, Tensor]) -> None:
        """One gap search; keep max(previous best, true gap at the returned point) per point."""
        self._advance()
        if self.threat.eps == 0:
            return
        search = f"gap_{direction}_{surrogate}"
        objective = ConfidenceGap(direction=direction, log_space=surrogate == "log")
        x_adv = self._perturb(self.student, objective, search, teacher=self.teacher, early_stop=False)
        with torch.no_grad():
            gap = (_label_conf(self.teacher(x_adv), self.y) - _label_conf(self.student(x_adv), self.y)).cpu()
        self._witness(search, torch.ones_like(self.y, dtype=torch.bool), x_adv)
        key = f"gap_{direction}"
        value = gap if direction == "under" else -gap
        state[key][self.idx] = torch.maximum(state[key][self.idx], value)

    def min_confidence(self, state: dict[str, Tensor]) -> None:
        """min_B f^y for each network on its own (the separate reading of relative calibration)."""
        for name, model in (("teacher", self.teacher), ("student", self.student)):
            self._advance()
            if self.threat.eps == 0:
                continue
            search = f"{name}_min_conf"
            # One stream for both networks: the same random starts, so identical networks give identical minima.
            x_adv = self._perturb(model, _LabelSurprise(), "min_conf", early_stop=False)
            with torch.no_grad():
                conf = _label_conf(model(x_adv), self.y).cpu()
            self._witness(search, torch.ones_like(self.y, dtype=torch.bool), x_adv)
            state[search][self.idx] = torch.minimum(state[search][self.idx], conf)


def _results(state: dict[str, Tensor], clean: dict[str, Tensor]) -> dict[str, Tensor]:
    r = {key: value.clone() for key, value in state.items()}
    r["gap"] = torch.maximum(r["gap_under"], r["gap_over"])
    r["gap_clean"] = clean["gap_clean"]
    return r


def _block(
    threat: ThreatModel,
    clean: dict[str, Tensor],
    state: dict[str, Tensor],
    rho: tuple[float, ...],
    found_by: dict[str, int],
    separate: bool,
) -> dict[str, Any]:
    r = _results(state, clean)
    n = r["gap"].numel()
    in_p = clean["teacher_correct"]
    both = in_p & clean["student_correct"]
    block = {
        "eps": threat.eps,
        "alpha": threat.alpha,
        "teacher_correct": _subset(in_p, n, r, rho),
        "both_correct": _subset(both, n, r, rho),
        "found_by": found_by,
    }
    if separate:
        block["teacher_correct"]["separate_confidence"] = _separate_summary(in_p, r, rho)
        block["both_correct"]["separate_confidence"] = _separate_summary(both, r, rho)
    return block


def _per_eps_examples(
    threat: ThreatModel, clean: dict[str, Tensor], state: dict[str, Tensor], separate: bool
) -> dict[str, Any]:
    in_p = clean["teacher_correct"]
    keys = ["disagreement", "gap_under", "gap_over"] + (["teacher_min_conf", "student_min_conf"] if separate else [])
    return {"eps": threat.eps, **{key: _per_example(state[key], in_p) for key in keys}}
