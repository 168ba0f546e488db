"""Run-time hooks (weight_edit/hooks.py) on today's decoders: hybrids, fused and shared experts, wrappers."""

import pytest
import torch
from conftest import build_tiny_model

from weight_edit.architecture import ArchitectureError, architecture_for
from weight_edit.chat import tokenize_instructions
from weight_edit.checkpoint import Checkpoint
from weight_edit.edit_math import unit
from weight_edit.hooks import residual_ablation
from weight_edit.models import load_model

PROMPTS = ["How do banks detect money laundering?", "Tell me a joke"]


def _hidden(model, ids, mask) -> torch.Tensor:
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    return torch.stack(out.hidden_states[:-1])  # every layer's input [layers, batch, seq, d]


@pytest.mark.parametrize(
    "model_type,layers", [("llama", 2), ("qwen3_5_moe", 4), ("llama4", 2), ("gemma4_moe", 2), ("deepseek_v3", 2)]
)
def test_per_row_ablation_equals_one_direction_at_a_time(tmp_path, chat_tokenizer, model_type, layers):
    """Screening gives each batch row its own direction; mixture-of-experts modules see the batch flattened to
    tokens, which must still get their own row's direction. Every layer's input is then orthogonal to it."""
    folder = build_tiny_model(tmp_path / "m", chat_tokenizer, model_type=model_type, layers=layers)
    model, tokenizer = load_model(folder, dtype="float32")
    arch = architecture_for(Checkpoint(folder).config)
    ids, mask = tokenize_instructions(tokenizer, PROMPTS)
    rows = torch.randn(2, 32, generator=torch.Generator().manual_seed(1))
    with residual_ablation(model, arch, layers, rows, per_row=True):
        together = _hidden(model, ids, mask)
    for row in range(2):
        with residual_ablation(model, arch, layers, rows[row]):
            alone = _hidden(model, ids[row : row + 1], mask[row : row + 1])
        torch.testing.assert_close(together[:, row : row + 1], alone, atol=1e-4, rtol=1e-4)
        r = unit(rows[row])
        real = mask[row].bool()
        assert (alone[:, 0, real] @ r).abs().max() < 1e-4 * alone[:, 0, real].norm(dim=-1).max()


def test_hooks_refuse_a_model_loaded_with_another_class(tmp_path, chat_tokenizer):
    """Qwen3.5's causal-LM class builds the decoder at model., not at model.language_model. where the released
    checkpoint (and the family table) has it: hooks placed by name would miss, so they refuse in one line."""
    from transformers import AutoModelForCausalLM

    folder = build_tiny_model(tmp_path / "m", chat_tokenizer, model_type="qwen3_5", layers=4)
    model = AutoModelForCausalLM.from_pretrained(folder)
    arch = architecture_for(Checkpoint(folder).config)
    with (
        pytest.raises(ArchitectureError, match=r"keeps its token embedding at model\.embed_tokens, not at "),
        residual_ablation(model, arch, 4, torch.randn(32)),
    ):
        pass
