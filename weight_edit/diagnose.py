"""Generalization diagnostics of the refusal direction across policy areas.

At the chosen (layer, post-instruction position) the residual input of every prompt is collected once;
everything else is a pure function of that activation table, so it is testable without a model:

* one diff-in-means direction per policy area (mean unsafe − mean safe of that area's prompts);
* their cosine-similarity matrix and the principal components of the unit area directions;
* a budget curve: directions fit from k of the fit areas (seeded random subsets) compared by cosine
  with the direction of the held-out areas, which shows how many areas a direction needs to transfer;
* the cosine of the fitted direction with each area's direction and with the held-out direction;
* `refusal_subspace`: an orthonormal basis [fitted direction, top area components orthogonal to it]
  for a rank-k edit. It is built from the fit areas' train prompts only, so held-out areas stay held out.
"""

from __future__ import annotations

import csv
import json
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from weight_edit.activations import tokenized_batches
from weight_edit.chat import Batch, post_instruction_ids
from weight_edit.dataset import POLICY_LABELS, Split
from weight_edit.models import input_device

Advance = Callable[[int], None]
ProgressFactory = Callable[[str, int], Advance]

PARTS = ("train", "validation", "held_out")
BUDGET_SIZES = (2, 4, 6, 8)
BUDGET_REPEATS = 5
# File names written by `save_diagnostics` (and read by the report).
COSINES_CSV = "area_cosines.csv"
PCA_CSV = "area_pca.csv"
BUDGET_CSV = "budget_curve.csv"
BUDGET_SUMMARY_CSV = "budget_summary.csv"
AREAS_CSV = "area_directions.csv"
SUMMARY_JSON = "diagnostics.json"
AREA_DIRECTIONS_FILE = "area_directions.safetensors"
SUBSPACE_FILE = "subspace.safetensors"


def no_progress(description: str, total: int) -> Advance:
    return lambda n: None


@dataclass(frozen=True)
class PromptActivations:
    """Residual input at one (layer, position) for every prompt, with each prompt's area, label and part."""

    activations: torch.Tensor  # [prompts, d]
    areas: tuple[str, ...]
    labels: tuple[str, ...]  # "safe" or "unsafe"
    parts: tuple[str, ...]  # "train", "validation" or "held_out"

    def __post_init__(self) -> None:
        n = self.activations.shape[0]
        if self.activations.ndim != 2 or not (len(self.areas) == len(self.labels) == len(self.parts) == n):
            raise ValueError("activations must be [prompts, d] with one area, label and part per prompt")

    def mask(self, areas: Sequence[str] | None = None, label: str | None = None, parts: Sequence[str] | None = None):
        keep = [
            (areas is None or a in areas) and (label is None or lab == label) and (parts is None or p in parts)
            for a, lab, p in zip(self.areas, self.labels, self.parts, strict=True)
        ]
        return torch.tensor(keep, dtype=torch.bool)


# --- collecting activations (needs a model) ---------------------------------------------------------


@torch.inference_mode()
def prompt_residuals(
    model: torch.nn.Module, prepared: list[Batch], layer: int, position: int, advance: Advance | None = None
) -> torch.Tensor:
    """Residual input of `layer` at `position` (negative, from the end) for each prompt: [prompts, d] float32.

    The per-prompt counterpart of `activations.mean_residuals`: hidden_states[layer] is the input of
    `layer`, and left padding puts the post-instruction tokens at the same negative positions in every row.
    """
    rows = []
    for batch in prepared:
        out = model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            output_hidden_states=True,
            use_cache=False,
            logits_to_keep=1,
        )
        rows.append(out.hidden_states[layer][:, position, :].float().cpu())
        if advance:
            advance(batch.input_ids.shape[0])
    if not rows:
        raise ValueError("no prompts to collect activations from")
    return torch.cat(rows)


