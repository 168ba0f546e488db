"""`verify`: an `apply`d checkpoint equals hook-based ablation on the source; tampering is caught."""

import pytest
import torch
from conftest import build_tiny_model

import settings
from weight_edit.checkpoint import Checkpoint
from weight_edit.verify import VerifyError, verify_checkpoint
from weight_edit.writer import apply_direction

PROMPTS = [
    "How do banks detect money laundering?",
    "Explain how a phishing email works",
    "Tell me a joke",
    "What is a lock?",
]


@pytest.mark.parametrize("mode", ["norm-preserving", "project"])
@pytest.mark.parametrize("tie,bias", [(True, True), (False, False)])
def test_edited_checkpoint_matches_hooks(tmp_path, chat_tokenizer, mode, tie, bias):
    source = build_tiny_model(tmp_path / "src", chat_tokenizer, tie=tie, bias=bias, layers=3)
    apply_direction(Checkpoint(source), torch.randn(32), tmp_path / "out", mode=mode)
    report = verify_checkpoint(tmp_path / "out", PROMPTS, settings.VERIFY_TOLERANCES, new_tokens=6)
    assert report.passed, report.failures
    assert report.guarantee == "hook-exact"
    assert report.metrics["max_abs_logit"] < 1e-3
    assert report.metrics["direction_component"] < 1e-4
    if mode == "project":  # the paper's residual-stream ablation is the same model on pre-norm blocks
        assert report.metrics["paper_ablation_max_abs_logit"] < 1e-3


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3", "mistral"])
@pytest.mark.parametrize("mode", ["norm-preserving", "project"])
def test_other_llama_named_families(tmp_path, chat_tokenizer, model_type, mode):
    source = build_tiny_model(tmp_path / "src", chat_tokenizer, model_type=model_type, tie=False)
    result = apply_direction(Checkpoint(source), torch.randn(32), tmp_path / "out", mode=mode)
    assert not any("q_proj" in name for name in result.edited_tensors)
    report = verify_checkpoint(tmp_path / "out", PROMPTS, settings.VERIFY_TOLERANCES, new_tokens=4)
    assert report.passed, report.failures
    assert report.metrics["max_abs_logit"] < 1e-3


def test_bfloat16_checkpoint_passes_its_tolerance(tmp_path, chat_tokenizer):
    """This edit is correct, but bfloat16 rounding flips near-ties (source top-2 gaps below 0.01) at 5 of 111
    positions: raw top-1 agreement 0.955 < 0.97. Only flips beyond the dtype's margin count."""
    source = build_tiny_model(tmp_path / "src", chat_tokenizer, dtype=torch.bfloat16)
    apply_direction(Checkpoint(source), torch.randn(32, generator=torch.Generator().manual_seed(5)), tmp_path / "out")
    report = verify_checkpoint(tmp_path / "out", PROMPTS, settings.VERIFY_TOLERANCES, new_tokens=4)
    assert report.stored_dtype == "bfloat16" and report.passed, report.failures
    assert report.metrics["top1_raw"] < settings.VERIFY_TOLERANCES["bfloat16"]["top1"]  # the near-ties did flip
    assert report.metrics["top1"] == 1.0 and 0 < report.metrics["top1_positions"] < 111
    assert report.tolerances["top1_margin"] > 0


def test_top1_agreement_counts_only_flips_beyond_the_margin():
    from weight_edit.verify import top1_agreement

    reference = torch.tensor([[2.0, 1.99, 0.0], [3.0, 1.0, 0.0], [0.0, 5.0, 4.0], [0.5, 0.45, 0.0]])
    near_tie_only = reference[:, [1, 0, 2]].clone()  # row 0 (gap 0.01) flips; so would every row ...
    near_tie_only[1:] = reference[1:]  # ... but rows 1-3 stay as they were
    assert top1_agreement(reference, near_tie_only, 0.1) == {"top1": 1.0, "top1_raw": 0.75, "top1_positions": 2.0}
    clear_flip = near_tie_only.clone()
    clear_flip[2] = torch.tensor([0.0, 4.0, 5.0])  # row 2 (gap 1.0) flips too
    assert top1_agreement(reference, clear_flip, 0.1) == {"top1": 0.5, "top1_raw": 0.5, "top1_positions": 2.0}
    assert top1_agreement(reference, clear_flip, 0.0)["top1"] == 0.5  # no margin: the raw agreement
    assert top1_agreement(reference, clear_flip, 5.0) == {"top1": 1.0, "top1_raw": 0.5, "top1_positions": 0.0}


