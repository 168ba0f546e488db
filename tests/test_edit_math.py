"""The edit against an independent float64 reference, on random inputs, for both axes and modes."""

import pytest
import torch

from weight_edit.edit_math import edit_tensor, input_scale, norm_preserving_project_out, project_out, unit


def reference_project(weight: torch.Tensor, r: torch.Tensor, residual_axis: int) -> torch.Tensor:
    """(I − r rᵀ) applied as an explicit matrix in float64."""
    projector = torch.eye(r.numel(), dtype=torch.float64) - torch.outer(r, r)
    w = weight.double()
    return projector @ w if residual_axis == 0 else w @ projector


def reference_norm_preserving(weight: torch.Tensor, r: torch.Tensor, residual_axis: int) -> torch.Tensor:
    """Vector by vector: project, renormalise to the original length (float64)."""
    w = weight.double() if residual_axis == 0 else weight.double().T
    columns = []
    for j in range(w.shape[1]):
        column = w[:, j]
        projected = column - r * (r @ column)
        columns.append(projected / projected.norm() * column.norm())
    out = torch.stack(columns, dim=1)
    return out if residual_axis == 0 else out.T


@pytest.mark.parametrize("residual_axis", [0, 1])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_project_matches_float64_reference(residual_axis, seed):
    g = torch.Generator().manual_seed(seed)
    d, other = 24, 40
    shape = (d, other) if residual_axis == 0 else (other, d)
    weight = torch.randn(shape, generator=g)
    r = unit(torch.randn(d, generator=g, dtype=torch.float64))
    edited = edit_tensor(weight, r.float(), residual_axis, "project")
    torch.testing.assert_close(edited.double(), reference_project(weight, r, residual_axis), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("residual_axis", [0, 1])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_norm_preserving_matches_reference_and_keeps_norms(residual_axis, seed):
    g = torch.Generator().manual_seed(seed)
    d, other = 24, 40
    shape = (d, other) if residual_axis == 0 else (other, d)
    weight = torch.randn(shape, generator=g)
    r = unit(torch.randn(d, generator=g, dtype=torch.float64))
    edited = edit_tensor(weight, r.float(), residual_axis, "norm-preserving").double()
    torch.testing.assert_close(edited, reference_norm_preserving(weight, r, residual_axis), atol=1e-5, rtol=1e-5)
    # writes nothing along r, and every residual vector keeps its length
    assert (edited.movedim(residual_axis, -1) @ r).abs().max() < 1e-5
    torch.testing.assert_close(
        edited.norm(dim=residual_axis), weight.double().norm(dim=residual_axis), atol=1e-5, rtol=1e-5
    )


def test_renormalising_the_wrong_axis_brings_r_back():
    """Guards the axis: renormalising rows of a [d_model, d_in] matrix reintroduces r (as one tool does)."""
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(16, 32, generator=g)
    r = unit(torch.randn(16, generator=g))
    projected = project_out(weight, r, 0)
    rows_renormed = projected / projected.norm(dim=1, keepdim=True) * weight.norm(dim=1, keepdim=True)
    assert (r @ rows_renormed).abs().max() > 1e-2
    right = norm_preserving_project_out(weight, r, 0)
    assert (r @ right).abs().max() < 1e-5


def test_bias_gets_plain_projection_in_both_modes():
    g = torch.Generator().manual_seed(4)
    bias = torch.randn(24, generator=g)
    r = unit(torch.randn(24, generator=g, dtype=torch.float64))
    expected = bias.double() - r * (r @ bias.double())
    for mode in ("project", "norm-preserving"):
        torch.testing.assert_close(edit_tensor(bias, r.float(), 0, mode).double(), expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_stored_dtype_is_kept(dtype):
    weight = torch.randn(8, 12).to(dtype)
    assert edit_tensor(weight, torch.randn(8), 0, "norm-preserving").dtype == dtype


def test_hook_scale_reproduces_norm_preserving_weight():
    g = torch.Generator().manual_seed(5)
    weight = torch.randn(24, 40, generator=g, dtype=torch.float64)
    bias = torch.randn(24, generator=g, dtype=torch.float64)
    r = unit(torch.randn(24, generator=g, dtype=torch.float64))
    x = torch.randn(7, 40, generator=g, dtype=torch.float64)
    hooked = project_out((x * input_scale(weight, r, 0)) @ weight.T + bias, r, 1)
    edited = x @ norm_preserving_project_out(weight, r, 0).T + project_out(bias, r, 0)
    torch.testing.assert_close(hooked, edited, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("bad", [torch.zeros(4), torch.tensor([1.0, float("nan"), 0, 0]), torch.ones(2, 2)])
def test_unusable_directions_are_refused(bad):
    with pytest.raises(ValueError):
        unit(bad)


@pytest.mark.parametrize("residual_axis", [0, 1, 2])
@pytest.mark.parametrize("mode", ["project", "norm-preserving"])
def test_three_dimensional_tensors_edit_every_slice(residual_axis, mode):
    """Fused expert tensors: each residual vector along the axis is edited like a 2-D column."""
    g = torch.Generator().manual_seed(6)
    shape = [3, 5, 7]
    shape[residual_axis] = 16
    weight = torch.randn(shape, generator=g)
    r = unit(torch.randn(16, generator=g, dtype=torch.float64))
    edited = edit_tensor(weight, r.float(), residual_axis, mode).double()
    moved = weight.double().movedim(residual_axis, -1).reshape(-1, 16)
    reference = (reference_project if mode == "project" else reference_norm_preserving)(moved, r, 1)
    torch.testing.assert_close(edited.movedim(residual_axis, -1).reshape(-1, 16), reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape,residual_axis", [((40, 16), 1), ((16, 40), 0), ((6, 9, 16), 2), ((16, 5, 7), 0)])
@pytest.mark.parametrize("mode", ["project", "norm-preserving"])
def test_blockwise_edit_equals_whole_tensor_edit(shape, residual_axis, mode):
    """Editing in blocks (bounded working memory) gives the whole-tensor result, in storage order."""
    from weight_edit.edit_math import edited_pieces

    g = torch.Generator().manual_seed(8)
    weight = torch.randn(shape, generator=g).to(torch.bfloat16)
    r = torch.randn(16, generator=g)
    pieces = list(edited_pieces(weight, r, residual_axis, mode, max_elements=50))
    assert len(pieces) > 1 or residual_axis == 0
    joined = torch.cat([p.reshape(-1) for p in pieces])
    whole = edit_tensor(weight, r, residual_axis, mode).reshape(-1)
    assert joined.dtype == torch.bfloat16
    torch.testing.assert_close(joined.float(), whole.float(), atol=1e-2, rtol=1e-2)
    assert (joined.float() != whole.float()).float().mean() < 0.02  # at most a few bf16 roundings differ
