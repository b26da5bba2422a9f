"""Which student to ship: the students ranked by their verdicts, and the nearest miss named.

The rule (also printed in the report and in docs/report.md):

1. safe students first;
2. then fewer failed checks;
3. then a smaller total relative excess over the thresholds of the failed checks: for a ``<=`` check
   ``(value - threshold) / threshold``, for a ``>=`` check ``(threshold - value) / threshold``, the
   threshold floored at 0.01 so a zero threshold does not divide by zero; a check that could not be
   measured counts as an excess of 1 (100 %);
4. then a higher worst-case (robust) accuracy at the stated eps;
5. then the name, so the order never depends on the order of the runs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

RULE = (
    "safe students first; then fewer failed checks; then a smaller total relative excess over the thresholds "
    "of the failed checks ((value - threshold) / threshold, the threshold floored at 0.01; a check not "
    "measured counts 1); then a higher robust accuracy; then the name"
)
THRESHOLD_FLOOR = 0.01
NOT_MEASURED_EXCESS = 1.0


def excess(check: Mapping[str, Any]) -> float:
    """How far a failed check misses its threshold, as a fraction of the threshold (0 for a passed one)."""
    if check["passed"]:
        return 0.0
    if check["value"] is None:
        return NOT_MEASURED_EXCESS
    over = check["value"] - check["threshold"] if check["rule"] == "<=" else check["threshold"] - check["value"]
    return max(over, 0.0) / max(check["threshold"], THRESHOLD_FLOOR)


def _entry(row: Mapping[str, Any]) -> dict[str, Any]:
    checks = row["verdict"]["checks"]
    failed = [c for c in checks if not c["passed"]]
    return {
        "name": row["name"],
        "teacher": row["teacher"],
        "safe": row["verdict"]["safe"],
        "failed_checks": len(failed),
        "relative_excess": sum(excess(c) for c in failed),
        "robust": row.get("robust"),
        "misses": [miss_text(c) for c in failed],
    }


def rank_students(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The student rows (with their verdicts) in the order of :data:`RULE`, each with its rank from 1."""
    entries = [_entry(row) for row in rows if row["role"] == "student"]
    entries.sort(
        key=lambda e: (
            not e["safe"],
            e["failed_checks"],
            e["relative_excess"],
            -(e["robust"] if e["robust"] is not None else -1.0),
            e["name"],
        )
    )
    for rank, entry in enumerate(entries, 1):
        entry["rank"] = rank
    return entries


def miss_text(check: Mapping[str, Any]) -> str:
    """``robust accuracy drop 0.034 > 0.03 (+0.004)``: what fails and by how much."""
    label, threshold = check["label"], check["threshold"]
    if check["value"] is None:
        return f"{label} not measured (threshold {threshold:g})"
    value = check["value"]
    if check["rule"] == "<=":
        return f"{label} {value:.4g} > {threshold:g} (+{value - threshold:.2g})"
    return f"{label} {value:.4g} < {threshold:g} (-{threshold - value:.4g})"


def nearest_miss(ranking: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The best-ranked student that is not safe, or None when none is."""
    missed = [e for e in ranking if not e["safe"]]
    if not missed:
        return None
    first = missed[0]
    return {"name": first["name"], "misses": first["misses"], "text": f"{first['name']}: {'; '.join(first['misses'])}"}
