"""The model card says what the source weights are: a quantised copy is never passed off as the original."""

import settings
from weight_edit.model_card import render_card
from weight_edit.models import weights_note

PROVENANCE = {
    "source": {"path": "/cache/models/qwen2.5-coder-1.5b-instruct", "shards": {"model.safetensors": {"sha256": "a"}}},
    "output": {"shards": {"model.safetensors": {"sha256": "b"}}},
    "mode": "norm-preserving",
    "edited_tensors": ["model.embed_tokens.weight"],
    "architecture": "llama",
    "guarantee": "hook-exact",
    "direction": {"sha256": "c"},
    "untied_embeddings": False,
    "version": "0.1.0",
}


def test_default_model_card_says_quantised_copy():
    note = weights_note(None)
    assert note == settings.DEFAULT_MODEL_WEIGHTS and "quantised copy" in note and "Q4_K_M" in note
    card = render_card({**PROVENANCE, "base_model": settings.DEFAULT_MODEL_HUB_ID, "base_model_weights": note})
    first = card.splitlines()[1]
    assert first.startswith(f"base_model: {settings.DEFAULT_MODEL_HUB_ID}") and "quantised copy" in first
    assert f"**Source weights:** {note}." in card


def test_gguf_and_plain_checkpoints():
    assert "GGUF file model.gguf" in weights_note("/tmp/model.gguf")
    assert weights_note("/models/some-checkpoint") is None
    card = render_card({**PROVENANCE, "base_model": "org/model"})
    assert card.splitlines()[1] == "base_model: org/model" and "Source weights" not in card
