"""Which certified gap bounds carry no information about the student.

The certified bound on the gap G_under = max over the ball of f_T^y - f_S^y is, per point, the teacher's
certified upper bound on f_T^y minus the student's certified lower bound on f_S^y. A point's bound is
**vacuous** when

- the student's lower bound on f_S^y is 0 (at most ``ZERO``): the bound is then the teacher's own upper
  bound, whatever the student does, so it says nothing about the student; or
- the bound is at least 1 - ``ZERO``: 1 is the largest a difference of two probabilities can be, the
  bound every pair meets.

A quantile qXX of the bounds is shown as "vacuous" when, with the vacuous points sorted last (as if their
bound were infinite), the quantile's position, ``ceil(XX/100 * (n - 1))`` of the ``n`` teacher-correct
points counted from 0, falls on a vacuous point: that quantile is not bounded by any real certificate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

ZERO = 1e-6
QUANTILES = {"median": 0.5, "q90": 0.9}


def vacuous_points(student_lower: Sequence[float], gap_upper: Sequence[float]) -> list[bool]:
    """Per point, whether its certified gap bound is vacuous (see the module docstring)."""
    return [low <= ZERO or gap >= 1 - ZERO for low, gap in zip(student_lower, gap_upper)]


def vacuous_quantiles(vacuous: Sequence[bool]) -> dict[str, bool]:
    """Per reported quantile of the bound, whether it falls on a vacuous point."""
    n = len(vacuous)
    informative = n - sum(vacuous)
    return {key: n > 0 and math.ceil(q * (n - 1)) >= informative for key, q in QUANTILES.items()}
