"""The comparison's statistics and claim verdicts against known cases computed apart from the code."""

from __future__ import annotations

import math

import numpy as np
import pytest

from robustkd.compare import stats
from robustkd.compare.claims import judge, overall, parse_claim
from robustkd.errors import ConfigError

# --- Wilson ----------------------------------------------------------------------------------------------------


def test_wilson_8_of_10_by_hand():
    z = 1.959963984540054  # the 97.5 % normal quantile
    n, p = 10, 0.8
    centre = (p + z**2 / (2 * n)) / (1 + z**2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2)) / (1 + z**2 / n)
    low, high = stats.wilson(8, 10, 0.95)
    assert low == pytest.approx(centre - half, abs=1e-9) and high == pytest.approx(centre + half, abs=1e-9)
    assert (low, high) == pytest.approx((0.4901625, 0.9433178), abs=1e-6)  # published value for 8/10


def test_wilson_edges_stay_in_the_unit_interval_and_are_not_empty():
    low, high = stats.wilson(0, 20)
    assert low == 0.0 and 0.1 < high < 0.2  # 0/20: the upper end is z^2 / (n + z^2) = 0.1611
    assert high == pytest.approx(1.959963984540054**2 / (20 + 1.959963984540054**2), abs=1e-9)
    low, high = stats.wilson(20, 20)
    assert high == 1.0 and low == pytest.approx(1 - 0.1611, abs=1e-3)
    with pytest.raises(ValueError):
        stats.wilson(0, 0)


def test_mean_std_uses_the_sample_deviation():
    assert stats.mean_std([0.5, 0.7]) == pytest.approx((0.6, math.sqrt(0.02)))
    assert stats.mean_std([0.3]) == (0.3, 0.0)


# --- McNemar and Holm ------------------------------------------------------------------------------------------


def test_mcnemar_exact_on_known_discordant_counts():
    # 1 vs 9 discordant points: two-sided exact p = 2 * (C(10,0) + C(10,1)) / 2^10 = 22 / 1024
    assert stats.mcnemar_exact(1, 9) == pytest.approx(22 / 1024, abs=1e-12)
    assert stats.mcnemar_exact(9, 1) == pytest.approx(22 / 1024, abs=1e-12)
    assert stats.mcnemar_exact(5, 5) == pytest.approx(1.0)
    assert stats.mcnemar_exact(0, 0) == 1.0


def test_mcnemar_counts_discordant_points_of_matched_seeds():
    a = np.array([[1, 1, 0, 1], [1, 0, 0, 1]])
    b = np.array([[0, 1, 1, 1], [0, 0, 0, 1]])
    # seed 0: a-only at 0, b-only at 2; seed 1: a-only at 0
    assert stats.discordant(a, b) == (2, 1)
    teacher = np.array([[1, 1, 1, 0]])  # one run is matched with every run of the other
    assert stats.discordant(teacher, a) == (0 + 1 + 1 + 1, 1 + 1)
    assert stats.mcnemar(a, b) == pytest.approx(stats.mcnemar_exact(2, 1))


