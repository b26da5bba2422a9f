"""The verdict: may a student replace its teacher at the stated eps, and if not, which check fails."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from robustkd.report.settings import Thresholds

# (threshold field, label, how the value is obtained, rule): "<=" values must not exceed the threshold.
CHECKS = (
    ("max_clean_drop", "clean accuracy drop", "teacher clean accuracy - student clean accuracy", "<="),
    ("max_robust_drop", "robust accuracy drop", "teacher - student worst-case accuracy over the attacks", "<="),
    ("max_disagreement", "empirical disagreement", "share of teacher-correct points with a disagreement", "<="),
    ("max_gap", "empirical gap q90", "90th percentile of the empirical gap G_under on teacher-correct points", "<="),
    ("min_certified_agreement", "certified agreement", "share of teacher-correct points certified to agree", ">="),
    ("max_certified_gap", "certified gap bound q90", "90th percentile of the certified bound on G_under", "<="),
)


def _drop(teacher: float | None, student: float | None) -> float | None:
    return None if teacher is None or student is None else teacher - student


def check_values(student: Mapping[str, Any], teacher: Mapping[str, Any]) -> dict[str, float | None]:
    """The value each check compares, from a student's and its teacher's table rows."""
    return {
        "max_clean_drop": _drop(teacher.get("clean"), student.get("clean")),
        "max_robust_drop": _drop(teacher.get("robust"), student.get("robust")),
        "max_disagreement": student.get("disagreement"),
        "max_gap": (student.get("gap") or {}).get("q90"),
        "min_certified_agreement": student.get("certified_agreement"),
        "max_certified_gap": (student.get("certified_gap") or {}).get("q90"),
    }


def verdict(
    student: Mapping[str, Any], teacher: Mapping[str, Any], thresholds: Thresholds, eps: float
) -> dict[str, Any]:
    """``{"safe", "text", "checks", "failed"}`` for one student row against its teacher's row.

    Every check whose threshold is set must pass; a set check whose value was not measured fails (a
    report cannot call a student safe on a number it does not have).
    """
    values = check_values(student, teacher)
    checks, failed = [], []
    for field, label, meaning, rule in CHECKS:
        threshold = getattr(thresholds, field)
        if threshold is None:
            continue
        value = values[field]
        if value is None:
            passed, reason = False, f"{label} not measured (threshold {threshold:g})"
        else:
            # A hair of slack so a drop computed as 0.9 - 0.88 is not failed by float rounding.
            passed = value <= threshold + 1e-12 if rule == "<=" else value >= threshold - 1e-12
            shown = ">" if rule == "<=" else "<"
            reason = f"{label} {value:.4f} {shown} {threshold:g}"
        entry = {
            "check": field,
            "label": label,
            "meaning": meaning,
            "rule": rule,
            "value": value,
            "threshold": threshold,
            "passed": passed,
        }
        checks.append(entry)
        if not passed:
            failed.append(reason)
    safe = not failed
    where = f"Linf eps {eps:g}"
    if safe:
        text = f"safe to deploy in the teacher's place at {where}" + ("" if checks else " (no check was set)")
    else:
        text = f"not safe at {where}: " + "; ".join(failed)
    return {"safe": safe, "text": text, "checks": checks, "failed": failed}
