"""Capability before and after the edit: MMLU, ARC-Challenge and WikiText perplexity, source vs edited, paired.

Usage (from the project folder):
    python scripts/capability_run.py --edited runs/reference/edited-default [more edited folders ...]
        [--model SOURCE] [--shots 0|5] [--limit N] [--text-tokens N] [--out-dir artifacts/reference/capability]

The benchmark files default to the public copies in ../shared/benchmarks (they are never copied into the
project). The source model is scored once; every edited checkpoint is compared with it on the same
questions and the same tokens. Writes aggregates only: capability_by_subject.csv, capability_summary.json
and README.md (tables and the exact command line this script was run with).
"""

from __future__ import annotations

import argparse
import csv
import json
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import settings  # noqa: E402
from weight_edit.capability import compare, load_suite, markdown_report, score_checkpoint  # noqa: E402
from weight_edit.models import resolve_dtype  # noqa: E402

BENCHMARKS = ROOT.parent / "shared" / "benchmarks"


def printing_progress(description: str, total: int):
    """Plain progress lines on stderr: a line at the start and one when done."""
    state = {"done": 0, "started": time.perf_counter()}
    print(f"  {description}: {total} items", file=sys.stderr, flush=True)

    def advance(n: int) -> None:
        state["done"] += n
        if state["done"] >= total:
            print(f"  {description}: done in {time.perf_counter() - state['started']:.1f} s", file=sys.stderr)

    return advance


def optional_path(value: str) -> Path | None:
    return None if value.lower() in ("", "none") else Path(value)


def label_for(folder: Path, taken: set[str]) -> str:
    label = folder.name
    return str(folder) if label in taken else label


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edited", type=Path, nargs="+", required=True, help="edited checkpoint folder(s)")
    parser.add_argument(
        "--model", default=None, help="source model (default: the source in the first EDITED's provenance)"
    )
    parser.add_argument(
        "--mmlu", type=optional_path, default=BENCHMARKS / "mmlu" / "data", help="MMLU folder, or 'none'"
    )
    parser.add_argument("--arc", type=optional_path, default=BENCHMARKS / "arc" / "ARC-Challenge-Test.jsonl")
    parser.add_argument("--arc-train", type=optional_path, default=BENCHMARKS / "arc" / "ARC-Challenge-Train.jsonl")
    parser.add_argument(
        "--text", type=optional_path, default=BENCHMARKS / "wikitext" / "wikitext-2-raw-v1.test.nonblank-crlf.raw"
    )
    parser.add_argument("--shots", type=int, default=0, help="0 or 5 (MMLU: dev rows; ARC: seeded train questions)")
    parser.add_argument("--limit", type=int, default=None, help="questions per benchmark, spread over subjects")
    parser.add_argument("--seed", type=int, default=settings.SEED)
    parser.add_argument("--text-tokens", type=int, default=None, help="score only the text's first N tokens")
    parser.add_argument("--max-length", type=int, default=1024, help="perplexity window, tokens")
    parser.add_argument("--stride", type=int, default=512, help="perplexity window step, tokens")
    parser.add_argument("--device", choices=["cpu", "cuda", "auto"], default="auto")
    parser.add_argument("--dtype", choices=["fast", "auto", "float32", "bfloat16", "float16"], default="fast")
    parser.add_argument("--batch-size", type=int, default=0, help="0: automatic")
    parser.add_argument("--out-dir", type=Path, default=settings.ARTIFACTS_DIR / "reference" / "capability")
    args = parser.parse_args()
    command = "python " + shlex.join(sys.argv)
    print(f"+ {command}", flush=True)

    from weight_edit.models import resolve_model
    from weight_edit.verify import read_provenance

    started = time.time()
    suite = load_suite(
        args.mmlu,
        args.arc,
        args.arc_train,
        args.text,
        shots=args.shots,
        limit=args.limit,
        seed=args.seed,
        max_length=args.max_length,
        stride=args.stride,
        text_tokens=args.text_tokens,
    )
    if args.model:
        source_folder = resolve_model(args.model)
    else:
        source_folder = Path(read_provenance(args.edited[0])["source"]["path"])
    timings: dict[str, dict[str, float]] = {}
    print(f"source {source_folder}: {suite.sizes()}", flush=True)
    source = score_checkpoint(
        source_folder, suite, args.dtype, args.device, args.batch_size, printing_progress, "source"
    )
    timings["source"] = source.seconds
    comparisons: dict[str, dict] = {}
    out = args.out_dir

    def write_outputs() -> None:
        """Everything compared so far: rewritten after each edited checkpoint, so a stopped run keeps its results."""
        out.mkdir(parents=True, exist_ok=True)
        rows = [{"edited": label, **row} for label, comparison in comparisons.items() for row in comparison["rows"]]
        if rows:
            with (out / "capability_by_subject.csv").open("w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
        summary = {
            "command": command,
            "source": str(source_folder),
            "edited": {label: str(folder) for label, folder in zip(comparisons, args.edited, strict=False)},
            "dtype": resolve_dtype(args.dtype, args.device),
            "device": args.device,
            "settings": suite.settings,
            "sizes": suite.sizes(),
            "comparisons": {
                label: {
                    "overall": [r for r in comparison["rows"] if r["subject"] == "ALL"],
                    "perplexity": comparison["perplexity"],
                }
                for label, comparison in comparisons.items()
            },
            "seconds": timings,
            "wall_seconds": round(time.time() - started, 1),
        }
        (out / "capability_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        (out / "README.md").write_text(markdown_report(comparisons, suite, [command]))

    for folder in args.edited:
        label = label_for(folder, set(comparisons))
        print(f"edited {folder}", flush=True)
        edited = score_checkpoint(folder, suite, args.dtype, args.device, args.batch_size, printing_progress, label)
        timings[label] = edited.seconds
        comparisons[label] = compare(source, edited)
        write_outputs()
    print(f"wrote {out}/README.md, capability_summary.json, capability_by_subject.csv in {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
