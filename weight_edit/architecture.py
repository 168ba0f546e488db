"""Architectures as data: which on-disk tensors write into the residual stream, and along which axis.

Each family is one JSON file in `weight_edit/architectures/`, with `${layer}` templates. A family is
looked up from `config.json`'s `model_type`, validated, and expanded against a checkpoint's tensor
names into a list of `EditTarget`s keyed by on-disk name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

GUARANTEES = {
    "hook-exact": "edited checkpoint equals hook-based ablation (pre-norm residual writes)",
    "orthogonal-writes": "every residual write is orthogonal to the direction; hook equality is not exact",
}
_REQUIRED_KEYS = {
    "family": str,
    "model_types": list,
    "guarantee": str,
    "num_layers_key": str,
    "hidden_size_key": str,
    "layer_module": str,
    "attention_module": str,
    "mlp_module": str,
    "embedding": dict,
    "unembedding_tensor": str,
    "writers": list,
}
_WRITER_KEYS = {"kind": str, "tensor": str, "module": str, "residual_axis": int}


class ArchitectureError(ValueError):
    """The model's architecture is not covered, or its checkpoint does not match the family table."""


@dataclass(frozen=True)
class EditTarget:
    """One on-disk tensor that writes into the residual stream."""

    tensor: str  # name in the safetensors files: the contract
    residual_axis: int  # axis that holds residual-space vectors (ignored for 1-D biases)
    module: str  # in-memory module whose output is this write (for hook-based reference runs)
    kind: str  # "embedding", "attention" or "mlp"
    layer: int | None  # None for the embedding
    is_bias: bool = False


@dataclass(frozen=True)
class Architecture:
    family: str
    description: str
    model_types: tuple[str, ...]
    guarantee: str
    num_layers_key: str
    hidden_size_key: str
    layer_module: str
    attention_module: str
    mlp_module: str
    embedding: dict[str, Any]
    unembedding_tensor: str
    writers: tuple[dict[str, Any], ...]

    def module_name(self, template: str, layer: int) -> str:
        return template.replace("${layer}", str(layer))

    def num_layers(self, config: dict[str, Any]) -> int:
        return int(_config_value(config, self.num_layers_key))

    def hidden_size(self, config: dict[str, Any]) -> int:
        return int(_config_value(config, self.hidden_size_key))

    def targets(self, config: dict[str, Any], tensor_names: set[str]) -> list[EditTarget]:
        """Expand the templates for this checkpoint; every weight must exist, biases are optional."""
        missing: list[str] = []
        emb = self.embedding
        targets = [EditTarget(emb["tensor"], emb["residual_axis"], emb["module"], "embedding", None)]
        if emb["tensor"] not in tensor_names:
            missing.append(emb["tensor"])
        for layer in range(self.num_layers(config)):
            for writer in self.writers:
                name = self.module_name(writer["tensor"], layer)
                module = self.module_name(writer["module"], layer)
                if name not in tensor_names:
                    missing.append(name)
                targets.append(EditTarget(name, writer["residual_axis"], module, writer["kind"], layer))
                if writer.get("bias"):
                    bias = self.module_name(writer["bias"], layer)
                    if bias in tensor_names:
                        targets.append(EditTarget(bias, 0, module, writer["kind"], layer, True))
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise ArchitectureError(
                f"checkpoint does not match the '{self.family}' architecture table: missing {shown}"
            )
        return targets


def _config_value(config: dict[str, Any], key: str) -> Any:
    # Multimodal configs nest the language model's settings under text_config.
    if key in config:
        return config[key]
    if key in config.get("text_config", {}):
        return config["text_config"][key]
    raise ArchitectureError(f"config.json has no '{key}'")


def _validate(raw: dict[str, Any], source: str) -> Architecture:
    for key, kind in _REQUIRED_KEYS.items():
        if not isinstance(raw.get(key), kind):
            raise ArchitectureError(f"{source}: '{key}' must be a {kind.__name__}")
    if raw["guarantee"] not in GUARANTEES:
        raise ArchitectureError(f"{source}: guarantee must be one of {sorted(GUARANTEES)}")
    for index, writer in enumerate([raw["embedding"] | {"kind": "embedding"}, *raw["writers"]]):
        for key, kind in _WRITER_KEYS.items():
            if not isinstance(writer.get(key), kind):
                raise ArchitectureError(f"{source}: writer {index} needs '{key}' ({kind.__name__})")
        if writer["residual_axis"] not in (0, 1, 2):
            raise ArchitectureError(f"{source}: writer {index} has residual_axis outside 0..2")
    for writer in raw["writers"]:
        for key in ("tensor", "module"):
            if "${layer}" not in writer[key]:
                raise ArchitectureError(f"{source}: per-layer {key} '{writer[key]}' lacks ${{layer}}")
    return Architecture(
        family=raw["family"],
        description=raw.get("description", ""),
        model_types=tuple(raw["model_types"]),
        guarantee=raw["guarantee"],
        num_layers_key=raw["num_layers_key"],
        hidden_size_key=raw["hidden_size_key"],
        layer_module=raw["layer_module"],
        attention_module=raw["attention_module"],
        mlp_module=raw["mlp_module"],
        embedding=raw["embedding"],
        unembedding_tensor=raw["unembedding_tensor"],
        writers=tuple(raw["writers"]),
    )


@cache
def load_architectures() -> dict[str, Architecture]:
    """All family tables shipped with the package, keyed by model_type."""
    by_type: dict[str, Architecture] = {}
    for entry in sorted(resources.files("weight_edit.architectures").iterdir(), key=lambda p: p.name):
        if not entry.name.endswith(".json"):
            continue
        arch = _validate(json.loads(entry.read_text()), entry.name)
        for model_type in arch.model_types:
            if model_type in by_type:
                raise ArchitectureError(f"model_type '{model_type}' is claimed by two families")
            by_type[model_type] = arch
    return by_type


def architecture_for(config: dict[str, Any]) -> Architecture:
    """Look up the family table for a checkpoint's config.json."""
    model_type = config.get("model_type")
    table = load_architectures()
    if model_type not in table:
        supported = ", ".join(sorted(table))
        raise ArchitectureError(f"model_type '{model_type}' is not supported; supported model types: {supported}")
    return table[model_type]
