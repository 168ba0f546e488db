"""sha256 of files and tensors: one implementation for provenance, verification and evaluation records."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

CHUNK = 64 * 1024 * 1024


def file_sha256(path: Path | str) -> str:
    """Hex sha256 of a file, read in 64 MiB chunks (bounded memory for multi-GB shards)."""
    hasher = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while chunk := handle.read(CHUNK):
            hasher.update(chunk)
    return hasher.hexdigest()


def tensor_sha256(tensor: torch.Tensor) -> str:
    """Hex sha256 of a tensor's float32 bytes (a direction or basis as stored beside a checkpoint)."""
    return hashlib.sha256(tensor.detach().to(torch.float32).contiguous().cpu().numpy().tobytes()).hexdigest()
