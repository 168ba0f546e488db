"""The policy-area prompt dataset: loading with row-level validation, and area-disjoint splits."""

from __future__ import annotations

import csv
import hashlib
import random
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

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


def _decoded_lines(path: Path, handle: BinaryIO, update: Callable[[bytes], object]) -> Iterator[str]:
    """Yield each line of `handle` decoded as UTF-8, hashing its raw bytes on the way (one pass, one copy)."""
    for number, raw in enumerate(handle, start=1):
        update(raw)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DatasetError(f"{path}: line {number} is not valid UTF-8 (byte {exc.start + 1} of that line)") from exc
        yield text.removeprefix("\ufeff") if number == 1 else text


def _is_multiline(text: str) -> bool:
    """True when `text` holds any line break Python knows (\\n, \\r, U+2028, ...)."""
    return "".join(text.splitlines()) != text


def load_dataset(path: Path | str) -> Dataset:
    """Read and validate a prompt CSV in one streaming pass; every problem names its row and column.

    Row numbers are physical line numbers (the header is line 1), as an editor shows them.
    """
    path = Path(path)
    hasher = hashlib.sha256()
    prompts: list[Prompt] = []
    try:
        with path.open("rb") as handle:
            reader = csv.reader(_decoded_lines(path, handle, hasher.update), strict=True)
            line = 1
            try:
                header = next(reader, None)
                if header is None:
                    raise DatasetError(f"{path}: file is empty (expected header {','.join(COLUMNS)})")
                _check_header(path, header)
                seen: dict[str, int] = {}
                while True:
                    line = reader.line_num + 1  # first physical line of the next record
                    row = next(reader, None)
                    if row is None:
                        break
                    if row:
                        prompts.append(_check_row(path, line, reader.line_num, row, seen))
            except csv.Error as exc:
                raise DatasetError(f"{path}: row {line} is not valid CSV: {_csv_problem(exc)}") from exc
    except FileNotFoundError as exc:
        raise DatasetError(f"{path}: file not found") from exc
    except OSError as exc:
        raise DatasetError(f"{path}: cannot be read ({exc.strerror or exc})") from exc
    if not prompts:
        raise DatasetError(f"{path}: has a header but no rows")
    labels_by_area: dict[str, set[str]] = defaultdict(set)
    for p in prompts:
        labels_by_area[p.category].add(p.label)
    for area, labels in sorted(labels_by_area.items()):
        if labels != set(LABELS):
            only = next(iter(labels))
            raise DatasetError(f"{path}: category '{area}' has only '{only}' prompts; each area needs both labels")
    return Dataset(path, hasher.hexdigest(), tuple(prompts))


def _csv_problem(exc: csv.Error) -> str:
    """The csv module's message, minus its advice about open(newline=''), which does not apply here."""
    text = str(exc)
    if "new-line character seen in unquoted field" in text:
        return "a bare carriage return (\\r) inside an unquoted field; end lines with \\n or \\r\\n"
    return text


def _check_header(path: Path, header: list[str]) -> None:
    header = [h.strip() for h in header]
    if tuple(header) == COLUMNS:
        return
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


def _check_row(path: Path, line: int, last_line: int, row: list[str], seen: dict[str, int]) -> Prompt:
    """Validate one record that starts on physical line `line` (and ends on `last_line`)."""
    if len(row) != len(COLUMNS):
        raise DatasetError(f"{path}: row {line} has {len(row)} fields, expected {len(COLUMNS)}")
    prompt, label, category = row
    if not prompt.strip():
        raise DatasetError(f"{path}: row {line}, column 'prompt' is empty")
    for column, value in (("prompt", prompt), ("category", category)):
        if _is_multiline(value):
            span = f" (lines {line}-{last_line})" if last_line > line else ""
            raise DatasetError(
                f"{path}: row {line}, column '{column}' spans several lines{span}; prompts and categories must be single-line"
            )
    if label not in LABELS:
        raise DatasetError(f"{path}: row {line}, column 'label' is {label!r}; expected 'safe' or 'unsafe'")
    if not category.strip():
        raise DatasetError(f"{path}: row {line}, column 'category' is empty")
    key = " ".join(prompt.split()).casefold()
    if key in seen:
        raise DatasetError(f"{path}: row {line}, column 'prompt' duplicates row {seen[key]}")
    seen[key] = line
    return Prompt(prompt.strip(), label, category.strip(), line)


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
