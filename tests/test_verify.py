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
    source = build_tiny_model(tmp_path / "src", chat_tokenizer, dtype=torch.bfloat16)
    apply_direction(Checkpoint(source), torch.randn(32), tmp_path / "out")
    report = verify_checkpoint(tmp_path / "out", PROMPTS, settings.VERIFY_TOLERANCES, new_tokens=4)
    assert report.stored_dtype == "bfloat16" and report.passed, report.failures


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
