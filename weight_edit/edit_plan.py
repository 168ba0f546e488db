"""What one `apply` removes from which tensor: the subspace, per-layer directions and per-layer strengths.

The foundation edit removes one direction r̂ at full strength from every residual writer. A plan
generalises it along the three axes researchers vary: the rank (a k-dimensional subspace whose first
row is r̂), per-layer bases (biprojection: each layer's rows made orthogonal to its harmless mean), and
per-layer strengths s_l (w ← (I − s_l QᵀQ) w on what layer l writes; separately for attention writes,
MLP writes and the embeddings). The writer, the hook twin and verify all read the same plan, so the
checkpoint and the run-time reference cannot drift apart. Pure data and maths, no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from weight_edit.architecture import Architecture, EditTarget
from weight_edit.edit_math import orthonormal_rows, unit
from weight_edit.errors import WeightEditError


class PlanError(WeightEditError):
    """An edit plan does not fit the model (wrong layer count, hidden size) or is malformed."""


# Which strength applies to a writer of each kind (EditTarget.kind).
STRENGTH_GROUP = {
    "embedding": "embedding",
    "position_embedding": "embedding",
    "attention": "attention",
    "mlp": "mlp",
    "expert": "mlp",
    "shared_expert": "mlp",
    "per_layer_input": "mlp",  # Gemma 4's per-layer input projection writes after the MLP, in the same half-layer
}


@dataclass(frozen=True)
class Strengths:
    """Projection strength per residual writer: one for the embeddings, one per layer for attention and MLP."""

    embedding: float
    attention: tuple[float, ...]
    mlp: tuple[float, ...]

    @classmethod
    def full(cls, num_layers: int) -> Strengths:
        return cls(1.0, (1.0,) * num_layers, (1.0,) * num_layers)

    @property
    def is_full(self) -> bool:
        return self.embedding == 1.0 and all(s == 1.0 for s in (*self.attention, *self.mlp))

    def for_target(self, target: EditTarget) -> float:
        group = STRENGTH_GROUP.get(target.kind)
        if group is None:
            raise PlanError(f"no strength group for writer kind '{target.kind}' ({target.tensor})")
        if group == "embedding":
            return self.embedding
        return (self.attention if group == "attention" else self.mlp)[target.layer or 0]

    def as_dict(self) -> dict[str, Any]:
        return {"embedding": self.embedding, "attention": list(self.attention), "mlp": list(self.mlp)}

    @classmethod
    def from_dict(cls, data: Any, num_layers: int, source: str = "strengths") -> Strengths:
        """Validate a JSON object {"embedding": s, "attention": [s_0..], "mlp": [s_0..]}."""
        if not isinstance(data, dict) or set(data) != {"embedding", "attention", "mlp"}:
            raise PlanError(f"{source}: expected an object with exactly 'embedding', 'attention' and 'mlp'")

        def check(value: Any, where: str) -> float:
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise PlanError(f"{source}: {where} is {value!r}; strengths are finite numbers ≥ 0")
            return float(value)

        per_layer = {}
        for group in ("attention", "mlp"):
            values = data[group]
            if not isinstance(values, list) or len(values) != num_layers:
                raise PlanError(f"{source}: '{group}' must list one strength per layer ({num_layers})")
            per_layer[group] = tuple(check(v, f"{group}[{i}]") for i, v in enumerate(values))
        return cls(check(data["embedding"], "embedding"), per_layer["attention"], per_layer["mlp"])


@dataclass(frozen=True)
class EditPlan:
    """Everything `apply` needs besides the checkpoint and the mode.

    `basis` [k, d] has orthonormal rows, the first along the fitted direction; `layer_bases`
    [layers, k, d] (biprojection) replaces it per layer, row 0 of it for the embeddings.
    """

    direction: torch.Tensor  # unit fitted direction [d], float32
    basis: torch.Tensor  # [k, d]
    strengths: Strengths
    layer_bases: torch.Tensor | None = None

    @classmethod
    def build(
        cls,
        direction: torch.Tensor,
        num_layers: int,
        subspace: torch.Tensor | None = None,
        layer_directions: torch.Tensor | None = None,
        strengths: Strengths | None = None,
    ) -> EditPlan:
        """Check shapes against the model and orthonormalise; `subspace` rows must start along `direction`."""
        r = unit(direction.detach().to(torch.float32).cpu())
        d = r.numel()
        if subspace is None:
            basis = r.unsqueeze(0)
        else:
            subspace = subspace.detach().to(torch.float32).cpu()
            if subspace.ndim != 2 or subspace.shape[1] != d:
                raise PlanError(f"subspace has shape {tuple(subspace.shape)}, expected [k, {d}]")
            if abs(float(unit(subspace[0]) @ r)) < 0.999:
                raise PlanError(
                    "the subspace's first row is not the fitted direction: it was made for another direction"
                )
            basis = orthonormal_rows(torch.cat([r.unsqueeze(0), subspace[1:]]))
        if layer_directions is not None:
            layer_directions = layer_directions.detach().to(torch.float32).cpu()
            if layer_directions.ndim == 2:
                layer_directions = layer_directions.unsqueeze(1)
            if layer_directions.shape != (num_layers, basis.shape[0], d):
                raise PlanError(
                    f"layer directions have shape {tuple(layer_directions.shape)}, "
                    f"expected ({num_layers}, {basis.shape[0]}, {d})"
                )
            layer_directions = torch.stack([orthonormal_rows(rows) for rows in layer_directions])
        strengths = strengths or Strengths.full(num_layers)
        if len(strengths.attention) != num_layers or len(strengths.mlp) != num_layers:
            raise PlanError(f"strengths list {len(strengths.attention)} layers; the model has {num_layers}")
        return cls(r, basis, strengths, layer_bases=layer_directions)

    @property
    def rank(self) -> int:
        return self.basis.shape[0]

    def basis_for(self, target: EditTarget) -> torch.Tensor:
        """Rows [k, d] removed from this writer (before any output-norm adjustment)."""
        return self.basis if self.layer_bases is None else self.layer_bases[target.layer or 0]

    def strength_for(self, target: EditTarget) -> float:
        return self.strengths.for_target(target)

    def guarantee(self, arch: Architecture, mode: str) -> str:
        """What a checkpoint written with this plan equals (`Architecture.guarantee`; recorded by `apply`)."""
        return arch.guarantee(mode, self.layer_bases is not None, self.strengths.is_full)
