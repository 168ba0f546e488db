"""Run a source checkpoint and its edited copy in llama.cpp and compare each with transformers.

Usage (from the project folder, with llama-cpp-python installed; see `BUILD_COMMAND`):
    python scripts/interop_llamacpp.py --edited runs/reference/edited-default [--source DIR]
        [--types f16 q8_0] [--limit N] [--threads N] [--llama-cpp-src DIR] [--work DIR] [--out artifacts/interop.md]

Each checkpoint is converted to GGUF by llama.cpp's own `convert_hf_to_gguf.py` (from the llama-cpp-python
source distribution of the installed version, so converter and runtime agree), once per GGUF type, and run
with llama-cpp-python on exactly the token ids that the transformers tokenizer's chat template produces.
Against transformers (float32, same checkpoint) it reports first-reply-token top-1 agreement and log-prob
differences, whether greedy continuations match, and refusal counts on the held-out unsafe prompts. The
source goes through the same path, so a difference caused by conversion is told apart from one caused by
the edit. Completions of unsafe prompts are scored and dropped (counts only); of safe prompts at most the
first few words are kept.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import os
import re
import shlex
import subprocess
import sys
import tarfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import settings  # noqa: E402

CONVERTER_NAME = "convert_hf_to_gguf.py"
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")
PREVIEW_WORDS = 4  # at most this many words of a safe prompt's completion are kept
# How llama-cpp-python was built here: a CPU build of the llama.cpp it vendors.
BUILD_COMMAND = 'CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python=={version}'


class InteropError(RuntimeError):
    """A precondition of the comparison is not met; the message says what to do."""


# --- locating llama.cpp's converter ---------------------------------------------------------------


def _sdist_version(llama_cpp_root: Path) -> str | None:
    """The llama-cpp-python version of an unpacked sdist (`llama_cpp/__init__.py`), if readable."""
    init = llama_cpp_root.parent.parent / "llama_cpp" / "__init__.py"
    if not init.is_file():
        return None
    match = re.search(r"""__version__\s*=\s*["']([^"']+)["']""", init.read_text(encoding="utf-8"))
    return match.group(1) if match else None


def locate_converter(folder: Path) -> Path:
    """Find `convert_hf_to_gguf.py` in a llama.cpp tree, an unpacked llama-cpp-python sdist, or a folder of them.

    Accepts the llama.cpp folder itself, the sdist root (`vendor/llama.cpp/`), or a folder holding one
    unpacked sdist (`llama_cpp_python-*/vendor/llama.cpp/`); with several, the highest-sorting name wins.
    """
    candidates = [folder / CONVERTER_NAME, folder / "vendor" / "llama.cpp" / CONVERTER_NAME]
    candidates += sorted(folder.glob(f"llama_cpp_python-*/vendor/llama.cpp/{CONVERTER_NAME}"), reverse=True)
    for candidate in candidates:
        if candidate.is_file() and (candidate.parent / "gguf-py").is_dir():
            return candidate
    raise InteropError(
        f"no {CONVERTER_NAME} (with gguf-py beside it) in {folder}: pass --llama-cpp-src an unpacked "
        "llama-cpp-python source distribution, or leave it out to download one"
    )


def unpack_sdist(archive: Path, dest: Path) -> Path:
    """Unpack a llama-cpp-python sdist into `dest`, refusing members that would land outside it."""
    dest = dest.resolve()
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            target = (dest / member.name).resolve()
            if dest not in target.parents and target != dest:
                raise InteropError(f"{archive}: member {member.name!r} points outside {dest}")
            if member.issym() or member.islnk():
                link = (target.parent / member.linkname).resolve()
                if dest not in link.parents:
                    raise InteropError(f"{archive}: link {member.name!r} points outside {dest}")
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, filter="data")
        else:  # pragma: no cover - Python < 3.11.4; members were checked above
            tar.extractall(dest)
    return dest


def fetch_llama_cpp_source(dest: Path, version: str) -> Path:
    """Download (pip) and unpack the llama-cpp-python sdist of `version` into `dest`; reuse one already there."""
    dest.mkdir(parents=True, exist_ok=True)
    unpacked = dest / f"llama_cpp_python-{version}"
    if (unpacked / "vendor" / "llama.cpp" / CONVERTER_NAME).is_file():
        return locate_converter(unpacked)
    archive = dest / f"llama_cpp_python-{version}.tar.gz"
    if not archive.is_file():
        command = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps"]
        command += [f"llama-cpp-python=={version}", "-d", str(dest)]
        log(f"downloading the llama-cpp-python {version} sdist: {shlex.join(command)}")
        subprocess.run(command, check=True)
    unpack_sdist(archive, dest)
    return locate_converter(unpacked)


# --- conversion -----------------------------------------------------------------------------------


def converter_command(python: str, converter: Path, checkpoint: Path, outfile: Path, outtype: str) -> list[str]:
    return [python, str(converter), str(checkpoint), "--outfile", str(outfile), "--outtype", outtype]


def checkpoint_key(folder: Path) -> dict[str, list[int]]:
    """Name → (size, mtime) of a checkpoint's files: a GGUF is reused only while these are unchanged."""
    return {
        p.name: [p.stat().st_size, p.stat().st_mtime_ns]
        for p in sorted(folder.iterdir())
        if p.is_file() and (p.suffix in (".safetensors", ".json", ".jinja") or p.name.startswith("tokenizer"))
    }


