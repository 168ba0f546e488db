"""Forward passes: residual activations at post-instruction positions, and last-position logits.

Every chat prompt starts with the same template tokens (for Qwen2.5, a 24-token system turn: over
half of a typical prompt). `forward` computes that shared prefix once per batch, expands its
key/value cache to every row, and runs only the rest: the same causal computation on fewer tokens
(equal to the plain forward up to floating-point rounding; tested), about twice as fast on a CPU.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

from weight_edit.chat import Batch, batches
from weight_edit.models import text_config

Advance = Callable[[int], None]
HookContext = Callable[[], AbstractContextManager]

MIN_SHARED_PREFIX = 4  # tokens; below this a second pass costs more than it saves


@dataclass
class SharedPrefix:
    """A left-padded batch split into the prefix every row shares and the left-padded rest of each row."""

    prefix_ids: torch.Tensor  # [P]
    rest_ids: torch.Tensor  # [B, R], left-padded
    rest_mask: torch.Tensor  # [B, R]

    @property
    def length(self) -> int:
        return self.prefix_ids.shape[0]

    def attention_mask(self) -> torch.Tensor:
        ones = torch.ones(
            self.rest_mask.shape[0], self.length, dtype=self.rest_mask.dtype, device=self.rest_mask.device
        )
        return torch.cat([ones, self.rest_mask], dim=1)

    def position_ids(self) -> torch.Tensor:
        """Positions of the rest's tokens right after the prefix, as if unpadded (pads get the first one)."""
        return self.length + (self.rest_mask.long().cumsum(dim=1) - 1).clamp(min=0)


def split_shared_prefix(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, keep_last: int = 1, min_length: int = MIN_SHARED_PREFIX
) -> SharedPrefix | None:
    """The longest prefix all rows share, leaving every row at least its last `keep_last` tokens.

    None when that prefix is shorter than `min_length`.
    """
    lengths = attention_mask.sum(dim=1).tolist()
    width = input_ids.shape[1]
    rows = [input_ids[i, width - n :] for i, n in enumerate(lengths)]
    limit = min(lengths, default=0) - max(1, keep_last)
    if limit < min_length:
        return None
    first = rows[0][:limit]
    shared = limit
    for row in rows[1:]:
        differs = (row[:limit] != first).nonzero()
        if len(differs):
            shared = min(shared, int(differs[0]))
    if shared < min_length:
        return None
    rest_width = max(lengths) - shared
    rest_ids = input_ids.new_full((len(rows), rest_width), int(input_ids[0, -1]))
    rest_mask = attention_mask.new_zeros((len(rows), rest_width))
    for i, row in enumerate(rows):
        rest = row[shared:]
        rest_ids[i, rest_width - len(rest) :] = rest
        rest_mask[i, rest_width - len(rest) :] = 1
    return SharedPrefix(first[:shared].clone(), rest_ids, rest_mask)


def forward(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    prefix_rows: int = 1,
    prefix_hooks: HookContext | None = None,
    rest_hooks: HookContext | None = None,
    shared_prefix: bool = True,
    keep_last: int = 1,
    **kwargs,
):
    """The model's forward on a left-padded batch, computing the shared prefix once (see the module note).

    Outputs cover the rest's positions only, at least the last `keep_last` of every row (give the
    number of positions whose hidden states are read). Run-time hooks active around the call
    apply to both passes; hooks that differ per row (screening) are entered by the two callbacks
    instead: the prefix pass has `prefix_rows` rows, each repeated for consecutive batch rows.
    """
    # Sliding-window attention counts the pads between prefix and rest as distance: keep such prompts whole.
    window = getattr(text_config(model), "sliding_window", None)
    shared_prefix = shared_prefix and not (window and input_ids.shape[1] > window) and model not in _NOT_PLAIN_KV
    split = split_shared_prefix(input_ids, attention_mask, keep_last) if shared_prefix else None
    cache = None
    if split is not None and not input_ids.shape[0] % prefix_rows:
        cache_name = _cache_argument(model)
        with (prefix_hooks or nullcontext)():
            # Only the cache is used: the prefix pass computes one position's logits and drops them at once.
            prefix_ids = split.prefix_ids.expand(prefix_rows, -1)
            cache = getattr(model(input_ids=prefix_ids, use_cache=True, logits_to_keep=1), cache_name)
        if not plain_kv_cache(cache):
            _NOT_PLAIN_KV.add(model)  # hybrid (linear attention, state-space): whole prompts from now on
            cache = None
    if cache is None:
        with (rest_hooks or nullcontext)():
            return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)
    if input_ids.shape[0] != prefix_rows:
        cache.batch_repeat_interleave(input_ids.shape[0] // prefix_rows)
    with (rest_hooks or nullcontext)():
        return model(
            input_ids=split.rest_ids,
            attention_mask=split.attention_mask(),
            position_ids=split.position_ids(),
            **{cache_name: cache},
            use_cache=True,
            **kwargs,
        )


# Models whose cache is not plain per-layer keys and values: the shared prefix cannot be expanded to every row.
_NOT_PLAIN_KV: weakref.WeakSet = weakref.WeakSet()


def plain_kv_cache(cache) -> bool:
    """Whether every layer of a cache holds only attention keys and values (full or sliding window), which can be
    repeated for every row of a batch; a linear-attention or state-space layer's recurrent state cannot."""
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) in (DynamicLayer, DynamicSlidingWindowLayer) for layer in layers)


