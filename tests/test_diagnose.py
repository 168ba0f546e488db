"""Generalization diagnostics: pure functions on planted activations, per-prompt collection on a tiny model."""

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors import safe_open

import settings
from weight_edit import diagnose as diag
from weight_edit.activations import tokenized_batches
from weight_edit.chat import post_instruction_ids
from weight_edit.dataset import load_dataset, split_dataset
from weight_edit.models import load_model

D = 48


def planted(
    directions_by_area: dict[str, torch.Tensor],
    held_out: set[str],
    per_label: int = 6,
    noise: float = 0.0,
    paired_noise: float = 1.0,
    seed: int = 0,
) -> diag.PromptActivations:
    """safe_i = base_area + e_i (+ small noise), unsafe_i = base_area + e_i + r_area (+ small noise).

    With noise=0 every area's diff-in-means equals its planted r exactly (the shared e_i cancels).
    Fit areas get 2/3 of their prompts as "train" and 1/3 as "validation"; held-out areas "held_out".
    """
    g = torch.Generator().manual_seed(seed)
    rows, areas, labels, parts = [], [], [], []
    for area, r in directions_by_area.items():
        base = 5 * torch.randn(D, generator=g, dtype=torch.float64)
        for i in range(per_label):
            shared = paired_noise * torch.randn(D, generator=g, dtype=torch.float64)
            part = "held_out" if area in held_out else ("train" if i < 2 * per_label // 3 else "validation")
            for label, shift in (("safe", 0.0), ("unsafe", 1.0)):
                rows.append(base + shared + shift * r + noise * torch.randn(D, generator=g, dtype=torch.float64))
                areas.append(area)
                labels.append(label)
                parts.append(part)
    return diag.PromptActivations(torch.stack(rows), tuple(areas), tuple(labels), tuple(parts))


def unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm()


@pytest.fixture
def one_direction():
    r = 3 * unit(torch.randn(D, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    names = [f"area{i:02d}" for i in range(12)]
    held = set(names[-3:])
    return r, names, held


def test_planted_shared_direction_gives_cosines_pca_and_budget_near_one(one_direction):
    r, names, held = one_direction
    acts = planted({a: r for a in names}, held, noise=0.05)
    fit = [a for a in names if a not in held]
    result = diag.diagnose(acts, fit, sorted(held), r, layer=3, position=-2, seed=7)
    assert result.areas == names
    assert result.cosines.shape == (12, 12)
    assert result.cosines.min() > 0.97
    torch.testing.assert_close(result.cosines.diagonal(), torch.ones(12, dtype=torch.float64))
    assert result.pca.explained_variance_ratio[0] > 0.97
    assert math.isclose(sum(result.pca.explained_variance_ratio), 1.0, rel_tol=1e-9)
    assert result.first_component_vs_fitted > 0.99
    assert min(result.fitted_cosines.values()) > 0.97
    assert result.fitted_vs_held_out > 0.99
    assert result.fitted_vs_recomputed > 0.99
    assert [row["n_areas"] for row in result.budget_summary] == [2, 4, 6, 8, 9]
    assert all(row["mean"] > 0.98 for row in result.budget_summary)
    assert torch.allclose(result.subspace[0], unit(r))


def test_independent_noise_lowers_the_cosines():
    """Control: without a planted direction the same statistics are far from 1 (the tests above can fail)."""
    names = [f"area{i}" for i in range(8)]
    zero = torch.zeros(D, dtype=torch.float64)
    acts = planted({a: zero for a in names}, set(names[-2:]), noise=1.0)
    _, directions = diag.area_directions(acts)
    off = diag.cosine_matrix(directions)[~torch.eye(8, dtype=torch.bool)]
    assert off.abs().max() < 0.8
    assert diag.principal_components(directions).explained_variance_ratio[0] < 0.5


def test_two_orthogonal_planted_directions_exactly():
    g = torch.Generator().manual_seed(2)
    q, _ = torch.linalg.qr(torch.randn(D, 2, generator=g, dtype=torch.float64))
    r1, r2 = 2 * q[:, 0], 2 * q[:, 1]
    group_a = [f"a{i}" for i in range(4)]
    group_b = [f"b{i}" for i in range(4)]
    held = {"a3", "b2", "b3"}  # held-out direction = (r1 + 2 r2) / 3
    acts = planted({**{a: r1 for a in group_a}, **{b: r2 for b in group_b}}, held)
    names, directions = diag.area_directions(acts)
    assert names == sorted(group_a + group_b)
    cos = diag.cosine_matrix(directions)
    for i, x in enumerate(names):
        for j, y in enumerate(names):
            expected = 1.0 if x[0] == y[0] else 0.0
            assert abs(float(cos[i, j]) - expected) < 1e-9, (x, y)
    pca = diag.principal_components(directions)
    assert pca.explained_variance_ratio[:2] == pytest.approx([0.5, 0.5], abs=1e-9)
    assert sum(pca.explained_variance_ratio[2:]) < 1e-12
    # The two components span {r1, r2}.
    basis = pca.components[:2]
    for r in (r1, r2):
        assert float((basis @ unit(r)).norm()) == pytest.approx(1.0, abs=1e-9)

    fit = sorted(set(names) - held)  # a0 a1 a2 b0 b1
    points = diag.budget_curve(acts, fit, sorted(held), sizes=(2, 3), repeats=4, seed=3)
    target = unit(r1 + 2 * r2)
    for p in points:
        count_a = sum(a.startswith("a") for a in p.areas)
        expected = float(unit(count_a * r1 + (len(p.areas) - count_a) * r2) @ target)
        assert p.cosine == pytest.approx(expected, abs=1e-9)
    assert {p.n_areas for p in points} == {2, 3, 5}


def test_budget_subsets_are_distinct_seeded_and_bounded(one_direction):
    r, names, held = one_direction
    acts = planted({a: r for a in names}, held, noise=0.05)
    fit = [a for a in names if a not in held]  # 9 areas
    points = diag.budget_curve(acts, fit, sorted(held), sizes=(2, 8, 20), repeats=5, seed=11)
    assert [p.n_areas for p in points] == [2] * 5 + [8] * 5 + [9]  # 20 > 9 skipped; all 9 added once
    for size in (2, 8):
        subsets = [p.areas for p in points if p.n_areas == size]
        assert len(set(subsets)) == 5
        assert all(len(s) == size and set(s) <= set(fit) for s in subsets)
    again = diag.budget_curve(acts, fit, sorted(held), sizes=(2, 8, 20), repeats=5, seed=11)
    assert [p.areas for p in again] == [p.areas for p in points]
    other = diag.budget_curve(acts, fit, sorted(held), sizes=(2, 8, 20), repeats=5, seed=12)
    assert [p.areas for p in other] != [p.areas for p in points]
    # Fewer distinct subsets than repeats: all of them, once each.
    few = diag.budget_curve(acts, fit[:3], sorted(held), sizes=(2,), repeats=5)
    assert sorted(p.areas for p in few if p.n_areas == 2) == sorted(
        tuple(sorted(s)) for s in ((fit[0], fit[1]), (fit[0], fit[2]), (fit[1], fit[2]))
    )


def test_summarise_budget_mean_and_sample_sd():
    points = [diag.BudgetPoint(2, i, ("x", "y"), c) for i, c in enumerate((0.5, 0.7, 0.9))]
    points.append(diag.BudgetPoint(4, 0, ("w", "x", "y", "z"), 0.95))
    rows = diag.summarise_budget(points)
    assert rows[0] == pytest.approx({"n_areas": 2, "subsets": 3, "mean": 0.7, "sd": 0.2, "min": 0.5, "max": 0.9})
    assert rows[1]["sd"] == 0.0 and rows[1]["subsets"] == 1


def test_refusal_subspace_is_orthonormal_nested_and_matches_a_numpy_reference():
    g = torch.Generator().manual_seed(5)
    areas = torch.randn(7, D, generator=g, dtype=torch.float64) * torch.linspace(1, 3, 7, dtype=torch.float64)[:, None]
    fitted = torch.randn(D, generator=g, dtype=torch.float64)
    basis = diag.refusal_subspace(areas, fitted, 5)
    assert basis.shape == (5, D) and basis.dtype == torch.float64
    torch.testing.assert_close(basis @ basis.T, torch.eye(5, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(basis[0], unit(fitted), atol=1e-12, rtol=0)
    torch.testing.assert_close(diag.refusal_subspace(areas, fitted, 3), basis[:3], atol=1e-12, rtol=0)
    # Independent reference: numpy SVD of the unit area directions with r̂ projected out.
    r = unit(fitted).numpy()
    a = areas.numpy() / np.linalg.norm(areas.numpy(), axis=1, keepdims=True)
    a = a - np.outer(a @ r, r)
    _, _, vt = np.linalg.svd(a)
    for k in range(1, 5):  # each component up to sign
        assert abs(float(basis[k].numpy() @ vt[k - 1])) == pytest.approx(1.0, abs=1e-9)
    assert diag.subspace_rank_limit(areas, fitted) == 8
    with pytest.raises(ValueError, match="rank 9"):
        diag.refusal_subspace(areas, fitted, 9)


def test_refusal_subspace_edge_cases():
    r = torch.zeros(D, dtype=torch.float64)
    r[0] = 2.0
    parallel = torch.stack([r, -3 * r])
    assert diag.subspace_rank_limit(parallel, r) == 1
    torch.testing.assert_close(diag.refusal_subspace(parallel, r, 1), unit(r)[None])
    with pytest.raises(ValueError):
        diag.refusal_subspace(parallel, r, 2)
    with pytest.raises(ValueError):
        diag.refusal_subspace(parallel, torch.zeros(D), 1)
    with pytest.raises(ValueError):
        diag.refusal_subspace(parallel, r, 0)


def test_contrast_needs_both_labels(one_direction):
    r, names, held = one_direction
    acts = planted({a: r for a in names}, held)
    with pytest.raises(ValueError, match="both unsafe and safe"):
        diag.contrast(acts, ["no_such_area"])


def test_save_diagnostics_writes_tables_and_tensors(tmp_path, one_direction):
    r, names, held = one_direction
    acts = planted({a: r for a in names}, held, noise=0.05)
    result = diag.diagnose(acts, [a for a in names if a not in held], sorted(held), r, 3, -2, max_rank=4)
    paths = diag.save_diagnostics(result, tmp_path / "out")
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths)
    header = (tmp_path / "out" / diag.COSINES_CSV).read_text().splitlines()[0]
    assert header == ",".join(["area", *names])
    summary = json.loads((tmp_path / "out" / diag.SUMMARY_JSON).read_text())
    assert summary["layer"] == 3 and summary["subspace_rank"] == 4
    with safe_open(str(tmp_path / "out" / diag.SUBSPACE_FILE), "pt") as f:
        subspace = f.get_tensor("subspace")
        assert list(f.keys()) == ["subspace"]
    assert subspace.shape == (4, D) and subspace.dtype == torch.float32
    torch.testing.assert_close(subspace @ subspace.T, torch.eye(4), atol=1e-6, rtol=0)
    with safe_open(str(tmp_path / "out" / diag.AREA_DIRECTIONS_FILE), "pt") as f:
        assert f.get_tensor("directions").shape == (12, D)
        assert json.loads(f.metadata()["areas"]) == names


# --- on a tiny model -------------------------------------------------------------------------------


def small_split(per_label: int = 2):
    """The real split, cut to a few prompts per area, label and part (fast on a tiny model)."""
    split = split_dataset(
        load_dataset(settings.DEFAULT_DATASET),
        settings.SEED,
        settings.HELD_OUT_AREAS,
        settings.VALIDATION_FRACTION,
        settings.MIN_FIT_AREAS,
    )

    def cut(prompts):
        kept, seen = [], {}
        for p in prompts:
            key = (p.category, p.label)
            if seen.get(key, 0) < per_label:
                kept.append(p)
                seen[key] = seen.get(key, 0) + 1
        return tuple(kept)

    return replace(split, train=cut(split.train), validation=cut(split.validation), held_out=cut(split.held_out))


def test_prompt_residuals_match_unbatched_hidden_states(tiny_model):
    model, tokenizer = load_model(tiny_model, dtype="float32")
    texts = [p.text for p in small_split().train[:5]]
    suffix = post_instruction_ids(tokenizer)
    prepared = tokenized_batches(tokenizer, texts, 2, "cpu", suffix)  # padded batches of 2, 2, 1
    got = diag.prompt_residuals(model, prepared, layer=1, position=-2)
    expected = []
    with torch.no_grad():
        for text in texts:
            ids = tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, return_tensors="pt", return_dict=True
            )["input_ids"]
            expected.append(model(input_ids=ids, output_hidden_states=True).hidden_states[1][0, -2])
    assert got.shape == (5, 32)
    torch.testing.assert_close(got, torch.stack(expected), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(got, diag.prompt_residuals(model, prepared, layer=0, position=-2))


def test_run_diagnostics_end_to_end_on_a_tiny_model(tiny_model, tmp_path):
    model, tokenizer = load_model(tiny_model, dtype="float32")
    split = small_split()
    acts = diag.collect_activations(model, tokenizer, split, 1, -1, batch_size=16)
    policy = [p for part in (split.train, split.validation, split.held_out) for p in part if p.label != "harmless"]
    assert acts.activations.shape == (len(policy), 32)  # the policy areas' prompts; harmless ones belong to none
    assert acts.parts.count("held_out") == sum(p.label != "harmless" for p in split.held_out)
    assert set(acts.areas) == set(split.fit_areas) | set(split.held_out_areas)
    # The fit direction, as `fit` would compute it: pooled train prompts of the fit areas.
    fitted = diag.contrast(acts, split.fit_areas, ("train",)).float()
    result = diag.run_diagnostics(model, tokenizer, split, 1, -1, fitted, batch_size=16, seed=1)
    assert result.fitted_vs_recomputed == pytest.approx(1.0, abs=1e-5)
    assert len(result.areas) == 14 and result.cosines.shape == (14, 14)
    assert [row["n_areas"] for row in result.budget_summary] == [2, 4, 6, 8, 10]
    assert result.subspace.shape[0] >= 2
    assert diag.save_diagnostics(result, tmp_path / "diag")
    with pytest.raises(ValueError, match="position"):
        diag.collect_activations(model, tokenizer, split, 1, -50, batch_size=16)
    with pytest.raises(ValueError, match="layer"):
        diag.collect_activations(model, tokenizer, split, 5, -1, batch_size=16)
