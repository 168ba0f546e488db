"""Paired statistics for source-vs-edited comparisons on the same prompts (pure functions).

* `flip_table`: both refused / source only / edited only / neither.
* `mcnemar_exact`: two-sided exact McNemar test (a binomial test on the discordant pairs).
* `wilson_interval`: 95 % score interval of one proportion.
* `paired_difference_interval`: Newcombe's (1998, method 10) score interval for the difference of
  two paired proportions, which stays inside [-1, 1] and behaves at 0 % and 100 % where Wald does not.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

Z95 = 1.959963984540054


@dataclass(frozen=True)
class FlipTable:
    both: int  # refused by source and edited
    source_only: int
    edited_only: int
    neither: int

    @property
    def n(self) -> int:
        return self.both + self.source_only + self.edited_only + self.neither


def flip_table(source: Sequence[bool], edited: Sequence[bool]) -> FlipTable:
    if len(source) != len(edited):
        raise ValueError("paired outcomes need the same prompts on both sides")
    pairs = list(zip(source, edited, strict=True))
    return FlipTable(
        both=sum(s and e for s, e in pairs),
        source_only=sum(s and not e for s, e in pairs),
        edited_only=sum(e and not s for s, e in pairs),
        neither=sum(not s and not e for s, e in pairs),
    )


def mcnemar_exact(source_only: int, edited_only: int) -> float:
    """Two-sided exact p-value: P(as or more unbalanced discordant split | each direction p = ½)."""
    n = source_only + edited_only
    if n == 0:
        return 1.0
    k = min(source_only, edited_only)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def paired_difference_interval(table: FlipTable, z: float = Z95) -> tuple[float, float, float]:
    """(edited rate − source rate, lower, upper), Newcombe's method 10."""
    n = table.n
    if n == 0:
        return (0.0, -1.0, 1.0)
    a, b, c, d = table.both, table.source_only, table.edited_only, table.neither
    p_edited, p_source = (a + c) / n, (a + b) / n
    l_e, u_e = wilson_interval(a + c, n, z)
    l_s, u_s = wilson_interval(a + b, n, z)
    margins = (a + b) * (c + d) * (a + c) * (b + d)
    # Newcombe's phi, with his correction: a positive association ad − bc is reduced by n/2 (floored at 0).
    association = a * d - b * c
    if association > 0:
        association = max(association - n / 2, 0.0)
    phi = association / math.sqrt(margins) if margins else 0.0
    diff = p_edited - p_source
    lower = diff - math.sqrt(
        max(0.0, (p_edited - l_e) ** 2 - 2 * phi * (p_edited - l_e) * (u_s - p_source) + (u_s - p_source) ** 2)
    )
    upper = diff + math.sqrt(
        max(0.0, (u_e - p_edited) ** 2 - 2 * phi * (u_e - p_edited) * (p_source - l_s) + (p_source - l_s) ** 2)
    )
    return (diff, max(-1.0, lower), min(1.0, upper))


def paired_summary(source: Sequence[bool], edited: Sequence[bool]) -> dict[str, float | int]:
    """Everything a paper's table needs for one paired comparison of refusal flags."""
    table = flip_table(source, edited)
    n = table.n
    s_low, s_high = wilson_interval(table.both + table.source_only, n)
    e_low, e_high = wilson_interval(table.both + table.edited_only, n)
    diff, d_low, d_high = paired_difference_interval(table)
    return {
        **asdict(table),
        "source_rate": (table.both + table.source_only) / n if n else 0.0,
        "source_ci_low": s_low,
        "source_ci_high": s_high,
        "edited_rate": (table.both + table.edited_only) / n if n else 0.0,
        "edited_ci_low": e_low,
        "edited_ci_high": e_high,
        "difference": diff,
        "difference_ci_low": d_low,
        "difference_ci_high": d_high,
        "mcnemar_p": mcnemar_exact(table.source_only, table.edited_only),
    }