def collect_activations(
    model: torch.nn.Module,
    tokenizer,
    split: Split,
    layer: int,
    position: int,
    batch_size: int,
    progress: ProgressFactory = no_progress,
) -> PromptActivations:
    """Every prompt of every area (train, validation and held-out parts) at the chosen layer and position."""
    suffix = post_instruction_ids(tokenizer)
    if not -len(suffix) <= position <= -1:
        raise ValueError(
            f"position {position} is not one of the {len(suffix)} post-instruction positions (-1 … -{len(suffix)})"
        )
    num_layers = model.config.get_text_config().num_hidden_layers
    if not 0 <= layer < num_layers:
        raise ValueError(f"layer {layer} is outside the model's {num_layers} layers")
    device = input_device(model)
    blocks, areas, labels, parts = [], [], [], []
    for part in PARTS:
        for label in POLICY_LABELS:
            prompts = split.select(part, label)
            if not prompts:
                continue
            prepared = tokenized_batches(tokenizer, [p.text for p in prompts], batch_size, device, suffix)
            advance = progress(f"activations: {part} {label}", len(prompts))
            blocks.append(prompt_residuals(model, prepared, layer, position, advance))
            areas += [p.category for p in prompts]
            labels += [label] * len(prompts)
            parts += [part] * len(prompts)
    return PromptActivations(torch.cat(blocks), tuple(areas), tuple(labels), tuple(parts))


# --- pure functions over the activation table ------------------------------------------------------


def contrast(acts: PromptActivations, areas: Sequence[str], parts: Sequence[str] | None = None) -> torch.Tensor:
    """mean(unsafe) − mean(safe) over the prompts of `areas` (optionally only `parts`), pooled, float64."""
    unsafe = acts.mask(areas, "unsafe", parts)
    safe = acts.mask(areas, "safe", parts)
    if not unsafe.any() or not safe.any():
        raise ValueError(f"areas {sorted(areas)} (parts {parts or 'all'}) need both unsafe and safe prompts")
    x = acts.activations.double()
    return x[unsafe].mean(0) - x[safe].mean(0)


def area_directions(
    acts: PromptActivations, areas: Sequence[str] | None = None, parts: Sequence[str] | None = None
) -> tuple[list[str], torch.Tensor]:
    """One diff-in-means direction per area (sorted names): [areas, d] float64."""
    names = sorted(set(acts.areas)) if areas is None else list(areas)
    return names, torch.stack([contrast(acts, [a], parts) for a in names])


def _unit_rows(matrix: torch.Tensor) -> torch.Tensor:
    norms = matrix.double().norm(dim=-1, keepdim=True)
    if (norms == 0).any():
        raise ValueError("a zero direction has no cosine")
    return matrix.double() / norms


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(_unit_rows(a.reshape(1, -1))[0] @ _unit_rows(b.reshape(1, -1))[0])


def cosine_matrix(directions: torch.Tensor) -> torch.Tensor:
    """Pairwise cosine similarity of the rows: [n, n] float64."""
    unit = _unit_rows(directions)
    return unit @ unit.T


@dataclass
class PrincipalComponents:
    components: torch.Tensor  # [k, d] float64, unit rows, strongest first
    singular_values: list[float]
    explained_variance_ratio: list[float]


def _fix_signs(rows: torch.Tensor) -> torch.Tensor:
    """A deterministic sign per row: its largest-magnitude entry is positive (SVD signs are arbitrary)."""
    pivot = rows.gather(1, rows.abs().argmax(dim=1, keepdim=True))
    return rows * torch.where(pivot < 0, -1.0, 1.0).to(rows.dtype)


def principal_components(directions: torch.Tensor) -> PrincipalComponents:
    """PCA of the unit-normalised area directions by an *uncentred* SVD.

    Uncentred on purpose: the question is whether the areas share one direction, and centring would
    subtract their mean — that shared refusal component itself — leaving only how the areas differ.
    Uncentred, the first ratio s₁²/Σs² is the mean squared cosine of the areas with the best single
    axis (1 exactly when all directions are parallel up to sign), and the ratios give how many axes
    the areas' directions need.
    """
    unit = _unit_rows(directions)
    _, s, vh = torch.linalg.svd(unit, full_matrices=False)
    energy = s.pow(2)
    return PrincipalComponents(_fix_signs(vh), s.tolist(), (energy / energy.sum()).tolist())


@dataclass
class BudgetPoint:
    n_areas: int
    repeat: int
    areas: tuple[str, ...]
    cosine: float  # with the held-out direction


