"""Tiny random chat models built from configs, with a ChatML tokenizer trained here: no network."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def chat_tokenizer():
    from weight_edit.synthetic import train_chat_tokenizer

    return train_chat_tokenizer(vocab_size=400)


@pytest.fixture(scope="session")
def base_tokenizer():
    """The same BPE without a chat template, adding a BOS token before plain text: a base model's tokenizer."""
    from tokenizers.processors import TemplateProcessing

    from weight_edit.synthetic import train_chat_tokenizer

    tokenizer = train_chat_tokenizer(vocab_size=400)
    bos = "<|im_start|>"  # unused without a template: it plays the BOS token
    tokenizer._tokenizer.post_processor = TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, tokenizer.convert_tokens_to_ids(bos))]
    )
    tokenizer.bos_token = bos
    tokenizer.chat_template = None
    return tokenizer


def build_tiny_model(
    folder: Path,
    tokenizer,
    *,
    model_type: str = "llama",
    tie: bool = True,
    bias: bool = False,
    dtype: torch.dtype = torch.float32,
    layers: int = 2,
    seed: int = 0,
    shard_size: str = "40KB",
    random_norms: bool = False,
) -> Path:
    """Save a random model of `model_type` with at least two shards, plus the tokenizer.

    `random_norms` draws norm weights too (else they keep their initial 1 or 0), so that an edit that must
    account for a norm's scale is tested with one that is not uniform.
    """
    import transformers

    from weight_edit.synthetic import random_model

    torch.manual_seed(seed)
    common = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        tie_word_embeddings=tie,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.pad_token_id,
    )
    moe = dict(num_experts_per_tok=2, moe_intermediate_size=16)
    extra = {
        "llama": dict(attention_bias=bias, mlp_bias=bias),
        "qwen2": {},  # q/k/v biases: not residual writers, must stay untouched
        "qwen3": dict(head_dim=8),
        "mistral": {},
        "phi3": {},
        "gemma": dict(head_dim=8),
        "gemma2": dict(head_dim=8),
        "gemma3_text": dict(head_dim=8, sliding_window=16),
        "olmo2": {},
        "mixtral": dict(num_local_experts=3, num_experts_per_tok=2),
        "qwen2_moe": dict(num_experts=3, shared_expert_intermediate_size=16, **moe),
        "qwen3_moe": dict(num_experts=3, head_dim=8, **moe),
        "gpt_oss": dict(num_local_experts=3, num_experts_per_tok=2, head_dim=8, sliding_window=16),
        "gemma3": dict(head_dim=8, sliding_window=16),
    }
    # Multimodal wrappers: the text decoder's settings go to text_config, beside a tiny vision tower.
    wrappers = {
        "gemma3": dict(
            vision_config=dict(
                hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28
            ),
            mm_tokens_per_image=4,
        ),
    }
    if model_type == "gpt2":
        config = transformers.GPT2Config(
            n_embd=32,
            n_layer=layers,
            n_head=4,
            vocab_size=len(tokenizer),
            n_positions=256,
            tie_word_embeddings=tie,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.pad_token_id,
        )
    elif model_type in wrappers:
        tokens = {k: common.pop(k) for k in ("pad_token_id", "eos_token_id", "bos_token_id")}
        text_config = {**common, **extra[model_type]}
        config = transformers.AutoConfig.for_model(
            model_type, text_config=text_config, tie_word_embeddings=tie, **tokens, **wrappers[model_type]
        )
    else:
        config = transformers.AutoConfig.for_model(model_type, **common, **extra[model_type])
    model = random_model(config, seed=seed)
    with torch.no_grad():  # larger-than-default weights so the edit changes outputs visibly
        for name, parameter in model.named_parameters():
            if "norm" not in name:
                parameter.normal_(0, 0.3 if parameter.ndim > 1 else 0.1)
            elif random_norms:
                parameter.uniform_(0.5, 1.5)
    model.to(dtype)
    model.save_pretrained(str(folder), max_shard_size=shard_size)
    tokenizer.save_pretrained(str(folder))
    return folder


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    """Nothing a test caches (converted models, source evaluation scores) lands in the user's cache."""
    monkeypatch.setenv("WEIGHT_EDIT_CACHE", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture
def tiny_model(tmp_path, chat_tokenizer) -> Path:
    return build_tiny_model(tmp_path / "tiny", chat_tokenizer)
