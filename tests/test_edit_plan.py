"""Rank-k subspaces and per-layer strengths: exact against float64 references, and equal to their hook twin."""

import json

import pytest
import torch
from conftest import build_tiny_model

import settings
from weight_edit.checkpoint import Checkpoint
from weight_edit.edit_math import edit_tensor, input_scale, orthonormal_rows, project_out
from weight_edit.edit_plan import EditPlan, PlanError, Strengths
from weight_edit.verify import verify_checkpoint
from weight_edit.writer import PROVENANCE_FILE, apply_direction, write_provenance

PROMPTS = ["Tell me a joke", "How do locks work?", "Explain how a phishing email works"]


def reference_edit(weight: torch.Tensor, basis: torch.Tensor, axis: int, mode: str, strength: float) -> torch.Tensor:
    """Vector by vector in float64: w − s QᵀQ w, renormalised to ‖w‖ (and projected again at s = 1)."""
    q = basis.double()
    projector = torch.eye(q.shape[1], dtype=torch.float64) - strength * q.T @ q
    w = weight.double() if axis == 0 else weight.double().T
    out = projector @ w
    if mode == "norm-preserving":
        out = out / out.norm(dim=0, keepdim=True) * w.norm(dim=0, keepdim=True)
        if strength == 1.0:
            out = out - q.T @ (q @ out)
    return out if axis == 0 else out.T


def random_basis(k: int, d: int, seed: int) -> torch.Tensor:
    return orthonormal_rows(torch.randn(k, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))


