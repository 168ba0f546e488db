"""Architectures as data: which on-disk tensors write into the residual stream, and along which axis.

Each family is one JSON file in `weight_edit/architectures/`, with `${layer}` (and, for experts,
`${expert}`) templates. A family is looked up from `config.json`'s `model_type`, validated, and
expanded against a checkpoint's tensor names into `EditTarget`s keyed by on-disk name.

Per writer, the table also says how its run-time twin is hooked: `"hook": "module"` (the module whose
weight is edited: exact in both edit modes) or `"hook": "block"` (a parent whose output is the
writes' linear combination, e.g. a fused mixture-of-experts block: exact for the plain projection
only). A writer with `output_norm` is followed by a norm before the residual add (sandwich or
post-norm): its edit removes û ∝ (offset + γ) ⊙ r̂ so what reaches the residual stream is exactly
orthogonal to r̂, but no longer equal to the paper's residual-stream ablation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

from weight_edit.errors import WeightEditError

GUARANTEES = {
    "hook-exact-per-layer": "edited checkpoint equals hook-based removal of each layer's own (biprojected) "
    "direction on the source model; every write is orthogonal to its layer's direction",
    "orthogonal-writes-per-layer": "every residual write is exactly orthogonal to its layer's own (biprojected) "
    "direction; equality with hook-based removal is not exact for this family and mode",
    "hook-exact-strengths": "edited checkpoint equals hook-based removal of the direction at the plan's per-layer "
    "strengths on the source model; a write at strength s keeps (1 - s) of its component along the direction",
    "hook-exact": "edited checkpoint equals hook-based ablation of the direction on the source model",
    "orthogonal-writes": "every residual write is exactly orthogonal to the direction; equality with hook-based "
    "ablation is not exact for this family and mode",
}
HOOK_KINDS = ("module", "block")
WRITER_KINDS = ("embedding", "position_embedding", "attention", "mlp", "expert", "shared_expert")
_FAMILY_KEYS = {
    "family": str,
    "model_types": list,
    "num_layers_key": str,
    "hidden_size_key": str,
    "layer_module": str,
    "attention_module": str,
    "mlp_module": str,
    "embeddings": list,
    "unembedding_tensor": str,
    "writers": list,
}
_WRITER_KEYS = {"tensor": str, "module": str, "residual_axis": int}


class ArchitectureError(WeightEditError):
    """The model's architecture is not covered, or its checkpoint does not match the family table."""


@dataclass(frozen=True)
class EditTarget:
    """One on-disk tensor that writes into the residual stream."""

    tensor: str  # name in the safetensors files: the contract
    residual_axis: int  # axis that holds residual-space vectors
    module: str  # in-memory module for the run-time twin
    kind: str  # "embedding", "position_embedding", "attention", "mlp" or "expert"
    layer: int | None  # None for embeddings
    is_bias: bool = False
    hook: str = "module"
    output_norm: str | None = None  # on-disk norm weight applied to this write before the residual add
    output_norm_module: str | None = None  # the same norm in memory (for the run-time twin)
    norm_offset: float = 0.0


@dataclass(frozen=True)
class Architecture:
    family: str
    description: str
    model_types: tuple[str, ...]
    num_layers_key: str
    hidden_size_key: str
    layer_module: str
    attention_module: str
    mlp_module: str
    embeddings: tuple[dict[str, Any], ...]
    unembedding_tensor: str
    writers: tuple[dict[str, Any], ...]
    optional_prefix: str = ""

    @property
    def token_embedding(self) -> dict[str, Any]:
        return self.embeddings[0]

    @property
    def has_output_norms(self) -> bool:
        return any("output_norm" in w for w in self.writers)

    def twin_is_exact(self, mode: str) -> bool:
        """Can hooks reproduce the weight edit exactly? Block hooks only project (no per-expert rescale)."""
        return mode == "project" or all(w.get("hook", "module") == "module" for w in self.writers)

    def supports_partial_strength(self, mode: str) -> bool:
        """Strengths below 1 keep part of every write, so only hook equality can be guaranteed."""
        return self.twin_is_exact(mode) and not self.has_output_norms

    def guarantee(self, mode: str, per_layer_directions: bool = False, full_strength: bool = True) -> str:
        if not full_strength:
            return "hook-exact-strengths"
        if per_layer_directions:
            # Each layer removes its own direction: the hook twin still matches, the paper's
            # single-direction ablation does not.
            return "hook-exact-per-layer" if self.twin_is_exact(mode) else "orthogonal-writes-per-layer"
        return "hook-exact" if self.twin_is_exact(mode) and not self.has_output_norms else "orthogonal-writes"

    def num_layers(self, config: dict[str, Any]) -> int:
        return int(_config_value(config, self.num_layers_key))

    def hidden_size(self, config: dict[str, Any]) -> int:
        return int(_config_value(config, self.hidden_size_key))

    def targets(self, config: dict[str, Any], tensor_names: set[str]) -> list[EditTarget]:
        """Expand the templates for this checkpoint; every weight must exist, biases are optional."""
        missing: list[str] = []

        def on_disk(template: str, **values: int) -> str | None:
            name = fill(template, **values)
            for candidate in (name, name.removeprefix(self.optional_prefix)) if self.optional_prefix else (name,):
                if candidate in tensor_names:
                    return candidate
            return None

        def require(template: str, **values: int) -> str:
            name = on_disk(template, **values)
            if name is None:
                missing.append(fill(template, **values))
                return fill(template, **values)
            return name

        targets = []
        for emb in self.embeddings:
            targets.append(
                EditTarget(
                    require(emb["tensor"]), emb["residual_axis"], emb["module"], emb.get("kind", "embedding"), None
                )
            )
        for layer in range(self.num_layers(config)):
            for writer in self.writers:
                experts = (
                    range(int(_config_value(config, writer["experts_key"]))) if "experts_key" in writer else [None]
                )
                norm = writer.get("output_norm")
                norm_name = require(norm["tensor"], layer=layer) if norm else None
                common = dict(
                    kind=writer.get("kind", "mlp"),
                    layer=layer,
                    hook=writer.get("hook", "module"),
                    output_norm=norm_name,
                    output_norm_module=fill(norm["module"], layer=layer) if norm else None,
                    norm_offset=float(norm.get("offset", 0.0)) if norm else 0.0,
                    module=fill(writer["module"], layer=layer),
                )
                for expert in experts:
                    values = {"layer": layer} if expert is None else {"layer": layer, "expert": expert}
                    targets.append(EditTarget(require(writer["tensor"], **values), writer["residual_axis"], **common))
                    if writer.get("bias") and (bias := on_disk(writer["bias"], **values)) is not None:
                        targets.append(EditTarget(bias, writer.get("bias_residual_axis", 0), is_bias=True, **common))
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise ArchitectureError(
                f"checkpoint does not match the '{self.family}' architecture table: missing {shown}"
            )
        return targets


