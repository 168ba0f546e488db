"""A ChatML tokenizer trained on the embedded dataset, for random-weight models in tests and benchmarks.

Real tokenizers cannot be downloaded here or on the GPU machine; a small BPE tokenizer with a chat
template gives random-weight models real prompt structure (post-instruction tokens, padding, refusal
prefixes) without any network.
"""

from __future__ import annotations

import csv

import settings

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_REFUSAL_TEXT = ["I cannot help with that.", "As an AI, I'm sorry.", "Sorry, here is how assistant user system"]


def train_chat_tokenizer(vocab_size: int = 400):
    """Byte-level BPE over the embedded prompts plus a few refusal openings, with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    with settings.DEFAULT_DATASET.open(newline="", encoding="utf-8") as handle:
        corpus = [row["prompt"] for row in csv.DictReader(handle)] + _REFUSAL_TEXT
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None, unk_token=None
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"
    return fast


def random_model(config, dtype=None, device: str = "cpu", seed: int = 0):
    """A random-weight model of `config` (a transformers config), built directly on `device` (a GPU
    initialises tens of GB in seconds) with a fixed seed: the stand-in for real weights in tests and
    benchmark scripts, which reach no hub."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    # A multimodal wrapper is built whole, as released (the causal-LM class of some, e.g. Qwen3.5 and Llama 4,
    # would build the text decoder alone).
    multimodal = config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
    auto_class = AutoModelForImageTextToText if multimodal else AutoModelForCausalLM
    torch.manual_seed(seed)
    with torch.device(device):
        model = auto_class.from_config(config, **({"dtype": dtype} if dtype is not None else {}))
    return model.eval()
