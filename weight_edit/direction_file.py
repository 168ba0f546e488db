"""The direction artifact: a safetensors file with one float32 `direction` and a JSON sidecar."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from weight_edit.errors import WeightEditError
from weight_edit.hashing import file_sha256, tensor_sha256

SIDECAR_HASH_FIELD = "sidecar_sha256"


class DirectionError(WeightEditError):
    """A direction file is unusable for this model, or its sidecar does not match it."""


MEANS_FILE = "activation_means.safetensors"


def save_activation_means(folder: Path, means: dict[str, torch.Tensor]) -> dict[str, str]:
    """Write `fit`'s per-layer mean activations atomically; returns the record the sidecar keeps of them,
    so that `apply --biproject` can tell this fit's means from another's."""
    path = folder / MEANS_FILE
    partial = path.with_name(path.name + ".partial")
    save_file({k: v.contiguous() for k, v in means.items()}, str(partial), metadata={"format": "pt"})
    os.replace(partial, path)
    return {"file": MEANS_FILE, "sha256": file_sha256(path)}


def load_activation_means(direction_path: Path, sidecar: dict[str, Any] | None) -> dict[str, torch.Tensor]:
    """The means written by the same `fit` as the direction: their sha256 must be the one its sidecar records."""
    from safetensors.torch import load_file

    path = direction_path.parent / MEANS_FILE
    sidecar_path = direction_path.with_suffix(".json")
    if sidecar is None or not path.is_file():
        raise DirectionError(f"{path} and {sidecar_path} from `weight-edit fit` are needed beside {direction_path}")
    record = sidecar.get("activation_means") or {}
    if not record.get("sha256"):
        raise DirectionError(
            f"{sidecar_path} records no hash of {MEANS_FILE} (written by an older `fit`): re-run `weight-edit fit`"
        )
    if file_sha256(path) != record["sha256"]:
        raise DirectionError(
            f"{path} is not the one {sidecar_path} was fit with (sha256 differs): another fit's means, or edited; "
            "re-run `weight-edit fit`"
        )
    return load_file(str(path))


def sidecar_sha256(sidecar: dict[str, Any]) -> str:
    """Hash of the sidecar's canonical JSON without its own hash field, so any hand edit is detected."""
    body = {k: v for k, v in sidecar.items() if k != SIDECAR_HASH_FIELD}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def save_direction(path: Path, vector: torch.Tensor, sidecar: dict[str, Any]) -> tuple[Path, Path]:
    """Write `path` (safetensors) and `path` with .json; each appears whole or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    vector = vector.detach().to(torch.float32).contiguous().cpu()
    sidecar = {**sidecar, "direction_sha256": tensor_sha256(vector), "hidden_size": vector.numel()}
    sidecar.pop(SIDECAR_HASH_FIELD, None)
    sidecar = json.loads(json.dumps(sidecar))  # hash what a reader will see (tuples as lists, keys as strings)
    sidecar[SIDECAR_HASH_FIELD] = sidecar_sha256(sidecar)
    sidecar_path = path.with_suffix(".json")
    tmp_vector, tmp_sidecar = (
        path.with_name(path.name + ".partial"),
        sidecar_path.with_name(sidecar_path.name + ".partial"),
    )
    save_file({"direction": vector}, str(tmp_vector), metadata={"format": "pt"})
    tmp_sidecar.write_text(json.dumps(sidecar, indent=2) + "\n")
    os.replace(tmp_vector, path)
    os.replace(tmp_sidecar, sidecar_path)
    return path, sidecar_path


def load_direction(path: Path) -> tuple[torch.Tensor, dict[str, Any] | None]:
    """Read a direction and, when present, its sidecar, checking that the two belong together."""
    if not path.is_file():
        raise DirectionError(f"direction file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
            if keys != ["direction"]:
                raise DirectionError(f"{path} must hold exactly one tensor named 'direction', found {keys}")
            vector = handle.get_tensor("direction")
    except DirectionError:
        raise
    except Exception as exc:  # safetensors raises its own error types for malformed files
        raise DirectionError(f"{path} is not a readable safetensors file: {exc}") from exc
    if vector.ndim != 1:
        raise DirectionError(f"{path}: 'direction' must be 1-D, found shape {tuple(vector.shape)}")
    vector = vector.to(torch.float32)
    if not torch.isfinite(vector).all():
        raise DirectionError(f"{path}: 'direction' has non-finite entries")
    if vector.norm() == 0:
        raise DirectionError(f"{path}: 'direction' is the zero vector")
    sidecar_path = path.with_suffix(".json")
    sidecar = _read_sidecar(sidecar_path) if sidecar_path.is_file() else None
    if sidecar is not None and sidecar.get("direction_sha256") != tensor_sha256(vector):
        raise DirectionError(f"{sidecar_path} does not describe {path} (direction hash differs)")
    return vector, sidecar


def _read_sidecar(sidecar_path: Path) -> dict[str, Any]:
    """Parse a sidecar and check its self-hash: a hand-edited layer or fingerprint must not pass."""
    try:
        sidecar = json.loads(sidecar_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, RecursionError, json.JSONDecodeError) as exc:
        raise DirectionError(f"{sidecar_path} is not readable JSON: {exc}") from exc
    if not isinstance(sidecar, dict):
        raise DirectionError(f"{sidecar_path} must hold a JSON object, found {type(sidecar).__name__}")
    recorded = sidecar.get(SIDECAR_HASH_FIELD)
    if recorded is None:
        raise DirectionError(
            f"{sidecar_path} has no {SIDECAR_HASH_FIELD} (written by an older weight-edit): run `weight-edit fit` "
            "again, or delete the sidecar to use the vector alone (checked by hidden size only)"
        )
    try:
        actual = sidecar_sha256(sidecar)
    except (TypeError, ValueError, RecursionError) as exc:
        raise DirectionError(f"{sidecar_path} cannot be hashed: {exc}") from exc
    if recorded != actual:
        raise DirectionError(
            f"{sidecar_path} was edited by hand ({SIDECAR_HASH_FIELD} differs): run `weight-edit fit` again "
            "instead of editing its output"
        )
    return sidecar


def check_compatible(
    sidecar: dict[str, Any] | None, vector: torch.Tensor, model_fingerprint: dict[str, Any], path: Path
) -> None:
    """A direction fit on another model is refused; a bare vector is checked by size only."""
    if vector.numel() != model_fingerprint["hidden_size"]:
        raise DirectionError(
            f"{path}: direction has size {vector.numel()}, the model's hidden size is {model_fingerprint['hidden_size']}"
        )
    if sidecar is None:
        return
    fitted = sidecar.get("model_fingerprint", {})
    if not isinstance(fitted, dict):
        raise DirectionError(f"{path}: its sidecar's model_fingerprint is not a JSON object")
    for key in ("model_type", "hidden_size", "num_layers", "probe_tensor_sha256"):
        if key in fitted and fitted[key] != model_fingerprint.get(key):
            raise DirectionError(
                f"{path} was fit on another model ({key}: {fitted[key]!r} there, {model_fingerprint.get(key)!r} here)"
            )