def test_orthonormal_rows_keep_the_first_direction_and_refuse_dependent_rows():
    g = torch.Generator().manual_seed(0)
    vectors = torch.randn(3, 20, generator=g, dtype=torch.float64)
    q = orthonormal_rows(vectors)
    torch.testing.assert_close(q @ q.T, torch.eye(3, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(q[0], vectors[0] / vectors[0].norm())
    with pytest.raises(ValueError, match="span"):
        orthonormal_rows(torch.stack([vectors[0], vectors[1], vectors[0] - 2 * vectors[1]]))


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("mode", ["project", "norm-preserving"])
@pytest.mark.parametrize("k,strength", [(1, 0.4), (2, 1.0), (3, 0.7), (2, 0.0), (1, 1.4), (2, 1.5)])
def test_subspace_and_strength_match_float64_reference(axis, mode, k, strength):
    g = torch.Generator().manual_seed(10 * k + axis)
    d, other = 24, 37
    weight = torch.randn((d, other) if axis == 0 else (other, d), generator=g)
    basis = random_basis(k, d, seed=k)
    edited = edit_tensor(weight, basis.float(), axis, mode, strength=strength).double()
    torch.testing.assert_close(edited, reference_edit(weight, basis, axis, mode, strength), atol=2e-5, rtol=1e-5)
    if strength == 1.0:  # nothing is written inside the subspace
        assert (edited.movedim(axis, -1) @ basis.T).abs().max() < 1e-5
    if mode == "norm-preserving":
        torch.testing.assert_close(edited.norm(dim=axis), weight.double().norm(dim=axis), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("k,strength", [(1, 0.3), (3, 1.0), (2, 0.8), (2, 1.3)])
def test_hook_twin_reproduces_the_partial_norm_preserving_edit(k, strength):
    g = torch.Generator().manual_seed(11)
    weight = torch.randn(24, 40, generator=g, dtype=torch.float64)
    bias = torch.randn(24, generator=g, dtype=torch.float64)
    x = torch.randn(6, 40, generator=g, dtype=torch.float64)
    basis = random_basis(k, 24, seed=5)
    hooked = project_out((x * input_scale(weight, basis, 0, strength)) @ weight.T + bias, basis, 1, strength)
    edited = x @ edit_tensor(weight, basis, 0, "norm-preserving", compute_dtype=torch.float64, strength=strength).T
    edited = edited + edit_tensor(
        bias, basis, 0, "norm-preserving", is_bias=True, compute_dtype=torch.float64, strength=strength
    )
    torch.testing.assert_close(hooked, edited, atol=1e-10, rtol=1e-10)


def strengths_for(layers: int, seed: int) -> Strengths:
    """Random strengths in [0, 1.5]: partial and overshooting (> 1, as the search may choose) alike."""
    g = torch.Generator().manual_seed(seed)
    return Strengths(
        0.6,
        tuple((1.5 * torch.rand(layers, generator=g)).tolist()),
        tuple((1.5 * torch.rand(layers, generator=g)).tolist()),
    )


@pytest.mark.parametrize("mode", ["norm-preserving", "project"])
@pytest.mark.parametrize("rank,partial", [(2, False), (1, True), (3, True)])
def test_apply_writes_the_plan_exactly_and_verify_matches_its_hook_twin(tmp_path, chat_tokenizer, mode, rank, partial):
    source = build_tiny_model(tmp_path / "src", chat_tokenizer, bias=True, tie=True, layers=3)
    g = torch.Generator().manual_seed(rank)
    direction = torch.randn(32, generator=g)
    subspace = torch.cat([direction.unsqueeze(0), torch.randn(rank - 1, 32, generator=g)]) if rank > 1 else None
    strengths = strengths_for(3, seed=rank) if partial else None
    result = apply_direction(
        Checkpoint(source), direction, tmp_path / "out", mode=mode, subspace=subspace, strengths=strengths
    )
    plan = EditPlan.build(direction, 3, subspace=subspace, strengths=strengths)
    before, after = Checkpoint(source), Checkpoint(tmp_path / "out")
    for name in result.edited_tensors:
        kind_layer = (
            ("embedding", None)
            if "embed" in name
            else ("attention" if "o_proj" in name else "mlp", int(name.split(".")[2]))
        )
        s = (
            (strengths.embedding if kind_layer[1] is None else getattr(strengths, kind_layer[0])[kind_layer[1]])
            if strengths
            else 1.0
        )
        weight = before.read(name)
        axis = 1 if "embed" in name else 0
        if weight.ndim == 1:
            expected = reference_edit(weight.unsqueeze(1), plan.basis, 0, "project", s).squeeze(1)
        else:
            expected = reference_edit(weight, plan.basis, axis, mode, s)
        torch.testing.assert_close(after.read(name).double(), expected, atol=3e-5, rtol=1e-5)
    provenance = json.loads((tmp_path / "out" / PROVENANCE_FILE).read_text())
    assert (provenance["subspace"] or {}).get("rank", 1) == rank
    assert (provenance["strengths"] is not None) == partial
    report = verify_checkpoint(tmp_path / "out", PROMPTS, settings.VERIFY_TOLERANCES, new_tokens=4)
    assert report.passed, report.failures
    assert report.checks["rank"] == rank
    assert report.guarantee == ("hook-exact-strengths" if partial else "hook-exact")
    assert report.metrics["max_abs_logit"] < 1e-3
    if not partial:
        assert report.metrics["direction_component"] < 1e-4  # the whole subspace is gone from the residual stream
        if mode == "project":
            assert report.metrics["paper_ablation_max_abs_logit"] < 1e-3


def test_verify_catches_strengths_edited_in_the_provenance(tmp_path, chat_tokenizer):
    source = build_tiny_model(tmp_path / "src", chat_tokenizer, layers=2)
    direction = torch.randn(32, generator=torch.Generator().manual_seed(3))
    apply_direction(Checkpoint(source), direction, tmp_path / "out", strengths=Strengths(1.0, (0.2, 0.9), (0.5, 0.1)))
    path = tmp_path / "out" / PROVENANCE_FILE
    provenance = json.loads(path.read_text())
    provenance["strengths"]["mlp"] = [1.0, 1.0]
    write_provenance(tmp_path / "out", provenance)
    report = verify_checkpoint(tmp_path / "out", PROMPTS, settings.VERIFY_TOLERANCES, new_tokens=4)
    assert not report.passed


@pytest.mark.parametrize(
    "data,message",
    [
        ({"embedding": 1.0, "attention": [1.0]}, "exactly"),
        ({"embedding": 1.0, "attention": [1.0], "mlp": [1.0, 1.0]}, "one strength per layer"),
        ({"embedding": -0.1, "attention": [1.0, 1.0], "mlp": [1.0, 1.0]}, "embedding is -0.1"),
        ({"embedding": 1.0, "attention": [1.0, float("nan")], "mlp": [1.0, 1.0]}, r"attention\[1\]"),
    ],
)
def test_malformed_strengths_are_refused(data, message):
    with pytest.raises(PlanError, match=message):
        Strengths.from_dict(data, 2)


def test_subspace_for_another_direction_is_refused():
    g = torch.Generator().manual_seed(4)
    with pytest.raises(PlanError, match="another direction"):
        EditPlan.build(torch.randn(16, generator=g), 2, subspace=torch.randn(2, 16, generator=g))


def test_partial_strength_is_refused_where_no_guarantee_holds(tmp_path, chat_tokenizer):
    source = build_tiny_model(tmp_path / "src", chat_tokenizer, model_type="gemma2", layers=2)
    with pytest.raises(PlanError, match="not supported"):
        apply_direction(
            Checkpoint(source), torch.randn(32), tmp_path / "out", strengths=Strengths(1.0, (0.5, 0.5), (1.0, 1.0))
        )
    assert not (tmp_path / "out").exists()
