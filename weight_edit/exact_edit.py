"""The edit before rounding: what `apply` computed in float32, recomputed from the source for `verify`.

A checkpoint stored in bfloat16 differs from its float32 hook twin by one rounding of every edited tensor. Where
every write passes a norm before the residual add (Gemma's sandwich norms) that rounding reaches the logits
amplified: on real Gemma-3-270M weights a correct bfloat16 edit already moves a logit by up to 0.75, and 42 random
Gemma-4-E4B layers move one by 3.3. The stored model's distance to the twin then measures the storage dtype as
much as the edit, so `verify` splits the claim into two exact checks:

- `compare_stored`: every edited tensor on disk is the float32 edit of its source tensor rounded once to the
  stored dtype (at most one unit in the last place apart; float32 arithmetic order may turn a tie);
- `place_exact`: the float32 edit, written into the loaded edited model, matches the hook twin at float32
  tolerance (the mathematics and the choice of tensors).

The stored checkpoint's own distance to the twin is then the rounding's effect, reported beside them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from weight_edit.architecture import EditTarget
from weight_edit.checkpoint import Checkpoint
from weight_edit.edit_math import EditMode, edited_pieces
from weight_edit.edit_plan import EditPlan

# Significand bits (the implicit one included) of each stored float dtype: one unit in the last place of x is
# 2 ** (exponent(x) - bits), with x = m * 2 ** exponent(x), 0.5 <= |m| < 1.
SIGNIFICAND_BITS = {torch.bfloat16: 8, torch.float16: 11, torch.float32: 24}
# float32 arithmetic in another order (apply edits in blocks and threads) moves an element by a few float32 units
# of the tensor's largest value; this much is allowed on top of one unit of the stored dtype.
ARITHMETIC_SLACK = 2.0**-20


def exact_pieces(
    source: Checkpoint, plan: EditPlan, targets: list[EditTarget], mode: EditMode
) -> Iterator[tuple[EditTarget, int, torch.Tensor]]:
    """Each target's edit in float32, as `apply` computes it before rounding: (target, first row along the leading
    axis, piece). Pieces are blocks of whole residual vectors (weight_edit.edit_math.edited_pieces), upcast block by
    block, so no float32 copy of a whole embedding is held."""
    from weight_edit.writer import WriterBases

    bases = WriterBases(plan, source)
    for target in targets:
        rows, strength = bases(target)
        weight = source.read(target.tensor)
        start = 0
        for piece in edited_pieces(
            weight, rows, target.residual_axis, mode, target.is_bias, strength=strength, out_dtype=torch.float32
        ):
            yield target, start, piece
            start += piece.shape[0] if piece.ndim else 1


CHUNK = 1 << 22  # elements compared at a time (each comparison holds a few float32 copies of its chunk)


def units_in_last_place(stored: torch.Tensor, exact: torch.Tensor) -> float:
    """How far the stored tensor is from `exact` rounded to the stored dtype, in units in the last place of the
    stored dtype (0: the correctly rounded value everywhere), net of float32 arithmetic-order slack; computed in
    chunks."""
    bits = SIGNIFICAND_BITS.get(stored.dtype)
    if bits is None:
        raise ValueError(f"no rounding rule for stored dtype {stored.dtype}")
    if not exact.numel():
        return 0.0
    finfo = torch.finfo(stored.dtype)
    slack = ARITHMETIC_SLACK * float(exact.abs().max())
    stored_flat, exact_flat = stored.reshape(-1), exact.reshape(-1)
    worst = 0.0
    for start in range(0, exact_flat.numel(), CHUNK):
        rounded = exact_flat[start : start + CHUNK].to(stored.dtype).float()
        _, exponent = torch.frexp(rounded)
        ulp = torch.ldexp(torch.ones_like(rounded), exponent - bits).clamp_min(finfo.smallest_normal * finfo.eps)
        excess = ((stored_flat[start : start + CHUNK].float() - rounded).abs() - slack).clamp_min(0.0) / ulp
        worst = max(worst, float(excess.max()))
    return worst


@dataclass
class StoredComparison:
    """The edited tensors on disk against the float32 edit of the source."""

    tensors: int
    max_ulp: float  # worst tensor, in units in the last place of the stored dtype
    worst: str  # the tensor that reached it
    placed: bool  # whether the float32 edit replaced the loaded model's parameters
    not_placed: str = ""  # why not (then the stored model is what runs)


def compare_stored(
    source: Checkpoint,
    edited: Checkpoint,
    plan: EditPlan,
    targets: list[EditTarget],
    mode: EditMode,
    model: torch.nn.Module | None = None,
) -> StoredComparison:
    """Compare every edited tensor on disk with the float32 edit, piece by piece; with `model` (the edited
    checkpoint, loaded in float32), also put the float32 edit in place of each edited parameter where it can be
    found unambiguously."""
    reason = _why_not_placeable(model, targets) if model is not None else "no model given"
    worst, max_ulp = "", 0.0
    stored, stored_name = None, None
    for target, start, piece in exact_pieces(source, plan, targets, mode):
        if stored_name != target.tensor:
            stored, stored_name = edited.read(target.tensor), target.tensor
            if stored.shape != edited_shape(source, target):
                raise ValueError(f"'{target.tensor}' is {tuple(stored.shape)} on disk, not the source's shape")
        rows = slice(start, start + piece.shape[0]) if piece.ndim else slice(None)
        ulp = units_in_last_place(stored[rows], piece)
        if ulp >= max_ulp:
            worst, max_ulp = target.tensor, ulp
        if not reason:
            parameter = _parameter(model, target)
            parameter.data[rows].copy_(piece.to(parameter.device, parameter.dtype))
    return StoredComparison(len(targets), max_ulp, worst, placed=not reason, not_placed=reason)


def edited_shape(source: Checkpoint, target: EditTarget) -> torch.Size:
    """The shape of the float tensor `apply` writes for a target (a quantized source's dequantized shape)."""
    quantized = source.quantized.get(target.tensor)
    return torch.Size(quantized.shape if quantized is not None else source.info(target.tensor).shape)


def _parameter(model: torch.nn.Module, target: EditTarget) -> torch.nn.Parameter:
    module = model.get_submodule(target.module)
    return module.bias if target.is_bias else module.weight


def _why_not_placeable(model: torch.nn.Module, targets: list[EditTarget]) -> str:
    """Why the float32 edit cannot be written into the model's parameters ("" when it can): a fused block's
    in-memory layout is not the on-disk one, an offloaded parameter has no storage, and a parameter shared with
    the output embedding would edit the unembedding too."""
    output = model.get_output_embeddings()
    unembedding = output.weight if output is not None else None
    for target in targets:
        if target.hook != "module":
            return f"'{target.tensor}' is edited inside a fused block (its in-memory layout is not the on-disk one)"
        parameter = _parameter(model, target)
        if parameter is None or parameter.is_meta:
            return f"'{target.module}' is offloaded or has no {'bias' if target.is_bias else 'weight'}"
        if unembedding is not None and parameter is unembedding:
            return f"'{target.tensor}' is tied to the output embedding in memory"
    return ""
