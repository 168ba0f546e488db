"""Prompt formatting: chat template or plain text, post-instruction tokens, refusal tokens.

Post-instruction tokens are whatever the template puts after the user's instruction; they are found
by formatting a probe instruction and locating where it ends, never from per-family strings.

Prompt formats (`PROMPT_FORMATS`): `chat` wraps the instruction in the tokenizer's chat template; `plain`
is the instruction as-is, after the tokenizer's BOS token when it adds one (for base models, which have
no template: there are no post-instruction tokens, and the instruction's last token is the one read);
`auto` is `chat` when the tokenizer has a template and `plain` otherwise. Functions take the format as an
argument; left out (None), they use the format set by `using_prompt_format` around the call, `auto` by
default, so that callers which do not pass it (verify, activations) follow the command's option.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch

from weight_edit.errors import WeightEditError

_PROBE = "Probe instruction for locating the template suffix"
PROMPT_FORMATS = ("auto", "chat", "plain")  # first: the default
_CURRENT_FORMAT: ContextVar[str] = ContextVar("prompt_format", default="auto")
# Extra chat-template arguments that set the reasoning mode (weight_edit.reasoning), for the same block
_CURRENT_TEMPLATE_KWARGS: ContextVar[tuple[tuple[str, bool], ...]] = ContextVar("template_kwargs", default=())


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


def check_prompt_lengths(
    tokenizer, rows: Sequence[tuple[int, str]], origin: str, limit: int, why: str, prompt_format: str | None = None
) -> None:
    """Refuse the first (row, prompt) whose formatted length exceeds `limit`, before any model runs."""
    if not rows:
        return
    resolved = resolve_prompt_format(tokenizer, prompt_format)
    overhead = len(tokenizer(format_instruction(tokenizer, "", resolved), add_special_tokens=False)["input_ids"])
    lengths = tokenizer([text for _, text in rows], add_special_tokens=False)["input_ids"]
    where = "in the chat template" if resolved == "chat" else "as plain text"
    for (row, _), ids in zip(rows, lengths, strict=True):
        if len(ids) + overhead > limit:
            raise PromptLengthError(f"{origin}: row {row}: the prompt is {len(ids) + overhead} tokens {where}; {why}")


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


@contextmanager
def using_prompt_format(prompt_format: str, template_kwargs: tuple[tuple[str, bool], ...] = ()) -> Iterator[None]:
    """Within the block, functions called without a prompt format use `prompt_format` (see the module note),
    and the chat template gets `template_kwargs` (the reasoning switch `--reasoning` resolved to)."""
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"prompt format {prompt_format!r} is not one of {', '.join(PROMPT_FORMATS)}")
    token = _CURRENT_FORMAT.set(prompt_format)
    kwargs_token = _CURRENT_TEMPLATE_KWARGS.set(tuple(template_kwargs))
    try:
        yield
    finally:
        _CURRENT_TEMPLATE_KWARGS.reset(kwargs_token)
        _CURRENT_FORMAT.reset(token)


def resolve_prompt_format(tokenizer, prompt_format: str | None = None) -> str:
    """`chat` or `plain` for this tokenizer: `auto` (and None, outside `using_prompt_format`) picks `chat` when
    the tokenizer has a chat template; `chat` without one is refused."""
    requested = prompt_format or _CURRENT_FORMAT.get()
    if requested not in PROMPT_FORMATS:
        raise ValueError(f"prompt format {requested!r} is not one of {', '.join(PROMPT_FORMATS)}")
    if requested == "auto":
        return "chat" if has_chat_template(tokenizer) else "plain"
    if requested == "chat" and not has_chat_template(tokenizer):
        raise TemplateError(
            "--prompt-format chat: the tokenizer has no chat template (a base model?); "
            "use --prompt-format plain (or auto) for the instruction as plain text"
        )
    return requested


def _bos_text(tokenizer) -> str:
    """The BOS token's text when the tokenizer puts it before plain text, else ''."""
    bos, bos_id = getattr(tokenizer, "bos_token", None), getattr(tokenizer, "bos_token_id", None)
    if not bos or bos_id is None:
        return ""
    ids = tokenizer("a")["input_ids"]
    return (
        bos
        if ids and ids[0] == bos_id and tokenizer("a", add_special_tokens=False)["input_ids"][:1] != [bos_id]
        else ""
    )


def format_instruction(tokenizer, instruction: str, prompt_format: str | None = None) -> str:
    """The prompt's text, tokenized with add_special_tokens=False: the chat template with the generation
    prompt, or the instruction after the tokenizer's BOS text (plain)."""
    if resolve_prompt_format(tokenizer, prompt_format) == "plain":
        return _bos_text(tokenizer) + instruction
    return format_conversation(tokenizer, [{"role": "user", "content": instruction}])


def format_conversation(tokenizer, messages: list[dict[str, str]]) -> str:
    """Messages through the chat template with the generation prompt and the current template arguments (the
    reasoning switch, see `using_prompt_format`)."""
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, **dict(_CURRENT_TEMPLATE_KWARGS.get())
    )


def post_instruction_ids(tokenizer, prompt_format: str | None = None) -> list[int]:
    """Token ids the template places after every instruction (e.g. end-of-turn, assistant header); none in
    the plain format, where the instruction's last token is the only position read (see `read_positions`)."""
    if resolve_prompt_format(tokenizer, prompt_format) == "plain":
        return []
    text = format_instruction(tokenizer, _PROBE, "chat")
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


def read_positions(suffix_ids: Sequence[int]) -> int:
    """How many last positions of a prompt carry candidates: the template's suffix, or the instruction's last
    token when there is none (plain format)."""
    return max(len(suffix_ids), 1)


def tokenize_instructions(
    tokenizer, instructions: Sequence[str], suffix_ids: Sequence[int] | None = None, prompt_format: str | None = None
):
    """Format and tokenize, left-padded, checking every prompt ends with the same suffix (when there is one)."""
    resolved = resolve_prompt_format(tokenizer, prompt_format)
    texts = [format_instruction(tokenizer, s, resolved) for s in instructions]
    encoded = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    if suffix_ids:
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
    tokenizer,
    instructions: Sequence[str],
    batch_size: int,
    device: str | torch.device,
    suffix_ids=None,
    prompt_format: str | None = None,
) -> Iterator[Batch]:
    resolved = resolve_prompt_format(tokenizer, prompt_format)
    for start in range(0, len(instructions), batch_size):
        chunk = list(instructions[start : start + batch_size])
        ids, mask = tokenize_instructions(tokenizer, chunk, suffix_ids, resolved)
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
