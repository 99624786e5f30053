"""Exercise wilson (eval.wilson): the 95% Wilson score interval, graded against the inversion of the score
test solved as a quadratic, and the properties that tell it from the Wald interval."""
import math

import pytest

import eval as E

CASES = [(0, 10), (1, 10), (5, 10), (10, 10), (3, 50), (47, 50), (2.5, 7), (120, 400)]


def _score_interval(k, n, z=1.96):
    """All p with (k/n - p)^2 <= z^2 p (1 - p) / n: the two roots of (1 + z^2/n) p^2 - (2 k/n + z^2/n) p + (k/n)^2."""
    ph = k / n
    a, b, c = 1 + z * z / n, -(2 * ph + z * z / n), ph * ph
    r = math.sqrt(max(b * b - 4 * a * c, 0.0))
    return (-b - r) / (2 * a), (-b + r) / (2 * a)


def test_shapes_and_finite():
    for k, n in CASES:
        lo, hi = E.wilson(k, n)
        assert isinstance(lo, float) and isinstance(hi, float), "wilson: return two floats (lo, hi)"
        assert 0.0 <= lo <= hi <= 1.0, f"wilson({k}, {n}) = ({lo}, {hi}): want 0 <= lo <= hi <= 1"
    assert E.wilson(0, 0) == (0.0, 1.0), "wilson: n = 0 says nothing: (0.0, 1.0)"


def test_holds_the_estimate():
    for k, n in CASES:
        lo, hi = E.wilson(k, n)
        assert lo <= k / n <= hi, f"wilson({k}, {n}) = ({lo:.4f}, {hi:.4f}) must hold k/n = {k / n:.4f}"


@pytest.mark.parametrize("k,n", CASES)
def test_matches_score_test_inversion(k, n):
    lo, hi = E.wilson(k, n)
    want = _score_interval(k, n)
    ph, half = k / n, 1.96 * math.sqrt(k / n * (1 - k / n) / n)
    if 0 < k < n and abs(lo - max(0.0, ph - half)) < 1e-9 and abs(hi - min(1.0, ph + half)) < 1e-9:
        raise AssertionError("wilson: that is the Wald interval p +- z sqrt(p(1-p)/n); Wilson's is centred at "
                             "(p + z^2/2n) / (1 + z^2/n)")
    assert abs(lo - want[0]) < 1e-9 and abs(hi - want[1]) < 1e-9, f"wilson({k}, {n}) = ({lo:.6f}, {hi:.6f}), want ({want[0]:.6f}, {want[1]:.6f})"


def test_zero_successes_still_has_width():
    lo, hi = E.wilson(0, 20)
    assert lo == 0.0 and hi > 0.1, f"wilson(0, 20) = ({lo}, {hi}): 0/20 does not prove a rate of 0 (Wald would say so)"
