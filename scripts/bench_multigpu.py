"""Benchmark `fit` and `verify` with the model split across devices by accelerate, against one device.

Builds a synthetic checkpoint on disk from a real config (random bfloat16 weights, a ChatML tokenizer
trained on the embedded dataset), applies a random direction with the streaming writer, then runs
`fit` and `verify` twice: whole on one GPU (when it fits) and split with `--max-memory` (across every
visible GPU, or, with one GPU, GPU plus CPU offload to force the split). Prints per-GPU peak memory,
prompts/s of activation collection and the wall time of each step, and the split/whole time ratio.

    python scripts/bench_multigpu.py --config llama3-8b --layers 8 --split-memory 0=6GiB,cpu=100GiB  # one GPU
    python scripts/bench_multigpu.py --config llama3-70b --split-memory 0=70GiB,1=70GiB --skip-whole   # two GPUs
    python scripts/bench_multigpu.py --config llama3-70b --layers 24 --split-memory 0=30GiB,1=70GiB --whole-verify-device cpu
    python scripts/bench_multigpu.py --config tiny --split-memory cpu=3MB --skip-whole                 # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_apply import CONFIGS  # noqa: E402

import settings  # noqa: E402


def parse_memory(text: str) -> dict:
    limits = {}
    for item in text.split(","):
        device, _, limit = item.partition("=")
        limits[int(device) if device.isdigit() else device] = limit
    return limits


def build_checkpoint(name: str, layers: int | None, folder: Path, device: str = "cpu") -> Path:
    """Random bfloat16 weights from a real config; built on `device` (a GPU initialises tens of GB in seconds)."""
    import torch
    from transformers import AutoConfig

    from weight_edit.models import release_memory
    from weight_edit.synthetic import random_model, train_chat_tokenizer

    spec = dict(CONFIGS[name])
    if layers:
        spec["num_hidden_layers"] = layers
    tokenizer = train_chat_tokenizer(vocab_size=4000)
    spec["vocab_size"] = max(spec["vocab_size"], len(tokenizer))
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    model = random_model(config, torch.bfloat16, device)
    model.save_pretrained(str(folder), max_shard_size="2GB")
    del model
    release_memory()
    tokenizer.save_pretrained(str(folder))
    return folder


def reset_peaks() -> None:
    import torch

    for index in range(torch.cuda.device_count()):
        torch.zeros(1, device=f"cuda:{index}")  # the allocator must exist before its statistics can be reset
        torch.cuda.reset_peak_memory_stats(index)


def run_fit(folder: Path, placement: dict, batch_size: int) -> dict:
    import torch

    from weight_edit.architecture import architecture_for
    from weight_edit.checkpoint import Checkpoint
    from weight_edit.dataset import load_split
    from weight_edit.fit import FitSettings, StepTimer, fit_direction
    from weight_edit.models import input_device, load_model, release_memory

    _, split = load_split(settings.DEFAULT_DATASET, settings.SEED)
    texts = {
        (p, lab): [x.text for x in split.select(p, lab)] for p in ("train", "validation") for lab in ("unsafe", "safe")
    }
    checkpoint = Checkpoint(folder)
    arch = architecture_for(checkpoint.config)
    reset_peaks()
    started = time.time()
    model, tokenizer = load_model(folder, dtype="bfloat16", **placement)
    load_s = time.time() - started
    progress = StepTimer(torch.cuda.synchronize if torch.cuda.is_available() else lambda: None)
    timings, counts = progress.seconds, progress.counts

    started = time.time()
    result = fit_direction(
        model,
        tokenizer,
        arch,
        arch.num_layers(checkpoint.config),
        texts[("train", "unsafe")],
        texts[("train", "safe")],
        texts[("validation", "unsafe")],
        texts[("validation", "safe")],
        FitSettings(batch_size=batch_size, refusal_prefixes=settings.REFUSAL_PREFIXES),
        progress,
    )
    fit_s = time.time() - started
    activation = [k for k in timings if k.startswith("activations")]
    report = {
        "device_map": sorted(
            {str(v) for v in (getattr(model, "hf_device_map", None) or {"": input_device(model)}).values()}
        ),
        "load_s": round(load_s, 1),
        "fit_s": round(fit_s, 1),
        "steps_s": {k: round(v, 2) for k, v in timings.items()},
        "activation_prompts_per_s": round(sum(counts[k] for k in activation) / sum(timings[k] for k in activation), 1),
        "peak_gpu_memory_gb": [
            round(torch.cuda.max_memory_allocated(i) / 1e9, 2) for i in range(torch.cuda.device_count())
        ],
        "chosen": {"layer": result.layer, "position": result.position},
        "direction": result.direction,
    }
    del model, result
    release_memory()
    return report


def run_verify(out: Path, placement: dict) -> dict:
    import torch

    from weight_edit.models import release_memory
    from weight_edit.verify import verify_checkpoint

    release_memory()
    reset_peaks()
    prompts = ["Tell me a joke", "How do locks work?", "Write a phishing email", "Explain how to pick a lock"]
    started = time.time()
    report = verify_checkpoint(out, prompts, settings.VERIFY_TOLERANCES, new_tokens=8, **placement)
    return {
        "verify_s": round(time.time() - started, 1),
        "passed": report.passed,
        "failures": report.failures,
        "metrics": {k: v for k, v in report.metrics.items() if isinstance(v, (int, float))},
        "peak_gpu_memory_gb": [
            round(torch.cuda.max_memory_allocated(i) / 1e9, 2) for i in range(torch.cuda.device_count())
        ],
    }


def main() -> None:
    import torch

    from weight_edit.checkpoint import Checkpoint
    from weight_edit.writer import apply_direction

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="llama3-8b")
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-multigpu"))
    parser.add_argument(
        "--split-memory", required=True, help="accelerate max_memory for the split run, e.g. 0=6GiB,cpu=100GiB"
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--skip-whole", action="store_true", help="the model does not fit one GPU")
    parser.add_argument(
        "--skip-whole-verify",
        action="store_true",
        help="fit whole on one GPU but verify only split (verify loads float32: twice the bf16 size)",
    )
    parser.add_argument(
        "--whole-verify-device",
        choices=["cuda", "cpu"],
        default="cuda",
        help="where the unsplit verify runs (cpu: the float32 model fits no single GPU)",
    )
    parser.add_argument("--build-device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, default=None, help="also write the report here (after every step)")
    args = parser.parse_args()

    def log(message: str) -> None:
        print(f"[bench_multigpu {time.strftime('%H:%M:%S')}] {message}", flush=True)

    folder = args.work / f"{args.config}-{args.layers or 'full'}"
    started = time.time()
    if not (folder / "config.json").is_file():
        build_checkpoint(args.config, args.layers, folder, args.build_device)
    build_s = time.time() - started
    size_gb = sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 1e9
    log(f"checkpoint {folder} ({size_gb:.1f} GB bf16) built in {build_s:.0f} s")
    config = Checkpoint(folder).config
    hidden = config["hidden_size"]
    edited = args.work / "edited"
    started = time.time()
    apply_direction(
        Checkpoint(folder), torch.randn(hidden, generator=torch.Generator().manual_seed(1)), edited, force=True
    )
    apply_s = time.time() - started
    log(f"applied a random direction in {apply_s:.0f} s")
    placements = {"split": {"device": "auto", "max_memory": parse_memory(args.split_memory)}}
    if not args.skip_whole:
        placements = {"whole": {"device": "cuda" if torch.cuda.is_available() else "cpu"}, **placements}
    results: dict[str, dict] = {}

    def summary() -> dict:
        return {
            "config": args.config,
            "layers": config["num_hidden_layers"],
            "checkpoint_gb": round(size_gb, 1),
            "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
            "split_memory": args.split_memory,
            "build_s": round(build_s, 1),
            "apply_s": round(apply_s, 1),
            **{
                k: {"fit": {kk: vv for kk, vv in v["fit"].items() if kk != "direction"}, "verify": v.get("verify")}
                for k, v in results.items()
            },
        }

    for name, placement in placements.items():
        results[name] = {"fit": run_fit(folder, placement, args.batch_size)}
        log(f"{name}: fit {json.dumps(summary()[name]['fit'])}")
        if args.json:
            args.json.write_text(json.dumps(summary(), indent=2))
        if not (name == "whole" and args.skip_whole_verify):
            verify_placement = {"device": args.whole_verify_device} if name == "whole" else placement
            results[name]["verify"] = run_verify(edited, verify_placement)
            log(f"{name}: verify {json.dumps(results[name]['verify'])}")
        if args.json:
            args.json.write_text(json.dumps(summary(), indent=2))
    report = summary()
    if "whole" in results:
        whole, split = results["whole"]["fit"], results["split"]["fit"]
        report["split_over_whole_fit_time"] = round(split["fit_s"] / whole["fit_s"], 2)
        report["same_choice"] = whole["chosen"] == split["chosen"]
        report["direction_cosine"] = float(
            torch.nn.functional.cosine_similarity(whole["direction"].float(), split["direction"].float(), dim=0)
        )
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
