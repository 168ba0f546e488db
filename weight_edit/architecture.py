"""Architectures as data: which on-disk tensors write into the residual stream, and along which axis.

Each family is one JSON file in `weight_edit/architectures/`, with `${decoder}`, `${layer}` (and, for
experts, `${expert}`) templates. A family is looked up from `config.json`'s `model_type`, validated, and
expanded against a checkpoint's tensor names into `EditTarget`s keyed by on-disk name.

`${decoder}` is the text decoder's root. On disk it is the prefix of one of the family's `layouts` (a
multimodal checkpoint may store its decoder under `language_model.model.` or `model.language_model.`:
the layout whose token embedding the checkpoint holds is used, and it also names where an untied
unembedding goes); in memory it is `module_root`, the decoder's path in the class that `loader` names.

Per writer, the table also says how its run-time twin is hooked: `"hook": "module"` (the module whose
weight is edited: exact in both edit modes) or `"hook": "block"` (a parent whose output is the
writes' linear combination, e.g. a fused mixture-of-experts block: exact for the plain projection
only). A writer with `output_norm` (one norm, or a chain applied innermost first) is followed by norms
before the residual add (sandwich or post-norm): its edit removes û ∝ Π(offset + γ) ⊙ r̂ so what reaches
the residual stream is exactly orthogonal to r̂, but no longer equal to the paper's residual-stream
ablation. A writer with `layers` exists only in the layers its rule selects from the config (hybrid
attention, dense-then-MoE); a writer of experts may name a `fused` alternative (one 3-D tensor per
layer), used where the checkpoint stores the experts that way.

A per-layer writer or a fused alternative whose tensor is stored in two layouts under one name (Qwen3-VL-MoE's
fused experts: [experts, d_ff, d_model] as released, [experts, d_model, d_ff] as transformers saves them) gives
`residual_axis_candidates` in place of `residual_axis`: its residual axis is the one candidate whose length is
the config's hidden size, read from the tensor's shape (`targets` then needs the checkpoint's `shapes`); a
tensor with that length on several candidates (d_ff == d_model) or on none is refused, never guessed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
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
# attention: any token mixer (self-attention, linear attention, state-space, convolution); mlp and experts:
# channel mixers; per_layer_input: Gemma 4's per-layer input projection.
WRITER_KINDS = (
    "embedding",
    "position_embedding",
    "attention",
    "mlp",
    "expert",
    "shared_expert",
    "per_layer_input",
)
LOADERS = ("causal-lm", "image-text-to-text")
# How a writer's `layers` rule selects layer l from the config value v of its key.
LAYER_TESTS = {
    "in_list": "v[l] is one of values (without v, a default list whose last entry repeats to the last layer)",
    "listed": "l is in the list v",
    "not_listed": "l is not in the list v",
    "at_least": "l >= v",
    "below": "l < v",
    "at_most": "l <= v, where v = -1 sets no upper bound",
    "every": "(l + 1) is a multiple of v",
    "true": "v is true",
    "false": "v is false",
}
NOT_COVERED_FILE = "not_covered.json"  # model types known not to be covered: why, and the closest family
DEFAULT_LAYOUT = {"decoder": "model.", "unembedding": "lm_head.weight"}
_FAMILY_KEYS = {
    "family": str,
    "model_types": list,
    "num_layers_key": (str, list),
    "hidden_size_key": str,
    "layer_module": str,
    "embeddings": list,
    "writers": list,
}
_WRITER_KEYS = {"tensor": str, "module": str, "residual_axis": int}
AXIS_CANDIDATES = "residual_axis_candidates"  # in place of residual_axis: the one of these axes of hidden-size length


class ArchitectureError(WeightEditError):
    """The model's architecture is not covered, or its checkpoint does not match the family table."""


@dataclass(frozen=True)
class OutputNorm:
    """A norm between a writer and the residual add: it scales each coordinate by offset + γ."""

    tensor: str  # on-disk norm weight
    module: str  # the same norm in memory (for the run-time twin)
    offset: float = 0.0


