"""Statistics of a comparison: intervals for accuracies and paired tests between methods on the same test points.

Accuracies are 0/1 per test point. A method with several seeds is a matrix ``(seeds, points)``; every run of a
comparison is evaluated on the same points, so two methods can be compared point by point (paired).

- :func:`wilson`: the Wilson score interval of one run's accuracy (k correct of n).
- :func:`bootstrap_mean`: the mean accuracy over seeds with a two-level bootstrap interval: seeds resampled with
  replacement, test points resampled with replacement (the same points for every seed, as they were evaluated).
- :func:`paired_bootstrap`: the difference of two methods' mean accuracies, the test points resampled jointly for
  both (the pairing), the seeds of each resampled on their own; a two-sided bootstrap p-value.
- :func:`mcnemar`: McNemar's exact test (a binomial test on the discordant points, scipy's ``binomtest``).
- :func:`holm`: Holm's step-down adjustment of p-values for multiple comparisons.
Every random draw comes from a ``numpy.random.Generator`` seeded by the caller.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# Bootstrap resamples are drawn in blocks of this many, so memory stays small on 10 000 test points.
_BLOCK = 250


def wilson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval for k successes in n trials (Wilson 1927), clipped to [0, 1]."""
    from scipy.stats import norm

    if n <= 0:
        raise ValueError(f"wilson: n must be >= 1, got {n}")
    z = float(norm.ppf(0.5 + confidence / 2))
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0 for a single value)."""
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


def _matrix(runs: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
    arr = np.atleast_2d(np.asarray(runs, dtype=float))
    if arr.size == 0:
        raise ValueError("bootstrap: no runs or no points")
    return arr


def _point_weights(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """How often each of n points is drawn in each of ``size`` resamples: (size, n) counts summing to n."""
    return rng.multinomial(n, np.full(n, 1.0 / n), size=size).astype(np.float64)


def _seed_means(per_run: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """per_run (seeds, B): accuracies per run and resample; the mean over seeds drawn with replacement per resample."""
    seeds, size = per_run.shape
    pick = rng.integers(0, seeds, size=(size, seeds))
    return per_run[pick, np.arange(size)[:, None]].mean(axis=1)


def bootstrap_means(runs: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """n_boot bootstrap replicates of the mean accuracy over seeds (seeds and points resampled)."""
    m = _matrix(runs)
    out = []
    for start in range(0, n_boot, _BLOCK):
        w = _point_weights(m.shape[1], min(_BLOCK, n_boot - start), rng)
        out.append(_seed_means(m @ w.T / m.shape[1], rng))
    return np.concatenate(out)


def interval(samples: np.ndarray, confidence: float) -> tuple[float, float]:
    """The percentile interval of bootstrap replicates."""
    tail = (1 - confidence) / 2
    low, high = np.quantile(samples, [tail, 1 - tail])
    return float(low), float(high)


@dataclass(frozen=True)
class Estimate:
    """A mean and its interval."""

    mean: float
    low: float
    high: float


def bootstrap_mean(
    runs: np.ndarray | Sequence[Sequence[float]], *, n_boot: int = 2000, confidence: float = 0.95, seed: int = 0
) -> Estimate:
    """The mean accuracy over seeds and test points with its two-level bootstrap percentile interval."""
    m = _matrix(runs)
    samples = bootstrap_means(m, n_boot, np.random.default_rng(seed))
    return Estimate(float(m.mean()), *interval(samples, confidence))


def paired_differences(a: np.ndarray, b: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Bootstrap replicates of mean(a) - mean(b): the same resampled points for both, each one's seeds on their own."""
    a, b = _matrix(a), _matrix(b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"paired comparison: {a.shape[1]} and {b.shape[1]} test points; they must be the same points")
    out = []
    for start in range(0, n_boot, _BLOCK):
        w = _point_weights(a.shape[1], min(_BLOCK, n_boot - start), rng)
        n = a.shape[1]
        out.append(_seed_means(a @ w.T / n, rng) - _seed_means(b @ w.T / n, rng))
    return np.concatenate(out)


def bootstrap_p(samples: np.ndarray) -> float:
    """Two-sided bootstrap p-value of "the difference is 0": twice the smaller tail beyond 0, with the +1 rule."""
    size = samples.size
    below = (1 + int((samples <= 0).sum())) / (size + 1)
    above = (1 + int((samples >= 0).sum())) / (size + 1)
    return min(1.0, 2 * min(below, above))


@dataclass(frozen=True)
class Paired:
    """A paired comparison of two methods: the difference of mean accuracies, its interval and p-value."""

    diff: float
    low: float
    high: float
    p: float
    samples: np.ndarray


def paired_bootstrap(
    a: np.ndarray | Sequence[Sequence[float]],
    b: np.ndarray | Sequence[Sequence[float]],
    *,
    n_boot: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Paired:
    """mean(a) - mean(b) on the same test points, with its paired bootstrap interval and two-sided p-value."""
    a, b = _matrix(a), _matrix(b)
    samples = paired_differences(a, b, n_boot, np.random.default_rng(seed))
    return Paired(float(a.mean() - b.mean()), *interval(samples, confidence), bootstrap_p(samples), samples)


def discordant(a: np.ndarray | Sequence[Sequence[float]], b: np.ndarray | Sequence[Sequence[float]]) -> tuple[int, int]:
    """(a right and b wrong, a wrong and b right), summed over matched seed pairs (seed i of a with seed i of b).

    A method with one run (a teacher) is matched with every run of the other.
    """
    a, b = _matrix(a) > 0.5, _matrix(b) > 0.5
    pairs = max(len(a), len(b))
    if min(len(a), len(b)) > 1 and len(a) != len(b):
        pairs = min(len(a), len(b))
    a_rows = np.resize(a, (pairs, a.shape[1])) if len(a) == 1 else a[:pairs]
    b_rows = np.resize(b, (pairs, b.shape[1])) if len(b) == 1 else b[:pairs]
    return int((a_rows & ~b_rows).sum()), int((~a_rows & b_rows).sum())


def mcnemar_exact(n01: int, n10: int) -> float:
    """McNemar's exact two-sided p-value for discordant counts: binomtest(n01, n01 + n10, 0.5); 1 with none."""
    from scipy.stats import binomtest

    total = n01 + n10
    return 1.0 if total == 0 else float(binomtest(n01, total, 0.5).pvalue)


def mcnemar(a: np.ndarray | Sequence[Sequence[float]], b: np.ndarray | Sequence[Sequence[float]]) -> float:
    """McNemar's exact test of two methods on the same points (matched seeds' discordant points pooled)."""
    return mcnemar_exact(*discordant(a, b))


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (Holm 1979): sorted ascending, p_(i)·(m − i + 1), monotone, at most 1."""
    p = np.asarray(pvalues, dtype=float)
    m = p.size
    order = np.argsort(p, kind="stable")
    adjusted = np.empty(m)
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[index]))
        adjusted[index] = running
    return adjusted.tolist()


def holm_levels(pvalues: Sequence[float], alpha: float) -> list[float]:
    """The confidence level of the interval that decides each comparison under Holm: 1 − alpha / (m − rank)."""
    p = np.asarray(pvalues, dtype=float)
    m = p.size
    levels = np.empty(m)
    for rank, index in enumerate(np.argsort(p, kind="stable")):
        levels[index] = 1 - alpha / (m - rank)
    return levels.tolist()
