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


# ---- shipped quantized formats, for synthetic checkpoints laid out like the releases --------------------------


def quantize_mxfp4(weight, rows_per_chunk: int | None = None):
    """A float expert parameter [experts, in, out] (transformers' gpt-oss layout) to the shipped MXFP4 tensors:
    blocks [experts, out, in / 32, 16] (uint8, two e2m1 codes a byte, the even-indexed value in the low nibble) and
    scales [experts, out, in / 32] (uint8 E8M0 exponents, bias 127). Per block of 32 values: the smallest power of
    two that brings its largest magnitude within e2m1's 6, then the nearest code. Computed in float32 on the
    weight's device, a few output rows at a time (the nearest-code search holds 16 candidates per value)."""
    import torch

    from weight_edit.quantized import E2M1_VALUES, E8M0_BIAS, MXFP4_BLOCK

    experts, inputs, outputs = weight.shape
    table = torch.tensor(E2M1_VALUES, device=weight.device)
    blocks = torch.empty(
        experts, outputs, inputs // MXFP4_BLOCK, MXFP4_BLOCK // 2, dtype=torch.uint8, device=weight.device
    )
    scales = torch.empty(experts, outputs, inputs // MXFP4_BLOCK, dtype=torch.uint8, device=weight.device)
    step = rows_per_chunk or max(1, (1 << 22) // inputs)
    for expert in range(experts):
        for start in range(0, outputs, step):
            rows = slice(start, min(start + step, outputs))
            grouped = weight[expert, :, rows].transpose(0, 1).float().unflatten(-1, (-1, MXFP4_BLOCK))
            exponent = torch.ceil(torch.log2(grouped.abs().amax(-1).clamp(min=2.0**-100) / 6)).clamp(-127, 127)
            codes = ((grouped / torch.exp2(exponent)[..., None])[..., None] - table).abs().argmin(-1).to(torch.uint8)
            blocks[expert, rows] = codes[..., 0::2] | (codes[..., 1::2] << 4)
            scales[expert, rows] = (exponent + E8M0_BIAS).to(torch.uint8)
    return blocks, scales


def quantize_fp8(weight, block: tuple[int, int]):
    """DeepSeek-style block FP8: each (rows x cols) block's largest magnitude maps to e4m3fn's 448. Returns the
    float8_e4m3fn weight (same shape) and the float32 `weight_scale_inv` [..., ceil(rows / r), ceil(cols / c)] that
    multiplies it back; ragged last blocks are smaller. Computed in float32 on the weight's device."""
    import math

    import torch

    rows, cols = weight.shape[-2:]
    counts = (math.ceil(rows / block[0]), math.ceil(cols / block[1]))
    padded = torch.nn.functional.pad(weight.float(), (0, counts[1] * block[1] - cols, 0, counts[0] * block[0] - rows))
    grouped = padded.unflatten(-1, (counts[1], block[1])).unflatten(-3, (counts[0], block[0]))  # [.., R, r, C, c]
    scale = grouped.abs().amax(dim=(-3, -1)).clamp(min=1e-12) / 448
    quantized = (grouped / scale[..., :, None, :, None]).to(torch.float8_e4m3fn)
    quantized = quantized.flatten(-2).flatten(-3, -2)[..., :rows, :cols].contiguous()
    return quantized, scale
