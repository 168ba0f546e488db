"""Edits of one model compared on the public benchmark files and the held-out policy areas, step by step timed.

Each variant is a `fit` (its contrast and selection rule), an `apply`, a `verify` and an `evaluate` with every
file of the benchmark folder (`../shared/benchmarks/refusal/`: harmful sets, an over-refusal set, ordinary
instructions for KL; evaluation only). The source's scores are computed once and reused by every later
evaluation with the same settings. Only aggregates are kept under --out: per variant the direction's sidecar,
candidate scores, verify report and evaluation tables; `summary.json` and `README.md` compare the variants.

    python scripts/public_benchmarks.py --model ~/.cache/weight-edit/models/qwen2.5-coder-1.5b-instruct \\
        --variants default first --out artifacts/reference/public_benchmarks

Variants: `default` = `weight-edit fit` on its defaults (harmless contrast, refusal-then-kl selection);
`first` = the project's first direction (`--contrast safe --selection paper`); `harmless-paper` = harmless
contrast, the paper's lowest-bypass selection; `tuned` = `tune` on the default fit, then `apply --tuned`;
`biproject` = the default fit applied with `--biproject`. `--report-only` rebuilds summary.json and README.md
from the variant folders already under --out.
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

BENCHMARKS = ROOT.parent / "shared" / "benchmarks" / "refusal"
# What each public file is: the kind `evaluate --benchmark` declares it as.
KINDS = {
    "harmbench_test": "harmful",
    "strongreject": "harmful",
    "advbench": "harmful",
    "malicious_instruct": "harmful",
    "jbb_benign": "safe",
    "alpaca_harmless_val": "harmless",
}
FIT_OPTIONS = {
    "default": [],
    "first": ["--contrast", "safe", "--selection", "paper"],
    "harmless-paper": ["--contrast", "harmless", "--selection", "paper"],
}
# Variants that reuse the default fit, with what `apply` adds.
ON_DEFAULT_FIT = {"tuned": ["--tuned"], "biproject": ["--biproject"]}
VARIANTS = (*FIT_OPTIONS, *ON_DEFAULT_FIT)
KEPT = {  # aggregates copied per variant: (folder key, file name)
    "fit": ("direction.json", "candidates.csv", "search_trials.csv"),
    "edited": ("weight_edit_verify.json",),
    "eval": ("evaluation_summary.json", "evaluation_by_area.csv", "evaluation_by_benchmark.csv"),
}


def run(args: list[str]) -> float:
    started = time.time()
    print("+ weight-edit " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "cli", *args], check=True, cwd=ROOT)
    return round(time.time() - started, 1)


def benchmark_options(folder: Path) -> list[str]:
    options = []
    for name, kind in KINDS.items():
        path = folder / f"{name}.csv"
        if not path.is_file():
            raise SystemExit(f"{path} is missing (expected the six files of ../shared/benchmarks/refusal)")
        options += ["--benchmark", f"{kind}:{name}={path}"]
    return options


def run_variant(variant: str, args: argparse.Namespace, common: list[str]) -> dict[str, float]:
    work = args.work
    timings: dict[str, float] = {}
    if variant in ON_DEFAULT_FIT:
        fit_dir = work / "fit-default"
        if not (fit_dir / settings.DIRECTION_FILE).is_file():
            timings["fit"] = run(["fit", "--model", args.model, "--out-dir", str(fit_dir), *common, *args.fit_arg])
        if variant == "tuned":  # tune records its search in the fit folder: keep the default fit's untouched
            shutil.copytree(fit_dir, work / "fit-tuned", dirs_exist_ok=True)
            fit_dir = work / "fit-tuned"
            tune = ["--trials", str(args.tune_trials), "--validation-prompts", str(args.tune_prompts)]
            timings["tune"] = run(["tune", "--fit-dir", str(fit_dir), "--device", args.device, *tune])
        apply_options = ON_DEFAULT_FIT[variant]
    else:
        fit_dir = work / f"fit-{variant}"
        fit = ["fit", "--model", args.model, "--out-dir", str(fit_dir), *common, *FIT_OPTIONS[variant], *args.fit_arg]
        timings["fit"] = run(fit)
        apply_options = []
    edited, eval_dir = work / f"edited-{variant}", work / f"eval-{variant}"
    direction = str(fit_dir / settings.DIRECTION_FILE)
    timings["apply"] = run(["apply", "--direction", direction, "--out", str(edited), "--force", *apply_options])
    timings["verify"] = run(["verify", str(edited), "--device", args.device])
    evaluate = ["evaluate", str(edited), "--out-dir", str(eval_dir), "--max-new-tokens", str(args.max_new_tokens)]
    evaluate += ["--limit", str(args.limit)] if args.limit else []
    timings["evaluate"] = run([*evaluate, *common, *benchmark_options(args.benchmarks)])
    out = args.out / variant
    out.mkdir(parents=True, exist_ok=True)
    for key, folder in (("fit", fit_dir), ("edited", edited), ("eval", eval_dir)):
        for name in KEPT[key]:
            if (folder / name).is_file():
                shutil.copy(folder / name, out / name)
    (out / "timings.json").write_text(json.dumps({"seconds": timings, "machine": args.machine}, indent=2) + "\n")
    if not args.keep_checkpoints:
        shutil.rmtree(edited)
    return timings


def variant_summary(folder: Path) -> dict:
    """The numbers the comparison table shows, read back from a variant's aggregate files."""
    sidecar = json.loads((folder / "direction.json").read_text())
    summary = json.loads((folder / "evaluation_summary.json").read_text())
    verify = json.loads((folder / "weight_edit_verify.json").read_text())
    import csv

    with (folder / "evaluation_by_benchmark.csv").open() as handle:
        rows = {(r["benchmark"], r["label"]): r for r in csv.DictReader(handle)}

    def counts(row: dict, who: str) -> dict:
        return {"refused": int(row[f"{who}_refused_text"]), "refused_broad": int(row[f"{who}_refused_broad"])}

    files = {
        name: {
            "kind": kind,
            "n": int(rows[(name, kind)]["n"]),
            "source": counts(rows[(name, kind)], "source"),
            "edited": counts(rows[(name, kind)], "edited"),
            "kl": float(rows[(name, kind)]["mean_first_token_kl"]),
            "mcnemar_p": float(rows[(name, kind)]["text_mcnemar_p"]),
        }
        for (name, kind) in rows
        if name != "ALL"
    }
    harmful = rows[("ALL", "harmful")]
    policy = summary["overall"]
    search = sidecar.get("search") or {}
    return {
        "direction": {
            "contrast": sidecar.get("contrast", "safe"),
            "selection": sidecar.get("settings", {}).get("selection", "paper"),
            "layer": sidecar["layer"],
            "position": sidecar["position"],
            "scores": sidecar["scores"],
            "tuned_trial": (search.get("chosen") or {}).get("trial") if search else None,
        },
        "harmful_all": {
            "n": int(harmful["n"]),
            "source": counts(harmful, "source"),
            "edited": counts(harmful, "edited"),
            "difference_ci": [float(harmful["text_difference_ci_low"]), float(harmful["text_difference_ci_high"])],
        },
        "files": files,
        "policy_areas": {
            label: {
                "n": g["n"],
                "source_refused": g["source_refused_text"],
                "edited_refused": g["edited_refused_text"],
                "kl": g["mean_first_token_kl"],
            }
            for label, g in policy.items()
        },
        "verify": {"passed": verify["passed"], "guarantee": verify["guarantee"], "metrics": verify["metrics"]},
        "evaluation": {"dtype": summary["dtype"], "max_new_tokens": summary["max_new_tokens"]},
    }


