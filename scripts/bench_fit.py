"""Benchmark `fit` on a random-weight model with a real config's shapes.

Builds the model in memory from a real config (random weights), uses a ChatML tokenizer trained
here on the embedded dataset (the real tokenizer cannot be downloaded), and runs the library's
`fit_direction` on the embedded dataset's fit split. Prints prompts/s of activation collection, its
model-FLOPs utilisation (2 × parameters × tokens / time / peak), and the wall time of each step.

    python scripts/bench_fit.py --config llama3-8b --device cuda --batch-size 64      # GPU machine
    python scripts/bench_fit.py --config qwen2.5-1.5b --device cpu --dtype bfloat16   # here
    python scripts/bench_fit.py --model ~/.cache/weight-edit/models/qwen2.5-coder-1.5b-instruct \
        --device cpu --dtype float32 --batch-size 16 --reference-direction runs/reference/fit/direction.safetensors

`--model` times the real checkpoint with its own tokenizer instead (then the cosine with a reference
direction, e.g. an earlier `fit`'s, shows whether the choice changed). Model FLOPs count every prompt
token, including the chat template's shared prefix that the forward passes compute once per batch.
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

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}  # dense bf16 tensor-core peak per GPU (vendor figures)


def main() -> None:
    import torch
    from transformers import AutoConfig

    from weight_edit.architecture import architecture_for
    from weight_edit.dataset import load_split
    from weight_edit.fit import FitSettings, StepTimer, fit_direction
    from weight_edit.synthetic import random_model, train_chat_tokenizer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="qwen2.5-1.5b")
    parser.add_argument("--layers", type=int, default=None, help="override the depth")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--screen-keep", type=int, default=settings.SCREEN_KEEP)
    parser.add_argument("--model", type=Path, help="a real checkpoint folder (its tokenizer too) instead of --config")
    parser.add_argument("--reference-direction", type=Path, help="direction.safetensors to compare the result with")
    args = parser.parse_args()

    started = time.time()
    if args.model:
        from weight_edit.models import load_model

        model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
        config = model.config
        model_type = config.model_type
        args.config = str(args.model)
    else:
        spec = dict(CONFIGS[args.config])
        if args.layers:
            spec["num_hidden_layers"] = args.layers
        model_type = spec.pop("model_type")
        config = AutoConfig.for_model(model_type, **spec)
        model = random_model(config, getattr(torch, args.dtype), args.device)
        tokenizer = train_chat_tokenizer(vocab_size=4000)
    model.eval()
    build_s = time.time() - started
    parameters = sum(p.numel() for p in model.parameters())

    _, split = load_split(settings.DEFAULT_DATASET, settings.SEED)
    contrast = settings.DEFAULT_CONTRAST  # as `fit` on its defaults
    texts = {
        (part, label): split.texts(part, label)  # in `fit`'s order
        for part in ("train", "validation")
        for label in ("unsafe", contrast)
    }
    arch = architecture_for({"model_type": model_type})

    progress = StepTimer(torch.cuda.synchronize if args.device == "cuda" else lambda: None)
    timings, counts = progress.seconds, progress.counts

    if args.batch_size == 0:
        from weight_edit.models import auto_batch_size

        args.batch_size = auto_batch_size(model)
    # One warm-up forward pass (CUDA context, cuBLAS handles, kernel selection) outside the timings.
    warm = tokenizer(["warm up"] * args.batch_size, return_tensors="pt").to(args.device)
    with torch.inference_mode():
        model(**warm, output_hidden_states=True, logits_to_keep=1)
    if args.device == "cuda":
        torch.cuda.synchronize()
    fit_started = time.time()
    result = fit_direction(
        model,
        tokenizer,
        arch,
        config.num_hidden_layers,
        texts[("train", "unsafe")],
        texts[("train", contrast)],
        texts[("validation", "unsafe")],
        texts[("validation", contrast)],
        FitSettings.from_project_settings(args.batch_size, screen_keep=args.screen_keep),  # as `fit`
        progress,
        contrast_name=contrast,
    )
    fit_s = time.time() - fit_started
    activation_steps = [k for k in timings if k.startswith("activations")]
    prompts = sum(counts[k] for k in activation_steps)
    seconds = sum(timings[k] for k in activation_steps)
    chats = [[{"role": "user", "content": t}] for t in texts[("train", "unsafe")] + texts[("train", contrast)]]
    formatted = tokenizer.apply_chat_template(chats, add_generation_prompt=True, tokenize=False)
    lengths = [len(ids) for ids in tokenizer(formatted, add_special_tokens=False)["input_ids"]]
    tokens = sum(lengths)
    achieved = 2 * parameters * tokens / seconds / 1e12
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in device_name), None)
    report = {
        "config": args.config,
        "layers": config.num_hidden_layers,
        "parameters": parameters,
        "device": device_name,
        "dtype": args.dtype,
        "batch_size": args.batch_size,
        "build_s": round(build_s, 1),
        "fit_s": round(fit_s, 1),
        "steps_s": {k: round(v, 2) for k, v in timings.items()},
        "activation_prompts_per_s": round(prompts / seconds, 1),
        "activation_tokens": tokens,
        "activation_tflops": round(achieved, 1),
        "activation_mfu": round(achieved / peak, 3) if peak else None,
        "chosen": {"layer": result.layer, "position": result.position, "selection": result.selection_note},
        "peak_gpu_memory_gb": round(torch.cuda.max_memory_allocated() / 1e9, 1) if args.device == "cuda" else None,
    }
    if args.reference_direction:
        from weight_edit.direction_file import load_direction

        reference, _ = load_direction(args.reference_direction)
        report["cosine_with_reference"] = round(
            float(torch.nn.functional.cosine_similarity(result.direction.double(), reference.double(), dim=0)), 6
        )
    print(json.dumps(report, indent=2))
    print(
        f"{args.config} ({parameters / 1e9:.2f} B params) on {device_name}: fit {fit_s:.0f} s; activations "
        f"{prompts / seconds:.1f} prompts/s, {achieved:.1f} TFLOP/s" + (f", MFU {achieved / peak:.1%}" if peak else "")
    )


if __name__ == "__main__":
    main()