def test_holm_on_a_known_vector():
    p = [0.01, 0.04, 0.03, 0.005]
    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04 -> monotone 0.02, 0.03, 0.06, 0.06
    assert stats.holm(p) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert stats.holm([0.9, 0.8]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert stats.holm_levels(p, 0.05) == pytest.approx([1 - 0.05 / 3, 1 - 0.05 / 1, 1 - 0.05 / 2, 1 - 0.05 / 4])


# --- bootstrap -------------------------------------------------------------------------------------------------


def test_bootstrap_of_a_degenerate_sample_has_zero_width():
    est = stats.bootstrap_mean(np.ones((3, 50)), n_boot=300, seed=1)
    assert (est.mean, est.low, est.high) == (1.0, 1.0, 1.0)
    paired = stats.paired_bootstrap(np.ones((2, 40)), np.ones((3, 40)), n_boot=300)
    assert (paired.diff, paired.low, paired.high, paired.p) == (0.0, 0.0, 0.0, 1.0)


def test_bootstrap_resamples_the_seeds():
    # One seed got every point right, the other none: points resampled alone would give a zero-width interval.
    est = stats.bootstrap_mean(np.array([np.ones(30), np.zeros(30)]), n_boot=1000, seed=0)
    assert est.mean == 0.5 and est.low == 0.0 and est.high == 1.0


def test_bootstrap_interval_matches_the_binomial_spread_for_one_run():
    rng = np.random.default_rng(3)
    row = (rng.random(2000) < 0.7).astype(float)
    est = stats.bootstrap_mean(row[None], n_boot=2000, seed=0)
    se = math.sqrt(row.mean() * (1 - row.mean()) / row.size)
    assert est.low == pytest.approx(row.mean() - 1.96 * se, abs=0.006)
    assert est.high == pytest.approx(row.mean() + 1.96 * se, abs=0.006)
    assert stats.bootstrap_mean(row[None], n_boot=500, seed=5) == stats.bootstrap_mean(row[None], n_boot=500, seed=5)


def test_paired_bootstrap_where_one_method_dominates():
    n = 200
    b = np.zeros((2, n))
    b[:, :100] = 1  # b right on the first half
    a = np.ones((2, n))  # a right everywhere b is, and on 100 points more
    paired = stats.paired_bootstrap(a, b, n_boot=999, seed=0)
    assert paired.diff == pytest.approx(0.5)
    assert 0.4 < paired.low < 0.5 < paired.high < 0.6
    assert paired.p == pytest.approx(2 / 1000)  # no replicate at or below 0: the smallest p the +1 rule allows
    assert stats.mcnemar(a, b) == pytest.approx(stats.mcnemar_exact(200, 0))


def test_pairing_removes_the_shared_difficulty_of_the_points():
    """Two methods that differ on 5 points of 400 but share every other result: the paired interval is tight."""
    rng = np.random.default_rng(0)
    shared = (rng.random(400) < 0.5).astype(float)
    a, b = shared.copy(), shared.copy()
    a[np.flatnonzero(shared == 0)[:5]] = 1
    paired = stats.paired_bootstrap(a[None], b[None], n_boot=1000, seed=0)
    unpaired_half_width = 1.96 * math.sqrt(2 * 0.25 / 400)
    assert paired.high - paired.low < unpaired_half_width


# --- claims ----------------------------------------------------------------------------------------------------


def test_a_claim_expands_to_every_combination():
    texts = [c.text for c in parse_claim("advfunmatch.{clean,robust} > {ard,rslad}")]
    assert texts == [
        "advfunmatch.clean > ard.clean",
        "advfunmatch.robust > ard.robust",
        "advfunmatch.clean > rslad.clean",
        "advfunmatch.robust > rslad.robust",
    ]
    (c,) = parse_claim("advfunmatch[randaugment].robust > advfunmatch[none].robust")
    assert (c.left, c.right, c.metric, c.op) == ("advfunmatch[randaugment]", "advfunmatch[none]", "robust", ">")
    (c,) = parse_claim("kdiga[0.5].robust < teacher.robust")
    assert (c.left, c.right, c.metric) == ("kdiga[0.5]", "teacher", "robust")
    assert len(parse_claim("faithful.cert_agreement > {kd, ard, ibp_student}.cert_agreement")) == 3


@pytest.mark.parametrize("text", ["kd.robust", "kd.robust < teacher.robust < x", "kd < teacher.robust",
                                  "kd.clean > ard.robust", "kd.robust > {}"])  # fmt: skip
def test_a_malformed_claim_is_one_line(text):
    with pytest.raises(ConfigError) as err:
        parse_claim(text)
    assert "\n" not in str(err.value) and "claim" in str(err.value)


def _runs(*rows: list[int]) -> np.ndarray:
    return np.array(rows, dtype=float)


def test_verdicts_reproduced_contradicted_within_noise_and_not_run():
    n = 300
    strong = _runs([1] * 250 + [0] * 50, [1] * 255 + [0] * 45)
    weak = _runs([1] * 100 + [0] * 200, [1] * 110 + [0] * 190)
    close = _runs([1] * 252 + [0] * 48, [1] * 250 + [0] * 50)
    results = {"a": {"robust": strong}, "b": {"robust": weak}, "c": {"robust": close}}
    entries = [{"claim": "a.robust > b.robust"}, {"claim": "a.robust < b.robust"}, {"claim": "a.robust > c.robust"},
               {"claim": "a.robust > missing.robust"}, {"claim": "a.clean > b.clean"}]  # fmt: skip
    judged = judge(entries, results, n_boot=999, seed=0)
    assert [j["verdict"] for j in judged] == ["reproduced", "contradicted", "within noise", "not run", "not run"]
    row = judged[0]["comparisons"][0]
    assert row["diff"] == pytest.approx((505 - 210) / (2 * n))
    assert row["low"] > 0 and row["p_holm"] < 0.05
    # three comparisons ran: the smallest p is Holm's first (level 1 - 0.05/3), the tie after it the second
    assert row["level"] == pytest.approx(1 - 0.05 / 3)
    assert judged[1]["comparisons"][0]["level"] == pytest.approx(1 - 0.05 / 2)
    assert row["p_holm"] == pytest.approx(3 * row["p"])
    noise = judged[2]["comparisons"][0]
    assert noise["low"] < 0 < noise["high"] and noise["level"] == pytest.approx(0.95)


def test_a_claims_verdict_from_its_comparisons():
    assert overall(["reproduced", "reproduced"]) == "reproduced"
    assert overall(["reproduced", "within noise"]) == "within noise"
    assert overall(["reproduced", "contradicted"]) == "contradicted"
    assert overall(["not run", "not run"]) == "not run"
    assert overall(["reproduced", "not run"]) == "reproduced (partly run)"


def test_the_pareto_front_keeps_the_undominated_points():
    from robustkd.compare.output import pareto_front

    points = [(0.8, 0.3), (0.7, 0.5), (0.75, 0.45), (0.6, 0.4), (0.8, 0.2)]
    assert pareto_front(points) == [(0.7, 0.5), (0.75, 0.45), (0.8, 0.3)]
