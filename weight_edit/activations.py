"""Forward passes: residual activations at post-instruction positions, and last-position logits."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from weight_edit.chat import Batch, batches

Advance = Callable[[int], None]


def tokenized_batches(tokenizer, instructions: Sequence[str], batch_size: int, device, suffix_ids) -> list[Batch]:
    """Tokenize once; scoring reuses the same batches for every candidate."""
    return list(batches(tokenizer, instructions, batch_size, device, suffix_ids))


@torch.inference_mode()
def mean_residuals(
    model: torch.nn.Module, prepared: list[Batch], num_layers: int, num_positions: int, advance: Advance | None = None
) -> torch.Tensor:
    """Mean residual-stream input of every layer at the last `num_positions` tokens: [layers, positions, d]."""
    total: torch.Tensor | None = None
    count = 0
    for batch in prepared:
        out = model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            output_hidden_states=True,
            use_cache=False,
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
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False, logits_to_keep=1)
        rows.append(out.logits[:, -1, :].float().cpu())
        if advance:
            advance(batch.input_ids.shape[0])
    return torch.cat(rows)


def kl_divergence(reference_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(reference ‖ other) per row, from logits."""
    ref = torch.log_softmax(reference_logits.double(), dim=-1)
    other = torch.log_softmax(logits.double(), dim=-1)
    return (ref.exp() * (ref - other)).sum(dim=-1)
