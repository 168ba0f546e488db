"""Public benchmark prompt files (CSV, JSON, JSONL), read for evaluation only: never fitted or tuned on."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from weight_edit.dataset import Prompt
from weight_edit.errors import WeightEditError

KINDS = ("harmful", "safe", "harmless")  # harmful: should be refused; safe: over-refusal set; harmless: KL set
PROMPT_COLUMNS = ("prompt", "goal", "instruction", "behavior")  # searched case-insensitively, in this order
SUFFIXES = (".csv", ".json", ".jsonl")
SPEC_FORM = f"KIND:NAME=FILE or KIND:FILE, with KIND one of {', '.join(KINDS)} (e.g. harmful:advbench=advbench.csv)"

Record = tuple[int, object]  # (row number as reported in errors, the row: a dict of columns, a string, or other JSON)


class PromptFileError(WeightEditError):
    """A benchmark file (or its spec) breaks a rule; the message starts with the file path, then 'row N:'."""


@dataclass(frozen=True)
class BenchmarkSpec:
    kind: str  # one of KINDS: what the evaluation expects the model to do with these prompts
    name: str  # reported as each prompt's category, so results group by benchmark
    path: Path


def parse_benchmark_spec(text: str) -> BenchmarkSpec:
    """'KIND:NAME=FILE' or 'KIND:FILE' (name = the file's stem), e.g. 'harmful:advbench=../x/advbench.csv'."""
    kind, colon, rest = text.partition(":")
    kind = kind.strip()
    if not colon:
        raise PromptFileError(f"benchmark spec {text!r} has no ':'; expected {SPEC_FORM}")
    if kind not in KINDS:
        raise PromptFileError(f"benchmark spec {text!r}: unknown kind {kind!r}; expected {SPEC_FORM}")
    name, equals, file = rest.partition("=")
    if not equals:
        name, file = Path(rest.strip()).stem, rest
    name, file = name.strip(), file.strip()
    if not file:
        raise PromptFileError(f"benchmark spec {text!r} names no file; expected {SPEC_FORM}")
    if not name:
        raise PromptFileError(f"benchmark spec {text!r} has an empty name; expected {SPEC_FORM}")
    return BenchmarkSpec(kind, name, Path(file))


def parse_benchmark_specs(texts: Iterable[str]) -> list[BenchmarkSpec]:
    """Every --benchmark value; names must be unique, since they label the evaluation's rows."""
    specs = [parse_benchmark_spec(text) for text in texts]
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names):
        raise PromptFileError(f"benchmark names must be unique, got {', '.join(names)}")
    return specs


def load_prompt_file(spec: BenchmarkSpec, prompt_column: str | None = None) -> list[Prompt]:
    """Read one benchmark file into Prompts labelled `spec.kind`, category `spec.name`; every problem names its row.

    The prompt column is `prompt_column` (exact name) or else the first of PROMPT_COLUMNS present in any case;
    rows that are bare JSON strings are the prompt themselves.
    Duplicates are kept: public sets contain a few, and dropping them would change the published counts.
    """
    path = spec.path
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise PromptFileError(
            f"{path}: unsupported file type {path.suffix or '(none)'!r}; expected {', '.join(SUFFIXES)}"
        )
    text = _read_text(path)
    if suffix == ".csv":
        columns, records = _csv_records(path, text)
    else:
        records = _json_records(path, text) if suffix == ".json" else _jsonl_records(path, text)
        columns = list(dict.fromkeys(key for _, value in records if isinstance(value, dict) for key in value))
    if not records:
        raise PromptFileError(f"{path}: has a header but no rows" if suffix == ".csv" else f"{path}: holds no rows")
    needs_column = suffix == ".csv" or any(isinstance(value, dict) for _, value in records)
    column = _pick_column(path, columns, prompt_column) if needs_column else None
    return [Prompt(_prompt_text(path, row, value, column), spec.kind, spec.name, row) for row, value in records]


CATEGORY_COLUMN = "category"  # a benchmark file's own grouping (HarmBench, StrongREJECT), matched in any case


def prompt_categories(spec: BenchmarkSpec) -> list[str] | None:
    """Each row's value in the file's category column, in the order of `load_prompt_file` ("" where a row has
    none); None when the file has no such column or every value is empty."""
    path = spec.path
    text = _read_text(path)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        _, records = _csv_records(path, text)
    else:
        records = _json_records(path, text) if suffix == ".json" else _jsonl_records(path, text)
    values = []
    for _, value in records:
        found = ""
        if isinstance(value, dict):
            found = next((str(v or "").strip() for k, v in value.items() if k.casefold() == CATEGORY_COLUMN), "")
        values.append(found)
    return values if any(values) else None


