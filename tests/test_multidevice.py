"""A model split across devices by accelerate (forced here on the CPU: some layers offloaded to disk) gives the
same direction and the same verify result as the single-device run."""

import torch
from conftest import build_tiny_model
from test_fit import SAFE, UNSAFE

import settings
from weight_edit.architecture import architecture_for
from weight_edit.checkpoint import Checkpoint
from weight_edit.fit import FitSettings, fit_direction
from weight_edit.models import input_device, load_model
from weight_edit.verify import verify_checkpoint
from weight_edit.writer import apply_direction

LAYERS = 3
# Embedding and layer 0 in memory, layers 1-2 offloaded: their weights are meta tensors outside forward.
SPLIT = {
    "model.embed_tokens": "cpu",
    "model.rotary_emb": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",
    "model.layers.2": "disk",
    "model.norm": "cpu",
    "lm_head": "cpu",
}


def fit(folder, device_map=None):
    model, tokenizer = load_model(folder, dtype="float32", device_map=device_map)
    if device_map is not None:
        assert model.model.layers[1].self_attn.o_proj.weight.is_meta  # really split
    arch = architecture_for(Checkpoint(folder).config)
    return fit_direction(
        model,
        tokenizer,
        arch,
        LAYERS,
        UNSAFE,
        SAFE,
        UNSAFE[:4],
        SAFE[:4],
        FitSettings(batch_size=4, screen_prompts=2, screen_keep=2, max_validation_prompts=4),
    )


def test_split_model_fits_the_same_direction_and_verifies_the_same(tmp_path, chat_tokenizer):
    source = build_tiny_model(tmp_path / "src", chat_tokenizer, layers=LAYERS, bias=True, tie=False)
    whole, split = fit(source), fit(source, SPLIT)
    assert (whole.layer, whole.position) == (split.layer, split.position)
    torch.testing.assert_close(whole.direction, split.direction, atol=1e-5, rtol=1e-5)
    for a, b in zip(whole.scores, split.scores, strict=True):
        assert (a.bypass is None) == (b.bypass is None)
        if a.bypass is not None:
            assert abs(a.bypass - b.bypass) < 1e-4 and abs(a.kl - b.kl) < 1e-5

    apply_direction(Checkpoint(source), whole.direction, tmp_path / "out")
    prompts = ["Tell me a joke", "How do locks work?", *UNSAFE[:2]]
    one = verify_checkpoint(tmp_path / "out", prompts, settings.VERIFY_TOLERANCES, new_tokens=4)
    many = verify_checkpoint(tmp_path / "out", prompts, settings.VERIFY_TOLERANCES, new_tokens=4, device_map=SPLIT)
    assert one.passed and many.passed, (one.failures, many.failures)
    assert one.guarantee == many.guarantee == "hook-exact"
    for key in ("max_abs_logit", "direction_component", "top1", "continuations_match"):
        assert abs(one.metrics[key] - many.metrics[key]) < 1e-4, key


def test_inputs_go_to_the_embedding_device_of_a_split_model(tmp_path, chat_tokenizer):
    source = build_tiny_model(tmp_path / "src", chat_tokenizer, layers=LAYERS)
    model, _ = load_model(source, dtype="float32", device_map=SPLIT)
    assert input_device(model) == torch.device("cpu")
    assert model.hf_device_map["model.layers.1"] == "disk"
