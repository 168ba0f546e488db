"""`weight-edit benchmark`: what edits cost — MMLU/ARC accuracy and perplexity, the source scored once and
each edited checkpoint compared with it on the same items, paired. One summary schema for one or several
edits; the outputs are rewritten after each edited checkpoint, so a stopped run keeps what it compared."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import settings
from weight_edit.fit import ProgressFactory, no_progress
from weight_edit.records import write_csv, write_json
from weight_edit.workflow import checks

SUMMARY = "capability_summary.json"
SUBJECT_TABLE = "capability_by_subject.csv"
ITEM_TABLE = "capability_items.csv"
REPORT = "README.md"


@dataclass
class BenchmarkRequest:
    edited: list[Path]
    command: str  # the command line, recorded in the summary and the report
    model_spec: str | None = None  # the source; default: the first edited output's provenance
    mmlu: Path | None = None
    arc: Path | None = None
    arc_train: Path | None = None
    text: Path | None = None
    shots: int = 0
    limit: int | None = None
    text_tokens: int | None = None
    max_length: int = 1024
    stride: int = 512
    seed: int = settings.SEED
    device: str = "auto"
    max_memory: dict | None = None
    dtype: str = "fast"
    batch_size: int = 0
    out_dir: Path = Path("runs") / "capability"


@dataclass
class BenchmarkRun:
    comparisons: dict[str, dict[str, Any]]  # label → capability.compare's result
    summary: dict[str, Any]
    files: list[Path] = field(default_factory=list)


def run_benchmark(
    request: BenchmarkRequest,
    progress: ProgressFactory = no_progress,
    model_progress: Callable | None = None,
    say: Callable[[str], None] = lambda message: None,
) -> BenchmarkRun:
    from weight_edit.capability import BenchmarkError, compare, item_rows, load_suite, score_checkpoint
    from weight_edit.models import resolve_dtype, resolve_model
    from weight_edit.verify import read_provenance, require_output_folder

    for folder in request.edited:
        require_output_folder(folder)
    if request.stride >= request.max_length:
        raise BenchmarkError(f"--stride ({request.stride}) must be below --max-length ({request.max_length})")
    checks.writable(request.out_dir, "--out-dir")
    r = request
    suite = load_suite(
        r.mmlu, r.arc, r.arc_train, r.text, r.shots, r.limit, r.seed, r.max_length, r.stride, r.text_tokens
    )
    dtype = resolve_dtype(request.dtype, request.device)  # recorded as the dtype actually used
    if request.model_spec:
        source_folder = resolve_model(request.model_spec, model_progress)
    else:
        source_folder = Path(read_provenance(request.edited[0])["source"]["path"])
    started = time.time()
    say(f"source {source_folder}: {suite.sizes()}")

    def score(folder: Path, label: str):
        return score_checkpoint(
            folder, suite, dtype, request.device, request.batch_size, progress, label, request.max_memory
        )

    source = score(source_folder, "source")
    comparisons: dict[str, dict[str, Any]] = {}
    labels: dict[str, Path] = {}
    items: list[dict[str, Any]] = []
    seconds = {"source": source.seconds}
    run = BenchmarkRun(comparisons, {})
    for folder in request.edited:
        label = folder.name if folder.name not in labels else str(folder)
        edited = score(folder, label)
        labels[label], seconds[label] = folder, edited.seconds
        comparisons[label] = compare(source, edited)
        items += [
            {"edited": label, **row}
            for name in source.items
            for row in item_rows(name, source.items[name], edited.items[name])
        ]
        run = _write(request, suite, source_folder, labels, comparisons, items, dtype, seconds, started)
    return run


def _write(request, suite, source_folder, labels, comparisons, items, dtype, seconds, started) -> BenchmarkRun:
    """Everything compared so far."""
    from weight_edit.capability import markdown_report

    out = request.out_dir
    rows = [{"edited": label, **row} for label, comparison in comparisons.items() for row in comparison["rows"]]
    summary = {
        "command": request.command,
        "source": str(source_folder),
        "edited": {label: str(folder) for label, folder in labels.items()},
        "dtype": dtype,
        "device": request.device,
        "settings": suite.settings,
        "sizes": suite.sizes(),
        "comparisons": {
            label: {
                "overall": [r for r in comparison["rows"] if r["subject"] == "ALL"],
                "perplexity": comparison["perplexity"],
            }
            for label, comparison in comparisons.items()
        },
        "seconds": seconds,
        "wall_seconds": round(time.time() - started, 1),
    }
    files = [
        write_csv(out / SUBJECT_TABLE, rows),
        write_csv(out / ITEM_TABLE, items),
        write_json(out / SUMMARY, summary),
    ]
    (out / REPORT).write_text(markdown_report(comparisons, suite, [request.command]), encoding="utf-8")
    return BenchmarkRun(comparisons, summary, [f for f in (*files, out / REPORT) if f])