@dataclass(frozen=True)
class EditTarget:
    """One on-disk tensor that writes into the residual stream."""

    tensor: str  # name in the safetensors files: the contract
    residual_axis: int  # axis that holds residual-space vectors
    module: str  # in-memory module for the run-time twin
    kind: str  # one of WRITER_KINDS
    layer: int | None  # None for embeddings
    is_bias: bool = False
    hook: str = "module"
    output_norms: tuple[OutputNorm, ...] = ()  # applied to this write before the residual add, innermost first


@dataclass(frozen=True)
class Layout:
    """One way a family's checkpoints name their tensors on disk."""

    decoder: str  # prefix of the text decoder's tensors (fills ${decoder} in tensor templates)
    unembedding: str  # where the output embedding is (or, untied by apply, will be) stored


@dataclass(frozen=True)
class LayerRule:
    """Which layers have a writer, decided by one config value (see LAYER_TESTS)."""

    test: str
    key: str | tuple[str, ...]  # a config key, or the names versions of a family gave it (first present wins)
    values: tuple[Any, ...] = ()
    default: Any = None

    def holds(self, layer: int, config: dict[str, Any]) -> bool:
        value = _config_value(config, self.key, self.default)
        try:
            if self.test == "in_list":
                if self.default is not None and not _has_key(config, self.key):
                    # A default list stands for any number of layers: its last entry repeats to the end
                    return self.default[min(layer, len(self.default) - 1)] in self.values
                return value[layer] in self.values
            if self.test in ("listed", "not_listed"):
                return (layer in value) == (self.test == "listed")
            if self.test == "at_least":
                return layer >= int(value)
            if self.test == "below":
                return layer < int(value)
            if self.test == "at_most":
                return int(value) == -1 or layer <= int(value)
            if self.test == "every":
                return int(value) > 0 and (layer + 1) % int(value) == 0
            return bool(value) == (self.test == "true")
        except (TypeError, IndexError, ValueError) as exc:
            raise ArchitectureError(
                f"config.json's '{self.key}' ({value!r}) cannot say whether layer {layer} has this writer "
                f"({self.test}: {LAYER_TESTS[self.test]})"
            ) from exc


