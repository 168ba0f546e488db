"""PNG figures for the report, drawn from aggregate tables (never from completions).

matplotlib is imported inside each function, so importing this module costs nothing; figures are drawn
on `matplotlib.figure.Figure` directly (Agg canvas, no pyplot), which leaves the global backend and any
interactive session alone. Every function takes plain rows (dicts, as `csv.DictReader` gives them, with
strings or numbers) and a path, writes one PNG at `DPI` and returns the path.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

DPI = 150
FIT_COLOUR = "#1f77b4"
HELD_OUT_COLOUR = "#d95f02"
SOURCE_COLOUR = "#7f7f7f"
EDITED_COLOUR = "#1f77b4"


def _number(value: Any) -> float:
    """A float from a CSV cell or a number; NaN for empty or missing cells."""
    if value is None or value == "":
        return math.nan
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return float(value.strip().lower() == "true")
    return float(value)


def _flag(value: Any) -> bool:
    return value is True or str(value).strip().lower() in ("true", "1")


def _pretty(area: str) -> str:
    return "all held-out" if area == "ALL" else area.replace("_", " ")


def _new_figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def _save(figure, out: Path | str) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=DPI, format="png", facecolor="white")
    return out


def candidate_scores(
    rows: Sequence[Mapping[str, Any]], out: Path | str, chosen: tuple[int, int] | None = None, title: str | None = None
) -> Path:
    """Heatmap of every candidate's bypass score over layer × post-instruction position.

    Shows the stage-1 screened bypass score where `fit` screened (the full score otherwise), NaN (grey)
    where a candidate was not scored or not eligible; fully scored candidates are outlined and labelled
    with their full bypass score, the chosen one is starred. Lower = fewer refusals under ablation.
    """
    import matplotlib
    import numpy as np
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.patches import Rectangle

    if not rows:
        raise ValueError("no candidates to plot")
    layers = sorted({int(_number(r["layer"])) for r in rows})
    positions = sorted({int(_number(r["position"])) for r in rows})
    screened = any(not math.isnan(_number(r.get("screen_bypass"))) for r in rows)
    column = "screen_bypass" if screened else "bypass"
    grid = [[math.nan] * len(layers) for _ in positions]
    full: dict[tuple[int, int], float] = {}
    for r in rows:
        layer, position = int(_number(r["layer"])), int(_number(r["position"]))
        i, j = positions.index(position), layers.index(layer)
        if _flag(r.get("eligible", True)):
            grid[i][j] = _number(r.get(column))
        if not math.isnan(_number(r.get("bypass"))):
            full[(layer, position)] = _number(r.get("bypass"))
        if chosen is None and _flag(r.get("selected", False)):
            chosen = (layer, position)
    values = [v for row in grid for v in row if not math.isnan(v)]
    if not values:
        raise ValueError("no candidate has a bypass score")
    low, high = min(values), max(values)
    norm = TwoSlopeNorm(vcenter=0.0, vmin=low, vmax=high) if low < 0 < high else None

    cmap = matplotlib.colormaps["RdBu_r"].with_extremes(bad="#d9d9d9")
    figure = _new_figure(max(7.0, 0.34 * len(layers) + 2.5), 1.0 + 0.55 * len(positions) + 1.2)
    ax = figure.add_subplot()
    image = ax.imshow(
        np.array(grid, dtype=float),
        aspect="auto",
        cmap=cmap,
        norm=norm,
        vmin=None if norm else low,
        vmax=None if norm else high,
        origin="lower",
        interpolation="nearest",
    )
    colorbar = figure.colorbar(image, ax=ax, pad=0.01)
    colorbar.set_label("refusal log-odds under ablation\n(lower = fewer refusals)")
    ax.set_xticks(range(len(layers)), [str(layer) for layer in layers], fontsize=8)
    ax.set_yticks(range(len(positions)), [str(p) for p in positions])
    ax.set_xlabel("layer (residual input)")
    ax.set_ylabel("post-instruction position\n(from the end of the prompt)")
    for (layer, position), score in full.items():
        i, j = positions.index(position), layers.index(layer)
        ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=1.4))
        ax.text(j, i - 0.28, f"{score:.1f}", ha="center", va="center", fontsize=6.5, color="black")
    if chosen is not None and chosen[0] in layers and chosen[1] in positions:
        ax.plot(
            layers.index(chosen[0]),
            positions.index(chosen[1]) + 0.12,
            marker="*",
            markersize=13,
            color="gold",
            markeredgecolor="black",
            linestyle="none",
            label=f"chosen: layer {chosen[0]}, position {chosen[1]}",
        )
        ax.legend(loc="upper left", fontsize=8, framealpha=0.9)
    stage = "stage-1 screen" if screened else "full score"
    ax.set_title(
        title
        or f"Candidate directions: bypass score ({stage}); outlined = fully scored (full score shown), grey = ineligible or unscored",
        fontsize=10,
    )
    return _save(figure, out)


def area_cosines(
    areas: Sequence[str], cosines: Sequence[Sequence[float]], out: Path | str, held_out: Sequence[str] = ()
) -> Path:
    """Annotated heatmap of the cosine similarity between the areas' diff-in-means directions.

    Fit areas come first, then held-out areas (their labels in orange), so the blocks are visible.
    """
    import numpy as np

    order = [a for a in areas if a not in held_out] + [a for a in areas if a in held_out]
    index = [list(areas).index(a) for a in order]
    matrix = np.asarray(cosines, dtype=float)[np.ix_(index, index)]
    n = len(order)
    size = max(5.0, 0.55 * n + 2.8)
    figure = _new_figure(size + 1.0, size)
    ax = figure.add_subplot()
    image = ax.imshow(matrix, cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
    figure.colorbar(image, ax=ax, fraction=0.046, pad=0.02).set_label("cosine similarity")
    labels = [_pretty(a) for a in order]
    ax.set_xticks(range(n), labels, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n), labels, fontsize=8)
    for tick_labels in (ax.get_xticklabels(), ax.get_yticklabels()):
        for label, area in zip(tick_labels, order, strict=True):
            label.set_color(HELD_OUT_COLOUR if area in held_out else "black")
    font = 7 if n > 10 else 8
    for i in range(n):
        for j in range(n):
            value = matrix[i, j]
            ax.text(
                j,
                i,
                f"{value:.2f}",
                ha="center",
                va="center",
                fontsize=font,
                color="white" if abs(value) > 0.6 else "black",
            )
    if held_out:
        ax.axhline(n - len(held_out) - 0.5, color="black", linewidth=1)
        ax.axvline(n - len(held_out) - 0.5, color="black", linewidth=1)
    note = "; held-out areas in orange" if held_out else ""
    ax.set_title(f"Cosine similarity of per-area refusal directions{note}", fontsize=10)
    return _save(figure, out)


def refusal_by_area(
    rows: Sequence[Mapping[str, Any]],
    out: Path | str,
    measure: str = "text",
    roles: Mapping[str, str] | None = None,
) -> Path:
    """Grouped bars: share of prompts refused before and after the edit, per area, with Wilson 95 % intervals.

    `rows` are `evaluate`'s evaluation_by_area.csv rows; `measure` "text" (refusal substrings) is the one
    with intervals in that file. One panel per label (unsafe, safe). With `roles` (a selective edit's area →
    "removed" / "kept") the removed areas and their total come first, then the kept ones, each area labelled.
    """
    import numpy as np

    labels = [label for label in ("unsafe", "safe") if any(r["label"] == label for r in rows)]
    if not labels:
        raise ValueError("no evaluation rows to plot")
    rank = {"removed": 0, "kept": 1}

    def place(area: str) -> tuple:
        role = (roles or {}).get(area) or area.removeprefix("ALL ").strip()
        return (area == "ALL", rank.get(role, 2), area.startswith("ALL "), area)

    areas = sorted({r["area"] for r in rows}, key=place)
    figure = _new_figure(max(8.0, 1.3 * len(areas) * len(labels) + 1.5), 4.8)
    axes = figure.subplots(1, len(labels), sharey=True, squeeze=False)[0]
    width = 0.38
    for ax, label in zip(axes, labels, strict=True):
        by_area = {r["area"]: r for r in rows if r["label"] == label}
        shown = [a for a in areas if a in by_area]
        x = np.arange(len(shown))
        for offset, side, colour in ((-width / 2, "source", SOURCE_COLOUR), (width / 2, "edited", EDITED_COLOUR)):
            counts = [_number(by_area[a][f"{side}_refused_{measure}"]) for a in shown]
            totals = [_number(by_area[a]["n"]) for a in shown]
            rates = [100 * c / t for c, t in zip(counts, totals, strict=True)]
            low = [_number(by_area[a].get(f"{measure}_{side}_ci_low")) for a in shown]
            high = [_number(by_area[a].get(f"{measure}_{side}_ci_high")) for a in shown]
            has_ci = not any(math.isnan(v) for v in low + high)
            errors = (
                [
                    [max(0.0, r - 100 * lo) for r, lo in zip(rates, low, strict=True)],
                    [max(0.0, 100 * hi - r) for r, hi in zip(rates, high, strict=True)],
                ]
                if has_ci
                else None
            )
            bars = ax.bar(
                x + offset,
                rates,
                width,
                yerr=errors,
                capsize=3,
                color=colour,
                label=side,
                error_kw={"elinewidth": 1},
            )
            for bar, count, total, top in zip(
                bars, counts, totals, (high if has_ci else [r / 100 for r in rates]), strict=True
            ):
                ax.text(
                    bar.get_x() + bar.get_width() / 2,
                    100 * top + 1.5,
                    f"{int(count)}/{int(total)}",
                    ha="center",
                    va="bottom",
                    fontsize=7,
                )
        names = [_pretty(a) + (f" ({roles[a]})" if roles and a in roles else "") for a in shown]
        ax.set_xticks(x, names, rotation=25, ha="right", fontsize=8)
        if "ALL" in shown:
            ax.axvline(len(shown) - 1.5, color="black", linewidth=0.8, linestyle=":")
        ax.set_ylim(0, 112)
        ax.set_title(f"{label} prompts", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
    axes[0].set_ylabel("refused (% of prompts)")
    handles, names = axes[0].get_legend_handles_labels()
    figure.legend(handles, names, loc="outside upper right", fontsize=8, ncols=2)
    how = "refusal substrings" if measure == "text" else "first-token refusal log-odds > 0"
    what = "Removed and kept areas" if roles else "Held-out areas"
    figure.suptitle(f"{what}: refusal before and after the edit ({how}; bars: Wilson 95 % CI)", fontsize=10)
    return _save(figure, out)


def budget_curve(
    summary: Sequence[Mapping[str, Any]],
    out: Path | str,
    points: Sequence[Mapping[str, Any]] = (),
    fitted_vs_held_out: float | None = None,
) -> Path:
    """Cosine with the held-out direction of directions fit from k areas: mean ± sd over random subsets.

    `summary` rows have n_areas, mean, sd (budget_summary.csv); `points` (budget_curve.csv rows with
    n_areas and cosine_with_held_out) are drawn as dots; `fitted_vs_held_out` as a dashed line.
    """
    if not summary:
        raise ValueError("no budget curve to plot")
    sizes = [_number(r["n_areas"]) for r in summary]
    means = [_number(r["mean"]) for r in summary]
    sds = [_number(r["sd"]) for r in summary]
    figure = _new_figure(6.4, 4.4)
    ax = figure.add_subplot()
    if points:
        ax.scatter(
            [_number(p["n_areas"]) for p in points],
            [_number(p["cosine_with_held_out"]) for p in points],
            s=14,
            color="#9ecae1",
            zorder=2,
            label="one random subset of areas",
        )
    ax.errorbar(
        sizes, means, yerr=sds, marker="o", capsize=4, color=FIT_COLOUR, zorder=3, label="mean ± sd over subsets"
    )
    if fitted_vs_held_out is not None:
        ax.axhline(
            fitted_vs_held_out, color=HELD_OUT_COLOUR, linestyle="--", linewidth=1.2, label="direction chosen by fit"
        )
    ax.set_xticks(sorted(set(sizes)), [str(int(s)) for s in sorted(set(sizes))])
    ax.set_xlabel("number of fit areas the direction is computed from")
    ax.set_ylabel("cosine with the held-out areas' direction")
    values = means + [m - s for m, s in zip(means, sds, strict=True)]
    values += [_number(p["cosine_with_held_out"]) for p in points]
    if fitted_vs_held_out is not None:
        values.append(fitted_vs_held_out)
    # Zoomed to the data (cosines are usually high), on a 0.1 grid so the scale reads at a glance.
    ax.set_ylim(max(-1.0, math.floor((min(values) - 0.05) * 10) / 10), 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("How many policy areas a direction needs to transfer", fontsize=10)
    return _save(figure, out)


def pareto_front(
    trials: Sequence[Mapping[str, Any]],
    chosen: int | Mapping[str, Any] | None,
    out: Path | str,
    refusal_label: str = "refusal rate on unsafe validation prompts (%)",
    kl_label: str = "first-token KL on safe prompts (nats)",
    refusal_is_fraction: bool = True,
    log_kl: bool = False,
    reference: Mapping[str, Any] | None = None,
) -> Path:
    """Every search trial as refusal vs KL, the Pareto front drawn as a step line, the choice starred.

    `reference` (a trial, e.g. the full-strength edit) is marked with a diamond for comparison.

    `trials` are dicts with "refusal", "kl", "on_front" (bool) and "chosen" (bool); `chosen` is a trial's
    index or the trial itself, or None to take the trial flagged "chosen". Refusal is a fraction unless
    `refusal_is_fraction` is False (then it is plotted as given).
    """
    if not trials:
        raise ValueError("no trials to plot")
    scale = 100.0 if refusal_is_fraction else 1.0
    refusal = [scale * _number(t["refusal"]) for t in trials]
    kl = [_number(t["kl"]) for t in trials]
    front = sorted((k, r) for k, r, t in zip(kl, refusal, trials, strict=True) if _flag(t.get("on_front", False)))
    if isinstance(chosen, int):
        pick: Mapping[str, Any] | None = trials[chosen]
    elif chosen is None:
        pick = next((t for t in trials if _flag(t.get("chosen", False))), None)
    else:
        pick = chosen
    figure = _new_figure(6.4, 4.6)
    ax = figure.add_subplot()
    ax.scatter(kl, refusal, s=16, color="#bdbdbd", zorder=2, label=f"trial ({len(trials)})")
    if front:
        ax.step(
            [k for k, _ in front],
            [r for _, r in front],
            where="post",
            color=FIT_COLOUR,
            linewidth=1.2,
            zorder=3,
        )
        ax.scatter(
            [k for k, _ in front],
            [r for _, r in front],
            s=26,
            color=FIT_COLOUR,
            zorder=4,
            label=f"Pareto front ({len(front)})",
        )
    if pick is not None:
        ax.scatter(
            [_number(pick["kl"])],
            [scale * _number(pick["refusal"])],
            marker="*",
            s=220,
            color="gold",
            edgecolor="black",
            zorder=5,
            label=f"chosen: refusal {scale * _number(pick['refusal']):.1f}{'%' if refusal_is_fraction else ''}, "
            f"KL {_number(pick['kl']):.3f}",
        )
    if reference is not None:
        ax.scatter(
            [_number(reference["kl"])],
            [scale * _number(reference["refusal"])],
            marker="D",
            s=60,
            facecolor="none",
            edgecolor="crimson",
            linewidth=1.5,
            zorder=6,
            label=f"full strength: refusal {scale * _number(reference['refusal']):.1f}"
            f"{'%' if refusal_is_fraction else ''}, KL {_number(reference['kl']):.3f}",
        )
    if log_kl:
        ax.set_xscale("log")
    ax.set_xlabel(kl_label)
    ax.set_ylabel(refusal_label)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    ax.set_title("Search trials: refusal vs KL (lower left is better)", fontsize=10)
    return _save(figure, out)
