"""The edit itself: pure tensor functions, no I/O.

A residual-writing tensor holds residual-space vectors along one axis (`residual_axis`): the columns
of an output projection stored [d_model, d_in] (axis 0), the rows of an embedding or of a Conv1D
weight stored [d_in, d_model] (axis 1). Every function removes the unit direction `r` from those
vectors; the norm-preserving variant also gives every vector back its original length.
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


def _along(r: torch.Tensor, ndim: int, residual_axis: int) -> torch.Tensor:
    """Reshape r so it broadcasts along `residual_axis` of an `ndim`-dimensional tensor."""
    shape = [1] * ndim
    shape[residual_axis] = r.numel()
    return r.reshape(shape)


def _check(weight: torch.Tensor, r: torch.Tensor, residual_axis: int) -> None:
    if weight.shape[residual_axis] != r.numel():
        raise ValueError(
            f"residual axis {residual_axis} of shape {tuple(weight.shape)} does not match direction size {r.numel()}"
        )


def _project_in_place(weight: torch.Tensor, r: torch.Tensor, residual_axis: int) -> torch.Tensor:
    """(I − r rᵀ) on every residual vector of a tensor this module owns, without full-size temporaries."""
    r = r.to(weight.dtype)
    if weight.ndim == 1:
        return weight.sub_(r * (weight @ r))
    if weight.ndim == 2:
        coefficients = torch.tensordot(weight, r, dims=([residual_axis], [0]))
        return (
            weight.addr_(r, coefficients, alpha=-1) if residual_axis == 0 else weight.addr_(coefficients, r, alpha=-1)
        )
    if residual_axis == 0:
        return weight.sub_(_along(r, weight.ndim, 0) * torch.tensordot(r, weight, dims=([0], [0])).unsqueeze(0))
    for block in weight:  # e.g. fused experts [experts, d_ff, d_model]: one expert at a time
        _project_in_place(block, r, residual_axis - 1)
    return weight


def project_out(weight: torch.Tensor, r: torch.Tensor, residual_axis: int) -> torch.Tensor:
    """Remove the component along unit `r` from every residual vector of `weight`: (I - r rᵀ) w."""
    _check(weight, r, residual_axis)
    return _project_in_place(weight.clone(), r, residual_axis)


def norm_preserving_project_out(weight: torch.Tensor, r: torch.Tensor, residual_axis: int) -> torch.Tensor:
    """Project r out of every residual vector, then restore each vector's original norm.

    The second projection removes the r component that rounding leaves after rescaling. Vectors
    that lie entirely along r become zero (there is no direction left to rescale). Peak memory is
    one copy of `weight` besides the input.
    """
    norms = weight.norm(dim=residual_axis, keepdim=True)
    projected = project_out(weight, r, residual_axis)
    projected_norms = projected.norm(dim=residual_axis, keepdim=True)
    projected.mul_(torch.where(projected_norms > 0, norms / projected_norms.clamp_min(1e-30), 0.0))
    return _project_in_place(projected, r, residual_axis)


def input_scale(weight: torch.Tensor, r: torch.Tensor, residual_axis: int) -> torch.Tensor:
    """Per-input scale that makes a hook reproduce the norm-preserving edit at run time.

    For W' = P W diag(s) with s_j = ‖w_j‖ / ‖P w_j‖, a module whose input is multiplied by s and
    whose output is projected gives exactly W' x + P b.
    """
    norms = weight.norm(dim=residual_axis)
    projected_norms = project_out(weight, r, residual_axis).norm(dim=residual_axis)
    return torch.where(projected_norms > 0, norms / projected_norms.clamp_min(1e-30), 0.0)


def write_direction(
    direction: torch.Tensor, norm_weight: torch.Tensor | None = None, offset: float = 0.0
) -> torch.Tensor:
    """The direction to remove from a write that passes through an RMSNorm before the residual add.

    The norm multiplies the write elementwise by (offset + γ) after a scalar rescale, so a write
    orthogonal to û ∝ (offset + γ) ⊙ r̂ lands orthogonal to r̂. Without a norm, û = r̂.
    """
    r = unit(direction)
    if norm_weight is None:
        return r
    return unit((offset + norm_weight.to(r.dtype)) * r)


def biprojected_directions(direction: torch.Tensor, harmless_means: torch.Tensor) -> torch.Tensor:
    """Per-layer directions: r̂ made orthogonal to each layer's normalised harmless mean, [layers, d].

    Removing these instead of r̂ leaves the mean harmless activation of every layer untouched.
    """
    r = unit(direction)
    means = harmless_means.to(r.dtype)
    m_hat = means / means.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    orthogonal = r - (m_hat @ r).unsqueeze(-1) * m_hat
    return orthogonal / orthogonal.norm(dim=-1, keepdim=True)


def edit_tensor(
    weight: torch.Tensor,
    direction: torch.Tensor,
    residual_axis: int,
    mode: EditMode,
    is_bias: bool = False,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Edit one stored tensor and return it in its stored dtype.

    Biases always get the plain projection: a hook that projects a module's output projects its
    bias too, and nothing rescales it.
    """
    if mode not in EDIT_MODES:
        raise ValueError(f"unknown edit mode {mode!r}; choose one of {', '.join(EDIT_MODES)}")
    r = unit(direction.to(compute_dtype))
    work = weight.to(compute_dtype)
    if is_bias or work.ndim == 1 or mode == "project":
        edited = project_out(work, r, residual_axis if work.ndim > 1 else 0)
    else:
        edited = norm_preserving_project_out(work, r, residual_axis)
    return edited.to(weight.dtype)


def edited_pieces(
    weight: torch.Tensor,
    direction: torch.Tensor,
    residual_axis: int,
    mode: EditMode,
    is_bias: bool = False,
    max_elements: int = 1 << 24,
) -> Iterator[torch.Tensor]:
    """Edit a tensor in blocks of residual vectors and yield the result in storage order.

    Every residual vector is edited on its own, so blocks give the same result as one call to
    `edit_tensor` while the float32 working copies stay at `max_elements`. When the residual vectors
    are rows of the leading axis (embeddings, Conv1D, fused experts) each block is yielded as soon as
    it is done; when they are columns, the blocks fill one output tensor that is yielded at the end.
    """
    if weight.ndim == 1 or weight.numel() <= max_elements:
        yield edit_tensor(weight, direction, residual_axis, mode, is_bias)
        return
    if residual_axis != 0:
        step = max(1, max_elements * weight.shape[0] // weight.numel())
        for start in range(0, weight.shape[0], step):
            yield edit_tensor(weight[start : start + step], direction, residual_axis, mode, is_bias)
        return
    out = torch.empty_like(weight)
    step = max(1, max_elements * weight.shape[1] // weight.numel())
    for start in range(0, weight.shape[1], step):
        out[:, start : start + step] = edit_tensor(weight[:, start : start + step], direction, 0, mode, is_bias)
    yield out
