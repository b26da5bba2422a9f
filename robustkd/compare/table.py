"""The leaderboard's numbers: per run and per method, from the runs' per-point records."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

import robustkd.compare.stats as stats

# The leaderboard's columns, in order; a metric no run has is left out.
ORDER = ("clean", "pgd20", "cw20", "robust", "autoattack", "agreement", "cert_agreement")


def matrices(records: Iterable[dict[str, Any]]) -> dict[str, dict[str, np.ndarray]]:
    """label → metric → (seeds, points) 0/1 matrix, the seeds in ascending order."""
    grouped: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        grouped.setdefault(record["label"], []).append(record)
    out: dict[str, dict[str, np.ndarray]] = {}
    for label, runs in grouped.items():
        runs.sort(key=lambda r: r["seed"])
        names = set.intersection(*(set(r["metrics"]) for r in runs))
        out[label] = {m: np.array([[c == "1" for c in r["metrics"][m]] for r in runs], dtype=float) for m in names}
    return out


def _metric(matrix: np.ndarray, confidence: float, n_boot: int, seed: int) -> dict[str, Any]:
    n = matrix.shape[1]
    runs = []
    for row in matrix:
        k = int(row.sum())
        low, high = stats.wilson(k, n, confidence)
        runs.append({"accuracy": k / n, "correct": k, "n": n, "wilson": [low, high]})
    mean, std = stats.mean_std([r["accuracy"] for r in runs])
    est = stats.bootstrap_mean(matrix, n_boot=n_boot, confidence=confidence, seed=seed)
    return {"mean": mean, "std": std, "ci": [est.low, est.high], "n": n, "runs": runs}


def leaderboard(
    records: list[dict[str, Any]], labels: list[str], *, confidence: float, n_boot: int, seed: int
) -> list[dict[str, Any]]:
    """One row per label (in ``labels``' order): seeds, per-metric mean ± std and intervals, time, exceptions."""
    results = matrices(records)
    rows = []
    for label in labels:
        runs = sorted((r for r in records if r["label"] == label), key=lambda r: r["seed"])
        if not runs:
            rows.append({"label": label, "seeds": [], "metrics": {}, "missing": True})
            continue
        seconds = [r["train_seconds"] for r in runs if r.get("train_seconds")]
        gaps = [r["gaps"] for r in runs if r.get("gaps")]
        rows.append(
            {
                "label": label,
                "role": runs[0]["role"],
                "method": runs[0].get("method"),
                "seeds": [r["seed"] for r in runs],
                "epochs": runs[0].get("epochs"),
                "exceptions": runs[0].get("exceptions") or {},
                "train_seconds": stats.mean_std(seconds)[0] if seconds else None,
                "metrics": {m: _metric(results[label][m], confidence, n_boot, seed) for m in sorted(results[label])},
                # Each seed's quantiles of the certified gap bound on P, then their mean and std over seeds.
                "cert_gap": {q: stats.mean_std([g[q] for g in gaps]) for q in gaps[0]} if gaps else None,
            }
        )
    return rows
