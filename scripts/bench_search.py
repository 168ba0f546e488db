"""Benchmark `search_strengths` (the `tune` search): wall time, trials and trials/s.

Runs on the embedded dataset's fit-split validation prompts (never the held-out areas). The model is
a checkpoint folder (default: the default model, resolved and cached like `--model` does), or, with
`--random-weights`, a random-weight model built in memory from that folder's config.json with its
tokenizer: the same shapes and cost without the weights (enough for timing; refusal counts then mean
nothing). The direction is `--direction FILE` or, when absent, the diff-in-means of the last
post-instruction token at 60 % depth on the fit split's train prompts. Only counts are printed.

    python scripts/bench_search.py --model tests-tiny-model --trials 10 --device cpu --dtype float32   # here
    python scripts/bench_search.py --model MODEL_DIR --random-weights --device cuda --trials 200        # GPU machine
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import settings  # noqa: E402


def main() -> None:
    import torch

    from weight_edit.activations import mean_residuals, tokenized_batches
    from weight_edit.architecture import architecture_for
    from weight_edit.chat import post_instruction_ids
    from weight_edit.checkpoint import Checkpoint
    from weight_edit.dataset import load_split
    from weight_edit.direction_file import load_direction
    from weight_edit.models import auto_batch_size, input_device, load_model, resolve_model
    from weight_edit.search import search_strengths

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="checkpoint folder, hub id or .gguf (default: the default model)")
    parser.add_argument("--random-weights", action="store_true", help="random weights from the folder's config.json")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="bfloat16")
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--seed", type=int, default=settings.SEED)
    parser.add_argument("--batch-size", type=int, default=0, help="0: automatic (16 on CPU, from free GPU memory)")
    parser.add_argument("--mode", choices=["norm-preserving", "project"], default="norm-preserving")
    parser.add_argument("--max-refusal", type=float, default=0.02)
    parser.add_argument("--validation-prompts", type=int, default=0, help="per label; 0: every validation prompt")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--direction", type=Path, default=None, help="direction.safetensors (default: fitted here)")
    parser.add_argument("--json", type=Path, default=None, help="also write the report (and the search) here")
    args = parser.parse_args()

    folder = resolve_model(args.model)
    started = time.perf_counter()
    if args.random_weights:
        from transformers import AutoConfig, AutoTokenizer

        from weight_edit.synthetic import random_model

        config = AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
        model = random_model(config, getattr(torch, args.dtype), args.device)
        tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        config_dict = config.to_dict()
        state = model.state_dict()  # in-memory names equal the on-disk ones for the dense families
        tensor_names, shapes = set(state), {name: tuple(tensor.shape) for name, tensor in state.items()}
    else:
        model, tokenizer = load_model(folder, dtype=args.dtype, device=args.device)
        checkpoint = Checkpoint(folder)
        config_dict, tensor_names, shapes = checkpoint.config, checkpoint.tensor_names, checkpoint.shapes
    load_s = time.perf_counter() - started
    arch = architecture_for(config_dict)
    num_layers = arch.num_layers(config_dict)
    targets = arch.targets(config_dict, tensor_names, shapes=shapes)
    batch_size = args.batch_size or auto_batch_size(model)

    _, split = load_split(settings.DEFAULT_DATASET, args.seed)
    limit = args.validation_prompts or None
    texts = split.texts

    val_unsafe, val_safe = texts("validation", "unsafe", limit), texts("validation", "safe", limit)
    val_kl = texts("validation", settings.DEFAULT_CONTRAST, limit)  # as `tune` of a default fit

    if args.direction is not None:
        direction, sidecar = load_direction(args.direction)
        centre = (sidecar or {}).get("layer")
    else:
        suffix = post_instruction_ids(tokenizer)
        layer = int(0.6 * num_layers)
        device = input_device(model)
        means = [
            mean_residuals(
                model, tokenized_batches(tokenizer, texts("train", label, 64), batch_size, device, suffix), layer + 1, 1
            )
            for label in ("unsafe", settings.DEFAULT_CONTRAST)
        ]
        direction, centre = (means[0] - means[1])[layer, -1].float(), layer

    with torch.inference_mode():  # warm-up outside the timings (CUDA context, kernel selection)
        warm = tokenizer(["warm up"] * min(batch_size, 8), return_tensors="pt").to(input_device(model))
        model(**warm, logits_to_keep=1)
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()

    result = search_strengths(
        model,
        tokenizer,
        arch,
        targets,
        num_layers,
        direction,
        val_unsafe,
        val_safe,
        mode=args.mode,
        n_trials=args.trials,
        seed=args.seed,
        batch_size=batch_size,
        max_refusal=args.max_refusal,
        centre_layer=centre,
        max_new_tokens=args.max_new_tokens,
        val_kl=val_kl,
    )
    chosen = result.chosen()
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    report = {
        "model": str(folder),
        "random_weights": args.random_weights,
        "layers": num_layers,
        "device": device_name,
        "dtype": args.dtype,
        "batch_size": batch_size,
        "prompts": result.prompts,
        "load_s": round(load_s, 1),
        "trials": result.n_trials,
        "trial_s": round(result.trial_seconds, 2),
        "trials_per_s": round(result.trials_per_second, 3),
        "seconds_per_trial": round(result.trial_seconds / result.n_trials, 4),
        "search_wall_s": round(result.wall_seconds, 2),
        "generation_s": round(result.wall_seconds - result.trial_seconds, 2),
        "front": len(result.front),
        "generated_candidates": result.settings["generated_candidates"],
        "chosen": {
            "trial": chosen.number,
            "source": chosen.source,
            "refusal_prob": round(chosen.refusal_prob, 4),
            "kl": round(chosen.kl, 4),
            "generated": None if chosen.generated is None else vars(chosen.generated),
            "fallback": result.fallback,
        },
        "baseline": result.baseline,
        "peak_gpu_memory_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2) if args.device == "cuda" else None,
    }
    print(json.dumps(report, indent=2))
    print(
        f"{result.n_trials} trials in {result.trial_seconds:.1f} s ({result.trials_per_second:.2f} trials/s, "
        f"{result.trial_seconds / result.n_trials:.3f} s/trial) on {device_name}; search wall time "
        f"{result.wall_seconds:.1f} s (front {len(result.front)}, generated {result.settings['generated_candidates']})"
    )
    if args.json:
        args.json.write_text(json.dumps({"report": report, "search": result.as_dict()}, indent=2) + "\n")


if __name__ == "__main__":
    main()
