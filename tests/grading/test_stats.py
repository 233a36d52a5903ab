"""jobs.grading.stats against published values and the closed forms, and at the edges."""

from __future__ import annotations

import math
from statistics import NormalDist

import pytest

from jobs.grading.stats import Interval, mean, proportion, win_rate


def wilson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval's closed form, computed apart from scipy."""
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


def test_wilson_for_8_of_10_is_the_published_interval():
    interval = proportion(8, 10)
    assert interval.estimate == 0.8 and interval.n == 10
    assert (round(interval.low, 4), round(interval.high, 4)) == (0.4902, 0.9433)


@pytest.mark.parametrize("k, n", [(1, 3), (5, 10), (17, 40), (99, 100), (512, 1000)])
@pytest.mark.parametrize("confidence", [0.9, 0.95, 0.99])
def test_wilson_matches_its_closed_form(k, n, confidence):
    interval = proportion(k, n, confidence)
    low, high = wilson(k, n, confidence)
    assert interval.low == pytest.approx(low, abs=1e-9)
    assert interval.high == pytest.approx(high, abs=1e-9)
    assert interval.confidence == confidence


def test_no_items_give_no_estimate():
    assert proportion(0, 0) == Interval(None, None, None, 0)
    assert proportion(0, 0).to_dict() == {"estimate": None, "low": None, "high": None, "n": 0,
                                          "confidence": 0.95}


def test_none_and_all_passing_keep_an_honest_width():
    z2 = NormalDist().inv_cdf(0.975) ** 2
    none, every = proportion(0, 20), proportion(20, 20)
    assert (none.estimate, none.low) == (0.0, 0.0)
    assert none.high == pytest.approx(z2 / (20 + z2))  # 0.161: 0/20 does not prove 0%
    assert (every.estimate, every.high) == (1.0, 1.0)
    assert every.low == pytest.approx(20 / (20 + z2))


def test_a_higher_confidence_gives_a_wider_interval():
    narrow, wide = proportion(30, 50, 0.9), proportion(30, 50, 0.99)
    assert wide.low < narrow.low < 0.6 < narrow.high < wide.high


@pytest.mark.parametrize("passed, total", [(-1, 5), (6, 5), (1.5, 3), (True, 3)])
def test_impossible_counts_are_refused(passed, total):
    with pytest.raises((ValueError, TypeError)):
        proportion(passed, total)


def test_mean_uses_students_t():
    # mean 2.5, s = 1.2910, standard error 0.6455, t(0.975, 3 df) = 3.1824.
    interval = mean([1, 2, 3, 4])
    assert interval.estimate == 2.5 and interval.n == 4
    half = 3.182446305284263 * math.sqrt(5 / 3) / 2
    assert interval.low == pytest.approx(2.5 - half, abs=1e-9)
    assert interval.high == pytest.approx(2.5 + half, abs=1e-9)


def test_mean_edges():
    assert mean([]) == Interval(None, None, None, 0)
    assert mean([0.7]) == Interval(0.7, 0.7, 0.7, 1)
    assert mean([0.5, 0.5, 0.5]) == Interval(0.5, 0.5, 0.5, 3)
    clipped = mean([0.0, 1.0, 1.0, 1.0], bounds=(0.0, 1.0))
    assert clipped.high == 1.0 and clipped.low == 0.0  # t reaches past both ends here
    unclipped = mean([0.0, 1.0, 1.0, 1.0])
    assert unclipped.high > 1.0 and unclipped.low < 0.0
    with pytest.raises(ValueError):
        mean([1.0, float("nan")])


def test_win_rate_leaves_ties_out_of_the_rate():
    result = win_rate(wins=6, losses=2, ties=2)
    assert result["win_rate"]["estimate"] == 0.75 and result["win_rate"]["n"] == 8
    low, high = wilson(6, 8)
    assert result["win_rate"]["low"] == pytest.approx(low)
    assert result["win_rate"]["high"] == pytest.approx(high)
    assert (result["ties"], result["total"], result["tie_rate"]) == (2, 10, 0.2)


def test_only_ties_give_no_win_rate():
    result = win_rate(wins=0, losses=0, ties=4)
    assert result["win_rate"]["estimate"] is None and result["tie_rate"] == 1.0
    assert win_rate(0, 0, 0)["tie_rate"] is None
    with pytest.raises(ValueError):
        win_rate(-1, 2, 0)
