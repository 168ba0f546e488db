"""Direction fitting: diff-in-means candidates and the paper's selection, in two cheap stages.

Every (layer, post-instruction position) candidate is r = mean(unsafe) − mean(safe) of the layer's
residual input. Selection follows Arditi et al. (2024): bypass score (refusal log-odds on unsafe
validation prompts with the direction ablated everywhere; lower is better), induce score (refusal
log-odds on safe validation prompts with r added at its layer; must be > 0), KL on safe validation
prompts under ablation (< 0.1), and layer < 0.8 × layers. To keep the cost near that of a few dozen
forward passes per kept candidate, stage 1 screens every eligible candidate's bypass score on a few
prompts and keeps the `screen_keep` lowest among the candidates whose screened KL passes the filter
(topped up from the rest when too few pass); stage 2 scores the kept candidates' bypass on all
validation prompts. KL and induce scores are computed lazily, best bypass first, and stop once the
outcome is decided: the kept set and the choice are those of scoring everything (tested), at about
half the passes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from weight_edit.activations import forward, kl_divergence, last_logits, mean_residuals, tokenized_batches
from weight_edit.architecture import Architecture
from weight_edit.chat import post_instruction_ids, refusal_log_odds, refusal_token_ids, tokenize_instructions
from weight_edit.hooks import activation_addition, residual_ablation
from weight_edit.models import input_device

# progress(description, total) returns a function that advances the bar by n items.
ProgressFactory = Callable[[str, int], Callable[[int], None]]


def no_progress(description: str, total: int) -> Callable[[int], None]:
    return lambda n: None


@dataclass
class FitSettings:
    batch_size: int = 16
    screen_prompts: int = 6
    screen_keep: int = 8  # 0 means: score every eligible candidate in full
    max_validation_prompts: int = 32
    max_layer_fraction: float = 0.8
    max_kl: float = 0.1
    min_induce: float = 0.0
    refusal_prefixes: tuple[str, ...] = ("I", "As", "Sorry")

    @classmethod
    def from_project_settings(cls, batch_size: int, **overrides) -> FitSettings:
        """The thresholds `weight-edit fit` uses by default (settings.py), with `overrides` on top."""
        import settings

        return cls(
            **{
                "batch_size": batch_size,
                "screen_prompts": settings.SCREEN_PROMPTS,
                "screen_keep": settings.SCREEN_KEEP,
                "max_validation_prompts": settings.MAX_VALIDATION_PROMPTS,
                "max_layer_fraction": settings.MAX_LAYER_FRACTION,
                "max_kl": settings.MAX_SELECTION_KL,
                "min_induce": settings.MIN_INDUCE_SCORE,
                "refusal_prefixes": settings.REFUSAL_PREFIXES,
                **overrides,
            }
        )


@dataclass
class CandidateScore:
    layer: int
    position: int  # negative index from the end of the prompt (-1 = last token)
    norm: float
    eligible: bool  # layer < max_layer_fraction × layers and a non-zero vector
    screen_bypass: float | None = None
    screen_kl: float | None = None
    bypass: float | None = None
    induce: float | None = None
    kl: float | None = None
    passes_filters: bool = False
    selected: bool = False


@dataclass
class FitResult:
    direction: torch.Tensor  # unnormalised diff-in-means vector of the chosen candidate
    layer: int
    position: int
    scores: list[CandidateScore]
    baseline: dict[str, float]
    suffix_tokens: list[str]
    refusal_tokens: list[str]
    selection_note: str
    stats: dict[str, int] = field(default_factory=dict)
    # Mean residual input of every layer at every post-instruction position: [layers, positions, d].
    means: dict[str, torch.Tensor] = field(default_factory=dict)

    def chosen(self) -> CandidateScore:
        return next(s for s in self.scores if s.selected)

    def table(self) -> list[dict[str, object]]:
        return [asdict(s) for s in self.scores]


def _mean_refusal(model, prepared, refusal_ids, advance) -> float:
    return float(refusal_log_odds(last_logits(model, prepared, advance), refusal_ids).mean())


@torch.inference_mode()
def _screen(model, arch, num_layers: int, vectors: torch.Tensor, encoded, device) -> torch.Tensor:
    """Last-position logits of every prompt under ablation of every vector: [vectors × prompts, vocab]."""
    ids, mask = (t.repeat(len(vectors), 1).to(device) for t in encoded)
    per_row = vectors.repeat_interleave(encoded[0].shape[0], dim=0)
    out = forward(
        model,
        ids,
        mask,
        prefix_rows=len(vectors),  # one shared prefix per candidate, expanded to its prompts
        prefix_hooks=lambda: residual_ablation(model, arch, num_layers, vectors, per_row=True),
        rest_hooks=lambda: residual_ablation(model, arch, num_layers, per_row, per_row=True),
        logits_to_keep=1,
    )
    return out.logits[:, -1, :].float().cpu()


def fit_direction(
    model: torch.nn.Module,
    tokenizer,
    arch: Architecture,
    num_layers: int,
    train_unsafe: list[str],
    train_safe: list[str],
    val_unsafe: list[str],
    val_safe: list[str],
    settings: FitSettings,
    progress: ProgressFactory = no_progress,
) -> FitResult:
    device = input_device(model)
    suffix = post_instruction_ids(tokenizer)
    n_pos = len(suffix)
    refusal_ids = refusal_token_ids(tokenizer, settings.refusal_prefixes)

    def prepare(texts: list[str]):
        return tokenized_batches(tokenizer, texts, settings.batch_size, device, suffix, by_length=True)

    # 1. candidates: diff-in-means at every layer and post-instruction position
    mean_unsafe = mean_residuals(
        model,
        prepare(train_unsafe),
        num_layers,
        n_pos,
        progress("activations: unsafe train prompts", len(train_unsafe)),
    )
    mean_safe = mean_residuals(
        model, prepare(train_safe), num_layers, n_pos, progress("activations: safe train prompts", len(train_safe))
    )
    candidates = (mean_unsafe - mean_safe).float()  # [layers, positions, d]

    val_unsafe = val_unsafe[: settings.max_validation_prompts]
    val_safe = val_safe[: settings.max_validation_prompts]
    unsafe_batches, safe_batches = prepare(val_unsafe), prepare(val_safe)

    baseline_safe_logits = last_logits(model, safe_batches, progress("baseline: safe validation", len(val_safe)))
    baseline = {
        "unsafe_refusal_log_odds": _mean_refusal(
            model, unsafe_batches, refusal_ids, progress("baseline: unsafe validation", len(val_unsafe))
        ),
        "safe_refusal_log_odds": float(refusal_log_odds(baseline_safe_logits, refusal_ids).mean()),
    }

    max_layer = settings.max_layer_fraction * num_layers
    scores = [
        # Layer 0 sees only token embeddings: positions holding the same template token for every
        # prompt give a zero difference, which is no direction at all.
        CandidateScore(
            layer,
            position - n_pos,
            norm := float(candidates[layer, position].norm()),
            layer < max_layer and norm > 1e-6,
        )
        for layer in range(num_layers)
        for position in range(n_pos)
    ]
    eligible = [s for s in scores if s.eligible]

    def vector(score: CandidateScore) -> torch.Tensor:
        return candidates[score.layer, score.position + n_pos]

    # 2. stage 1: every eligible candidate's bypass score on a few prompts; then their screened KL in
    # order of that score, only until `screen_keep` candidates pass (the rest could not be kept).
    full_search = settings.screen_keep <= 0 or settings.screen_keep >= len(eligible)
    if full_search:
        kept = eligible
    else:
        screen_unsafe, screen_safe = val_unsafe[: settings.screen_prompts], val_safe[: settings.screen_prompts]
        advance = progress("stage 1: screening candidates", len(eligible) * len(screen_unsafe))
        reference = baseline_safe_logits[: len(screen_safe)]
        unsafe_ids = tokenize_instructions(tokenizer, screen_unsafe, suffix)
        safe_ids = tokenize_instructions(tokenizer, screen_safe, suffix)
        # Several candidates share one forward pass: the prompts are repeated, one direction per copy.
        group = max(1, settings.batch_size // max(len(screen_unsafe), len(screen_safe)))
        for start in range(0, len(eligible), group):
            chunk = eligible[start : start + group]
            bypass = _screen(model, arch, num_layers, torch.stack([vector(s) for s in chunk]), unsafe_ids, device)
            bypass = refusal_log_odds(bypass, refusal_ids).view(len(chunk), -1).mean(dim=1)
            for score, b in zip(chunk, bypass.tolist(), strict=True):
                score.screen_bypass = b
            advance(len(chunk) * len(screen_unsafe))
        by_bypass = sorted(eligible, key=lambda s: s.screen_bypass)
        advance = progress("stage 1: screened KL, best first", settings.screen_keep * len(screen_safe))
        low_kl: list[CandidateScore] = []
        for start in range(0, len(by_bypass), group):
            if len(low_kl) >= settings.screen_keep:
                break
            chunk = by_bypass[start : start + group]
            safe_logits = _screen(model, arch, num_layers, torch.stack([vector(s) for s in chunk]), safe_ids, device)
            kl = kl_divergence(reference.repeat(len(chunk), 1), safe_logits).view(len(chunk), -1).mean(dim=1)
            for score, k in zip(chunk, kl.tolist(), strict=True):
                score.screen_kl = k
                if k < settings.max_kl:
                    low_kl.append(score)
            advance(min(len(chunk), max(0, settings.screen_keep - len(low_kl))) * len(screen_safe))
        # Lowest screened bypass among those passing the KL screen, topped up from the rest if too few pass.
        kept = (low_kl + [s for s in by_bypass if s not in low_kl])[: settings.screen_keep]

    # 3. stage 2: full bypass score of every kept candidate; then, best bypass first, KL and induce
    # until one passes the filters: it is the choice (scoring the others could not change it).
    advance = progress("stage 2: bypass scores", len(kept) * len(val_unsafe))
    for score in kept:
        with residual_ablation(model, arch, num_layers, vector(score)):
            score.bypass = _mean_refusal(model, unsafe_batches, refusal_ids, advance)
    advance = progress("stage 2: KL and induce, best first", 2 * len(val_safe))
    for score in sorted(kept, key=lambda s: s.bypass):
        with residual_ablation(model, arch, num_layers, vector(score)):
            ablated_safe = last_logits(model, safe_batches, advance)
        score.kl = float(kl_divergence(baseline_safe_logits, ablated_safe).mean())
        with activation_addition(model, arch, score.layer, vector(score)):
            score.induce = _mean_refusal(model, safe_batches, refusal_ids, advance)
        score.passes_filters = score.induce > settings.min_induce and score.kl < settings.max_kl
        if score.passes_filters:
            break

    passing = [s for s in kept if s.passes_filters]
    if passing:
        chosen = min(passing, key=lambda s: s.bypass)
        note = (
            f"lowest bypass among the {len(kept)} fully scored candidates that passes the filters "
            f"({sum(s.kl is not None for s in kept)} checked, best bypass first)"
        )
    else:
        chosen = min(kept, key=lambda s: s.bypass)
        note = f"no candidate passed induce > {settings.min_induce} and KL < {settings.max_kl}; lowest bypass taken"
    chosen.selected = True
    return FitResult(
        direction=vector(chosen).clone(),
        means={"unsafe": mean_unsafe.float(), "safe": mean_safe.float()},
        layer=chosen.layer,
        position=chosen.position,
        scores=scores,
        baseline=baseline,
        suffix_tokens=tokenizer.convert_ids_to_tokens(suffix),
        refusal_tokens=tokenizer.convert_ids_to_tokens(refusal_ids),
        selection_note=note,
        stats={
            "candidates": len(scores),
            "eligible": len(eligible),
            "fully_scored": len(kept),
            "train_unsafe": len(train_unsafe),
            "train_safe": len(train_safe),
            "validation_unsafe": len(val_unsafe),
            "validation_safe": len(val_safe),
        },
    )