def _distinct_subsets(pool: Sequence[str], size: int, repeats: int, rng: random.Random) -> list[tuple[str, ...]]:
    """Up to `repeats` different random subsets (fewer when fewer exist), each sorted."""
    wanted = min(repeats, math.comb(len(pool), size))
    chosen: list[tuple[str, ...]] = []
    while len(chosen) < wanted:
        subset = tuple(sorted(rng.sample(list(pool), size)))
        if subset not in chosen:
            chosen.append(subset)
    return chosen


def budget_curve(
    acts: PromptActivations,
    fit_areas: Sequence[str],
    held_out_areas: Sequence[str],
    sizes: Sequence[int] = BUDGET_SIZES,
    repeats: int = BUDGET_REPEATS,
    seed: int = 0,
    fit_parts: Sequence[str] | None = ("train",),
) -> list[BudgetPoint]:
    """Cosine between a direction fit from k fit areas and the held-out areas' direction, per random subset.

    Like `fit`, each direction pools the prompts of its areas (mean unsafe − mean safe over their
    `fit_parts` prompts); the held-out direction pools every held-out prompt. Sizes above the number of
    fit areas are skipped; all fit areas together are always added as the last point (one subset).
    """
    pool = sorted(fit_areas)
    target = contrast(acts, held_out_areas)
    rng = random.Random(seed)
    points = []
    steps = sorted({k for k in sizes if 1 <= k < len(pool)} | {len(pool)})
    for size in steps:
        for repeat, subset in enumerate(_distinct_subsets(pool, size, repeats, rng)):
            points.append(BudgetPoint(size, repeat, subset, cosine(contrast(acts, subset, fit_parts), target)))
    return points


def summarise_budget(points: Sequence[BudgetPoint]) -> list[dict[str, float]]:
    """Per number of areas: subsets, mean, sample standard deviation (0 for one subset), min and max."""
    rows = []
    for size in sorted({p.n_areas for p in points}):
        values = torch.tensor([p.cosine for p in points if p.n_areas == size], dtype=torch.float64)
        sd = float(values.std()) if len(values) > 1 else 0.0
        rows.append(
            {
                "n_areas": size,
                "subsets": len(values),
                "mean": float(values.mean()),
                "sd": sd,
                "min": float(values.min()),
                "max": float(values.max()),
            }
        )
    return rows


