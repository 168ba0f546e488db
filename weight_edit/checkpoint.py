"""Reading safetensors checkpoints without loading them: headers, shard layout, one tensor at a time."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

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
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
DTYPE_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


class CheckpointError(ValueError):
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


def read_header(path: Path) -> ShardHeader:
    """Parse a safetensors header (8-byte length + JSON) and check it against the file size."""
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path}: too short to be a safetensors file")
            (length,) = struct.unpack("<Q", prefix)
            if length > min(MAX_HEADER_BYTES, size - 8):
                raise CheckpointError(f"{path}: corrupt safetensors header (length {length})")
            raw = json.loads(handle.read(length))
    except FileNotFoundError as exc:
        raise CheckpointError(f"missing shard {path}") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: corrupt safetensors header ({exc})") from exc
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = raw.pop("__metadata__", None) or {}
    data_start = 8 + length
    tensors: dict[str, TensorInfo] = {}
    for name, entry in raw.items():
        try:
            start, end = (int(x) for x in entry["data_offsets"])
            info = TensorInfo(name, str(entry["dtype"]), tuple(int(x) for x in entry["shape"]), start, end)
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: malformed header entry for tensor '{name}'") from exc
        if not 0 <= start <= end or data_start + end > size:
            raise CheckpointError(f"{path}: tensor '{name}' lies outside the file (truncated shard?)")
        tensors[name] = info
    return ShardHeader(path, data_start, tensors, dict(metadata))


class Checkpoint:
    """A local safetensors checkpoint folder: config, shard layout and per-tensor metadata.

    Only headers are read up front; tensors are read one at a time on request.
    """

    def __init__(self, folder: Path | str):
        self.folder = Path(folder).resolve()
        if not self.folder.is_dir():
            raise CheckpointError(f"checkpoint folder {self.folder} does not exist")
        config_path = self.folder / "config.json"
        if not config_path.is_file():
            raise CheckpointError(f"{self.folder} has no config.json")
        self.config: dict[str, Any] = json.loads(config_path.read_text())
        self.index: dict[str, Any] | None = None
        index_path = self.folder / INDEX_FILE
        if index_path.is_file():
            self.index = json.loads(index_path.read_text())
            weight_map = self.index.get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index_path}: no weight_map")
            self.weight_map: dict[str, str] = {str(k): str(v) for k, v in weight_map.items()}
        elif (self.folder / SINGLE_FILE).is_file():
            self.weight_map = {}
        else:
            pickles = sorted(p.name for p in self.folder.glob("*.bin"))
            hint = " (pickle .bin checkpoints are not read: pickle can run code)" if pickles else ""
            raise CheckpointError(f"{self.folder} holds no safetensors weights{hint}")

        shard_names = list(dict.fromkeys(self.weight_map.values())) or [SINGLE_FILE]
        for shard in shard_names:
            shard_path = (self.folder / shard).resolve()
            if shard_path.parent != self.folder:
                raise CheckpointError(f"{INDEX_FILE}: shard '{shard}' points outside {self.folder}")
        self.headers: dict[str, ShardHeader] = {shard: read_header(self.folder / shard) for shard in shard_names}
        if not self.weight_map:
            self.weight_map = {name: SINGLE_FILE for name in self.headers[SINGLE_FILE].tensors}
        for name, shard in self.weight_map.items():
            if name not in self.headers[shard].tensors:
                raise CheckpointError(f"tensor '{name}' is listed in {INDEX_FILE} but absent from {shard}")

    @property
    def shards(self) -> list[str]:
        return list(self.headers)

    @property
    def tensor_names(self) -> set[str]:
        return set(self.weight_map)

    def info(self, name: str) -> TensorInfo:
        return self.headers[self.weight_map[name]].tensors[name]

    def read(self, name: str) -> torch.Tensor:
        """Read one tensor from disk (never the whole shard)."""
        shard = self.weight_map[name]
        with safe_open(self.folder / shard, framework="pt") as handle:
            return handle.get_tensor(name)

    @property
    def tied_embeddings(self) -> bool:
        """True when the unembedding reuses the embedding matrix (no lm_head on disk)."""
        tied = self.config.get("tie_word_embeddings")
        if tied is None:
            tied = self.config.get("text_config", {}).get("tie_word_embeddings", True)
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
        (info.nbytes, name) for name in checkpoint.tensor_names if (info := checkpoint.info(name)).dtype in FLOAT_DTYPES
    ]
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