def _cache_argument(model) -> str:
    """The KV cache's name in this transformers release: `cache` (recent 5.x) or `past_key_values` (older)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def tokenized_batches(
    tokenizer, instructions: Sequence[str], batch_size: int, device, suffix_ids, by_length: bool = False
) -> list[Batch]:
    """Tokenize once; scoring reuses the same batches for every candidate.

    `by_length` batches prompts of similar length together (less padding); each `Batch.indices` still
    names its prompts' places in `instructions`, and `last_logits` returns rows in that order.
    """
    if not by_length:
        return list(batches(tokenizer, instructions, batch_size, device, suffix_ids))
    lengths = [len(ids) for ids in tokenizer(list(instructions), add_special_tokens=False)["input_ids"]]
    order = sorted(range(len(instructions)), key=lambda i: (lengths[i], i))
    prepared = list(batches(tokenizer, [instructions[i] for i in order], batch_size, device, suffix_ids))
    for batch in prepared:
        batch.indices = [order[i] for i in batch.indices]
    return prepared


def in_prompt_order(rows: torch.Tensor, prepared: list[Batch]) -> torch.Tensor:
    """Rows computed batch by batch, put back in the order of the prompts the batches were made from."""
    indices = [i for batch in prepared for i in batch.indices]
    if indices == list(range(len(indices))):
        return rows
    return rows[torch.argsort(torch.tensor(indices, device=rows.device))]


@torch.inference_mode()
def mean_residuals(
    model: torch.nn.Module, prepared: list[Batch], num_layers: int, num_positions: int, advance: Advance | None = None
) -> torch.Tensor:
    """Mean residual-stream input of every layer at the last `num_positions` tokens: [layers, positions, d]."""
    total: torch.Tensor | None = None
    count = 0
    for batch in prepared:
        out = forward(
            model,
            batch.input_ids,
            batch.attention_mask,
            keep_last=num_positions,
            output_hidden_states=True,
            logits_to_keep=1,
        )
        # hidden_states[l] is the input of layer l for l < num_layers (the last entry is post-norm).
        stacked = torch.stack([h[:, -num_positions:, :] for h in out.hidden_states[:num_layers]], dim=1)
        summed = stacked.double().sum(dim=0).cpu()
        total = summed if total is None else total + summed
        count += batch.input_ids.shape[0]
        if advance:
            advance(batch.input_ids.shape[0])
    if total is None:
        raise ValueError("no prompts to collect activations from")
    return total / count


@torch.inference_mode()
def last_logits(model: torch.nn.Module, prepared: list[Batch], advance: Advance | None = None) -> torch.Tensor:
    """Float32 logits at the last prompt position (where the reply's first token is chosen)."""
    rows = []
    for batch in prepared:
        out = forward(model, batch.input_ids, batch.attention_mask, logits_to_keep=1)
        rows.append(out.logits[:, -1, :].float().cpu())
        if advance:
            advance(batch.input_ids.shape[0])
    return in_prompt_order(torch.cat(rows), prepared)


def kl_divergence(reference_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(reference ‖ other) per row, from logits."""
    ref = torch.log_softmax(reference_logits.double(), dim=-1)
    other = torch.log_softmax(logits.double(), dim=-1)
    return (ref.exp() * (ref - other)).sum(dim=-1)