def fill(template: str, **values: int) -> str:
    for key, value in values.items():
        template = template.replace("${" + key + "}", str(value))
    return template


def _config_value(config: dict[str, Any], key: str | list[str]) -> Any:
    """A config value by name, or by the first of several names that versions of a family used."""
    for name in [key] if isinstance(key, str) else key:
        # Multimodal configs nest the language model's settings under text_config.
        for scope in (config, config.get("text_config", {})):
            if name in scope:
                return scope[name]
    raise ArchitectureError(f"config.json has no '{key if isinstance(key, str) else ' or '.join(key)}'")


def _validate(raw: dict[str, Any], source: str) -> Architecture:
    for key, kind in _FAMILY_KEYS.items():
        if not isinstance(raw.get(key), kind):
            raise ArchitectureError(f"{source}: '{key}' must be a {kind.__name__}")
    if not raw["embeddings"] or not raw["writers"]:
        raise ArchitectureError(f"{source}: needs at least one embedding and one writer")
    for index, writer in enumerate([*raw["embeddings"], *raw["writers"]]):
        for key, kind in _WRITER_KEYS.items():
            if not isinstance(writer.get(key), kind):
                raise ArchitectureError(f"{source}: entry {index} needs '{key}' ({kind.__name__})")
        if writer["residual_axis"] not in (0, 1, 2):
            raise ArchitectureError(f"{source}: entry {index} has residual_axis outside 0..2")
        if writer.get("kind", "mlp") not in WRITER_KINDS:
            raise ArchitectureError(f"{source}: entry {index} kind must be one of {WRITER_KINDS}")
        if writer.get("hook", "module") not in HOOK_KINDS:
            raise ArchitectureError(f"{source}: entry {index} hook must be one of {HOOK_KINDS}")
        if writer.get("hook") == "block" and "output_norm" in writer:
            raise ArchitectureError(f"{source}: entry {index} combines a block hook with an output norm")
        if ("${expert}" in writer["tensor"]) != ("experts_key" in writer):
            raise ArchitectureError(f"{source}: entry {index} uses ${{expert}} exactly when it has experts_key")
    for writer in raw["writers"]:
        for key in ("tensor", "module"):
            if "${layer}" not in writer[key]:
                raise ArchitectureError(f"{source}: per-layer {key} '{writer[key]}' lacks ${{layer}}")
        norm = writer.get("output_norm")
        if norm is not None and not (isinstance(norm.get("tensor"), str) and isinstance(norm.get("module"), str)):
            raise ArchitectureError(f"{source}: output_norm needs 'tensor' and 'module'")
    return Architecture(
        family=raw["family"],
        description=raw.get("description", ""),
        model_types=tuple(raw["model_types"]),
        num_layers_key=raw["num_layers_key"],
        hidden_size_key=raw["hidden_size_key"],
        layer_module=raw["layer_module"],
        attention_module=raw["attention_module"],
        mlp_module=raw["mlp_module"],
        embeddings=tuple(raw["embeddings"]),
        unembedding_tensor=raw["unembedding_tensor"],
        writers=tuple(raw["writers"]),
        optional_prefix=raw.get("optional_prefix", ""),
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
        families = ", ".join(
            f"{a.family} ({', '.join(a.model_types)})" for a in {id(a): a for a in table.values()}.values()
        )
        raise ArchitectureError(f"model_type '{model_type}' is not supported; supported families: {families}")
    return table[model_type]