@dataclass(frozen=True)
class Architecture:
    family: str
    description: str
    model_types: tuple[str, ...]
    num_layers_key: str | tuple[str, ...]  # a count, or a per-layer list or pattern (its length); first present wins
    hidden_size_key: str
    layer_module: str
    embeddings: tuple[dict[str, Any], ...]
    writers: tuple[dict[str, Any], ...]
    layouts: tuple[Layout, ...] = (Layout(**DEFAULT_LAYOUT),)
    module_root: str = "model."
    loader: str = "causal-lm"

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

    def for_config(self, config: dict[str, Any]) -> Architecture:
        """The table reduced to the writers this config's layers have: its guarantee is then the one this model
        earns (a hybrid configured without experts is hook-exact in both modes). A config that does not say how
        many layers it has (a lookup by model_type alone) gets the whole table."""
        if not _has_key(config, self.num_layers_key):
            return self
        layers = range(self.num_layers(config))
        present = tuple(w for w in self.writers if any(writer_in_layer(w, layer, config) for layer in layers))
        return self if present == self.writers else replace(self, writers=present)

    def num_layers(self, config: dict[str, Any]) -> int:
        """A layer count, or the length of a per-layer list or pattern string (a hybrid's layer types, which
        its transformers class reads in place of a count)."""
        value = _config_value(config, self.num_layers_key)
        return len(value) if isinstance(value, list | str) else int(value)

    def hidden_size(self, config: dict[str, Any]) -> int:
        return int(_config_value(config, self.hidden_size_key))

    def module(self, template: str, **values: int) -> str:
        """An in-memory module name (for the classes `loader` names)."""
        return fill(template, decoder=self.module_root, **values)

    def layer_module_name(self, layer: int) -> str:
        return self.module(self.layer_module, layer=layer)

    def token_embedding_module(self) -> str:
        return self.module(self.token_embedding["module"])

    def writer_modules(self, config: dict[str, Any], num_layers: int) -> list[tuple[int, list[str]]]:
        """Per layer, the in-memory modules whose outputs are that layer's writes into the residual stream (a
        fused block once): where the paper's ablation projects. Needs only the config, not the checkpoint."""
        layers = []
        for layer in range(num_layers):
            names = [
                self.module(writer["module"], layer=layer)
                for writer in self.writers
                if writer_in_layer(writer, layer, config)
            ]
            layers.append((layer, list(dict.fromkeys(names))))
        return layers

    def layout(self, tensor_names: set[str]) -> Layout:
        """The checkpoint's layout: the one whose token embedding it holds (exactly one must match)."""
        template = self.token_embedding["tensor"]
        found = [layout for layout in self.layouts if fill(template, decoder=layout.decoder) in tensor_names]
        if len(found) == 1:
            return found[0]
        places = " or ".join(fill(template, decoder=layout.decoder) for layout in self.layouts)
        if not found:
            raise ArchitectureError(
                f"checkpoint does not match the '{self.family}' architecture table: no token embedding at {places}"
            )
        raise ArchitectureError(
            f"checkpoint holds the token embedding under several '{self.family}' layouts ({places}): ambiguous"
        )

    def unembedding_tensor(self, tensor_names: set[str]) -> str:
        return self.layout(tensor_names).unembedding

    def token_embedding_tensor(self, tensor_names: set[str]) -> str:
        return fill(self.token_embedding["tensor"], decoder=self.layout(tensor_names).decoder)

    def targets(
        self,
        config: dict[str, Any],
        tensor_names: set[str],
        shapes: Mapping[str, Sequence[int]] | None = None,
    ) -> list[EditTarget]:
        """Expand the templates for this checkpoint; every weight must exist, biases are optional.

        A writer whose `layers` rule leaves a layer out must have no tensor there: a checkpoint that
        disagrees with its own config is refused rather than half edited. `shapes` (on-disk name → shape) is
        read only for a writer with `residual_axis_candidates`, which cannot be expanded without it.
        """
        layout = self.layout(tensor_names)
        missing: list[str] = []
        unexpected: list[str] = []

        def on_disk(template: str, **values: int) -> str:
            return fill(template, decoder=layout.decoder, **values)

        def require(template: str, **values: int) -> str:
            name = on_disk(template, **values)
            if name not in tensor_names:
                missing.append(name)
            return name

        targets = []
        for emb in self.embeddings:
            targets.append(
                EditTarget(
                    require(emb["tensor"]),
                    emb["residual_axis"],
                    self.module(emb["module"]),
                    emb.get("kind", "embedding"),
                    None,
                )
            )
        for layer in range(self.num_layers(config)):
            for writer in self.writers:
                if not writer_in_layer(writer, layer, config):
                    unexpected.extend(n for n in _writer_names(writer, layer, on_disk) if n in tensor_names)
                    continue
                targets.extend(self._writer_targets(writer, layer, config, tensor_names, shapes, on_disk, require))
        if missing:
            raise ArchitectureError(
                f"checkpoint does not match the '{self.family}' architecture table: missing {_first_few(missing)}"
            )
        # Two writers may name the same tensor in complementary layers (a norm chain that differs with MoE)
        edited = {t.tensor for t in targets}
        unexpected = [name for name in unexpected if name not in edited]
        if unexpected:
            raise ArchitectureError(
                f"checkpoint does not match its config under the '{self.family}' architecture table: it holds "
                f"{_first_few(unexpected)}, in layers where config.json says that writer does not exist"
            )
        return targets

    def _writer_targets(self, writer, layer, config, tensor_names, shapes, on_disk, require) -> list[EditTarget]:
        """One writer's targets in one layer: per expert, or the fused alternative where the checkpoint has it."""
        common = dict(
            kind=writer.get("kind", "mlp"),
            layer=layer,
            hook=writer.get("hook", "module"),
            output_norms=tuple(
                OutputNorm(
                    require(norm["tensor"], layer=layer),
                    self.module(norm["module"], layer=layer),
                    float(norm.get("offset", 0.0)),
                )
                for norm in _norms(writer)
            ),
            module=self.module(writer["module"], layer=layer),
        )
        spec = writer
        fused = writer.get("fused")
        if fused is not None and on_disk(writer["tensor"], layer=layer, expert=0) not in tensor_names:
            if on_disk(fused["tensor"], layer=layer) in tensor_names:
                spec = fused
        expert_count = int(_config_value(config, writer["experts_key"])) if "experts_key" in writer else None
        experts = [None] if spec is not writer or expert_count is None else range(expert_count)
        targets = []
        for expert in experts:
            values = {"layer": layer} if expert is None else {"layer": layer, "expert": expert}
            name = require(spec["tensor"], **values)
            # A missing tensor has no shape to read an axis from; it is refused with the others in `targets`
            axis = self._residual_axis(spec, name, config, shapes) if name in tensor_names else None
            targets.append(EditTarget(name, axis, **common))
            if spec.get("bias") and (bias := on_disk(spec["bias"], **values)) in tensor_names:
                targets.append(EditTarget(bias, spec.get("bias_residual_axis", 0), is_bias=True, **common))
        return targets

    def _residual_axis(
        self, spec: dict[str, Any], name: str, config: dict[str, Any], shapes: Mapping[str, Sequence[int]] | None
    ) -> int:
        """The table's residual axis, or the one of its candidates that has the hidden size in this tensor's shape
        (one name, two layouts on disk): several such axes, or none, are refused in one line."""
        if AXIS_CANDIDATES not in spec:
            return spec["residual_axis"]
        candidates = spec[AXIS_CANDIDATES]
        axes = " or ".join(str(axis) for axis in candidates)
        if shapes is None or name not in shapes:
            raise ArchitectureError(
                f"the '{self.family}' table reads the residual axis of '{name}' ({axes}) from its shape, "
                "and none was given for it"
            )
        shape, hidden = list(shapes[name]), self.hidden_size(config)
        found = [axis for axis in candidates if axis < len(shape) and shape[axis] == hidden]
        if len(found) == 1:
            return found[0]
        if found:
            raise ArchitectureError(
                f"cannot tell which axis of '{name}' {shape} holds residual vectors: axes "
                f"{' and '.join(map(str, found))} have the hidden size {hidden}, and the '{self.family}' table "
                "allows either layout (d_ff == d_model); refused rather than guessed"
            )
        raise ArchitectureError(
            f"checkpoint does not match the '{self.family}' architecture table: '{name}' {shape} has the hidden "
            f"size {hidden} on none of its candidate residual axes {axes}"
        )


