import pytest
import torch
from conftest import build_tiny_model

from weight_edit.architecture import architecture_for
from weight_edit.checkpoint import Checkpoint
from weight_edit.edit_plan import EditPlan
from weight_edit.exact_edit import compare_stored, exact_pieces, units_in_last_place
from weight_edit.models import load_model
from weight_edit.writer import apply_direction


def test_units_in_last_place_counts_bfloat16_steps():
    exact = torch.tensor([1.0, -3.0, 0.75, 1000.0, 1e-30])
    rounded = exact.to(torch.bfloat16)
    assert units_in_last_place(rounded, exact) == 0.0
    one_up = (rounded.float() * (1 + 2.0**-7)).to(torch.bfloat16)  # one bfloat16 unit above 1.0 is 2**-7
    assert units_in_last_place(one_up[:1], exact[:1]) == pytest.approx(1.0, abs=1e-3)
    assert units_in_last_place((rounded.float() * 1.05).to(torch.bfloat16), exact) > 5


def test_units_in_last_place_allows_float32_arithmetic_order_only():
    exact = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    reordered = exact + exact.abs().max() * 2.0**-23 * torch.randn(1000, generator=torch.Generator().manual_seed(1))
    assert units_in_last_place(reordered, exact) == 0.0
    assert units_in_last_place(exact * (1 + 1e-4), exact) > 1


def float64_edit(weight: torch.Tensor, r: torch.Tensor, axis: int) -> torch.Tensor:
    """Independent reference for project mode: W - r̂ (r̂ᵀ W) along the residual axis, in float64."""
    r = (r / r.norm()).double()
    moved = weight.double().movedim(axis, -1)
    return (moved - (moved @ r).unsqueeze(-1) * r).movedim(-1, axis)


def exact_edits(source, plan, targets, mode):
    """Each target's whole float32 edit, joined from `exact_pieces` (verify itself works piece by piece)."""
    whole: dict[str, list[torch.Tensor]] = {}
    order = []
    for target, _, piece in exact_pieces(source, plan, targets, mode):
        if target.tensor not in whole:
            order.append(target)
        whole.setdefault(target.tensor, []).append(piece)
    for target in order:
        pieces = whole[target.tensor]
        yield target, pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def edited_tiny(tmp_path, tokenizer, mode: str, seed: int, tie: bool = False):
    """A bfloat16 tiny model edited by `apply`: the source, its edit targets and plan, and the output folder."""
    source = Checkpoint(build_tiny_model(tmp_path / "src", tokenizer, dtype=torch.bfloat16, tie=tie))
    direction = torch.randn(32, generator=torch.Generator().manual_seed(seed))
    out = apply_direction(source, direction, tmp_path / "out", mode=mode).out
    arch = architecture_for(source.config)
    targets = arch.targets(source.config, source.tensor_names, shapes=source.shapes)
    return source, direction, targets, EditPlan.build(direction, arch.num_layers(source.config)), out


def test_exact_edits_are_the_float64_projection_and_the_stored_ones_their_rounding(tmp_path, chat_tokenizer):
    source, direction, targets, plan, _ = edited_tiny(tmp_path, chat_tokenizer, "project", 3)
    for target, exact in exact_edits(source, plan, targets, "project"):
        assert exact.dtype == torch.float32
        reference = float64_edit(source.read(target.tensor), direction, target.residual_axis)
        torch.testing.assert_close(exact.double(), reference, atol=1e-6, rtol=1e-5)
    model, _ = load_model(tmp_path / "out", dtype="float32")
    comparison = compare_stored(source, Checkpoint(tmp_path / "out"), plan, targets, "project", model)
    assert comparison.placed and comparison.max_ulp == 0.0 and comparison.tensors == len(targets)
    exact = dict(exact_edits(source, plan, targets, "project"))
    for target in targets:
        parameter = model.get_submodule(target.module).weight
        assert torch.equal(parameter.detach(), exact[target])


def test_a_tied_parameter_is_not_overwritten(tmp_path, chat_tokenizer):
    """With embeddings tied in memory, writing the edited embedding would edit the unembedding too."""
    source, _, targets, plan, _ = edited_tiny(tmp_path, chat_tokenizer, "norm-preserving", 5, tie=True)
    model, _ = load_model(source.folder, dtype="float32")  # the source: tied in memory
    before = model.get_output_embeddings().weight.detach().clone()
    comparison = compare_stored(source, Checkpoint(tmp_path / "out"), plan, targets, "norm-preserving", model)
    assert not comparison.placed and "tied to the output embedding" in comparison.not_placed
    assert torch.equal(model.get_output_embeddings().weight, before)


def test_pieces_and_chunks_give_the_whole_tensor_result(tmp_path, chat_tokenizer, monkeypatch):
    """Verify edits and compares in blocks of residual vectors and chunks of elements (bounded memory on a large
    embedding); small blocks must place and compare exactly what the whole-tensor edit gives."""
    import functools

    import weight_edit.exact_edit as exact_edit
    from weight_edit.edit_math import edited_pieces

    source, _, targets, plan, _ = edited_tiny(tmp_path, chat_tokenizer, "norm-preserving", 4)
    whole = {t.tensor: e for t, e in exact_edits(source, plan, targets, "norm-preserving")}
    monkeypatch.setattr(exact_edit, "edited_pieces", functools.partial(edited_pieces, max_elements=100))
    monkeypatch.setattr(exact_edit, "CHUNK", 37)
    assert sum(1 for _ in exact_edit.exact_pieces(source, plan, targets, "norm-preserving")) > 2 * len(targets)
    model, _ = load_model(tmp_path / "out", dtype="float32")
    comparison = compare_stored(source, Checkpoint(tmp_path / "out"), plan, targets, "norm-preserving", model)
    assert comparison.placed and comparison.max_ulp == 0.0
    for target in targets:
        torch.testing.assert_close(model.get_submodule(target.module).weight.detach(), whole[target.tensor])
