"""Selective edits and operator refusals on one model: the default edit and edits that remove some policy areas'
refusal while keeping others', each fit, applied and evaluated (issue 23).

Per variant: `weight-edit fit` (with its --remove/--keep), `apply`, and `evaluate --operator` (the removed and kept
areas' within-area held-out prompts for a selective edit, the area-disjoint held-out areas for the default; the
embedded operator rules; public files with --benchmarks). Only aggregates are kept under --out: per variant the
direction's sidecar, the evaluation's summary and tables; `summary.json` and `README.md` compare the variants.

    python scripts/selective_edits.py --model ~/.cache/weight-edit/models/qwen2.5-coder-1.5b-instruct \\
        --variants default distinct close --out artifacts/selective

`distinct` removes misinformation and hate speech and keeps weapons, dangerous chemicals and cybercrime (their
directions stand apart on the default model: cosines 0.48-0.58); `close` removes cybercrime and keeps dangerous
chemicals (cosine 0.94, where selectivity should end).
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import settings  # noqa: E402

VARIANTS = {
    "default": [],
    "distinct": ["--remove", "misinformation,hate_speech", "--keep", "weapons,dangerous_chemicals,cybercrime"],
    "close": ["--remove", "cybercrime", "--keep", "dangerous_chemicals"],
}
KINDS = {
    "harmbench_test": "harmful",
    "strongreject": "harmful",
    "jbb_benign": "safe",
    "alpaca_harmless_val": "harmless",
}
KEPT = {
    "fit": ("direction.json",),
    "eval": (
        "evaluation_summary.json",
        "evaluation_by_area.csv",
        "evaluation_operator.csv",
        "evaluation_by_category.csv",
        "evaluation_by_benchmark.csv",
    ),
}


def run(args: list[str]) -> float:
    started = time.time()
    print("+ weight-edit " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "cli", *args], check=True, cwd=ROOT)
    return round(time.time() - started, 1)


def run_variant(name: str, args: argparse.Namespace) -> dict[str, float]:
    common = ["--device", args.device, "--dtype", args.dtype]
    fit_dir, edited, eval_dir = (args.work / f"{step}-{name}" for step in ("fit", "edited", "eval"))
    fit = ["fit", "--model", args.model, "--out-dir", str(fit_dir), *common, *VARIANTS[name], *args.fit_arg]
    timings = {"fit": run(fit)}
    timings["apply"] = run(
        ["apply", "--direction", str(fit_dir / settings.DIRECTION_FILE), "--out", str(edited), "--force"]
    )
    evaluate = ["evaluate", str(edited), "--out-dir", str(eval_dir), "--operator", *common]
    evaluate += ["--max-new-tokens", str(args.max_new_tokens), "--no-reuse-source"]
    evaluate += ["--limit", str(args.limit)] if args.limit else []
    if args.benchmarks:
        for stem, kind in KINDS.items():
            evaluate += ["--benchmark", f"{kind}:{stem}={args.benchmarks / (stem + '.csv')}"]
    timings["evaluate"] = run(evaluate)
    out = args.out / name
    out.mkdir(parents=True, exist_ok=True)
    for key, folder in (("fit", fit_dir), ("eval", eval_dir)):
        for file in KEPT[key]:
            if (folder / file).is_file():
                shutil.copy(folder / file, out / file)
    (out / "timings.json").write_text(json.dumps({"seconds": timings, "machine": args.machine}, indent=2) + "\n")
    if not args.keep_checkpoints:
        shutil.rmtree(edited)
    return timings


def pct(k: int, n: int) -> str:
    return f"{k}/{n} ({100 * k / n:.0f} %)" if n else "–"


def variant_rows(folder: Path) -> dict:
    sidecar = json.loads((folder / "direction.json").read_text())
    summary = json.loads((folder / "evaluation_summary.json").read_text())
    with (folder / "evaluation_by_area.csv").open() as handle:
        areas = {(r["area"], r["label"]): r for r in csv.DictReader(handle)}
    groups = ["ALL removed", "ALL kept"] if summary.get("selective") else ["ALL"]
    return {
        "direction": {"layer": sidecar["layer"], "position": sidecar["position"], "selection": sidecar["selection"]},
        "areas": sidecar.get("areas"),
        "groups": {
            g: {
                label: {
                    "n": int(areas[(g, label)]["n"]),
                    "source": int(areas[(g, label)]["source_refused_text"]),
                    "edited": int(areas[(g, label)]["edited_refused_text"]),
                    "ci": [
                        float(areas[(g, label)]["text_difference_ci_low"]),
                        float(areas[(g, label)]["text_difference_ci_high"]),
                    ],
                }
                for label in ("unsafe", "safe")
                if (g, label) in areas
            }
            for g in groups
        },
        "operator": (summary.get("operator") or {}).get("rows"),
        "max_new_tokens": summary["max_new_tokens"],
        "dtype": summary["dtype"],
    }


def write_readme(out: Path, rows: dict[str, dict], record: dict) -> None:
    lines = [
        "# Selective edits and operator refusals",
        "",
        "Regenerated by `scripts/selective_edits.py`; runs: " + "; ".join(f"`{c}`" for c in record["commands"]) + ".",
        f"Machine: {record['machine']}. Refused = one of the paper's refusal substrings in the answer; an operator "
        "request is declined when a broad refusal marker is in the answer. Intervals: 95 % Newcombe interval of "
        "the paired difference (edit − source).",
        "",
        "| variant | removes / keeps | layer, pos | held-out unsafe refused, source → edit | operator: breaking requests declined | operator: allowed requests declined |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        areas = r["areas"] or {}
        how = f"{', '.join(areas.get('remove', [])) or 'all fit areas'} / {', '.join(areas.get('keep', [])) or '–'}"
        refused = "; ".join(
            f"{g.removeprefix('ALL ').strip() or 'held-out areas'}: {pct(v['unsafe']['source'], v['unsafe']['n'])} → "
            f"{pct(v['unsafe']['edited'], v['unsafe']['n'])} [{v['unsafe']['ci'][0]:+.2f}, {v['unsafe']['ci'][1]:+.2f}]"
            for g, v in r["groups"].items()
            if "unsafe" in v
        )
        operator = r["operator"] or {}
        cells = [
            f"{pct(int(operator[k]['source_declined']), int(operator[k]['n']))} → "
            f"{pct(int(operator[k]['edited_declined']), int(operator[k]['n']))}"
            if k in operator
            else "–"
            for k in ("decline", "answer")
        ]
        d = r["direction"]
        lines.append(f"| {name} | {how} | {d['layer']}, {d['position']} | {refused} | {cells[0]} | {cells[1]} |")
    first = next(iter(rows.values()))
    lines += ["", f"Greedy answers of at most {first['max_new_tokens']} new tokens in {first['dtype']}.", ""]
    lines += [f"- {name}: {r['direction']['selection']}" for name, r in rows.items()]
    (out / "README.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="checkpoint folder or .gguf (default: the default model)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "selective")
    parser.add_argument("--out", type=Path, default=settings.ARTIFACTS_DIR / "selective")
    parser.add_argument("--benchmarks", type=Path, default=None, help="the shared public files (optional)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="fast")
    parser.add_argument("--max-new-tokens", type=int, default=settings.EVAL_MAX_NEW_TOKENS)
    parser.add_argument("--limit", type=int, default=0, help="held-out policy prompts per label (0: all)")
    parser.add_argument("--machine", default="2 CPU cores, no GPU")
    parser.add_argument("--keep-checkpoints", action="store_true")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--fit-arg", action="append", default=[], help="extra argument for every fit")
    args = parser.parse_args()
    if args.model is None:
        from weight_edit.models import resolve_model

        args.model = str(resolve_model(None))
    args.out.mkdir(parents=True, exist_ok=True)
    summary_file = args.out / "summary.json"
    record = json.loads(summary_file.read_text()) if summary_file.is_file() else {"commands": [], "timings": {}}
    record["machine"] = args.machine if not args.report_only else record.get("machine", args.machine)
    if not args.report_only:
        record["commands"].append(" ".join(sys.argv))
        for name in args.variants:
            record["timings"][name] = run_variant(name, args)
    rows = {v: variant_rows(args.out / v) for v in VARIANTS if (args.out / v / "evaluation_summary.json").is_file()}
    record["variants"] = rows
    summary_file.write_text(json.dumps(record, indent=2) + "\n")
    write_readme(args.out, rows, record)
    print(f"wrote {summary_file} and {args.out / 'README.md'}")


if __name__ == "__main__":
    main()