def _key_names(key: str | list[str]) -> str | tuple[str, ...]:
    """A config key as a table gives it: one name, or the names versions of a family used (a tuple)."""
    return tuple(key) if isinstance(key, list) else key


def _layer_rules(writer: dict[str, Any], field: str = "layers") -> list[LayerRule]:
    rules = writer.get(field, [])
    return [
        LayerRule(
            r["if"],
            _key_names(r["key"]),
            tuple(r.get("values", ())),
            r.get("default"),
        )
        for r in (rules if isinstance(rules, list) else [rules])
    ]


def writer_in_layer(writer: dict[str, Any], layer: int, config: dict[str, Any]) -> bool:
    """Whether a writer exists in `layer`: every `layers` rule holds, and not every `unless` rule does (a dense
    MLP exists exactly where the mixture-of-experts rule fails)."""
    if not all(rule.holds(layer, config) for rule in _layer_rules(writer)):
        return False
    unless = _layer_rules(writer, "unless")
    return not (unless and all(rule.holds(layer, config) for rule in unless))


def _norms(writer: dict[str, Any]) -> list[dict[str, Any]]:
    norm = writer.get("output_norm")
    return [] if norm is None else norm if isinstance(norm, list) else [norm]


def _writer_names(writer: dict[str, Any], layer: int, on_disk) -> list[str]:
    """Every on-disk name a writer could have in `layer` (its weight, first expert, fused form, biases)."""
    names = []
    for spec in [writer, *([writer["fused"]] if "fused" in writer else [])]:
        for key in ("tensor", "bias"):
            if key in spec:
                names.append(on_disk(spec[key], layer=layer, expert=0))
    return names


