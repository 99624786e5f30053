"""Exercise mra (eval.mean_relative_accuracy): VSI-Bench's mean relative accuracy, graded against an explicit
threshold loop (ten thresholds 0.50, 0.55, ..., 0.95; the relative error is taken against the ground truth)."""
import math

import pytest

import eval as E

THRESHOLDS = [0.50 + 0.05 * i for i in range(10)]


def _mra(pred, gt):
    rel = abs(pred - gt) / abs(gt)
    return sum(1 for th in THRESHOLDS if rel < 1 - th) / len(THRESHOLDS)


def test_shapes_and_finite():
    for pred, gt in ((1.0, 1.0), (3.0, 2.0), (0.0, 5.0)):
        r = E.mean_relative_accuracy(pred, gt)
        assert isinstance(r, float) and 0.0 <= r <= 1.0, f"mra({pred}, {gt}) = {r!r}: a float in [0, 1]"
    for bad in (None, float("nan"), float("inf")):
        assert E.mean_relative_accuracy(bad, 2.0) == 0.0, f"mra: an unparsable prediction ({bad}) scores 0.0"


@pytest.mark.parametrize("pred,gt", [(10.0, 10.0), (10.3, 10.0), (12.0, 10.0), (8.7, 10.0), (6.2, 10.0), (14.9, 10.0),
                                     (0.52, 0.5), (131.0, 100.0), (-3.4, -3.0), (25.0, 10.0)])
def test_matches_threshold_loop(pred, gt):
    r, want = E.mean_relative_accuracy(pred, gt), _mra(pred, gt)
    if abs(r - want) > 1e-9 and abs(r - _mra(gt, pred)) < 1e-9 and abs(_mra(gt, pred) - want) > 1e-9:
        raise AssertionError(f"mra({pred}, {gt}) = {r}: the relative error is |pred - gt| / |gt|, not / |pred|")
    assert abs(r - want) < 1e-9, f"mra({pred}, {gt}) = {r}, want {want} (ten thresholds 0.50 .. 0.95)"


def test_granularity_is_one_tenth():
    vals = {round(E.mean_relative_accuracy(10.0 + d, 10.0), 9) for d in [0.01 * i for i in range(0, 600, 7)]}
    assert all(abs(v * 10 - round(v * 10)) < 1e-6 for v in vals), \
        f"mra: scores {sorted(vals)[:6]}... are not multiples of 0.1: use the ten thresholds 0.50, 0.55, ..., 0.95"
    assert math.isclose(E.mean_relative_accuracy(12.0, 10.0), 0.6), "mra(12, 10): rel 0.2 passes 6 of 10 thresholds"
