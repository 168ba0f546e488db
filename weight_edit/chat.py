"""Chat-template handling: formatting instructions, post-instruction tokens, refusal tokens.

Post-instruction tokens are whatever the template puts after the user's instruction; they are found
by formatting a probe instruction and locating where it ends, never from per-family strings.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from weight_edit.errors import WeightEditError

_PROBE = "Probe instruction for locating the template suffix"


class TemplateError(WeightEditError):
    """The tokenizer's chat template cannot be used for post-instruction positions."""


class PromptLengthError(WeightEditError):
    """A prompt is longer than the model's context or the per-prompt token budget; names its file and row."""


def prompt_token_limit(config: dict, budget: int) -> tuple[int, str]:
    """The most tokens one formatted prompt may have, and why: the model's context or the memory budget
    (every prompt of a batch is padded to the longest, and attention grows with its square)."""
    text = config.get("text_config") or config
    context = text.get("max_position_embeddings") or text.get("n_positions")
    if context and context < budget:
        return int(context), f"the model's context is {context} tokens"
    return budget, f"weight-edit's per-prompt budget is {budget} tokens (settings.MAX_PROMPT_TOKENS, for memory)"


def check_prompt_lengths(tokenizer, rows: Sequence[tuple[int, str]], origin: str, limit: int, why: str) -> None:
    """Refuse the first (row, prompt) whose chat-formatted length exceeds `limit`, before any model runs."""
    if not rows:
        return
    overhead = len(tokenizer(format_instruction(tokenizer, ""), add_special_tokens=False)["input_ids"])
    lengths = tokenizer([text for _, text in rows], add_special_tokens=False)["input_ids"]
    for (row, _), ids in zip(rows, lengths, strict=True):
        if len(ids) + overhead > limit:
            raise PromptLengthError(
                f"{origin}: row {row}: the prompt is {len(ids) + overhead} tokens in the chat template; {why}"
            )


def format_instruction(tokenizer, instruction: str) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise TemplateError("the tokenizer has no chat template; weight-edit needs a chat model")
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": instruction}], tokenize=False, add_generation_prompt=True
    )


def post_instruction_ids(tokenizer) -> list[int]:
    """Token ids the template places after every instruction (e.g. end-of-turn, assistant header)."""
    text = format_instruction(tokenizer, _PROBE)
    end = text.rfind(_PROBE)
    if end < 0:
        raise TemplateError("the chat template does not contain the instruction verbatim")
    suffix_start = end + len(_PROBE)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    first = next((i for i, (start, _) in enumerate(offsets) if start >= suffix_start), len(ids))
    # A token that straddles the instruction's end would mix instruction and template text.
    if first > 0 and offsets[first - 1][1] > suffix_start:
        raise TemplateError("the template's suffix merges with the instruction's last token")
    suffix = ids[first:]
    if not suffix:
        raise TemplateError("the chat template adds no tokens after the instruction")
    return suffix


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    indices: list[int]  # positions of these prompts in the caller's list


def tokenize_instructions(tokenizer, instructions: Sequence[str], suffix_ids: Sequence[int] | None = None):
    """Format and tokenize, left-padded, checking every prompt ends with the same suffix."""
    texts = [format_instruction(tokenizer, s) for s in instructions]
    encoded = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    if suffix_ids is not None:
        n = len(suffix_ids)
        expected = torch.tensor(list(suffix_ids))
        mismatched = [i for i in range(len(texts)) if not torch.equal(encoded["input_ids"][i, -n:], expected)]
        if mismatched:
            raise TemplateError(
                f"prompt {mismatched[0]} does not end with the template suffix; "
                f"its tokenization merges across the instruction boundary: {instructions[mismatched[0]]!r}"
            )
    return encoded["input_ids"], encoded["attention_mask"]


def batches(
    tokenizer, instructions: Sequence[str], batch_size: int, device: str | torch.device, suffix_ids=None
) -> Iterator[Batch]:
    for start in range(0, len(instructions), batch_size):
        chunk = list(instructions[start : start + batch_size])
        ids, mask = tokenize_instructions(tokenizer, chunk, suffix_ids)
        yield Batch(ids.to(device), mask.to(device), list(range(start, start + len(chunk))))


def refusal_token_ids(tokenizer, prefixes: Sequence[str]) -> list[int]:
    """First token of each refusal prefix as the model would start its reply, from the tokenizer."""
    ids = []
    for prefix in prefixes:
        tokens = tokenizer.encode(prefix, add_special_tokens=False)
        if tokens:
            ids.append(tokens[0])
    return sorted(set(ids))


def refusal_log_odds(logits: torch.Tensor, refusal_ids: Sequence[int]) -> torch.Tensor:
    """log P(refusal tokens) − log P(other tokens) at each row of last-position logits."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    refusal = torch.logsumexp(log_probs[:, list(refusal_ids)], dim=-1)
    other = torch.log1p(-refusal.exp().clamp(max=1 - 1e-7))
    return refusal - other
