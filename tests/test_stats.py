"""Paired statistics against scipy (exact binomial test, Wilson interval) and the interval's invariants."""

import math

import pytest
from scipy.stats import binomtest

from weight_edit.stats import (
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
    assert large[1] == pytest.approx(diff - 1.96 * se, abs=2e-3) and large[2] == pytest.approx(
        diff + 1.96 * se, abs=2e-3
    )


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
