"""A Markdown report (README.md + PNG figures) from the aggregate files of `fit`, `evaluate` and `diagnose`.

It reads files only, so it can be rebuilt from a finished run or from `artifacts/`; an input that is
missing gives its section a "not run" line instead of an error. It never reads completions
(`evaluation_prompts.csv` is not opened), only counts, rates and scores.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from weight_edit import diagnose as diag

FIGURES = "figures"
SECTIONS = (
    "Chosen direction",
    "Held-out refusal before and after the edit",
    "Cosine similarity of per-area directions",
    "Principal components of the area directions",
    "Direction budget: how many areas transfer",
    "Refusal subspace",
    "Edit variants compared",
)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _read_csv(path: Path) -> list[dict[str, str]] | None:
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    except (OSError, csv.Error, UnicodeDecodeError):
        return None
    return rows or None


def _f(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _num(value: Any, digits: int = 3) -> str:
    x = _f(value)
    return "–" if math.isnan(x) else f"{x:.{digits}f}"


def _p(value: Any) -> str:
    x = _f(value)
    return "–" if math.isnan(x) else f"{x:.2g}"


def _pct(value: float) -> str:
    return "–" if math.isnan(value) else f"{100 * value:.0f} %"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return lines + [""]


def _not_run(what: str, where: Path | None, files: Sequence[str]) -> list[str]:
    place = f"`{where}`" if where is not None else "no folder given"
    return [f"Not run: {what} ({', '.join(f'`{name}`' for name in files)} not found; {place}).", ""]


class _Figures:
    """Draws figures into FOLDER/figures and returns Markdown links only to those written."""

    def __init__(self, folder: Path, enabled: bool) -> None:
        self.folder = folder
        self.enabled = enabled

    def link(self, name: str, caption: str, draw: Callable[[Path], object]) -> list[str]:
        if not self.enabled:
            return []
        path = self.folder / FIGURES / name
        try:
            draw(path)
        except ImportError as exc:
            return [f"Figure not drawn: {exc.name or 'matplotlib'} is not installed.", ""]
        except (ValueError, KeyError) as exc:
            return [f"Figure not drawn: {exc}.", ""]
        if not path.is_file() or path.stat().st_size == 0:
            return []
        return [f"![{caption}]({Path(os.path.relpath(path, self.folder)).as_posix()})", ""]


def _direction_section(fit_dir: Path | None, figures: _Figures) -> list[str]:
    from weight_edit import figures as fig

    lines = [f"## 1. {SECTIONS[0]}", ""]
    sidecar = _read_json(fit_dir / "direction.json") if fit_dir else None
    candidates = _read_csv(fit_dir / "candidates.csv") if fit_dir else None
    if sidecar is None:
        return lines + _not_run("`weight-edit fit`", fit_dir, ["direction.json"])
    scores = sidecar.get("scores", {})
    stats = sidecar.get("stats", {})
    split = sidecar.get("split", {})
    layers = sidecar.get("model_fingerprint", {}).get("num_layers", "?")
    positions = len(sidecar.get("post_instruction_tokens", [])) or "?"
    baseline = sidecar.get("baseline", {})
    contrast = sidecar.get("contrast", "safe")
    rows = [
        ("model", f"`{sidecar.get('model', {}).get('spec', '?')}`"),
        ("layer", f"{sidecar.get('layer')} of {layers}"),
        ("post-instruction position", f"{sidecar.get('position')} of {positions}"),
        ("bypass score (refusal log-odds, unsafe validation, ablated)", _num(scores.get("bypass"))),
        ("contrast (unsafe − …)", f"{contrast} prompts"),
        ("unsafe validation prompts still refused under ablation", _num(scores.get("refusal_rate"))),
        (f"induce score (refusal log-odds, {contrast} validation, added)", _num(scores.get("induce"))),
        (f"KL on {contrast} validation prompts under ablation (nats)", _num(scores.get("kl"), 4)),
        ("‖r‖ (diff-in-means norm)", _num(scores.get("norm"), 2)),
        (
            f"baseline refusal log-odds (unsafe / {contrast} validation)",
            f"{_num(baseline.get('unsafe_refusal_log_odds'), 2)} / {_num(baseline.get(f'{contrast}_refusal_log_odds'), 2)}",
        ),
        ("selection", sidecar.get("selection", "–")),
        (
            "candidates (eligible, fully scored)",
            f"{stats.get('candidates', '?')} ({stats.get('eligible', '?')}, {stats.get('fully_scored', '?')})",
        ),
        ("fit areas", ", ".join(split.get("fit_areas", [])) or "–"),
        ("held-out areas", ", ".join(split.get("held_out_areas", [])) or "–"),
        (
            "split seed; dataset sha256",
            f"{split.get('seed', '?')}; `{sidecar.get('dataset', {}).get('sha256', '?')[:16]}…`",
        ),
    ]
    lines += _table(["", "value"], rows)
    if candidates is None:
        return lines + ["Candidate scores: not run (`candidates.csv` not found).", ""]
    full = [r for r in candidates if r.get("bypass") not in (None, "")]
    if full:
        fit_settings = sidecar.get("settings", {})
        lines += [
            f"Fully scored candidates (the lowest bypass among those with induce > {fit_settings.get('min_induce', '?')} "
            f"and KL < {fit_settings.get('max_kl', '?')} is chosen):",
            "",
        ]
        lines += _table(
            ["layer", "position", "screen bypass", "bypass", "induce", "KL", "passes filters", "chosen"],
            [
                (
                    r["layer"],
                    r["position"],
                    _num(r.get("screen_bypass")),
                    _num(r.get("bypass")),
                    _num(r.get("induce")),
                    _num(r.get("kl"), 4),
                    "yes"
                    if r.get("passes_filters") == "True"
                    else ("no" if r.get("kl") not in (None, "") else "not needed"),
                    "**yes**" if r.get("selected") == "True" else "",
                )
                for r in sorted(full, key=lambda r: _f(r.get("bypass")))
            ],
        )
    chosen = (int(sidecar["layer"]), int(sidecar["position"])) if "layer" in sidecar and "position" in sidecar else None
    lines += figures.link(
        "candidate_scores.png",
        "bypass score of every candidate over layer and position",
        lambda path: fig.candidate_scores(candidates, path, chosen),
    )
    return lines


def _refusal_section(eval_dir: Path | None, figures: _Figures) -> list[str]:
    from weight_edit import figures as fig

    lines = [f"## 2. {SECTIONS[1]}", ""]
    rows = _read_csv(eval_dir / "evaluation_by_area.csv") if eval_dir else None
    summary = _read_json(eval_dir / "evaluation_summary.json") if eval_dir else None
    if rows is None:
        return lines + _not_run("`weight-edit evaluate`", eval_dir, ["evaluation_by_area.csv"])
    selective = (summary or {}).get("selective")
    roles = None
    if selective:
        from weight_edit.areas import roles as area_roles

        roles = area_roles(selective)
        lines += [
            f"Selective edit: refusal removed for {', '.join(selective['remove'])}, kept for "
            f"{', '.join(selective.get('keep', [])) or 'no named area'}; each area's held-out prompts come from a "
            "split within the area (rows `ALL removed` and `ALL kept` pool them).",
            "",
        ]
    if summary:
        lines += [
            f"Held-out areas: {', '.join(summary.get('held_out_areas', [])) or 'the named areas above'}. Greedy completions of "
            f"{summary.get('max_new_tokens', '?')} tokens in {summary.get('dtype', '?')}; refused = contains one of "
            f"{len(summary.get('refusal_substrings', []))} refusal substrings. Rates with Wilson 95 % intervals; "
            "difference (edited − source) with Newcombe's paired 95 % interval; exact McNemar p on the same prompts.",
            "",
        ]

    def rate(count: Any, n: Any, low: Any, high: Any) -> str:
        k, total = _f(count), _f(n)
        share = k / total if total else math.nan
        return f"{int(k)}/{int(total)} ({_pct(share)}) [{_pct(_f(low))}, {_pct(_f(high))}]"

    ordered = sorted(rows, key=lambda r: (r["area"] == "ALL", r["label"] != "unsafe", r["area"]))
    lines += _table(
        [
            "area",
            "prompts",
            "n",
            "source refused [95 % CI]",
            "edited refused [95 % CI]",
            "edited − source [95 % CI]",
            "flips (source only / edited only)",
            "McNemar p",
            "log-odds > 0: source → edited",
            "first-token KL",
        ],
        [
            (
                "**all held-out**" if r["area"] == "ALL" else r["area"],
                r["label"],
                r["n"],
                rate(r["source_refused_text"], r["n"], r.get("text_source_ci_low"), r.get("text_source_ci_high")),
                rate(r["edited_refused_text"], r["n"], r.get("text_edited_ci_low"), r.get("text_edited_ci_high")),
                f"{100 * _f(r.get('text_difference')):+.1f} pp [{100 * _f(r.get('text_difference_ci_low')):+.1f}, "
                f"{100 * _f(r.get('text_difference_ci_high')):+.1f}]",
                f"{r.get('text_source_only', '–')} / {r.get('text_edited_only', '–')}",
                _p(r.get("text_mcnemar_p")),
                f"{r.get('source_refused_log_odds', '–')} → {r.get('edited_refused_log_odds', '–')}",
                _num(r.get("mean_first_token_kl"), 3),
            )
            for r in ordered
        ],
    )
    lines += figures.link(
        "refusal_by_area.png",
        "refusal by held-out area before and after the edit",
        lambda path: fig.refusal_by_area(rows, path, roles=roles),
    )
    return lines


def _diagnostics(diagnose_dir: Path | None) -> dict[str, Any] | None:
    if diagnose_dir is None:
        return None
    summary = _read_json(diagnose_dir / diag.SUMMARY_JSON)
    if summary is None:
        return None
    return {
        "summary": summary,
        "cosines": _read_csv(diagnose_dir / diag.COSINES_CSV),
        "pca": _read_csv(diagnose_dir / diag.PCA_CSV),
        "budget": _read_csv(diagnose_dir / diag.BUDGET_CSV) or [],
        "budget_summary": _read_csv(diagnose_dir / diag.BUDGET_SUMMARY_CSV),
        "areas": _read_csv(diagnose_dir / diag.AREAS_CSV),
    }


def _cosine_section(data: dict[str, Any] | None, where: Path | None, figures: _Figures) -> list[str]:
    from weight_edit import figures as fig

    lines = [f"## 3. {SECTIONS[2]}", ""]
    if data is None or data["cosines"] is None:
        return lines + _not_run("`weight-edit diagnose`", where, [diag.SUMMARY_JSON, diag.COSINES_CSV])
    summary, matrix_rows = data["summary"], data["cosines"]
    areas = [r["area"] for r in matrix_rows]
    held_out = summary.get("held_out_areas", [])
    lines += [
        f"One direction per policy area (mean unsafe − mean safe of that area's prompts) at layer "
        f"{summary.get('layer')}, position {summary.get('position')}. Mean off-diagonal cosine "
        f"{_num(summary.get('mean_offdiagonal_cosine'))}; fitted direction vs the held-out areas' direction "
        f"{_num(summary.get('fitted_vs_held_out'))}; fitted direction vs the same diff-in-means recomputed here "
        f"from the fit areas' train prompts {_num(summary.get('fitted_vs_recomputed'), 4)} (≈ 1 unless the dtype "
        "or the prompts differ). Columns are numbered as the rows; held-out areas are marked †.",
        "",
    ]
    names = [f"{i + 1}. {a}{' †' if a in held_out else ''}" for i, a in enumerate(areas)]
    lines += _table(
        ["area", *(str(i + 1) for i in range(len(areas)))],
        [(name, *(_num(r[a], 2) for a in areas)) for name, r in zip(names, matrix_rows, strict=True)],
    )
    if data["areas"]:
        lines += ["Each area's direction against the fitted direction:", ""]
        lines += _table(
            ["area", "role", "unsafe / safe prompts", "‖area direction‖", "cosine with fitted direction"],
            [
                (
                    r["area"],
                    r["role"],
                    f"{r['unsafe_prompts']} / {r['safe_prompts']}",
                    _num(r["norm"], 2),
                    _num(r["cosine_with_fitted"]),
                )
                for r in data["areas"]
            ],
        )
    lines += figures.link(
        "area_cosines.png",
        "cosine similarity of per-area directions",
        lambda path: fig.area_cosines(areas, [[_f(r[a]) for a in areas] for r in matrix_rows], path, held_out),
    )
    return lines


def _pca_section(data: dict[str, Any] | None, where: Path | None) -> list[str]:
    lines = [f"## 4. {SECTIONS[3]}", ""]
    if data is None or data["pca"] is None:
        return lines + _not_run("`weight-edit diagnose`", where, [diag.PCA_CSV])
    summary = data["summary"]
    lines += [
        "Uncentred SVD of the unit-normalised area directions: the first ratio is the mean squared cosine of "
        "the areas with one best shared axis (1 when every area's direction is the same). |cosine| of the first "
        f"component with the fitted direction: {_num(summary.get('first_component_vs_fitted'))}.",
        "",
    ]
    lines += _table(
        ["component", "singular value", "explained variance ratio", "cumulative"],
        [
            (
                r["component"],
                _num(r["singular_value"]),
                _num(r["explained_variance_ratio"]),
                _num(r["cumulative_ratio"]),
            )
            for r in data["pca"]
        ],
    )
    return lines


def _budget_section(data: dict[str, Any] | None, where: Path | None, figures: _Figures) -> list[str]:
    from weight_edit import figures as fig

    lines = [f"## 5. {SECTIONS[4]}", ""]
    if data is None or data["budget_summary"] is None:
        return lines + _not_run("`weight-edit diagnose` with held-out areas", where, [diag.BUDGET_SUMMARY_CSV])
    settings = data["summary"].get("settings", {})
    lines += [
        "Directions fit from k randomly chosen fit areas (their train prompts, pooled as in `fit`; "
        f"up to {settings.get('budget_repeats', '?')} distinct subsets per k, seed {settings.get('seed', '?')}), "
        "compared by cosine with the direction of the held-out areas (all their prompts). The last row uses every "
        "fit area.",
        "",
    ]
    lines += _table(
        ["areas (k)", "subsets", "mean cosine", "sd", "min", "max"],
        [
            (r["n_areas"], r["subsets"], _num(r["mean"]), _num(r["sd"]), _num(r["min"]), _num(r["max"]))
            for r in data["budget_summary"]
        ],
    )
    fitted = data["summary"].get("fitted_vs_held_out")
    lines += figures.link(
        "budget_curve.png",
        "cosine with the held-out direction against the number of fit areas",
        lambda path: fig.budget_curve(data["budget_summary"], path, data["budget"], fitted),
    )
    return lines


def _subspace_section(data: dict[str, Any] | None, where: Path | None) -> list[str]:
    lines = [f"## 6. {SECTIONS[5]}", ""]
    if data is None or where is None or not (where / diag.SUBSPACE_FILE).is_file():
        return lines + _not_run("`weight-edit diagnose`", where, [diag.SUBSPACE_FILE])
    summary = data["summary"]
    source = summary.get("settings", {}).get("subspace_from", {})
    lines += [
        f"`{diag.SUBSPACE_FILE}` holds `subspace` [{summary.get('subspace_rank')}, d]: row 0 is the unit fitted "
        "direction, the next rows the principal components of the area directions with the fitted direction "
        "projected out (orthonormal, nested: the first k rows are the rank-k basis). Built from the "
        f"{', '.join(source.get('parts', ['train']))} prompts of the fit areas only "
        f"({len(source.get('areas', []))} areas), so the held-out areas stay held out.",
        "",
    ]
    return lines


def _variants_section(variants: dict[str, Path]) -> list[str]:
    """One row per edit variant (rank-k, tuned strengths, …): the same held-out prompts, each against the source."""
    lines = [f"## 7. {SECTIONS[6]}", ""]
    if not variants:
        return lines + ["Not run: no variant evaluations given (`weight-edit report --variant NAME=DIR`).", ""]
    lines += [
        "Each variant's `evaluate` on the same held-out prompts, paired with the source: refusal by the paper's "
        "substrings with Wilson 95 % intervals, the paired difference with Newcombe's interval and the exact "
        "McNemar p; safe-prompt refusals (flips source only / edited only); mean first-token KL on safe prompts.",
        "",
    ]
    rows = []
    for name, folder in variants.items():
        summary = _read_json(folder / "evaluation_summary.json")
        if summary is None:
            rows.append((name, "not run", "", "", "", "", ""))
            continue
        unsafe, safe = summary["overall"]["unsafe"], summary["overall"]["safe"]
        n_u, n_s = _f(unsafe["n"]), _f(safe["n"])
        rows.append(
            (
                f"`{name}`",
                f"{unsafe['source_refused_text']}/{int(n_u)} → {unsafe['edited_refused_text']}/{int(n_u)} "
                f"[{_pct(_f(unsafe.get('text_edited_ci_low')))}, {_pct(_f(unsafe.get('text_edited_ci_high')))}]",
                f"{100 * _f(unsafe.get('text_difference')):+.1f} pp [{100 * _f(unsafe.get('text_difference_ci_low')):+.1f}, "
                f"{100 * _f(unsafe.get('text_difference_ci_high')):+.1f}], p = {_p(unsafe.get('text_mcnemar_p'))}",
                f"{unsafe.get('edited_refused_broad', '–')}/{int(n_u)}",
                f"{safe['source_refused_text']}/{int(n_s)} → {safe['edited_refused_text']}/{int(n_s)} "
                f"({safe.get('text_source_only', '–')} / {safe.get('text_edited_only', '–')}), "
                f"p = {_p(safe.get('text_mcnemar_p'))}",
                _num(safe.get("mean_first_token_kl"), 3),
                summary.get("dtype", "?"),
            )
        )
    lines += _table(
        [
            "variant",
            "unsafe refused: source → edited [95 % CI]",
            "edited − source [95 % CI], McNemar p",
            "unsafe, broad markers",
            "safe refused: source → edited (flips), McNemar p",
            "safe KL",
            "compute dtype",
        ],
        rows,
    )
    return lines


def write_report(
    folder: Path | str,
    fit_dir: Path | str | None = None,
    eval_dir: Path | str | None = None,
    diagnose_dir: Path | str | None = None,
    draw_figures: bool = True,
    title: str = "Evaluation and generalization report",
    variants: dict[str, Path | str] | None = None,
) -> Path:
    """Write FOLDER/README.md (and FOLDER/figures/*.png) from whichever inputs exist; returns the README path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fit_dir, eval_dir, diagnose_dir = (Path(d) if d is not None else None for d in (fit_dir, eval_dir, diagnose_dir))
    figures = _Figures(folder, draw_figures)
    data = _diagnostics(diagnose_dir)
    lines = [f"# {title}", ""]
    lines += [
        "Built by `weight-edit report` from aggregate files only: "
        + "; ".join(
            f"{name} `{path}`" if path is not None else f"{name}: none"
            for name, path in (("fit", fit_dir), ("evaluate", eval_dir), ("diagnose", diagnose_dir))
        )
        + ". No completions are read or shown.",
        "",
    ]
    lines += _direction_section(fit_dir, figures)
    lines += _refusal_section(eval_dir, figures)
    lines += _cosine_section(data, diagnose_dir, figures)
    lines += _pca_section(data, diagnose_dir)
    lines += _budget_section(data, diagnose_dir, figures)
    lines += _subspace_section(data, diagnose_dir)
    lines += _variants_section({name: Path(path) for name, path in (variants or {}).items()})
    readme = folder / "README.md"
    readme.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    return readme
