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
"""

from __future__ import annotations

import hashlib
import math
import numbers
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustkd.attacks.checks import check_deterministic, check_output_is_logits
from robustkd.attacks.engine import attack_mode, perturb
from robustkd.attacks.objectives import ConfidenceGap, Disagreement, Mismatch, Objective
from robustkd.attacks.threat import ThreatModel
from robustkd.errors import ConfigError
from robustkd.evaluate.progress import ProgressFile, fingerprint, model_tensors, pack_tensor, unpack_tensor
from robustkd.evaluate.robustness import _model_device, _progress, _recorded, _summary, check_data

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


def _threats(
    eps: float | Sequence[float], norm: str, steps: int, restarts: int, step_size: float | None
) -> list[ThreatModel]:
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


def _check_pair(teacher: nn.Module, student: nn.Module) -> None:
    for field, model in (("teacher", teacher), ("student", student)):
        if not isinstance(model, nn.Module):
            raise ConfigError(f"{field}: expected an nn.Module, got {type(model).__name__}")


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
    progress_file: str | Path | None = None,
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

    ``progress_file``: where to save the per-point results so far atomically every ``save_every`` batches. A run
    killed part-way and started again with the same settings, weights and data continues from that file (the
    hook sees only the batches run again) and gives the same result, per-example values included, as an
    uninterrupted one; a file saved for anything else, or damaged, is ignored with a warning. The caller
    removes it once the result is kept.

    Returns a JSON-able dict: ``settings``; ``clean`` (clean accuracy of each network, the share of points where
    they agree, the size of P); ``results``, one block per eps with ``teacher_correct`` (P) and ``both_correct``
    summaries (disagreement rate, faithful shares per rho, distributions of G_under, G_over, two-sided G and the
    clean gap: mean, min, q50, q90, q99, max and the share above each rho) and ``found_by`` (which search found
    each disagreement first); ``per_example`` (teacher/student correct and the clean gap for every point; per eps,
    disagreement found, G_under and G_over, None outside P); ``warnings``; ``timing`` (seconds, the only
    non-deterministic entry).
    """
    _check_pair(teacher, student)
    check_data(x, y)
    threats = _threats(eps, norm, steps, restarts, step_size)
    rhos = _check_rho(rho)
    dis_searches = _check_names("disagreement_searches", disagreement_searches, DISAGREEMENT_SEARCHES)
    surrogates = _check_names("gap_surrogates", gap_surrogates, GAP_SURROGATES)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size: must be an integer >= 1, got {batch_size!r}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigError(f"seed: expected an integer, got {seed!r}")
    if dataset_size is not None and (
        isinstance(dataset_size, bool) or not isinstance(dataset_size, int) or dataset_size < x.shape[0]
    ):
        raise ConfigError(f"dataset_size: must be an integer >= the {x.shape[0]} points given, got {dataset_size!r}")
    teacher_device, student_device = _model_device(teacher), _model_device(student)
    run_device = torch.device(device) if device is not None else (student_device or teacher_device or x.device)
    for field, model_device in (("teacher", teacher_device), ("student", student_device)):
        if model_device is not None and model_device.type != run_device.type:
            raise ConfigError(f"device: the {field} is on {model_device} but device={run_device}; move it first")
    if isinstance(save_every, bool) or not isinstance(save_every, int) or save_every < 1:
        raise ConfigError(f"save_every: must be an integer >= 1, got {save_every!r}")

    n = x.shape[0]
    y = y.long()
    settings = {
        "threats": [t.to_dict() for t in threats],
        "rho": list(rhos),
        "disagreement_searches": list(dis_searches),
        "gap_surrogates": list(surrogates),
        "separate_confidence": separate_confidence,
        "seed": seed,
        "batch_size": batch_size,
        "checks": checks,
        "device": run_device.type,  # kernels, and so borderline results, differ between devices
    }
    saved = _open_progress(progress_file, settings, teacher, student, x, y)
    timing: dict[str, float] = {}
    t_all = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with attack_mode(student, teacher, "eval"):
            # The clean pass is cheap and deterministic: a resumed run does it again instead of saving it.
            start = time.perf_counter()
            clean = _clean_pass(teacher, student, x, y, batch_size, run_device, checks)
            timing["clean"] = time.perf_counter() - start
            p_idx = clean["teacher_correct"].nonzero().flatten()
            clean_disagreement = clean["teacher_pred"] != clean["student_pred"]
            state = {
                "disagreement": clean_disagreement.clone(),
                "gap_under": clean["gap_clean"].clone(),
                "gap_over": -clean["gap_clean"],
            }
            if separate_confidence:
                state["teacher_min_conf"] = clean["teacher_conf"].clone()
                state["student_min_conf"] = clean["student_conf"].clone()
            n_chunks = -(-int(p_idx.numel()) // batch_size)
            found_keys = ["clean", "smaller_eps", *dis_searches]
            finished, current, before = _restore(saved, state, len(threats), n_chunks, found_keys)

            def save(chunk: int | None, found_by: dict[str, int], stage_time: dict[str, float]) -> None:
                """Save the running results; ``chunk`` is the next batch of the current radius, None past its end."""
                if saved.path is None:
                    return
                at = None if chunk is None else {"chunk": chunk, "found_by": found_by, "stage_time": stage_time}
                saved.save(
                    {
                        "finished": finished,
                        "state": _pack(state),
                        "current": at,
                        "warnings": _recorded(saved.state.get("warnings", []), caught),
                        "elapsed": before + time.perf_counter() - t_all,
                    }
                )

            blocks: list[dict[str, Any]] = []
            per_eps: list[dict[str, Any]] = []
            n_runs = len(dis_searches) + 2 * len(surrogates) + (2 if separate_confidence else 0)
            with _progress(progress) as bar:
                for e, threat in enumerate(threats):
                    if e < len(finished):  # done before the interruption: its results at the end of that radius
                        found_by, stage_time = finished[e]["found_by"], finished[e]["stage_time"]
                        at_end = {key: _unpack(text, state[key]) for key, text in finished[e]["state"].items()}
                    else:
                        first = 0
                        if current is not None:
                            first, found_by, stage_time = current["chunk"], current["found_by"], current["stage_time"]
                            current = None
                        else:
                            at_clean = int(clean_disagreement[p_idx].sum())
                            at_smaller = int(state["disagreement"][p_idx].sum()) - at_clean
                            found_by = {"clean": at_clean, "smaller_eps": at_smaller, **dict.fromkeys(dis_searches, 0)}
                            stage_time = dict.fromkeys(STAGES, 0.0)
                        task = None
                        if bar is not None:
                            total = int(p_idx.numel())
                            done = min(first * batch_size, total) * n_runs
                            task = bar.add_task(f"eps={threat.eps:g}", total=total * n_runs, completed=done)
                        for chunk in range(first, n_chunks):
                            # The chunk number seeds the batch's random starts: a resumed run keeps counting.
                            idx = p_idx[chunk * batch_size : (chunk + 1) * batch_size]
                            xb = x[idx.to(x.device)].to(run_device)
                            yb = y[idx.to(y.device)].to(run_device)
                            ctx = _Chunk(teacher, student, xb, yb, idx, threat, seed, chunk, witness_hook, bar, task)
                            start = time.perf_counter()
                            for search in dis_searches:
                                found_by[search] += ctx.disagreement(search, state)
                            stage_time["disagreement"] += time.perf_counter() - start
                            start = time.perf_counter()
                            for direction in ("under", "over"):
                                for surrogate in surrogates:
                                    ctx.gap(direction, surrogate, state)
                            stage_time["gap"] += time.perf_counter() - start
                            if separate_confidence:
                                start = time.perf_counter()
                                ctx.min_confidence(state)
                                stage_time["separate_confidence"] += time.perf_counter() - start
                            if (chunk + 1 - first) % save_every == 0 and chunk + 1 < n_chunks:
                                save(chunk + 1, found_by, stage_time)
                        at_end = {key: value.clone() for key, value in state.items()}
                        finished.append({"state": _pack(at_end), "found_by": found_by, "stage_time": stage_time})
                        save(None, found_by, stage_time)
                    for stage, seconds in stage_time.items():
                        if stage != "separate_confidence" or separate_confidence:
                            timing[f"{stage}@{threat.eps:g}"] = seconds
                    blocks.append(_block(threat, clean, at_end, rhos, found_by, separate_confidence))
                    per_eps.append(_per_eps_examples(threat, clean, at_end, separate_confidence))
    for w in caught:  # the caller sees every warning too, not only the report
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    recorded = _recorded(saved.state.get("warnings", []), caught)
    timing["total"] = before + time.perf_counter() - t_all

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
            "rho": list(rhos),
            "quantiles": list(QUANTILES),
            "disagreement_searches": list(dis_searches),
            "gap_surrogates": list(surrogates),
            "separate_confidence": separate_confidence,
            "seed": seed,
            "n": n,
            "dataset_size": dataset_size,
            "subset": None if dataset_size is None else n < dataset_size,
            "batch_size": batch_size,
            "device": str(run_device),
        },
        "clean": {
            "teacher": _summary(clean["teacher_correct"]),
            "student": _summary(clean["student_correct"]),
            "agreement": _share(clean["teacher_pred"] == clean["student_pred"]),
            "teacher_correct": int(clean["teacher_correct"].sum()),
            "both_correct": int((clean["teacher_correct"] & clean["student_correct"]).sum()),
        },
        "results": blocks,
        "per_example": {
            "teacher_correct": clean["teacher_correct"].tolist(),
            "student_correct": clean["student_correct"].tolist(),
            "gap_clean": clean["gap_clean"].tolist(),
            "eps": per_eps,
        },
        "warnings": recorded,
        "timing": timing,
    }