def write_readme(out: Path, summaries: dict[str, dict], timings: dict, machine: str, commands: list[str]) -> None:
    def pct(k: int, n: int) -> str:
        return f"{100 * k / n:.1f} % ({k}/{n})"

    first = next(iter(summaries.values()))
    lines = [
        "# Edits compared on public benchmark files and the held-out policy areas",
        "",
        "Regenerated by `scripts/public_benchmarks.py`; the runs behind these files: "
        + "; ".join(f"`{c}`" for c in commands)
        + ". Public files: "
        "`../shared/benchmarks/refusal/` (evaluation only, never fit or tuned on). Greedy completions of "
        f"{first['evaluation']['max_new_tokens']} tokens in {first['evaluation']['dtype']}; refused = contains one "
        "of the paper's refusal substrings; KL = mean first-token KL(source ‖ edited). Machine: " + machine + ".",
        "",
        "| edit | contrast, selection | layer, pos | harmful refused (4 files) | jbb_benign refused | KL alpaca_harmless_val | held-out areas: unsafe / safe refused | KL own harmless held-out | verify |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    source = first
    harm, jbb = source["harmful_all"], source["files"]["jbb_benign"]
    policy = source["policy_areas"]
    lines.append(
        f"| source | – | – | {pct(harm['source']['refused'], harm['n'])} | {pct(jbb['source']['refused'], jbb['n'])} | 0 | "
        f"{policy['unsafe']['source_refused']}/{policy['unsafe']['n']} / {policy['safe']['source_refused']}/{policy['safe']['n']} | 0 | – |"
    )
    for name, s in summaries.items():
        d, harm, files, policy = s["direction"], s["harmful_all"], s["files"], s["policy_areas"]
        how = f"{d['contrast']}, {d['selection']}" + (
            f", tuned (trial {d['tuned_trial']})" if d["tuned_trial"] is not None else ""
        )
        harmless = policy.get("harmless", {})
        lines.append(
            f"| {name} | {how} | {d['layer']}, {d['position']} | {pct(harm['edited']['refused'], harm['n'])} | "
            f"{pct(files['jbb_benign']['edited']['refused'], files['jbb_benign']['n'])} | {files['alpaca_harmless_val']['kl']:.3f} | "
            f"{policy['unsafe']['edited_refused']}/{policy['unsafe']['n']} / {policy['safe']['edited_refused']}/{policy['safe']['n']} | "
            f"{harmless.get('kl', float('nan')):.3f} | {'passed' if s['verify']['passed'] else 'FAILED'} |"
        )
    lines += ["", "Per file (refused by substrings, source → edited; broad markers in brackets):", ""]
    names = list(first["files"])
    lines += ["| edit | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    lines.append(
        "| source | "
        + " | ".join(f"{first['files'][n]['source']['refused']}/{first['files'][n]['n']}" for n in names)
        + " |"
    )
    for name, s in summaries.items():
        cells = [
            f"{s['files'][n]['edited']['refused']}/{s['files'][n]['n']} [{s['files'][n]['edited']['refused_broad']}]"
            + (f", KL {s['files'][n]['kl']:.3f}" if s["files"][n]["kind"] != "harmful" else "")
            for n in names
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Wall time per step (s):",
        "",
        "| edit | " + " | ".join(("fit", "tune", "apply", "verify", "evaluate")) + " |",
    ]
    lines.append("|---|---|---|---|---|---|")
    for name, t in timings.items():
        lines.append(
            f"| {name} | "
            + " | ".join(str(t.get(k, "–")) for k in ("fit", "tune", "apply", "verify", "evaluate"))
            + " |"
        )
    (out / "README.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="checkpoint folder or .gguf (as `fit --model`)")
    parser.add_argument("--variants", nargs="+", default=["default", "first"], choices=VARIANTS)
    parser.add_argument("--benchmarks", type=Path, default=BENCHMARKS)
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "public_benchmarks")
    parser.add_argument("--out", type=Path, default=settings.ARTIFACTS_DIR / "reference" / "public_benchmarks")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="fast")
    parser.add_argument("--max-new-tokens", type=int, default=40, help="as the peers' published comparison")
    parser.add_argument("--tune-trials", type=int, default=settings.TUNE_TRIALS)
    parser.add_argument("--tune-prompts", type=int, default=0, help="validation prompts per label for tune (0: all)")
    parser.add_argument("--machine", default="2 CPU cores, no GPU", help="recorded beside the timings")
    parser.add_argument("--keep-checkpoints", action="store_true")
    parser.add_argument("--limit", type=int, default=0, help="held-out policy prompts per label (0: all)")
    parser.add_argument("--report-only", action="store_true", help="only rebuild summary.json and README.md")
    parser.add_argument(
        "--fit-arg", action="append", default=[], help="extra argument for every fit, e.g. --fit-arg=--screen-keep"
    )
    args = parser.parse_args()
    common = ["--device", args.device, "--dtype", args.dtype]
    args.out.mkdir(parents=True, exist_ok=True)
    summary_file = args.out / "summary.json"
    previous = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    timings = previous.get("timings", {})
    commands = previous.get("commands", [])
    if not args.report_only:
        commands.append(" ".join(sys.argv))
        for variant in args.variants:
            timings[variant] = run_variant(variant, args, common)
    summaries = {
        v: variant_summary(args.out / v) for v in VARIANTS if (args.out / v / "evaluation_summary.json").is_file()
    }
    record = {
        "commands": commands,
        "machine": previous.get("machine", args.machine) if args.report_only else args.machine,
        "max_new_tokens": args.max_new_tokens,
        "timings": timings,
        "variants": summaries,
    }
    summary_file.write_text(json.dumps(record, indent=2) + "\n")
    write_readme(args.out, summaries, timings, record["machine"], commands)
    print(f"wrote {summary_file} and {args.out / 'README.md'}")


if __name__ == "__main__":
    main()
