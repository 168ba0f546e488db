"""The edit itself: pure tensor functions, no I/O.

A residual-writing tensor holds residual-space vectors along one axis (`residual_axis`): the columns
of an output projection stored [d_model, d_in] (axis 0), the rows of an embedding or of a Conv1D
weight stored [d_in, d_model] (axis 1). Every function removes a subspace — one unit direction r̂, or
the span of k orthonormal rows Q [k, d] — from those vectors, at a strength s: w ← (I − s QᵀQ) w
(s = 1 removes it entirely). The norm-preserving variant also gives every vector back its length.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import torch

EditMode = Literal["norm-preserving", "project"]
EDIT_MODES: tuple[str, ...] = ("norm-preserving", "project")


def unit(direction: torch.Tensor) -> torch.Tensor:
    """Return `direction` scaled to unit length; refuse zero or non-finite vectors."""
    if direction.ndim != 1:
        raise ValueError(f"direction must be a vector, got shape {tuple(direction.shape)}")
    if not torch.isfinite(direction).all():
        raise ValueError("direction has non-finite entries")
    norm = direction.norm()
    if norm == 0:
        raise ValueError("direction is the zero vector")
    return direction / norm


def orthonormal_rows(vectors: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis [k, d] of the span of `vectors` ([d] or [k, d]), row i from rows ≤ i (Gram–Schmidt).

    The first row is always unit(vectors[0]), so a rank-k edit whose first vector is r̂ contains the
    rank-1 edit. Computed in float64; refuses rows that add nothing to the span of the ones before.
    """
    if vectors.ndim == 1:
        return unit(vectors).unsqueeze(0)
    if vectors.ndim != 2 or vectors.shape[0] == 0:
        raise ValueError(f"a subspace needs shape [k, d], got {tuple(vectors.shape)}")
    if not torch.isfinite(vectors).all():
        raise ValueError("subspace has non-finite entries")
    rows: list[torch.Tensor] = []
    for index, row in enumerate(vectors.double()):
        residual = row.clone()
        for _ in range(2):  # twice: classical Gram–Schmidt loses orthogonality once, not twice
            for basis_row in rows:
                residual -= basis_row * (basis_row @ residual)
        if residual.norm() <= 1e-8 * max(float(row.norm()), 1e-30):
            raise ValueError(f"subspace row {index} lies in the span of the rows before it")
        rows.append(residual / residual.norm())
    return torch.stack(rows).to(vectors.dtype)


