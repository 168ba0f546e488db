"""Selective edits by policy area: which areas' refusal to remove and which to keep, the within-area split
that can measure both, and the candidate directions made blind to the kept areas.

A selective edit needs held-out prompts inside each named area (an area-disjoint split holds none of them out),
so the named areas' prompts are split per area and label, seeded. The first method (`orthogonal`): each
candidate, mean(unsafe of the removed areas) − mean(contrast) at one layer and position, loses its component in
the span of the kept areas' own mean differences at the same layer and position, so ablating it leaves the kept
areas' mean refusal signal where it was.
"""

from __future__ import annotations

import difflib
import random
from dataclasses import dataclass

import torch

from weight_edit.dataset import HARMLESS_LABEL, POLICY_LABELS, Dataset, DatasetError, Prompt, Split, _split_harmless

SELECTIVE_METHODS = ("orthogonal",)


class AreaError(DatasetError):
    """--remove / --keep name areas the dataset does not have, or name one twice."""


@dataclass(frozen=True)
class AreaChoice:
    """The areas whose refusal an edit removes and those whose refusal it must keep (both sorted)."""

    remove: tuple[str, ...]
    keep: tuple[str, ...]
    method: str = "orthogonal"

    def as_dict(self) -> dict[str, object]:
        return {"remove": list(self.remove), "keep": list(self.keep), "method": self.method}


def _names(text: str, option: str) -> list[str]:
    names = [name.strip() for name in text.split(",")]
    if not text.strip() or any(not name for name in names):
        raise AreaError(f"{option} {text!r}: give comma-separated area names, none empty")
    duplicated = sorted({name for name in names if names.count(name) > 1})
    if duplicated:
        raise AreaError(f"{option} names {', '.join(duplicated)} twice")
    return names


def parse_area_choice(
    remove: str | None, keep: str | None, categories: list[str], method: str = "orthogonal"
) -> AreaChoice | None:
    """The validated choice, or None when neither option is given (remove every fit area's refusal: the default).
    Unknown names are refused with the closest area the dataset has."""
    if remove is None and keep is None:
        return None
    if remove is None:
        raise AreaError("--keep needs --remove: name the areas whose refusal the edit removes")
    if method not in SELECTIVE_METHODS:
        raise AreaError(f"unknown selective method {method!r}; choose one of {', '.join(SELECTIVE_METHODS)}")
    chosen = {"--remove": _names(remove, "--remove"), "--keep": _names(keep, "--keep") if keep is not None else []}
    for option, names in chosen.items():
        for name in names:
            if name not in categories:
                close = difflib.get_close_matches(name, categories, n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                raise AreaError(f"{option}: the dataset has no area {name!r}{hint}; its areas: {', '.join(categories)}")
    both = sorted(set(chosen["--remove"]) & set(chosen["--keep"]))
    if both:
        raise AreaError(f"{', '.join(both)} named in both --remove and --keep")
    return AreaChoice(tuple(sorted(chosen["--remove"])), tuple(sorted(chosen["--keep"])), method)


def within_area_split(
    dataset: Dataset,
    areas: tuple[str, ...],
    seed: int,
    validation_fraction: float,
    held_out_fraction: float,
    harmless_fractions: tuple[float, float],
) -> Split:
    """Each named area's unsafe and safe prompts split into train / validation / held-out, per area and label, by
    a generator seeded with the seed, area and label (adding rows to one area leaves the others' parts unchanged);
    the harmless prompts as in every split. Areas not named are not used."""
    if validation_fraction < 0 or held_out_fraction < 0 or validation_fraction + held_out_fraction >= 1:
        raise ValueError(f"fractions {validation_fraction}, {held_out_fraction} must leave a training part")
    parts: dict[str, list[Prompt]] = {"train": [], "validation": [], "held_out": []}
    for area in areas:
        for label in POLICY_LABELS:
            group = [p for p in dataset.prompts if p.category == area and p.label == label]
            if len(group) < 3:
                raise AreaError(
                    f"{dataset.path}: area {area!r} has {len(group)} {label} prompts; a within-area split needs "
                    "at least 3 (one each to train, validate and hold out)"
                )
            random.Random(f"{seed}:{area}:{label}").shuffle(group)
            n_val = max(1, round(len(group) * validation_fraction))
            n_held = max(1, round(len(group) * held_out_fraction))
            parts["validation"] += group[:n_val]
            parts["held_out"] += group[n_val : n_val + n_held]
            parts["train"] += group[n_val + n_held :]
    harmless = _split_harmless(dataset.harmless, seed, *harmless_fractions)
    train, validation, held_out = (
        (*parts[name], *extra) for name, extra in zip(("train", "validation", "held_out"), harmless, strict=True)
    )
    return Split(seed, tuple(sorted(areas)), (), train, validation, held_out, design="within-area")


def split_for_edit(dataset: Dataset, record: dict, dataset_path) -> Split:
    """The within-area split a selective edit was fit on, from what `apply` recorded (`selective` in the
    provenance: areas, seed, dataset sha256), so `evaluate` holds out exactly the prompts `fit` never saw."""
    import settings

    if record.get("dataset_sha256") not in (None, dataset.sha256):
        raise AreaError(
            f"{dataset_path} is not the dataset the selective edit was fit on (sha256 differs): pass the --dataset "
            "`fit` used"
        )
    areas = tuple(record["remove"]) + tuple(record.get("keep", ()))
    return within_area_split(
        dataset,
        areas,
        int(record["seed"]),
        settings.AREA_VALIDATION_FRACTION,
        settings.AREA_HELD_OUT_FRACTION,
        (settings.HARMLESS_VALIDATION_FRACTION, settings.HARMLESS_HELD_OUT_FRACTION),
    )


def roles(record: dict) -> dict[str, str]:
    """Each named area's role in a selective edit: "removed" or "kept"."""
    return {**{a: "removed" for a in record["remove"]}, **{a: "kept" for a in record.get("keep", ())}}


def area_texts(split: Split, part: str, label: str, areas: tuple[str, ...], limit: int | None = None) -> list[str]:
    """The texts of one part and label restricted to `areas` (harmless prompts belong to none: all of them)."""
    prompts = split.prompts(part, label)
    if label != HARMLESS_LABEL:
        prompts = [p for p in prompts if p.category in areas]
    return [p.text for p in prompts[:limit]]


def project_off_span(vectors: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
    """`vectors` [..., d] without their component in the span of `others` [k, ..., d] at each leading index
    (v − Q Qᵀ v, Q an orthonormal basis of the k vectors there, from a QR decomposition in float64; vectors of
    `others` that are linearly dependent add nothing)."""
    if others.shape[0] == 0:
        return vectors
    flat_v = vectors.reshape(-1, vectors.shape[-1]).double()
    flat_o = others.reshape(others.shape[0], -1, others.shape[-1]).double().permute(1, 2, 0)  # [n, d, k]
    q, r = torch.linalg.qr(flat_o)
    scale = r.diagonal(dim1=-2, dim2=-1).abs().amax(dim=-1, keepdim=True).clamp_min(1e-300)
    q = q * (r.diagonal(dim1=-2, dim2=-1).abs() > 1e-10 * scale).unsqueeze(-2)  # drop dependent columns
    coefficients = torch.einsum("ndk,nd->nk", q, flat_v)
    projected = flat_v - torch.einsum("ndk,nk->nd", q, coefficients)
    return projected.reshape(vectors.shape).to(vectors.dtype)