def _without(directions: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Unit-normalised rows of `directions` with their component along the unit vector `r` removed."""
    unit = _unit_rows(directions)
    return unit - (unit @ r)[:, None] * r[None, :]


def _unit_vector(vector: torch.Tensor) -> torch.Tensor:
    r = vector.double().reshape(-1)
    if not torch.isfinite(r).all() or r.norm() == 0:
        raise ValueError("the fitted direction must be a finite, non-zero vector")
    return r / r.norm()


def _numerical_rank(singular_values: torch.Tensor, relative: float = 1e-8) -> int:
    if not len(singular_values) or float(singular_values[0]) <= 1e-12:
        return 0
    return int((singular_values > relative * float(singular_values[0])).sum())


def subspace_rank_limit(area_directions: torch.Tensor, fitted_direction: torch.Tensor) -> int:
    """Largest rank `refusal_subspace` can build: 1 + numerical rank of the area directions without r̂."""
    r = _unit_vector(fitted_direction)
    return 1 + _numerical_rank(torch.linalg.svdvals(_without(area_directions, r)))


def refusal_subspace(area_directions: torch.Tensor, fitted_direction: torch.Tensor, rank: int) -> torch.Tensor:
    """Orthonormal basis [rank, d] (float64): row 0 is the unit fitted direction, the next rows the top
    principal components (uncentred, as in `principal_components`) of the unit area directions once the
    fitted direction is projected out of them.

    Rows are nested: the first k rows of a rank-K basis are the rank-k basis. Orthonormalised by QR with a
    positive diagonal (Gram–Schmidt) in float64, so row 0 is the unit fitted direction to rounding.
    """
    if rank < 1:
        raise ValueError("rank must be at least 1")
    r = _unit_vector(fitted_direction)
    rows = [r]
    if rank > 1:
        _, s, vh = torch.linalg.svd(_without(area_directions, r), full_matrices=False)
        usable = _numerical_rank(s)
        if rank - 1 > usable:
            raise ValueError(
                f"rank {rank} needs {rank - 1} area components independent of the fitted direction; "
                f"the {area_directions.shape[0]} area directions give {usable}"
            )
        rows += list(_fix_signs(vh[: rank - 1]))
    q, upper = torch.linalg.qr(torch.stack(rows).T)
    q = q * torch.sign(torch.diagonal(upper))[None, :]
    return q.T.contiguous()


# --- everything together ---------------------------------------------------------------------------


@dataclass
class Diagnostics:
    layer: int
    position: int
    areas: list[str]  # rows and columns of every per-area table, sorted
    fit_areas: list[str]
    held_out_areas: list[str]
    prompts_per_area: dict[str, dict[str, int]]  # area -> {"unsafe": n, "safe": n}
    area_directions: torch.Tensor  # [areas, d] float64, all prompts of each area
    cosines: torch.Tensor  # [areas, areas]
    pca: PrincipalComponents
    fitted_cosines: dict[str, float]  # cosine of the fitted direction with each area's direction
    fitted_vs_held_out: float | None  # cosine of the fitted direction with the held-out direction
    fitted_vs_recomputed: float  # fitted direction vs mean unsafe − mean safe of the fit areas' train prompts
    first_component_vs_fitted: float  # |cosine| of PC1 with the fitted direction (PC signs are arbitrary)
    budget: list[BudgetPoint]
    budget_summary: list[dict[str, float]]
    subspace: torch.Tensor  # [k_max, d] float64, from the fit areas' train prompts only
    settings: dict[str, object] = field(default_factory=dict)


def diagnose(
    acts: PromptActivations,
    fit_areas: Sequence[str],
    held_out_areas: Sequence[str],
    fitted_direction: torch.Tensor,
    layer: int,
    position: int,
    seed: int = 0,
    sizes: Sequence[int] = BUDGET_SIZES,
    repeats: int = BUDGET_REPEATS,
    max_rank: int | None = None,
) -> Diagnostics:
    """All diagnostics from an activation table (pure: no model)."""
    names, directions = area_directions(acts)
    pca = principal_components(directions)
    fitted = fitted_direction.double().reshape(-1)
    fit_names, fit_directions = area_directions(acts, sorted(fit_areas), ("train",))
    limit = subspace_rank_limit(fit_directions, fitted)
    rank = limit if max_rank is None else min(max_rank, limit)
    points = budget_curve(acts, fit_areas, held_out_areas, sizes, repeats, seed) if held_out_areas else []
    return Diagnostics(
        layer=layer,
        position=position,
        areas=names,
        fit_areas=sorted(fit_areas),
        held_out_areas=sorted(held_out_areas),
        prompts_per_area={a: {lab: int(acts.mask([a], lab).sum()) for lab in ("unsafe", "safe")} for a in names},
        area_directions=directions,
        cosines=cosine_matrix(directions),
        pca=pca,
        fitted_cosines={a: cosine(fitted, d) for a, d in zip(names, directions, strict=True)},
        fitted_vs_held_out=cosine(fitted, contrast(acts, held_out_areas)) if held_out_areas else None,
        fitted_vs_recomputed=cosine(fitted, contrast(acts, fit_areas, ("train",))),
        first_component_vs_fitted=abs(cosine(fitted, pca.components[0])),
        budget=points,
        budget_summary=summarise_budget(points),
        subspace=refusal_subspace(fit_directions, fitted, rank),
        settings={
            "seed": seed,
            "budget_sizes": list(sizes),
            "budget_repeats": repeats,
            "pca": "uncentred SVD of the unit-normalised area directions",
            "area_directions": "mean unsafe - mean safe over every prompt of the area",
            "budget_fit_parts": ["train"],
            "subspace_from": {"areas": fit_names, "parts": ["train"]},
        },
    )


def run_diagnostics(
    model: torch.nn.Module,
    tokenizer,
    split: Split,
    layer: int,
    position: int,
    fitted_direction: torch.Tensor,
    batch_size: int,
    seed: int = 0,
    progress: ProgressFactory = no_progress,
) -> Diagnostics:
    """Collect the activation table with the model, then compute every diagnostic from it."""
    acts = collect_activations(model, tokenizer, split, layer, position, batch_size, progress)
    return diagnose(acts, split.fit_areas, split.held_out_areas, fitted_direction, layer, position, seed)


# --- files -----------------------------------------------------------------------------------------


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def _r(x: float) -> float:
    return round(float(x), 6)


def save_diagnostics(result: Diagnostics, folder: Path | str) -> list[Path]:
    """Write the aggregates: CSV tables, a JSON summary and the direction tensors (no prompts, no text)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    role = {a: ("fit" if a in result.fit_areas else "held_out") for a in result.areas}
    paths = [folder / name for name in (COSINES_CSV, PCA_CSV, BUDGET_CSV, BUDGET_SUMMARY_CSV, AREAS_CSV)]
    _write_csv(
        paths[0],
        ["area", *result.areas],
        [[a, *(_r(c) for c in row)] for a, row in zip(result.areas, result.cosines.tolist(), strict=True)],
    )
    ratios = result.pca.explained_variance_ratio
    _write_csv(
        paths[1],
        ["component", "singular_value", "explained_variance_ratio", "cumulative_ratio"],
        [
            [i + 1, _r(s), _r(v), _r(sum(ratios[: i + 1]))]
            for i, (s, v) in enumerate(zip(result.pca.singular_values, ratios, strict=True))
        ],
    )
    _write_csv(
        paths[2],
        ["n_areas", "repeat", "areas", "cosine_with_held_out"],
        [[p.n_areas, p.repeat, ";".join(p.areas), _r(p.cosine)] for p in result.budget],
    )
    summary_header = ["n_areas", "subsets", "mean", "sd", "min", "max"]
    _write_csv(
        paths[3],
        summary_header,
        [[row["n_areas"], row["subsets"], *(_r(row[k]) for k in summary_header[2:])] for row in result.budget_summary],
    )
    norms = result.area_directions.norm(dim=1).tolist()
    _write_csv(
        paths[4],
        ["area", "role", "unsafe_prompts", "safe_prompts", "norm", "cosine_with_fitted"],
        [
            [
                a,
                role[a],
                result.prompts_per_area[a]["unsafe"],
                result.prompts_per_area[a]["safe"],
                _r(n),
                _r(result.fitted_cosines[a]),
            ]
            for a, n in zip(result.areas, norms, strict=True)
        ],
    )
    summary = {
        "layer": result.layer,
        "position": result.position,
        "areas": result.areas,
        "fit_areas": result.fit_areas,
        "held_out_areas": result.held_out_areas,
        "fitted_vs_held_out": None if result.fitted_vs_held_out is None else _r(result.fitted_vs_held_out),
        "fitted_vs_recomputed": _r(result.fitted_vs_recomputed),
        "first_component_vs_fitted": _r(result.first_component_vs_fitted),
        "explained_variance_ratio": [_r(v) for v in ratios],
        "mean_offdiagonal_cosine": _r(_mean_offdiagonal(result.cosines)),
        "budget_summary": result.budget_summary,
        "subspace_rank": result.subspace.shape[0],
        "settings": result.settings,
    }
    paths.append(folder / SUMMARY_JSON)
    paths[-1].write_text(json.dumps(summary, indent=2) + "\n")
    meta = {"format": "pt", "layer": str(result.layer), "position": str(result.position)}
    paths.append(folder / AREA_DIRECTIONS_FILE)
    save_file(
        {"directions": result.area_directions.float().contiguous()},
        str(paths[-1]),
        metadata={**meta, "areas": json.dumps(result.areas)},
    )
    paths.append(folder / SUBSPACE_FILE)
    save_file(
        {"subspace": result.subspace.float().contiguous()},
        str(paths[-1]),
        metadata={**meta, "fit_areas": json.dumps(result.fit_areas), "rows": "unit fitted direction, then area PCs"},
    )
    return paths


def _mean_offdiagonal(matrix: torch.Tensor) -> float:
    n = matrix.shape[0]
    if n < 2:
        return float("nan")
    return float((matrix.sum() - matrix.diagonal().sum()) / (n * n - n))