def _first_few(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def fill(template: str, **values: int | str) -> str:
    for key, value in values.items():
        template = template.replace("${" + key + "}", str(value))
    return template


def _lookup(config: dict[str, Any], key: str | list[str] | tuple[str, ...]) -> tuple[bool, Any]:
    """(found, value) of a config key, or of the first of several names that versions of a family used;
    multimodal configs nest the language model's settings under text_config."""
    for name in [key] if isinstance(key, str) else key:
        for scope in (config, config.get("text_config") or {}):
            if name in scope:
                return True, scope[name]
    return False, None


def _has_key(config: dict[str, Any], key: str | tuple[str, ...]) -> bool:
    return _lookup(config, key)[0]


def _config_value(config: dict[str, Any], key: str | list[str] | tuple[str, ...], default: Any = None) -> Any:
    """A config value by name (see `_lookup`); `default` when it is absent, an error when there is none."""
    found, value = _lookup(config, key)
    if found:
        return value
    if default is not None:
        return default
    raise ArchitectureError(f"config.json has no '{key if isinstance(key, str) else ' or '.join(key)}'")


def _check_candidates(where: str, spec: dict[str, Any], allowed: tuple[int, ...]) -> None:
    """`residual_axis_candidates`, in place of `residual_axis`: two or more distinct axes, each one of `allowed`."""
    candidates = spec[AXIS_CANDIDATES]
    if "residual_axis" in spec or not (
        isinstance(candidates, list)
        and len(candidates) >= 2
        and len(set(candidates)) == len(candidates)
        and all(isinstance(axis, int) and not isinstance(axis, bool) and axis in allowed for axis in candidates)
    ):
        raise ArchitectureError(
            f"{where}: '{AXIS_CANDIDATES}' takes the place of 'residual_axis': a list of two or more distinct axes, "
            f"each one of {', '.join(map(str, allowed))}"
        )


def _check_writer(source: str, index: int, writer: Any) -> None:
    if not isinstance(writer, dict):
        raise ArchitectureError(f"{source}: entry {index} must be an object")
    candidates = AXIS_CANDIDATES in writer
    for key, kind in _WRITER_KEYS.items():
        if not isinstance(writer.get(key), kind) and not (key == "residual_axis" and candidates):
            raise ArchitectureError(f"{source}: entry {index} needs '{key}' ({kind.__name__})")
    if candidates:
        _check_candidates(f"{source}: entry {index}", writer, (0, 1, 2))
    elif writer["residual_axis"] not in (0, 1, 2):
        raise ArchitectureError(f"{source}: entry {index} has residual_axis outside 0..2")
    if writer.get("kind", "mlp") not in WRITER_KINDS:
        raise ArchitectureError(f"{source}: entry {index} kind must be one of {WRITER_KINDS}")
    if writer.get("hook", "module") not in HOOK_KINDS:
        raise ArchitectureError(f"{source}: entry {index} hook must be one of {HOOK_KINDS}")
    if ("${expert}" in writer["tensor"]) != ("experts_key" in writer):
        raise ArchitectureError(f"{source}: entry {index} uses ${{expert}} exactly when it has experts_key")


def _check_layer_writer(source: str, index: int, writer: dict[str, Any]) -> None:
    for key in ("tensor", "module"):
        if "${layer}" not in writer[key]:
            raise ArchitectureError(f"{source}: per-layer {key} '{writer[key]}' lacks ${{layer}}")
    for norm in _norms(writer):
        if not (isinstance(norm, dict) and isinstance(norm.get("tensor"), str) and isinstance(norm.get("module"), str)):
            raise ArchitectureError(f"{source}: writer {index}: output_norm needs 'tensor' and 'module'")
        if not isinstance(norm.get("offset", 0.0), int | float):
            raise ArchitectureError(f"{source}: writer {index}: output_norm offset must be a number")
    rules = [writer.get(field, []) for field in ("layers", "unless")]
    for rule in [r for group in rules for r in (group if isinstance(group, list) else [group])]:
        key = rule.get("key") if isinstance(rule, dict) else None
        if not (isinstance(key, str) or (isinstance(key, list) and key and all(isinstance(k, str) for k in key))):
            key = None
        if not isinstance(rule, dict) or rule.get("if") not in LAYER_TESTS or key is None:
            raise ArchitectureError(
                f"{source}: writer {index}: each 'layers' rule needs 'if' (one of {', '.join(LAYER_TESTS)}) and 'key'"
            )
        if rule["if"] == "in_list" and not isinstance(rule.get("values"), list):
            raise ArchitectureError(f"{source}: writer {index}: an 'in_list' rule needs 'values' (a list)")
        default = rule.get("default", [None])
        if rule["if"] == "in_list" and not (isinstance(default, list) and default):
            raise ArchitectureError(
                f"{source}: writer {index}: an 'in_list' rule's 'default' must be a non-empty list (its last entry repeats)"
            )
    fused = writer.get("fused")
    if fused is not None:
        if "experts_key" not in writer:
            raise ArchitectureError(f"{source}: writer {index}: only a per-expert writer has a 'fused' alternative")
        if not isinstance(fused, dict) or not isinstance(fused.get("tensor"), str) or "${expert}" in fused["tensor"]:
            raise ArchitectureError(f"{source}: writer {index}: 'fused' needs a 'tensor' without ${{expert}}")
        if AXIS_CANDIDATES in fused:
            _check_candidates(f"{source}: writer {index}: fused", fused, (1, 2))
        elif fused.get("residual_axis") not in (1, 2):
            raise ArchitectureError(f"{source}: writer {index}: a fused tensor's residual_axis is 1 or 2")


def _validate(raw: dict[str, Any], source: str) -> list[Architecture]:
    for key, kind in _FAMILY_KEYS.items():
        if not isinstance(raw.get(key), kind):
            names = " or ".join(k.__name__ for k in kind) if isinstance(kind, tuple) else kind.__name__
            raise ArchitectureError(f"{source}: '{key}' must be a {names}")
    if not raw["embeddings"] or not raw["writers"]:
        raise ArchitectureError(f"{source}: needs at least one embedding and one writer")
    for index, writer in enumerate([*raw["embeddings"], *raw["writers"]]):
        _check_writer(source, index, writer)
    if any(isinstance(e, dict) and AXIS_CANDIDATES in e for e in raw["embeddings"]):
        raise ArchitectureError(f"{source}: an embedding's residual axis is fixed ('residual_axis', not candidates)")
    for index, writer in enumerate(raw["writers"]):
        _check_layer_writer(source, index, writer)
    if not all("${decoder}" in e["tensor"] and "${decoder}" in e["module"] for e in raw["embeddings"]):
        raise ArchitectureError(f"{source}: embedding tensors and modules start with ${{decoder}}")
    text = Architecture(
        family=raw["family"],
        description=raw.get("description", ""),
        model_types=tuple(raw["model_types"]),
        num_layers_key=_key_names(raw["num_layers_key"]),
        hidden_size_key=raw["hidden_size_key"],
        layer_module=raw["layer_module"],
        embeddings=tuple(raw["embeddings"]),
        writers=tuple(raw["writers"]),
        **_placement(raw, source),
    )
    wrappers = raw.get("wrappers", [])
    if not isinstance(wrappers, list):
        raise ArchitectureError(f"{source}: 'wrappers' must be a list")
    return [text] + [_wrapper(text, wrapper, f"{source} wrapper {index}") for index, wrapper in enumerate(wrappers)]


def _placement(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """Where a family's decoder is: its on-disk layouts, its in-memory root and the class that loads it."""
    layouts = raw.get("layouts", [DEFAULT_LAYOUT])
    if not isinstance(layouts, list) or not layouts:
        raise ArchitectureError(f"{source}: 'layouts' must be a non-empty list")
    for layout in layouts:
        if not (isinstance(layout, dict) and set(layout) == {"decoder", "unembedding"}):
            raise ArchitectureError(f"{source}: each layout needs exactly 'decoder' and 'unembedding'")
    if raw.get("loader", "causal-lm") not in LOADERS:
        raise ArchitectureError(f"{source}: 'loader' must be one of {LOADERS}")
    if not isinstance(raw.get("module_root", "model."), str):
        raise ArchitectureError(f"{source}: 'module_root' must be a string")
    return {
        "layouts": tuple(Layout(**layout) for layout in layouts),
        "module_root": raw.get("module_root", "model."),
        "loader": raw.get("loader", "causal-lm"),
    }


_WRAPPER_KEYS = {"family", "description", "model_types", "layouts", "module_root", "loader"}


def _wrapper(text: Architecture, raw: Any, source: str) -> Architecture:
    """A multimodal checkpoint that carries the text family's decoder under another root, beside towers that do not
    write into the text residual stream: the same writers, its own layouts, module root and loader."""
    if not isinstance(raw, dict) or not {"family", "model_types", "layouts", "module_root"} <= set(raw):
        raise ArchitectureError(f"{source}: a wrapper needs 'family', 'model_types', 'layouts' and 'module_root'")
    if unknown := set(raw) - _WRAPPER_KEYS:
        raise ArchitectureError(f"{source}: unknown wrapper keys {sorted(unknown)}")
    if not isinstance(raw["model_types"], list) or not raw["model_types"]:
        raise ArchitectureError(f"{source}: 'model_types' must be a non-empty list")
    return replace(
        text,
        family=raw["family"],
        description=raw.get("description", text.description),
        model_types=tuple(raw["model_types"]),
        **_placement(raw, source),
    )


@cache
def load_architectures() -> dict[str, Architecture]:
    """All family tables shipped with the package, keyed by model_type."""
    by_type: dict[str, Architecture] = {}
    for entry in sorted(resources.files("weight_edit.architectures").iterdir(), key=lambda p: p.name):
        if not entry.name.endswith(".json") or entry.name == NOT_COVERED_FILE:
            continue
        for arch in _validate(json.loads(entry.read_text()), entry.name):
            for model_type in arch.model_types:
                if model_type in by_type:
                    raise ArchitectureError(f"model_type '{model_type}' is claimed by two families")
                by_type[model_type] = arch
    return by_type


def architecture_for(config: dict[str, Any]) -> Architecture:
    """Look up the family table for a checkpoint's config.json, reduced to the writers its layers have."""
    model_type = config.get("model_type")
    table = load_architectures()
    if model_type not in table:
        raise ArchitectureError(not_covered_message(model_type, table))
    return table[model_type].for_config(config)


def not_covered_message(model_type: Any, table: dict[str, Architecture]) -> str:
    """One line: the model type, why it is not covered where that is known, and the closest supported family
    (the one named in not_covered.json, else the family of the most similar model_type name)."""
    import difflib

    known = json.loads(resources.files("weight_edit.architectures").joinpath(NOT_COVERED_FILE).read_text())
    entry = known.get(model_type) if isinstance(model_type, str) else None
    if entry is not None:
        closest = next(a for a in table.values() if a.family == entry["closest"])
        why = f": {entry['why']}"
    else:
        match = difflib.get_close_matches(str(model_type), list(table), n=1, cutoff=0.0)
        closest, why = table[match[0]], ""
    return (
        f"model_type '{model_type}' is not supported{why}. Closest supported family: {closest.family} "
        f"({', '.join(closest.model_types)}); every family is listed in the README's architecture table"
    )