def _open_progress(
    path: str | Path | None, settings: dict[str, Any], teacher: nn.Module, student: nn.Module, x: Tensor, y: Tensor
) -> ProgressFile:
    if path is None:
        return ProgressFile(None, "")
    tensors = [*model_tensors("teacher", teacher), *model_tensors("student", student), ("x", x), ("y", y)]
    return ProgressFile(path, fingerprint({"what": "faithfulness", **settings}, tensors))


def _pack(state: dict[str, Tensor]) -> dict[str, str]:
    return {key: pack_tensor(value) for key, value in state.items()}


def _unpack(text: str, like: Tensor) -> Tensor:
    return unpack_tensor(text, like.dtype, tuple(like.shape))


def _restore(
    saved: ProgressFile, state: dict[str, Tensor], n_eps: int, n_chunks: int, found_keys: list[str]
) -> tuple[list[dict[str, Any]], dict[str, Any] | None, float]:
    """Check the saved progress whole and load its running per-point results into ``state``.

    Returns the radii finished before the interruption (packed results at the end of each, found_by, stage
    times), where the next one stopped (None when it had not begun) and the seconds already spent. Damaged
    progress is dropped with a warning.
    """
    if not saved.state:
        return [], None, 0.0

    def counts(entry: dict[str, Any]) -> dict[str, Any]:
        if set(entry["found_by"]) != set(found_keys) or set(entry["stage_time"]) != set(STAGES):
            raise ValueError("the searches differ")
        return {
            "found_by": {key: int(entry["found_by"][key]) for key in found_keys},
            "stage_time": {key: float(entry["stage_time"][key]) for key in STAGES},
        }

    def tensors(packed: dict[str, str]) -> dict[str, Tensor]:
        if set(packed) != set(state):
            raise ValueError("the per-point results differ")
        return {key: _unpack(packed[key], value) for key, value in state.items()}

    try:
        finished = []
        if len(saved.state["finished"]) > n_eps:
            raise ValueError("more radii than asked for")
        for entry in saved.state["finished"]:
            tensors(entry["state"])
            finished.append({"state": dict(entry["state"]), **counts(entry)})
        current = saved.state["current"]
        if current is not None:
            chunk = current["chunk"]
            if len(finished) == n_eps or isinstance(chunk, bool) or not isinstance(chunk, int):
                raise ValueError("a batch past the last radius")
            if not 0 < chunk < n_chunks:
                raise ValueError(f"batch {chunk} of {n_chunks}")
            current = {"chunk": chunk, **counts(current)}
        running = tensors(saved.state["state"])
        elapsed = float(saved.state["elapsed"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        warnings.warn(f"ignoring {saved.path}: its contents are damaged ({err}); starting over", stacklevel=3)
        saved.discard()
        return [], None, 0.0
    state.update(running)
    return finished, current, elapsed


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
                if z_t.dim() != 2 or z_t.shape != z_s.shape:
                    raise ConfigError(
                        f"student: outputs of shape {tuple(z_s.shape[1:])} but the teacher's are "
                        f"{tuple(z_t.shape[1:])}; both must give logits over the same classes"
                    )
                if checks:
                    for net, z in ((teacher, z_t), (student, z_s)):
                        check_output_is_logits(z)
                        check_deterministic(net, xb)
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


# ------------------------------------------------------------------------------------- checkpoints
def evaluate_faithfulness_checkpoints(
    teacher_path: str | Path,
    student_path: str | Path,
    *,
    eps: float | Sequence[float] = 0.1,
    n_examples: int | None = None,
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
    device: str = "auto",
    data_root: str | None = None,
    dataset: str | None = None,
    out: str | Path | None = None,
    progress: bool = True,
    resume: bool = True,
) -> dict[str, Any]:
    """Faithfulness of a saved student to a saved teacher on the student's test split.

    The JSON goes next to the student (``faithful_<stem>_<norm>-<eps>.json``) unless ``out`` says otherwise.
    ``dataset`` overrides the dataset named in the checkpoints (needed for foreign ``.pt`` files).
    Per-point results are saved beside the output (``<out>.progress.json``) after every batch; with ``resume``
    a killed run started again with the same arguments continues from them and gives the same result. The file
    is removed once the result is written.
    """
    from robustkd.checkpoint import load_model, resolve
    from robustkd.evaluate import checkpoint_eval
    from robustkd.io import atomic_write_json
    from robustkd.runtime import resolve_device

    threats = _threats(eps, norm, steps, restarts, step_size)  # nonsense fails before any loading
    dev = resolve_device(device)
    teacher = load_model(teacher_path, device=dev)
    student = load_model(student_path, device=dev)
    meta_t = dict(getattr(teacher, "robustkd_meta", {}))
    meta_s = dict(getattr(student, "robustkd_meta", {}))
    if dataset is not None:
        meta_s["dataset"] = dataset
    elif "dataset" in meta_t and "dataset" in meta_s and meta_t["dataset"] != meta_s["dataset"]:
        raise ConfigError(
            f"dataset: the teacher was trained on {meta_t['dataset']!r} but the student on {meta_s['dataset']!r}; "
            "pass --dataset to choose the test split"
        )
    elif "dataset" not in meta_s and "dataset" in meta_t:
        meta_s["dataset"] = meta_t["dataset"]
    x, y, n_total, source = checkpoint_eval.load_test_points(meta_s, n_examples, data_root)

    def weights_path(path: str | Path) -> Path:
        # Foreign state dicts are single files; robustkd checkpoints resolve to their .safetensors.
        return Path(path) if Path(path).suffix in (".pt", ".pth", ".bin", ".ckpt") else resolve(path)

    if out is None:
        weights = weights_path(student_path)
        radii = "_".join(f"{t.eps:g}" for t in threats)
        out = weights.with_name(f"faithful_{weights.stem}_{threats[0].norm}-{radii}.json")
    saved = checkpoint_eval.progress_path(out)
    if not resume:
        saved.unlink(missing_ok=True)
    result = evaluate_faithfulness(
        teacher,
        student,
        x.to(dev),
        y.to(dev),
        eps=eps,
        steps=steps,
        restarts=restarts,
        step_size=step_size,
        rho=rho,
        norm=norm,
        disagreement_searches=disagreement_searches,
        gap_surrogates=gap_surrogates,
        separate_confidence=separate_confidence,
        batch_size=batch_size,
        seed=seed,
        device=dev,
        progress=progress,
        dataset_size=n_total,
        progress_file=saved,
    )
    paths = {"teacher": (teacher_path, meta_t), "student": (student_path, meta_s)}
    result["models"] = {
        name: {"path": str(weights_path(path)), "arch": meta.get("arch"), "method": meta.get("method")}
        for name, (path, meta) in paths.items()
    }
    result["data"] = {"dataset": meta_s.get("dataset"), "source": source, "split": "test"}
    atomic_write_json(out, result)
    saved.unlink(missing_ok=True)
    result["output"] = str(out)
    return result
