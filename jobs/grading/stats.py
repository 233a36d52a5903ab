"""Confidence intervals for what an eval run reports, computed by scipy.stats.

* :func:`proportion`: a pass rate, with the Wilson score interval. Unlike the textbook
  estimate +- z*sqrt(p(1-p)/n), it stays inside [0, 1] and does not shrink to nothing at 0/n or
  n/n, which is where small evals live (Brown, Cai and DasGupta 2001 recommend it).
* :func:`mean`: a mean score, with Student's t interval (the scores' own spread, n-1 degrees
  of freedom); ``bounds`` clips it to the scores' possible range.
* :func:`win_rate`: a pairwise comparison: wins / (wins + losses) with Wilson, ties apart.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

DEFAULT_CONFIDENCE = 0.95


@dataclass(frozen=True)
class Interval:
    """An estimate and its confidence interval over ``n`` observations; all None when n is 0."""

    estimate: float | None
    low: float | None
    high: float | None
    n: int
    confidence: float = DEFAULT_CONFIDENCE

    def to_dict(self) -> dict:
        return asdict(self)


def _check_confidence(confidence: float) -> None:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie strictly between 0 and 1, not {confidence}")


def proportion(passed: int, total: int, confidence: float = DEFAULT_CONFIDENCE) -> Interval:
    """``passed`` of ``total`` with the Wilson score interval (no continuity correction)."""
    from scipy.stats import binomtest

    _check_confidence(confidence)
    if isinstance(passed, bool) or isinstance(total, bool) \
            or not isinstance(passed, int) or not isinstance(total, int):
        raise TypeError("passed and total must be integers")
    if not 0 <= passed <= total:
        raise ValueError(f"need 0 <= passed <= total, not {passed} of {total}")
    if total == 0:
        return Interval(None, None, None, 0, confidence)
    ci = binomtest(passed, total).proportion_ci(confidence_level=confidence, method="wilson")
    return Interval(passed / total, float(ci.low), float(ci.high), total, confidence)


def mean(scores: Sequence[float], confidence: float = DEFAULT_CONFIDENCE,
         bounds: tuple[float, float] | None = None) -> Interval:
    """The mean of ``scores`` with Student's t interval. With fewer than two scores, or scores
    that are all equal, the interval is the estimate itself (there is no spread to go on)."""
    from scipy import stats

    _check_confidence(confidence)
    values = [float(score) for score in scores]
    if not all(math.isfinite(value) for value in values):
        raise ValueError("scores must be finite numbers")
    n = len(values)
    if n == 0:
        return Interval(None, None, None, 0, confidence)
    estimate = math.fsum(values) / n
    if n < 2 or min(values) == max(values):
        low = high = estimate
    else:
        low, high = (float(x) for x in stats.t.interval(confidence, n - 1, loc=estimate,
                                                         scale=stats.sem(values)))
    if bounds is not None:
        low, high = max(low, float(bounds[0])), min(high, float(bounds[1]))
    return Interval(estimate, low, high, n, confidence)


def win_rate(wins: int, losses: int, ties: int,
             confidence: float = DEFAULT_CONFIDENCE) -> dict:
    """A pairwise comparison's result: ``win_rate`` is wins / (wins + losses) with its Wilson
    interval (ties say nothing about which model is better), and ties are counted apart."""
    if min(wins, losses, ties) < 0:
        raise ValueError("wins, losses and ties must not be negative")
    total = wins + losses + ties
    return {
        "wins": wins, "losses": losses, "ties": ties, "total": total,
        "win_rate": proportion(wins, wins + losses, confidence).to_dict(),
        "tie_rate": ties / total if total else None,
    }
