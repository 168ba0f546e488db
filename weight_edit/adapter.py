"""The plain projection as a PEFT LoRA adapter: a few megabytes instead of a full checkpoint.

For a writer viewed residual axis first, M [d_model, n] (the weight of an output projection, the
transpose of a Conv1D weight or of an embedding), the projection edit is M' = M − s Qᵀ(Q M) with Q
[k, d_model] orthonormal rows (k = 1: Q = r̂ᵀ) and strength s. Its change is exactly rank k:
ΔM = B A with B = −s Qᵀ [d_model, k] and A = Q M [k, n], which is what PEFT's LoRA layers add
(`lora_B(lora_A(x))`, embeddings `A.T[token] @ B.T`, with `lora_alpha = r` so the scaling is 1).
Biases added to the residual stream become b − s Qᵀ(Q b); PEFT cannot put a bias on a LoRA embedding
(`lora_bias=True` is refused for `Embedding` layers), so the edited biases travel as the targeted
layers' own biases (`bias="lora_only"`: `<module>.base_layer.bias`), which PEFT loads in place.

The norm-preserving edit has no such form: it rescales every column by its own factor
‖w_j‖ / ‖(I − P) w_j‖, so its change (I − P) W D − W is in general full rank.

Only the edited tensors are read, one at a time, and A is computed in float32 in blocks; nothing
here needs peft (writing is safetensors and JSON), loading the result does.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from weight_edit import __version__
from weight_edit.architecture import Architecture, EditTarget, architecture_for
from weight_edit.checkpoint import Checkpoint, fingerprint
from weight_edit.edit_math import EditMode, unit
from weight_edit.errors import WeightEditError
from weight_edit.hashing import tensor_sha256
from weight_edit.output_folder import check_output_location, new_staging, replace_atomically
from weight_edit.writer import DIRECTION_COPY, LAYER_DIRECTIONS_COPY, check_float_writer

ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"  # the names PeftModel.from_pretrained looks for
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_PROVENANCE_FILE = "weight_edit_adapter_provenance.json"
PEFT_PREFIX = "base_model.model."  # PeftModelForCausalLM wraps the transformers model twice
EMBEDDING_KINDS = ("embedding", "position_embedding")
ORTHONORMAL_TOLERANCE = 1e-5

Strength = float | Callable[[EditTarget], float]


class AdapterError(WeightEditError):
    """The requested edit cannot be expressed exactly as a PEFT LoRA adapter."""


@dataclass
class AdapterResult:
    out: Path
    target_modules: list[str]
    rank: int
    bias: str  # PEFT's `bias` setting: "none", or "lora_only" when edited biases travel with the adapter
    provenance: dict[str, Any]


def checked_basis(basis: torch.Tensor) -> torch.Tensor:
    """Q [k, d] in float32: a single direction is normalised; k rows must already be orthonormal.

    Rows are not silently orthonormalised: Gram–Schmidt would change which subspace a caller's
    first rows span, so a non-orthonormal basis is refused instead.
    """
    if basis.ndim == 1:
        return unit(basis.detach().to(torch.float32).cpu()).unsqueeze(0)
    if basis.ndim != 2 or basis.shape[0] == 0:
        raise ValueError(f"basis must be a direction [d] or rows [k, d], got shape {tuple(basis.shape)}")
    rows = basis.detach().to(torch.float64).cpu()
    if not torch.isfinite(rows).all():
        raise ValueError("basis has non-finite entries")
    gram = rows @ rows.T
    error = (gram - torch.eye(rows.shape[0], dtype=torch.float64)).abs().max().item()
    if error > ORTHONORMAL_TOLERANCE:
        raise ValueError(f"basis rows must be orthonormal (max |Q Qᵀ − I| = {error:.2e})")
    return rows.to(torch.float32)


def lora_factors(
    weight: torch.Tensor,
    basis: torch.Tensor,
    residual_axis: int,
    strength: float = 1.0,
    max_elements: int = 1 << 24,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A = Q M [k, n] and B = −s Qᵀ [d, k] in float32, so that M + B A is the projection edit of M.

    M is `weight` with its residual axis first ([d, n]); A is computed from float32 blocks of at
    most `max_elements`, so a bfloat16 embedding is never copied whole to float32. The layouts are
    PEFT's: `lora_A.weight`/`lora_B.weight` of a Linear (and of a Conv1D with fan_in_fan_out) and
    `lora_embedding_A`/`lora_embedding_B` of an Embedding.
    """
    q = checked_basis(basis)
    if weight.ndim != 2 or residual_axis not in (0, 1):
        raise ValueError(f"expected a 2-D weight with residual axis 0 or 1, got {tuple(weight.shape)}, {residual_axis}")
    if weight.shape[residual_axis] != q.shape[1]:
        raise ValueError(
            f"residual axis {residual_axis} of shape {tuple(weight.shape)} does not match basis size {q.shape[1]}"
        )
    d, n = q.shape[1], weight.shape[1 - residual_axis]
    a = torch.empty(q.shape[0], n, dtype=torch.float32)
    step = max(1, max_elements // max(d, 1))
    for start in range(0, n, step):
        block = weight[:, start : start + step] if residual_axis == 0 else weight[start : start + step].T
        a[:, start : start + step] = q @ block.to(torch.float32)
    b = (-float(strength)) * q.T.contiguous()
    return a, b


def edited_bias(bias: torch.Tensor, basis: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    """b − s Qᵀ(Q b) in float32: the bias a module with an edited output must add."""
    q = checked_basis(basis)
    b = bias.detach().to(torch.float32)
    if b.ndim != 1 or b.numel() != q.shape[1]:
        raise ValueError(f"bias of shape {tuple(bias.shape)} does not match basis size {q.shape[1]}")
    return b - float(strength) * (q.T @ (q @ b))


def check_adapter_supported(arch: Architecture, mode: EditMode) -> None:
    """Refuse what a LoRA adapter cannot reproduce exactly, or what PEFT cannot address by module name."""
    if mode != "project":
        raise AdapterError(
            f"--as-adapter needs --mode project, not {mode!r}: the norm-preserving edit rescales every column "
            "w_j by its own factor ‖w_j‖/‖(I − P) w_j‖, so its change (I − P) W D − W is in general full rank and "
            "no low-rank (LoRA) adapter reproduces it; use --mode project, or write a full checkpoint"
        )
    family = f"'{arch.family}' ({', '.join(arch.model_types)})"
    if any("experts_key" in w or w.get("hook", "module") == "block" for w in arch.writers):
        raise AdapterError(
            f"--as-adapter does not support the mixture-of-experts family {family}: transformers fuses the "
            "experts into parameters that PEFT LoRA target_modules cannot address; write a full checkpoint"
        )
    if arch.has_output_norms:
        raise AdapterError(
            f"--as-adapter does not support the output-norm family {family}: its writers pass through a norm "
            "before the residual add, which the adapter does not cover yet; write a full checkpoint"
        )


def _peft_keys(target: EditTarget) -> tuple[str, str]:
    module = PEFT_PREFIX + target.module
    if target.kind in EMBEDDING_KINDS:
        return f"{module}.lora_embedding_A", f"{module}.lora_embedding_B"
    return f"{module}.lora_A.weight", f"{module}.lora_B.weight"


def _tensor_sha256(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def _fan_in_fan_out(arch: Architecture, targets: list[EditTarget]) -> bool:
    """PEFT's switch for Conv1D weights stored [d_in, d_model]; it is one setting for the whole adapter."""
    axes = {t.residual_axis for t in targets if t.kind not in EMBEDDING_KINDS and not t.is_bias}
    if len(axes) > 1:
        raise AdapterError(
            f"family '{arch.family}' mixes [d_model, d_in] and [d_in, d_model] writers; "
            "one PEFT fan_in_fan_out setting cannot describe both"
        )
    return axes == {1}


def _checked_bases(
    source: Checkpoint, arch: Architecture, direction: torch.Tensor, layer_directions: torch.Tensor | None
) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    """The basis Q [k, d] of `direction`, and each layer's basis when `layer_directions` gives them, checked
    against the model's hidden size and layer count."""
    hidden = arch.hidden_size(source.config)
    basis = checked_basis(direction)
    if basis.shape[1] != hidden:
        raise ValueError(f"direction has shape {tuple(direction.shape)}, the model's hidden size is {hidden}")
    rank = basis.shape[0]
    num_layers = arch.num_layers(source.config)
    if layer_directions is None:
        return basis, None
    expected = (num_layers, hidden) if rank == 1 else (num_layers, rank, hidden)
    if tuple(layer_directions.shape) != expected:
        raise ValueError(f"layer directions have shape {tuple(layer_directions.shape)}, expected {expected}")
    return basis, [checked_basis(layer_directions[layer]) for layer in range(num_layers)]


def _check_writers(source: Checkpoint, targets: list[EditTarget]) -> None:
    """Refuse, before anything is written, writers that are not float or not the 2-D weights (or 1-D biases) a
    LoRA layer adds to."""
    for target in targets:
        check_float_writer(source, target.tensor)
        info = source.info(target.tensor)
        if len(info.shape) != (1 if target.is_bias else 2):
            raise AdapterError(f"residual writer '{target.tensor}' has shape {list(info.shape)}; expected 2-D weights")


def _finite_strength(strength: Strength, target: EditTarget) -> float:
    value = float(strength(target) if callable(strength) else strength)
    if not torch.isfinite(torch.tensor(value)):
        raise ValueError(f"strength for '{target.tensor}' is not finite ({value})")
    return value


@dataclass
class _Adapter:
    """What the adapter holds, before it is written."""

    rank: int
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # by PEFT's names
    modules: list[str] = field(default_factory=list)  # LoRA target modules, in the order of the targets
    strengths: dict[str, float] = field(default_factory=dict)  # by module
    source_hashes: dict[str, str] = field(default_factory=dict)  # sha256 of each edited source tensor, as stored
    bias: str = "none"  # PEFT's `bias` setting


def _lora_adapter(
    source: Checkpoint,
    targets: list[EditTarget],
    basis: torch.Tensor,
    layer_bases: list[torch.Tensor] | None,
    strength: Strength,
) -> _Adapter:
    """Every writer's LoRA factors (edited biases as the layers' own), reading one source tensor at a time."""
    adapter = _Adapter(rank=basis.shape[0])
    for target in targets:
        stored = source.read(target.tensor)
        adapter.source_hashes[target.tensor] = _tensor_sha256(stored)
        s = _finite_strength(strength, target)
        rows = basis if layer_bases is None else layer_bases[target.layer or 0]
        if target.is_bias:
            adapter.tensors[f"{PEFT_PREFIX}{target.module}.base_layer.bias"] = edited_bias(stored, rows, s)
        else:
            a, b = lora_factors(stored, rows, target.residual_axis, s)
            key_a, key_b = _peft_keys(target)
            adapter.tensors[key_a], adapter.tensors[key_b] = a, b
            adapter.modules.append(target.module)
            adapter.strengths[target.module] = s
        del stored
    adapter.bias = "lora_only" if any(t.is_bias for t in targets) else "none"
    return adapter


def _adapter_config(source: Checkpoint, adapter: _Adapter, fan_in_fan_out: bool) -> dict[str, Any]:
    """PEFT's adapter_config.json for a LoRA whose B A is the edit itself."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(source.folder),
        "revision": None,
        "inference_mode": True,
        "r": adapter.rank,
        "lora_alpha": adapter.rank,  # scaling lora_alpha / r = 1: B A is the edit itself
        "use_rslora": False,
        "use_dora": False,
        "lora_dropout": 0.0,
        "target_modules": sorted(adapter.modules),
        "fan_in_fan_out": fan_in_fan_out,
        "bias": adapter.bias,
        "lora_bias": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "ensure_weight_tying": False,  # tied models: the adapter must change the lookup only, as `apply` unties
    }


def _save_adapter_files(
    staging: Path,
    adapter: _Adapter,
    config: dict[str, Any],
    basis: torch.Tensor,
    layer_directions: torch.Tensor | None,
    hidden: int,
) -> dict[str, Any]:
    """Write the adapter's weights and config, and the direction copies `apply` also stores; returns their
    provenance entries ("direction", "layer_directions", "adapter")."""
    weights_path = staging / ADAPTER_WEIGHTS_FILE
    save_file(
        {k: v.contiguous() for k, v in sorted(adapter.tensors.items())}, str(weights_path), metadata={"format": "pt"}
    )
    (staging / ADAPTER_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    stored_basis = (basis[0] if adapter.rank == 1 else basis).contiguous()  # as `apply`: the unit direction
    save_file({"direction": stored_basis}, str(staging / DIRECTION_COPY), metadata={"format": "pt"})
    if layer_directions is not None:
        save_file(
            {"layer_directions": layer_directions.detach().to(torch.float32).contiguous().cpu()},
            str(staging / LAYER_DIRECTIONS_COPY),
            metadata={"format": "pt"},
        )
    return {
        "direction": {"sha256": tensor_sha256(stored_basis.flatten()), "file": DIRECTION_COPY, "hidden_size": hidden},
        "layer_directions": None
        if layer_directions is None
        else {"file": LAYER_DIRECTIONS_COPY, "sha256": tensor_sha256(layer_directions.detach().cpu().flatten())},
        "adapter": {
            "file": ADAPTER_WEIGHTS_FILE,
            "sha256": hashlib.sha256(weights_path.read_bytes()).hexdigest(),
            "bytes": weights_path.stat().st_size,
        },
    }


def _adapter_provenance(
    source: Checkpoint,
    arch: Architecture,
    mode: EditMode,
    adapter: _Adapter,
    targets: list[EditTarget],
    files: dict[str, Any],
    provenance_extra: dict[str, Any] | None,
) -> dict[str, Any]:
    """The adapter's record of its source, edit and files (`files`: from `_save_adapter_files`)."""
    strengths = adapter.strengths
    uniform = len(set(strengths.values())) <= 1
    return {
        "tool": "weight-edit",
        "version": __version__,
        "created_unix": int(time.time()),
        "kind": "peft-lora-adapter",
        "mode": mode,
        "architecture": arch.family,
        # The adapter equals `apply --mode project`, so it inherits that guarantee for one direction at
        # full strength only.
        "guarantee": arch.guarantee(mode, files["layer_directions"] is not None)
        if adapter.rank == 1 and set(strengths.values()) <= {1.0}
        else None,
        "rank": adapter.rank,
        "strength": next(iter(strengths.values()), 1.0) if uniform else None,
        "strengths": None if uniform else strengths,
        "source": {
            "path": str(source.folder),
            "fingerprint": fingerprint(source),
            "edited_tensors_sha256": dict(sorted(adapter.source_hashes.items())),
        },
        "direction": files["direction"],
        "layer_directions": files["layer_directions"],
        "target_modules": sorted(adapter.modules),
        "edited_tensors": sorted(t.tensor for t in targets),
        "bias": adapter.bias,
        "adapter": files["adapter"],
        **(provenance_extra or {}),
    }


def write_adapter(
    source: Checkpoint,
    direction: torch.Tensor,
    out: Path,
    mode: EditMode = "project",
    strength: Strength = 1.0,
    layer_directions: torch.Tensor | None = None,
    force: bool = False,
    provenance_extra: dict[str, Any] | None = None,
) -> AdapterResult:
    """Write the projection of `direction` out of every residual writer as a PEFT LoRA adapter in `out`.

    `direction` is one vector [d] or orthonormal rows [k, d] (rank k); `layer_directions`
    ([layers, d] or [layers, k, d]) gives layer l's writers their own basis and the embeddings row 0,
    as in `apply_direction`. `strength` is one number or a function of the edit target (per-layer
    strengths). Loading `source` with the adapter through PEFT equals the full checkpoint that
    `apply_direction(..., mode="project")` writes (untied: the adapter changes only the lookup).
    """
    out = Path(out).resolve()
    check_output_location(source.folder, out, force)
    arch = architecture_for(source.config)
    check_adapter_supported(arch, mode)
    basis, layer_bases = _checked_bases(source, arch, direction, layer_directions)
    targets = arch.targets(source.config, source.tensor_names, shapes=source.shapes)
    _check_writers(source, targets)
    fan_in_fan_out = _fan_in_fan_out(arch, targets)
    adapter = _lora_adapter(source, targets, basis, layer_bases, strength)
    config = _adapter_config(source, adapter, fan_in_fan_out)
    staging = new_staging(out)
    try:
        files = _save_adapter_files(staging, adapter, config, basis, layer_directions, arch.hidden_size(source.config))
        provenance = _adapter_provenance(source, arch, mode, adapter, targets, files, provenance_extra)
        (staging / ADAPTER_PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
        replace_atomically(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return AdapterResult(out, sorted(adapter.modules), adapter.rank, adapter.bias, provenance)
