"""The shared-prefix forward equals each prompt's own plain forward, on every family in the table."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny_model
from transformers import AutoModelForCausalLM

from weight_edit.activations import forward, split_shared_prefix
from weight_edit.architecture import architecture_for
from weight_edit.fit import _screen
from weight_edit.hooks import residual_ablation

FAMILIES = [
    "llama",
    "qwen2",
    "qwen3",
    "mistral",
    "phi3",
    "gemma",
    "gemma2",
    "gemma3_text",
    "olmo2",
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "gpt_oss",
    "gpt2",
]


def left_padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
    return ids, mask


def prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    """Five rows sharing a 9-token prefix, with rests of different lengths (so the batch is padded)."""
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(1, vocab, (9,), generator=g).tolist()
    return [prefix + torch.randint(1, vocab, (n,), generator=g).tolist() for n in (3, 7, 1, 12, 5)]


def test_split_finds_the_shared_prefix_and_keeps_each_rest():
    ids, mask = left_padded([[5, 6, 7, 8, 9, 1], [5, 6, 7, 8, 9, 2, 3, 4], [5, 6, 7, 8, 2, 2]], pad=0)
    split = split_shared_prefix(ids, mask)
    assert split.prefix_ids.tolist() == [5, 6, 7, 8]  # row 3 differs at its fifth token
    assert split.rest_mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 1], [0, 0, 1, 1]]
    assert split.rest_ids[:, -2:].tolist() == [[9, 1], [3, 4], [2, 2]] and split.rest_ids[1].tolist() == [9, 2, 3, 4]
    assert split.position_ids()[1].tolist() == [4, 5, 6, 7] and split.position_ids()[0, -2:].tolist() == [4, 5]
    assert split_shared_prefix(*left_padded([[5, 6, 7, 1], [5, 6, 7, 2]], pad=0)) is None  # 3 < 4 tokens
    # every row keeps at least its last `keep_last` tokens, even when one prompt is the others' prefix
    assert split_shared_prefix(*left_padded([[5, 6, 7, 8, 9], [5, 6, 7, 8, 9, 1]], pad=0)).length == 4
    one = torch.arange(1, 11).unsqueeze(0)
    assert split_shared_prefix(one, torch.ones_like(one), keep_last=3).length == 7


@pytest.mark.parametrize("model_type", FAMILIES)
def test_shared_prefix_forward_equals_each_prompts_own_forward(tmp_path, chat_tokenizer, model_type):
    folder = build_tiny_model(tmp_path / "m", chat_tokenizer, model_type=model_type, layers=3)
    moe = model_type in ("mixtral", "qwen2_moe", "qwen3_moe", "gpt_oss")  # grouped matmuls have no float64
    dtype, tolerance = (torch.float32, 2e-5) if moe else (torch.float64, 1e-6)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    rows = prompts(len(chat_tokenizer))
    ids, mask = left_padded(rows, chat_tokenizer.pad_token_id)
    window = getattr(model.config, "sliding_window", None)  # 16 in the tiny gemma3/gpt-oss: rows are longer
    with torch.inference_mode():
        shared = forward(model, ids, mask, keep_last=3, output_hidden_states=True, logits_to_keep=1)
        # the prefix was computed apart, except where a sliding window would see the pads as distance
        assert (shared.hidden_states[0].shape[1] < ids.shape[1]) == (not window or ids.shape[1] <= window)
        for i, row in enumerate(rows):
            own = model(input_ids=torch.tensor([row]), use_cache=False, output_hidden_states=True, logits_to_keep=1)
            torch.testing.assert_close(shared.logits[i, -1], own.logits[0, -1], atol=tolerance, rtol=tolerance)
            for layer in range(3):  # residual inputs at the last three positions, as fit collects them
                torch.testing.assert_close(
                    shared.hidden_states[layer][i, -3:],
                    own.hidden_states[layer][0, -3:],
                    atol=tolerance,
                    rtol=tolerance,
                )


def test_screening_with_per_candidate_prefixes_equals_ablating_each_candidate(tmp_path, chat_tokenizer):
    folder = build_tiny_model(tmp_path / "m", chat_tokenizer, layers=3)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64).eval()
    arch = architecture_for(model.config.to_dict())
    rows = prompts(len(chat_tokenizer), seed=1)
    encoded = left_padded(rows, chat_tokenizer.pad_token_id)
    vectors = torch.randn(3, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    screened = _screen(model, arch, 3, vectors, encoded, "cpu").view(3, len(rows), -1)
    for c, vector in enumerate(vectors):
        for i, row in enumerate(rows):
            with torch.inference_mode(), residual_ablation(model, arch, 3, vector.double()):
                own = model(input_ids=torch.tensor([row]), use_cache=False, logits_to_keep=1).logits[0, -1]
            torch.testing.assert_close(screened[c, i], own.float(), atol=1e-5, rtol=1e-5)


def test_batches_by_length_give_rows_in_prompt_order(tmp_path, chat_tokenizer):
    import settings
    from weight_edit.activations import last_logits, mean_residuals, tokenized_batches
    from weight_edit.chat import post_instruction_ids
    from weight_edit.dataset import load_dataset

    folder = build_tiny_model(tmp_path / "m", chat_tokenizer, layers=2)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64).eval()
    texts = [p.text for p in load_dataset(settings.DEFAULT_DATASET).prompts[:11]]
    suffix = post_instruction_ids(chat_tokenizer)
    plain = tokenized_batches(chat_tokenizer, texts, 4, "cpu", suffix)
    sorted_batches = tokenized_batches(chat_tokenizer, texts, 4, "cpu", suffix, by_length=True)
    assert sorted(i for b in sorted_batches for i in b.indices) == list(range(11))
    assert [i for b in sorted_batches for i in b.indices] != list(range(11))  # really reordered
    widths = [b.input_ids.shape[1] for b in sorted_batches]
    assert widths == sorted(widths)
    torch.testing.assert_close(last_logits(model, sorted_batches), last_logits(model, plain), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(mean_residuals(model, sorted_batches, 2, 3), mean_residuals(model, plain, 2, 3))
