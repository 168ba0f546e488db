"""The policy-area prompt dataset: loading with row-level validation, and area-disjoint splits.

Three labels: `unsafe` requests and topic-matched `safe` prompts belong to a policy area (`category`)
and measure refusal and over-refusal per area; `harmless` rows are ordinary instructions with no
policy topic (their `category`, a task type, may be empty) and are what the direction contrasts the
unsafe prompts with.
"""

from __future__ import annotations

import csv
import hashlib
import random
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from weight_edit.errors import WeightEditError

COLUMNS = ("prompt", "label", "category")
POLICY_LABELS = ("safe", "unsafe")  # the labels of a policy area
HARMLESS_LABEL = "harmless"
LABELS = (*POLICY_LABELS, HARMLESS_LABEL)
PARTS = ("train", "validation", "held_out")


class DatasetError(WeightEditError):
    """The CSV breaks a rule; the message names the file, row and column."""


@dataclass(frozen=True)
class Prompt:
    text: str
    label: str  # "safe", "unsafe" or "harmless"
    category: str  # policy area; for harmless rows a task type, possibly empty
    row: int  # 1-based line number in the CSV (header is line 1)


@dataclass(frozen=True)
class Dataset:
    path: Path
    sha256: str
    prompts: tuple[Prompt, ...]

    @property
    def categories(self) -> list[str]:
        """The policy areas (harmless rows belong to none)."""
        return sorted({p.category for p in self.prompts if p.label in POLICY_LABELS})

    @property
    def harmless(self) -> tuple[Prompt, ...]:
        return tuple(p for p in self.prompts if p.label == HARMLESS_LABEL)


