"""Benchmark `apply` against a plain copy of the same checkpoint, and its peak memory at two depths.

Builds a synthetic sharded checkpoint (random weights, real tensor names and shapes from a real
config, written one tensor at a time), then in fresh subprocesses: copies it with shutil, applies a
random direction with weight-edit, and reports wall times, the apply/copy time ratio and each
subprocess's peak resident memory. Running two depths of the same width shows whether the peak grows
with the model (it should not: it is set by the largest tensor).

    python scripts/bench_apply.py --config qwen2.5-1.5b --layers 4 8 --work /tmp/bench
    python scripts/bench_apply.py --config llama3-8b --layers 16 32 --work /tmp/bench   # GPU machine
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CONFIGS = {
    "tiny": dict(  # for a smoke test of the scripts themselves
        model_type="llama",
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=4096,
        tie_word_embeddings=True,
        num_hidden_layers=2,
    ),
    # Shapes from the public config.json files of these models.
    "qwen2.5-1.5b": dict(
        model_type="qwen2",
        hidden_size=1536,
        intermediate_size=8960,
        num_attention_heads=12,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
        num_hidden_layers=28,
    ),
    "llama3-8b": dict(
        model_type="llama",
        hidden_size=4096,
        intermediate_size=14336,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=False,
        num_hidden_layers=32,
    ),
    "llama3-70b": dict(
        model_type="llama",
        hidden_size=8192,
        intermediate_size=28672,
        num_attention_heads=64,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=False,
        num_hidden_layers=80,
    ),
}


def build_checkpoint(name: str, layers: int, dtype: str, folder: Path, shard_bytes: int) -> dict:
    """Write a random checkpoint with the config's tensor names and shapes, shard by shard."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(CONFIGS[name], num_hidden_layers=layers)
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    shapes = {
        n: tuple(p.shape)
        for n, p in model.state_dict().items()
        if not (config.tie_word_embeddings and n == "lm_head.weight")
    }
    folder.mkdir(parents=True, exist_ok=True)
    torch_dtype = getattr(torch, dtype)
    generator = torch.Generator().manual_seed(0)
    weight_map, shard, shard_size, index, total = {}, {}, 0, 1, 0

    def flush() -> None:
        nonlocal shard, shard_size, index
        if shard:
            file = f"model-{index:05d}.safetensors"
            save_file(shard, str(folder / file), metadata={"format": "pt"})
            weight_map.update({n: file for n in shard})
            shard, shard_size, index = {}, 0, index + 1

    for tensor_name, shape in shapes.items():
        tensor = (torch.randn(shape, generator=generator) * 0.02).to(torch_dtype)
        if shard_size + tensor.nbytes > shard_bytes:
            flush()
        shard[tensor_name] = tensor
        shard_size += tensor.nbytes
        total += tensor.nbytes
    flush()
    # Rename shards to the usual "-of-N" names, as transformers writes them.
    count = index - 1
    renamed = {}
    for i in range(1, count + 1):
        old, new = f"model-{i:05d}.safetensors", f"model-{i:05d}-of-{count:05d}.safetensors"
        os.replace(folder / old, folder / new)
        renamed[old] = new
    index_json = {"metadata": {"total_size": total}, "weight_map": {n: renamed[f] for n, f in weight_map.items()}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2))
    config.torch_dtype = dtype
    config.save_pretrained(str(folder))
    largest = (
        max(int(torch.Size(s).numel()) for s in shapes.values()) * torch.tensor([], dtype=torch_dtype).element_size()
    )
    return {"bytes": total, "shards": count, "largest_tensor_bytes": largest}


# ru_maxrss survives exec (it would include the parent's memory); VmHWM belongs to the new process.
CHILD = r"""
import os, sys, time, shutil
from pathlib import Path
kind, source, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
if kind != "copy":
    import torch
    from weight_edit.checkpoint import Checkpoint
    from weight_edit.writer import apply_direction
started = time.time()
if kind == "copy":
    shutil.copytree(source, out)
    for f in out.iterdir():
        with f.open("rb+") as h:
            os.fsync(h.fileno())
else:
    ckpt = Checkpoint(source)
    hidden = ckpt.config["hidden_size"]
    apply_direction(ckpt, torch.randn(hidden, generator=torch.Generator().manual_seed(1)), out, mode=kind, workers=int(sys.argv[4]))
seconds = time.time() - started
peak_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(seconds, peak_kb * 1024)
"""


def measure(kind: str, source: Path, out: Path, workers: int = 0) -> tuple[float, int]:
    shutil.rmtree(out, ignore_errors=True)
    result = subprocess.run(
        [sys.executable, "-c", CHILD, kind, str(source), str(out), str(workers)],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    )
    seconds, peak = result.stdout.split()
    shutil.rmtree(out, ignore_errors=True)
    return float(seconds), int(peak)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="qwen2.5-1.5b")
    parser.add_argument("--layers", type=int, nargs=2, default=[4, 8], help="two depths of the same width")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--shard-gb", type=float, default=2.0)
    parser.add_argument("--mode", default="norm-preserving", choices=["norm-preserving", "project"])
    parser.add_argument("--work", type=Path, default=Path("/tmp/weight-edit-bench"))
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--workers", type=int, default=0, help="apply's --workers (0: automatic)")
    args = parser.parse_args()

    rows = []
    for layers in args.layers:
        source = args.work / f"{args.config}-{layers}l"
        shutil.rmtree(source, ignore_errors=True)
        built = build_checkpoint(args.config, layers, args.dtype, source, int(args.shard_gb * 1e9))
        copies, applies = [], []
        for _ in range(args.repeats):  # alternate so both see the same page-cache state
            copies.append(measure("copy", source, args.work / "copy-out"))
            applies.append(measure(args.mode, source, args.work / "apply-out", args.workers))
        copy_s, copy_peak = min(copies)
        apply_s, apply_peak = min(applies)
        rows.append(
            dict(layers=layers, **built, copy_s=copy_s, apply_s=apply_s, copy_peak=copy_peak, apply_peak=apply_peak)
        )
        shutil.rmtree(source, ignore_errors=True)
        print(
            f"{args.config} {layers} layers ({built['bytes'] / 1e9:.2f} GB {args.dtype}, {built['shards']} shards, "
            f"largest tensor {built['largest_tensor_bytes'] / 1e9:.2f} GB): copy {copy_s:.1f} s, apply {apply_s:.1f} s, "
            f"apply/copy time ratio {apply_s / copy_s:.2f}; peak RSS copy {copy_peak / 1e9:.2f} GB, apply {apply_peak / 1e9:.2f} GB",
            flush=True,
        )
    a, b = rows
    print(
        f"peak RSS of apply: {a['apply_peak'] / 1e9:.2f} GB at {a['layers']} layers, {b['apply_peak'] / 1e9:.2f} GB at "
        f"{b['layers']} layers (model {b['bytes'] / a['bytes']:.2f}x larger, peak {b['apply_peak'] / a['apply_peak']:.2f}x)"
    )
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
