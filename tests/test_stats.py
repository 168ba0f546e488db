"""Paired statistics against scipy (exact binomial test, Wilson interval) and the interval's invariants."""

import math

import pytest
from scipy.stats import binomtest

from weight_edit.stats import (
    Z95,
    FlipTable,
    flip_table,
    mcnemar_exact,
    paired_difference_interval,
    paired_summary,
    wilson_interval,
)


@pytest.mark.parametrize("b,c", [(0, 0), (0, 1), (1, 2), (5, 0), (3, 3), (7, 19), (40, 2), (95, 5)])
def test_mcnemar_matches_a_two_sided_binomial_test(b, c):
    expected = 1.0 if b + c == 0 else binomtest(min(b, c), b + c, 0.5).pvalue
    assert mcnemar_exact(b, c) == pytest.approx(expected, rel=1e-9)
    assert mcnemar_exact(b, c) == mcnemar_exact(c, b)


@pytest.mark.parametrize("k,n", [(0, 10), (1, 10), (5, 10), (10, 10), (7, 104), (95, 104)])
def test_wilson_matches_scipy(k, n):
    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    low, high = wilson_interval(k, n)
    assert low == pytest.approx(ci.low, abs=1e-9) and high == pytest.approx(ci.high, abs=1e-9)


def test_flip_table_counts_pairs():
    table = flip_table([True, True, False, False, True], [True, False, True, False, False])
    assert table == FlipTable(both=1, source_only=2, edited_only=1, neither=1)
    with pytest.raises(ValueError):
        flip_table([True], [True, False])


@pytest.mark.parametrize(
    "table",
    [
        FlipTable(5, 90, 0, 9),
        FlipTable(0, 1, 2, 101),
        FlipTable(50, 0, 0, 54),
        FlipTable(0, 0, 0, 10),
        FlipTable(10, 10, 10, 10),
    ],
)
def test_paired_interval_invariants(table):
    diff, low, high = paired_difference_interval(table)
    assert -1 <= low <= diff <= high <= 1
    swapped = FlipTable(table.both, table.edited_only, table.source_only, table.neither)
    s_diff, s_low, s_high = paired_difference_interval(swapped)
    assert (s_diff, s_low, s_high) == pytest.approx((-diff, -high, -low), abs=1e-12)


def test_paired_interval_narrows_with_n_and_approaches_wald():
    small = paired_difference_interval(FlipTable(5, 30, 5, 60))
    large = paired_difference_interval(FlipTable(500, 3000, 500, 6000))
    assert large[2] - large[1] < small[2] - small[1]
    n, b, c = 10000, 3000, 500
    diff = (c - b) / n
    se = math.sqrt(b + c - (c - b) ** 2 / n) / n
    # 1e-4, not looser: ignoring the pairing (phi = 0) or flipping its sign moves both limits by about 5e-4 here,
    # while the score interval and the paired Wald interval agree to 3e-5 at this n.
    assert large[1] == pytest.approx(diff - Z95 * se, abs=1e-4) and large[2] == pytest.approx(diff + Z95 * se, abs=1e-4)


def test_paired_summary_fields():
    summary = paired_summary([True] * 95 + [False] * 9, [False] * 99 + [True] * 5)
    assert summary["source_rate"] == pytest.approx(95 / 104) and summary["edited_rate"] == pytest.approx(5 / 104)
    assert summary["difference_ci_high"] < 0 < summary["source_ci_low"] and summary["mcnemar_p"] < 1e-20


@pytest.mark.parametrize(
    "b,c,expected",
    [
        (0, 5, 2 / 32),  # 2 × P(X ≤ 0), X ~ Bin(5, ½)
        (1, 2, 1.0),  # 2 × (1 + 3)/8 = 1, capped at 1
        (2, 10, 2 * (1 + 12 + 66) / 4096),  # 2 × P(X ≤ 2), X ~ Bin(12, ½)
        (90, 0, 2 / 2**90),
    ],
)
def test_mcnemar_exact_hand_computed(b, c, expected):
    assert mcnemar_exact(b, c) == pytest.approx(expected, rel=1e-12)


def test_wilson_hand_computed():
    """k = 0 of n = 10: the interval is [0, z²/(n + z²)]."""
    z2 = 1.959963984540054**2
    low, high = wilson_interval(0, 10)
    assert low == pytest.approx(0.0, abs=1e-15) and high == pytest.approx(z2 / (10 + z2), rel=1e-9)


# Newcombe (1998), "Improved confidence intervals for the difference between binomial proportions based on
# paired data", Statistics in Medicine 17:2635-2650, method 10, the paper's worked examples (table II), as
# reproduced to 4 decimals by the test suite of the R package propint (m-Py/propint,
# tests/testthat/test_Two_Dependent_Props_CI.R). The paper's table is a, b, c, d = both, first only, second
# only, neither, and its difference is p1 - p2 = (b - c) / n; here the first classification is the edited
# model, so b is `edited_only` and c is `source_only`.
@pytest.mark.parametrize(
    "a,b,c,d,low,high",
    [
        (36, 12, 2, 0, 0.0569, 0.3404),
        (0, 30, 0, 0, 0.8395, 1.0),
        (18, 12, 2, 18, 0.0562, 0.3290),
        (53, 0, 0, 1, -0.0729, 0.0729),
    ],
)
def test_newcombe_1998_paired_worked_examples(a, b, c, d, low, high):
    diff, lower, upper = paired_difference_interval(FlipTable(both=a, source_only=c, edited_only=b, neither=d))
    assert diff == pytest.approx((b - c) / (a + b + c + d), abs=1e-12)
    assert lower == pytest.approx(low, abs=1e-4) and upper == pytest.approx(high, abs=1e-4)


def test_newcombe_1998_independent_example_is_not_the_paired_one():
    """0.0524 to 0.3339 is method 10 of Newcombe's *independent*-samples paper (Stat Med 17:873-890), 56/70 - 48/80.

    The same difference (0.2) as the paired example a, b, c, d = 36, 12, 2, 0, whose paired interval is
    0.0569 to 0.3404 (above); the independent one is Wilson intervals combined with no correlation term.
    """
    l1, u1 = wilson_interval(56, 70)
    l2, u2 = wilson_interval(48, 80)
    p1, p2 = 56 / 70, 48 / 80
    lower = p1 - p2 - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)
    upper = p1 - p2 + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)
    assert lower == pytest.approx(0.0524, abs=1e-4) and upper == pytest.approx(0.3339, abs=1e-4)
    paired = paired_difference_interval(FlipTable(both=36, source_only=2, edited_only=12, neither=0))
    assert paired[1] - lower > 4e-3 and paired[2] - upper > 6e-3
