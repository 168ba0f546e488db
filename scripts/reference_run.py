"""Reference run on the default model: fit → diagnose → tune → apply/verify/evaluate per variant → report,
capability, then copy aggregates to artifacts/.

Usage (from the project folder, after the README's main-job install):
    python scripts/reference_run.py [--skip-fit] [--work runs/reference] [--steps ...] [--variants ...]

Fits once; `diagnose` writes the area diagnostics and the rank-k subspace; `tune` searches per-layer
strengths on the fit areas' validation prompts; then for each `apply` variant (the default norm-preserving
edit, `--biproject`, `--rank 2`, `--tuned`) applies, verifies and evaluates on the held-out areas;
`report` writes the Markdown report with figures; `capability` runs MMLU/ARC/WikiText subsets on the
source and the default and tuned edits. Only aggregate files are copied into artifacts/: the split,
every candidate's scores, the direction's sidecar (with the search), the diagnostics, the search trials,
the verify reports, the evaluation tables, the report and the capability tables (`weight-edit benchmark`). Completions are never
stored; the per-prompt file with the first few words of each completion stays in the work folder.
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

STEPS = ("fit", "diagnose", "tune", "variants", "report", "capability")
BENCHMARKS = ROOT.parent / "shared" / "benchmarks"


def run(args: list[str]) -> float:
    started = time.time()
    print("+ weight-edit " + " ".join(args), flush=True)
    # The same interpreter as this script, so it works whether or not the venv is activated.
    subprocess.run([sys.executable, "-m", "cli", *args], check=True, cwd=ROOT)
    return round(time.time() - started, 1)


def variants(work: Path) -> dict[str, list[str]]:
    return {
        "default": [],
        "biproject": ["--biproject"],
        "rank2": ["--rank", "2", "--subspace", str(work / "diagnose" / "subspace.safetensors")],
        "tuned": ["--tuned"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "reference")
    parser.add_argument("--skip-fit", action="store_true", help="reuse WORK/fit from an earlier run")
    parser.add_argument("--steps", nargs="+", default=list(STEPS), choices=STEPS)
    parser.add_argument("--variants", nargs="+", default=list(variants(Path())), choices=list(variants(Path())))
    parser.add_argument("--tune-trials", type=int, default=40)
    parser.add_argument("--tune-prompts", type=int, default=16, help="validation prompts per label for tune")
    parser.add_argument("--capability-limit", type=int, default=285, help="questions per benchmark")
    parser.add_argument("--capability-text-tokens", type=int, default=8192)
    args = parser.parse_args()
    work, fit_dir = args.work, args.work / "fit"
    artifacts = settings.ARTIFACTS_DIR / "reference"
    artifacts.mkdir(parents=True, exist_ok=True)
    timings_file = artifacts / "timings.json"
    timings = json.loads(timings_file.read_text())["seconds"] if timings_file.is_file() else {}

    def record(name: str, seconds: float) -> None:
        timings[name] = seconds
        timings_file.write_text(json.dumps({"seconds": timings, "machine": "2 CPU cores, no GPU"}, indent=2) + "\n")

    direction = str(fit_dir / settings.DIRECTION_FILE)
    if "fit" in args.steps and not args.skip_fit:
        record("fit", run(["fit", "--out-dir", str(fit_dir)]))
    if "diagnose" in args.steps:
        record("diagnose", run(["diagnose", "--direction", direction, "--out-dir", str(work / "diagnose")]))
        out = artifacts / "diagnostics"
        out.mkdir(exist_ok=True)
        for item in (work / "diagnose").iterdir():
            if item.suffix in (".csv", ".json") or item.name == "subspace.safetensors":
                shutil.copy(item, out / item.name)
    if "tune" in args.steps:
        tune_args = ["--trials", str(args.tune_trials), "--validation-prompts", str(args.tune_prompts)]
        record("tune", run(["tune", "--fit-dir", str(fit_dir), *tune_args]))
        out = artifacts / "search"
        out.mkdir(exist_ok=True)
        shutil.copy(fit_dir / "search_trials.csv", out / "search_trials.csv")
        draw_front(json.loads((fit_dir / settings.DIRECTION_SIDECAR).read_text())["search"], out / "pareto_front.png")
    for name in ("split.csv", "candidates.csv"):
        shutil.copy(fit_dir / name, artifacts / name)
    shutil.copy(fit_dir / settings.DIRECTION_SIDECAR, artifacts / "direction.json")
    if "variants" in args.steps:
        for variant in args.variants:
            edited, eval_dir, out = work / f"edited-{variant}", work / f"eval-{variant}", artifacts / variant
            apply_args = ["apply", "--direction", direction, "--out", str(edited), "--force"]
            variant_timings = {"apply": run(apply_args + variants(work)[variant])}
            variant_timings["verify"] = run(["verify", str(edited)])
            variant_timings["evaluate"] = run(["evaluate", str(edited), "--out-dir", str(eval_dir)])
            out.mkdir(parents=True, exist_ok=True)
            shutil.copy(edited / "weight_edit_verify.json", out / "verify.json")
            shutil.copy(eval_dir / "evaluation_by_area.csv", out / "evaluation_by_area.csv")
            shutil.copy(eval_dir / "evaluation_summary.json", out / "evaluation_summary.json")
            (out / "timings.json").write_text(
                json.dumps(
                    {"seconds": {"fit": timings.get("fit"), **variant_timings}, "machine": "2 CPU cores, no GPU"},
                    indent=2,
                )
                + "\n"
            )
            write_markdown(out, variant, variants(work)[variant])
            print(f"aggregates written to {out}")
    if "report" in args.steps:
        report_dir = artifacts / "report"
        run(
            [
                "report",
                "--fit-dir",
                str(fit_dir),
                "--eval-dir",
                str(work / "eval-default"),
                "--diagnose-dir",
                str(work / "diagnose"),
                "--out",
                str(report_dir),
                *[
                    f"--variant={name}={artifacts / name}"
                    for name in variants(work)
                    if (artifacts / name / "evaluation_summary.json").is_file()
                ],
            ]
        )
        front = artifacts / "search" / "pareto_front.png"
        if front.is_file():
            shutil.copy(front, report_dir / "figures" / "pareto_front.png")
    if "capability" in args.steps:
        edited = [str(work / f"edited-{v}") for v in ("default", "tuned") if (work / f"edited-{v}").is_dir()]
        capability = [
            "benchmark",
            *edited,
            "--mmlu",
            str(BENCHMARKS / "mmlu" / "data"),
            "--arc",
            str(BENCHMARKS / "arc" / "ARC-Challenge-Test.jsonl"),
            "--text",
            str(BENCHMARKS / "wikitext" / "wikitext-2-raw-v1.test.nonblank-crlf.raw"),
            "--limit",
            str(args.capability_limit),
            "--text-tokens",
            str(args.capability_text_tokens),
            "--out-dir",
            str(artifacts / "capability"),
        ]
        record("capability", run(capability))


def draw_front(search: dict, out: Path) -> None:
    """The search's trials as refusal probability vs KL, the front and the choice marked."""
    from weight_edit.figures import pareto_front

    trials = [
        {"refusal": t["refusal_prob"], "kl": t["kl"], "on_front": t["on_front"], "chosen": t["chosen"]}
        for t in search["trials"]
        if t["refusal_prob"] is not None and t["kl"] is not None
    ]
    full = next((t for t in search["trials"] if t.get("source") == "seed:full"), None)
    pareto_front(
        trials,
        None,
        out,
        refusal_label="first-token refusal probability on unsafe validation prompts (%)",
        reference={"refusal": full["refusal_prob"], "kl": full["kl"]} if full else None,
    )


