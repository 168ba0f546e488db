"""The policy-area prompt dataset: loading with row-level validation, and area-disjoint splits."""

from __future__ import annotations

import csv
import hashlib
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

COLUMNS = ("prompt", "label", "category")
LABELS = ("safe", "unsafe")


class DatasetError(ValueError):
    """The CSV breaks a rule; the message names the file, row and column."""


@dataclass(frozen=True)
class Prompt:
    text: str
    label: str  # "safe" or "unsafe"
    category: str
    row: int  # 1-based line number in the CSV (header is line 1)


@dataclass(frozen=True)
class Dataset:
    path: Path
    sha256: str
    prompts: tuple[Prompt, ...]

    @property
    def categories(self) -> list[str]:
        return sorted({p.category for p in self.prompts})


@dataclass(frozen=True)
class Split:
    """Area-disjoint split: fit areas (train + validation prompts) and held-out areas."""

    seed: int
    fit_areas: tuple[str, ...]
    held_out_areas: tuple[str, ...]
    train: tuple[Prompt, ...]
    validation: tuple[Prompt, ...]
    held_out: tuple[Prompt, ...]

    def select(self, part: str, label: str) -> list[Prompt]:
        return [p for p in getattr(self, part) if p.label == label]

    def table(self) -> list[dict[str, object]]:
        """One row per area: its role and prompt counts per part and label."""
        rows = []
        for area in sorted(self.fit_areas + self.held_out_areas):
            role = "fit" if area in self.fit_areas else "held_out"
            row: dict[str, object] = {"category": area, "role": role}
            for part in ("train", "validation", "held_out"):
                for label in LABELS:
                    row[f"{part}_{label}"] = sum(
                        1 for p in getattr(self, part) if p.category == area and p.label == label
                    )
            rows.append(row)
        return rows

    def as_dict(self) -> dict[str, object]:
        return {
            "seed": self.seed,
            "fit_areas": list(self.fit_areas),
            "held_out_areas": list(self.held_out_areas),
            "counts": {
                part: {label: len(self.select(part, label)) for label in LABELS}
                for part in ("train", "validation", "held_out")
            },
        }


def load_dataset(path: Path | str) -> Dataset:
    """Read and validate a prompt CSV; every problem names its row and column."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError as exc:
        raise DatasetError(f"{path}: file not found") from exc
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DatasetError(f"{path}: line {line} is not valid UTF-8") from exc
    reader = csv.reader(text.splitlines())
    header = next(reader, None)
    if header is None:
        raise DatasetError(f"{path}: file is empty (expected header {','.join(COLUMNS)})")
    header = [h.strip() for h in header]
    if tuple(header) != COLUMNS:
        missing = [c for c in COLUMNS if c not in header]
        extra = [c for c in header if c not in COLUMNS]
        detail = (
            "; ".join(
                part
                for part in (
                    f"missing column(s) {', '.join(missing)}" if missing else "",
                    f"unexpected column(s) {', '.join(extra)}" if extra else "",
                )
                if part
            )
            or "columns out of order"
        )
        raise DatasetError(f"{path}: header must be exactly {','.join(COLUMNS)}: {detail}")

    prompts: list[Prompt] = []
    seen: dict[str, int] = {}
    for line, row in enumerate(reader, start=2):
        if not row:
            continue
        if len(row) != len(COLUMNS):
            raise DatasetError(f"{path}: row {line} has {len(row)} fields, expected {len(COLUMNS)}")
        prompt, label, category = row
        if not prompt.strip():
            raise DatasetError(f"{path}: row {line}, column 'prompt' is empty")
        if label not in LABELS:
            raise DatasetError(f"{path}: row {line}, column 'label' is {label!r}; expected 'safe' or 'unsafe'")
        if not category.strip():
            raise DatasetError(f"{path}: row {line}, column 'category' is empty")
        key = " ".join(prompt.split()).casefold()
        if key in seen:
            raise DatasetError(f"{path}: row {line}, column 'prompt' duplicates row {seen[key]}")
        seen[key] = line
        prompts.append(Prompt(prompt.strip(), label, category.strip(), line))
    if not prompts:
        raise DatasetError(f"{path}: has a header but no rows")
    labels_by_area: dict[str, set[str]] = defaultdict(set)
    for p in prompts:
        labels_by_area[p.category].add(p.label)
    for area, labels in sorted(labels_by_area.items()):
        if labels != set(LABELS):
            only = next(iter(labels))
            raise DatasetError(f"{path}: category '{area}' has only '{only}' prompts; each area needs both labels")
    return Dataset(path, hashlib.sha256(raw).hexdigest(), tuple(prompts))


def split_dataset(
    dataset: Dataset, seed: int, held_out_areas: int, validation_fraction: float, min_fit_areas: int = 2
) -> Split:
    """Deterministic area-disjoint split; within fit areas, a per-area, per-label validation part."""
    areas = dataset.categories
    if len(areas) < held_out_areas + min_fit_areas:
        raise DatasetError(
            f"{dataset.path}: {len(areas)} policy areas, but the split needs {held_out_areas} held-out "
            f"+ at least {min_fit_areas} fit areas"
        )
    rng = random.Random(seed)
    shuffled = areas[:]
    rng.shuffle(shuffled)
    held = tuple(sorted(shuffled[:held_out_areas]))
    fit = tuple(sorted(shuffled[held_out_areas:]))
    train: list[Prompt] = []
    validation: list[Prompt] = []
    for area in fit:
        for label in LABELS:
            group = [p for p in dataset.prompts if p.category == area and p.label == label]
            rng.shuffle(group)
            n_val = max(1, round(len(group) * validation_fraction)) if len(group) > 1 else 0
            validation.extend(group[:n_val])
            train.extend(group[n_val:])
    held_prompts = tuple(p for p in dataset.prompts if p.category in held)
    return Split(seed, fit, held, tuple(train), tuple(validation), held_prompts)


def interleave_areas(prompts: list[Prompt], limit: int | None, seed: int) -> list[Prompt]:
    """Take up to `limit` prompts round-robin over areas, so a small sample covers every area."""
    rng = random.Random(seed)
    by_area: dict[str, list[Prompt]] = defaultdict(list)
    for p in prompts:
        by_area[p.category].append(p)
    queues = []
    for area in sorted(by_area):
        group = by_area[area][:]
        rng.shuffle(group)
        queues.append(group)
    out: list[Prompt] = []
    while any(queues) and (limit is None or len(out) < limit):
        for queue in queues:
            if queue and (limit is None or len(out) < limit):
                out.append(queue.pop(0))
    return out