def _basis(direction: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return orthonormal_rows(direction.to(torch.float64)).to(dtype)


def _along(r: torch.Tensor, ndim: int, residual_axis: int) -> torch.Tensor:
    """Reshape r so it broadcasts along `residual_axis` of an `ndim`-dimensional tensor."""
    shape = [1] * ndim
    shape[residual_axis] = r.numel()
    return r.reshape(shape)


def _check(weight: torch.Tensor, basis: torch.Tensor, residual_axis: int) -> None:
    if weight.shape[residual_axis] != basis.shape[-1]:
        raise ValueError(
            f"residual axis {residual_axis} of shape {tuple(weight.shape)} does not match direction size {basis.shape[-1]}"
        )


def _project_in_place(weight: torch.Tensor, basis: torch.Tensor, residual_axis: int, strength: float) -> torch.Tensor:
    """(I − s QᵀQ) on every residual vector of a tensor this module owns, without full-size temporaries."""
    q = basis.to(weight.dtype)
    if weight.ndim == 1:
        return weight.sub_(q.T @ (q @ weight), alpha=strength)
    if weight.ndim == 2:
        if residual_axis == 0:  # [d, n]: W − s Qᵀ (Q W)
            return weight.addmm_(q.T, q @ weight, alpha=-strength)
        return weight.addmm_(weight @ q.T, q, alpha=-strength)  # [n, d]: W − s (W Qᵀ) Q
    if residual_axis == 0:
        for row in q:
            coefficients = torch.tensordot(row, weight, dims=([0], [0])).unsqueeze(0)
            weight.sub_(_along(row, weight.ndim, 0) * coefficients, alpha=strength)
        return weight
    for block in weight:  # e.g. fused experts [experts, d_ff, d_model]: one expert at a time
        _project_in_place(block, q, residual_axis - 1, strength)
    return weight


def project_out(weight: torch.Tensor, r: torch.Tensor, residual_axis: int, strength: float = 1.0) -> torch.Tensor:
    """Remove s × the component along unit `r` (or orthonormal rows [k, d]) from every residual vector."""
    basis = r.reshape(1, -1) if r.ndim == 1 else r
    _check(weight, basis, residual_axis)
    return _project_in_place(weight.clone(), basis, residual_axis, strength)


def norm_preserving_project_out(
    weight: torch.Tensor, r: torch.Tensor, residual_axis: int, strength: float = 1.0
) -> torch.Tensor:
    """Project r (or rows [k, d]) out of every residual vector at `strength`, then restore each vector's norm.

    At full strength a second projection removes the component that rounding leaves after rescaling;
    at partial strength the rescaled vector keeps (1 − s) of its component, as the hook twin does.
    Vectors that lie entirely in the subspace become zero (no direction is left to rescale). Peak
    memory is one copy of `weight` besides the input.
    """
    basis = r.reshape(1, -1) if r.ndim == 1 else r
    norms = weight.norm(dim=residual_axis, keepdim=True)
    projected = project_out(weight, basis, residual_axis, strength)
    projected_norms = projected.norm(dim=residual_axis, keepdim=True)
    projected.mul_(torch.where(projected_norms > 0, norms / projected_norms.clamp_min(1e-30), 0.0))
    if strength == 1.0:
        _project_in_place(projected, basis, residual_axis, 1.0)
    return projected


def input_scale(weight: torch.Tensor, r: torch.Tensor, residual_axis: int, strength: float = 1.0) -> torch.Tensor:
    """Per-input scale that makes a hook reproduce the norm-preserving edit at run time.

    For W' = P_s W diag(c) with P_s = I − s QᵀQ and c_j = ‖w_j‖ / ‖P_s w_j‖, a module whose input is
    multiplied by c and whose output is multiplied by P_s gives exactly W' x + P_s b.
    """
    norms = weight.norm(dim=residual_axis)
    projected_norms = project_out(weight, r, residual_axis, strength).norm(dim=residual_axis)
    return torch.where(projected_norms > 0, norms / projected_norms.clamp_min(1e-30), 0.0)


def norm_scale(norms: list[tuple[torch.Tensor, float]]) -> torch.Tensor:
    """The elementwise scale g = Π (offset_i + γ_i) of a chain of RMSNorms (each after a scalar rescale) that a
    write passes through before the residual add: the write lands orthogonal to r̂ iff it is orthogonal to g ⊙ r̂.
    """
    scale = None
    for gamma, offset in norms:
        factor = offset + gamma.float()
        scale = factor if scale is None else scale * factor.to(scale.device)
    if scale is None:
        raise ValueError("norm_scale needs at least one norm")
    return scale


def norm_adjusted_basis(
    direction: torch.Tensor, norm_weight: torch.Tensor | None = None, offset: float = 0.0
) -> torch.Tensor:
    """The basis to remove from a write that passes through an RMSNorm first: û [d], or orthonormal rows [k, d].

    The norm multiplies the write elementwise by g = offset + γ after a scalar rescale, so a write
    orthogonal to û ∝ g ⊙ r̂ lands orthogonal to r̂; for rows Q [k, d], the orthonormalised rows of
    g ⊙ Q. Without a norm, r̂ (or Q) itself. Pure: it computes a basis and does no I/O.
    """
    if direction.ndim == 2:
        if norm_weight is None:
            return orthonormal_rows(direction)
        return orthonormal_rows((offset + norm_weight.to(direction.dtype)) * direction)
    r = unit(direction)
    if norm_weight is None:
        return r
    return unit((offset + norm_weight.to(r.dtype)) * r)


def biprojected_directions(direction: torch.Tensor, harmless_means: torch.Tensor) -> torch.Tensor:
    """Per-layer directions: r̂ made orthogonal to each layer's normalised harmless mean, [layers, d].

    Removing these instead of r̂ leaves the mean harmless activation of every layer untouched. With
    rows Q [k, d], every layer gets its own orthonormal rows [layers, k, d] orthogonal to its mean.
    """
    means = harmless_means.to(direction.dtype)
    m_hat = means / means.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    if direction.ndim == 2:
        q = orthonormal_rows(direction)
        return torch.stack([orthonormal_rows(torch.cat([m.unsqueeze(0), q]))[1:] for m in m_hat])
    r = unit(direction)
    orthogonal = r - (m_hat @ r).unsqueeze(-1) * m_hat
    return orthogonal / orthogonal.norm(dim=-1, keepdim=True)


def edit_tensor(
    weight: torch.Tensor,
    direction: torch.Tensor,
    residual_axis: int,
    mode: EditMode,
    is_bias: bool = False,
    compute_dtype: torch.dtype = torch.float32,
    strength: float = 1.0,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Edit one stored tensor and return it in its stored dtype (or `out_dtype`: verify keeps the float32 values
    before rounding).

    `direction` is one vector [d] or the rows [k, d] of a subspace (orthonormalised here). Biases
    always get the plain projection: a hook that projects a module's output projects its bias too,
    and nothing rescales it.
    """
    if mode not in EDIT_MODES:
        raise ValueError(f"unknown edit mode {mode!r}; choose one of {', '.join(EDIT_MODES)}")
    if not (strength >= 0.0 and strength < float("inf")):
        raise ValueError(f"strength must be a finite number ≥ 0, got {strength}")
    basis = _basis(direction, compute_dtype)
    work = weight.to(compute_dtype)
    if is_bias or work.ndim == 1 or mode == "project":
        edited = project_out(work, basis, residual_axis if work.ndim > 1 else 0, strength)
    else:
        edited = norm_preserving_project_out(work, basis, residual_axis, strength)
    return edited.to(out_dtype or weight.dtype)


def edited_pieces(
    weight: torch.Tensor,
    direction: torch.Tensor,
    residual_axis: int,
    mode: EditMode,
    is_bias: bool = False,
    max_elements: int = 1 << 24,
    strength: float = 1.0,
    out_dtype: torch.dtype | None = None,
) -> Iterator[torch.Tensor]:
    """Edit a tensor in blocks of residual vectors and yield the result in storage order.

    Every residual vector is edited on its own, so blocks give the same result as one call to
    `edit_tensor` while the float32 working copies stay at `max_elements`. When the residual vectors
    are rows of the leading axis (embeddings, Conv1D, fused experts) each block is yielded as soon as
    it is done; when they are columns, the blocks fill one output tensor that is yielded at the end.
    """
    options = {"strength": strength, "out_dtype": out_dtype}
    if weight.ndim == 1 or weight.numel() <= max_elements:
        yield edit_tensor(weight, direction, residual_axis, mode, is_bias, **options)
        return
    if residual_axis != 0:
        step = max(1, max_elements * weight.shape[0] // weight.numel())
        for start in range(0, weight.shape[0], step):
            yield edit_tensor(weight[start : start + step], direction, residual_axis, mode, is_bias, **options)
        return
    out = torch.empty_like(weight, dtype=out_dtype or weight.dtype)
    step = max(1, max_elements * weight.shape[1] // weight.numel())
    for start in range(0, weight.shape[1], step):
        out[:, start : start + step] = edit_tensor(
            weight[:, start : start + step], direction, 0, mode, is_bias, **options
        )
    yield out