def wrong_edit(tmp_path, tokenizer, dtype, kind: str, size: float):
    """A half-precision output whose provenance and stored direction are right but whose weights are not:
    edited with the direction turned by `size` (relative, orthogonal), or with one tensor scaled by 1 + size."""
    from safetensors.torch import load_file, save_file

    from weight_edit.edit_math import unit

    source = build_tiny_model(tmp_path / "src", tokenizer, dtype=dtype, seed=1)
    g = torch.Generator().manual_seed(105)
    direction = unit(torch.randn(32, generator=g))
    out = apply_direction(Checkpoint(source), direction, tmp_path / "out").out
    if kind == "direction":
        noise = torch.randn(32, generator=g)
        turned = direction + size * unit(noise - (noise @ direction) * direction)
        other = apply_direction(Checkpoint(source), turned, tmp_path / "other").out
        for shard in Checkpoint(out).shards:
            (out / shard).write_bytes((other / shard).read_bytes())
    else:
        name = "model.layers.1.mlp.down_proj.weight"
        shard = out / Checkpoint(out).weight_map[name]
        tensors = load_file(str(shard))
        tensors[name] = (tensors[name].float() * (1 + size)).to(dtype)
        save_file(tensors, str(shard), metadata={"format": "pt"})
    return out


HALF = [torch.bfloat16, torch.float16]


@pytest.fixture
def float32_edit_not_run(monkeypatch):
    """verify as it runs where the float32 edit cannot replace the stored tensors (fused blocks, offloading): the
    stored checkpoint is held to the stored dtype's tolerances against the twin."""
    monkeypatch.setattr("weight_edit.exact_edit._why_not_placeable", lambda model, targets: "not placed (test)")


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("kind,size", [("direction", 0.03), ("scale", 0.05)])
def test_a_slightly_wrong_edit_fails_at_half_precision(tmp_path, chat_tokenizer, dtype, kind, size):
    """A direction turned by 3 % or one tensor scaled by 5 % is not the float32 edit rounded to the stored dtype;
    the float32 edit itself (computed from the recorded direction) still matches the twin."""
    out = wrong_edit(tmp_path, chat_tokenizer, dtype, kind, size)
    report = verify_checkpoint(out, PROMPTS, settings.VERIFY_TOLERANCES, new_tokens=4, check_files=False)
    assert report.stored_dtype == str(dtype).removeprefix("torch.") and not report.passed
    assert any("units in the last place" in f for f in report.failures), report.failures
    if kind == "scale":
        assert report.failures == [
            f for f in report.failures if f.startswith("'model.layers.1.mlp.down_proj.weight' on disk is")
        ]
    assert report.metrics["stored_vs_float32_edit_ulp"] > 1
    assert report.metrics["exact_max_abs_logit"] < settings.VERIFY_TOLERANCES["float32"]["max_abs_logit"]
    assert not any(f.startswith("the float32 edit") for f in report.failures)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("kind,size", [("direction", 0.03), ("scale", 0.05)])
