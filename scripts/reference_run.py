"""Reference run on the default model: fit → apply → verify → evaluate, then copy aggregates to artifacts/.

Usage (from the project folder, after the README's main-job install):
    python scripts/reference_run.py [--skip-fit] [--work runs/reference] [--variants default biproject]

Fits once, then for each `apply` variant (the default norm-preserving edit, and the same with
`--biproject`) applies, verifies and evaluates.
Only aggregate files are copied into artifacts/: the split, every candidate's scores, the direction's
sidecar, the verify report and the evaluation tables. Completions are never stored; the per-prompt
file with the first few words of each completion stays in the work folder.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import settings  # noqa: E402


def run(args: list[str]) -> float:
    started = time.time()
    print("+ weight-edit " + " ".join(args), flush=True)
    # The same interpreter as this script, so it works whether or not the venv is activated.
    subprocess.run([sys.executable, "-m", "cli", *args], check=True, cwd=ROOT)
    return round(time.time() - started, 1)


VARIANTS = {"default": [], "biproject": ["--biproject"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "reference")
    parser.add_argument("--skip-fit", action="store_true", help="reuse WORK/fit from an earlier run")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args()
    fit_dir = args.work / "fit"
    fit_seconds = None if args.skip_fit else run(["fit", "--out-dir", str(fit_dir)])
    artifacts = settings.ARTIFACTS_DIR / "reference"
    artifacts.mkdir(parents=True, exist_ok=True)
    shutil.copy(fit_dir / "split.csv", artifacts / "split.csv")
    shutil.copy(fit_dir / "candidates.csv", artifacts / "candidates.csv")
    shutil.copy(fit_dir / settings.DIRECTION_SIDECAR, artifacts / "direction.json")
    for variant in args.variants:
        edited, eval_dir, out = args.work / f"edited-{variant}", args.work / f"eval-{variant}", artifacts / variant
        timings = {"fit": fit_seconds}
        apply_args = ["apply", "--direction", str(fit_dir / settings.DIRECTION_FILE), "--out", str(edited), "--force"]
        timings["apply"] = run(apply_args + VARIANTS[variant])
        timings["verify"] = run(["verify", str(edited)])
        timings["evaluate"] = run(["evaluate", str(edited), "--out-dir", str(eval_dir)])
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(edited / "weight_edit_verify.json", out / "verify.json")
        shutil.copy(eval_dir / "evaluation_by_area.csv", out / "evaluation_by_area.csv")
        shutil.copy(eval_dir / "evaluation_summary.json", out / "evaluation_summary.json")
        timings_file = out / "timings.json"
        if fit_seconds is None and timings_file.is_file():  # keep the fit time of the run that fitted
            timings["fit"] = json.loads(timings_file.read_text())["seconds"].get("fit")
        timings_file.write_text(json.dumps({"seconds": timings, "machine": "2 CPU cores, no GPU"}, indent=2) + "\n")
        write_markdown(out, variant)
        print(f"aggregates written to {out}")


def write_markdown(out: Path, variant: str) -> None:
    sidecar = json.loads((out.parent / "direction.json").read_text())
    verify = json.loads((out / "verify.json").read_text())
    summary = json.loads((out / "evaluation_summary.json").read_text())
    timings = json.loads((out / "timings.json").read_text())["seconds"]
    unsafe, safe = summary["overall"]["unsafe"], summary["overall"]["safe"]

    def pct(k: int, n: int) -> str:
        return f"{k}/{n} ({100 * k / n:.0f} %)"

    lines = [
        f"# Reference run: Qwen2.5-Coder-1.5B-Instruct, `apply` variant `{variant}` ({' '.join(VARIANTS[variant]) or 'no options'})",
        "",
        f"Regenerate with `python scripts/reference_run.py`. Held-out policy areas: {', '.join(summary['held_out_areas'])}.",
        f"Greedy completions of {summary['max_new_tokens']} tokens in {summary['dtype']}; refusal = any of the paper's refusal substrings.",
        "",
        "| | source | edited |",
        "|---|---|---|",
        f"| unsafe prompts refused (substrings) | {pct(unsafe['source_refused_text'], unsafe['n'])} | {pct(unsafe['edited_refused_text'], unsafe['n'])} |",
        f"| unsafe prompts refused (first-token log-odds > 0) | {pct(unsafe['source_refused_log_odds'], unsafe['n'])} | {pct(unsafe['edited_refused_log_odds'], unsafe['n'])} |",
        f"| safe prompts refused (substrings) | {pct(safe['source_refused_text'], safe['n'])} | {pct(safe['edited_refused_text'], safe['n'])} |",
        f"| safe prompts refused (first-token log-odds > 0) | {pct(safe['source_refused_log_odds'], safe['n'])} | {pct(safe['edited_refused_log_odds'], safe['n'])} |",
        f"| first-token KL on safe prompts (edited ‖ source) | 0 | {safe['mean_first_token_kl']:.4f} |",
        "",
        "Paired comparison on the same prompts (refusal by substrings): flips source-only / edited-only, exact McNemar "
        "p, 95 % Wilson intervals of each rate and Newcombe's paired interval of the difference (edited − source).",
        "",
        "| prompts | source 95 % CI | edited 95 % CI | flips (source only / edited only) | difference [95 % CI] | McNemar p |",
        "|---|---|---|---|---|---|",
        *[
            f"| {label} | {100 * g['text_source_ci_low']:.0f}–{100 * g['text_source_ci_high']:.0f} % | "
            f"{100 * g['text_edited_ci_low']:.0f}–{100 * g['text_edited_ci_high']:.0f} % | "
            f"{g['text_source_only']} / {g['text_edited_only']} | {100 * g['text_difference']:+.1f} pp "
            f"[{100 * g['text_difference_ci_low']:+.1f}, {100 * g['text_difference_ci_high']:+.1f}] | {g['text_mcnemar_p']:.2g} |"
            for label, g in (("unsafe", unsafe), ("safe", safe))
        ],
        "",
        f"Direction: layer {sidecar['layer']}, position {sidecar['position']} (of {len(sidecar['post_instruction_tokens'])} post-instruction tokens); "
        f"bypass {sidecar['scores']['bypass']:.3f}, induce {sidecar['scores']['induce']:.3f}, KL {sidecar['scores']['kl']:.4f}; {sidecar['selection']}.",
        f"Candidates: {sidecar['stats']['candidates']}, eligible {sidecar['stats']['eligible']}, fully scored {sidecar['stats']['fully_scored']}.",
        "",
        f"Verify ({verify['mode']}, stored {verify['stored_dtype']}, {verify['prompts']} prompts): {'passed' if verify['passed'] else 'FAILED'} — {verify['guarantee_text']}.",
        "",
        "| verify metric | value | tolerance |",
        "|---|---|---|",
        *[f"| {k} | {v:.3g} | {verify['tolerances'].get(k, '')} |" for k, v in verify["metrics"].items()],
        "",
        "Wall time on 2 CPU cores (seconds): "
        + ", ".join(f"{k} {v}" for k, v in timings.items() if v is not None)
        + ".",
        "",
        "Per area (counts refused by substrings):",
        "",
        "| area | label | n | source | edited | mean first-token KL |",
        "|---|---|---|---|---|---|",
    ]
    import csv

    with (out / "evaluation_by_area.csv").open() as handle:
        for row in csv.DictReader(handle):
            lines.append(
                f"| {row['area']} | {row['label']} | {row['n']} | {row['source_refused_text']} | {row['edited_refused_text']} | {float(row['mean_first_token_kl']):.4f} |"
            )
    (out / "README.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