def write_markdown(out: Path, variant: str, options: list[str]) -> None:
    sidecar = json.loads((out.parent / "direction.json").read_text())
    verify = json.loads((out / "verify.json").read_text())
    summary = json.loads((out / "evaluation_summary.json").read_text())
    timings = json.loads((out / "timings.json").read_text())["seconds"]
    unsafe, safe = summary["overall"]["unsafe"], summary["overall"]["safe"]

    def pct(k: int, n: int) -> str:
        return f"{k}/{n} ({100 * k / n:.0f} %)"

    lines = [
        f"# Reference run: Qwen2.5-Coder-1.5B-Instruct, `apply` variant `{variant}` ({' '.join(o for o in options if '/' not in o) or 'no options'})",
        "",
        f"Regenerate with `python scripts/reference_run.py`. Held-out policy areas: {', '.join(summary['held_out_areas'])}.",
        f"Greedy completions of {summary['max_new_tokens']} tokens in {summary['dtype']}; refusal = any of the paper's refusal substrings.",
        "",
        "| | source | edited |",
        "|---|---|---|",
        f"| unsafe prompts refused (substrings) | {pct(unsafe['source_refused_text'], unsafe['n'])} | {pct(unsafe['edited_refused_text'], unsafe['n'])} |",
        f"| unsafe prompts refused (first-token log-odds > 0) | {pct(unsafe['source_refused_log_odds'], unsafe['n'])} | {pct(unsafe['edited_refused_log_odds'], unsafe['n'])} |",
        f"| safe prompts refused (substrings) | {pct(safe['source_refused_text'], safe['n'])} | {pct(safe['edited_refused_text'], safe['n'])} |",
        f"| unsafe prompts refused (broad markers) | {pct(unsafe.get('source_refused_broad', 0), unsafe['n'])} | {pct(unsafe.get('edited_refused_broad', 0), unsafe['n'])} |",
        f"| safe prompts refused (broad markers) | {pct(safe.get('source_refused_broad', 0), safe['n'])} | {pct(safe.get('edited_refused_broad', 0), safe['n'])} |",
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