@dataclass(frozen=True)
class Split:
    """Area-disjoint split: fit areas (train + validation prompts) and held-out areas.

    Harmless prompts have a seeded split of their own into the same three parts (train: the
    direction's contrast; validation: selection and tuning; held_out: evaluation), never shared
    between parts; `select(part, "harmless")` returns them.
    """

    seed: int
    fit_areas: tuple[str, ...]
    held_out_areas: tuple[str, ...]
    train: tuple[Prompt, ...]
    validation: tuple[Prompt, ...]
    held_out: tuple[Prompt, ...]
    # "area-disjoint" (held-out areas) or "within-area" (weight_edit.areas: the named areas' own prompts held out)
    design: str = "area-disjoint"

    def select(self, part: str, label: str) -> list[Prompt]:
        return [p for p in getattr(self, part) if p.label == label]

    def prompts(self, part: str, label: str, limit: int | None = None) -> list[Prompt]:
        """Up to `limit` prompts of one part and label, round-robin over areas (seeded by the split's seed):
        the order `fit`, `tune`, `verify` and `evaluate` all use, so a small sample covers every area."""
        return interleave_areas(self.select(part, label), limit, self.seed)

    def texts(self, part: str, label: str, limit: int | None = None) -> list[str]:
        return [p.text for p in self.prompts(part, label, limit)]

    def table(self) -> list[dict[str, object]]:
        """One row per area: its role and prompt counts per part and label."""
        rows = []
        for area in sorted(self.fit_areas + self.held_out_areas):
            role = "within-area" if self.design == "within-area" else "fit" if area in self.fit_areas else "held_out"
            row: dict[str, object] = {"category": area, "role": role}
            for part in PARTS:
                for label in LABELS:
                    row[f"{part}_{label}"] = sum(
                        1 for p in getattr(self, part) if p.category == area and p.label == label
                    )
            rows.append(row)
        if any(p.label == HARMLESS_LABEL for part in PARTS for p in getattr(self, part)):
            row = {"category": "(harmless instructions)", "role": "contrast"}
            for part in PARTS:
                for label in LABELS:
                    row[f"{part}_{label}"] = len(self.select(part, label)) if label == HARMLESS_LABEL else 0
            rows.append(row)
        return rows

    def as_dict(self) -> dict[str, object]:
        return {
            "seed": self.seed,
            **({"design": self.design} if self.design != "area-disjoint" else {}),  # area-disjoint: as before
            "fit_areas": list(self.fit_areas),
            "held_out_areas": list(self.held_out_areas),
            "counts": {part: {label: len(self.select(part, label)) for label in LABELS} for part in PARTS},
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
        if p.label in POLICY_LABELS:
            labels_by_area[p.category].add(p.label)
    for area, labels in sorted(labels_by_area.items()):
        if labels != set(POLICY_LABELS):
            only = next(iter(labels))
            raise DatasetError(f"{path}: category '{area}' has only '{only}' prompts; each area needs both labels")
    for p in prompts:
        if p.label == HARMLESS_LABEL and p.category in labels_by_area:
            raise DatasetError(
                f"{path}: row {p.row}, column 'category': harmless row names the policy area '{p.category}'; "
                "harmless prompts belong to no policy area (leave the category empty or give a task type)"
            )
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
        raise DatasetError(f"{path}: row {line}, column 'label' is {label!r}; expected 'safe', 'unsafe' or 'harmless'")
    if not category.strip() and label != HARMLESS_LABEL:
        raise DatasetError(
            f"{path}: row {line}, column 'category' is empty; only 'harmless' rows may leave it empty "
            "(unsafe and safe prompts name their policy area)"
        )
    key = " ".join(prompt.split()).casefold()
    if key in seen:
        raise DatasetError(f"{path}: row {line}, column 'prompt' duplicates row {seen[key]}")
    seen[key] = line
    return Prompt(prompt.strip(), label, category.strip(), line)


def split_dataset(
    dataset: Dataset,
    seed: int,
    held_out_areas: int,
    validation_fraction: float,
    min_fit_areas: int = 2,
    harmless_fractions: tuple[float, float] = (0.25, 0.25),
) -> Split:
    """Deterministic area-disjoint split; within fit areas, a per-area, per-label validation part.

    Harmless prompts are split by `harmless_fractions` (validation, held-out; the rest trains) with a
    random generator of their own, so adding harmless rows leaves the policy-area split unchanged.
    """
    areas = dataset.categories
    if len(areas) < held_out_areas + min_fit_areas:
        raise DatasetError(
            f"{dataset.path}: {len(areas)} policy area{'' if len(areas) == 1 else 's'}, but the split needs "
            f"{held_out_areas} held-out "
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
        for label in POLICY_LABELS:
            group = [p for p in dataset.prompts if p.category == area and p.label == label]
            rng.shuffle(group)
            n_val = max(1, round(len(group) * validation_fraction)) if len(group) > 1 else 0
            validation.extend(group[:n_val])
            train.extend(group[n_val:])
    held_prompts = [p for p in dataset.prompts if p.label in POLICY_LABELS and p.category in held]
    harmless_train, harmless_validation, harmless_held_out = _split_harmless(
        dataset.harmless, seed, *harmless_fractions
    )
    return Split(
        seed,
        fit,
        held,
        (*train, *harmless_train),
        (*validation, *harmless_validation),
        (*held_prompts, *harmless_held_out),
    )


def load_split(path: Path | str, seed: int) -> tuple[Dataset, Split]:
    """The dataset at `path` and its split with the project's sizes (settings.py): what every command uses."""
    import settings

    data = load_dataset(path)
    split = split_dataset(
        data,
        seed,
        settings.HELD_OUT_AREAS,
        settings.VALIDATION_FRACTION,
        settings.MIN_FIT_AREAS,
        (settings.HARMLESS_VALIDATION_FRACTION, settings.HARMLESS_HELD_OUT_FRACTION),
    )
    return data, split


def _split_harmless(
    prompts: tuple[Prompt, ...], seed: int, validation_fraction: float, held_out_fraction: float
) -> tuple[list[Prompt], list[Prompt], list[Prompt]]:
    """Seeded train / validation / held-out parts of the harmless prompts, each non-empty when there are three or more."""
    if not prompts:
        return [], [], []
    if validation_fraction < 0 or held_out_fraction < 0 or validation_fraction + held_out_fraction >= 1:
        raise ValueError(f"harmless fractions {validation_fraction}, {held_out_fraction} must leave a training part")
    shuffled = list(prompts)
    random.Random(f"{seed}:harmless").shuffle(shuffled)
    n = len(shuffled)
    n_val = max(1, round(n * validation_fraction)) if n >= 3 else 0
    n_held = max(1, round(n * held_out_fraction)) if n >= 3 else 0
    return shuffled[n_val + n_held :], shuffled[:n_val], shuffled[n_val : n_val + n_held]


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