def test_without_the_float32_edit_top1_catches_a_slightly_wrong_edit(
    tmp_path, chat_tokenizer, dtype, kind, size, float32_edit_not_run
):
    """Where the float32 edit cannot run, the margin must not let such an edit pass: in bfloat16 both pass every
    other twin tolerance and top-1 catches them (at a margin of 0.03 it would not)."""
    out = wrong_edit(tmp_path, chat_tokenizer, dtype, kind, size)
    report = verify_checkpoint(out, PROMPTS, settings.VERIFY_TOLERANCES, new_tokens=4, check_files=False)
    assert any(f.startswith("top-1 agreement") for f in report.failures), report.failures
    assert "not placed (test)" in report.checks["stored_tensors"]


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("placed", [True, False])
def test_each_half_precision_tolerance_catches_a_wrong_direction(tmp_path, chat_tokenizer, dtype, placed, request):
    if not placed:
        request.getfixturevalue("float32_edit_not_run")
    out = wrong_edit(tmp_path, chat_tokenizer, dtype, "direction", 0.15)
    report = verify_checkpoint(out, PROMPTS, settings.VERIFY_TOLERANCES, new_tokens=4, check_files=False)
    failed = {" ".join(f.split(" ")[:2]) for f in report.failures if "units in the last place" not in f}
    twin = {"max |Δlogit|", "mean KL", "top-1 agreement"}
    assert failed == {"direction component"} | (set() if placed else twin), report.failures
    assert any("units in the last place" in f for f in report.failures)


@pytest.mark.parametrize("mode", ["norm-preserving", "project"])
def test_a_correct_half_precision_edit_is_the_rounded_float32_edit(tmp_path, chat_tokenizer, mode):
    """The stored tensors are the float32 edit rounded once (0 units apart here) and the float32 edit, run in the
    loaded model, is the hook twin (and in project mode the paper's ablation) at float32 tolerance; the stored
    model's distance is reported."""
    source = build_tiny_model(tmp_path / "src", chat_tokenizer, dtype=torch.bfloat16, seed=1)
    out = apply_direction(Checkpoint(source), torch.randn(32), tmp_path / "out", mode=mode).out
    report = verify_checkpoint(out, PROMPTS, settings.VERIFY_TOLERANCES, new_tokens=4)
    assert report.passed, report.failures
    assert report.metrics["stored_vs_float32_edit_ulp"] == 0.0
    assert report.metrics["exact_max_abs_logit"] < settings.VERIFY_TOLERANCES["float32"]["max_abs_logit"]
    assert report.metrics["exact_max_abs_logit"] < report.metrics["max_abs_logit"]
    assert report.checks["hook_twin_equality"].startswith("enforced on the float32 edit before rounding")
    assert "exact_kl" in report.tolerances
    if mode == "project":
        assert report.checks["paper_ablation"] == "compared (the float32 edit before rounding)"
        assert report.metrics["paper_ablation_max_abs_logit"] < settings.VERIFY_TOLERANCES["float32"]["max_abs_logit"]


def test_verify_detects_a_weight_that_was_not_edited(tmp_path, chat_tokenizer):
    """Equality must fail when one residual writer keeps its original values."""
    source = build_tiny_model(tmp_path / "src", chat_tokenizer)
    out = tmp_path / "out"
    apply_direction(Checkpoint(source), torch.randn(32), out)
    edited, original = Checkpoint(out), Checkpoint(source)
    name = "model.layers.1.mlp.down_proj.weight"
    shard = out / edited.weight_map[name]
    info = edited.info(name)
    data = bytearray(shard.read_bytes())
    start = edited.headers[edited.weight_map[name]].data_start + info.start
    data[start : start + info.nbytes] = original.read(name).contiguous().view(torch.uint8).numpy().tobytes()
    shard.write_bytes(bytes(data))
    with pytest.raises(VerifyError, match="altered"):
        verify_checkpoint(out, PROMPTS, settings.VERIFY_TOLERANCES, new_tokens=4)
    report = verify_checkpoint(out, PROMPTS, settings.VERIFY_TOLERANCES, new_tokens=4, check_files=False)
    assert not report.passed
    assert any("direction component" in f or "logit" in f for f in report.failures)
