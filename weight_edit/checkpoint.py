"""Reading safetensors checkpoints without loading them: headers, shard layout, one tensor at a time."""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from safetensors import safe_open

from weight_edit.errors import WeightEditError
from weight_edit.quantized import QuantizedTensor, quantized_tensors, read_dequantized

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
MAX_HEADER_BYTES = 100 * 1024 * 1024

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_CODES: dict[torch.dtype, str] = {dtype: code for code, dtype in DTYPES.items()}
# Bits per element of every dtype safetensors knows; an entry's byte span must match its shape.
DTYPE_BITS: dict[str, int] = {
    **dict.fromkeys(("BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E4M3FNUZ", "F8_E5M2FNUZ", "F8_E8M0"), 8),
    **dict.fromkeys(("U16", "I16", "F16", "BF16"), 16),
    **dict.fromkeys(("U32", "I32", "F32"), 32),
    **dict.fromkeys(("U64", "I64", "F64", "C64"), 64),
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
}
# Weight files that need unpickling: never opened, because loading a pickle can run arbitrary code.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
DTYPE_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


class CheckpointError(WeightEditError):
    """A checkpoint is missing, malformed, or not something weight-edit will read."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors dtype code, e.g. "BF16"
    shape: tuple[int, ...]
    start: int  # byte offsets inside the shard's data section
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass
class ShardHeader:
    path: Path
    data_start: int  # absolute file offset where tensor data begins
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)


def _is_count(value: Any) -> bool:
    """A JSON integer that fits safetensors' unsigned 64-bit sizes (JSON true/false are not counts)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**64


def _tensor_info(path: Path, name: str, entry: Any) -> TensorInfo:
    """One header entry, checked the way safetensors checks it, so what passes here can be read."""
    if not isinstance(entry, dict):
        raise CheckpointError(f"{path}: malformed header entry for tensor '{name}' (not a JSON object)")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise CheckpointError(f"{path}: tensor '{name}' has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_count(x) for x in shape):
        raise CheckpointError(f"{path}: malformed header entry for tensor '{name}' (shape {shape!r})")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(x) for x in offsets):
        raise CheckpointError(f"{path}: malformed header entry for tensor '{name}' (data_offsets {offsets!r})")
    start, end = offsets
    if start > end:
        raise CheckpointError(f"{path}: tensor '{name}' has data_offsets {offsets} that end before they start")
    numel = math.prod(shape)
    if numel * DTYPE_BITS[dtype] != (end - start) * 8:
        raise CheckpointError(
            f"{path}: tensor '{name}' holds {end - start} bytes, but shape {shape} of {dtype} needs "
            f"{numel * DTYPE_BITS[dtype] / 8:g}"
        )
    return TensorInfo(name, dtype, tuple(shape), start, end)


def read_header(path: Path) -> ShardHeader:
    """Parse a safetensors header (8-byte length + JSON) and check it against the file size.

    Every check safetensors itself makes on open is made here, so a shard that passes can be read and
    a bad one is reported by name before any output is written.
    """
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path}: too short to be a safetensors file ({size} bytes)")
            (length,) = struct.unpack("<Q", prefix)
            if length > size - 8:
                raise CheckpointError(
                    f"{path}: corrupt safetensors header (header length {length} is larger than the {size}-byte file)"
                )
            if length > MAX_HEADER_BYTES:
                raise CheckpointError(f"{path}: corrupt safetensors header (header length {length} is over 100 MiB)")
            raw = json.loads(handle.read(length).decode("utf-8"))
    except FileNotFoundError as exc:
        raise CheckpointError(f"missing shard {path}") from exc
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot be read ({exc.strerror or exc})") from exc
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{path}: corrupt safetensors header ({exc})") from exc
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = raw.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: corrupt safetensors header (__metadata__ must map strings to strings)")
    data_start = 8 + length
    data_size = size - data_start
    tensors = {name: _tensor_info(path, name, entry) for name, entry in raw.items()}
    position = 0
    for info in sorted(tensors.values(), key=lambda info: (info.start, info.end)):
        if info.end > data_size:
            raise CheckpointError(f"{path}: tensor '{info.name}' lies outside the file (truncated shard?)")
        if info.start != position:
            problem = "overlaps the tensor before it" if info.start < position else "leaves a gap before it"
            raise CheckpointError(f"{path}: tensor '{info.name}' {problem} (corrupt header)")
        position = info.end
    if position != data_size:
        raise CheckpointError(f"{path}: {data_size - position} bytes after the last tensor (corrupt or wrong header)")
    return ShardHeader(path, data_start, tensors, dict(metadata))