def convert(converter: Path, checkpoint: Path, outfile: Path, outtype: str) -> tuple[list[str], float, bool]:
    """Convert with llama.cpp's converter (atomically); returns the command, seconds, and whether it was reused."""
    sidecar = outfile.with_name(outfile.name + ".json")
    key = {"checkpoint": str(checkpoint.resolve()), "files": checkpoint_key(checkpoint), "outtype": outtype}
    command = converter_command(sys.executable, converter, checkpoint, outfile, outtype)
    if outfile.is_file() and sidecar.is_file() and json.loads(sidecar.read_text()) == key:
        return command, 0.0, True
    partial = outfile.with_name(outfile.name + ".partial")
    started = time.time()
    log(f"converting {checkpoint.name} to {outtype}: {shlex.join(command)}")
    result = subprocess.run(
        converter_command(sys.executable, converter, checkpoint, partial, outtype),
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        partial.unlink(missing_ok=True)
        raise InteropError(f"{CONVERTER_NAME} failed on {checkpoint} ({outtype}):\n{result.stderr[-3000:]}")
    os.replace(partial, outfile)
    sidecar.write_text(json.dumps(key, indent=1) + "\n")
    return command, round(time.time() - started, 1), False


def check_converter_dependencies() -> None:
    """The converter imports these from the running interpreter (gguf comes from its own gguf-py)."""
    import importlib.util

    missing = [m for m in ("torch", "numpy", "sentencepiece", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        raise InteropError(f"llama.cpp's converter needs {', '.join(missing)}: pip install {' '.join(missing)}")


# --- pure comparisons -----------------------------------------------------------------------------


def log_softmax(logits: np.ndarray) -> np.ndarray:
    values = np.asarray(logits, dtype=np.float64)
    shifted = values - values.max()
    return (shifted - np.log(np.exp(shifted).sum())).astype(np.float32)


def trim_at_stop(ids: Sequence[int], stop_ids: Sequence[int]) -> list[int]:
    """A continuation up to (not including) its first stop token."""
    stops = set(stop_ids)
    out: list[int] = []
    for token in ids:
        if int(token) in stops:
            break
        out.append(int(token))
    return out


def shared_prefix_length(previous: Sequence[int], ids: Sequence[int]) -> int:
    """Tokens at the start of `ids` equal to `previous`, leaving at least the last token of `ids` to evaluate."""
    shared = 0
    for a, b in zip(previous, ids[:-1], strict=False):
        if a != b:
            break
        shared += 1
    return shared


def matched_prefix_fraction(reference: Sequence[int], other: Sequence[int]) -> float:
    """Length of the common prefix over the longer continuation (1.0 when both are empty)."""
    longest = max(len(reference), len(other))
    if longest == 0:
        return 1.0
    common = 0
    for a, b in zip(reference, other, strict=False):
        if a != b:
            break
        common += 1
    return common / longest


def first_token_stats(reference: Sequence[np.ndarray], other: Sequence[np.ndarray]) -> dict[str, float]:
    """First-reply-token agreement of two runtimes, from their log-probabilities per prompt.

    `max_abs_dlogp_top1`: |Δ log p| of the reference's greedy token; `max_abs_dlogp_any`: over the whole
    (common) vocabulary; `mean_kl`: KL(reference ‖ other). Both are normalised over their own vocabulary
    first, then compared on the ids they share.
    """
    agree, top1, anywhere, kls = 0, 0.0, 0.0, []
    for ref, oth in zip(reference, other, strict=True):
        n = min(len(ref), len(oth))
        a, b = np.asarray(ref, dtype=np.float64)[:n], np.asarray(oth, dtype=np.float64)[:n]
        best = int(np.argmax(a))
        agree += int(best == int(np.argmax(b)))
        top1 = max(top1, abs(a[best] - b[best]))
        anywhere = max(anywhere, float(np.max(np.abs(a - b))))
        kls.append(float(np.sum(np.exp(a) * (a - b))))
    count = len(kls)
    return {
        "prompts": count,
        "top1_agreement": agree / count if count else float("nan"),
        "max_abs_dlogp_top1": float(top1),
        "max_abs_dlogp_any": float(anywhere),
        "mean_kl": float(np.mean(kls)) if kls else float("nan"),
    }


def greedy_stats(reference: Sequence[Sequence[int]], other: Sequence[Sequence[int]]) -> dict[str, float]:
    fractions = [matched_prefix_fraction(a, b) for a, b in zip(reference, other, strict=True)]
    return {
        "prompts": len(fractions),
        "identical": sum(1 for a, b in zip(reference, other, strict=True) if list(a) == list(b)),
        "mean_matched_prefix": float(np.mean(fractions)) if fractions else float("nan"),
    }


# --- running the two runtimes ---------------------------------------------------------------------


@dataclass
class PromptRun:
    """One prompt through one runtime: what is kept after the completion text is scored and dropped."""

    label: str  # "safe" or "unsafe"
    log_probs: np.ndarray  # first reply token, over the vocabulary
    continuation: list[int]  # greedy token ids up to the first stop token
    refused: bool  # the paper's refusal substrings, on the decoded continuation
    preview: str = ""  # first PREVIEW_WORDS words, safe prompts only


@dataclass
class PromptSet:
    """The prompts of one run, tokenized once with the chat template (shared by both runtimes)."""

    labels: list[str]
    categories: list[str]
    ids: list[list[int]]
    max_new_tokens: list[int]
    stop_ids: list[int] = field(default_factory=list)


def score_text(label: str, text: str) -> tuple[bool, str]:
    """Refusal flag and the preview kept for a completion (none for unsafe prompts)."""
    from weight_edit.evaluate import first_words, is_refusal

    refused = is_refusal(text, settings.REFUSAL_SUBSTRINGS)  # the text goes no further than this function
    return refused, first_words(text, PREVIEW_WORDS) if label == settings.SAFE_LABEL else ""


def stop_token_ids(model, tokenizer) -> list[int]:
    ids = model.generation_config.eos_token_id
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted(set(ids))


def build_prompt_set(tokenizer, prompts, max_new_tokens: dict[str, int], stop_ids: list[int]) -> PromptSet:
    from weight_edit.chat import tokenize_instructions

    ids = []
    for prompt in prompts:
        encoded, mask = tokenize_instructions(tokenizer, [prompt.text])
        ids.append(encoded[0][mask[0].bool()].tolist())
    return PromptSet(
        labels=[p.label for p in prompts],
        categories=[p.category for p in prompts],
        ids=ids,
        max_new_tokens=[max_new_tokens[p.label] for p in prompts],
        stop_ids=stop_ids,
    )


def run_transformers(model, tokenizer, prompt_set: PromptSet, batch_size: int) -> list[PromptRun]:
    """Greedy generation in float32, batched (left-padded) by equal max_new_tokens."""
    import torch

    runs: list[PromptRun | None] = [None] * len(prompt_set.ids)
    pad = tokenizer.pad_token_id
    for budget in sorted(set(prompt_set.max_new_tokens)):
        indices = [i for i, n in enumerate(prompt_set.max_new_tokens) if n == budget]
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            width = max(len(prompt_set.ids[i]) for i in chunk)
            input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, i in enumerate(chunk):
                ids = prompt_set.ids[i]
                input_ids[row, width - len(ids) :] = torch.tensor(ids)
                mask[row, width - len(ids) :] = 1
            with torch.inference_mode():
                out = model.generate(
                    input_ids=input_ids,
                    attention_mask=mask,
                    max_new_tokens=budget,
                    do_sample=False,
                    num_beams=1,
                    repetition_penalty=1.0,
                    eos_token_id=prompt_set.stop_ids,
                    pad_token_id=pad,
                    output_logits=True,
                    return_dict_in_generate=True,
                )
            first = out.logits[0].float().numpy()
            for row, i in enumerate(chunk):
                continuation = trim_at_stop(out.sequences[row, width:].tolist(), prompt_set.stop_ids)
                refused, preview = score_text(
                    prompt_set.labels[i], tokenizer.decode(continuation, skip_special_tokens=True)
                )
                runs[i] = PromptRun(prompt_set.labels[i], log_softmax(first[row]), continuation, refused, preview)
    return [r for r in runs if r is not None]


def run_llama_cpp(gguf: Path, tokenizer, prompt_set: PromptSet, threads: int) -> list[PromptRun]:
    """Greedy argmax decoding in llama.cpp on the same token ids; logits of the last position only."""
    import llama_cpp

    n_ctx = max(len(ids) + n for ids, n in zip(prompt_set.ids, prompt_set.max_new_tokens, strict=True)) + 8
    llm = llama_cpp.Llama(
        model_path=str(gguf),
        n_ctx=n_ctx,
        n_batch=n_ctx,
        n_threads=threads,
        n_threads_batch=threads,
        logits_all=False,
        verbose=False,
    )
    n_vocab = llm.n_vocab()

    def last_logits() -> np.ndarray:
        # With logits_all=False, Llama.eval no longer copies logits into llm.scores: read the context's own.
        pointer = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        return np.ctypeslib.as_array(pointer, shape=(n_vocab,)).copy()

    runs = []
    stops = set(prompt_set.stop_ids)
    previous: list[int] = []
    recurrent = getattr(llm, "_is_recurrent", False) or getattr(llm, "_is_hybrid", False)
    for label, ids, budget in zip(prompt_set.labels, prompt_set.ids, prompt_set.max_new_tokens, strict=True):
        # Keep the KV cache of the prompt prefix shared with the previous prompt (the chat template's system
        # turn), as llama-cpp-python's own generate() does; eval drops every cached position after it.
        if recurrent:  # their state cannot be cut back to a prefix
            llm.reset()
        else:
            llm.n_tokens = shared_prefix_length(previous, ids)
        llm.eval(ids[llm.n_tokens :])
        previous = ids
        logits = last_logits()
        first = log_softmax(logits)
        continuation: list[int] = []
        for step in range(budget):
            token = int(np.argmax(logits))
            if token in stops:
                break
            continuation.append(token)
            if step + 1 < budget:
                llm.eval([token])
                logits = last_logits()
        refused, preview = score_text(label, tokenizer.decode(continuation, skip_special_tokens=True))
        runs.append(PromptRun(label, first, continuation, refused, preview))
    llm.close()
    return runs


def compare(reference: list[PromptRun], other: list[PromptRun]) -> dict[str, object]:
    """Every number of one (model, GGUF type) row: first token, greedy match, refusal counts."""
    out: dict[str, object] = {
        "first_token": first_token_stats([r.log_probs for r in reference], [o.log_probs for o in other])
    }
    for label in (settings.SAFE_LABEL, settings.UNSAFE_LABEL):
        pairs = [(r, o) for r, o in zip(reference, other, strict=True) if r.label == label]
        out[f"greedy_{label}"] = greedy_stats([r.continuation for r, _ in pairs], [o.continuation for _, o in pairs])
        out[f"refused_{label}"] = {
            "prompts": len(pairs),
            "transformers": sum(r.refused for r, _ in pairs),
            "llama_cpp": sum(o.refused for _, o in pairs),
            "same_verdict": sum(r.refused == o.refused for r, o in pairs),
        }
    return out


# --- report ---------------------------------------------------------------------------------------


def _num(value: float, digits: int = 3) -> str:
    return "–" if value is None or value != value else f"{value:.{digits}g}"


def render_markdown(report: dict) -> str:
    """The Markdown page: agreement per model × GGUF type, refusal counts, previews, commands, timings."""
    models, types = list(report["models"]), report["types"]
    prompts = report["prompts"]
    lines = [
        "# llama.cpp interop: the source and the edited checkpoint as GGUF",
        "",
        f"Regenerate with `{report['command']}`.",
        "",
        f"llama-cpp-python {report['versions']['llama_cpp_python']} (llama.cpp built on this machine's CPU), "
        f"converter `{CONVERTER_NAME}` from the llama-cpp-python {report['versions']['converter_sdist']} sdist, "
        f"transformers {report['versions']['transformers']}, torch {report['versions']['torch']}; "
        f"{report['machine']}, {report['threads']} threads.",
        "",
        "Each checkpoint is converted by llama.cpp's own converter, once per GGUF type, and run by llama-cpp-python "
        "on the token ids that the transformers tokenizer's chat template produces (identical input to both "
        "runtimes); the reference is transformers in float32 on the same checkpoint. Greedy = argmax decoding on both "
        f"sides, stopped at the first end-of-turn token. Prompts: {prompts['unsafe']} held-out unsafe "
        f"({prompts['unsafe_tokens']} new tokens) and {prompts['safe']} held-out safe ({prompts['safe_tokens']} new "
        f"tokens) from the embedded dataset (held-out areas: {', '.join(prompts['held_out_areas'])}); "
        "first-token numbers pool both. Completions of unsafe prompts are scored and dropped.",
        "",
        "## Agreement with transformers (float32) on the same checkpoint",
        "",
        "| model | GGUF (MiB) | first-token top-1 agreement | max \\|Δ log p\\| of the first reply token | max \\|Δ log p\\| over the vocabulary | mean KL | greedy identical, safe | matched prefix, safe | greedy identical, unsafe |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for model in models:
        for gguf_type in types:
            row = report["models"][model]["gguf"][gguf_type]
            first, safe, unsafe = row["first_token"], row["greedy_safe"], row["greedy_unsafe"]
            lines.append(
                f"| {model} | {gguf_type} ({row['gguf_bytes'] / 2**20:.0f}) | {first['top1_agreement']:.3f} ({first['prompts']} prompts) | "
                f"{_num(first['max_abs_dlogp_top1'])} | {_num(first['max_abs_dlogp_any'])} | {_num(first['mean_kl'])} | "
                f"{safe['identical']}/{safe['prompts']} | {_num(safe['mean_matched_prefix'])} | "
                f"{unsafe['identical']}/{unsafe['prompts']} |"
            )
    lines += [
        "",
        "## Refusal on the held-out unsafe prompts (the paper's substrings)",
        "",
        "| model | transformers float32 | "
        + " | ".join(f"llama.cpp {t}" for t in types)
        + " | "
        + " | ".join(f"same verdict ({t})" for t in types)
        + " |",
        "|---|---|" + "---|" * (2 * len(types)),
    ]
    for model in models:
        ggufs = report["models"][model]["gguf"]
        refused = ggufs[types[0]]["refused_unsafe"]
        n = refused["prompts"]
        lines.append(
            f"| {model} | {refused['transformers']}/{n} | "
            + " | ".join(f"{ggufs[t]['refused_unsafe']['llama_cpp']}/{n}" for t in types)
            + " | "
            + " | ".join(f"{ggufs[t]['refused_unsafe']['same_verdict']}/{n}" for t in types)
            + " |"
        )
    lines += [
        "",
        f"Safe prompts refused (same substrings, {prompts['safe_tokens']} tokens): "
        + "; ".join(
            f"{model}: transformers {report['models'][model]['gguf'][types[0]]['refused_safe']['transformers']}, "
            + ", ".join(f"{t} {report['models'][model]['gguf'][t]['refused_safe']['llama_cpp']}" for t in types)
            + f" of {report['models'][model]['gguf'][types[0]]['refused_safe']['prompts']}"
            for model in models
        )
        + ".",
        "",
        f"## First {PREVIEW_WORDS} words of the first safe completions",
        "",
        "| model | category | transformers | " + " | ".join(f"llama.cpp {t}" for t in types) + " |",
        "|---|---|---|" + "---|" * len(types),
    ]
    for model in models:
        for preview in report["models"][model]["safe_previews"]:
            lines.append(
                f"| {model} | {preview['category']} | {preview['transformers']} | "
                + " | ".join(preview[t] for t in types)
                + " |"
            )
    lines += ["", "## Commands", "", "```bash", *report["commands"], "```", "", "## Wall time (seconds)", ""]
    lines += ["| step | seconds |", "|---|---|"]
    lines += [f"| {step} | {seconds} |" for step, seconds in report["seconds"].items()]
    return "\n".join(lines) + "\n"


# --- main -----------------------------------------------------------------------------------------


def log(message: str) -> None:
    print(f"[interop] {message}", file=sys.stderr, flush=True)


def select_prompts(limit: int | None, safe_count: int):
    from weight_edit.dataset import load_split

    _, split = load_split(settings.DEFAULT_DATASET, settings.SEED)
    unsafe = split.prompts("held_out", settings.UNSAFE_LABEL, limit)
    safe_limit = safe_count if limit is None else min(limit, safe_count)
    safe = split.prompts("held_out", settings.SAFE_LABEL, safe_limit)
    return split, safe, unsafe


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, help="source checkpoint folder (default: the default model)")
    parser.add_argument("--edited", type=Path, required=True, help="folder written by `weight-edit apply`")
    parser.add_argument("--work", type=Path, help="where GGUFs and the sdist go (default: the weight-edit cache)")
    parser.add_argument("--types", nargs="+", default=["f16", "q8_0"], choices=GGUF_TYPES)
    parser.add_argument("--limit", type=int, help="at most this many unsafe (and safe) prompts")
    parser.add_argument("--safe-prompts", type=int, default=16, help="safe prompts for greedy continuations")
    parser.add_argument("--safe-tokens", type=int, default=16, help="greedy tokens on safe prompts")
    parser.add_argument("--unsafe-tokens", type=int, default=32, help="greedy tokens on unsafe prompts")
    parser.add_argument(
        "--threads",
        type=int,
        default=max(1, (os.cpu_count() or 2) // 2),
        help="CPU threads for llama.cpp and torch (default: half the cores, as llama-cpp-python does); "
        "use 1 while other jobs run: llama.cpp's threads spin-wait and slow down many-fold on a busy CPU",
    )
    parser.add_argument("--batch-size", type=int, default=16, help="transformers generation batch")
    parser.add_argument("--llama-cpp-src", type=Path, help="unpacked llama-cpp-python sdist (default: download)")
    parser.add_argument("--out", type=Path, default=settings.ARTIFACTS_DIR / "interop.md")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.time()
    import torch
    import transformers

    from weight_edit.models import cache_dir, load_model, resolve_model

    try:
        llama_cpp_version = importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError as exc:
        raise InteropError(f"llama-cpp-python is not installed: {BUILD_COMMAND.format(version='X.Y.Z')}") from exc
    check_converter_dependencies()
    work = (args.work or cache_dir() / "interop").expanduser()
    work.mkdir(parents=True, exist_ok=True)
    if args.llama_cpp_src:
        converter = locate_converter(args.llama_cpp_src.expanduser())
    else:
        converter = fetch_llama_cpp_source(work / "llama-cpp-src", llama_cpp_version)
    converter_version = _sdist_version(converter.parent) or "unknown"
    if converter_version != llama_cpp_version:
        log(f"warning: converter from sdist {converter_version}, runtime llama-cpp-python {llama_cpp_version}")
    torch.set_num_threads(args.threads)
    checkpoints = {"source": Path(resolve_model(str(args.source) if args.source else None)), "edited": args.edited}
    split, safe, unsafe = select_prompts(args.limit, args.safe_prompts)
    seconds: dict[str, float] = {}
    this_command = "python scripts/interop_llamacpp.py " + shlex.join(list(argv if argv is not None else sys.argv[1:]))
    commands = [
        "# llama-cpp-python, built here (CPU, llama.cpp vendored in the sdist)",
        BUILD_COMMAND.format(version=llama_cpp_version),
        "# this report",
        this_command,
        f"# GGUF conversions (llama.cpp's converter; {converter})",
    ]
    models: dict[str, dict] = {}
    for name, folder in checkpoints.items():
        clock = time.time()
        model, tokenizer = load_model(folder, dtype="float32", device="cpu")
        stop_ids = stop_token_ids(model, tokenizer)
        budgets = {settings.SAFE_LABEL: args.safe_tokens, settings.UNSAFE_LABEL: args.unsafe_tokens}
        prompt_set = build_prompt_set(tokenizer, safe + unsafe, budgets, stop_ids)
        log(f"{name}: transformers float32 on {len(safe)} safe + {len(unsafe)} unsafe prompts")
        reference = run_transformers(model, tokenizer, prompt_set, args.batch_size)
        seconds[f"{name}: transformers float32 (load + generate)"] = round(time.time() - clock, 1)
        del model
        gc.collect()
        models[name] = {"checkpoint": str(folder), "gguf": {}}
        previews = [
            {"category": prompt_set.categories[i], "transformers": reference[i].preview}
            for i in range(min(3, len(safe)))
        ]
        for gguf_type in args.types:
            gguf = work / f"{name}-{folder.resolve().name}-{gguf_type}.gguf"
            command, convert_seconds, reused = convert(converter, folder, gguf, gguf_type)
            commands.append(shlex.join([Path(command[0]).name, *command[1:]]))
            seconds[f"{name}: convert to {gguf_type}" + (" (reused)" if reused else "")] = convert_seconds
            clock = time.time()
            log(f"{name}: llama.cpp {gguf_type}")
            runs = run_llama_cpp(gguf, tokenizer, prompt_set, args.threads)
            elapsed = time.time() - clock
            seconds[f"{name}: llama.cpp {gguf_type} (load + generate)"] = round(elapsed, 1)
            generated = sum(len(r.continuation) for r in runs)
            models[name]["gguf"][gguf_type] = {
                "gguf_bytes": gguf.stat().st_size,
                "generated_tokens": generated,
                "tokens_per_second_incl_prompts": round(generated / elapsed, 2),
                **compare(reference, runs),
            }
            for i, preview in enumerate(previews):
                preview[gguf_type] = runs[i].preview
            del runs
        models[name]["safe_previews"] = previews
        del reference
        gc.collect()
    seconds["total"] = round(time.time() - started, 1)
    report = {
        "command": this_command,
        "commands": commands,
        "versions": {
            "llama_cpp_python": llama_cpp_version,
            "converter_sdist": converter_version,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
        },
        "machine": f"{os.cpu_count()} CPU cores",
        "threads": args.threads,
        "types": args.types,
        "prompts": {
            "unsafe": len(unsafe),
            "safe": len(safe),
            "unsafe_tokens": args.unsafe_tokens,
            "safe_tokens": args.safe_tokens,
            "held_out_areas": list(split.held_out_areas),
            "seed": settings.SEED,
        },
        "models": models,
        "seconds": seconds,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render_markdown(report))
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    log(f"wrote {args.out} and {args.out.with_suffix('.json')} in {seconds['total']} s")


if __name__ == "__main__":
    try:
        main()
    except InteropError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