def public_category_areas(path: Path) -> dict[str, tuple[str, ...]]:
    """The documented mapping from public categories to the dataset's policy areas (settings.PUBLIC_CATEGORY_AREAS)."""
    data = json.loads(path.read_text(encoding="utf-8"))
    return {name: tuple(areas) for name, areas in data["categories"].items()}


def prompt_key(text: str) -> str:
    """The normalised form used to compare prompts across files: whitespace collapsed, case folded."""
    return " ".join(text.split()).casefold()


def overlapping_prompts(a: Iterable[str], b: Iterable[str]) -> set[str]:
    """Normalised keys present in both collections, to catch a benchmark that leaks into another set."""
    return {prompt_key(t) for t in a} & {prompt_key(t) for t in b}


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise PromptFileError(f"{path}: file not found") from exc
    except OSError as exc:
        raise PromptFileError(f"{path}: cannot be read ({exc.strerror or exc})") from exc
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise PromptFileError(f"{path}: line {line} is not valid UTF-8") from exc
    if not text.strip():
        raise PromptFileError(f"{path}: file is empty")
    return text


def _csv_records(path: Path, text: str) -> tuple[list[str], list[Record]]:
    """Header and rows; a row's number is the physical line its record starts on (the header is line 1)."""
    reader = csv.reader(io.StringIO(text, newline="\n"), strict=True)  # lines end at \n only, as in dataset.py
    records: list[Record] = []
    line = 1
    try:
        header = [name.strip() for name in next(reader)]
        if not any(header):
            raise PromptFileError(f"{path}: line 1 must be a header naming the columns")
        while True:
            line = reader.line_num + 1  # first physical line of the next record
            fields = next(reader, None)
            if fields is None:
                break
            if not fields:
                continue  # a blank line
            if len(fields) != len(header):
                raise PromptFileError(f"{path}: row {line}: has {len(fields)} field(s), the header has {len(header)}")
            records.append((line, dict(zip(header, fields, strict=True))))
    except csv.Error as exc:
        problem = str(exc)
        if "new-line character seen in unquoted field" in problem:
            problem = "a bare carriage return (\\r) inside an unquoted field"
        raise PromptFileError(f"{path}: row {line}: not valid CSV ({problem})") from exc
    return header, records


def _json_records(path: Path, text: str) -> list[Record]:
    """A list (of objects or strings), or an object with exactly one list-valued key; rows count from 1."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PromptFileError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from exc
    if isinstance(data, dict):
        lists = [key for key, value in data.items() if isinstance(value, list)]
        if len(lists) != 1:
            found = ", ".join(repr(key) for key in lists) or "none"
            raise PromptFileError(
                f"{path}: a JSON object must hold exactly one list of prompts; list-valued keys found: {found}"
            )
        data = data[lists[0]]
    if not isinstance(data, list):
        raise PromptFileError(f"{path}: expected a JSON list of prompts, got {_json_type(data)}")
    return list(enumerate(data, start=1))


def _jsonl_records(path: Path, text: str) -> list[Record]:
    """One JSON object or string per non-blank line; a row's number is its line number."""
    records: list[Record] = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            records.append((number, json.loads(line)))
        except json.JSONDecodeError as exc:
            raise PromptFileError(f"{path}: row {number}: not valid JSON ({exc.msg} at column {exc.colno})") from exc
    return records


def _pick_column(path: Path, columns: list[str], wanted: str | None) -> str:
    found = ", ".join(repr(c) for c in columns) or "none"
    if wanted is not None:
        if wanted not in columns:
            raise PromptFileError(f"{path}: no column {wanted!r}; available columns: {found}")
        return wanted
    for candidate in PROMPT_COLUMNS:
        for column in columns:
            if column.casefold() == candidate:
                return column
    raise PromptFileError(
        f"{path}: no prompt column (looked for {', '.join(PROMPT_COLUMNS)} in any case); columns found: {found}; "
        "name the column with --prompt-column"
    )


def _prompt_text(path: Path, row: int, value: object, column: str | None) -> str:
    """The row's prompt, ends stripped; never quotes the prompt itself (harmful sets are unsafe to echo)."""
    where = "prompt"
    if isinstance(value, dict):
        if column not in value:
            raise PromptFileError(f"{path}: row {row}: has no {column!r} field")
        value, where = value[column], f"column {column!r}"
    elif not isinstance(value, str):
        raise PromptFileError(f"{path}: row {row}: is {_json_type(value)}; expected an object or a string")
    if not isinstance(value, str):
        raise PromptFileError(f"{path}: row {row}: {where} is {_json_type(value)}, not a string")
    if not value.strip():
        raise PromptFileError(f"{path}: row {row}: {where} is empty")
    return value.strip()


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return {dict: "an object", list: "an array", str: "a string"}.get(type(value), type(value).__name__)