def _read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from `path`, or a CheckpointError naming the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot be read ({exc.strerror or exc})") from exc
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{path}: {what} is not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: {what} must be a JSON object, found {type(data).__name__}")
    return data


def _shard_name_problem(name: str) -> str | None:
    """Why `name` cannot be a shard: it must be a plain `*.safetensors` name, so it never lies outside the folder.

    Checked by name rather than by resolving links, so hub snapshots (files linked into a blob store) still load.
    """
    if name != PurePosixPath(name).name or name in ("", ".", "..") or "\\" in name or "\0" in name:
        return "points outside"
    if not name.endswith(".safetensors"):
        return "is not a *.safetensors file in"
    return None


class Checkpoint:
    """A local safetensors checkpoint folder: config, shard layout and per-tensor metadata.

    Only headers are read up front; tensors are read one at a time on request.
    """

    def __init__(self, folder: Path | str):
        try:
            self.folder = Path(folder).resolve()
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"checkpoint folder {folder!s} cannot be opened ({exc})") from exc
        if not self.folder.is_dir():
            raise CheckpointError(f"checkpoint folder {self.folder} does not exist")
        config_path = self.folder / "config.json"
        if not config_path.is_file():
            raise CheckpointError(f"{self.folder} has no config.json")
        self.config: dict[str, Any] = _read_json(config_path, "the model config")
        self.index: dict[str, Any] | None = None
        index_path = self.folder / INDEX_FILE
        if index_path.is_file():
            self.index = _read_json(index_path, "the shard index")
            weight_map = self.index.get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index_path}: no weight_map")
            if not isinstance(self.index.get("metadata", {}), dict):
                raise CheckpointError(f"{index_path}: 'metadata' must be a JSON object")
            for name, shard in weight_map.items():
                if not isinstance(shard, str):
                    raise CheckpointError(f"{index_path}: tensor '{name}' maps to {shard!r}, not a shard file name")
            self.weight_map: dict[str, str] = dict(weight_map)
        elif (self.folder / SINGLE_FILE).is_file():
            self.weight_map = {}
        else:
            pickles = sorted(p.name for p in self.folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
            hint = (
                f" ({', '.join(pickles)}: pickle checkpoints are not read, because unpickling can run code; "
                "convert them to safetensors first)"
                if pickles
                else ""
            )
            raise CheckpointError(f"{self.folder} holds no safetensors weights{hint}")

        shard_names = list(dict.fromkeys(self.weight_map.values())) or [SINGLE_FILE]
        for shard in shard_names:
            if problem := _shard_name_problem(shard):
                raise CheckpointError(
                    f"{index_path}: shard '{shard}' {problem} {self.folder} "
                    "(shards must be plain *.safetensors file names in the checkpoint folder)"
                )
        self.headers: dict[str, ShardHeader] = {shard: read_header(self.folder / shard) for shard in shard_names}
        if not self.weight_map:
            self.weight_map = {name: SINGLE_FILE for name in self.headers[SINGLE_FILE].tensors}
        for name, shard in self.weight_map.items():
            if name not in self.headers[shard].tensors:
                raise CheckpointError(
                    f"tensor '{name}' is listed in {index_path} but absent from {self.folder / shard}"
                )
        # A shipped quantized checkpoint (MXFP4 experts, block FP8) is seen under its float tensors' names.
        self.quantized: dict[str, QuantizedTensor] = quantized_tensors(
            self.config, {name: self.info(name) for name in self.weight_map}
        )
        dropped = {name for q in self.quantized.values() for name in q.dropped}
        self._tensor_names = (set(self.weight_map) - dropped) | set(self.quantized)

    @property
    def shards(self) -> list[str]:
        return list(self.headers)

    @property
    def tensor_names(self) -> set[str]:
        """The model's tensors by the names transformers gives them: the on-disk names, except that a tensor stored
        quantized appears once, under its float name (its quantized parts and scales do not)."""
        return self._tensor_names

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every on-disk tensor's shape, from the headers (what `Architecture.targets` reads a residual axis
        from where a family's table leaves it to the shape)."""
        return {name: self.info(name).shape for name in self.weight_map}

    def info(self, name: str) -> TensorInfo:
        """An on-disk tensor's header entry (a quantized tensor's float name has none: see `quantized`)."""
        return self.headers[self.weight_map[name]].tensors[name]

    def read(self, name: str) -> torch.Tensor:
        """Read one tensor from disk (never the whole shard); a quantized one dequantized to float32."""
        if name in self.quantized:
            return read_dequantized(self.quantized[name], self.read_stored)
        return self.read_stored(name)

    def read_stored(self, name: str) -> torch.Tensor:
        """An on-disk tensor as stored (quantized data and scales included)."""
        shard = self.weight_map[name]
        try:
            with safe_open(self.folder / shard, framework="pt") as handle:
                return handle.get_tensor(name)
        except Exception as exc:  # safetensors raises its own error types; the file changed since it was opened
            raise CheckpointError(f"{self.folder / shard}: cannot read tensor '{name}' ({exc})") from exc

    @property
    def tied_embeddings(self) -> bool:
        """True when the unembedding reuses the embedding matrix (no lm_head on disk)."""
        tied = self.config.get("tie_word_embeddings")
        if tied is None:
            text_config = self.config.get("text_config")
            tied = text_config.get("tie_word_embeddings", True) if isinstance(text_config, dict) else True
        return bool(tied)

    def main_dtype(self) -> str:
        """The dtype holding most parameters, as a torch dtype name."""
        counts: dict[str, int] = {}
        for header in self.headers.values():
            for info in header.tensors.values():
                if info.dtype in FLOAT_DTYPES:
                    counts[info.dtype] = counts.get(info.dtype, 0) + info.nbytes
        if not counts:
            raise CheckpointError(f"{self.folder} holds no floating-point tensors")
        return DTYPE_NAMES[max(counts, key=counts.__getitem__)]


def fingerprint(checkpoint: Checkpoint) -> dict[str, Any]:
    """Identify a model cheaply: architecture, sizes, config hash and the hash of its smallest float tensor."""
    import hashlib

    from weight_edit.architecture import architecture_for

    arch = architecture_for(checkpoint.config)
    config_view = {
        k: v
        for k, v in checkpoint.config.items()
        if k not in ("tie_word_embeddings", "transformers_version", "torch_dtype", "dtype")
    }
    floats = [
        (info.nbytes, name) for name in checkpoint.weight_map if (info := checkpoint.info(name)).dtype in FLOAT_DTYPES
    ]
    if not floats:
        raise CheckpointError(f"{checkpoint.folder} holds no floating-point tensors")
    _, probe = min(floats)
    probe_bytes = checkpoint.read(probe).contiguous().view(torch.uint8).numpy().tobytes()
    return {
        "model_type": checkpoint.config.get("model_type"),
        "architecture": arch.family,
        "hidden_size": arch.hidden_size(checkpoint.config),
        "num_layers": arch.num_layers(checkpoint.config),
        "config_sha256": hashlib.sha256(json.dumps(config_view, sort_keys=True).encode()).hexdigest(),
        "probe_tensor": probe,
        "probe_tensor_sha256": hashlib.sha256(probe_bytes).hexdigest(),
    }
